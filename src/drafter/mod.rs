//! The tree drafter: a gradient-boosted classifier that proposes the next
//! tokens where the model is predictable and says `__MODEL__` elsewhere.
//!
//! Classes: the K tokens the model most often predicts, then pointer classes
//! (COPY_TRIGRAM, COPY_BIGRAM, COPY_SUFFIX, COPY_CONTEXT: "the candidate of
//! that source", which lets drafts leave the K tokens), then `__MODEL__`.
//! A row's target is every class that yields the model's top-1 token (soft
//! target), or `__MODEL__` when none does. At draft time class probabilities
//! are summed per token they resolve to; the best token is drafted when its
//! probability reaches `threshold`, and drafting continues on the extended
//! context up to `k_max` tokens.
//!
//! This module never touches candle: it sees token ids and plain rows.
//! Labelling with the model lives in `train::label`.

pub mod features;
pub mod gbdt;

use std::path::Path;

use serde::{Deserialize, Serialize};

use features::{Candidates, FeatureInput, Tables, Verified};
use gbdt::Gbdt;

use crate::sampling::{Noise, OTHER_TOKEN};

/// 2: 14 features (six that did not pay dropped).
pub const FORMAT_VERSION: u32 = 2;
/// Pointer classes after the K token classes, then `__MODEL__`.
pub const N_POINTERS: usize = 4;
pub const MODEL_CLASS_NAME: &str = "__MODEL__";

/// Cost model of a verify step for a drafter whose report holds no measured
/// curve (one built in a test or by hand; `train-drafter` always stores
/// one, `train::label::verify_costs`): k drafts cost `1 + 0.15 k` one-row
/// steps. 0.15 is not derived: it was set in commit 957291a, when the
/// shipped model measured 1.8-2.2x for 8 drafts (1 + 0.15 x 8 = 2.2); the
/// current one measures 1.64x (`models/default/drafter.json`). The engine's
/// measured cost curve (`scheduler::Budget`) does not make it obsolete: the
/// Budget prices rows within a batch, while this curve still sets each
/// sequence's draft length (`decode::proposer::TreeDrafter::best_k`).
pub const GUESSED_COST_PER_DRAFT: f64 = 0.15;

#[derive(Debug, thiserror::Error)]
pub enum DrafterError {
    #[error("drafter file {path} cannot be read: {msg}")]
    Read { path: String, msg: String },
    #[error("drafter file {path} is corrupt or truncated: {msg}")]
    Corrupt { path: String, msg: String },
    #[error(
        "drafter file {path} has format version {found}; this build reads version {FORMAT_VERSION}"
    )]
    Version { path: String, found: u32 },
    #[error("drafter file {path} was trained for vocab_size {found}, the model has {expected}")]
    Vocab {
        path: String,
        found: usize,
        expected: usize,
    },
}

#[derive(Serialize, Deserialize, Clone)]
pub struct Drafter {
    pub version: u32,
    pub vocab_size: usize,
    /// The K token classes.
    pub classes: Vec<u32>,
    pub tables: Tables,
    pub gbdt: Gbdt,
    /// Draft a token when its probability reaches this.
    pub threshold: f32,
    /// Longest chain drafted per verify step.
    pub k_max: usize,
    /// At temperature T, sampled drafts come from the estimate raised to
    /// `sample_sharpness / T` ([`DraftRule::Sample`]); tuned on the train
    /// split (docs/benchmarks.md).
    #[serde(default = "default_sample_sharpness")]
    pub sample_sharpness: f32,
    /// A sibling joins a draft tree when the drafter gives it at least
    /// this probability (a node's first child follows the chain's rule,
    /// `threshold`); tuned on the train split (docs/benchmarks.md).
    #[serde(default = "default_sibling_floor")]
    pub sibling_floor: f32,
    /// Whether each token starts a word (from the tokenizer).
    pub word_start: Vec<bool>,
    /// Training report: feature importances, replay figures.
    #[serde(default)]
    pub report: serde_json::Value,
    #[serde(skip)]
    class_index: Vec<u32>,
}

fn default_sample_sharpness() -> f32 {
    1.0
}

fn default_sibling_floor() -> f32 {
    0.05
}

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
    /// that the model's sampler will add at each position (DESIGN.md): it
    /// agrees with the model's keyed sample as often as the estimate is
    /// close to the model's distribution, where a point draft agrees only
    /// with the sample's probability.
    Sample {
        seed: u64,
        stream: u64,
        temperature: f32,
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

impl Drafter {
    pub fn new(
        vocab_size: usize,
        classes: Vec<u32>,
        tables: Tables,
        gbdt: Gbdt,
        word_start: Vec<bool>,
        threshold: f32,
        k_max: usize,
    ) -> Self {
        let mut d = Drafter {
            version: FORMAT_VERSION,
            vocab_size,
            classes,
            tables,
            gbdt,
            threshold,
            k_max,
            sample_sharpness: default_sample_sharpness(),
            sibling_floor: default_sibling_floor(),
            word_start,
            report: serde_json::Value::Null,
            class_index: vec![],
        };
        d.index();
        d
    }

    fn index(&mut self) {
        let k = self.classes.len() as u32;
        self.class_index = vec![k; self.vocab_size];
        for (i, &t) in self.classes.iter().enumerate() {
            if let Some(slot) = self.class_index.get_mut(t as usize) {
                *slot = i as u32;
            }
        }
    }

    pub fn n_classes(&self) -> usize {
        self.classes.len() + N_POINTERS + 1
    }

    pub fn model_class(&self) -> usize {
        self.classes.len() + N_POINTERS
    }

    /// Class index of a token (K when it is not one of the K classes).
    pub fn class_of(&self, t: u32) -> usize {
        self.class_index
            .get(t as usize)
            .copied()
            .unwrap_or(self.classes.len() as u32) as usize
    }

    /// Measured cost of verifying k drafts relative to a plain step (index
    /// k = 0..=k_max), from training; [`GUESSED_COST_PER_DRAFT`] per draft
    /// when absent.
    pub fn verify_costs(&self) -> Vec<f64> {
        let measured: Vec<f64> = self.report["verify_cost"]
            .as_array()
            .map_or(vec![], |v| v.iter().filter_map(|x| x.as_f64()).collect());
        if measured.len() > self.k_max {
            let mut c = measured;
            c[0] = 1.0;
            c
        } else {
            (0..=self.k_max)
                .map(|k| 1.0 + GUESSED_COST_PER_DRAFT * k as f64)
                .collect()
        }
    }

    /// Feature row and candidates for predicting the token after `ctx`.
    pub fn features(&self, ctx: &[u32], verified: Verified) -> (Vec<f32>, Candidates) {
        let class_of = |t: u32| self.class_of(t);
        features::features(&FeatureInput {
            ctx,
            verified,
            tables: &self.tables,
            class_of: &class_of,
            word_start: &self.word_start,
        })
    }

    /// The classes (soft target) that yield `next` given the candidates.
    pub fn target(&self, next: u32, cand: &Candidates) -> gbdt::Target {
        let k = self.classes.len() as u32;
        let mut hits: Vec<u32> = Vec::new();
        if (self.class_of(next) as u32) < k {
            hits.push(self.class_of(next) as u32);
        }
        for (i, c) in [cand.trigram, cand.bigram, cand.suffix, cand.context]
            .iter()
            .enumerate()
        {
            if *c == Some(next) {
                hits.push(k + i as u32);
            }
        }
        if hits.is_empty() {
            return vec![(self.model_class() as u32, 1.0)];
        }
        let w = 1.0 / hits.len() as f32;
        hits.into_iter().map(|c| (c, w)).collect()
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
            } => {
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
        // Candidates: (path probability, parent row, token, probability).
        let mut open: Vec<(f32, usize, u32, f32)> = Vec::new();
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
            let Some(best) = (0..open.len()).max_by(|&a, &b| open[a].0.total_cmp(&open[b].0))
            else {
                break;
            };
            let (path, parent, token, prob) = open.swap_remove(best);
            if path < min_path || nodes.len() >= budget {
                break;
            }
            nodes.push(TreeDraft {
                token,
                prob,
                path,
                parent,
            });
            depth.push(depth[parent] + 1);
            row = nodes.len();
            ext.truncate(ctx.len());
            ext.extend(tokens_to(&nodes, row));
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

    pub fn save(&self, path: &Path) -> Result<(), DrafterError> {
        let json = serde_json::to_vec(self).map_err(|e| DrafterError::Read {
            path: path.display().to_string(),
            msg: e.to_string(),
        })?;
        crate::atomic_file::write(path, &json).map_err(|e| DrafterError::Read {
            path: path.display().to_string(),
            msg: e.to_string(),
        })
    }

    /// Loads and checks a drafter file for a model of `vocab_size`.
    pub fn load(path: &Path, vocab_size: usize) -> Result<Drafter, DrafterError> {
        let p = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|e| DrafterError::Read {
            path: p.clone(),
            msg: e.to_string(),
        })?;
        let v: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|e| DrafterError::Corrupt {
                path: p.clone(),
                msg: e.to_string(),
            })?;
        let found = v.get("version").and_then(|x| x.as_u64()).unwrap_or(0) as u32;
        if found != FORMAT_VERSION {
            return Err(DrafterError::Version { path: p, found });
        }
        let mut d: Drafter = serde_json::from_value(v).map_err(|e| DrafterError::Corrupt {
            path: p.clone(),
            msg: e.to_string(),
        })?;
        if d.gbdt.version != gbdt::FORMAT_VERSION {
            return Err(DrafterError::Version {
                path: p,
                found: d.gbdt.version,
            });
        }
        if d.vocab_size != vocab_size {
            return Err(DrafterError::Vocab {
                path: p,
                found: d.vocab_size,
                expected: vocab_size,
            });
        }
        if d.gbdt.n_classes != d.classes.len() + N_POINTERS + 1
            || d.gbdt.n_features != features::N_FEATURES
        {
            return Err(DrafterError::Corrupt {
                path: p,
                msg: "class or feature counts disagree with the trees".into(),
            });
        }
        d.gbdt.validate().map_err(|e| DrafterError::Corrupt {
            path: p.clone(),
            msg: e.to_string(),
        })?;
        d.index();
        Ok(d)
    }
}

/// The tokens on the path from the root (excluded) to tree row `row`.
fn tokens_to(nodes: &[TreeDraft], mut row: usize) -> Vec<u32> {
    let mut out = Vec::new();
    while row != 0 {
        let n = &nodes[row - 1];
        out.push(n.token);
        row = n.parent;
    }
    out.reverse();
    out
}

/// The simple baseline: match the context's suffix earlier in the context
/// and copy what followed (prompt lookup decoding), up to `k` tokens.
pub fn prompt_lookup(ctx: &[u32], k: usize, min_match: usize) -> Vec<u32> {
    let n = ctx.len();
    for len in (min_match..=n.saturating_sub(1).min(8)).rev() {
        let suffix = &ctx[n - len..];
        // Most recent earlier occurrence.
        if let Some(start) = (0..n - len).rev().find(|&s| &ctx[s..s + len] == suffix) {
            let from = start + len;
            return ctx[from..(from + k).min(n)].to_vec();
        }
    }
    vec![]
}

/// Offline replay of drafting on a sequence the model produced greedily.
#[derive(Serialize, Deserialize, Clone, Debug, Default)]
pub struct Replay {
    pub tokens: usize,
    pub steps: usize,
    pub drafted: usize,
    pub accepted: usize,
    /// Sum of the cost of every verify step, in units of a 1-token step.
    pub cost: f64,
}

impl Replay {
    pub fn tokens_per_step(&self) -> f64 {
        self.tokens as f64 / self.steps.max(1) as f64
    }
    /// Speedup over plain decoding (one token per unit-cost step).
    pub fn speedup(&self) -> f64 {
        self.tokens as f64 / self.cost.max(1e-9)
    }
    pub fn precision(&self) -> f64 {
        self.accepted as f64 / self.drafted.max(1) as f64
    }
    pub fn add(&mut self, o: &Replay) {
        self.tokens += o.tokens;
        self.steps += o.steps;
        self.drafted += o.drafted;
        self.accepted += o.accepted;
        self.cost += o.cost;
    }
}

/// Replays decoding of `seq[prompt..]` (the model's own greedy output):
/// at each step `propose(context, verified index)` drafts tokens, the
/// matching prefix is accepted plus one token from the model. `cost(k)` is
/// the cost of verifying k drafts relative to a plain step.
pub fn replay(
    seq: &[u32],
    prompt: usize,
    mut propose: impl FnMut(&[u32], usize) -> Vec<u32>,
    cost: &dyn Fn(usize) -> f64,
) -> Replay {
    let mut r = Replay::default();
    let mut pos = prompt; // tokens known
    while pos < seq.len() {
        let drafts = propose(&seq[..pos], pos - 1);
        let room = seq.len() - pos;
        let drafts = &drafts[..drafts.len().min(room.saturating_sub(1))];
        let a = drafts
            .iter()
            .zip(&seq[pos..])
            .take_while(|(d, s)| d == s)
            .count();
        r.drafted += drafts.len();
        r.accepted += a;
        r.tokens += a + 1;
        r.steps += 1;
        r.cost += cost(drafts.len());
        pos += a + 1;
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_lookup_copies_what_followed_the_suffix() {
        let ctx = [1, 2, 3, 4, 5, 9, 2, 3];
        assert_eq!(prompt_lookup(&ctx, 3, 2), vec![4, 5, 9]);
        assert!(prompt_lookup(&[1, 2, 3], 3, 2).is_empty());
    }

    #[test]
    fn an_oracle_replay_accepts_every_draft() {
        let seq: Vec<u32> = (0..100).collect();
        let r = replay(
            &seq,
            10,
            |ctx, _| seq[ctx.len()..(ctx.len() + 4).min(seq.len())].to_vec(),
            &|k| 1.0 + 0.1 * k as f64,
        );
        assert_eq!(r.tokens, 90);
        assert_eq!(r.accepted, r.drafted);
        assert_eq!(r.steps, 18);
    }

    #[test]
    fn a_replay_without_drafts_is_plain_decoding() {
        let seq: Vec<u32> = (0..50).collect();
        let r = replay(&seq, 5, |_, _| vec![], &|_| 1.0);
        assert_eq!((r.tokens, r.steps), (45, 45));
        assert!((r.speedup() - 1.0).abs() < 1e-12);
    }

    /// A drafter over a 40-token vocabulary whose trees learned "next =
    /// last + 1" from rows its own feature code made.
    fn small_drafter() -> Drafter {
        let vocab = 40usize;
        let classes: Vec<u32> = (0..vocab as u32).collect();
        let tables = Tables::build((1..vocab as u32 - 1).map(|t| (Some(t - 1), t, t + 1)), 1);
        let n_classes = classes.len() + N_POINTERS + 1;
        let mut d = Drafter::new(
            vocab,
            classes,
            tables,
            Gbdt::constant(features::N_FEATURES, n_classes),
            vec![true; vocab],
            0.5,
            4,
        );
        let (mut rows, mut targets) = (vec![], vec![]);
        for start in 0..30u32 {
            let ctx: Vec<u32> = (start..start + 6).map(|t| t % 39).collect();
            let next = (start + 6) % 39;
            let (row, cand) = d.features(&ctx, Verified::default());
            targets.push(d.target(next, &cand));
            rows.push(row);
        }
        let p = gbdt::GbdtParams {
            rounds: 5,
            max_depth: 3,
            min_rows_leaf: 2,
            ..Default::default()
        };
        d.gbdt = Gbdt::fit(&rows, &targets, n_classes, (&[], &[]), &p).unwrap();
        d
    }

    #[test]
    fn a_saved_drafter_loads_back_with_identical_predictions() {
        let d = small_drafter();
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("drafter.json");
        d.save(&path).unwrap();
        let back = Drafter::load(&path, 40).unwrap();
        for start in 0..30u32 {
            let ctx: Vec<u32> = (start..start + 6).map(|t| t % 39).collect();
            let (row, _) = d.features(&ctx, Verified::default());
            assert_eq!(d.gbdt.predict_proba(&row), back.gbdt.predict_proba(&row));
            assert_eq!(
                d.propose(&ctx, 4, Verified::default()),
                back.propose(&ctx, 4, Verified::default())
            );
        }
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

    fn load_err(path: &Path, vocab: usize) -> String {
        match Drafter::load(path, vocab) {
            Ok(_) => panic!("{} loaded", path.display()),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn truncated_corrupt_and_mismatched_drafter_files_are_clear_errors() {
        let d = small_drafter();
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("drafter.json");
        d.save(&path).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let load_bytes = |b: &[u8]| {
            std::fs::write(&path, b).unwrap();
            load_err(&path, 40)
        };
        let e = load_bytes(&bytes[..bytes.len() / 2]);
        assert!(
            e.contains("corrupt or truncated") && e.contains("drafter.json"),
            "{e}"
        );
        let mut v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        v["version"] = 1.into();
        let e = load_bytes(&serde_json::to_vec(&v).unwrap());
        assert!(e.contains("format version 1"), "{e}");
        let mut v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        v["gbdt"]["trees"][0]["nodes"][0] = serde_json::json!({"Split": {"feature": 0, "threshold": 0.5, "left": 900, "right": 901}});
        let e = load_bytes(&serde_json::to_vec(&v).unwrap());
        assert!(e.contains("out of range"), "{e}");
        std::fs::write(&path, &bytes).unwrap();
        let e = load_err(&path, 50);
        assert!(e.contains("vocab_size 40") && e.contains("50"), "{e}");
        let e = load_err(&tmp.path().join("missing.json"), 40);
        assert!(
            e.contains("missing.json") && e.contains("cannot be read"),
            "{e}"
        );
    }
}
