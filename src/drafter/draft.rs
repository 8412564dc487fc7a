//! Drafting: the drafter's estimate of the model's next token (class
//! probabilities summed per token they resolve to), a draft picked from it
//! by rule (the best token, or the sample that follows the sampler's
//! noise), chains of drafts, and draft trees grown by path probability.

use super::features::Verified;
use super::Drafter;
use crate::sampling::{Noise, OTHER_TOKEN};

/// Children per draft-tree node at most.
pub const MAX_CHILDREN: usize = 3;

/// One node of a draft tree: its token, the drafter's probability of it
/// given its parent, the product of those from the root (`path`), and its
/// parent's row (0: the root, the pending token; row i: node i - 1).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TreeDraft {
    pub token: u32,
    pub prob: f32,
    pub path: f32,
    pub parent: usize,
}

/// One drafted token and the probability the tree gave it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Draft {
    pub token: u32,
    pub prob: f32,
}

/// How the drafter picks a draft among its candidates.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum DraftRule {
    /// Its most likely token: what greedy decoding will choose.
    Best,
    /// The Gumbel-max sample of its own estimate, tempered, with the noise
    /// that the model's sampler will add at each position (docs/design.md): it
    /// agrees with the model's keyed sample as often as the estimate is
    /// close to the model's distribution, where a point draft agrees only
    /// with the sample's probability.
    Sample {
        seed: u64,
        stream: u64,
        temperature: f32,
        top_p: f32,
    },
}

/// The drafter's distribution over the model's next token.
#[derive(Clone, Debug, PartialEq)]
pub struct Estimate {
    /// Candidate tokens and their probabilities.
    pub tokens: Vec<(u32, f32)>,
    /// The `__MODEL__` class's probability.
    pub model: f32,
    /// Mass outside the candidates (`__MODEL__` and the skipped tail).
    pub rest: f32,
}

impl Estimate {
    /// The Gumbel-max draw from the estimate raised to `sharpness` and
    /// renormalised, the mass outside the candidates drawing as one
    /// outcome of its own ([`OTHER_TOKEN`]'s noise): None when that outcome
    /// wins. The draft's probability is the tempered mass of the
    /// candidates: the chance that the model's sample is one of them,
    /// which the shared noise then makes the drafted one.
    pub fn sample(&self, noise: Noise, sharpness: f32) -> Option<Draft> {
        let weight = |q: f32| if q > 0.0 { q.powf(sharpness) } else { 0.0 };
        let other = weight(self.rest);
        let mut best: Option<(f32, u32)> = None;
        let mut covered = 0.0;
        for &(t, q) in &self.tokens {
            let w = weight(q);
            covered += w;
            let s = w.ln() + noise.gumbel(t);
            if best.is_none_or(|b| s > b.0) {
                best = Some((s, t));
            }
        }
        let (score, token) = best?;
        if other > 0.0 && other.ln() + noise.gumbel(OTHER_TOKEN) > score {
            return None;
        }
        Some(Draft {
            token,
            prob: covered / (covered + other),
        })
    }
}

impl Estimate {
    /// Adds `mass` of the outside mass to the tokens of `next` (the n-gram
    /// tables' successors and shares) that are not candidates yet, in
    /// proportion to their shares among the successors that are not.
    fn spread(&mut self, next: &[(u32, f32)], mass: f32) {
        let known = |t: u32| self.tokens.iter().any(|m| m.0 == t);
        let held: f32 = next.iter().filter(|n| known(n.0)).map(|n| n.1).sum();
        let fresh: Vec<(u32, f32)> = next.iter().copied().filter(|n| !known(n.0)).collect();
        let scale = mass / (1.0 - held).max(1e-3);
        let mut added = 0.0;
        for (t, q) in fresh {
            let x = (q * scale).min(mass - added);
            if x > 0.0 {
                self.tokens.push((t, x));
                added += x;
            }
        }
        self.rest = (self.rest - added).max(0.0);
    }
}

impl Drafter {
    /// The estimate that sampled drafts rank: [`Self::estimate`] with the
    /// share `ngram_weight` of its outside mass spread over the n-gram
    /// tables' successors of `ctx` it lacks (`ngram`). Without tables, the
    /// estimate itself. Sampled trees and the calibration rank it; greedy
    /// drafting and sampled chains keep the trees' estimate (see
    /// [`Self::draft`]).
    pub fn estimate_wide(&self, ctx: &[u32], verified: Verified) -> Estimate {
        let mut e = self.estimate(ctx, verified);
        if let Some(ng) = &self.ngrams {
            let mass = self.ngram_weight * e.rest;
            e.spread(&ng.next(ctx), mass);
        }
        e
    }

    /// The drafter's estimate of the model's next token after `ctx`: each
    /// candidate token with its probability (classes that resolve to the
    /// same token add up; classes under 2% are skipped), and the mass left
    /// to `__MODEL__` and the skipped tail.
    pub fn estimate(&self, ctx: &[u32], verified: Verified) -> Estimate {
        let (row, cand) = self.features(ctx, verified);
        let mut p = [0f32; 512];
        let mut heap;
        let p: &mut [f32] = if self.gbdt.n_classes <= p.len() {
            &mut p[..self.gbdt.n_classes]
        } else {
            heap = vec![0f32; self.gbdt.n_classes];
            &mut heap
        };
        self.gbdt.predict_proba_into(&row, p);
        let k = self.classes.len();
        let mut tokens: Vec<(u32, f32)> = Vec::with_capacity(8);
        let mut add = |t: u32, q: f32| match tokens.iter_mut().find(|m| m.0 == t) {
            Some(m) => m.1 += q,
            None => tokens.push((t, q)),
        };
        for (i, &q) in p[..k].iter().enumerate() {
            if q > 0.02 {
                add(self.classes[i], q);
            }
        }
        for (i, c) in [cand.trigram, cand.bigram, cand.suffix, cand.context]
            .iter()
            .enumerate()
        {
            if let Some(t) = c {
                add(*t, p[k + i]);
            }
        }
        let covered: f32 = tokens.iter().map(|t| t.1).sum();
        Estimate {
            tokens,
            model: p[self.model_class()],
            rest: (1.0 - covered).max(0.0),
        }
    }

    /// Best next token after `ctx` and its probability; None when
    /// `__MODEL__` wins.
    pub fn predict(&self, ctx: &[u32], verified: Verified) -> Option<Draft> {
        let e = self.estimate(ctx, verified);
        let best = e.tokens.into_iter().max_by(|a, b| a.1.total_cmp(&b.1))?;
        (best.1 > e.model).then_some(Draft {
            token: best.0,
            prob: best.1,
        })
    }

    /// The next draft after `ctx` by `rule` (see [`DraftRule`]).
    pub fn draft(&self, ctx: &[u32], verified: Verified, rule: DraftRule) -> Option<Draft> {
        match rule {
            DraftRule::Best => self.predict(ctx, verified),
            DraftRule::Sample {
                seed,
                stream,
                temperature,
                ..
            } => {
                // Chains rank the trees' estimate, not the wide one: a
                // chain draft's price is its estimate's mass on the
                // candidates, which the n-gram tables push to ~1 while the
                // draft is right ~30% of the time, so served chains at 0.8
                // drafted rows that did not pay (HTTP, 1 / 8 clients: 0.85x /
                // 0.79x plain with the wide estimate, 1.12x / 1.15x without;
                // docs/benchmarks.md). Sampled trees price by calibration.
                let noise = Noise::at(seed, stream, ctx.len());
                let sharpness = self.sample_sharpness / temperature;
                self.estimate(ctx, verified).sample(noise, sharpness)
            }
        }
    }

    /// Drafts up to `k` tokens after `ctx` (stops at `__MODEL__` or when a
    /// token's probability is below the threshold).
    pub fn propose(&self, ctx: &[u32], k: usize, verified: Verified) -> Vec<Draft> {
        self.propose_with(ctx, k, verified, self.threshold)
    }

    pub fn propose_with(
        &self,
        ctx: &[u32],
        k: usize,
        verified: Verified,
        threshold: f32,
    ) -> Vec<Draft> {
        self.propose_path(ctx, k, verified, threshold, 0.0, DraftRule::Best)
    }

    /// Drafts up to `k` tokens by `rule`, stopping at `__MODEL__`, below
    /// `threshold`, or once the path probability (the product of the
    /// drafts' probabilities) falls below `min_path`: a batch where a draft
    /// row must be likely to pay for itself asks for no drafts it would
    /// drop, and spends no prediction time on them.
    pub fn propose_path(
        &self,
        ctx: &[u32],
        k: usize,
        verified: Verified,
        threshold: f32,
        min_path: f32,
        rule: DraftRule,
    ) -> Vec<Draft> {
        let mut ext = ctx.to_vec();
        let mut out = Vec::new();
        let mut path = 1f32;
        while out.len() < k.min(self.k_max) {
            match self.draft(&ext, verified, rule) {
                Some(d) if d.prob >= threshold && path * d.prob >= min_path => {
                    path *= d.prob;
                    ext.push(d.token);
                    out.push(d);
                }
                _ => break,
            }
        }
        out
    }

    /// A draft tree of up to `budget` nodes after `ctx`, grown by path
    /// probability (EAGLE-2's rule): the candidate whose path (the product
    /// of the drafter's probabilities from the root) is likeliest joins
    /// next, so nodes come in order of falling path probability, parents
    /// first. A node's most likely child joins as a chain's next draft
    /// would (above `threshold` and the `__MODEL__` class); its other
    /// candidates when their probability reaches `sibling_floor`. Every
    /// node's path probability is at least `min_path`; depth is at most
    /// `k_max`. Greedy decoding only: a sampled draft has one child.
    pub fn propose_tree(
        &self,
        ctx: &[u32],
        budget: usize,
        verified: Verified,
        threshold: f32,
        min_path: f32,
    ) -> Vec<TreeDraft> {
        let mut nodes: Vec<TreeDraft> = Vec::new();
        if budget == 0 {
            return nodes;
        }
        let mut depth: Vec<usize> = vec![0];
        let mut open: Vec<Candidate> = Vec::new();
        let mut ext = ctx.to_vec();
        let mut row = 0;
        loop {
            if depth[row] < self.k_max {
                let e = self.estimate(&ext, verified);
                let path = if row == 0 { 1.0 } else { nodes[row - 1].path };
                open.extend(
                    self.children(&e, threshold)
                        .map(|(t, q)| (path * q, row, t, q)),
                );
            }
            let Some(c) = take_best(&mut open) else {
                break;
            };
            if c.0 < min_path || nodes.len() >= budget {
                break;
            }
            row = attach(&mut nodes, &mut depth, &mut ext, ctx.len(), c);
        }
        nodes
    }

    /// The children a tree node gets from its estimate: the most likely
    /// token as a chain would draft it, then siblings above the floor.
    fn children(&self, e: &Estimate, threshold: f32) -> impl Iterator<Item = (u32, f32)> {
        let mut c: Vec<(u32, f32)> = e.tokens.clone();
        c.sort_by(|a, b| b.1.total_cmp(&a.1));
        let first_ok = c.first().is_some_and(|f| f.1 >= threshold && f.1 > e.model);
        let n = if first_ok {
            1 + c[1..]
                .iter()
                .take_while(|x| x.1 >= self.sibling_floor)
                .count()
        } else {
            0
        };
        c.truncate(n.min(MAX_CHILDREN));
        c.into_iter()
    }
}

/// The tokens on the path from the root (excluded) to tree row `row`.
/// A tree's candidate child: (path probability, parent row, token,
/// probability).
pub(super) type Candidate = (f32, usize, u32, f32);

/// Takes the open candidate with the highest path probability.
pub(super) fn take_best(open: &mut Vec<Candidate>) -> Option<Candidate> {
    let best = (0..open.len()).max_by(|&a, &b| open[a].0.total_cmp(&open[b].0))?;
    Some(open.swap_remove(best))
}

/// Adds candidate `c` to the tree (its depth one below its parent's) and
/// sets `ext` to the context after it: the first `ctx_len` tokens, then
/// the path to it. Returns its row.
pub(super) fn attach(
    nodes: &mut Vec<TreeDraft>,
    depth: &mut Vec<usize>,
    ext: &mut Vec<u32>,
    ctx_len: usize,
    (path, parent, token, prob): Candidate,
) -> usize {
    nodes.push(TreeDraft {
        token,
        prob,
        path,
        parent,
    });
    depth.push(depth[parent] + 1);
    ext.truncate(ctx_len);
    ext.extend(tokens_to(nodes, nodes.len()));
    nodes.len()
}

pub(super) fn tokens_to(nodes: &[TreeDraft], mut row: usize) -> Vec<u32> {
    let mut out = Vec::new();
    while row != 0 {
        let n = &nodes[row - 1];
        out.push(n.token);
        row = n.parent;
    }
    out.reverse();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_mass_goes_to_new_tokens_only_and_leaves_the_rest() {
        let mut e = Estimate {
            tokens: vec![(1, 0.4)],
            model: 0.5,
            rest: 0.6,
        };
        // Token 1 holds half the successors' share: 0.3 spread as
        // 0.3 / 0.5 x 0.3 = 0.18 to token 2 and 0.3 / 0.5 x 0.2 = 0.12 to 3.
        e.spread(&[(1, 0.5), (2, 0.3), (3, 0.2)], 0.3);
        assert_eq!(e.tokens[0], (1, 0.4));
        assert!((e.tokens[1].1 - 0.18).abs() < 1e-6, "{:?}", e.tokens);
        assert!((e.tokens[2].1 - 0.12).abs() < 1e-6, "{:?}", e.tokens);
        assert!((e.rest - 0.3).abs() < 1e-6);
        let total: f32 = e.tokens.iter().map(|t| t.1).sum::<f32>() + e.rest;
        assert!((total - 1.0).abs() < 1e-6);
    }

    #[test]
    fn a_drafter_that_knows_the_distribution_drafts_the_keyed_sample() {
        use crate::sampling::{choose, SamplingParams};
        let logits = [1.0f32, 0.2, 2.0, -1.0, 1.5, 0.0];
        let lse = logits.iter().map(|l| l.exp()).sum::<f32>().ln();
        let estimate = Estimate {
            tokens: (0..6u32)
                .map(|t| (t, (logits[t as usize] - lse).exp()))
                .collect(),
            model: 0.0,
            rest: 0.0,
        };
        let t = 0.8;
        let params = SamplingParams {
            temperature: t,
            seed: 9,
            ..Default::default()
        };
        let (mut noisy, mut point) = (0, 0);
        let best = estimate
            .tokens
            .iter()
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .unwrap()
            .0;
        for pos in 0..2000 {
            let model = choose(&logits, &params, 7, pos);
            let d = estimate.sample(Noise::at(9, 7, pos), 1.0 / t).unwrap();
            noisy += usize::from(d.token == model);
            point += usize::from(best == model);
        }
        // Equal up to rounding; a point draft agrees only p(best) of the time.
        assert!(noisy >= 1990, "{noisy} of 2000 agree");
        assert!(point < 1200, "{point} of 2000 point drafts agree");
    }

    #[test]
    fn mass_outside_the_candidates_stops_sampled_drafts() {
        let estimate = Estimate {
            tokens: vec![(3, 0.1)],
            model: 0.9,
            rest: 0.9,
        };
        let drafted = (0..2000)
            .filter(|&pos| estimate.sample(Noise::at(1, 0, pos), 1.0).is_some())
            .count();
        // The candidate wins the race with probability 0.1.
        assert!((150..250).contains(&drafted), "{drafted}");
    }
}
