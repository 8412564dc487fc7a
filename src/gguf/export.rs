//! `gpt-serve export-gguf`: a checkpoint as a GGUF file for llama.cpp's
//! `gpt2` architecture, its linear layers stored as `--weights` asks.
//! Quantized layers are this crate's own Q8_0/Q4_0 blocks (what
//! [`QMatrix`] serves, read back in GGUF's layout), so llama.cpp and
//! `gpt-serve` compare on identical numbers; the tokenizer metadata is
//! what `scripts/gguf_export.py` writes (byte-level BPE vocabulary, token
//! types, merges, `<|endoftext|>` as BOS and EOS).
//!
//! Tensor names are llama.cpp's (`token_embd`, `blk.N.attn_qkv`, ...);
//! nn.Linear's (out, in) is GGUF's row-major layout with dims `[in, out]`.
//! Norms, biases and the position embedding stay f32. For quantized
//! exports the embedding lookup stays f32 and the tied output projection
//! is written as `output.weight` in the quantized type, as `gpt-serve`
//! serves it (llama.cpp reads `token_embd` for the lookup and `output` for
//! the logits). The early exits are left out (llama.cpp's gpt2 is the
//! final exit); DWA and x0 skips have no gpt2 equivalent and are refused.

use std::path::Path;

use anyhow::{bail, Context};
use candle_core::Device;
use half::f16;

use super::{GgmlType, Gguf, TensorData, Value, ALIGNMENT};
use crate::checkpoint::{self, Loaded};
use crate::model::cpu::WeightDtype;
use crate::model::params;
use crate::model::quant::{QMatrix, QuantKind};

/// llama.cpp's `enum llama_ftype` for a file whose matrices are `dt`.
fn file_type(dt: WeightDtype) -> u32 {
    match dt {
        WeightDtype::F32 => 0,
        WeightDtype::F16 => 1,
        WeightDtype::Q4_0 => 2,
        WeightDtype::Q8_0 => 7,
    }
}

/// Writes `model_dir`'s checkpoint to `out` with matrices as `weights`
/// (`auto`: the checkpoint's serving dtype); returns the dtype written.
pub fn export_gguf(model_dir: &Path, out: &Path, weights: &str) -> anyhow::Result<WeightDtype> {
    let loaded = checkpoint::load(model_dir, &Device::Cpu)?;
    let dt = loaded.weight_dtype(weights).map_err(anyhow::Error::msg)?;
    let cfg = &loaded.config.model;
    if cfg.dwa.is_some() || cfg.x0_skip {
        bail!("DWA and x0 skips have no llama.cpp gpt2 equivalent; only baseline-architecture checkpoints export");
    }
    let mut g = Gguf::default();
    metadata(&mut g, &loaded, dt)?;
    tokenizer(
        &mut g,
        &model_dir.join(checkpoint::TOKENIZER_FILE),
        cfg.vocab_size,
    )?;
    tensors(&mut g, &loaded, dt)?;
    g.write(out)
        .with_context(|| format!("cannot write {}", out.display()))?;
    Ok(dt)
}

fn metadata(g: &mut Gguf, loaded: &Loaded, dt: WeightDtype) -> anyhow::Result<()> {
    let cfg = &loaded.config.model;
    let u32_of = |name: &str, v: usize| {
        u32::try_from(v).with_context(|| format!("{name} {v} does not fit GGUF's u32"))
    };
    g.set("general.architecture", Value::Str("gpt2".into()));
    g.set("general.alignment", Value::U32(ALIGNMENT as u32));
    g.set("general.file_type", Value::U32(file_type(dt)));
    let sizes = [
        ("gpt2.context_length", "block_size", cfg.block_size),
        ("gpt2.embedding_length", "n_embd", cfg.n_embd),
        ("gpt2.feed_forward_length", "4 * n_embd", 4 * cfg.n_embd),
        ("gpt2.block_count", "n_layer", cfg.n_layer),
        ("gpt2.attention.head_count", "n_head", cfg.n_head),
    ];
    for (key, name, v) in sizes {
        g.set(key, Value::U32(u32_of(name, v)?));
    }
    let eps = cfg.layer_norm_epsilon as f32;
    g.set("gpt2.attention.layer_norm_epsilon", Value::F32(eps));
    Ok(())
}

/// llama.cpp's token types.
const NORMAL: i32 = 1;
const CONTROL: i32 = 3;
const UNUSED: i32 = 5;

/// tokenizer.json's BPE merges as GGUF spells them ("a b"); the file may
/// hold them as strings or as pairs.
fn merges(tok: &serde_json::Value, path: &Path) -> anyhow::Result<Vec<String>> {
    let bad = || anyhow::anyhow!("{}: a merge is neither \"a b\" nor [a, b]", path.display());
    let list = tok["model"]["merges"]
        .as_array()
        .with_context(|| format!("{}: no model.merges array", path.display()))?;
    list.iter()
        .map(|m| match m {
            serde_json::Value::String(s) => Ok(s.clone()),
            serde_json::Value::Array(p) => match p.as_slice() {
                [serde_json::Value::String(a), serde_json::Value::String(b)] => {
                    Ok(format!("{a} {b}"))
                }
                _ => Err(bad()),
            },
            _ => Err(bad()),
        })
        .collect()
}

/// The byte-level BPE vocabulary of `tokenizer.json`, padded with unused
/// tokens up to the model's `vocab_size`.
fn tokenizer(g: &mut Gguf, path: &Path, vocab_size: usize) -> anyhow::Result<()> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let tok: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    let bad = |what: &str| anyhow::anyhow!("{}: {what}", path.display());
    let vocab = tok["model"]["vocab"]
        .as_object()
        .ok_or_else(|| bad("no model.vocab object (not a BPE tokenizer)"))?;
    let mut tokens: Vec<Option<String>> = vec![None; vocab_size];
    for (t, id) in vocab {
        let id = id
            .as_u64()
            .ok_or_else(|| bad("a vocab id is not an integer"))? as usize;
        let slot = tokens
            .get_mut(id)
            .ok_or_else(|| bad(&format!("token id {id} >= vocab_size {vocab_size}")))?;
        *slot = Some(t.clone());
    }
    let mut types: Vec<i32> = tokens
        .iter()
        .map(|t| if t.is_some() { NORMAL } else { UNUSED })
        .collect();
    let mut eot = None;
    for a in tok["added_tokens"].as_array().into_iter().flatten() {
        let (Some(id), Some(content)) = (a["id"].as_u64(), a["content"].as_str()) else {
            continue;
        };
        let id = id as usize;
        if id < vocab_size {
            tokens[id] = Some(content.to_string());
            types[id] = if a["special"].as_bool() == Some(true) {
                CONTROL
            } else {
                NORMAL
            };
        }
        if content == "<|endoftext|>" {
            eot = Some(id as u32);
        }
    }
    let eot = eot.ok_or_else(|| bad("no <|endoftext|> token"))?;
    let merges = merges(&tok, path)?;
    let tokens = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| t.unwrap_or_else(|| format!("<unused{i}>")))
        .collect();
    g.set("tokenizer.ggml.model", Value::Str("gpt2".into()));
    g.set("tokenizer.ggml.pre", Value::Str("gpt-2".into()));
    g.set("tokenizer.ggml.tokens", Value::Strs(tokens));
    g.set("tokenizer.ggml.token_type", Value::I32s(types));
    g.set("tokenizer.ggml.merges", Value::Strs(merges));
    g.set("tokenizer.ggml.bos_token_id", Value::U32(eot));
    g.set("tokenizer.ggml.eos_token_id", Value::U32(eot));
    g.set("tokenizer.ggml.add_bos_token", Value::Bool(false));
    Ok(())
}

/// Tensor `name` of the checkpoint as f32 values.
fn values(loaded: &Loaded, name: &str) -> anyhow::Result<Vec<f32>> {
    let t = loaded
        .weights
        .get(name)
        .with_context(|| format!("the checkpoint lacks `{name}`"))?;
    Ok(t.to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?)
}

/// `w` (rows of `k` values) stored as `dt`: f32, f16, or our quantized
/// blocks in GGUF's layout; `name` is what a quantization error cites.
fn encode(name: &str, w: &[f32], k: usize, dt: WeightDtype) -> anyhow::Result<(GgmlType, Vec<u8>)> {
    let q = |kind: QuantKind| -> anyhow::Result<Vec<u8>> {
        let m = QMatrix::from_out_in(name, kind, w, (w.len() / k.max(1), k), None).with_context(
            || {
                format!(
                    "cannot store the weights as {}; export with --weights f16 or f32",
                    dt.name()
                )
            },
        )?;
        Ok(m.to_bytes())
    };
    Ok(match dt {
        WeightDtype::F32 => (
            GgmlType::F32,
            w.iter().flat_map(|x| x.to_le_bytes()).collect(),
        ),
        WeightDtype::F16 => (
            GgmlType::F16,
            w.iter()
                .flat_map(|x| f16::from_f32(*x).to_le_bytes())
                .collect(),
        ),
        WeightDtype::Q8_0 => (GgmlType::Q8_0, q(QuantKind::Q8_0)?),
        WeightDtype::Q4_0 => (GgmlType::Q4_0, q(QuantKind::Q4_0)?),
    })
}

/// Adds checkpoint matrix `src` as GGUF tensor `dst` (rows of `k`
/// values, dims `[k, rows]`), stored as `dt`.
fn matrix(
    g: &mut Gguf,
    loaded: &Loaded,
    (dst, src): (&str, &str),
    k: usize,
    dt: WeightDtype,
) -> anyhow::Result<()> {
    let w = values(loaded, src)?;
    let (ty, data) = encode(src, &w, k, dt)?;
    let dims = vec![k as u64, (w.len() / k) as u64];
    g.tensors.push(TensorData {
        name: dst.to_string(),
        dims,
        ty,
        data,
    });
    Ok(())
}

/// Adds checkpoint vector `src` (a norm's weight, a bias) as f32.
fn vector(g: &mut Gguf, loaded: &Loaded, (dst, src): (&str, &str)) -> anyhow::Result<()> {
    let w = values(loaded, src)?;
    let data = w.iter().flat_map(|x| x.to_le_bytes()).collect();
    let dims = vec![w.len() as u64];
    g.tensors.push(TensorData {
        name: dst.to_string(),
        dims,
        ty: GgmlType::F32,
        data,
    });
    Ok(())
}

/// A norm or linear layer, llama.cpp's name then ours; for a linear layer,
/// its input width in units of n_embd.
const LAYERS: [(&str, &str, Option<usize>); 6] = [
    ("attn_norm", params::LN_1, None),
    ("attn_qkv", params::C_ATTN, Some(1)),
    ("attn_output", params::ATTN_PROJ, Some(1)),
    ("ffn_norm", params::LN_2, None),
    ("ffn_up", params::C_FC, Some(1)),
    ("ffn_down", params::MLP_PROJ, Some(4)),
];

/// Weight and bias (when the model has biases) of a layer.
fn layer(
    g: &mut Gguf,
    loaded: &Loaded,
    (theirs, ours): (&str, &str),
    width: Option<usize>,
    dt: WeightDtype,
) -> anyhow::Result<()> {
    let c = loaded.config.model.n_embd;
    let names = (&format!("{theirs}.weight")[..], &params::weight(ours)[..]);
    match width {
        Some(k) => matrix(g, loaded, names, k * c, dt)?,
        None => vector(g, loaded, names)?,
    }
    if loaded.config.model.bias {
        vector(g, loaded, (&format!("{theirs}.bias"), &params::bias(ours)))?;
    }
    Ok(())
}

fn tensors(g: &mut Gguf, loaded: &Loaded, dt: WeightDtype) -> anyhow::Result<()> {
    let cfg = &loaded.config.model;
    let (c, f32_) = (cfg.n_embd, WeightDtype::F32);
    let quantized = matches!(dt, WeightDtype::Q8_0 | WeightDtype::Q4_0);
    matrix(
        g,
        loaded,
        ("token_embd.weight", params::WTE),
        c,
        if quantized { f32_ } else { dt },
    )?;
    matrix(g, loaded, ("position_embd.weight", params::WPE), c, f32_)?;
    for i in 0..cfg.n_layer {
        for (name, ours, width) in LAYERS {
            let names = (&format!("blk.{i}.{name}")[..], &params::block(i, ours)[..]);
            layer(g, loaded, names, width, dt)?;
        }
    }
    layer(g, loaded, ("output_norm", params::LN_F), None, dt)?;
    if quantized {
        matrix(g, loaded, ("output.weight", params::WTE), c, dt)?;
    }
    Ok(())
}
