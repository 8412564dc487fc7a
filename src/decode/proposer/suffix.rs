//! The continuation-cache proposer: drafts what followed the longest
//! earlier match of the sequence's suffix in what this server saw before
//! (`decode::suffix_cache`), and otherwise what its fallback (the tree
//! drafter) drafts.
//!
//! Each step both are asked; the one whose drafts promise more accepted
//! tokens goes to the verifier. The cache's drafts are priced by the
//! cache's own acceptance record for matches of that length (shared by
//! every sequence, so fresh prose that matches by chance soon stops
//! drafting) and cut where the earlier candidates disagree or the path's
//! expected gain falls below the batch's `min_gain`.

use std::sync::Arc;

use super::{DraftRequest, Drafts, Proposer, Verdict};
use crate::decode::suffix_cache::{Continuation, DraftClass, SuffixCache};
use crate::drafter::DraftRule;

/// Drafts from a cache continuation at most (the batch's row budget and
/// `min_gain` usually cut sooner).
pub const MAX_CACHE_DRAFTS: usize = 16;

/// A chain stops where fewer than this share of the candidates that agreed
/// so far agree on the next token. Set by hand.
const MIN_AGREEMENT: f32 = 0.5;

/// The cache first, else `fallback`.
pub struct CacheOrFallback<'m> {
    cache: Arc<SuffixCache>,
    fallback: Box<dyn Proposer + 'm>,
    /// The class of the cache's drafts sent to the last verify step (None:
    /// the fallback's were).
    last: Option<DraftClass>,
}

impl<'m> CacheOrFallback<'m> {
    pub fn new(cache: Arc<SuffixCache>, fallback: Box<dyn Proposer + 'm>) -> Self {
        CacheOrFallback {
            cache,
            fallback,
            last: None,
        }
    }
}

impl Proposer for CacheOrFallback<'_> {
    fn propose(&mut self, req: &DraftRequest) -> Drafts {
        let fallback = self.fallback.propose(req);
        self.last = None;
        let max = req.room.min(MAX_CACHE_DRAFTS);
        let Some(found) = self.cache.lookup(req.tokens, max) else {
            return fallback;
        };
        let class = found.class(matches!(req.rule, DraftRule::Sample { .. }));
        let drafts = chain(&found, self.cache.acceptance(class) as f32, req.min_gain);
        if drafts.tokens.is_empty() || expected(&drafts) <= expected(&fallback) {
            return fallback;
        }
        self.last = Some(class);
        drafts
    }

    fn observe(&mut self, v: &Verdict) {
        let Some(class) = self.last.take() else {
            return self.fallback.observe(v);
        };
        self.cache.record(class, v.deepest, v.accepted);
        self.fallback.observe(&v.without_drafts());
    }

    fn rivals(&self) -> &[u32] {
        self.fallback.rivals()
    }
}

/// The chain of `found`'s tokens, each with probability `rate` given its
/// parent, while the candidates mostly agree and the path's gain is at
/// least `min_gain`.
fn chain(found: &Continuation, rate: f32, min_gain: f32) -> Drafts {
    let mut agreed = found.candidates;
    let mut gain = 1.0f32;
    let mut n = 0;
    for &s in &found.support {
        gain *= rate;
        if (s as f32) < MIN_AGREEMENT * agreed as f32 || gain < min_gain {
            break;
        }
        agreed = s;
        n += 1;
    }
    Drafts::chain(found.tokens[..n].to_vec(), rate)
}

/// Expected accepted drafts: the sum over drafts of their path
/// probabilities.
fn expected(d: &Drafts) -> f32 {
    super::path_gains(&d.probs, &d.tree).iter().sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::proposer::Plain;

    fn req(tokens: &[u32], min_gain: f32) -> DraftRequest<'_> {
        DraftRequest {
            tokens,
            prompt_len: 1,
            room: 8,
            min_gain,
            time_value: 1.0,
            branch: false,
            rule: DraftRule::Best,
        }
    }

    fn cache_with(seqs: &[&[u32]]) -> Arc<SuffixCache> {
        let c = Arc::new(SuffixCache::new(1000));
        seqs.iter().for_each(|s| c.insert(s));
        c
    }

    #[test]
    fn a_repeated_suffix_drafts_what_followed_it_before() {
        let c = cache_with(&[&[1, 2, 3, 4, 5, 6, 7]]);
        let mut p = CacheOrFallback::new(c, Box::new(Plain));
        let d = p.propose(&req(&[9, 2, 3, 4, 5], 0.0));
        assert_eq!(d.tokens, vec![6, 7]);
        // A 4-token match: the short class's prior rate.
        assert!(d.probs.iter().all(|&q| (q - 0.3).abs() < 1e-6));
    }

    #[test]
    fn candidates_that_disagree_cut_the_chain() {
        // The longest match goes on 5, 6, 7; all four candidates agree on
        // 5, only one of them on 6.
        let c = cache_with(&[
            &[0, 1, 2, 3, 4, 5, 6, 7],
            &[1, 2, 3, 4, 5, 8],
            &[1, 2, 3, 4, 5, 9],
            &[1, 2, 3, 4, 5, 10],
        ]);
        let mut p = CacheOrFallback::new(c, Box::new(Plain));
        assert_eq!(p.propose(&req(&[0, 1, 2, 3, 4], 0.0)).tokens, vec![5]);
    }

    #[test]
    fn drafts_below_the_batchs_min_gain_are_not_made() {
        let c = cache_with(&[&[1, 2, 3, 4, 5, 6, 7]]);
        let mut p = CacheOrFallback::new(c, Box::new(Plain));
        // Rate 0.3: paths of 0.3, 0.09; a floor of 0.2 keeps one.
        assert_eq!(p.propose(&req(&[1, 2, 3, 4], 0.2)).tokens, vec![5]);
        assert!(p.propose(&req(&[1, 2, 3, 4], 0.4)).tokens.is_empty());
    }

    #[test]
    fn rejected_drafts_lower_the_rate_until_the_cache_stops_drafting() {
        let c = cache_with(&[&[1, 2, 3, 4, 5, 6, 7]]);
        let mut p = CacheOrFallback::new(c.clone(), Box::new(Plain));
        let ctx = [1, 2, 3, 4];
        for _ in 0..50 {
            let d = p.propose(&req(&ctx, 0.1));
            if d.tokens.is_empty() {
                return;
            }
            p.observe(&Verdict {
                deepest: d.tokens.len(),
                accepted: 0,
                first: 0,
                shadow: None,
                logits: &[],
                features: &[],
                rows: 1 + d.tokens.len(),
                secs: None,
            });
        }
        panic!("still drafting after 50 rejected steps");
    }
}
