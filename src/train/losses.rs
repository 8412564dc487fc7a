//! The training losses of the multi-exit GPT: each exit's cross-entropy,
//! weighted by `Config::exits`, and the cheaper forms a training step may
//! ask for instead (non-final exits skipped, scored on a sample of
//! positions, or scored on the final head's best candidates elsewhere).
//!
//! They live with the trainer, not the model: serving never computes a
//! loss. [`MultiExitLoss`] gives [`Gpt`] the methods, so a step reads
//! `model.loss_with(&x, &y, &opt)`.

use candle_core::{Result, Tensor};

use crate::model::gpt::Gpt;

/// The weighted training loss and each computed exit's cross-entropy.
pub struct Losses {
    pub total: Tensor,
    /// Cross-entropy of each computed exit, in `cfg.exits` order (only the
    /// final one when the step skips exits).
    pub per_exit: Vec<Tensor>,
}

/// Which exit losses a training step computes.
pub struct LossOptions {
    /// Compute the non-final exits at all.
    pub exits: bool,
    /// Positions (n,) u32 at which the non-final exits are scored.
    pub exit_rows: Option<Tensor>,
    /// Multiplies the non-final exits' weights (1 / sampling rate keeps the
    /// expected gradient equal to scoring every position on every step).
    pub exit_scale: f64,
    /// Score the non-final exits, at the positions outside `exit_rows`, on
    /// the target and the final head's best `exit_candidates` other tokens
    /// (0: those positions are not scored).
    pub exit_candidates: usize,
    /// Form gradients (false: evaluation, which never runs a backward).
    pub grads: bool,
}

impl Default for LossOptions {
    fn default() -> Self {
        Self {
            exits: true,
            exit_rows: None,
            exit_scale: 1.0,
            exit_candidates: 0,
            grads: true,
        }
    }
}

/// The losses of a model on inputs and targets (B, T).
pub trait MultiExitLoss {
    /// Weighted multi-exit cross-entropy for inputs `idx` and `targets` (B, T).
    fn loss(&self, idx: &Tensor, targets: &Tensor) -> Result<Losses>;

    /// As [`MultiExitLoss::loss`], with the non-final exits skipped, computed
    /// on a subset of positions and rescaled (unbiased, cheaper), or scored
    /// on the final head's top candidates only.
    fn loss_with(&self, idx: &Tensor, targets: &Tensor, opt: &LossOptions) -> Result<Losses>;
}

impl MultiExitLoss for Gpt {
    fn loss(&self, idx: &Tensor, targets: &Tensor) -> Result<Losses> {
        self.loss_with(idx, targets, &LossOptions::default())
    }

    fn loss_with(&self, idx: &Tensor, targets: &Tensor, opt: &LossOptions) -> Result<Losses> {
        if opt.exit_candidates > 0 && opt.exit_rows.is_none() {
            candle_core::bail!(
                "exit candidates score the positions outside exit_rows: give exit_rows \
                 (the positions scored on the whole vocabulary)"
            );
        }
        let mut s = self.embed(idx, 0)?;
        let last = self.cfg.exits.len() - 1;
        // The hidden rows at each computed exit.
        let mut at_exits = Vec::with_capacity(self.cfg.exits.len());
        for (k, e) in self.cfg.exits.iter().enumerate() {
            if k < last && !opt.exits {
                continue;
            }
            self.run_blocks(&mut s, e.block, None)?;
            at_exits.push((k, s.hidden().clone()));
        }
        // The final exit first: its best tokens are the other exits'
        // candidates.
        let (_, x) = at_exits.pop().expect("the final exit always runs");
        let top = if opt.exit_candidates > 0 && !at_exits.is_empty() {
            candidate_set_size(opt.exit_candidates, self.cfg.vocab_size)
        } else {
            0
        };
        let (final_ce, best) = exit_loss(self, last, &x, targets, top, opt.grads)?;
        // The positions scored on candidates, the same for every exit.
        let rest = match (&opt.exit_rows, top) {
            (Some(rows), 1..) => Some(RestRows::new(rows, targets)?),
            _ => None,
        };
        let mut per_exit = Vec::with_capacity(at_exits.len() + 1);
        let mut total: Option<Tensor> = None;
        for (k, x) in at_exits {
            let ce = early_exit_loss(self, k, &x, targets, opt, &best, rest.as_ref())?;
            let wl = (&ce * (self.cfg.exits[k].weight as f64 * opt.exit_scale))?;
            total = Some(match total {
                Some(t) => (t + wl)?,
                None => wl,
            });
            per_exit.push(ce);
        }
        let wl = (&final_ce * self.cfg.exits[last].weight as f64)?;
        per_exit.push(final_ce);
        Ok(Losses {
            total: match total {
                Some(t) => (t + wl)?,
                None => wl,
            },
            per_exit,
        })
    }
}

/// The loss of a non-final exit `k` on its hidden rows `x` (B, T, C):
/// the whole vocabulary on every position, or on `opt.exit_rows` only;
/// with candidates, those positions on the whole vocabulary and the
/// others on their candidates (`best`: the final head's best tokens),
/// averaged over all positions.
fn early_exit_loss(
    gpt: &Gpt,
    k: usize,
    x: &Tensor,
    targets: &Tensor,
    opt: &LossOptions,
    best: &[u32],
    rest: Option<&RestRows>,
) -> Result<Tensor> {
    let Some(rows) = &opt.exit_rows else {
        return Ok(exit_loss(gpt, k, x, targets, 0, opt.grads)?.0);
    };
    let (xr, yr) = (x.index_select(rows, 1)?, targets.index_select(rows, 1)?);
    let exit_top = if rest.is_some() { EXIT_TOP } else { 0 };
    let (full, exit_best) = exit_loss(gpt, k, &xr, &yr, exit_top, opt.grads)?;
    let Some(rest) = rest.filter(|r| !r.rows.is_empty()) else {
        return Ok(full);
    };
    // The exit's own best tokens where it saw the whole vocabulary: the
    // tokens it ranks high that candidates from the final head would
    // never push down.
    let mut hard: Vec<u32> = Vec::with_capacity(HARD_NEGATIVES);
    for &c in &exit_best {
        if hard.len() == HARD_NEGATIVES {
            break;
        }
        if !hard.contains(&c) {
            hard.push(c);
        }
    }
    let size = candidate_set_size(opt.exit_candidates, gpt.cfg.vocab_size);
    let sets = CandidateSets {
        best,
        top: size,
        shared: &hard,
        targets: &rest.targets,
        t: rest.t,
    };
    let cand = sets.build(Some(&rest.rows));
    let xc = x.index_select(&rest.index, 1)?;
    let h = gpt.exit_norm(k, &xc)?.flatten_to(1)?;
    let head = gpt.exit_head(k);
    let cand_ce = crate::model::ops::candidate_cross_entropy(&h, head, cand, size)?;
    let (t, n) = (rest.t as f64, (rest.t - rest.rows.len()) as f64);
    (full * (n / t))? + (cand_ce * ((t - n) / t))?
}

/// Mean cross-entropy of exit `k` on hidden rows `x` (B, n, C) against
/// `y` (B, n), and each row's `top` best tokens.
fn exit_loss(
    gpt: &Gpt,
    k: usize,
    x: &Tensor,
    y: &Tensor,
    top: usize,
    grads: bool,
) -> Result<(Tensor, Vec<u32>)> {
    let h = gpt.exit_norm(k, x)?.flatten_to(1)?; // (B n, C)
    let head = gpt.exit_head(k);
    crate::model::ops::projected_cross_entropy_top(&h, head, &y.flatten_all()?, top, grads)
}

/// Tokens the exit scores itself on where it sees the whole vocabulary, as
/// shared hard negatives for the candidate positions.
const EXIT_TOP: usize = 2;
/// At most this many of them per step.
const HARD_NEGATIVES: usize = 32;

/// Candidates per row: the target, the hard negatives, the final head's
/// best `k` (capped at the vocabulary).
fn candidate_set_size(k: usize, vocab: usize) -> usize {
    (k + 1 + HARD_NEGATIVES).min(vocab)
}

/// The positions the whole-vocabulary exit loss skips, scored on
/// candidates instead; computed once per step for every exit.
struct RestRows {
    /// Positions (in each sequence) outside `exit_rows`, and as a tensor.
    rows: Vec<u32>,
    index: Tensor,
    /// (B T) targets on the host, and T.
    targets: Vec<u32>,
    t: usize,
}

impl RestRows {
    fn new(scored: &Tensor, targets: &Tensor) -> Result<Self> {
        let t = targets.dim(1)?;
        let mut seen = vec![false; t];
        for r in scored.to_vec1::<u32>()? {
            match seen.get_mut(r as usize) {
                Some(s) => *s = true,
                None => candle_core::bail!("exit row {r} outside the {t} positions"),
            }
        }
        let rows: Vec<u32> = (0..t as u32).filter(|&r| !seen[r as usize]).collect();
        Ok(Self {
            index: Tensor::new(rows.as_slice(), targets.device())?,
            rows,
            targets: targets.flatten_all()?.to_vec1::<u32>()?,
            t,
        })
    }
}

/// Candidate tokens of the cheap exit loss, from the final head's best.
struct CandidateSets<'a> {
    /// (B T, top) best tokens of the final head per position.
    best: &'a [u32],
    /// Tokens per row in `best`, and the size of each candidate set.
    top: usize,
    /// Tokens in every row's set (after the target).
    shared: &'a [u32],
    /// (B T) targets.
    targets: &'a [u32],
    t: usize,
}

impl CandidateSets<'_> {
    /// Per scored row: its target, the shared tokens, then the final
    /// head's best tokens, each once, `top` in all. `rows`: the positions
    /// scored in each sequence (all when None).
    fn build(&self, rows: Option<&[u32]>) -> Vec<u32> {
        let all: Vec<u32>;
        let rows = match rows {
            Some(r) => r,
            None => {
                all = (0..self.t as u32).collect();
                &all
            }
        };
        let b = self.targets.len() / self.t.max(1);
        let mut out = Vec::with_capacity(b * rows.len() * self.top);
        for seq in 0..b {
            for &r in rows {
                let i = seq * self.t + r as usize;
                let start = out.len();
                out.push(self.targets[i]);
                let best = &self.best[i * self.top..(i + 1) * self.top];
                for &c in self.shared.iter().chain(best) {
                    if out.len() - start == self.top {
                        break;
                    }
                    if !out[start..].contains(&c) {
                        out.push(c);
                    }
                }
            }
        }
        out
    }
}
