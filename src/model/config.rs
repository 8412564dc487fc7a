//! Model configuration: the GPT-2 shape plus the options gpt-serve adds
//! (exit heads, DWA, x0 skips). The checkpoint stores this struct as JSON, so
//! a checkpoint directory is all that is needed to rebuild the model.

use serde::{Deserialize, Serialize};

/// An exit: after block `block` (1-based, `n_layer` is the final exit) the
/// stream goes through its own LayerNorm and a vocab projection.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq)]
pub struct Exit {
    pub block: usize,
    /// Loss weight of this exit's cross-entropy during training.
    pub weight: f32,
}

/// How a non-final exit projects to the vocabulary.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum ExitHead {
    /// Own LayerNorm, projection shared with `wte` (GPT-2 ties `lm_head` the
    /// same way): an exit adds 2 * n_embd parameters.
    #[default]
    Tied,
    /// Own LayerNorm and own (vocab_size, n_embd) `lm_head`.
    Own,
}

/// DenseFormer depth-weighted averaging (arXiv 2402.02622).
/// After block i (1-based) with `i % period == 0`, the stream becomes
/// `sum_j alpha_{i,j} X_j` over j in 0..=i with `(i - j) % dilation == 0`,
/// X_0 the embedding and X_j the output of block j.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dwa {
    pub dilation: usize,
    pub period: usize,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Config {
    pub n_layer: usize,
    pub n_head: usize,
    pub n_embd: usize,
    /// Context window (maximum positions).
    pub block_size: usize,
    pub vocab_size: usize,
    /// Biases in Linear layers and LayerNorms (GPT-2: true).
    pub bias: bool,
    /// Sorted by block; the last one is block `n_layer` (ln_f + lm_head).
    pub exits: Vec<Exit>,
    #[serde(default)]
    pub exit_head: ExitHead,
    #[serde(default)]
    pub dwa: Option<Dwa>,
    /// `x = a_i * x + b_i * x0` before each block, a = 1 and b = 0 at init.
    #[serde(default)]
    pub x0_skip: bool,
    /// Epsilon of every LayerNorm (GPT-2: 1e-5; imported models keep theirs).
    #[serde(default = "default_layer_norm_epsilon")]
    pub layer_norm_epsilon: f64,
}

/// GPT-2's LayerNorm epsilon, the default of checkpoints that predate the field.
pub const LAYER_NORM_EPSILON: f64 = 1e-5;

fn default_layer_norm_epsilon() -> f64 {
    LAYER_NORM_EPSILON
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ConfigError {
    #[error("invalid model config: {0}")]
    Invalid(String),
    #[error("unknown preset `{0}` (expected one of: tiny, small, gpt2)")]
    UnknownPreset(String),
}

/// The seed's exits for a 12-block model (8, 10, 12 with 0.05, 0.15, 0.8),
/// scaled to `n_layer` blocks (2/3, 5/6 and all of the depth). Exits that
/// round onto the same block are merged (weights added).
pub fn default_exits(n_layer: usize) -> Vec<Exit> {
    let raw = [
        ((2 * n_layer + 1) / 3, 0.05f32),
        ((5 * n_layer + 3) / 6, 0.15),
        (n_layer, 0.8),
    ];
    let mut exits: Vec<Exit> = Vec::new();
    for (block, weight) in raw {
        let block = block.clamp(1, n_layer);
        match exits.last_mut() {
            Some(last) if last.block == block => last.weight += weight,
            _ => exits.push(Exit { block, weight }),
        }
    }
    exits
}

/// The widest model a checkpoint may describe (GPT-2 XL is 1,600).
pub const MAX_N_EMBD: usize = 1 << 16;

impl Config {
    pub fn preset(name: &str) -> Result<Config, ConfigError> {
        let (n_layer, n_head, n_embd, block_size, vocab_size) = match name {
            "tiny" => (3, 2, 32, 64, 512),
            "small" => (6, 6, 384, 256, 8192),
            "gpt2" => (12, 12, 768, 1024, 50257),
            other => return Err(ConfigError::UnknownPreset(other.to_string())),
        };
        Ok(Config {
            n_layer,
            n_head,
            n_embd,
            block_size,
            vocab_size,
            bias: true,
            exits: default_exits(n_layer),
            exit_head: ExitHead::Tied,
            dwa: None,
            x0_skip: false,
            layer_norm_epsilon: LAYER_NORM_EPSILON,
        })
    }

    pub fn head_size(&self) -> usize {
        self.n_embd / self.n_head
    }

    /// The blocks j whose outputs DWA mixes after block `i` (1-based), or
    /// None when no averaging happens after block i.
    pub fn dwa_inputs(&self, i: usize) -> Option<Vec<usize>> {
        let dwa = self.dwa?;
        if !i.is_multiple_of(dwa.period) {
            return None;
        }
        Some(
            (0..=i)
                .filter(|j| (i - j).is_multiple_of(dwa.dilation))
                .collect(),
        )
    }

    /// Checks every field, naming the field and the limit on failure.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.n_layer == 0 || self.n_layer > 256 {
            return bad(format!("n_layer must be in 1..=256, got {}", self.n_layer));
        }
        if self.n_head == 0 || self.n_embd == 0 {
            return bad("n_head and n_embd must be positive".into());
        }
        // Bounds that keep every size product from a file (vocab_size x
        // n_embd, 4 n_embd x n_embd, block_size x n_embd) far inside usize,
        // so no element count wraps in a release build.
        if self.n_embd > MAX_N_EMBD {
            return bad(format!(
                "n_embd must be in 1..={MAX_N_EMBD}, got {}",
                self.n_embd
            ));
        }
        if !self.n_embd.is_multiple_of(self.n_head) {
            return bad(format!(
                "n_embd ({}) must be divisible by n_head ({})",
                self.n_embd, self.n_head
            ));
        }
        if self.block_size == 0 || self.block_size > 65536 {
            return bad(format!(
                "block_size must be in 1..=65536, got {}",
                self.block_size
            ));
        }
        if self.vocab_size < 2 || self.vocab_size > u32::MAX as usize {
            return bad(format!(
                "vocab_size must be at least 2, got {}",
                self.vocab_size
            ));
        }
        if self.exits.is_empty() {
            return bad("exits must not be empty (the final exit is block n_layer)".into());
        }
        let mut prev = 0;
        for e in &self.exits {
            if e.block == 0 || e.block > self.n_layer {
                return bad(format!(
                    "exit block {} is outside 1..={} (n_layer)",
                    e.block, self.n_layer
                ));
            }
            if e.block <= prev {
                return bad(format!(
                    "exit blocks must be strictly increasing, got {} after {prev}",
                    e.block
                ));
            }
            if !(e.weight > 0.0 && e.weight.is_finite()) {
                return bad(format!(
                    "exit weight for block {} must be positive, got {}",
                    e.block, e.weight
                ));
            }
            prev = e.block;
        }
        if prev != self.n_layer {
            return bad(format!(
                "the last exit must be block n_layer ({}), got {prev}",
                self.n_layer
            ));
        }
        if !(self.layer_norm_epsilon > 0.0 && self.layer_norm_epsilon < 1.0) {
            return bad(format!(
                "layer_norm_epsilon must be in (0, 1), got {}",
                self.layer_norm_epsilon
            ));
        }
        if let Some(d) = self.dwa {
            if d.dilation == 0 || d.period == 0 {
                return bad("dwa dilation and period must be at least 1".into());
            }
        }
        Ok(())
    }

    /// Parameter count (weights tied between wte and lm_head counted once).
    pub fn n_params(&self) -> usize {
        let c = self.n_embd;
        let ln = if self.bias { 2 * c } else { c };
        let lin = |i: usize, o: usize| i * o + if self.bias { o } else { 0 };
        let block = 2 * ln + lin(c, 3 * c) + lin(c, c) + lin(c, 4 * c) + lin(4 * c, c);
        let mut n = self.vocab_size * c + self.block_size * c + self.n_layer * block + ln;
        for _ in &self.exits[..self.exits.len() - 1] {
            n += ln;
            if self.exit_head == ExitHead::Own {
                n += self.vocab_size * c;
            }
        }
        if self.x0_skip {
            n += 2 * self.n_layer;
        }
        for i in 1..=self.n_layer {
            n += self.dwa_inputs(i).map_or(0, |v| v.len());
        }
        n
    }

    /// Forward FLOPs per token for a sequence of length `t` (matmuls only,
    /// 2 per multiply-add), counting the vocab projection of every exit.
    pub fn flops_per_token(&self, t: usize) -> f64 {
        let c = self.n_embd as f64;
        let per_block = 2.0 * 12.0 * c * c + 2.0 * 2.0 * c * t as f64;
        let heads = self.exits.len() as f64 * 2.0 * c * self.vocab_size as f64;
        self.n_layer as f64 * per_block + heads
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_exits_for_twelve_blocks_are_the_seeds() {
        let e = default_exits(12);
        assert_eq!(
            e.iter().map(|e| e.block).collect::<Vec<_>>(),
            vec![8, 10, 12]
        );
        assert_eq!(
            e.iter().map(|e| e.weight).collect::<Vec<_>>(),
            vec![0.05, 0.15, 0.8]
        );
    }

    #[test]
    fn default_exits_scale_to_six_blocks() {
        let e = default_exits(6);
        assert_eq!(e.iter().map(|e| e.block).collect::<Vec<_>>(), vec![4, 5, 6]);
    }

    #[test]
    fn default_exits_merge_when_the_model_is_shallow() {
        let e = default_exits(1);
        assert_eq!(e.len(), 1);
        assert!((e[0].weight - 1.0).abs() < 1e-6);
    }

    #[test]
    fn a_width_whose_sizes_could_wrap_is_refused_naming_the_limit() {
        let mut c = Config::preset("tiny").unwrap();
        c.n_embd = 1 << 40;
        c.n_head = 1;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("n_embd must be in 1..=65536"), "{e}");
    }

    #[test]
    fn presets_validate() {
        for p in ["tiny", "small", "gpt2"] {
            Config::preset(p).unwrap().validate().unwrap();
        }
        assert!(Config::preset("huge").is_err());
    }

    #[test]
    fn validation_names_the_field_and_the_limit() {
        let mut c = Config::preset("tiny").unwrap();
        c.n_embd = 33;
        let msg = c.validate().unwrap_err().to_string();
        assert!(
            msg.contains("n_embd (33)") && msg.contains("n_head (2)"),
            "{msg}"
        );
        let mut c = Config::preset("tiny").unwrap();
        c.exits.push(Exit {
            block: 9,
            weight: 1.0,
        });
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("exit block 9"));
        let mut c = Config::preset("tiny").unwrap();
        c.exits[0].weight = 0.0;
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("must be positive"));
    }

    #[test]
    fn dwa_inputs_follow_dilation_and_period() {
        let mut c = Config::preset("small").unwrap();
        c.dwa = Some(Dwa {
            dilation: 2,
            period: 2,
        });
        assert_eq!(c.dwa_inputs(1), None);
        assert_eq!(c.dwa_inputs(4), Some(vec![0, 2, 4]));
        c.dwa = Some(Dwa {
            dilation: 1,
            period: 1,
        });
        assert_eq!(c.dwa_inputs(3), Some(vec![0, 1, 2, 3]));
    }

    #[test]
    fn gpt2_preset_has_124m_parameters() {
        let n = Config::preset("gpt2").unwrap().n_params();
        assert!((124_000_000..125_000_000).contains(&n), "{n}");
    }
}
