//! The tree drafter: the gradient-boosted trees of `drafter` draft a chain
//! (or, greedy, a draft tree) as long as the sequence's acceptance rate
//! and the measured verify costs say pays; when no draft pays it still
//! asks for its first token one step in [`super::SHADOW_EVERY`], to keep
//! that rate current. At temperature > 0
//! a draft tree follows the sampler's keyed noise and is sized by its
//! children's calibrated chances and the cost curve instead.

use super::plain::verified;
use super::{best_chain_len, AcceptRate, DraftRequest, Drafts, Proposer, ShadowClock, Verdict};
use crate::drafter::features::Verified;
use crate::drafter::{DraftRule, Drafter, SampleKey, Sizing, TreeDraft};
use crate::model::forward::Tree;

/// The drafter's statistics of the last verified position before the
/// first verify step (the prefill does not read them off its last row): a
/// middling top-1 probability of 0.5 and entropy of 2 nats, set by hand,
/// not measured. Labelling never yields this value: the first rows of a
/// continuation take the first step's statistics (`train::label`).
const VERIFIED_BEFORE_ANY_STEP: Verified = Verified {
    top1_prob: 0.5,
    entropy: 2.0,
};

/// The tree drafter and what it has learnt of one sequence.
pub struct TreeDrafter<'m> {
    drafter: &'m Drafter,
    /// The final head's statistics where the sequence last committed (the
    /// drafter's features read them).
    verified: LastVerified,
    /// Running estimate of the per-draft acceptance rate.
    accept: AcceptRate,
    /// Verify cost of k drafts relative to a plain step.
    verify_costs: Vec<f64>,
    /// When the next shadow draft is due, while no chain pays.
    shadows: ShadowClock,
}

impl<'m> TreeDrafter<'m> {
    pub fn new(drafter: &'m Drafter) -> TreeDrafter<'m> {
        Self::with_costs(drafter, drafter.verify_costs())
    }

    /// As [`Self::new`], sized by `verify_costs` (k = 0.. drafts, relative
    /// to a plain step) measured on the machine that decodes, instead of
    /// the curve stored with the drafter.
    pub fn with_costs(drafter: &'m Drafter, verify_costs: Vec<f64>) -> TreeDrafter<'m> {
        TreeDrafter {
            drafter,
            verified: LastVerified::default(),
            accept: AcceptRate::default(),
            verify_costs,
            shadows: ShadowClock::default(),
        }
    }

    /// A sampled draft tree (temperature > 0): Gumbel-top-k children with
    /// calibrated chances, sized by the verify cost curve and the batch's
    /// price of a row (`drafter::sampled_tree`). Its size comes from those
    /// chances, not from the running acceptance rate.
    fn sampled_tree(&self, req: &DraftRequest, key: SampleKey, verified: Verified) -> Drafts {
        let sizing = Sizing {
            budget: req.room,
            max_depth: self.drafter.k_max,
            min_gain: req.min_gain,
            costs: &self.verify_costs,
        };
        let nodes = self
            .drafter
            .propose_sampled_tree(req.tokens, verified, key, sizing);
        tree(nodes)
    }

    /// The draft length with the most expected tokens per unit of verify
    /// cost at the sequence's acceptance rate ([`best_chain_len`]).
    fn best_k(&self) -> usize {
        best_chain_len(self.accept.get(), &self.verify_costs, 0.0)
    }
}

impl Proposer for TreeDrafter<'_> {
    fn propose(&mut self, req: &DraftRequest) -> Drafts {
        if let (true, Some(key)) = (req.branch, sample_key(req.rule)) {
            let verified = self.verified.get();
            return self.sampled_tree(req, key, verified);
        }
        let d = self.drafter;
        let k = self.best_k().min(req.room);
        if k == 0 && !self.shadows.due() {
            // Drafting does not pay and no shadow is due: the statistics
            // (an exp per vocabulary entry) stay unread too.
            return Drafts::none();
        }
        let verified = self.verified.get();
        if k == 0 {
            // A shadow: only the first token, to keep the acceptance
            // estimate current (a sampled draw from the trees took ~20%
            // of a q8_0 step when every such step had one).
            let shadow = d.draft(req.tokens, verified, req.rule);
            return Drafts {
                shadow: shadow.map(|d| d.token),
                ..Drafts::none()
            };
        }
        let (ctx, min_gain) = (req.tokens, req.min_gain);
        match req.branch {
            true => tree(d.propose_tree(ctx, k, verified, d.threshold, min_gain)),
            false => {
                let ds = d.propose_path(ctx, k, verified, d.threshold, min_gain, req.rule);
                let probs = ds.iter().map(|d| d.prob).collect();
                let tokens: Vec<u32> = ds.into_iter().map(|d| d.token).collect();
                Drafts {
                    tree: Tree::chain(tokens.len() + 1),
                    tokens,
                    probs,
                    shadow: None,
                }
            }
        }
    }

    fn observe(&mut self, v: &Verdict) {
        self.verified.keep(v.logits);
        if let Some(t) = v.shadow {
            self.accept.update(f64::from(u8::from(t == v.first)));
        }
        self.accept.observe(v);
    }

    fn rivals(&self) -> &[u32] {
        &self.drafter.classes
    }
}

/// The final head's statistics where a sequence last committed, computed
/// from its logits only when a draft asks for them: they take an exp per
/// vocabulary entry, and under load most steps ask for none (speculation
/// off for the request, or its drafts backed off), so keeping the logits
/// is a copy (4% of the server's time at 32 clients when computed at every
/// commit, `perf`, docs/benchmarks.md).
#[derive(Default)]
struct LastVerified {
    /// The statistics of the logits last read.
    read: Option<Verified>,
    /// Logits kept since, if any.
    unread: Option<Vec<f32>>,
    /// A buffer for the next logits kept.
    spare: Vec<f32>,
}

impl LastVerified {
    /// Keeps `logits` (the newest committed position's).
    fn keep(&mut self, logits: &[f32]) {
        let mut kept = self
            .unread
            .take()
            .unwrap_or_else(|| std::mem::take(&mut self.spare));
        kept.clear();
        kept.extend_from_slice(logits);
        self.unread = Some(kept);
    }

    /// The statistics of the logits kept last, or
    /// [`VERIFIED_BEFORE_ANY_STEP`] before any were.
    fn get(&mut self) -> Verified {
        if let Some(logits) = self.unread.take() {
            self.read = Some(verified(&logits));
            self.spare = logits;
        }
        self.read.unwrap_or(VERIFIED_BEFORE_ANY_STEP)
    }
}

/// The sampling key of a sampled draft rule (None: greedy drafting).
fn sample_key(rule: DraftRule) -> Option<SampleKey> {
    match rule {
        DraftRule::Best => None,
        DraftRule::Sample {
            seed,
            stream,
            temperature,
            top_p,
        } => Some(SampleKey {
            seed,
            stream,
            temperature,
            top_p,
        }),
    }
}

/// Drafts of a draft tree's nodes (parents first).
fn tree(nodes: Vec<TreeDraft>) -> Drafts {
    let parents = std::iter::once(0).chain(nodes.iter().map(|n| n.parent));
    Drafts {
        tokens: nodes.iter().map(|n| n.token).collect(),
        probs: nodes.iter().map(|n| n.prob).collect(),
        tree: Tree::from_parents(parents.collect()).expect("the drafter puts parents first"),
        shadow: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Verified's fields, to compare.
    fn pair(v: Verified) -> (f32, f32) {
        (v.top1_prob, v.entropy)
    }

    #[test]
    fn the_statistics_are_those_of_the_logits_kept_last() {
        let mut v = LastVerified::default();
        assert_eq!(pair(v.get()), pair(VERIFIED_BEFORE_ANY_STEP));
        let (peaked, flat) = ([9.0f32, 0.0, 0.0, 0.0], [1.0f32; 4]);
        v.keep(&peaked);
        v.keep(&flat);
        assert_eq!(pair(v.get()), pair(verified(&flat)));
        assert_eq!(pair(v.get()), pair(verified(&flat)));
        v.keep(&peaked);
        assert_eq!(pair(v.get()), pair(verified(&peaked)));
        assert_ne!(pair(verified(&peaked)), pair(verified(&flat)));
    }
}
