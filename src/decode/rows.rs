//! The rows of one step and the acceptance rule. A sequence puts a prompt
//! chunk or `[pending, d1..dk]` into the next forward ([`Rows`]); after it,
//! [`accept`] walks the verified rows as far as the model's own tokens
//! carry it: the same tokens plain decoding yields, at least one per step.

use crate::model::forward::Tree;

/// The rows one sequence puts into the next forward: the next chunk of its
/// prompt (prefill), or `[pending, d1..dk]` (a verify step; k = 0 is a
/// plain step). Built by [`Generator::next_rows`], consumed by
/// [`Generator::commit`] with the final head's logits of [`Rows::logits`].
///
/// [`Generator::next_rows`]: super::Generator::next_rows
/// [`Generator::commit`]: super::Generator::commit
#[derive(Clone, Debug)]
pub struct Rows {
    pub(super) tokens: Vec<u32>,
    pub(super) pos: usize,
    pub(super) kind: RowKind,
}

#[derive(Clone, Debug)]
pub(super) enum RowKind {
    /// A prompt chunk; logits of every row when echo logprobs are asked.
    Prefill { echo: bool },
    /// `[pending, drafts..]` as a draft tree (a chain unless the drafter
    /// branched): the drafter's probability of each draft given its
    /// parent, and its first token when drafting did not pay (to keep its
    /// estimate).
    Verify {
        probs: Vec<f32>,
        shadow: Option<u32>,
        tree: Tree,
    },
}

impl Rows {
    /// The tokens to embed.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Absolute position of the first row.
    pub fn pos(&self) -> usize {
        self.pos
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    pub fn is_prefill(&self) -> bool {
        matches!(self.kind, RowKind::Prefill { .. })
    }

    /// The rows whose final-head logits [`Generator::commit`] needs.
    ///
    /// [`Generator::commit`]: super::Generator::commit
    pub fn logits(&self) -> std::ops::Range<usize> {
        match self.kind {
            RowKind::Prefill { echo: false } => 0..0,
            _ => 0..self.tokens.len(),
        }
    }

    /// The draft tree, when the drafts branch (None for a chain).
    pub fn tree(&self) -> Option<&Tree> {
        match &self.kind {
            RowKind::Verify { tree, .. } if !tree.is_chain() => Some(tree),
            _ => None,
        }
    }

    /// The drafts (empty for a prefill chunk or a plain step).
    pub fn drafts(&self) -> &[u32] {
        match self.kind {
            RowKind::Prefill { .. } => &[],
            RowKind::Verify { .. } => &self.tokens[1..],
        }
    }

    /// The expected number of tokens each draft adds: the drafter's
    /// probability that it and every draft before it are accepted.
    pub fn draft_gains(&self) -> Vec<f32> {
        let RowKind::Verify { probs, tree, .. } = &self.kind else {
            return vec![];
        };
        super::proposer::path_gains(probs, tree)
    }

    /// Keeps the first `n` rows (at least one): a shorter prompt chunk, or
    /// fewer drafts (the batch had no room for the rest).
    pub fn keep_rows(&mut self, n: usize) {
        let n = n.max(1);
        if let RowKind::Verify { probs, tree, .. } = &mut self.kind {
            probs.truncate(n - 1);
            tree.truncate(n);
        }
        self.tokens.truncate(n);
    }
}

/// What a verify step drafted, for the counters.
#[derive(Clone, Copy)]
pub(super) enum Drafted {
    /// A chain of n drafts (some may have been dropped by the exits).
    Chain(usize),
    /// The tree of the rows.
    Tree,
    /// n drafts by an early exit (LayerSkip).
    ByExit(usize),
}

/// The acceptance rule over a draft tree (a chain is a tree). Rows are
/// `[pending, drafts..]`, shaped by `tree`; `choose(row)` commits the
/// model's token for the position after `row` and says whether generation
/// must stop there. From the root, the walk descends into the child that
/// carries the model's token; where none does, that token ends the walk in
/// the child's place. Returns the rows walked (the root first) and the
/// committed tokens, one per row walked: at least one.
pub fn accept(
    tree: &Tree,
    rows: &[u32],
    mut choose: impl FnMut(usize) -> (u32, bool),
) -> (Vec<usize>, Vec<u32>) {
    let (mut path, mut out) = (Vec::new(), Vec::new());
    let mut row = 0;
    loop {
        let (f, stop) = choose(row);
        path.push(row);
        out.push(f);
        if stop {
            break;
        }
        match tree.children(row).find(|&c| rows.get(c) == Some(&f)) {
            Some(c) => row = c,
            None => break,
        }
    }
    (path, out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampling::{self, SamplingParams};
    use std::collections::HashMap;

    /// A toy model over 3 tokens: p(next | last).
    fn toy(last: u32) -> [f32; 3] {
        match last {
            0 => [0.5, 0.3, 0.2],
            1 => [0.1, 0.6, 0.3],
            _ => [0.3, 0.3, 0.4],
        }
    }

    fn logits(last: u32) -> Vec<f32> {
        toy(last).iter().map(|p| p.ln()).collect()
    }

    /// Decodes 3 tokens after token 2 with drafts [0, 0] at every step,
    /// using `rule` to accept drafts.
    fn spec_decode(seed: u64, rule: &dyn Fn(u32, u32, &[f32]) -> bool) -> Vec<u32> {
        let p = SamplingParams {
            temperature: 1.0,
            seed,
            ..Default::default()
        };
        let mut seq = vec![2u32];
        while seq.len() < 4 {
            let kept = (4 - seq.len()).min(3);
            let rows = [*seq.last().unwrap(), 0, 0];
            let mut ctx = seq.clone();
            let (_, got) = accept(&Tree::chain(kept), &rows[..kept], |i| {
                let l = logits(*ctx.last().unwrap());
                let sample = sampling::choose(&l, &p, 0, ctx.len());
                let d = rows[..kept].get(i + 1).copied().unwrap_or(u32::MAX);
                let f = if rule(d, sample, &l) { d } else { sample };
                ctx.push(f);
                (f, ctx.len() >= 4)
            });
            seq.extend(got);
        }
        seq[1..4].to_vec()
    }

    fn exact() -> HashMap<Vec<u32>, f64> {
        let mut m = HashMap::new();
        for a in 0..3u32 {
            for b in 0..3u32 {
                for c in 0..3u32 {
                    let pr = toy(2)[a as usize] as f64
                        * toy(a)[b as usize] as f64
                        * toy(b)[c as usize] as f64;
                    m.insert(vec![a, b, c], pr);
                }
            }
        }
        m
    }

    fn max_deviation(rule: &dyn Fn(u32, u32, &[f32]) -> bool) -> f64 {
        let n = 30_000;
        let mut counts: HashMap<Vec<u32>, usize> = HashMap::new();
        for seed in 0..n {
            *counts.entry(spec_decode(seed, rule)).or_default() += 1;
        }
        exact()
            .iter()
            .map(|(k, p)| (counts.get(k).copied().unwrap_or(0) as f64 / n as f64 - p).abs())
            .fold(0.0, f64::max)
    }

    #[test]
    fn sample_then_compare_matches_plain_sampling_by_enumeration() {
        // Accept a draft iff it equals the keyed sample at its position.
        let dev = max_deviation(&|d, s, _| d == s);
        assert!(dev < 0.012, "max deviation {dev}");
    }

    #[test]
    fn a_broken_acceptance_rule_is_caught() {
        // Accepting any draft the model gives at least 20% is not sampling.
        let dev = max_deviation(&|d, s, l| d == s || (d < 3 && l[d as usize].exp() >= 0.2));
        assert!(dev > 0.03, "max deviation {dev}");
    }

    #[test]
    fn accept_yields_at_least_one_token_and_stops_at_the_first_mismatch() {
        let tokens = |r: (Vec<usize>, Vec<u32>)| r.1;
        assert_eq!(
            tokens(accept(&Tree::chain(1), &[3], |_| (7, false))),
            vec![7]
        );
        let picks = [5u32, 6, 9, 1];
        let rows = [3, 5, 6, 8];
        let chain = Tree::chain(4);
        assert_eq!(
            tokens(accept(&chain, &rows, |i| (picks[i], false))),
            vec![5, 6, 9]
        );
        let two = Tree::chain(2);
        assert_eq!(
            tokens(accept(&two, &rows[..2], |i| (picks[i], false))),
            vec![5, 6]
        );
        assert_eq!(
            tokens(accept(&chain, &rows, |i| (picks[i], i == 0))),
            vec![5]
        );
    }

    #[test]
    fn accept_descends_into_the_child_that_carries_the_models_token() {
        // Root 3 with children 5 (row 1) and 7 (row 2); 7 has child 9 (row
        // 3), 5 has child 9 (row 4). The model says 7, then 9, then 4.
        let tree = Tree::from_parents(vec![0, 0, 0, 2, 1]).unwrap();
        let rows = [3, 5, 7, 9, 9];
        let picks = |r: usize| match r {
            0 => 7,
            2 => 9,
            _ => 4,
        };
        let (path, out) = accept(&tree, &rows, |r| (picks(r), false));
        assert_eq!(path, vec![0, 2, 3]);
        assert_eq!(out, vec![7, 9, 4]);
    }
}
