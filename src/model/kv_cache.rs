//! A per-sequence KV cache that can be rolled back to any length.
//!
//! Invariant (docs/design.md, "The KV-cache invariant"): between decode steps every layer holds exactly the
//! committed tokens except the newest one, the *pending* token, whose output
//! is not known yet; the next step feeds `[pending, drafts...]` first. During
//! a step layers may hold different lengths (an exit can drop rows before the
//! later blocks run); `truncate` restores the invariant afterwards.
//!
//! Buffers are preallocated at `block_size` rows and written in place with
//! `slice_set`, so decoding does no per-token concatenation (candle's own
//! `KvCache` cannot truncate, which speculation needs).

use candle_core::{DType, Device, Result, Tensor};

use crate::model::config::Config;

pub struct LayerCache {
    k: Tensor, // (1, nh, block_size, hs)
    v: Tensor, // (1, nh, block_size, hs)
    len: usize,
}

impl LayerCache {
    /// Writes `k_new`/`v_new` (1, nh, T, hs) after the cached rows and returns
    /// views of all rows so far, (1, nh, len, hs) each.
    pub fn append(&mut self, k_new: &Tensor, v_new: &Tensor) -> Result<(Tensor, Tensor)> {
        let t = k_new.dim(2)?;
        let cap = self.k.dim(2)?;
        if self.len + t > cap {
            candle_core::bail!(
                "kv cache overflow: {} cached + {t} new rows exceed block_size {cap}",
                self.len
            );
        }
        self.k.slice_set(&k_new.contiguous()?, 2, self.len)?;
        self.v.slice_set(&v_new.contiguous()?, 2, self.len)?;
        self.len += t;
        Ok((
            self.k.narrow(2, 0, self.len)?,
            self.v.narrow(2, 0, self.len)?,
        ))
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

pub struct KvCache {
    layers: Vec<LayerCache>,
}

impl KvCache {
    pub fn new(cfg: &Config, dtype: DType, device: &Device) -> Result<Self> {
        let shape = (1, cfg.n_head, cfg.block_size, cfg.head_size());
        let layers = (0..cfg.n_layer)
            .map(|_| {
                Ok(LayerCache {
                    k: Tensor::zeros(shape, dtype, device)?,
                    v: Tensor::zeros(shape, dtype, device)?,
                    len: 0,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { layers })
    }

    pub fn layer_mut(&mut self, i: usize) -> &mut LayerCache {
        &mut self.layers[i]
    }

    /// Rows held by layer `i`.
    pub fn layer_len(&self, i: usize) -> usize {
        self.layers[i].len
    }

    /// Rows held by every layer (the minimum over layers; after `truncate`,
    /// every layer holds exactly this many). The CPU cache means the same.
    pub fn len(&self) -> usize {
        self.layers.iter().map(|l| l.len).min().unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Rolls every layer back to at most `len` rows (the rows stay allocated).
    pub fn truncate(&mut self, len: usize) {
        for l in &mut self.layers {
            l.len = l.len.min(len);
        }
    }
}
