//! The multi-exit GPT's parameter names and shapes, spelled here and only
//! here. The names are GPT-2's as nanoGPT and `transformers` lay them out
//! (`wte`, `wpe`, `h.{i}.{ln_1, attn.c_attn, attn.c_proj, ln_2, mlp.c_fc,
//! mlp.c_proj}`, `ln_f`, `lm_head` tied to `wte`), so a checkpoint reads
//! like theirs; ours add `h.{i}.skip` (x0 skips), `h.{i}.dwa` (DenseFormer
//! DWA weights) and `exits.{b}.{ln, lm_head}` (the exit reading block `b`).
//!
//! A layer is named by a prefix (`h.3.attn.c_attn`, `ln_f`); its tensors
//! are [`weight`] and [`bias`] under it. Every reader of parameters (the
//! candle model, the CPU path, the trainer, the Hugging Face import and
//! export) builds names with these functions and asks them what a name is.

use crate::model::config::{Config, ExitHead};

/// Token embeddings (vocab_size, n_embd); the final exit projects with it.
pub const WTE: &str = "wte.weight";
/// Position embeddings (block_size, n_embd).
pub const WPE: &str = "wpe.weight";
/// GPT-2's output projection, tied to [`WTE`]: no parameter of ours, but
/// files written by `transformers` may store it.
pub const LM_HEAD: &str = "lm_head.weight";
/// The final exit's LayerNorm.
pub const LN_F: &str = "ln_f";

/// Layers of a block, by their name under `h.{i}` ([`block`]).
pub const LN_1: &str = "ln_1";
pub const C_ATTN: &str = "attn.c_attn";
pub const ATTN_PROJ: &str = "attn.c_proj";
pub const LN_2: &str = "ln_2";
pub const C_FC: &str = "mlp.c_fc";
pub const MLP_PROJ: &str = "mlp.c_proj";
/// The x0 skip's (2,) scalars `[a, b]` in `x = a * x + b * x0`.
pub const SKIP: &str = "skip";
/// The DWA weights over the block outputs `Config::dwa_inputs` lists.
pub const DWA: &str = "dwa";

/// The Linear layers of a block: name, (out, in) in units of n_embd.
pub const LINEARS: [(&str, usize, usize); 4] = [
    (C_ATTN, 3, 1),
    (ATTN_PROJ, 1, 1),
    (C_FC, 4, 1),
    (MLP_PROJ, 1, 4),
];

/// Layers of a non-final exit, by their name under `exits.{b}` ([`exit`]).
pub const EXIT_LN: &str = "ln";
/// The exit's own projection (vocab_size, n_embd), with `ExitHead::Own`.
pub const EXIT_HEAD: &str = "lm_head";

const BLOCKS: &str = "h.";
const EXITS: &str = "exits.";
const WEIGHT: &str = ".weight";
const BIAS: &str = ".bias";

/// `layer` of block `i`: `h.{i}.{layer}`.
pub fn block(i: usize, layer: &str) -> String {
    format!("{BLOCKS}{i}.{layer}")
}

/// `layer` of the non-final exit reading block `b`: `exits.{b}.{layer}`.
pub fn exit(b: usize, layer: &str) -> String {
    format!("{EXITS}{b}.{layer}")
}

/// The weight of the layer named `layer`.
pub fn weight(layer: &str) -> String {
    format!("{layer}{WEIGHT}")
}

/// The bias of the layer named `layer`.
pub fn bias(layer: &str) -> String {
    format!("{layer}{BIAS}")
}

/// Whether `name` is a parameter of a block (`h.{i}.*`).
pub fn is_block(name: &str) -> bool {
    name.starts_with(BLOCKS)
}

/// Whether `name` is a parameter of a non-final exit (`exits.{b}.*`).
pub fn is_exit(name: &str) -> bool {
    name.starts_with(EXITS)
}

/// Whether `name` is a bias (of a Linear or a LayerNorm).
pub fn is_bias(name: &str) -> bool {
    name.ends_with(BIAS)
}

/// Whether `name` is an x0 skip's scalars.
pub fn is_skip(name: &str) -> bool {
    name.ends_with(&format!(".{SKIP}"))
}

/// Whether `name` is a block's DWA weights.
pub fn is_dwa(name: &str) -> bool {
    name.ends_with(&format!(".{DWA}"))
}

/// Whether `name` is the weight of one of a block's Linear layers.
pub fn is_linear_weight(name: &str) -> bool {
    name.strip_suffix(WEIGHT).is_some_and(|p| {
        LINEARS
            .iter()
            .any(|(l, _, _)| p.ends_with(&format!(".{l}")))
    })
}

/// Whether `name` is the weight of a projection back into the residual
/// stream (`attn.c_proj`, `mlp.c_proj`).
pub fn is_residual_projection(name: &str) -> bool {
    [ATTN_PROJ, MLP_PROJ]
        .iter()
        .any(|l| name.ends_with(&format!(".{}", weight(l))))
}

/// For a parameter of a non-final exit, the final exit's parameter in the
/// same role: its LayerNorm's are `ln_f`'s, its own head is `wte`.
pub fn final_counterpart(name: &str) -> Option<String> {
    let (_, layer) = name.strip_prefix(EXITS)?.split_once('.')?;
    if layer == weight(EXIT_LN) {
        Some(weight(LN_F))
    } else if layer == bias(EXIT_LN) {
        Some(bias(LN_F))
    } else if layer == weight(EXIT_HEAD) {
        Some(WTE.to_string())
    } else {
        None
    }
}

/// Names and shapes of every parameter, in a stable order.
pub fn param_shapes(cfg: &Config) -> Vec<(String, Vec<usize>)> {
    let c = cfg.n_embd;
    let mut out = vec![
        (WTE.to_string(), vec![cfg.vocab_size, c]),
        (WPE.to_string(), vec![cfg.block_size, c]),
    ];
    let norm = |out: &mut Vec<(String, Vec<usize>)>, p: &str| {
        out.push((weight(p), vec![c]));
        if cfg.bias {
            out.push((bias(p), vec![c]));
        }
    };
    for i in 0..cfg.n_layer {
        norm(&mut out, &block(i, LN_1));
        norm(&mut out, &block(i, LN_2));
        for (name, o, inp) in LINEARS {
            let p = block(i, name);
            out.push((weight(&p), vec![o * c, inp * c]));
            if cfg.bias {
                out.push((bias(&p), vec![o * c]));
            }
        }
        if cfg.x0_skip {
            out.push((block(i, SKIP), vec![2]));
        }
        if let Some(inputs) = cfg.dwa_inputs(i + 1) {
            out.push((block(i, DWA), vec![inputs.len()]));
        }
    }
    for e in &cfg.exits[..cfg.exits.len() - 1] {
        norm(&mut out, &exit(e.block, EXIT_LN));
        if cfg.exit_head == ExitHead::Own {
            out.push((weight(&exit(e.block, EXIT_HEAD)), vec![cfg.vocab_size, c]));
        }
    }
    norm(&mut out, LN_F);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_read_as_gpt2_and_nanogpt_spell_them() {
        assert_eq!(weight(&block(3, C_ATTN)), "h.3.attn.c_attn.weight");
        assert_eq!(bias(&block(0, LN_2)), "h.0.ln_2.bias");
        assert_eq!(weight(&exit(8, EXIT_HEAD)), "exits.8.lm_head.weight");
        assert_eq!(block(1, DWA), "h.1.dwa");
        assert_eq!(weight(LN_F), "ln_f.weight");
    }

    #[test]
    fn an_exit_starts_from_the_final_exits_parameters() {
        let f = |n: &str| final_counterpart(n);
        assert_eq!(f("exits.2.ln.weight").as_deref(), Some("ln_f.weight"));
        assert_eq!(f("exits.2.ln.bias").as_deref(), Some("ln_f.bias"));
        assert_eq!(f("exits.2.lm_head.weight").as_deref(), Some("wte.weight"));
        assert_eq!(f("h.2.ln_1.weight"), None);
    }

    #[test]
    fn shapes_follow_the_config_in_a_stable_order() {
        let mut cfg = Config::preset("tiny").unwrap();
        cfg.exit_head = ExitHead::Own;
        let shapes = param_shapes(&cfg);
        assert_eq!(shapes[0], (WTE.to_string(), vec![cfg.vocab_size, 32]));
        assert_eq!(shapes.last().unwrap().0, "ln_f.bias");
        let c_fc = shapes.iter().find(|(n, _)| n == "h.1.mlp.c_fc.weight");
        assert_eq!(c_fc.unwrap().1, vec![128, 32]);
        for (n, _) in &shapes {
            assert!(is_block(n) || is_exit(n) || !n.starts_with('h'), "{n}");
        }
    }
}
