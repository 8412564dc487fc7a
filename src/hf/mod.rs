//! Hugging Face `transformers` GPT-2 (`GPT2LMHeadModel`) in and out:
//! `import-hf` reads a local model directory into our checkpoint format,
//! `export-hf` writes one back. The two are inverses on every parameter
//! tensor, bit for bit, in the source dtype.
//!
//! The mapping (Radford et al. 2019, as laid out by `transformers`):
//! - names: HF's `transformer.{wte, wpe, h.i.*, ln_f}` are ours without the
//!   `transformer.` prefix (hub checkpoints such as `gpt2` omit it too);
//! - `attn.c_attn`, `attn.c_proj`, `mlp.c_fc`, `mlp.c_proj` are Conv1D
//!   layers stored (in, out): ours are nn.Linear (out, in), so they are
//!   transposed on the way in and out;
//! - `lm_head.weight` is tied to `wte` (our final exit projects with `wte`);
//! - `h.i.attn.bias` / `h.i.attn.masked_bias` are causal-mask buffers, not
//!   parameters: dropped on import, not written on export.
//!
//! [`config`] turns HF's `config.json` into our [`crate::model::config::Config`]
//! (refusing what the model cannot represent), [`weights`] reads and maps
//! the tensors, [`import`] and [`export`] are the two commands.

pub mod config;
pub mod export;
pub mod import;
pub mod weights;

/// The prefix `GPT2LMHeadModel.save_pretrained` puts on the backbone's names.
pub const PREFIX: &str = "transformer.";

/// Whether our parameter `name` is a Conv1D weight in HF's layout: the
/// weights of a block's Linear layers.
pub fn is_conv1d(name: &str) -> bool {
    crate::model::params::is_linear_weight(name)
}

/// Our dtype name ("f32", "f16", "bf16") of a candle dtype, when we store it.
pub fn dtype_name(dt: candle_core::DType) -> Option<&'static str> {
    match dt {
        candle_core::DType::F32 => Some("f32"),
        candle_core::DType::F16 => Some("f16"),
        candle_core::DType::BF16 => Some("bf16"),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_four_projection_weights_are_conv1d() {
        assert!(is_conv1d("h.0.attn.c_attn.weight"));
        assert!(is_conv1d("h.11.mlp.c_proj.weight"));
        assert!(!is_conv1d("h.0.attn.c_attn.bias"));
        assert!(!is_conv1d("h.0.ln_1.weight"));
        assert!(!is_conv1d("wte.weight"));
        assert!(!is_conv1d("exits.8.lm_head.weight"));
    }
}
