//! The CPU model as a decoding backend: [`Forward`] over [`CpuGpt`], its
//! cache and its stream. The CPU backend runs a batch of sequences as one
//! forward and takes draft trees.

use std::ops::Range;

use candle_core::Result;

use super::{CpuCache, CpuGpt, CpuStream};
use crate::model::config::Config;
use crate::model::forward::{Forward, Logits, Segment};

impl Forward for CpuGpt {
    type Cache = CpuCache;
    type Stream = CpuStream;
    fn config(&self) -> &Config {
        &self.cfg
    }
    fn new_cache(&self) -> Result<CpuCache> {
        Ok(CpuGpt::new_cache(self))
    }
    fn embed(&self, tokens: &[u32], pos: usize) -> Result<CpuStream> {
        CpuGpt::embed(self, tokens, pos)
    }
    fn run_blocks(&self, s: &mut CpuStream, to: usize, cache: &mut CpuCache) -> Result<()> {
        CpuGpt::run_blocks(self, s, to, cache)
    }
    fn exit_logits(&self, s: &CpuStream, exit: usize, rows: Range<usize>) -> Result<Logits> {
        Ok(Logits::new(
            CpuGpt::exit_logits(self, s, exit, rows)?,
            self.cfg.vocab_size,
        ))
    }
    fn exit_scores(
        &self,
        s: &CpuStream,
        exit: usize,
        rows: Range<usize>,
        ids: &[u32],
    ) -> Result<Vec<f32>> {
        CpuGpt::exit_scores(self, s, exit, rows, ids)
    }
    fn keep_rows(&self, s: &mut CpuStream, rows: usize) -> Result<()> {
        s.truncate(rows, self.cfg.n_embd);
        Ok(())
    }
    fn rows(&self, s: &CpuStream) -> usize {
        s.rows()
    }
    fn append_rows(&self, s: &mut CpuStream, next: CpuStream) -> Result<()> {
        s.append(next)
    }
    fn truncate_cache(&self, cache: &mut CpuCache, len: usize) {
        cache.truncate(len)
    }
    fn compact_cache(&self, cache: &mut CpuCache, from: usize, keep: &[usize]) -> Result<()> {
        cache.compact(from, keep)
    }
    fn supports_trees(&self) -> bool {
        true
    }
    fn cache_len(&self, cache: &CpuCache) -> usize {
        cache.len()
    }
    fn cache_max_len(&self, cache: &CpuCache) -> usize {
        (0..self.cfg.n_layer)
            .map(|i| cache.layer_len(i))
            .max()
            .unwrap_or(0)
    }
    fn forward_batch(&self, segs: &mut [Segment<'_, CpuCache>]) -> Result<Vec<Logits>> {
        CpuGpt::forward_batch(self, segs)
    }
}
