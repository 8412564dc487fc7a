//! Plain decoding: a proposer that never drafts, so every step commits one
//! token; and [`Recorder`], which also keeps the final head's statistics
//! at each step (the tree drafter's labels, `train::label`).

use super::{DraftRequest, Drafts, Proposer, Verdict};
use crate::drafter::features::Verified;
use crate::sampling;

/// Plain decoding.
#[derive(Clone, Copy, Debug, Default)]
pub struct Plain;

impl Proposer for Plain {
    fn propose(&mut self, _req: &DraftRequest) -> Drafts {
        Drafts::none()
    }

    fn is_plain(&self) -> bool {
        true
    }
}

/// Plain decoding that pushes the final head's top-1 probability and
/// entropy where each step committed onto `out`.
pub struct Recorder<'a> {
    pub out: &'a mut Vec<Verified>,
}

impl Proposer for Recorder<'_> {
    fn propose(&mut self, _req: &DraftRequest) -> Drafts {
        Drafts::none()
    }

    fn observe(&mut self, v: &Verdict) {
        self.out.push(verified(v.logits));
    }

    fn is_plain(&self) -> bool {
        true
    }
}

/// The drafter's features of a committed position: the final head's top-1
/// probability and entropy over its logits `row`.
pub fn verified(row: &[f32]) -> Verified {
    let (p1, ent) = sampling::top1_and_entropy(row);
    Verified {
        top1_prob: p1,
        entropy: ent,
    }
}
