//! A cross-request continuation cache (after SuffixDecoding, Oliaro et
//! al., arXiv 2411.04975): the token ids of recent requests (prompt and
//! output), indexed so that the longest earlier match of a sequence's
//! suffix, and what followed it, are found in microseconds. It pays where
//! traffic repeats (the same prompt again, templates, agents' loops); on
//! fresh prose it rarely matches, and its own acceptance record says so.
//!
//! Structure (an LZ77-style hash chain): every stored position whose last
//! [`ORDER`] tokens form an n-gram is linked to the previous position with
//! the same n-gram; a map holds each n-gram's newest position. A lookup
//! walks the chain from the newest match backwards, at most
//! [`MAX_CANDIDATES`] steps, and measures each candidate's true match
//! length on the tokens (a hash collision matches nothing).
//!
//! Memory is bounded by a token budget: stored tokens never exceed it, and
//! the index holds at most one link and one map entry per stored token, so
//! [`SuffixCache::bytes`] stays under [`MAX_BYTES_PER_TOKEN`] per budgeted
//! token. Eviction drops the oldest sequence first; links into it from
//! newer sequences go stale and lookups stop at them.
//!
//! The cache also keeps, per match-length class, how often its drafts were
//! accepted (a per-draft rate, shared by every sequence), which is what a
//! proposer prices its drafts by (`proposer::suffix`).

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Mutex;

/// Tokens of the n-gram a lookup starts from: shorter matches are not
/// indexed. Set by hand: 4 GPT-2 tokens are about three words.
pub const ORDER: usize = 4;

/// Chain steps a lookup walks at most (the newest matches first).
pub const MAX_CANDIDATES: usize = 8;

/// Longest match measured: a match this long counts as the longest class.
const MAX_MATCH: usize = 64;

/// Upper bound of [`SuffixCache::bytes`] per token of the budget: 4 bytes
/// of token, 16 of chain link, and the newest-position map (at most one
/// 24-byte entry per token, at a load of 1/2 after growth, plus control
/// bytes) with room for the per-sequence headers.
pub const MAX_BYTES_PER_TOKEN: usize = 96;

/// Fixed overhead a cache may hold whatever its budget (the struct, the
/// empty maps, the acceptance record).
pub const FIXED_BYTES: usize = 4096;

/// Match-length classes of the acceptance record: `ORDER..8`, `8..16`,
/// `16..32`, `32..`.
const LENGTH_CLASSES: usize = 4;

/// Acceptance is recorded apart for greedy drafts and sampled ones.
const RULES: usize = 2;

/// Prior of the per-draft acceptance rate, as pseudo-trials: a class starts
/// at its [`PRIOR_RATE`] and follows its own record after a few dozen
/// drafts.
const PRIOR_TRIALS: f64 = 8.0;

/// The prior per-draft acceptance rate by match-length class. Set by hand:
/// a long match is likely a repeat of the same text, a short one a common
/// phrase; optimistic enough that a long match outbids the tree drafter
/// before the record has any drafts to go by.
const PRIOR_RATE: [f64; LENGTH_CLASSES] = [0.3, 0.5, 0.7, 0.9];

/// Past this many trials a class's record is halved, so it follows a
/// change of traffic.
const RECORD_HORIZON: f64 = 4096.0;

/// A position in a stored sequence: the n-gram ending at `end`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Loc {
    seq: u64,
    end: u32,
}

/// No earlier occurrence.
const NONE: Loc = Loc {
    seq: u64::MAX,
    end: 0,
};

/// One stored sequence: its tokens, and for each indexed position (ends
/// `ORDER - 1 ..= len - 2`, each with a continuation) the previous
/// position with the same n-gram.
struct Stored {
    tokens: Box<[u32]>,
    prev: Box<[Loc]>,
}

/// The n-gram keys are already mixed: the map hashes them as they are.
#[derive(Default)]
struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 << 8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, k: u64) {
        self.0 = k;
    }
}

type Heads = HashMap<u64, Loc, BuildHasherDefault<KeyHasher>>;

/// The key of an n-gram (a multiplicative fold, then splitmix64's
/// finaliser, so every bit of the key depends on every token).
fn key(ngram: &[u32]) -> u64 {
    let mut h = 0x9e37_79b9_7f4a_7c15u64;
    for &t in ngram {
        h = (h ^ u64::from(t)).wrapping_mul(0x1000_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

#[derive(Default)]
struct Inner {
    seqs: VecDeque<Stored>,
    /// Id of `seqs[0]`; ids rise by one per stored sequence.
    first_id: u64,
    tokens: usize,
    heads: Heads,
    /// Per (rule, length class): trials and accepted drafts.
    record: [[(f64, f64); LENGTH_CLASSES]; RULES],
    totals: Totals,
}

/// The cache's drafts verified and accepted since it started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    pub verified: u64,
    pub accepted: u64,
}

/// The continuation found for a sequence's suffix.
#[derive(Clone, Debug, PartialEq)]
pub struct Continuation {
    /// What followed the longest match (the newest of equally long ones).
    pub tokens: Vec<u32>,
    /// Tokens of the sequence's suffix the match covers (`ORDER..`).
    pub match_len: usize,
    /// `support[i]`: candidates whose continuation begins with
    /// `tokens[..=i]`; `candidates`: how many matched at all.
    pub support: Vec<u32>,
    pub candidates: u32,
}

/// Which acceptance record a draft belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DraftClass {
    sampled: bool,
    length: usize,
}

impl Continuation {
    /// The record its drafts count in: greedy or sampled, by match length.
    pub fn class(&self, sampled: bool) -> DraftClass {
        let length = [8, 16, 32]
            .iter()
            .take_while(|&&l| self.match_len >= l)
            .count();
        DraftClass { sampled, length }
    }
}

/// The cache, shared by every sequence of a server (one lock; a lookup or
/// an insert holds it for microseconds).
pub struct SuffixCache {
    budget: usize,
    inner: Mutex<Inner>,
}

impl SuffixCache {
    /// A cache of at most `budget` tokens (0: stores nothing, finds nothing).
    pub fn new(budget: usize) -> SuffixCache {
        SuffixCache {
            budget,
            inner: Mutex::new(Inner::default()),
        }
    }

    pub fn budget(&self) -> usize {
        self.budget
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic elsewhere cannot leave the index half-written in a way
        // that breaks lookups (they check every token), so go on.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stores `tokens` (a request's prompt and output) as the newest
    /// sequence, evicting the oldest until it fits; a sequence longer than
    /// the budget keeps its last `budget` tokens.
    pub fn insert(&self, tokens: &[u32]) {
        let tokens = &tokens[tokens.len().saturating_sub(self.budget)..];
        if tokens.len() <= ORDER {
            return;
        }
        let mut g = self.lock();
        while g.tokens + tokens.len() > self.budget {
            g.evict_oldest();
        }
        g.push(tokens);
    }

    /// Up to `max` tokens that followed the longest earlier match of the
    /// suffix of `context` (at least [`ORDER`] tokens long); None when
    /// nothing matches.
    pub fn lookup(&self, context: &[u32], max: usize) -> Option<Continuation> {
        if context.len() < ORDER || max == 0 || self.budget == 0 {
            return None;
        }
        self.lock().lookup(context, max)
    }

    /// The per-draft acceptance rate of drafts of `class` so far (prior
    /// [`PRIOR_RATE`]).
    pub fn acceptance(&self, class: DraftClass) -> f64 {
        let (trials, accepted) = self.lock().record[usize::from(class.sampled)][class.length];
        (accepted + PRIOR_RATE[class.length] * PRIOR_TRIALS) / (trials + PRIOR_TRIALS)
    }

    /// Records a verify step of `verified` drafts of `class`, `accepted`
    /// of them accepted: each accepted draft is a success, and the first
    /// rejected one (if any) a failure.
    pub fn record(&self, class: DraftClass, verified: usize, accepted: usize) {
        if verified == 0 {
            return;
        }
        let mut g = self.lock();
        g.totals.verified += verified as u64;
        g.totals.accepted += accepted as u64;
        let r = &mut g.record[usize::from(class.sampled)][class.length];
        r.0 += (accepted + usize::from(accepted < verified)) as f64;
        r.1 += accepted as f64;
        if r.0 > RECORD_HORIZON {
            *r = (r.0 / 2.0, r.1 / 2.0);
        }
    }

    /// The cache's drafts verified and accepted so far.
    pub fn totals(&self) -> Totals {
        self.lock().totals
    }

    /// Tokens stored now.
    pub fn tokens(&self) -> usize {
        self.lock().tokens
    }

    /// Sequences stored now.
    pub fn sequences(&self) -> usize {
        self.lock().seqs.len()
    }

    /// Bytes the cache holds, by the capacities of its buffers.
    pub fn bytes(&self) -> usize {
        let g = self.lock();
        let seqs: usize = g
            .seqs
            .iter()
            .map(|s| s.tokens.len() * 4 + s.prev.len() * std::mem::size_of::<Loc>())
            .sum();
        let entry = std::mem::size_of::<(u64, Loc)>() + 1;
        std::mem::size_of::<Self>()
            + seqs
            + g.seqs.capacity() * std::mem::size_of::<Stored>()
            + g.heads.capacity() * entry
    }
}

impl std::fmt::Debug for SuffixCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SuffixCache")
            .field("budget", &self.budget)
            .field("tokens", &self.tokens())
            .field("sequences", &self.sequences())
            .finish()
    }
}

impl Inner {
    fn stored(&self, loc: Loc) -> Option<&Stored> {
        let i = loc.seq.checked_sub(self.first_id)?;
        self.seqs.get(usize::try_from(i).ok()?)
    }

    fn push(&mut self, tokens: &[u32]) {
        let id = self.first_id + self.seqs.len() as u64;
        let ends = ORDER - 1..tokens.len() - 1;
        let prev = ends
            .map(|end| {
                let loc = Loc {
                    seq: id,
                    end: end as u32,
                };
                let k = key(&tokens[end + 1 - ORDER..=end]);
                self.heads.insert(k, loc).unwrap_or(NONE)
            })
            .collect();
        self.tokens += tokens.len();
        self.seqs.push_back(Stored {
            tokens: tokens.into(),
            prev,
        });
    }

    /// Drops the oldest sequence and every map entry that points into it
    /// (an n-gram's newest position there means it occurs nowhere newer).
    fn evict_oldest(&mut self) {
        let Some(s) = self.seqs.pop_front() else {
            return;
        };
        let id = self.first_id;
        self.first_id += 1;
        self.tokens -= s.tokens.len();
        for end in ORDER - 1..s.tokens.len() - 1 {
            let k = key(&s.tokens[end + 1 - ORDER..=end]);
            if self.heads.get(&k).is_some_and(|l| l.seq == id) {
                self.heads.remove(&k);
            }
        }
        if self.seqs.is_empty() {
            self.heads = Heads::default();
        }
    }

    fn lookup(&self, context: &[u32], max: usize) -> Option<Continuation> {
        let k = key(&context[context.len() - ORDER..]);
        let mut loc = *self.heads.get(&k)?;
        let mut found: Vec<(usize, &[u32])> = Vec::new();
        for _ in 0..MAX_CANDIDATES {
            let Some(s) = self.stored(loc) else { break };
            let end = loc.end as usize;
            let m = match_len(&s.tokens[..=end], context);
            if m >= ORDER {
                let cont = &s.tokens[end + 1..];
                found.push((m, &cont[..cont.len().min(max)]));
            }
            loc = s.prev[end + 1 - ORDER];
        }
        // The longest match; the newest of equally long ones.
        let best = found.iter().enumerate().max_by_key(|(i, f)| (f.0, !i))?.1;
        let tokens = best.1.to_vec();
        let support = (0..tokens.len())
            .map(|i| {
                found
                    .iter()
                    .filter(|f| f.1.starts_with(&tokens[..=i]))
                    .count() as u32
            })
            .collect();
        Some(Continuation {
            tokens,
            match_len: best.0,
            support,
            candidates: found.len() as u32,
        })
    }
}

/// How many tokens `a` and `b` share at their ends (at most [`MAX_MATCH`]).
fn match_len(a: &[u32], b: &[u32]) -> usize {
    a.iter()
        .rev()
        .zip(b.iter().rev())
        .take(MAX_MATCH)
        .take_while(|(x, y)| x == y)
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seq(from: u32, n: u32) -> Vec<u32> {
        (from..from + n).collect()
    }

    #[test]
    fn a_stored_sequence_continues_its_own_prefix() {
        let c = SuffixCache::new(1000);
        c.insert(&[1, 2, 3, 4, 5, 6, 7, 8]);
        let got = c.lookup(&[9, 9, 2, 3, 4, 5], 2).unwrap();
        assert_eq!(got.tokens, vec![6, 7]);
        assert_eq!(got.match_len, 4);
        assert_eq!((got.support, got.candidates), (vec![1, 1], 1));
    }

    #[test]
    fn the_longest_match_wins_and_support_counts_agreeing_candidates() {
        let c = SuffixCache::new(1000);
        c.insert(&[7, 1, 2, 3, 4, 50, 51]);
        c.insert(&[8, 1, 2, 3, 4, 60, 61]);
        c.insert(&[9, 1, 2, 3, 4, 60, 62]);
        // Context ends in 8 1 2 3 4: the second sequence matches 5 tokens.
        let got = c.lookup(&[8, 1, 2, 3, 4], 3).unwrap();
        assert_eq!(got.tokens, vec![60, 61]);
        assert_eq!(got.match_len, 5);
        assert_eq!(got.support, vec![2, 1]);
        assert_eq!(got.candidates, 3);
        // Equally long matches: the newest.
        assert_eq!(c.lookup(&[0, 1, 2, 3, 4], 1).unwrap().tokens, vec![60]);
    }

    #[test]
    fn a_suffix_shorter_than_the_order_or_unseen_finds_nothing() {
        let c = SuffixCache::new(1000);
        c.insert(&seq(0, 20));
        assert_eq!(c.lookup(&[1, 2, 3], 4), None);
        assert_eq!(c.lookup(&[5, 4, 3, 2], 4), None);
        assert_eq!(SuffixCache::new(0).lookup(&seq(0, 5), 4), None);
    }

    #[test]
    fn memory_stays_bounded_under_many_inserts() {
        let budget = 5_000;
        let c = SuffixCache::new(budget);
        let mut peak = 0;
        for i in 0..2_000u32 {
            // Long and short sequences, fresh n-grams and repeated ones.
            let n = 5 + (i * 37) % 300;
            c.insert(&seq((i % 7) * 1_000 + i * 3, n));
            assert!(c.tokens() <= budget, "{} tokens stored", c.tokens());
            peak = peak.max(c.bytes());
        }
        let bound = budget * MAX_BYTES_PER_TOKEN + FIXED_BYTES;
        assert!(peak <= bound, "{peak} bytes held, bound {bound}");
        assert!(
            c.tokens() > budget / 2,
            "the cache keeps most of its budget"
        );
    }

    #[test]
    fn eviction_drops_the_oldest_sequence_first() {
        let c = SuffixCache::new(30);
        c.insert(&seq(100, 10));
        c.insert(&seq(200, 10));
        c.insert(&seq(300, 10));
        assert!(c.lookup(&seq(100, 5), 1).is_some());
        c.insert(&seq(400, 10));
        assert_eq!(c.sequences(), 3);
        assert_eq!(c.lookup(&seq(100, 5), 1), None, "the oldest is gone");
        for from in [200, 300, 400] {
            let got = c.lookup(&seq(from, 5), 1).unwrap();
            assert_eq!(got.tokens, vec![from + 5]);
        }
    }

    #[test]
    fn links_into_an_evicted_sequence_are_never_followed() {
        let c = SuffixCache::new(20);
        c.insert(&[1, 2, 3, 4, 10, 0, 0, 0, 0, 0]);
        c.insert(&[1, 2, 3, 4, 20, 0, 0, 0, 0, 0]);
        c.insert(&[1, 2, 3, 4, 30, 0, 0, 0, 0, 0]);
        // The first is evicted; the chain from the newest reaches the second only.
        let got = c.lookup(&[1, 2, 3, 4], 1).unwrap();
        assert_eq!((got.tokens, got.candidates), (vec![30], 2));
    }

    #[test]
    fn a_sequence_longer_than_the_budget_keeps_its_tail() {
        let c = SuffixCache::new(10);
        c.insert(&seq(0, 100));
        assert_eq!(c.tokens(), 10);
        assert_eq!(c.lookup(&seq(90, 4), 1).unwrap().tokens, vec![94]);
        assert_eq!(c.lookup(&seq(10, 4), 1), None);
    }

    #[test]
    fn the_acceptance_record_moves_from_its_prior_to_what_was_accepted() {
        let c = SuffixCache::new(100);
        c.insert(&seq(0, 20));
        let class = c.lookup(&seq(0, 4), 1).unwrap().class(false);
        assert!((c.acceptance(class) - PRIOR_RATE[0]).abs() < 1e-9);
        for _ in 0..100 {
            c.record(class, 4, 0); // one failure each
        }
        assert!(c.acceptance(class) < 0.05, "{}", c.acceptance(class));
        let sampled = DraftClass {
            sampled: true,
            ..class
        };
        assert!((c.acceptance(sampled) - PRIOR_RATE[0]).abs() < 1e-9);
        assert_eq!(
            c.totals(),
            Totals {
                verified: 400,
                accepted: 0
            }
        );
    }
}
