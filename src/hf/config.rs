//! HF `GPT2Config` (`config.json`) -> our [`Config`]. Absent fields take
//! `GPT2Config`'s defaults, as `transformers` does. Whatever our model
//! cannot compute the same way is refused with an error naming the field:
//! another `model_type`, cross-attention, attention scaled by the inverse
//! layer index or not scaled at all, an MLP width other than 4 * n_embd, an
//! activation other than the tanh GELU.
//! `reorder_and_upcast_attn` only changes the precision of half-precision
//! attention; we compute in f32, so it is accepted.

use std::path::Path;

use anyhow::{bail, Context};
use serde::Deserialize;

use crate::model::config::{Config, Exit, ExitHead};

/// The fields of `config.json` we read (the rest are training-only, such
/// as dropout, or describe heads other than the LM head).
#[derive(Deserialize, Debug, Clone)]
pub struct HfConfig {
    pub model_type: Option<String>,
    #[serde(default)]
    pub architectures: Option<Vec<String>>,
    #[serde(default = "defaults::vocab_size")]
    pub vocab_size: usize,
    #[serde(default = "defaults::n_positions")]
    pub n_positions: usize,
    /// Legacy: the causal mask's size in old `transformers` versions.
    #[serde(default)]
    pub n_ctx: Option<usize>,
    #[serde(default = "defaults::n_embd")]
    pub n_embd: usize,
    #[serde(default = "defaults::n_layer")]
    pub n_layer: usize,
    #[serde(default = "defaults::n_head")]
    pub n_head: usize,
    /// MLP width; None means 4 * n_embd.
    #[serde(default)]
    pub n_inner: Option<usize>,
    #[serde(default = "defaults::activation_function")]
    pub activation_function: String,
    #[serde(default = "defaults::layer_norm_epsilon")]
    pub layer_norm_epsilon: f64,
    #[serde(default)]
    pub add_cross_attention: bool,
    #[serde(default)]
    pub scale_attn_by_inverse_layer_idx: bool,
    #[serde(default = "defaults::yes")]
    pub scale_attn_weights: bool,
    #[serde(default = "defaults::yes")]
    pub tie_word_embeddings: bool,
}

/// `GPT2Config`'s defaults (the 124 M `gpt2`).
mod defaults {
    pub fn vocab_size() -> usize {
        50257
    }
    pub fn n_positions() -> usize {
        1024
    }
    pub fn n_embd() -> usize {
        768
    }
    pub fn n_layer() -> usize {
        12
    }
    pub fn n_head() -> usize {
        12
    }
    pub fn activation_function() -> String {
        "gelu_new".into()
    }
    pub fn layer_norm_epsilon() -> f64 {
        1e-5
    }
    pub fn yes() -> bool {
        true
    }
}

/// Activations that are the tanh approximation of GELU, which we compute.
const TANH_GELUS: [&str; 2] = ["gelu_new", "gelu_pytorch_tanh"];

/// Architectures whose weights are a GPT-2 backbone and (tied) LM head.
const ARCHITECTURES: [&str; 2] = ["GPT2LMHeadModel", "GPT2Model"];

impl HfConfig {
    pub fn read(dir: &Path) -> anyhow::Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        serde_json::from_str(&text)
            .with_context(|| format!("{} is not a GPT-2 config", path.display()))
    }

    /// Our config: the final exit only (exits are trained afterwards with
    /// `train --init-from --freeze-backbone`).
    pub fn to_config(&self) -> anyhow::Result<Config> {
        self.check_architecture()?;
        self.check_computation()?;
        let cfg = Config {
            n_layer: self.n_layer,
            n_head: self.n_head,
            n_embd: self.n_embd,
            block_size: self.block_size()?,
            vocab_size: self.vocab_size,
            bias: true,
            exits: vec![Exit {
                block: self.n_layer,
                weight: 1.0,
            }],
            exit_head: ExitHead::Tied,
            dwa: None,
            x0_skip: false,
            layer_norm_epsilon: self.layer_norm_epsilon,
        };
        cfg.validate().context("config.json")?;
        Ok(cfg)
    }

    fn check_architecture(&self) -> anyhow::Result<()> {
        match self.model_type.as_deref() {
            Some("gpt2") => {}
            Some(other) => bail!(
                "config.json: model_type is \"{other}\"; import-hf reads only \"gpt2\" (GPT2LMHeadModel)"
            ),
            None => bail!("config.json: model_type is missing; import-hf reads only \"gpt2\""),
        }
        if let Some(archs) = &self.architectures {
            if !archs.iter().any(|a| ARCHITECTURES.contains(&a.as_str())) {
                bail!("config.json: architectures is {archs:?}; import-hf reads {ARCHITECTURES:?}");
            }
        }
        Ok(())
    }

    /// Refuses options that change what the blocks compute.
    fn check_computation(&self) -> anyhow::Result<()> {
        if self.add_cross_attention {
            bail!("config.json: add_cross_attention is true; cross-attention layers are not supported");
        }
        if self.scale_attn_by_inverse_layer_idx {
            bail!("config.json: scale_attn_by_inverse_layer_idx is true; attention scaled by 1/(layer index) is not supported");
        }
        if !self.scale_attn_weights {
            bail!("config.json: scale_attn_weights is false; unscaled attention is not supported (we scale by 1/sqrt(head size))");
        }
        if !TANH_GELUS.contains(&self.activation_function.as_str()) {
            bail!(
                "config.json: activation_function is \"{}\"; supported: {TANH_GELUS:?} (the tanh GELU)",
                self.activation_function
            );
        }
        if let Some(n) = self.n_inner.filter(|&n| n != 4 * self.n_embd) {
            bail!(
                "config.json: n_inner is {n}; the MLP must be 4 * n_embd = {} wide",
                4 * self.n_embd
            );
        }
        Ok(())
    }

    /// The context window: n_positions (the rows of `wpe`). Old configs
    /// also carry n_ctx, the causal mask's size in old `transformers`; a
    /// smaller one means the model never saw positions past it.
    fn block_size(&self) -> anyhow::Result<usize> {
        match self.n_ctx {
            Some(ctx) if ctx < self.n_positions => bail!(
                "config.json: n_ctx ({ctx}) is smaller than n_positions ({}); set n_ctx to n_positions if the model was trained on {} positions",
                self.n_positions,
                self.n_positions
            ),
            _ => Ok(self.n_positions),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> HfConfig {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn absent_fields_take_gpt2s_defaults() {
        let c = parse(r#"{"model_type": "gpt2"}"#).to_config().unwrap();
        assert_eq!(
            (c.n_layer, c.n_embd, c.block_size, c.vocab_size),
            (12, 768, 1024, 50257)
        );
        assert_eq!(
            c.exits,
            vec![Exit {
                block: 12,
                weight: 1.0
            }]
        );
        assert_eq!(c.layer_norm_epsilon, 1e-5);
    }

    #[test]
    fn layer_norm_epsilon_is_kept() {
        let c = parse(r#"{"model_type": "gpt2", "layer_norm_epsilon": 1e-6}"#);
        assert_eq!(c.to_config().unwrap().layer_norm_epsilon, 1e-6);
    }

    #[test]
    fn unrepresentable_options_are_refused_by_field_name() {
        for (json, field) in [
            (r#"{"model_type": "llama"}"#, "model_type"),
            (r#"{}"#, "model_type"),
            (
                r#"{"model_type": "gpt2", "architectures": ["GPT2ForSequenceClassification"]}"#,
                "architectures",
            ),
            (
                r#"{"model_type": "gpt2", "add_cross_attention": true}"#,
                "add_cross_attention",
            ),
            (
                r#"{"model_type": "gpt2", "scale_attn_by_inverse_layer_idx": true}"#,
                "scale_attn_by_inverse_layer_idx",
            ),
            (
                r#"{"model_type": "gpt2", "scale_attn_weights": false}"#,
                "scale_attn_weights",
            ),
            (
                r#"{"model_type": "gpt2", "activation_function": "relu"}"#,
                "activation_function",
            ),
            (r#"{"model_type": "gpt2", "n_inner": 1000}"#, "n_inner"),
            (r#"{"model_type": "gpt2", "n_ctx": 512}"#, "n_ctx"),
            (r#"{"model_type": "gpt2", "n_head": 7}"#, "n_head"),
            (
                r#"{"model_type": "gpt2", "layer_norm_epsilon": 0}"#,
                "layer_norm_epsilon",
            ),
        ] {
            let err = format!("{:#}", parse(json).to_config().unwrap_err());
            assert!(err.contains(field), "{json}: {err}");
        }
    }

    #[test]
    fn the_other_tanh_gelu_and_upcast_attention_are_accepted() {
        let c = parse(
            r#"{"model_type": "gpt2", "activation_function": "gelu_pytorch_tanh",
                "reorder_and_upcast_attn": true, "n_inner": 3072, "n_ctx": 1024}"#,
        );
        c.to_config().unwrap();
    }
}
