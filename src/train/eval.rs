//! Validation: the cross-entropy of every exit on fixed, seeded windows of
//! a token stream (the same windows at every evaluation, so curves compare).

use anyhow::Context;
use candle_core::{Result, Tensor};
use std::path::PathBuf;

use crate::model::gpt::Gpt;
use crate::train::losses::{LossOptions, MultiExitLoss};

/// Every exit on every position, no gradients.
const EVAL: LossOptions = LossOptions {
    exits: true,
    exit_rows: None,
    exit_scale: 1.0,
    exit_candidates: 0,
    grads: false,
};

/// Seed of the evaluation windows (distinct from any training seed use).
const EVAL_SEED: u64 = 0x005E_ED0F_E7A1;

/// Mean loss of each exit over `batches` batches of `b` x `t` tokens.
pub fn exit_losses(
    model: &Gpt,
    tokens: &[u32],
    b: usize,
    t: usize,
    batches: u64,
) -> Result<Vec<f32>> {
    let device = model.device().clone();
    let mut sums = vec![0f64; model.cfg.exits.len()];
    for i in 0..batches.max(1) {
        let (x, y) = super::data::batch(tokens, b, t, EVAL_SEED, i);
        let x = Tensor::from_vec(x, (b, t), &device)?;
        let y = Tensor::from_vec(y, (b, t), &device)?;
        let losses = model.loss_with(&x, &y, &EVAL)?;
        for (s, l) in sums.iter_mut().zip(&losses.per_exit) {
            *s += l.detach().to_scalar::<f32>()? as f64;
        }
    }
    Ok(sums
        .into_iter()
        .map(|s| (s / batches.max(1) as f64) as f32)
        .collect())
}

/// What [`exit_scores`] measures over consecutive windows of `t` tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct ExitScores {
    /// Each exit's mean negative log-likelihood (nats per token) of the
    /// window's tokens 1..t given those before them: token 0 of a window
    /// has no context, as in an echoed prompt's logprobs.
    pub losses: Vec<f64>,
    /// Each exit's top-1 agreement with the final head over all positions.
    pub agreement: Vec<f32>,
    /// Tokens scored (t - 1 per window).
    pub targets: usize,
}

/// `-ln softmax(row)[target]`, in f64.
fn nll(row: &[f32], target: u32) -> f64 {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
    let sum: f64 = row.iter().map(|&x| (x as f64 - max).exp()).sum();
    max + sum.ln() - row[target as usize] as f64
}

/// Each exit's loss and top-1 agreement with the final head over
/// consecutive windows of `t` tokens (up to `max_windows`), each window a
/// fresh sequence (as a completion's prompt is). An exit verifies drafts
/// well only where it agrees with the final head.
pub fn exit_scores<M: crate::model::forward::Forward>(
    model: &M,
    tokens: &[u32],
    t: usize,
    max_windows: usize,
) -> Result<ExitScores> {
    let cfg = model.config().clone();
    let n_exits = cfg.exits.len();
    let (mut same, mut nll_sum) = (vec![0usize; n_exits], vec![0f64; n_exits]);
    let mut n = 0usize;
    for w in tokens.chunks_exact(t).take(max_windows) {
        let mut cache = model.new_cache()?;
        let mut s = model.embed(w, 0)?;
        let mut tops = Vec::with_capacity(n_exits);
        for (k, e) in cfg.exits.iter().enumerate() {
            model.run_blocks(&mut s, e.block, &mut cache)?;
            let logits = model.exit_logits(&s, k, 0..t)?;
            nll_sum[k] += logits
                .iter()
                .zip(&w[1..])
                .map(|(r, &y)| nll(r, y))
                .sum::<f64>();
            tops.push(
                logits
                    .iter()
                    .map(crate::sampling::argmax)
                    .collect::<Vec<u32>>(),
            );
        }
        let fin = &tops[n_exits - 1];
        for (k, top) in tops.iter().enumerate() {
            same[k] += top.iter().zip(fin).filter(|(a, b)| a == b).count();
        }
        n += t;
    }
    if n == 0 || t < 2 {
        candle_core::bail!(
            "eval text has {} tokens, fewer than one window of {t} (at least 2)",
            tokens.len()
        );
    }
    let targets = n / t * (t - 1);
    Ok(ExitScores {
        losses: nll_sum.into_iter().map(|s| s / targets as f64).collect(),
        agreement: same.into_iter().map(|s| s as f32 / n as f32).collect(),
        targets,
    })
}

/// Top-1 agreement of each exit with the final head ([`exit_scores`]).
pub fn exit_agreement<M: crate::model::forward::Forward>(
    model: &M,
    tokens: &[u32],
    t: usize,
    max_windows: usize,
) -> Result<Vec<f32>> {
    Ok(exit_scores(model, tokens, t, max_windows)?.agreement)
}

/// `gpt-serve eval`: what to score.
#[derive(clap::Args, Debug)]
pub struct EvalArgs {
    #[arg(long, default_value = "models/default")]
    pub model: PathBuf,
    #[arg(required_unless_present = "token_ids")]
    pub data: Vec<PathBuf>,
    /// Score these token ids (a JSON array) instead of text files: the
    /// windows an HTTP client scored with echo + logprobs
    /// (scripts/quant_echo_check.py), so both paths score the same tokens.
    #[arg(long, conflicts_with = "data")]
    pub token_ids: Option<PathBuf>,
    /// Windows of block_size tokens to score.
    #[arg(long, default_value_t = 200)]
    pub max_windows: usize,
    /// Weight storage scored (the CPU inference path, as served): auto
    /// (the checkpoint's), f32, f16, q8_0 or q4_0.
    #[arg(long, alias = "dtype", value_parser = crate::cli::serve::WEIGHTS, default_value = "auto")]
    pub weights: String,
    /// KV cache storage scored, as `serve --kv-cache`: f32 or f16.
    #[arg(long, value_parser = crate::model::cpu::KvDtype::NAMES, default_value = "f32")]
    pub kv_cache: String,
}

/// Prints each exit's loss and top-1 agreement with the final head, then
/// the final head's perplexity, all from the CPU model at `--weights`.
pub fn run(a: &EvalArgs) -> anyhow::Result<()> {
    let loaded = crate::checkpoint::load(&a.model, &candle_core::Device::Cpu)?;
    let dtype = loaded
        .weight_dtype(&a.weights)
        .map_err(anyhow::Error::msg)?;
    let kv = crate::model::cpu::KvDtype::parse(&a.kv_cache).map_err(anyhow::Error::msg)?;
    let model = loaded.cpu(dtype)?.with_kv_cache(kv);
    let tokens = match &a.token_ids {
        Some(p) => {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            serde_json::from_str::<Vec<u32>>(&text)
                .with_context(|| format!("{}: not a JSON array of token ids", p.display()))?
        }
        None => crate::train::data::load_tokens(&a.data, &loaded.tokenizer, None)?,
    };
    let (t, vocab) = (model.cfg.block_size, model.cfg.vocab_size);
    if let Some(bad) = tokens.iter().find(|&&id| id as usize >= vocab) {
        anyhow::bail!("token id {bad} is outside the model's vocabulary (vocab_size {vocab})");
    }
    let s = crate::model::cpu::in_pool(|| exit_scores(&model, &tokens, t, a.max_windows))?;
    for ((e, l), g) in model.cfg.exits.iter().zip(&s.losses).zip(&s.agreement) {
        println!(
            "exit {:>3}: loss {l:.4}, top-1 agreement with the final head {:.1}%",
            e.block,
            100.0 * g
        );
    }
    let last = s.losses[s.losses.len() - 1];
    println!(
        "weights {}, kv cache {}: final head loss {last:.5}, perplexity {:.4} over {} tokens ({} windows of {t})",
        dtype.name(),
        kv.name(),
        last.exp(),
        s.targets,
        s.targets / (t - 1)
    );
    Ok(())
}
