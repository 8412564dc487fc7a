//! Export to Hugging Face `transformers` GPT-2 format (`GPT2LMHeadModel`):
//! `transformer.`-prefixed names, Conv1D weights stored (in, out), i.e.
//! transposed from our (out, in) Linear layout, `lm_head` tied to `wte`,
//! `activation_function: gelu_new` (the tanh GELU we use), the checkpoint's
//! `layer_norm_epsilon` and storage dtype (so an imported model comes back
//! bit for bit). The extra exits are dropped (the HF model is the final
//! exit); DWA and x0 skips have no GPT-2 equivalent and are refused, as is a
//! model without biases.

use std::path::Path;

use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor};
use serde_json::json;

use super::{is_conv1d, PREFIX};
use crate::checkpoint;

pub fn export_hf(model_dir: &Path, out: &Path) -> anyhow::Result<()> {
    let loaded = checkpoint::load(model_dir, &Device::Cpu)?;
    let cfg = &loaded.config.model;
    if cfg.dwa.is_some() || cfg.x0_skip {
        bail!("DWA and x0 skips have no GPT2LMHeadModel equivalent; only baseline-architecture checkpoints export");
    }
    if !cfg.bias {
        bail!("GPT2LMHeadModel has biases; this checkpoint was trained with bias = false");
    }
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    for (name, t) in &loaded.weights {
        if crate::model::params::is_exit(name) {
            continue;
        }
        let t = if is_conv1d(name) {
            t.t()?.contiguous()?
        } else {
            t.clone()
        };
        tensors.push((format!("{PREFIX}{name}"), t));
    }
    let dtype = loaded.config.storage_dtype();
    checkpoint::save_tensors(&out.join("model.safetensors"), &tensors, dtype)?;
    let hf = json!({
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.block_size,
        "n_ctx": cfg.block_size,
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": cfg.layer_norm_epsilon,
        "torch_dtype": torch_dtype(dtype),
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
        "tie_word_embeddings": true,
        "bos_token_id": loaded.tokenizer.eot(),
        "eos_token_id": loaded.tokenizer.eot(),
    });
    checkpoint::write_atomic(
        &out.join("config.json"),
        serde_json::to_string_pretty(&hf)?.as_bytes(),
    )?;
    checkpoint::write_atomic(
        &out.join("tokenizer.json"),
        loaded.tokenizer.to_json()?.as_bytes(),
    )?;
    Ok(())
}

/// `transformers`' name of a storage dtype.
fn torch_dtype(dt: DType) -> &'static str {
    match dt {
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
        _ => "float32",
    }
}
