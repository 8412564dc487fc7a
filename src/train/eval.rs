//! Validation: the cross-entropy of every exit on fixed, seeded windows of
//! a token stream (the same windows at every evaluation, so curves compare).

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

/// Mean loss of each exit over consecutive windows covering `tokens`
/// (`gpt-serve eval`): every token is scored once, up to `max_windows`.
pub fn exit_losses_sequential(
    model: &Gpt,
    tokens: &[u32],
    t: usize,
    max_windows: usize,
) -> Result<Vec<f32>> {
    let device = model.device().clone();
    let mut sums = vec![0f64; model.cfg.exits.len()];
    let mut n = 0usize;
    for w in tokens.windows(t + 1).step_by(t).take(max_windows) {
        let x = Tensor::from_slice(&w[..t], (1, t), &device)?;
        let y = Tensor::from_slice(&w[1..], (1, t), &device)?;
        let losses = model.loss_with(&x, &y, &EVAL)?;
        for (s, l) in sums.iter_mut().zip(&losses.per_exit) {
            *s += l.to_scalar::<f32>()? as f64;
        }
        n += 1;
    }
    if n == 0 {
        candle_core::bail!(
            "eval text has {} tokens, fewer than one window of {}",
            tokens.len(),
            t + 1
        );
    }
    Ok(sums.into_iter().map(|s| (s / n as f64) as f32).collect())
}

/// Top-1 agreement of each exit with the final head over consecutive
/// windows of `t` tokens (up to `max_windows`): the share of positions where
/// an exit's argmax equals the final head's (1.0 for the final exit). An
/// exit verifies drafts well only where it agrees with the final head.
pub fn exit_agreement<M: crate::model::forward::Forward>(
    model: &M,
    tokens: &[u32],
    t: usize,
    max_windows: usize,
) -> Result<Vec<f32>> {
    let cfg = model.config().clone();
    let n_exits = cfg.exits.len();
    let mut same = vec![0usize; n_exits];
    let mut n = 0usize;
    for w in tokens.chunks_exact(t).take(max_windows) {
        let mut cache = model.new_cache()?;
        let mut s = model.embed(w, 0)?;
        let mut tops = Vec::with_capacity(n_exits);
        for (k, e) in cfg.exits.iter().enumerate() {
            model.run_blocks(&mut s, e.block, &mut cache)?;
            let logits = model.exit_logits(&s, k, 0..t)?;
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
    if n == 0 {
        candle_core::bail!(
            "eval text has {} tokens, fewer than one window of {t}",
            tokens.len()
        );
    }
    Ok(same.into_iter().map(|s| s as f32 / n as f32).collect())
}

/// `gpt-serve eval`: what to score.
#[derive(clap::Args, Debug)]
pub struct EvalArgs {
    #[arg(long, default_value = "models/default")]
    pub model: PathBuf,
    #[arg(required = true)]
    pub data: Vec<PathBuf>,
    /// Windows of block_size tokens to score.
    #[arg(long, default_value_t = 200)]
    pub max_windows: usize,
}

/// Prints each exit's loss and its top-1 agreement with the final head.
pub fn run(a: &EvalArgs) -> anyhow::Result<()> {
    let (model, data, max_windows) = (&a.model, &a.data, a.max_windows);
    let device = candle_core::Device::Cpu;
    let loaded = crate::checkpoint::load(model, &device)?;
    let gpt = loaded.model(&device)?;
    let tokens = crate::train::data::load_tokens(data, &loaded.tokenizer, None)?;
    let losses = exit_losses_sequential(&gpt, &tokens, gpt.cfg.block_size, max_windows)?;
    let fast = loaded.cpu(loaded.serving_dtype())?;
    let agree = crate::model::cpu::in_pool(|| {
        exit_agreement(&fast, &tokens, gpt.cfg.block_size, max_windows)
    })?;
    for ((e, l), a) in gpt.cfg.exits.iter().zip(losses).zip(agree) {
        println!(
            "exit {:>3}: loss {l:.4}, top-1 agreement with the final head {:.1}%",
            e.block,
            100.0 * a
        );
    }
    Ok(())
}
