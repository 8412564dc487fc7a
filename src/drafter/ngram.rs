//! N-gram continuation tables over the whole vocabulary: for the last token
//! (bigram) and the last two tokens (trigram), the most frequent next
//! tokens of the train split's text with their shares. The gradient-boosted
//! trees name 64 frequent tokens and 4 pointers; at temperature > 0 the
//! model's sample is often none of them, and these tables spread the
//! trees' "none of mine" mass over the tokens that text continues with
//! (`Drafter::estimate`), so the Gumbel ranking sees more of the model's
//! distribution.
//!
//! Stored beside the drafter file in a small binary format: a header
//! (magic, version, vocabulary size, counts), then per context its key,
//! its count and up to [`TOP`] successors (a u16 token and a u16 share),
//! then an FNV-1a checksum. The builder keeps the most frequent trigram
//! contexts that fit in a byte budget; a loaded file over [`MAX_BYTES`] is
//! refused.

use std::collections::HashMap;
use std::path::Path;

use super::DrafterError;

/// Successors kept per context.
pub const TOP: usize = 8;
/// The largest table file this build loads (and the default budget).
pub const MAX_BYTES: usize = 8 << 20;
const MAGIC: &[u8; 4] = b"GSNG";
pub const FORMAT_VERSION: u32 = 1;
/// Header: magic, version, vocabulary size, bigram and trigram contexts.
const HEADER: usize = 4 + 4 * 4;
/// A context's fixed part: key u32, count u32, successors u8.
const CONTEXT: usize = 9;
const SUCCESSOR: usize = 4;
/// Trigram contexts seen fewer times are not stored (their shares are
/// noise; the bigram answers there).
pub const MIN_TRIGRAM_COUNT: u32 = 4;
/// Pseudo-count of the bigram in the blend: a trigram context seen c
/// times gets weight c / (c + BLEND) (Witten-Bell-like; set by hand).
const BLEND: f32 = 4.0;

/// One context's successors: its count in the text and (token, share).
#[derive(Clone, Debug, PartialEq)]
struct Successors {
    count: u32,
    next: Vec<(u32, f32)>,
}

/// Bigram and trigram continuation tables (see the module's notes).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Ngrams {
    vocab_size: usize,
    bigram: HashMap<u32, Successors>,
    trigram: HashMap<u32, Successors>,
}

/// Trigram context key (tokens below 2^16).
fn pair(a: u32, b: u32) -> u32 {
    (a << 16) | b
}

impl Ngrams {
    /// Counts the tables on `tokens` (each below `vocab_size` <= 65,536),
    /// keeping every bigram context and the most frequent trigram contexts
    /// (seen at least [`MIN_TRIGRAM_COUNT`] times) that fit in `max_bytes`;
    /// a budget the bigram table alone passes is an error.
    pub fn count(tokens: &[u32], vocab_size: usize, max_bytes: usize) -> Result<Ngrams, String> {
        if vocab_size > 1 << 16 {
            return Err(format!(
                "vocab_size {vocab_size} is over the n-gram tables' limit of 65536"
            ));
        }
        if let Some(t) = tokens.iter().find(|&&t| t as usize >= vocab_size) {
            return Err(format!(
                "token {t} is outside the vocabulary of {vocab_size}"
            ));
        }
        let bi: Vec<u64> = tokens
            .windows(2)
            .map(|w| (u64::from(w[0]) << 16) | u64::from(w[1]))
            .collect();
        let tri: Vec<u64> = tokens
            .windows(3)
            .map(|w| (u64::from(pair(w[0], w[1])) << 16) | u64::from(w[2]))
            .collect();
        let bigram = tally(bi, 1);
        let need = HEADER + 8 + size_of_map(&bigram);
        if need > max_bytes {
            return Err(format!(
                "the bigram table alone takes {need} bytes, over the budget of {max_bytes}"
            ));
        }
        let mut budget = max_bytes - need;
        let mut by_count: Vec<(u32, Successors)> =
            tally(tri, MIN_TRIGRAM_COUNT).into_iter().collect();
        by_count.sort_by_key(|(k, s)| (std::cmp::Reverse(s.count), *k));
        let mut trigram = HashMap::new();
        for (k, s) in by_count {
            let bytes = CONTEXT + SUCCESSOR * s.next.len();
            if bytes > budget {
                break;
            }
            budget -= bytes;
            trigram.insert(k, s);
        }
        Ok(Ngrams {
            vocab_size,
            bigram,
            trigram,
        })
    }

    /// Contexts stored: (bigram, trigram).
    pub fn contexts(&self) -> (usize, usize) {
        (self.bigram.len(), self.trigram.len())
    }

    /// The text's next tokens after `ctx` with their shares: the trigram's
    /// and the bigram's blended by how often the trigram context was seen.
    pub fn next(&self, ctx: &[u32]) -> Vec<(u32, f32)> {
        let n = ctx.len();
        let Some(&last) = ctx.last() else {
            return vec![];
        };
        let bi = self.bigram.get(&last);
        let tri = (n >= 2)
            .then(|| self.trigram.get(&pair(ctx[n - 2], last)))
            .flatten();
        let w = tri.map_or(0.0, |t| t.count as f32 / (t.count as f32 + BLEND));
        let mut out: Vec<(u32, f32)> = Vec::with_capacity(2 * TOP);
        let mut add = |t: u32, q: f32| match out.iter_mut().find(|m| m.0 == t) {
            Some(m) => m.1 += q,
            None => out.push((t, q)),
        };
        for &(t, q) in tri.map_or(&[][..], |s| &s.next) {
            add(t, w * q);
        }
        for &(t, q) in bi.map_or(&[][..], |s| &s.next) {
            add(t, (1.0 - w) * q);
        }
        out
    }
}

/// Successor tables from sorted-by-context keys `(context << 16) | next`,
/// contexts seen fewer than `min_count` times dropped.
fn tally(mut keys: Vec<u64>, min_count: u32) -> HashMap<u32, Successors> {
    keys.sort_unstable();
    let mut out = HashMap::new();
    let mut i = 0;
    while i < keys.len() {
        let ctx = (keys[i] >> 16) as u32;
        let mut runs: Vec<(u32, u32)> = Vec::new();
        while i < keys.len() && (keys[i] >> 16) as u32 == ctx {
            let next = (keys[i] & 0xffff) as u32;
            let start = i;
            while i < keys.len() && keys[i] == keys[start] {
                i += 1;
            }
            runs.push((next, (i - start) as u32));
        }
        let count: u32 = runs.iter().map(|r| r.1).sum();
        if count < min_count {
            continue;
        }
        runs.sort_by_key(|&(t, c)| (std::cmp::Reverse(c), t));
        runs.truncate(TOP);
        let next = runs
            .into_iter()
            .map(|(t, c)| (t, quantize(c as f32 / count as f32)))
            .collect();
        out.insert(ctx, Successors { count, next });
    }
    out
}

/// A share as stored (16 bits), so that counted and loaded tables agree.
fn quantize(p: f32) -> f32 {
    f32::from(to_u16(p)) / f32::from(u16::MAX)
}

fn to_u16(p: f32) -> u16 {
    (p.clamp(0.0, 1.0) * f32::from(u16::MAX)).round() as u16
}

fn size_of_map(m: &HashMap<u32, Successors>) -> usize {
    m.values().map(|s| CONTEXT + SUCCESSOR * s.next.len()).sum()
}

/// FNV-1a over `bytes` (the file's checksum; stable across builds).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf29ce484222325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100000001b3)
    })
}

impl Ngrams {
    /// The file's bytes (see the module's notes); contexts in key order so
    /// that equal tables write equal files.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER + 8 + size_of_map(&self.bigram));
        out.extend_from_slice(MAGIC);
        for x in [
            FORMAT_VERSION,
            self.vocab_size as u32,
            self.bigram.len() as u32,
            self.trigram.len() as u32,
        ] {
            out.extend_from_slice(&x.to_le_bytes());
        }
        for map in [&self.bigram, &self.trigram] {
            let mut keys: Vec<&u32> = map.keys().collect();
            keys.sort_unstable();
            for k in keys {
                let s = &map[k];
                out.extend_from_slice(&k.to_le_bytes());
                out.extend_from_slice(&s.count.to_le_bytes());
                out.push(s.next.len() as u8);
                for &(t, q) in &s.next {
                    out.extend_from_slice(&(t as u16).to_le_bytes());
                    out.extend_from_slice(&to_u16(q).to_le_bytes());
                }
            }
        }
        let sum = fnv1a(&out);
        out.extend_from_slice(&sum.to_le_bytes());
        out
    }

    /// Reads a table file's bytes for a model of `vocab_size`; the error
    /// says what is wrong (the caller names the file).
    pub fn from_bytes(bytes: &[u8], vocab_size: usize) -> Result<Ngrams, String> {
        if bytes.len() > MAX_BYTES {
            return Err(format!(
                "is {} bytes; the limit is {MAX_BYTES}",
                bytes.len()
            ));
        }
        if bytes.len() < HEADER + 8 || &bytes[..4] != MAGIC {
            return Err("is not an n-gram table (bad magic or too short)".into());
        }
        let (body, sum) = bytes.split_at(bytes.len() - 8);
        if fnv1a(body) != u64::from_le_bytes(sum.try_into().expect("8 bytes")) {
            return Err("is corrupt or truncated (checksum mismatch)".into());
        }
        let mut r = Reader { bytes: body, at: 4 };
        let version = r.u32()?;
        if version != FORMAT_VERSION {
            return Err(format!(
                "has format version {version}; this build reads version {FORMAT_VERSION}"
            ));
        }
        let found = r.u32()? as usize;
        if found != vocab_size {
            return Err(format!(
                "was counted for vocab_size {found}, the model has {vocab_size}"
            ));
        }
        let (n_bi, n_tri) = (r.u32()? as usize, r.u32()? as usize);
        let bigram = r.contexts(n_bi, vocab_size)?;
        let trigram = r.contexts(n_tri, vocab_size)?;
        if r.at != body.len() {
            return Err("has bytes after its last context".into());
        }
        Ok(Ngrams {
            vocab_size,
            bigram,
            trigram,
        })
    }

    /// Writes the table file atomically.
    pub fn save(&self, path: &Path) -> Result<(), DrafterError> {
        crate::atomic_file::write(path, &self.to_bytes()).map_err(|e| DrafterError::Ngrams {
            path: path.display().to_string(),
            msg: format!("cannot be written: {e}"),
        })
    }

    /// Loads and checks the table file at `path` for a model of `vocab_size`.
    pub fn load(path: &Path, vocab_size: usize) -> Result<Ngrams, DrafterError> {
        let p = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|e| DrafterError::Ngrams {
            path: p.clone(),
            msg: format!("cannot be read: {e}"),
        })?;
        Ngrams::from_bytes(&bytes, vocab_size).map_err(|msg| DrafterError::Ngrams { path: p, msg })
    }
}

/// A cursor over a table file's body; running past the end is an error.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], String> {
        let end = self.at + n;
        let b = self
            .bytes
            .get(self.at..end)
            .ok_or_else(|| format!("ends inside a context at byte {}", self.at))?;
        self.at = end;
        Ok(b)
    }

    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }

    fn u16(&mut self) -> Result<u16, String> {
        Ok(u16::from_le_bytes(
            self.take(2)?.try_into().expect("2 bytes"),
        ))
    }

    /// `n` contexts, each successor token checked against the vocabulary.
    fn contexts(&mut self, n: usize, vocab: usize) -> Result<HashMap<u32, Successors>, String> {
        let mut out = HashMap::with_capacity(n.min(self.bytes.len() / CONTEXT));
        for _ in 0..n {
            let key = self.u32()?;
            let count = self.u32()?;
            let len = usize::from(self.take(1)?[0]);
            if len > TOP {
                return Err(format!(
                    "context {key} has {len} successors; the limit is {TOP}"
                ));
            }
            let mut next = Vec::with_capacity(len);
            for _ in 0..len {
                let t = u32::from(self.u16()?);
                if t as usize >= vocab {
                    return Err(format!(
                        "successor {t} is outside the vocabulary of {vocab}"
                    ));
                }
                next.push((t, f32::from(self.u16()?) / f32::from(u16::MAX)));
            }
            out.insert(key, Successors { count, next });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// "1 2 3" three times and "1 2 4" once, then "5 2 3": bigram 2 -> 3
    /// (4 of 5), trigram (1, 2) -> 3 (3 of 4).
    fn text() -> Vec<u32> {
        let mut t = vec![];
        for _ in 0..3 {
            t.extend([1, 2, 3]);
        }
        t.extend([1, 2, 4, 5, 2, 3]);
        t
    }

    #[test]
    fn counted_tables_keep_each_contexts_most_frequent_successors() {
        let ng = Ngrams::count(&text(), 8, MAX_BYTES).unwrap();
        assert_eq!(ng.bigram[&2].count, 5);
        assert_eq!(ng.bigram[&2].next[0].0, 3);
        assert!((ng.bigram[&2].next[0].1 - 0.8).abs() < 1e-4);
        let tri = &ng.trigram[&pair(1, 2)];
        assert_eq!((tri.count, tri.next[0].0), (4, 3));
        // Seen once: under MIN_TRIGRAM_COUNT.
        assert!(!ng.trigram.contains_key(&pair(5, 2)));
    }

    #[test]
    fn the_blend_leans_on_the_trigram_as_its_context_grows_common() {
        let ng = Ngrams::count(&text(), 8, MAX_BYTES).unwrap();
        let next = ng.next(&[1, 2]);
        let share = |t: u32| next.iter().find(|n| n.0 == t).map_or(0.0, |n| n.1);
        // Trigram weight 4 / (4 + 4): 0.5 * 0.75 + 0.5 * 0.8 for token 3.
        assert!((share(3) - 0.775).abs() < 1e-3, "{next:?}");
        assert!((next.iter().map(|n| n.1).sum::<f32>() - 1.0).abs() < 1e-3);
        // An unseen pair answers with the bigram alone.
        assert_eq!(ng.next(&[7, 2]), ng.bigram[&2].next);
        assert!(ng.next(&[]).is_empty());
    }

    #[test]
    fn a_table_never_passes_its_byte_budget() {
        // A linear congruential sequence: about 2,500 pairs, most seen 4+ times.
        let tokens: Vec<u32> = std::iter::successors(Some(1u32), |x| {
            Some(x.wrapping_mul(1_103_515_245).wrapping_add(12_345) & 0x7fff_ffff)
        })
        .map(|x| (x >> 16) % 50)
        .take(20_000)
        .collect();
        let full = Ngrams::count(&tokens, 50, MAX_BYTES).unwrap();
        for budget in [4_000, 8_000, 20_000] {
            let ng = Ngrams::count(&tokens, 50, budget).unwrap();
            assert!(ng.to_bytes().len() <= budget, "{budget}");
            assert!(ng.contexts().1 < full.contexts().1);
        }
        let e = Ngrams::count(&tokens, 50, 2_000).unwrap_err();
        assert!(
            e.contains("bigram table") && e.contains("budget of 2000"),
            "{e}"
        );
    }

    #[test]
    fn a_saved_table_reads_back_equal() {
        let ng = Ngrams::count(&text(), 8, MAX_BYTES).unwrap();
        assert_eq!(Ngrams::from_bytes(&ng.to_bytes(), 8).unwrap(), ng);
    }

    #[test]
    fn corrupt_truncated_and_mismatched_tables_are_refused_saying_why() {
        let bytes = Ngrams::count(&text(), 8, MAX_BYTES).unwrap().to_bytes();
        let err = |b: &[u8], vocab: usize| Ngrams::from_bytes(b, vocab).unwrap_err();
        let mut flipped = bytes.clone();
        flipped[HEADER + 2] ^= 1;
        assert!(err(&flipped, 8).contains("checksum"));
        assert!(err(&bytes[..bytes.len() - 3], 8).contains("checksum"));
        assert!(err(&bytes[..5], 8).contains("bad magic"));
        assert!(err(&bytes, 9).contains("vocab_size 8, the model has 9"));
        assert!(err(&vec![0; MAX_BYTES + 1], 8).contains("limit"));
    }

    #[test]
    fn a_vocabulary_wider_than_16_bits_or_a_token_outside_it_is_refused() {
        let e = Ngrams::count(&[1, 2, 3], 70_000, MAX_BYTES).unwrap_err();
        assert!(e.contains("vocab_size 70000") && e.contains("65536"), "{e}");
        let e = Ngrams::count(&[1, 9, 3], 8, MAX_BYTES).unwrap_err();
        assert!(e.contains("token 9"), "{e}");
    }
}
