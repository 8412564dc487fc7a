//! The exit cascade and LayerSkip drafting (both off by default: no faster
//! than a plain step on the shipped model, see the README): a step whose
//! rows go through the blocks in parts, so its sequence runs alone.
//! [`Generator::step`] calls it only when one of them is on.
//!
//! LayerSkip ([`SelfDraft`]): when the proposer drafts nothing, an early
//! exit drafts, and the rows arrive at its block with their lower blocks
//! cached. The cascade: blocks run up to each early exit, whose head scores
//! only the candidates (the drafts and the proposer's rivals); at the first
//! row where a rival outscores the next draft by `exit_margin`, the rows
//! after are dropped and the next blocks run on fewer rows (exits only
//! truncate, never accept).

use candle_core::Result;

use super::proposer::RowPrice;
use super::rows::Drafted;
use super::stats::MarginHist;
use super::{Finish, Generator, SelfDraft, TokenOut};
use crate::model::forward::{Forward, Tree};
use crate::sampling::{self, Noise};

/// Logit margin at which an exit's candidate scores reject a draft
/// (`--exit-margin`), set from the margins the exits gave train-split
/// drafts (docs/benchmarks.md, "Exit cascade").
pub const DEFAULT_EXIT_MARGIN: f32 = 1.0;

/// How far the best rival outscores `draft` among an exit's logits `z` for
/// the candidate tokens `ids` (the draft among them); positive: the exit
/// prefers a rival. With `noise` (sampling at temperature T) each score is
/// `z / T` plus that token's keyed noise, as the final head's sample is
/// drawn; penalties and top_p are left out (a cut only costs speed).
pub fn exit_margin(z: &[f32], ids: &[u32], draft: u32, noise: Option<(f32, Noise)>) -> f32 {
    // As `sampling::choose` scores, operation for operation.
    let score = |z: f32, t: u32| match noise {
        Some((temp, g)) => z * (1.0 / temp) + g.gumbel(t),
        None => z,
    };
    let mut own = f32::NEG_INFINITY;
    let mut rival = f32::NEG_INFINITY;
    for (&zi, &t) in z.iter().zip(ids) {
        let v = score(zi, t);
        match t == draft {
            true => own = v,
            false => rival = rival.max(v),
        }
    }
    rival - own
}

impl<M: Forward> Generator<'_, M> {
    /// A step with the exit cascade or LayerSkip drafting (see the module
    /// doc): the rows go through the blocks in parts, so this sequence runs
    /// alone.
    pub(super) fn step_with_exits(&mut self) -> Result<Vec<TokenOut>> {
        if self.finished.is_some() {
            return Ok(vec![]);
        }
        if self.remaining() == 0 {
            self.finished = Some(Finish::Length);
            return Ok(vec![]);
        }
        let cfg = self.model.config();
        let room = (self.remaining() - 1).min(cfg.block_size - self.tokens.len());
        let drafts = self.propose(usize::MAX, RowPrice::ALONE, false);
        let (drafts, shadow) = (drafts.tokens, drafts.shadow);
        let pos = self.tokens.len() - 1;
        let n_exits = cfg.exits.len();
        // Self-drafting when the proposer gave nothing: the rows arrive
        // already at the exit's block, their lower blocks cached.
        let self_draft = match self.params.self_draft {
            Some(sd) if drafts.is_empty() && self.params.speculate && room > 0 => {
                (sd.exit + 1 < n_exits && sd.k_max > 0).then_some(sd)
            }
            _ => None,
        };
        let (drafts, mut s) = match self_draft {
            Some(sd) => self.draft_with_exit(sd, room)?,
            None => {
                let pending = *self.tokens.last().expect("non-empty");
                let s = self.model.embed(&[&[pending][..], &drafts].concat(), pos)?;
                (drafts, s)
            }
        };
        let mut kept = drafts.len() + 1;
        let mut margins = vec![];
        if self.params.cascade && kept > 1 && self_draft.is_none() {
            margins = self.exit_cascade(&mut s, &drafts, &mut kept)?;
        }
        self.model
            .run_blocks(&mut s, cfg.n_layer, &mut self.cache)?;
        let logits = self.model.exit_logits(&s, n_exits - 1, 0..kept)?;
        let pending = *self.tokens.last().expect("non-empty");
        let rows = [&[pending][..], &drafts[..kept - 1]].concat();
        let chain = Tree::chain(kept);
        let drafted = match self_draft {
            Some(_) => Drafted::ByExit(drafts.len()),
            None => Drafted::Chain(drafts.len()),
        };
        let out = self.accept_rows(&rows, &chain, &logits, shadow, drafted);
        // Only the drafts the final head judged, and not when a stop cut
        // the walk short.
        if self.finished.is_none() {
            let accepted = out.len().saturating_sub(1);
            for (e, m) in margins.iter().enumerate() {
                let judged = &m[..m.len().min(kept - 1)];
                self.stats.exit_margins[e].record(judged, accepted);
            }
        }
        Ok(out)
    }

    /// Runs the rows `[pending, drafts..]` in `s` through the blocks up to
    /// each non-final exit; each exit scores the candidates (the drafts
    /// and the proposer's rivals: the tree drafter's classes) and cuts the chain at the first
    /// draft a rival outscores by `exit_margin`, leaving `kept` rows.
    /// Returns each exit's margins for the drafts it saw.
    fn exit_cascade(
        &mut self,
        s: &mut M::Stream,
        drafts: &[u32],
        kept: &mut usize,
    ) -> Result<Vec<Vec<f32>>> {
        let cfg = self.model.config();
        let n_exits = cfg.exits.len();
        let mut ids: Vec<u32> = self.proposer.rivals().to_vec();
        ids.extend_from_slice(drafts);
        ids.sort_unstable();
        ids.dedup();
        if self.stats.truncated_by_exit.len() < n_exits - 1 {
            self.stats.truncated_by_exit.resize(n_exits - 1, 0);
        }
        if self.stats.exit_margins.len() < n_exits - 1 {
            self.stats
                .exit_margins
                .resize(n_exits - 1, MarginHist::default());
        }
        // Row i judges drafts[i], the token at `first + i`: the position
        // `commit_one` samples it at.
        let first = self.tokens.len();
        let mut all = vec![];
        for e in 0..n_exits - 1 {
            self.model
                .run_blocks(s, cfg.exits[e].block, &mut self.cache)?;
            let z = self.model.exit_scores(s, e, 0..*kept - 1, &ids)?;
            let margins: Vec<f32> = z
                .chunks_exact(ids.len())
                .enumerate()
                .map(|(i, z)| exit_margin(z, &ids, drafts[i], self.noise_at(first + i)))
                .collect();
            if let Some(i) = margins.iter().position(|m| *m >= self.params.exit_margin) {
                self.stats.truncated_by_exit[e] += (*kept - 1 - i) as u64;
                *kept = i + 1;
                self.model.keep_rows(s, *kept)?;
            }
            all.push(margins);
            if *kept == 1 {
                break;
            }
        }
        Ok(all)
    }

    /// The temperature and the sampler's keyed noise at absolute position
    /// `pos` (None when greedy).
    fn noise_at(&self, pos: usize) -> Option<(f32, Noise)> {
        let sp = &self.params.sampling;
        (!sp.is_greedy()).then(|| {
            (
                sp.temperature,
                Noise::at(sp.seed, self.params.stream(), pos),
            )
        })
    }

    /// LayerSkip drafting (see [`SelfDraft`]): returns the drafts and the
    /// rows `[pending, d1..dk]` at the exit's block.
    fn draft_with_exit(&mut self, sd: SelfDraft, room: usize) -> Result<(Vec<u32>, M::Stream)> {
        let block = self.model.config().exits[sd.exit].block;
        let pos = self.tokens.len() - 1;
        let pending = *self.tokens.last().expect("non-empty");
        let mut s = self.model.embed(&[pending], pos)?;
        self.model.run_blocks(&mut s, block, &mut self.cache)?;
        let mut drafts = Vec::new();
        while drafts.len() < sd.k_max.min(room) {
            let last = self.model.rows(&s) - 1;
            let logits = self.model.exit_logits(&s, sd.exit, last..last + 1)?;
            if sampling::top1_prob(&logits[0]) < sd.min_confidence {
                break;
            }
            // The token at absolute position pos + 1 + last, keyed as the
            // final head's sample there will be.
            let d = sampling::choose(
                &logits[0],
                &self.params.sampling,
                self.params.stream(),
                pos + 1 + last,
            );
            drafts.push(d);
            let mut next = self.model.embed(&[d], pos + 1 + last)?;
            self.model.run_blocks(&mut next, block, &mut self.cache)?;
            self.model.append_rows(&mut s, next)?;
            if self.params.stop_at_eot && d == self.eot {
                break;
            }
        }
        Ok((drafts, s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampling::SamplingParams;

    #[test]
    fn an_exit_margin_is_how_far_the_best_rival_outscores_the_draft() {
        let ids = [3, 9, 20];
        let z = [1.0, 4.0, 2.5];
        assert_eq!(exit_margin(&z, &ids, 9, None), -1.5);
        assert_eq!(exit_margin(&z, &ids, 20, None), 1.5);
        assert_eq!(exit_margin(&z, &ids, 3, None), 3.0);
        // Sampling: each score is z / T plus the token's keyed noise, as
        // the final head draws its sample.
        let g = Noise::at(7, 0, 12);
        let s = |i: usize| z[i] / 0.5 + g.gumbel(ids[i]);
        let want = s(0).max(s(2)) - s(1);
        assert!((exit_margin(&z, &ids, 9, Some((0.5, g))) - want).abs() < 1e-6);
    }

    #[test]
    fn over_the_whole_vocabulary_a_draft_beats_its_rivals_exactly_when_the_sampler_draws_it() {
        let z: Vec<f32> = (0..50).map(|i| (i * 37 % 11) as f32 * 0.3).collect();
        let ids: Vec<u32> = (0..50).collect();
        let (seed, stream, temp) = (3, 5, 0.8);
        let sp = SamplingParams {
            temperature: temp,
            seed,
            ..Default::default()
        };
        for pos in 0..40 {
            let drawn = sampling::choose(&z, &sp, stream, pos);
            let noise = Some((temp, Noise::at(seed, stream, pos)));
            for d in 0..50 {
                let m = exit_margin(&z, &ids, d, noise);
                assert_eq!(m < 0.0, d == drawn, "position {pos}, draft {d}: margin {m}");
            }
        }
    }
}
