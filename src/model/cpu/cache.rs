//! The CPU model's KV cache: a preallocated buffer per layer, laid out
//! `[head][position][head_size]`, written in place by attention; rolling
//! back is setting a length (the invariant is the one in `kv_cache.rs`),
//! and a draft tree's accepted path is compacted into place.

use candle_core::{bail, Result};

use crate::model::config::Config;

/// Per-sequence KV cache: `k[layer]`, `v[layer]` of (nh, block_size, hs).
pub struct CpuCache {
    pub(super) k: Vec<Vec<f32>>,
    pub(super) v: Vec<Vec<f32>>,
    pub(super) len: Vec<usize>,
    pub(super) cap: usize,
    head_size: usize,
}

impl CpuCache {
    /// An empty cache with room for `block_size` rows in every layer.
    pub(super) fn new(cfg: &Config) -> Self {
        let (c, cap) = (cfg.n_embd, cfg.block_size);
        let n = cfg.n_layer;
        CpuCache {
            k: vec![vec![0f32; cap * c]; n],
            v: vec![vec![0f32; cap * c]; n],
            len: vec![0; n],
            cap,
            head_size: c / cfg.n_head,
        }
    }

    /// Rows held by every layer (the minimum over layers).
    pub fn len(&self) -> usize {
        self.len.iter().copied().min().unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn layer_len(&self, i: usize) -> usize {
        self.len[i]
    }

    /// Rolls every layer back to at most `len` rows.
    pub fn truncate(&mut self, len: usize) {
        for l in &mut self.len {
            *l = (*l).min(len);
        }
    }

    /// Moves slots `from + keep[i]` (ascending) to `from + i` in every
    /// layer and head, and drops every slot after them.
    pub fn compact(&mut self, from: usize, keep: &[usize]) -> Result<()> {
        if keep.windows(2).any(|w| w[0] >= w[1]) {
            bail!("cache slots to keep must ascend: {keep:?}");
        }
        if let Some(&last) = keep.last() {
            if let Some(l) = self.len.iter().position(|&l| l <= from + last) {
                bail!("cache layer {l} has no slot {} to keep", from + last);
            }
        }
        if keep.iter().enumerate().all(|(i, &slot)| slot == i) {
            // A chain's accepted prefix (every verify step's case unless
            // the drafts branch): nothing moves.
            self.truncate(from + keep.len());
            return Ok(());
        }
        let (cap, hs) = (self.cap, self.head_size);
        for layer in 0..self.len.len() {
            for buf in [&mut self.k[layer], &mut self.v[layer]] {
                for head in buf.chunks_exact_mut(cap * hs) {
                    for (i, &slot) in keep.iter().enumerate() {
                        let src = (from + slot) * hs;
                        head.copy_within(src..src + hs, (from + i) * hs);
                    }
                }
            }
            self.len[layer] = from + keep.len();
        }
        Ok(())
    }
}
