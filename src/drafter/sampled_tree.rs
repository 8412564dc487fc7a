//! Draft trees at temperature above 0 (docs/design.md, "Draft trees").
//! The sampler's noise at a position is keyed, so the drafter can
//! add the same Gumbel noise to its own tempered estimate: a node's
//! children are the top of those scores (a Gumbel-top-k, sampling without
//! replacement), and the node is passed when the model's sample is among
//! them. Each child carries its calibrated chance of being that sample
//! (`calibration`); the tree grows best path first and keeps the size
//! that gives the most expected tokens per unit of verify cost (the
//! measured cost curve): wide where the estimate is flat, deep where it is
//! peaked.

use super::calibration::RANKS;
use super::draft::{attach, take_best, Candidate};
use super::features::Verified;
use super::{Drafter, Estimate, TreeDraft};
use crate::sampling::{Noise, OTHER_TOKEN};

/// A candidate in the order of the Gumbel scores: its rank (the mass
/// outside the candidates takes a rank of its own) and its tempered
/// probability.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Ranked {
    pub token: u32,
    pub rank: usize,
    pub tempered: f32,
}

/// The sampling key and setting a sampled tree follows.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SampleKey {
    pub seed: u64,
    pub stream: u64,
    pub temperature: f32,
    pub top_p: f32,
}

/// How big a tree may grow: at most `budget` nodes and `max_depth` levels,
/// no node whose path probability is under `min_gain` (the batch's price
/// of a row), and the size chosen by the verify cost of n drafts relative
/// to a plain step, `costs[n]` (only measured sizes are drafted).
#[derive(Clone, Copy, Debug)]
pub struct Sizing<'a> {
    pub budget: usize,
    pub max_depth: usize,
    pub min_gain: f32,
    pub costs: &'a [f64],
}

impl Estimate {
    /// The candidates ranked by `sharpness * ln q_t + g_t` with the keyed
    /// noise `noise` (the outside mass scoring as [`OTHER_TOKEN`]): the
    /// first [`RANKS`] ranks, the outside mass left out.
    pub fn ranked(&self, noise: Noise, sharpness: f32) -> Vec<Ranked> {
        let weight = |q: f32| if q > 0.0 { q.powf(sharpness) } else { 0.0 };
        let other = weight(self.rest);
        let total = other + self.tokens.iter().map(|t| weight(t.1)).sum::<f32>();
        if total <= 0.0 {
            return vec![];
        }
        let other_score = match other > 0.0 {
            true => other.ln() + noise.gumbel(OTHER_TOKEN),
            false => f32::NEG_INFINITY,
        };
        let mut scored: Vec<(f32, u32, f32)> = self
            .tokens
            .iter()
            .filter(|t| t.1 > 0.0)
            .map(|&(t, q)| (weight(q).ln() + noise.gumbel(t), t, weight(q) / total))
            .collect();
        scored.sort_by(|a, b| b.0.total_cmp(&a.0));
        scored
            .into_iter()
            .enumerate()
            .map(|(i, (s, token, tempered))| Ranked {
                token,
                rank: i + usize::from(other_score > s),
                tempered,
            })
            .filter(|r| r.rank < RANKS)
            .collect()
    }
}

impl Drafter {
    /// A sampled draft tree after `ctx` for the sampling `key`, sized by
    /// `sizing` (see the module's notes).
    pub fn propose_sampled_tree(
        &self,
        ctx: &[u32],
        verified: Verified,
        key: SampleKey,
        sizing: Sizing,
    ) -> Vec<TreeDraft> {
        let sharpness = self.sample_sharpness / key.temperature;
        let sizing = Sizing {
            max_depth: sizing.max_depth.min(self.k_max),
            ..sizing
        };
        grow(
            ctx,
            key,
            sharpness,
            |ext| self.estimate_wide(ext, verified),
            |rank, tempered| {
                self.calibration
                    .hit_prob(key.temperature, key.top_p, rank, tempered)
            },
            sizing,
        )
    }
}

/// Verify cost of `n` drafts: `costs[n]`, never below a smaller tree's.
fn cost(costs: &[f64], n: usize) -> f64 {
    costs[..=n]
        .iter()
        .copied()
        .fold(f64::MIN, f64::max)
        .max(1e-9)
}

/// Grows a sampled tree: `estimate(ext)` is the drafter's estimate after
/// `ext`, `hit(rank, tempered)` a child's calibrated chance of being the
/// model's sample. Candidates join best path probability first (parents
/// before children, paths falling), then the tree is cut to the size with
/// the most expected tokens, `1 + sum of paths`, per unit of cost.
pub fn grow(
    ctx: &[u32],
    key: SampleKey,
    sharpness: f32,
    mut estimate: impl FnMut(&[u32]) -> Estimate,
    hit: impl Fn(usize, f32) -> Option<f32>,
    sizing: Sizing,
) -> Vec<TreeDraft> {
    let budget = sizing.budget.min(sizing.costs.len().saturating_sub(1));
    if budget == 0 {
        return vec![];
    }
    let mut nodes: Vec<TreeDraft> = Vec::new();
    let mut depth = vec![0usize];
    let mut open: Vec<Candidate> = Vec::new();
    let mut ext = ctx.to_vec();
    let mut row = 0;
    loop {
        if depth[row] < sizing.max_depth {
            let noise = Noise::at(key.seed, key.stream, ext.len());
            let path = if row == 0 { 1.0 } else { nodes[row - 1].path };
            for r in estimate(&ext).ranked(noise, sharpness) {
                if let Some(p) = hit(r.rank, r.tempered) {
                    open.push((path * p, row, r.token, p));
                }
            }
        }
        let Some(c) = take_best(&mut open) else {
            break;
        };
        if c.0 < sizing.min_gain || c.0 <= 0.0 || nodes.len() >= budget {
            break;
        }
        row = attach(&mut nodes, &mut depth, &mut ext, ctx.len(), c);
    }
    let keep = best_size(&nodes, sizing.costs);
    nodes.truncate(keep);
    nodes
}

/// The number of leading nodes with the most expected tokens per unit of
/// verify cost (0: a plain step).
fn best_size(nodes: &[TreeDraft], costs: &[f64]) -> usize {
    let (mut best, mut best_rate) = (0, 1.0 / cost(costs, 0));
    let mut tokens = 1.0;
    for (i, n) in nodes.iter().enumerate() {
        tokens += f64::from(n.path);
        let rate = tokens / cost(costs, i + 1);
        if rate > best_rate {
            (best, best_rate) = (i + 1, rate);
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: SampleKey = SampleKey {
        seed: 3,
        stream: 0,
        temperature: 1.0,
        top_p: 1.0,
    };

    /// An estimate over tokens 10.. with these probabilities.
    fn estimate(probs: &[f32]) -> Estimate {
        let covered: f32 = probs.iter().sum();
        Estimate {
            tokens: (10u32..).zip(probs.iter().copied()).collect(),
            model: 0.0,
            rest: (1.0 - covered).max(0.0),
        }
    }

    /// Grows a tree on the same estimate at every node, calibrated as the
    /// tempered probability; returns (nodes, deepest level).
    fn shape(probs: &[f32], costs: &[f64]) -> (usize, usize) {
        let sizing = Sizing {
            budget: 64,
            max_depth: 8,
            min_gain: 0.0,
            costs,
        };
        let nodes = grow(
            &[1, 2, 3],
            KEY,
            1.0,
            |_| estimate(probs),
            |_, t| Some(t),
            sizing,
        );
        let mut depth = vec![0];
        for n in &nodes {
            depth.push(depth[n.parent] + 1);
        }
        (nodes.len(), depth.into_iter().max().unwrap_or(0))
    }

    fn linear(per_row: f64, n: usize) -> Vec<f64> {
        (0..=n).map(|k| 1.0 + per_row * k as f64).collect()
    }

    #[test]
    fn a_flat_estimate_grows_a_wider_tree_and_a_peaked_one_a_deeper_tree() {
        let costs = linear(0.05, 12);
        let (flat_n, flat_depth) = shape(&[0.3, 0.25, 0.2, 0.15], &costs);
        let (peak_n, peak_depth) = shape(&[0.9, 0.04, 0.03], &costs);
        // Flat: more nodes per level.
        let flat_width = flat_n as f64 / flat_depth.max(1) as f64;
        let peak_width = peak_n as f64 / peak_depth.max(1) as f64;
        assert!(flat_width > peak_width, "{flat_width} vs {peak_width}");
        assert!(peak_depth > flat_depth, "{peak_depth} vs {flat_depth}");
    }

    #[test]
    fn cheaper_rows_buy_bigger_trees_and_dear_rows_none() {
        let probs = [0.5, 0.2, 0.1];
        let (cheap, _) = shape(&probs, &linear(0.02, 12));
        let (dear, _) = shape(&probs, &linear(0.3, 12));
        let (prohibitive, _) = shape(&probs, &linear(1.0, 12));
        assert!(cheap > dear, "{cheap} vs {dear}");
        assert!(dear > 0);
        assert_eq!(prohibitive, 0);
    }

    #[test]
    fn a_tree_never_passes_its_budget_nor_the_measured_sizes() {
        let costs = linear(0.01, 5);
        assert_eq!(shape(&[0.3, 0.3, 0.3], &costs).0, 5);
        let sizing = Sizing {
            budget: 2,
            max_depth: 8,
            min_gain: 0.0,
            costs: &costs,
        };
        let nodes = grow(
            &[1],
            KEY,
            1.0,
            |_| estimate(&[0.3, 0.3]),
            |_, t| Some(t),
            sizing,
        );
        assert_eq!(nodes.len(), 2);
    }

    #[test]
    fn the_first_child_is_the_drafters_keyed_sample() {
        let e = estimate(&[0.4, 0.3, 0.2, 0.1]);
        for pos in 0..200 {
            let noise = Noise::at(5, 0, pos);
            let sample = e.sample(noise, 1.3).map(|d| d.token);
            let first = e.ranked(noise, 1.3).into_iter().find(|r| r.rank == 0);
            assert_eq!(sample, first.map(|r| r.token), "at {pos}");
        }
    }
}
