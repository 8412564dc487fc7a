//! The verify cost curve of this machine, as the generator pays it: one
//! forward of `[pending, k drafts]` with the final logits of every row,
//! relative to a one-row step. The drafter file stores a curve measured
//! where the drafter was trained (`train::label::verify_costs`); on
//! another machine rows may cost more or less (on the 2-core EPYC the
//! one-row f16 step has a path of its own and 2 rows cost over 1.1x),
//! and a draft tree sized by the wrong curve spends rows that do not pay.

use std::time::Instant;

use crate::model::forward::{Forward, Segment};

/// Context the drafts are verified after (the bench's prompts plus about
/// half their new tokens).
const CONTEXT: usize = 96;
/// Rounds over every size; each size keeps its best time.
const ROUNDS: usize = 12;

/// Cost of verifying k drafts relative to a plain step, k = 0..=k_max:
/// every size once per round, round after round, keeping each size's
/// best (load on a shared machine hits all sizes alike).
pub fn measure<M: Forward>(model: &M, k_max: usize) -> anyhow::Result<Vec<f64>> {
    let cfg = model.config();
    let ctx = CONTEXT.min(cfg.block_size.saturating_sub(k_max + 1)).max(1);
    let prompt: Vec<u32> = (0..ctx as u32).map(|i| i % cfg.vocab_size as u32).collect();
    let mut cache = model.new_cache()?;
    forward(model, &mut cache, &prompt, 0, 0)?;
    let mut best = vec![f64::MAX; k_max + 1];
    for _ in 0..ROUNDS {
        for (k, b) in best.iter_mut().enumerate() {
            let rows: Vec<u32> = (0..=k as u32).collect();
            let t = Instant::now();
            forward(model, &mut cache, &rows, ctx, k + 1)?;
            *b = b.min(t.elapsed().as_secs_f64());
            model.truncate_cache(&mut cache, ctx);
        }
    }
    Ok(best.iter().map(|b| b / best[0]).collect())
}

/// One forward of `tokens` at `pos` with the final logits of the first
/// `logits` rows.
fn forward<M: Forward>(
    model: &M,
    cache: &mut M::Cache,
    tokens: &[u32],
    pos: usize,
    logits: usize,
) -> anyhow::Result<()> {
    let mut seg = [Segment {
        tokens,
        pos,
        cache,
        logits: 0..logits,
        tree: None,
    }];
    model.forward_batch(&mut seg)?;
    Ok(())
}
