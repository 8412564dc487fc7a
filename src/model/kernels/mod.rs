//! CPU kernels shared by the inference path (`cpu`), the trainer's fused
//! ops and the drafter: a small-batch matmul that reads each weight once
//! for all rows, LayerNorm, GELU, softmax, dot products.
//!
//! Why not candle's matmul here: decoding multiplies 1..16 rows by each
//! weight matrix, and candle (via `gemm`) packs the weight matrix on every
//! call and allocates every intermediate; measured on this 2-core machine,
//! the `small` preset decoded at ~120 tok/s through candle vs 600+ through
//! these loops (see `gpt-serve bench --plain`). Weights are stored
//! transposed, `wt[k][n]` (in, out), so the inner loop is an AXPY over
//! contiguous output columns: no horizontal sums, and a column tile of the
//! weights stays in L1 while every row chunk passes over it.
//!
//! x86-64 with AVX2+FMA(+F16C) gets explicit SIMD chosen at run time; other
//! CPUs get the portable loops (same results up to summation order).
//!
//! Files by operation and instruction set: this one holds the public entry
//! points, each choosing at run time between the SIMD paths (`avx512`,
//! `avx2`) and the portable loops (`portable`); `matmul` is the packed
//! weight matrix and its tile dispatch, `approx` the branch-free exp and
//! tanh the loops use. The vocabulary they share (the tile width, the
//! weight element, the key rows of attention) is defined here, so the
//! files import this one and never each other in a circle.

use half::f16;

mod approx;
#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
mod matmul;
mod portable;
#[cfg(test)]
mod tests;

pub use approx::{exp_neg, tanh_fast};
pub use matmul::Matrix;

/// Output columns per tile (4 AVX registers per row).
pub const TILE: usize = 32;

/// A weight element: f32, or f16 converted on load (halves memory traffic).
pub trait WeightElem: Copy + Send + Sync + 'static {
    fn to_f32(self) -> f32;
    fn from_f32(x: f32) -> Self;
    const IS_F16: bool;
}

impl WeightElem for f32 {
    fn to_f32(self) -> f32 {
        self
    }
    fn from_f32(x: f32) -> Self {
        x
    }
    const IS_F16: bool = false;
}

impl WeightElem for f16 {
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }
    const IS_F16: bool = true;
}

/// `sum a[i] * b[i]`.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if avx2::available() {
        // SAFETY: features detected at run time.
        return unsafe { avx2::dot(a, b) };
    }
    portable::dot(a, b)
}

/// `y += a * x`.
pub fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if avx2::available() {
        // SAFETY: features detected at run time.
        return unsafe { avx2::axpy(y, a, x) };
    }
    portable::axpy(y, a, x)
}

/// `acc[j] += sum over o in offsets of src[o + j]`, src in f16: the
/// drafter's leaf vectors summed with each accumulator register loaded and
/// stored once for all leaves (adding leaf by leaf stores and reloads
/// the accumulator for every leaf).
///
/// # Panics
/// When an `o + acc.len()` is beyond `src`.
pub fn sum_rows_f16(acc: &mut [f32], src: &[f16], offsets: &[u32]) {
    let n = acc.len();
    assert!(offsets.iter().all(|&o| o as usize + n <= src.len()));
    #[cfg(target_arch = "x86_64")]
    if avx512::available() {
        // SAFETY: features detected at run time; offsets checked above.
        return unsafe { avx512::sum_rows_f16(acc, src, offsets) };
    }
    #[cfg(target_arch = "x86_64")]
    if avx2::available() {
        // SAFETY: as above.
        return unsafe { avx2::sum_rows_f16(acc, src, offsets) };
    }
    portable::sum_rows_f16(acc, src, offsets)
}

/// Which rows of a head's keys and values a query attends to, in order:
/// rows `0..prefix`, then `tail`'s rows (a draft-tree node: the cached
/// prefix, then its ancestors' rows); all `att.len()` rows from 0 when
/// `tail` is None (causal attention over a contiguous history).
#[derive(Clone, Copy, Debug)]
pub struct KeyRows<'a> {
    pub prefix: usize,
    pub tail: Option<&'a [usize]>,
}

impl KeyRows<'_> {
    /// Contiguous rows from 0.
    pub const ALL: KeyRows<'static> = KeyRows {
        prefix: 0,
        tail: None,
    };

    #[inline(always)]
    fn row(&self, j: usize) -> usize {
        match self.tail {
            Some(t) if j >= self.prefix => t[j - self.prefix],
            _ => j,
        }
    }
}

/// One head of one query row: `out = softmax(scale * q K^T) V` over the
/// `att.len()` rows of `k` and `v` (each `q.len()` wide) that `keys`
/// picks. Each score is its own dot product, and the softmax and weighted
/// sum run over the picked rows in order, so picking rows gives bitwise
/// the result of the same rows stored contiguously.
///
/// Keys and values are f32 or f16 (`--kv-cache f16`); f16 rows are
/// widened to f32 exactly before each product, so on every path f16 K/V
/// give bitwise what that path gives for the same values stored as f32.
pub fn attend_head<W: WeightElem>(
    q: &[f32],
    k: &[W],
    v: &[W],
    keys: KeyRows<'_>,
    scale: f32,
    att: &mut [f32],
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if avx2::available() {
        // SAFETY: features detected at run time.
        return unsafe { avx2::attend_head(q, k, v, keys, scale, att, out) };
    }
    portable::attend_head(q, k, v, keys, scale, att, out)
}

/// LayerNorm of each row of `x` (rows of `w.len()`) into `y`.
pub fn layer_norm(x: &[f32], w: &[f32], b: Option<&[f32]>, eps: f32, y: &mut [f32]) {
    let c = w.len();
    for (xr, yr) in x.chunks_exact(c).zip(y.chunks_exact_mut(c)) {
        let mean = xr.iter().sum::<f32>() / c as f32;
        let var = xr.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / c as f32;
        let inv = 1.0 / (var + eps).sqrt();
        for i in 0..c {
            yr[i] = (xr[i] - mean) * inv * w[i] + b.map_or(0.0, |b| b[i]);
        }
    }
}

/// GELU, tanh approximation (GPT-2's "gelu_new"), in place.
pub fn gelu_tanh(x: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if avx2::available() {
        // SAFETY: features detected at run time.
        return unsafe { avx2::gelu_tanh(x) };
    }
    portable::gelu_tanh(x)
}

/// Softmax in place; returns the log-sum-exp of the input (the log of
/// softmax's normaliser, for a cross-entropy from the same pass).
pub fn softmax(x: &mut [f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if avx2::available() {
        // SAFETY: features detected at run time.
        return unsafe { avx2::softmax(x) };
    }
    portable::softmax(x)
}
