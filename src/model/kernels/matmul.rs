//! The small-batch matmul: a linear layer's weights packed once at load
//! into column tiles, and `y = x W^T + b` over 1..a few dozen rows, one
//! tile at a time (parallel over tiles when the product is large enough).
//! Each tile goes to the widest instruction set the CPU has, chosen at run
//! time: `avx512`, then `avx2`, then the `portable` loop.

use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
use super::{avx2, avx512};
use super::{portable, WeightElem, TILE};

/// Work chunks per thread in a parallel matmul (see `Matrix::forward`).
const CHUNKS_PER_THREAD: usize = 4;

/// Below this many multiply-adds a matmul runs on the calling thread.
fn par_min_macs() -> usize {
    use std::sync::OnceLock;
    static V: OnceLock<usize> = OnceLock::new();
    *V.get_or_init(|| {
        std::env::var("GPT_SERVE_PAR_MIN_MACS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1 << 16)
    })
}

/// A linear layer's weights for `y = x W^T + b`, packed once at load:
/// column tiles of `TILE` outputs, each a contiguous (in, TILE) block, so
/// a tile's weights stream from memory in order (a plain (in, out) layout
/// strides `out * 4` bytes per input, a new page per row at out >= 1024).
/// The last tile and the bias are zero-padded.
pub struct Matrix<W: WeightElem> {
    packed: Vec<W>,
    bias: Vec<f32>,
    pub k: usize,
    pub n: usize,
}

impl<W: WeightElem> Matrix<W> {
    /// From nn.Linear's layout `w` (out = n, in = k), row-major.
    pub fn from_out_in(w: &[f32], n: usize, k: usize, bias: Option<Vec<f32>>) -> Self {
        assert_eq!(w.len(), n * k, "weight of {n} x {k}");
        let tiles = n.div_ceil(TILE);
        let mut packed = vec![W::from_f32(0.0); tiles * k * TILE];
        for (o, row) in w.chunks_exact(k).enumerate() {
            let (t, j) = (o / TILE, o % TILE);
            for (i, v) in row.iter().enumerate() {
                packed[(t * k + i) * TILE + j] = W::from_f32(*v);
            }
        }
        let mut b = bias.unwrap_or_else(|| vec![0.0; n]);
        b.resize(tiles * TILE, 0.0);
        Self {
            packed,
            bias: b,
            k,
            n,
        }
    }

    /// Output `o` (< n)'s weights (row `o` of nn.Linear's layout) and
    /// bias, unpacked: a strided read, for scoring a few outputs.
    pub fn output(&self, o: usize) -> (Vec<f32>, f32) {
        debug_assert!(o < self.n, "output {o} of {}", self.n);
        let (t, j) = (o / TILE, o % TILE);
        let w = (0..self.k)
            .map(|i| self.packed[(t * self.k + i) * TILE + j].to_f32())
            .collect();
        (w, self.bias[o])
    }

    /// `y (m, n) = x (m, k) W^T + b`, parallel over column tiles.
    pub fn forward(&self, x: &[f32], m: usize, y: &mut [f32]) {
        let (k, n) = (self.k, self.n);
        debug_assert_eq!(x.len(), m * k);
        debug_assert_eq!(y.len(), m * n);
        let tiles = n.div_ceil(TILE);
        // Tasks write disjoint column ranges of y through a raw pointer.
        let out = SendPtr(y.as_mut_ptr());
        let work = |t0: usize, t1: usize| {
            for t in t0..t1 {
                let c0 = t * TILE;
                let w = (n - c0).min(TILE);
                // SAFETY: y has m * n elements; this tile writes only
                // columns c0..c0 + w of each row, and no other task does.
                let wt = &self.packed[t * k * TILE..(t + 1) * k * TILE];
                unsafe { tile(x, m, k, wt, n, c0, w, &self.bias[c0..c0 + TILE], out.get()) };
            }
        };
        let threads = rayon::current_num_threads();
        if m * k * n < par_min_macs() || threads == 1 || tiles < 2 {
            work(0, tiles);
            return;
        }
        // A few chunks per thread: a thread that wakes late (a futex wake
        // is tens of microseconds) leaves its share to be stolen instead of
        // holding up the join (2 chunks on 2 threads measured ~1.3x one
        // thread at m >= 16, 4 per thread ~1.7x: examples/matmul_bench).
        let chunks = (threads * CHUNKS_PER_THREAD).min(tiles);
        let per = tiles.div_ceil(chunks);
        (0..chunks)
            .into_par_iter()
            .for_each(|c| work(c * per, ((c + 1) * per).min(tiles)));
    }
}

struct SendPtr(*mut f32);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// A method, so closures capture the whole (Sync) wrapper.
    fn get(&self) -> *mut f32 {
        self.0
    }
}

/// Columns `c0..c0 + w` (w <= TILE) of `y = x W^T + b`, from the tile's
/// packed weights `wt` (k, TILE) and bias (TILE).
///
/// # Safety
/// `y` points to `m * n` writable floats.
#[allow(clippy::too_many_arguments)]
unsafe fn tile<W: WeightElem>(
    x: &[f32],
    m: usize,
    k: usize,
    wt: &[W],
    n: usize,
    c0: usize,
    w: usize,
    bias: &[f32],
    y: *mut f32,
) {
    #[cfg(target_arch = "x86_64")]
    if avx512::available() {
        // SAFETY: AVX-512F was detected at run time.
        avx512::tile(x, m, k, wt, n, c0, w, bias, y);
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if avx2::available() {
        // SAFETY: AVX2, FMA and F16C were detected at run time.
        avx2::tile(x, m, k, wt, n, c0, w, bias, y);
        return;
    }
    portable::tile(x, m, k, wt, n, c0, w, bias, y)
}
