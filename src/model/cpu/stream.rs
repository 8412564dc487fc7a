//! The rows in flight through the CPU model's blocks: the residual stream,
//! the embedding (for x0 skips) and DWA's history, with the position of
//! the first row and the blocks run so far.

use candle_core::Result;

/// Rows in flight through the blocks (as [`crate::model::gpt::Stream`]).
pub struct CpuStream {
    /// (T, C) residual stream after `block` blocks.
    pub(super) x: Vec<f32>,
    /// (T, C) embedding, for x0 skips.
    pub(super) x0: Vec<f32>,
    /// DWA's X_0..X_block.
    pub(super) xs: Vec<Vec<f32>>,
    pub(super) rows: usize,
    pub pos: usize,
    pub block: usize,
}

impl CpuStream {
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Keeps the first `rows` rows.
    pub fn truncate(&mut self, rows: usize, c: usize) {
        if rows >= self.rows {
            return;
        }
        self.rows = rows;
        self.x.truncate(rows * c);
        self.x0.truncate(rows * c);
        for t in &mut self.xs {
            t.truncate(rows * c);
        }
    }

    /// Appends `next`'s rows (same block, the positions right after ours).
    pub fn append(&mut self, next: CpuStream) -> Result<()> {
        crate::model::gpt::check_append(self.pos, self.rows, self.block, next.pos, next.block)?;
        self.x.extend(next.x);
        self.x0.extend(next.x0);
        for (t, n) in self.xs.iter_mut().zip(next.xs) {
            t.extend(n);
        }
        self.rows += next.rows;
        Ok(())
    }
}
