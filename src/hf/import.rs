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
    check_out(out)?;
    let hf = HfConfig::read(dir)?;
    let model = hf.to_config()?;
    let tensors = HfTensors::open(dir)?;
    let dtype = tensors.dtype()?;
    let params = tensors.params(&model)?;
    tensors.check_lm_head(wte(&params)?, hf.tie_word_embeddings)?;
    let tokenizer = read_tokenizer(dir, model.vocab_size)?;
    let config = CheckpointConfig {
        format_version: FORMAT_VERSION,
        model,
        dtype: dtype_name(dtype)
            .context("dtype checked by HfTensors::dtype")?
            .into(),
        training: json!({ "imported_from": dir.display().to_string() }),
    };
    checkpoint::save(out, &config, &params, &tokenizer)?;
    Ok(config)
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
