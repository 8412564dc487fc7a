//! Offline evaluation of drafting: replaying decoding of a sequence the
//! model produced greedily, with any proposer and a verify cost model, and
//! the prompt-lookup baseline that proposers are compared against.

use serde::{Deserialize, Serialize};

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
}
