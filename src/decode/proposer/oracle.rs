//! The oracle: drafts the model's own continuation, known in advance (a
//! benchmark's ceiling: every draft is accepted until the text ends).

use super::{DraftRequest, Drafts, Proposer};

/// Drafts up to `k` tokens of `continuation`, the tokens plain decoding
/// generates after the prompt.
#[derive(Clone, Copy, Debug)]
pub struct Oracle<'m> {
    pub continuation: &'m [u32],
    pub k: usize,
}

impl Proposer for Oracle<'_> {
    fn propose(&mut self, req: &DraftRequest) -> Drafts {
        let k = self.k.min(req.room);
        if k == 0 {
            return Drafts::none();
        }
        let at = req.tokens.len() - req.prompt_len;
        let c = self
            .continuation
            .get(at..)
            .map_or(vec![], |c| c.iter().take(k).copied().collect());
        Drafts::chain(c, 1.0)
    }
}
