//! Prompt lookup: drafts what followed the last earlier match of the
//! text's suffix (no model, no training), priced by the sequence's running
//! acceptance rate.

use super::{AcceptRate, DraftRequest, Drafts, Proposer, Verdict};

/// Copies up to `k` tokens that followed the last match of the suffix.
#[derive(Clone, Copy, Debug)]
pub struct Lookup {
    pub k: usize,
    accept: AcceptRate,
}

impl Lookup {
    pub fn new(k: usize) -> Lookup {
        Lookup {
            k,
            accept: AcceptRate::default(),
        }
    }
}

impl Proposer for Lookup {
    fn propose(&mut self, req: &DraftRequest) -> Drafts {
        let k = self.k.min(req.room);
        if k == 0 {
            return Drafts::none();
        }
        let drafts = crate::drafter::prompt_lookup(req.tokens, k, 2);
        Drafts::chain(drafts, self.accept.get() as f32)
    }

    fn observe(&mut self, v: &Verdict) {
        self.accept.observe(v);
    }
}
