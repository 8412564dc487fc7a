//! The CPU model's exits: the logits of an exit head for some rows in
//! flight, or, for the exit cascade, the scores of a few tokens only.

use std::borrow::Cow;
use std::ops::Range;

use candle_core::{bail, Result};

use super::{CpuGpt, CpuStream};
use crate::model::kernels;

impl CpuGpt {
    /// Logits (rows.len(), V), row-major, of exit `exit` for rows `rows`
    /// of `s`, which must have run exactly to that exit's block.
    pub fn exit_logits(&self, s: &CpuStream, exit: usize, rows: Range<usize>) -> Result<Vec<f32>> {
        let h = self.exit_input(s, exit, rows.clone())?;
        let head = self.exits[exit].head.as_ref().unwrap_or(&self.wte_head);
        Ok(head.forward(&h, rows.len()))
    }

    /// Logits (rows.len(), ids.len()), row-major, of exit `exit` for rows
    /// `rows` of `s` and the tokens `ids` only: a dot product per token
    /// instead of the vocabulary projection. A tied head reads the f32
    /// embedding rows, which an f16 head rounds (a difference far below
    /// the margins the exit cascade acts on).
    pub fn exit_scores(
        &self,
        s: &CpuStream,
        exit: usize,
        rows: Range<usize>,
        ids: &[u32],
    ) -> Result<Vec<f32>> {
        let (c, v) = (self.cfg.n_embd, self.cfg.vocab_size);
        if let Some(bad) = ids.iter().find(|t| **t as usize >= v) {
            bail!("token id {bad} is outside the vocabulary (size {v})");
        }
        let h = self.exit_input(s, exit, rows)?;
        let weights: Vec<(Cow<[f32]>, f32)> = match &self.exits[exit].head {
            Some(m) => ids
                .iter()
                .map(|&t| {
                    let (w, b) = m.output(t as usize);
                    (Cow::Owned(w), b)
                })
                .collect(),
            None => ids
                .iter()
                .map(|&t| (Cow::Borrowed(&self.wte[t as usize * c..][..c]), 0.0))
                .collect(),
        };
        Ok(h.chunks_exact(c)
            .flat_map(|x| weights.iter().map(move |(w, b)| kernels::dot(x, w) + b))
            .collect())
    }

    /// Exit `exit`'s normalised input for rows `rows` of `s`, which must
    /// have run exactly to that exit's block.
    fn exit_input(&self, s: &CpuStream, exit: usize, rows: Range<usize>) -> Result<Vec<f32>> {
        let block = self.cfg.exits[exit].block;
        if s.block != block {
            bail!(
                "exit {exit} reads block {block}, stream is at block {}",
                s.block
            );
        }
        let c = self.cfg.n_embd;
        if rows.end > s.rows {
            bail!("rows {rows:?} outside the {} rows in flight", s.rows);
        }
        Ok(self.exits[exit]
            .ln
            .forward(&s.x[rows.start * c..rows.end * c]))
    }
}
