//! The CPU inference path: the same model as [`crate::model::gpt::Gpt`] (built
//! from the same checkpoint tensors, same names, same split forward), run
//! on plain buffers with the kernels in [`crate::model::kernels`] instead of
//! candle ops.
//!
//! Why a second forward: decoding is 1..16 rows per step, where candle's
//! per-op allocation and per-call weight packing dominate (see
//! `kernels`). Training keeps candle (it needs autograd); this path is
//! checked against it by `tests/cpu.rs` for every option (DWA, x0 skips,
//! own exit heads) and for split forwards with truncation.
//!
//! The KV cache here is a preallocated buffer per layer, laid out
//! `[head][position][head_size]`, written in place; rolling back is
//! setting a length (the invariant is the one in `kv_cache.rs`).
//!
//! Files by role: `weights` (loading the checkpoint's tensors), `cache`
//! (the KV cache), `stream` (the rows in flight), `blocks` (the forward
//! over them), `exits` (the heads), `backend` (the [`Forward`] impl that
//! decoding calls); this one holds the model and the embedding.
//!
//! [`Forward`]: crate::model::forward::Forward

use candle_core::{bail, Result};

use crate::model::config::Config;
use crate::model::forward::Tree;

mod backend;
mod blocks;
mod cache;
mod exits;
mod stream;
mod weights;

pub use cache::{CpuCache, KvDtype};
pub use stream::CpuStream;
use weights::{Block, Exit, Mat};
pub use weights::{LoadError, WeightDtype};

/// Runs `f` on a worker of the inference thread pool (one thread per
/// core). Fork/join from inside a pool is work stealing; from an outside
/// thread every parallel matmul is a cross-thread wake-up, which made a
/// decode step 1.5x slower on this 2-core machine (measured with
/// `examples/verify_profile.rs`, removed after `cc6f1c3`; see git history).
pub fn in_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    use std::sync::OnceLock;
    static POOL: OnceLock<Option<rayon::ThreadPool>> = OnceLock::new();
    let pool = POOL.get_or_init(|| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(rayon::current_num_threads())
            .thread_name(|i| format!("gpt-serve-infer-{i}"))
            .stack_size(16 << 20)
            .build()
            .ok()
    });
    match pool {
        Some(p) => p.install(f),
        None => f(),
    }
}

/// The multi-exit GPT on plain buffers; built by [`CpuGpt::from_tensors`].
pub struct CpuGpt {
    pub cfg: Config,
    wte: Vec<f32>, // (V, C)
    wpe: Vec<f32>, // (block_size, C)
    /// wte as a (C -> V) projection, for the tied heads.
    wte_head: Mat,
    blocks: Vec<Block>,
    exits: Vec<Exit>,
    /// Storage of the caches `new_cache` makes (`--kv-cache`).
    kv: KvDtype,
}

impl CpuGpt {
    pub fn new_cache(&self) -> CpuCache {
        CpuCache::new(&self.cfg, self.kv)
    }

    /// This model with its KV caches stored as `kv`.
    pub fn with_kv_cache(mut self, kv: KvDtype) -> Self {
        self.kv = kv;
        self
    }

    /// Storage of this model's KV caches.
    pub fn kv_cache(&self) -> KvDtype {
        self.kv
    }

    /// Embeds `tokens` at positions `pos..pos + T`.
    pub fn embed(&self, tokens: &[u32], pos: usize) -> Result<CpuStream> {
        let mut x = Vec::new();
        self.embed_into(tokens, pos, None, &mut x)?;
        Ok(self.stream(x, pos))
    }

    /// Appends the embeddings of `tokens` at positions `pos..` to `x`.
    /// Embeds `tokens` at positions `pos..`, or at `pos + depth` for the
    /// rows of a draft tree.
    fn embed_into(
        &self,
        tokens: &[u32],
        pos: usize,
        tree: Option<&Tree>,
        x: &mut Vec<f32>,
    ) -> Result<()> {
        let (c, t) = (self.cfg.n_embd, tokens.len());
        if pos + t > self.cfg.block_size {
            bail!(
                "sequence of {} positions exceeds block_size {}",
                pos + t,
                self.cfg.block_size
            );
        }
        x.reserve(t * c);
        for (r, &tok) in tokens.iter().enumerate() {
            let tok = tok as usize;
            if tok >= self.cfg.vocab_size {
                bail!(
                    "token id {tok} is outside the vocabulary (size {})",
                    self.cfg.vocab_size
                );
            }
            let at = pos + tree.map_or(r, |t| t.depth(r));
            let (e, p) = (&self.wte[tok * c..][..c], &self.wpe[at * c..][..c]);
            x.extend(e.iter().zip(p).map(|(a, b)| a + b));
        }
        Ok(())
    }

    /// Rows `x` (embeddings) in flight at block 0, the first at `pos`.
    fn stream(&self, x: Vec<f32>, pos: usize) -> CpuStream {
        CpuStream {
            xs: if self.cfg.dwa.is_some() {
                vec![x.clone()]
            } else {
                vec![]
            },
            x0: x.clone(),
            rows: x.len() / self.cfg.n_embd,
            x,
            pos,
            block: 0,
        }
    }
}
