//! `gpt-serve import-hf DIR --out OUT`: a local Hugging Face GPT-2
//! directory (`config.json`, `model.safetensors` or shards with an index,
//! `tokenizer.json` or `vocab.json` + `merges.txt`) -> our checkpoint
//! directory, weights in their source dtype. Nothing is downloaded.
//!
//! The checkpoint has the final exit only; `train --init-from OUT
//! --freeze-backbone --exits ...` adds exit heads and the drafter.

use std::path::Path;

use anyhow::{bail, Context};
use candle_core::Tensor;
use serde_json::json;

use super::config::HfConfig;
use super::dtype_name;
use super::weights::HfTensors;
use crate::checkpoint::{self, CheckpointConfig, FORMAT_VERSION};
use crate::model::params;
use crate::tokenizer::Tokenizer;

/// Imports `dir` into `out` (a new or empty directory); returns the
/// checkpoint's config.
pub fn import_hf(dir: &Path, out: &Path) -> anyhow::Result<CheckpointConfig> {
    import_hf_as(dir, out, "auto")
}

/// [`import_hf`] with `--dtype`: `auto` keeps the source dtype; `f32` or
/// `f16` converts model.safetensors to it; `q8_0` or `q4_0` keeps the
/// source tensors and records the dtype in config.json's `weights`, so
/// `serve`, `sample` and `bench` under `--weights auto` (and `export-gguf`)
/// use those blocks. Why not store the blocks: see
/// [`CheckpointConfig::weights`].
pub fn import_hf_as(dir: &Path, out: &Path, dtype_arg: &str) -> anyhow::Result<CheckpointConfig> {
    let weights = match dtype_arg {
        "auto" | "f32" | "f16" => None,
        "q8_0" | "q4_0" => Some(dtype_arg.to_string()),
        d => bail!("unknown --dtype `{d}` (expected one of: auto, f32, f16, q8_0, q4_0)"),
    };
    check_out(out)?;
    let hf = HfConfig::read(dir)?;
    let model = hf.to_config()?;
    let tensors = HfTensors::open(dir)?;
    let dtype = tensors.dtype()?;
    let params = tensors.params(&model)?;
    tensors.check_lm_head(wte(&params)?, hf.tie_word_embeddings)?;
    let tokenizer = read_tokenizer(dir, model.vocab_size)?;
    if let Some(w) = &weights {
        check_quantizable(&model, &params, w)?;
    }
    let source = dtype_name(dtype).context("dtype checked by HfTensors::dtype")?;
    let config = CheckpointConfig {
        format_version: FORMAT_VERSION,
        weights,
        model,
        dtype: match dtype_arg {
            "f32" | "f16" => dtype_arg,
            _ => source,
        }
        .into(),
        training: json!({ "imported_from": dir.display().to_string() }),
    };
    checkpoint::save(out, &config, &params, &tokenizer)?;
    Ok(config)
}

/// Builds the model at `weights` once, so a model the dtype cannot hold
/// is refused at import rather than at its first `serve`.
fn check_quantizable(
    model: &crate::model::config::Config,
    params: &[(String, Tensor)],
    weights: &str,
) -> anyhow::Result<()> {
    let dt = weights.parse().map_err(anyhow::Error::msg)?;
    let tensors = params.iter().cloned().collect();
    crate::model::cpu::CpuGpt::load(model, &tensors, dt)
        .map(drop)
        .with_context(|| format!("--dtype {weights}"))
}

fn wte(params: &[(String, Tensor)]) -> anyhow::Result<&Tensor> {
    params
        .iter()
        .find(|(n, _)| n == params::WTE)
        .map(|(_, t)| t)
        .with_context(|| format!("{} is a parameter of every model", params::WTE))
}

/// A fresh directory, so no file of another model (a drafter) is left
/// beside the imported weights.
fn check_out(out: &Path) -> anyhow::Result<()> {
    if let Ok(mut entries) = std::fs::read_dir(out) {
        if entries.next().is_some() {
            bail!(
                "--out {} is not empty; import-hf writes a fresh checkpoint directory",
                out.display()
            );
        }
    }
    Ok(())
}

/// `tokenizer.json`, else GPT-2's `vocab.json` + `merges.txt`; it must have
/// no token id past the weights' `vocab_size` rows.
pub fn read_tokenizer(dir: &Path, vocab_size: usize) -> anyhow::Result<Tokenizer> {
    let json = dir.join(checkpoint::TOKENIZER_FILE);
    let tok = if json.exists() {
        Tokenizer::from_file(&json)?
    } else if dir.join("vocab.json").exists() && dir.join("merges.txt").exists() {
        Tokenizer::gpt2(dir)?
    } else {
        bail!(
            "{} has no tokenizer.json and no vocab.json + merges.txt",
            dir.display()
        );
    };
    if tok.vocab_size() > vocab_size {
        bail!(
            "vocab mismatch: the tokenizer has {} tokens but the weights have {vocab_size} rows (config.json vocab_size); ids past {} would have no embedding",
            tok.vocab_size(),
            vocab_size - 1
        );
    }
    Ok(tok)
}

/// What `import-hf` prints: the model and the next command.
pub fn summary(out: &Path, c: &CheckpointConfig) -> String {
    let m = &c.model;
    format!(
        "imported {} parameters ({}) into {}: {} blocks x {} wide, {} heads, context {}, vocab {}, layer_norm_epsilon {}\n\
         next: gpt-serve train DATA.txt --init-from {} --freeze-backbone --exits {} --out OUT --steps N",
        m.n_params(),
        c.dtype,
        out.display(),
        m.n_layer,
        m.n_embd,
        m.n_head,
        m.block_size,
        m.vocab_size,
        m.layer_norm_epsilon,
        out.display(),
        exits_hint(m.n_layer),
    )
}

/// The seed's exit layout scaled to `n_layer` blocks, as `--exits` takes it.
pub fn exits_hint(n_layer: usize) -> String {
    crate::model::config::default_exits(n_layer)
        .iter()
        .map(|e| format!("{}:{:.2}", e.block, e.weight))
        .collect::<Vec<_>>()
        .join(",")
}
