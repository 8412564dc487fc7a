//! The split forward that decoding needs, over either backend: candle's
//! [`Gpt`] (any device; CUDA), implemented here, or the CPU inference path
//! `CpuGpt`, implemented beside it in `cpu/backend.rs` (so `cpu` imports
//! this module and not the other way round).

use std::ops::Range;

use candle_core::{Result, Tensor};

use crate::model::config::Config;
use crate::model::gpt::{Gpt, Stream};
use crate::model::kv_cache::KvCache;

/// Logits of several rows, row-major (one allocation for all rows), and,
/// from the CPU backend, the final LayerNorm's output of the same rows
/// (what the draft head reads, `model::draft_head`).
pub struct Logits {
    data: Vec<f32>,
    vocab: usize,
    features: Vec<f32>,
}

impl Logits {
    pub fn new(data: Vec<f32>, vocab: usize) -> Self {
        debug_assert_eq!(data.len() % vocab.max(1), 0);
        Self {
            data,
            vocab,
            features: vec![],
        }
    }

    /// With the rows' final features (`width` values a row).
    pub fn with_features(mut self, features: Vec<f32>) -> Self {
        debug_assert!(self.is_empty() || features.len().is_multiple_of(self.len()));
        self.features = features;
        self
    }

    /// Row `i`'s final features; empty when the backend gave none.
    pub fn features(&self, i: usize) -> &[f32] {
        let rows = self.len();
        if self.features.is_empty() || i >= rows {
            return &[];
        }
        let w = self.features.len() / rows;
        &self.features[i * w..(i + 1) * w]
    }

    pub fn len(&self) -> usize {
        self.data.len() / self.vocab.max(1)
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    pub fn iter(&self) -> std::slice::ChunksExact<'_, f32> {
        self.data.chunks_exact(self.vocab)
    }
}

impl std::ops::Index<usize> for Logits {
    type Output = [f32];
    fn index(&self, i: usize) -> &[f32] {
        &self.data[i * self.vocab..(i + 1) * self.vocab]
    }
}

/// One sequence's part of a forward over several sequences: `tokens` at
/// positions `pos..`, their keys and values appended to `cache`; the final
/// head's logits are returned for rows `logits` (indices into `tokens`).
pub struct Segment<'a, C> {
    pub tokens: &'a [u32],
    pub pos: usize,
    pub cache: &'a mut C,
    pub logits: Range<usize>,
    /// The rows as a draft tree (docs/design.md): row i sits at position
    /// `pos + depth(i)` and attends to the cache and its ancestors only;
    /// its keys and values go to cache slot `pos + i`. None: a chain.
    pub tree: Option<&'a Tree>,
}

/// The shape of a verify step's rows: row 0 is the pending token, every
/// other row continues its parent, an earlier row. A chain is the tree
/// whose row i continues row i - 1.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tree {
    parent: Vec<usize>,
    depth: Vec<usize>,
}

impl Tree {
    /// A chain of `n` rows.
    pub fn chain(n: usize) -> Tree {
        Tree {
            parent: (0..n).map(|i| i.saturating_sub(1)).collect(),
            depth: (0..n).collect(),
        }
    }

    /// A tree of `parent.len()` rows; `parent[0]` is ignored (the root).
    /// Rows must come after their parents.
    pub fn from_parents(parent: Vec<usize>) -> Result<Tree> {
        let mut depth = Vec::with_capacity(parent.len());
        for (i, &p) in parent.iter().enumerate() {
            match i {
                0 => depth.push(0),
                _ if p < i => depth.push(depth[p] + 1),
                _ => candle_core::bail!("tree row {i} has parent {p}, not an earlier row"),
            }
        }
        let mut parent = parent;
        if let Some(root) = parent.first_mut() {
            *root = 0;
        }
        Ok(Tree { parent, depth })
    }

    pub fn len(&self) -> usize {
        self.parent.len()
    }

    pub fn is_empty(&self) -> bool {
        self.parent.is_empty()
    }

    pub fn parent(&self, row: usize) -> usize {
        self.parent[row]
    }

    pub fn depth(&self, row: usize) -> usize {
        self.depth[row]
    }

    /// Whether row i continues row i - 1 for every i.
    pub fn is_chain(&self) -> bool {
        self.depth.iter().enumerate().all(|(i, &d)| d == i)
    }

    /// The rows from the root to `row`, both included.
    pub fn path_to(&self, row: usize) -> Vec<usize> {
        let mut path = vec![row];
        let mut r = row;
        while r != 0 {
            r = self.parent[r];
            path.push(r);
        }
        path.reverse();
        path
    }

    /// The children of `row`, in row order.
    pub fn children(&self, row: usize) -> impl Iterator<Item = usize> + '_ {
        (row + 1..self.len()).filter(move |&c| self.parent[c] == row)
    }

    /// Keeps the first `n` rows (a tree still: parents come first).
    pub fn truncate(&mut self, n: usize) {
        self.parent.truncate(n);
        self.depth.truncate(n);
    }
}

pub trait Forward {
    type Cache;
    type Stream;
    fn config(&self) -> &Config;
    fn new_cache(&self) -> Result<Self::Cache>;
    /// Embeds `tokens` at positions `pos..`.
    fn embed(&self, tokens: &[u32], pos: usize) -> Result<Self::Stream>;
    /// Runs blocks up to `to`, appending keys and values to `cache`.
    fn run_blocks(&self, s: &mut Self::Stream, to: usize, cache: &mut Self::Cache) -> Result<()>;
    /// Logits of exit `exit` for `rows`.
    fn exit_logits(&self, s: &Self::Stream, exit: usize, rows: Range<usize>) -> Result<Logits>;
    /// Logits (rows.len(), ids.len()), row-major, of exit `exit` for
    /// `rows` and the tokens `ids` only. The default slices the full
    /// projection; the CPU model takes a dot product per token.
    fn exit_scores(
        &self,
        s: &Self::Stream,
        exit: usize,
        rows: Range<usize>,
        ids: &[u32],
    ) -> Result<Vec<f32>> {
        let logits = self.exit_logits(s, exit, rows)?;
        let mut out = Vec::with_capacity(logits.len() * ids.len());
        for row in logits.iter() {
            for &t in ids {
                match row.get(t as usize) {
                    Some(z) => out.push(*z),
                    None => candle_core::bail!(
                        "token id {t} is outside the vocabulary (size {})",
                        row.len()
                    ),
                }
            }
        }
        Ok(out)
    }
    /// Keeps the first `rows` rows in flight.
    fn keep_rows(&self, s: &mut Self::Stream, rows: usize) -> Result<()>;
    /// Rows in flight.
    fn rows(&self, s: &Self::Stream) -> usize;
    /// Appends `next`'s rows after `s`'s: both at the same block, `next`
    /// starting at the position after `s`'s last row.
    fn append_rows(&self, s: &mut Self::Stream, next: Self::Stream) -> Result<()>;
    fn truncate_cache(&self, cache: &mut Self::Cache, len: usize);
    /// Keeps, of the cached rows from slot `from` on, the slots
    /// `from + keep[i]` (ascending) moved to `from + i` in every layer, and
    /// drops the rest: a draft tree's accepted path.
    fn compact_cache(&self, cache: &mut Self::Cache, from: usize, keep: &[usize]) -> Result<()>;
    /// Whether [`Self::forward_batch`] takes draft trees ([`Segment::tree`]).
    fn supports_trees(&self) -> bool {
        false
    }
    fn cache_len(&self, cache: &Self::Cache) -> usize;
    /// Rows held by the fullest layer (equal to `cache_len` between steps).
    fn cache_max_len(&self, cache: &Self::Cache) -> usize;
    /// Runs every block over the rows of several sequences and returns, per
    /// segment, the final head's logits for its rows `logits`. The CPU
    /// backend runs them as one forward (one batch of rows); the default,
    /// which candle's backend uses, runs one forward per sequence.
    fn forward_batch(&self, segs: &mut [Segment<'_, Self::Cache>]) -> Result<Vec<Logits>> {
        let cfg = self.config();
        let (last, vocab) = (cfg.exits.len() - 1, cfg.vocab_size);
        segs.iter_mut()
            .map(|sg| {
                if sg.tree.is_some_and(|t| !t.is_chain()) {
                    candle_core::bail!("draft trees need the CPU backend");
                }
                if sg.tokens.is_empty() {
                    return Ok(Logits::new(vec![], vocab));
                }
                let mut s = self.embed(sg.tokens, sg.pos)?;
                self.run_blocks(&mut s, cfg.n_layer, sg.cache)?;
                if sg.logits.is_empty() {
                    return Ok(Logits::new(vec![], vocab));
                }
                self.exit_logits(&s, last, sg.logits.clone())
            })
            .collect()
    }
}

impl Forward for Gpt {
    type Cache = KvCache;
    type Stream = Stream;
    fn config(&self) -> &Config {
        &self.cfg
    }
    fn new_cache(&self) -> Result<KvCache> {
        Gpt::new_cache(self)
    }
    fn embed(&self, tokens: &[u32], pos: usize) -> Result<Stream> {
        let idx = Tensor::from_slice(tokens, (1, tokens.len()), self.device())?;
        Gpt::embed(self, &idx, pos)
    }
    fn run_blocks(&self, s: &mut Stream, to: usize, cache: &mut KvCache) -> Result<()> {
        Gpt::run_blocks(self, s, to, Some(cache))
    }
    fn exit_logits(&self, s: &Stream, exit: usize, rows: Range<usize>) -> Result<Logits> {
        let data = Gpt::exit_logits(self, s, exit, rows)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        Ok(Logits::new(data, self.cfg.vocab_size))
    }
    fn keep_rows(&self, s: &mut Stream, rows: usize) -> Result<()> {
        s.truncate(rows)
    }
    fn rows(&self, s: &Stream) -> usize {
        s.rows()
    }
    fn append_rows(&self, s: &mut Stream, next: Stream) -> Result<()> {
        s.append(next)
    }
    fn truncate_cache(&self, cache: &mut KvCache, len: usize) {
        cache.truncate(len)
    }
    fn compact_cache(&self, cache: &mut KvCache, from: usize, keep: &[usize]) -> Result<()> {
        if keep.iter().enumerate().any(|(i, &k)| k != i) {
            candle_core::bail!("draft trees need the CPU backend");
        }
        cache.truncate(from + keep.len());
        Ok(())
    }
    fn cache_len(&self, cache: &KvCache) -> usize {
        cache.len()
    }
    fn cache_max_len(&self, cache: &KvCache) -> usize {
        (0..self.cfg.n_layer)
            .map(|i| cache.layer_len(i))
            .max()
            .unwrap_or(0)
    }
}
