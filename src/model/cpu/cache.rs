//! The CPU model's KV cache: a preallocated buffer per layer, laid out
//! `[head][position][head_size]`, written in place by attention; rolling
//! back is setting a length (the invariant is the one in `kv_cache.rs`),
//! and a draft tree's accepted path is compacted into place. Rows are
//! stored in f32 or, with `--kv-cache f16`, in f16 (half the bytes that
//! attention reads; widened exactly to f32 in its dot products).

use candle_core::{bail, Result};
use half::{f16, slice::HalfFloatSliceExt};

use crate::model::config::Config;

/// Storage of the K/V cache's rows (`--kv-cache`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KvDtype {
    #[default]
    F32,
    F16,
}

impl KvDtype {
    /// Every spelling `--kv-cache` accepts.
    pub const NAMES: [&'static str; 2] = ["f32", "f16"];

    /// The `--kv-cache` spelling.
    pub fn name(self) -> &'static str {
        match self {
            KvDtype::F32 => "f32",
            KvDtype::F16 => "f16",
        }
    }

    /// Parses a `--kv-cache` value; an error names the flag.
    pub fn parse(s: &str) -> std::result::Result<Self, String> {
        match s {
            "f32" => Ok(KvDtype::F32),
            "f16" => Ok(KvDtype::F16),
            _ => Err(format!("--kv-cache must be f32 or f16, not {s:?}")),
        }
    }

    /// Bytes a cached row element takes.
    pub fn bytes(self) -> usize {
        match self {
            KvDtype::F32 => 4,
            KvDtype::F16 => 2,
        }
    }
}

/// One layer's keys or values, (nh, block_size, hs), in the cache's dtype.
pub enum KvBuf {
    F32(Vec<f32>),
    F16(Vec<f16>),
}

impl KvBuf {
    fn zeros(dt: KvDtype, len: usize) -> Self {
        match dt {
            KvDtype::F32 => KvBuf::F32(vec![0f32; len]),
            KvDtype::F16 => KvBuf::F16(vec![f16::ZERO; len]),
        }
    }

    /// Stores `row` at element `at` (rounded to nearest in f16).
    pub(super) fn write(&mut self, at: usize, row: &[f32]) {
        match self {
            KvBuf::F32(b) => b[at..at + row.len()].copy_from_slice(row),
            // Vectorised (F16C where the CPU has it), round to nearest even.
            KvBuf::F16(b) => b[at..at + row.len()].convert_from_f32_slice(row),
        }
    }

    /// Moves `from + keep[i]` to `from + i` in each head's rows (`cap`
    /// rows of `hs`).
    fn compact(&mut self, cap: usize, hs: usize, from: usize, keep: &[usize]) {
        fn go<T: Copy>(buf: &mut [T], cap: usize, hs: usize, from: usize, keep: &[usize]) {
            for head in buf.chunks_exact_mut(cap * hs) {
                for (i, &slot) in keep.iter().enumerate() {
                    let src = (from + slot) * hs;
                    head.copy_within(src..src + hs, (from + i) * hs);
                }
            }
        }
        match self {
            KvBuf::F32(b) => go(b, cap, hs, from, keep),
            KvBuf::F16(b) => go(b, cap, hs, from, keep),
        }
    }
}

/// Per-sequence KV cache: `k[layer]`, `v[layer]` of (nh, block_size, hs).
pub struct CpuCache {
    pub(super) k: Vec<KvBuf>,
    pub(super) v: Vec<KvBuf>,
    pub(super) len: Vec<usize>,
    pub(super) cap: usize,
    head_size: usize,
}

impl CpuCache {
    /// An empty cache with room for `block_size` rows in every layer.
    pub(super) fn new(cfg: &Config, dt: KvDtype) -> Self {
        let (c, cap) = (cfg.n_embd, cfg.block_size);
        let n = cfg.n_layer;
        let bufs = || (0..n).map(|_| KvBuf::zeros(dt, cap * c)).collect();
        CpuCache {
            k: bufs(),
            v: bufs(),
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
                buf.compact(cap, hs, from, keep);
            }
            self.len[layer] = from + keep.len();
        }
        Ok(())
    }
}
