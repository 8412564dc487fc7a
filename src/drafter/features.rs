//! Draft-time features: only what is cheap to compute from the token context
//! and means the same for the 1st and the k-th drafted token.
//!
//! Candidates come from three sources, each a "pointer" class of the tree:
//! the model's most frequent next token after the last two tokens
//! (`trigram`) and after the last token (`bigram`), tables learned from the
//! model's own predictions; and the token that followed the longest earlier
//! match of the context's suffix (`suffix`, prompt lookup). The features say
//! how much each source deserves trust.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

/// (next token, share of the model's predictions it had, count).
pub type Entry = (u32, f32, u32);

/// Next-token tables learned from the model's own greedy predictions.
#[derive(Serialize, Deserialize, Default, Clone, Debug)]
pub struct Tables {
    pub bigram: HashMap<u32, Entry>,
    pub trigram: HashMap<u64, Entry>,
}

pub fn tri_key(a: u32, b: u32) -> u64 {
    ((a as u64) << 32) | b as u64
}

impl Tables {
    /// Builds the tables from (prev, last, model's next) triples; trigram
    /// entries seen fewer than `min_count` times are dropped.
    pub fn build(triples: impl Iterator<Item = (Option<u32>, u32, u32)>, min_count: u32) -> Tables {
        let mut bi: HashMap<u32, HashMap<u32, u32>> = HashMap::new();
        let mut tri: HashMap<u64, HashMap<u32, u32>> = HashMap::new();
        for (prev, last, next) in triples {
            *bi.entry(last).or_default().entry(next).or_default() += 1;
            if let Some(p) = prev {
                *tri.entry(tri_key(p, last))
                    .or_default()
                    .entry(next)
                    .or_default() += 1;
            }
        }
        fn top(m: HashMap<u32, u32>) -> Entry {
            let total: u32 = m.values().sum();
            let (t, c) = m
                .into_iter()
                .max_by_key(|(t, c)| (*c, std::cmp::Reverse(*t)))
                .expect("non-empty");
            (t, c as f32 / total as f32, total)
        }
        Tables {
            bigram: bi.into_iter().map(|(k, m)| (k, top(m))).collect(),
            trigram: tri
                .into_iter()
                .map(|(k, m)| (k, top(m)))
                .filter(|(_, e)| e.2 >= min_count)
                .collect(),
        }
    }
}

/// What the decoder knows about the last verified position.
#[derive(Clone, Copy, Debug, Default)]
pub struct Verified {
    /// Probability of the model's top-1 token there.
    pub top1_prob: f32,
    /// Entropy (nats) of the model's distribution there.
    pub entropy: f32,
}

/// The candidate tokens of each pointer source (None when absent).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Candidates {
    pub trigram: Option<u32>,
    pub bigram: Option<u32>,
    pub suffix: Option<u32>,
    pub context: Option<u32>,
}

pub const FEATURE_NAMES: &[&str] = &[
    "last_class",
    "last_word_start",
    "bi_share",
    "bi_count",
    "bi_class",
    "tri_share",
    "tri_count",
    "tri_class",
    "suffix_len",
    "suffix_class",
    "agree_suffix_bi",
    "ctx_share",
    "verified_top1",
    "verified_entropy",
];

pub const N_FEATURES: usize = 14;

/// Feature families, for the ablation (`train-drafter --drafter-ablation`)
/// and for fitting without one (`--drafter-without`): each family's name
/// and its columns.
pub const FAMILIES: &[(&str, &[usize])] = &[
    ("last", &[0, 1]),
    ("tables", &[2, 3, 4, 5, 6, 7]),
    ("suffix", &[8, 9, 10]),
    ("context", &[11]),
    ("verified", &[12, 13]),
];

/// Longest match of the context's suffix earlier in the context: (length,
/// the token that followed it). Capped at 32 tokens.
pub fn suffix_match(ctx: &[u32]) -> (usize, Option<u32>) {
    let n = ctx.len();
    if n < 2 {
        return (0, None);
    }
    let last = ctx[n - 1];
    let mut best = (0usize, None);
    for end in (0..n - 1).rev() {
        if ctx[end] != last {
            continue;
        }
        let mut len = 1;
        while len < 32 && len <= end && ctx[end - len] == ctx[n - 1 - len] {
            len += 1;
        }
        if len > best.0 {
            best = (len, Some(ctx[end + 1]));
            if len == 32 {
                break;
            }
        }
    }
    best
}

/// Successor statistics of the last token inside the context: (how often
/// the last token occurred before with a successor, the top successor's
/// share, the top successor).
fn context_successor(ctx: &[u32]) -> (usize, f32, Option<u32>) {
    let n = ctx.len();
    if n < 2 {
        return (0, 0.0, None);
    }
    let last = ctx[n - 1];
    let mut counts: Vec<(u32, u32)> = Vec::new();
    for i in 0..n - 1 {
        if ctx[i] == last {
            let next = ctx[i + 1];
            match counts.iter_mut().find(|(t, _)| *t == next) {
                Some(e) => e.1 += 1,
                None => counts.push((next, 1)),
            }
        }
    }
    let total: u32 = counts.iter().map(|c| c.1).sum();
    match counts.iter().max_by_key(|c| c.1) {
        Some(&(t, c)) => (total as usize, c as f32 / total as f32, Some(t)),
        None => (0, 0.0, None),
    }
}

/// What the feature row of the token after `ctx` is computed from.
pub struct FeatureInput<'a> {
    pub ctx: &'a [u32],
    pub verified: Verified,
    pub tables: &'a Tables,
    /// Class index of each token (or `n_token_classes` when not a class).
    pub class_of: &'a dyn Fn(u32) -> usize,
    pub word_start: &'a [bool],
}

/// Computes the feature row for predicting the token after `ctx`.
pub fn features(inp: &FeatureInput) -> (Vec<f32>, Candidates) {
    let ctx = inp.ctx;
    let n = ctx.len();
    let last = ctx[n - 1];
    let prev = (n >= 2).then(|| ctx[n - 2]);
    let ws = |t: u32| inp.word_start.get(t as usize).copied().unwrap_or(false);
    let bi = inp.tables.bigram.get(&last).copied();
    let tri = prev.and_then(|p| inp.tables.trigram.get(&tri_key(p, last)).copied());
    let (suf_len, suf) = suffix_match(ctx);
    let (_, ctx_share, ctx_next) = context_successor(ctx);
    let cls = |t: Option<u32>| t.map_or(-1.0, |t| (inp.class_of)(t) as f32);
    let same = |a: Option<u32>, b: Option<u32>| f32::from(a.is_some() && a == b);
    let cand = Candidates {
        trigram: tri.map(|e| e.0),
        bigram: bi.map(|e| e.0),
        suffix: suf,
        context: ctx_next,
    };
    // Dropped after measuring (bench/drafter-compare.md): the chain depth,
    // the position inside the word, the in-context successor count and
    // three source-agreement flags held 1.8% of the split gain, and the
    // model without them was as accurate (0.8085 vs 0.8097) with the same
    // precision/coverage curve.
    let row = vec![
        (inp.class_of)(last) as f32,
        f32::from(ws(last)),
        bi.map_or(0.0, |e| e.1),
        bi.map_or(0.0, |e| (e.2 as f32).ln_1p()),
        cls(cand.bigram),
        tri.map_or(0.0, |e| e.1),
        tri.map_or(0.0, |e| (e.2 as f32).ln_1p()),
        cls(cand.trigram),
        suf_len as f32,
        cls(suf),
        same(suf, cand.bigram),
        ctx_share,
        inp.verified.top1_prob,
        inp.verified.entropy,
    ];
    debug_assert_eq!(row.len(), N_FEATURES);
    (row, cand)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_feature_families_cover_every_column_once() {
        let mut seen = vec![0; N_FEATURES];
        for (_, cols) in FAMILIES {
            cols.iter().for_each(|&c| seen[c] += 1);
        }
        assert_eq!(seen, vec![1; N_FEATURES]);
        assert_eq!(FEATURE_NAMES.len(), N_FEATURES);
    }

    #[test]
    fn suffix_match_finds_the_longest_earlier_occurrence() {
        // ... 1 2 3 9 ... 1 2 3 7 ... 2 3 -> longest match "1 2 3"? suffix is [1,2,3]
        let ctx = [5, 1, 2, 3, 9, 4, 2, 3, 7, 1, 2, 3];
        assert_eq!(suffix_match(&ctx), (3, Some(9)));
        assert_eq!(suffix_match(&[1, 2]), (0, None));
    }

    #[test]
    fn tables_keep_the_models_most_frequent_successor() {
        let t = Tables::build(
            [
                (None, 1, 2),
                (Some(0), 1, 2),
                (Some(0), 1, 3),
                (Some(0), 1, 2),
            ]
            .into_iter(),
            2,
        );
        assert_eq!(t.bigram[&1].0, 2);
        assert!((t.bigram[&1].1 - 0.75).abs() < 1e-6);
        assert_eq!(t.trigram[&tri_key(0, 1)], (2, 2.0 / 3.0, 3));
    }
}
