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

use half::f16;
use rayon::prelude::*;

/// Work chunks per thread in a parallel matmul (see `Matrix::forward`).
const CHUNKS_PER_THREAD: usize = 4;

/// Output columns per tile (4 AVX registers per row).
pub const TILE: usize = 32;
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
    if simd::available() {
        // SAFETY: AVX2, FMA and F16C were detected at run time.
        simd::tile(x, m, k, wt, n, c0, w, bias, y);
        return;
    }
    for r in 0..m {
        let mut acc = [0f32; TILE];
        acc.copy_from_slice(bias);
        let xr = &x[r * k..(r + 1) * k];
        for (xv, row) in xr.iter().zip(wt.chunks_exact(TILE)) {
            for (a, wv) in acc.iter_mut().zip(row) {
                *a += xv * wv.to_f32();
            }
        }
        std::ptr::copy_nonoverlapping(acc.as_ptr(), y.add(r * n + c0), w);
    }
}

// Register tiles read best as indexed loops (row r, register j).
#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)]
mod simd {
    use super::{WeightElem, TILE};
    use std::arch::x86_64::*;

    pub fn available() -> bool {
        use std::sync::OnceLock;
        static OK: OnceLock<bool> = OnceLock::new();
        *OK.get_or_init(|| {
            is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
        })
    }

    #[inline(always)]
    unsafe fn load8<W: WeightElem>(p: *const W) -> __m256 {
        if W::IS_F16 {
            _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
        } else {
            _mm256_loadu_ps(p as *const f32)
        }
    }

    /// Rows two at a time: 8 accumulators (2 rows x 4 registers of 8 columns)
    /// hide the FMA latency, and each weight load serves both rows.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn tile<W: WeightElem>(
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
        let init = |j: usize| _mm256_loadu_ps(bias.as_ptr().add(8 * j));
        let wp = wt.as_ptr();
        // A full tile stores straight into y; the last, narrower one goes
        // through a buffer.
        let store = |row: usize, a: &[__m256; 4]| {
            if w == TILE {
                for (j, v) in a.iter().enumerate() {
                    _mm256_storeu_ps(y.add(row * n + c0 + 8 * j), *v);
                }
            } else {
                let mut buf = [0f32; TILE];
                for (j, v) in a.iter().enumerate() {
                    _mm256_storeu_ps(buf.as_mut_ptr().add(8 * j), *v);
                }
                std::ptr::copy_nonoverlapping(buf.as_ptr(), y.add(row * n + c0), w);
            }
        };
        if m >= 4 {
            // Many rows: blocks of 4..=WIDE rows over half a tile each, the
            // rows spread evenly (8 rows as 4 + 4, not 6 + 2: a block needs
            // 8+ independent FMA chains to hide the FMA latency).
            let blocks = m.div_ceil(WIDE);
            let mut r = 0;
            for b in 0..blocks {
                let n_rows = m / blocks + usize::from(b < m % blocks);
                match n_rows {
                    1 => block::<W, 1>(x, r, k, wt, n, c0, w, bias, y),
                    2 => block::<W, 2>(x, r, k, wt, n, c0, w, bias, y),
                    3 => block::<W, 3>(x, r, k, wt, n, c0, w, bias, y),
                    4 => block::<W, 4>(x, r, k, wt, n, c0, w, bias, y),
                    5 => block::<W, 5>(x, r, k, wt, n, c0, w, bias, y),
                    _ => block::<W, 6>(x, r, k, wt, n, c0, w, bias, y),
                }
                r += n_rows;
            }
            debug_assert_eq!(r, m);
            return;
        }
        let mut r = 0;
        while r + 2 <= m {
            let (x0, x1) = (x.as_ptr().add(r * k), x.as_ptr().add((r + 1) * k));
            let mut a = [init(0), init(1), init(2), init(3)];
            let mut b = a;
            for i in 0..k {
                let p = wp.add(i * TILE);
                let wv = [
                    load8(p),
                    load8(p.add(8)),
                    load8(p.add(16)),
                    load8(p.add(24)),
                ];
                let (u, v) = (_mm256_set1_ps(*x0.add(i)), _mm256_set1_ps(*x1.add(i)));
                for j in 0..4 {
                    a[j] = _mm256_fmadd_ps(u, wv[j], a[j]);
                    b[j] = _mm256_fmadd_ps(v, wv[j], b[j]);
                }
            }
            store(r, &a);
            store(r + 1, &b);
            r += 2;
        }
        if r < m {
            // One row, summed in the same order as the two-row path (so
            // results do not depend on the row count).
            let x0 = x.as_ptr().add(r * k);
            let mut a = [init(0), init(1), init(2), init(3)];
            for i in 0..k {
                let p = wp.add(i * TILE);
                let u = _mm256_set1_ps(*x0.add(i));
                for j in 0..4 {
                    a[j] = _mm256_fmadd_ps(u, load8(p.add(8 * j)), a[j]);
                }
            }
            store(r, &a);
        }
    }

    /// Rows per block of the many-row path: 2 x WIDE accumulators + 2
    /// weight registers + a broadcast fit AVX2's 16 registers.
    const WIDE: usize = 6;

    /// Rows r0..r0 + R, one half of the tile (16 columns, 2 registers) at a
    /// time, so each weight load (and f16 conversion) serves R rows instead
    /// of 2. Every output is bias, then the products in k order: the sums
    /// of the one- and two-row paths, so results do not depend on the row
    /// count.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn block<W: WeightElem, const R: usize>(
        x: &[f32],
        r0: usize,
        k: usize,
        wt: &[W],
        n: usize,
        c0: usize,
        w: usize,
        bias: &[f32],
        y: *mut f32,
    ) {
        let (wp, xp) = (wt.as_ptr(), x.as_ptr().add(r0 * k));
        for col in [0, 16] {
            if col >= w {
                break;
            }
            let b = [
                _mm256_loadu_ps(bias.as_ptr().add(col)),
                _mm256_loadu_ps(bias.as_ptr().add(col + 8)),
            ];
            let mut acc = [b; R];
            for i in 0..k {
                let p = wp.add(i * TILE + col);
                let (w0, w1) = (load8(p), load8(p.add(8)));
                for r in 0..R {
                    let u = _mm256_set1_ps(*xp.add(r * k + i));
                    acc[r][0] = _mm256_fmadd_ps(u, w0, acc[r][0]);
                    acc[r][1] = _mm256_fmadd_ps(u, w1, acc[r][1]);
                }
            }
            let cols = (w - col).min(16);
            for (r, a) in acc.iter().enumerate() {
                let at = y.add((r0 + r) * n + c0 + col);
                if cols == 16 {
                    _mm256_storeu_ps(at, a[0]);
                    _mm256_storeu_ps(at.add(8), a[1]);
                } else {
                    let mut buf = [0f32; 16];
                    _mm256_storeu_ps(buf.as_mut_ptr(), a[0]);
                    _mm256_storeu_ps(buf.as_mut_ptr().add(8), a[1]);
                    std::ptr::copy_nonoverlapping(buf.as_ptr(), at, cols);
                }
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
        super::dot_portable(a, b)
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn attend_head(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        keys: super::KeyRows<'_>,
        scale: f32,
        att: &mut [f32],
        out: &mut [f32],
    ) {
        match (q.len(), keys.tail) {
            (64, None) => head::<8, _>(q, k, v, |j| j, scale, att, out),
            (128, None) => head::<16, _>(q, k, v, |j| j, scale, att, out),
            (32, None) => head::<4, _>(q, k, v, |j| j, scale, att, out),
            (64, Some(_)) => head::<8, _>(q, k, v, |j| keys.row(j), scale, att, out),
            (128, Some(_)) => head::<16, _>(q, k, v, |j| keys.row(j), scale, att, out),
            (32, Some(_)) => head::<4, _>(q, k, v, |j| keys.row(j), scale, att, out),
            _ => super::attend_head_portable(q, k, v, keys, scale, att, out),
        }
    }

    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)))
    }

    /// One head of width 8 L: scores four keys at a time (four independent
    /// FMA chains), softmax, then the weighted sum of values kept in L
    /// registers until the end (the portable loop stored and reloaded the
    /// output for every key: a quarter of a batched forward's time).
    #[inline(always)]
    unsafe fn head<const L: usize, R: Fn(usize) -> usize>(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        row: R,
        scale: f32,
        att: &mut [f32],
        out: &mut [f32],
    ) {
        let hs = 8 * L;
        let n = att.len();
        debug_assert!(
            n == 0 || (k.len() >= (row(n - 1) + 1) * hs && v.len() >= (row(n - 1) + 1) * hs)
        );
        debug_assert!(out.len() == hs);
        let (qp, kp, vp) = (q.as_ptr(), k.as_ptr(), v.as_ptr());
        let mut qv = [_mm256_setzero_ps(); L];
        for (l, r) in qv.iter_mut().enumerate() {
            *r = _mm256_loadu_ps(qp.add(8 * l));
        }
        let mut j = 0;
        while j + 4 <= n {
            let mut acc = [_mm256_setzero_ps(); 4];
            for (l, qr) in qv.iter().enumerate() {
                for (i, a) in acc.iter_mut().enumerate() {
                    *a = _mm256_fmadd_ps(*qr, _mm256_loadu_ps(kp.add(row(j + i) * hs + 8 * l)), *a);
                }
            }
            for (i, a) in acc.iter().enumerate() {
                att[j + i] = hsum(*a) * scale;
            }
            j += 4;
        }
        while j < n {
            let mut a = _mm256_setzero_ps();
            for (l, qr) in qv.iter().enumerate() {
                a = _mm256_fmadd_ps(*qr, _mm256_loadu_ps(kp.add(row(j) * hs + 8 * l)), a);
            }
            att[j] = hsum(a) * scale;
            j += 1;
        }
        super::softmax_portable(att);
        let mut o = [_mm256_setzero_ps(); L];
        for (j, w) in att.iter().enumerate() {
            let w = _mm256_set1_ps(*w);
            for (l, r) in o.iter_mut().enumerate() {
                *r = _mm256_fmadd_ps(w, _mm256_loadu_ps(vp.add(row(j) * hs + 8 * l)), *r);
            }
        }
        for (l, r) in o.iter().enumerate() {
            _mm256_storeu_ps(out.as_mut_ptr().add(8 * l), *r);
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn gelu_tanh(x: &mut [f32]) {
        super::gelu_portable(x)
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
        super::axpy_portable(y, a, x)
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn softmax(x: &mut [f32]) -> f32 {
        super::softmax_portable(x)
    }

    #[target_feature(enable = "avx2,f16c")]
    pub unsafe fn sum_rows_f16(acc: &mut [f32], src: &[half::f16], offsets: &[u32]) {
        let n = acc.len();
        let (a, p) = (acc.as_mut_ptr(), src.as_ptr());
        let mut j = 0;
        while j + 8 <= n {
            let mut v = _mm256_loadu_ps(a.add(j));
            for &o in offsets {
                let h = _mm_loadu_si128(p.add(o as usize + j) as *const __m128i);
                v = _mm256_add_ps(v, _mm256_cvtph_ps(h));
            }
            _mm256_storeu_ps(a.add(j), v);
            j += 8;
        }
        for jj in j..n {
            for &o in offsets {
                *a.add(jj) += (*p.add(o as usize + jj)).to_f32();
            }
        }
    }
}

/// AVX-512: rows four at a time, each with 2 registers of 16 columns and
/// `k` split in two halves (16 accumulators, 16 independent FMAs per
/// weight pair), so a verify step reads each weight once per 4 rows.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)]
mod avx512 {
    use super::{WeightElem, TILE};
    use std::arch::x86_64::*;

    pub fn available() -> bool {
        use std::sync::OnceLock;
        static OK: OnceLock<bool> = OnceLock::new();
        *OK.get_or_init(|| {
            std::env::var_os("GPT_SERVE_NO_AVX512").is_none()
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("f16c")
        })
    }

    #[inline(always)]
    unsafe fn load16<W: WeightElem>(p: *const W) -> __m512 {
        if W::IS_F16 {
            _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
        } else {
            _mm512_loadu_ps(p as *const f32)
        }
    }

    #[target_feature(enable = "avx512f,f16c")]
    pub unsafe fn sum_rows_f16(acc: &mut [f32], src: &[half::f16], offsets: &[u32]) {
        let n = acc.len();
        let (a, p) = (acc.as_mut_ptr(), src.as_ptr());
        let mut j = 0;
        while j + 16 <= n {
            let mut v = _mm512_loadu_ps(a.add(j));
            for &o in offsets {
                let h = _mm256_loadu_si256(p.add(o as usize + j) as *const __m256i);
                v = _mm512_add_ps(v, _mm512_cvtph_ps(h));
            }
            _mm512_storeu_ps(a.add(j), v);
            j += 16;
        }
        for jj in j..n {
            for &o in offsets {
                *a.add(jj) += (*p.add(o as usize + jj)).to_f32();
            }
        }
    }

    #[target_feature(enable = "avx512f,f16c")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn tile<W: WeightElem>(
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
        // Every row is summed in the same order (k in two halves, then
        // bias + half 0 + half 1) whatever the chunk, so a row's result does
        // not depend on how many rows share the call: a k-row verify gives
        // bitwise the logits of k one-row steps, and speculative output
        // equals plain output even at sampling boundaries.
        //
        // Up to 4 rows interleave the two halves (enough independent FMA
        // chains for one row); 5..=WIDE rows run the halves one after the
        // other, so each weight load (and f16 conversion) serves up to WIDE
        // rows while 2 x WIDE accumulators stay in registers. Both orders
        // are the same per-row sums: bitwise-equal results.
        let mut r = 0;
        while r < m {
            let n_rows = (m - r).min(WIDE);
            macro_rules! go {
                ($($n:literal => $f:ident),*) => {
                    match n_rows {
                        $($n => $f::<W, $n>(x, r, k, wt, n, c0, w, bias, y),)*
                        _ => unreachable!("row block of {n_rows}"),
                    }
                };
            }
            go!(1 => interleaved, 2 => interleaved, 3 => interleaved, 4 => interleaved,
                5 => halves, 6 => halves, 7 => halves, 8 => halves,
                9 => halves, 10 => halves, 11 => halves, 12 => halves);
            r += n_rows;
        }
    }

    /// Rows per register block: 2 x 12 accumulators + 2 weight registers +
    /// a broadcast fit AVX-512's 32 registers.
    const WIDE: usize = 12;

    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn interleaved<W: WeightElem, const R: usize>(
        x: &[f32],
        r0: usize,
        k: usize,
        wt: &[W],
        n: usize,
        c0: usize,
        w: usize,
        bias: &[f32],
        y: *mut f32,
    ) {
        rows::<W, R, 2>(x, r0, k, wt, n, c0, w, bias, y)
    }

    /// Sums `x[r] * w` over `at` in `a` then `b` for rows r0..r0 + R, one
    /// pass over the weights for all R rows.
    #[inline(always)]
    unsafe fn partial<W: WeightElem, const R: usize>(
        xp: *const f32,
        k: usize,
        wp: *const W,
        a: std::ops::Range<usize>,
        b: std::ops::Range<usize>,
    ) -> [[__m512; 2]; R] {
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        for at in a.chain(b) {
            let p = wp.add(at * TILE);
            if PF > 0 {
                let q = p.wrapping_add(PF * TILE) as *const i8;
                _mm_prefetch::<_MM_HINT_T0>(q);
                _mm_prefetch::<_MM_HINT_T0>(q.wrapping_add(64));
            }
            let (w0, w1) = (load16(p), load16(p.add(16)));
            for rr in 0..R {
                let u = _mm512_set1_ps(*xp.add(rr * k + at));
                acc[rr][0] = _mm512_fmadd_ps(u, w0, acc[rr][0]);
                acc[rr][1] = _mm512_fmadd_ps(u, w1, acc[rr][1]);
            }
        }
        acc
    }

    /// Rows r0..r0 + R: half 0 of k (then the odd tail), then half 1, then
    /// bias + half 0 + half 1, exactly the sums of [`rows`] with S = 2.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn halves<W: WeightElem, const R: usize>(
        x: &[f32],
        r0: usize,
        k: usize,
        wt: &[W],
        n: usize,
        c0: usize,
        w: usize,
        bias: &[f32],
        y: *mut f32,
    ) {
        let (wp, xp) = (wt.as_ptr(), x.as_ptr().add(r0 * k));
        let ks = k / 2;
        let p0 = partial::<W, R>(xp, k, wp, 0..ks, 2 * ks..k);
        let p1 = partial::<W, R>(xp, k, wp, ks..2 * ks, 0..0);
        let b = [
            _mm512_loadu_ps(bias.as_ptr()),
            _mm512_loadu_ps(bias.as_ptr().add(16)),
        ];
        for rr in 0..R {
            let v = [
                _mm512_add_ps(_mm512_add_ps(b[0], p0[rr][0]), p1[rr][0]),
                _mm512_add_ps(_mm512_add_ps(b[1], p0[rr][1]), p1[rr][1]),
            ];
            store(y, (r0 + rr) * n + c0, w, v);
        }
    }

    #[inline(always)]
    unsafe fn store(y: *mut f32, at: usize, w: usize, v: [__m512; 2]) {
        if w == TILE {
            _mm512_storeu_ps(y.add(at), v[0]);
            _mm512_storeu_ps(y.add(at + 16), v[1]);
        } else {
            let mut buf = [0f32; TILE];
            _mm512_storeu_ps(buf.as_mut_ptr(), v[0]);
            _mm512_storeu_ps(buf.as_mut_ptr().add(16), v[1]);
            std::ptr::copy_nonoverlapping(buf.as_ptr(), y.add(at), w);
        }
    }

    /// Prefetch distance in rows of a tile (0: off); reading past the end
    /// of the weights is harmless for a prefetch.
    const PF: usize = 32;

    /// Rows r0..r0 + R with k split in S interleaved parts.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn rows<W: WeightElem, const R: usize, const S: usize>(
        x: &[f32],
        r0: usize,
        k: usize,
        wt: &[W],
        n: usize,
        c0: usize,
        w: usize,
        bias: &[f32],
        y: *mut f32,
    ) {
        let wp = wt.as_ptr();
        let xp = x.as_ptr().add(r0 * k);
        let mut acc = [[[_mm512_setzero_ps(); 2]; R]; S];
        let ks = k / S;
        for i in 0..ks {
            for s in 0..S {
                let at = s * ks + i;
                let p = wp.add(at * TILE);
                // Software prefetch PF rows ahead: more misses in flight
                // than the hardware prefetcher keeps for these streams.
                if PF > 0 {
                    let q = p.wrapping_add(PF * TILE) as *const i8;
                    _mm_prefetch::<_MM_HINT_T0>(q);
                    _mm_prefetch::<_MM_HINT_T0>(q.wrapping_add(64));
                }
                let (w0, w1) = (load16(p), load16(p.add(16)));
                for rr in 0..R {
                    let u = _mm512_set1_ps(*xp.add(rr * k + at));
                    acc[s][rr][0] = _mm512_fmadd_ps(u, w0, acc[s][rr][0]);
                    acc[s][rr][1] = _mm512_fmadd_ps(u, w1, acc[s][rr][1]);
                }
            }
        }
        for at in S * ks..k {
            let p = wp.add(at * TILE);
            let (w0, w1) = (load16(p), load16(p.add(16)));
            for rr in 0..R {
                let u = _mm512_set1_ps(*xp.add(rr * k + at));
                acc[0][rr][0] = _mm512_fmadd_ps(u, w0, acc[0][rr][0]);
                acc[0][rr][1] = _mm512_fmadd_ps(u, w1, acc[0][rr][1]);
            }
        }
        let b = [
            _mm512_loadu_ps(bias.as_ptr()),
            _mm512_loadu_ps(bias.as_ptr().add(16)),
        ];
        for rr in 0..R {
            let mut v = b;
            for part in acc.iter() {
                v[0] = _mm512_add_ps(v[0], part[rr][0]);
                v[1] = _mm512_add_ps(v[1], part[rr][1]);
            }
            store(y, (r0 + rr) * n + c0, w, v);
        }
    }
}

/// `sum a[i] * b[i]`, 8 lanes (vectorised by the compiler).
#[inline(always)]
fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[inline(always)]
fn axpy_portable(y: &mut [f32], a: f32, x: &[f32]) {
    for (yv, xv) in y.iter_mut().zip(x) {
        *yv += a * xv;
    }
}

pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if simd::available() {
        // SAFETY: features detected at run time.
        return unsafe { simd::dot(a, b) };
    }
    dot_portable(a, b)
}

/// `y += a * x`.
pub fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if simd::available() {
        // SAFETY: features detected at run time.
        return unsafe { simd::axpy(y, a, x) };
    }
    axpy_portable(y, a, x)
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
    if simd::available() {
        // SAFETY: as above.
        return unsafe { simd::sum_rows_f16(acc, src, offsets) };
    }
    for &o in offsets {
        for (a, v) in acc.iter_mut().zip(&src[o as usize..o as usize + n]) {
            *a += v.to_f32();
        }
    }
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
pub fn attend_head(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    keys: KeyRows<'_>,
    scale: f32,
    att: &mut [f32],
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if simd::available() {
        // SAFETY: features detected at run time.
        return unsafe { simd::attend_head(q, k, v, keys, scale, att, out) };
    }
    attend_head_portable(q, k, v, keys, scale, att, out)
}

#[inline(always)]
fn attend_head_portable(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    keys: KeyRows<'_>,
    scale: f32,
    att: &mut [f32],
    out: &mut [f32],
) {
    let hs = q.len();
    for (j, a) in att.iter_mut().enumerate() {
        let r = keys.row(j);
        *a = dot_portable(q, &k[r * hs..(r + 1) * hs]) * scale;
    }
    softmax(att);
    out.fill(0.0);
    for (j, a) in att.iter().enumerate() {
        let r = keys.row(j);
        axpy_portable(out, *a, &v[r * hs..(r + 1) * hs]);
    }
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
    if simd::available() {
        // SAFETY: features detected at run time.
        return unsafe { simd::gelu_tanh(x) };
    }
    gelu_portable(x)
}

#[inline(always)]
fn gelu_portable(x: &mut [f32]) {
    const S: f32 = 0.797_884_6; // sqrt(2/pi)
    for v in x {
        let u = *v;
        *v = 0.5 * u * (1.0 + tanh_fast(S * (u + 0.044715 * u * u * u)));
    }
}

/// tanh by Lambert's continued fraction truncated to a [9/8] rational,
/// clamped to [-1, 1]: branch-free, so the GELU loop vectorises (libm's
/// tanhf took 16% of a verify step). Max error 7e-6 (test below), far
/// below the f32 rounding of the matmuls around it.
#[inline(always)]
pub fn tanh_fast(x: f32) -> f32 {
    let x = x.clamp(-10.0, 10.0);
    let x2 = x * x;
    let p = x * (34459425.0 + x2 * (4729725.0 + x2 * (135135.0 + x2 * (990.0 + x2))));
    let q = 34459425.0 + x2 * (16216200.0 + x2 * (945945.0 + x2 * (13860.0 + x2 * 45.0)));
    (p / q).clamp(-1.0, 1.0)
}

/// e^x for x <= 0 (softmax after subtracting the max), branch-free so the
/// loops around it vectorise: 2^(x log2 e) split into 2^n (exponent bits)
/// times a degree-6 polynomial for 2^f, f in [0, 1). Relative error < 2e-5
/// (f32 rounding of x log2 e at large |x|; test below); 0 below -87 (f32's smallest normal). libm's expf was 4-10%
/// of a decode step and most of a drafter prediction.
#[inline(always)]
pub fn exp_neg(x: f32) -> f32 {
    let t = x * std::f32::consts::LOG2_E;
    let t = if t < -126.0 { -126.0 } else { t };
    // floor(t) with float ops only: adding 1.5 * 2^23 rounds to an integer
    // (exact for |t| < 2^22), then step down where that rounded up. A
    // float-to-int cast (saturating in Rust) was scalarised element by
    // element and made the whole softmax loop scalar.
    const ROUND: f32 = 12_582_912.0;
    let r = (t + ROUND) - ROUND;
    let n = r - if r > t { 1.0 } else { 0.0 };
    let f = t - n;
    let p = 1.0
        + f * (std::f32::consts::LN_2
            + f * (0.240_226_5
                + f * (0.055_504_11
                    + f * (0.009_618_129 + f * (0.001_333_355 + f * 0.000_154_035_3)))));
    // 2^n from the bits of n + 127 (an integer in 1..=127): adding 2^23
    // puts it in the low mantissa bits, and shifting by 23 moves it into
    // the exponent field (the constant's own bits shift out).
    let scale = f32::from_bits(((n + 127.0) + 8_388_608.0).to_bits() << 23);
    if x < -87.0 {
        0.0
    } else {
        p * scale
    }
}

/// Softmax in place; returns the log-sum-exp of the input (the log of
/// softmax's normaliser, for a cross-entropy from the same pass).
pub fn softmax(x: &mut [f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if simd::available() {
        // SAFETY: features detected at run time.
        return unsafe { simd::softmax(x) };
    }
    softmax_portable(x)
}

/// Max and sum in 16 independent lanes: a plain fold is a serial chain
/// (and `f32::max`'s NaN rule a compare per element) that the compiler does
/// not vectorise; this compiles to packed max/exp/add (a K = 255 drafter
/// softmax went from ~2.5 us to well under 1 us).
#[inline(always)]
fn softmax_portable(x: &mut [f32]) -> f32 {
    const L: usize = 16;
    let n = x.len();
    let full = n / L * L;
    // The tail padded with -inf (e^-inf = 0) so every step is 16 lanes.
    let mut tail = [f32::NEG_INFINITY; L];
    tail[..n - full].copy_from_slice(&x[full..]);
    let mut mx = [f32::NEG_INFINITY; L];
    let lanes_max = |mx: &mut [f32; L], ch: &[f32; L]| {
        for (m, v) in mx.iter_mut().zip(ch) {
            *m = if *v > *m { *v } else { *m };
        }
    };
    for ch in x[..full].chunks_exact(L) {
        lanes_max(&mut mx, ch.try_into().expect("16 lanes"));
    }
    lanes_max(&mut mx, &tail);
    let max = mx
        .iter()
        .fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a });
    let mut sum = [0f32; L];
    let lanes_exp = |sum: &mut [f32; L], ch: &mut [f32; L]| {
        for (s, v) in sum.iter_mut().zip(ch.iter_mut()) {
            *v = exp_neg(*v - max);
            *s += *v;
        }
    };
    for ch in x[..full].chunks_exact_mut(L) {
        lanes_exp(&mut sum, ch.try_into().expect("16 lanes"));
    }
    lanes_exp(&mut sum, &mut tail);
    x[full..].copy_from_slice(&tail[..n - full]);
    let total = sum.iter().sum::<f32>();
    let inv = 1.0 / total;
    for v in x {
        *v *= inv;
    }
    max + total.ln()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(x: &[f32], m: usize, w: &[f32], n: usize, k: usize, b: &[f32]) -> Vec<f32> {
        let mut y = vec![0f32; m * n];
        for r in 0..m {
            for o in 0..n {
                y[r * n + o] = b[o] + (0..k).map(|i| x[r * k + i] * w[o * k + i]).sum::<f32>();
            }
        }
        y
    }

    fn data(len: usize, seed: u32) -> Vec<f32> {
        (0..len)
            .map(|i| {
                ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) % 1000) as f32 / 500.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn matmul_equals_the_naive_product_for_every_row_count_and_ragged_widths() {
        for (n, k) in [(96, 40), (70, 33), (1000, 64), (5, 3)] {
            let w = data(n * k, 1);
            let b = data(n, 2);
            for m in [1, 2, 3, 8, 17] {
                let x = data(m * k, 3);
                let want = naive(&x, m, &w, n, k, &b);
                let mat = Matrix::<f32>::from_out_in(&w, n, k, Some(b.clone()));
                let mut y = vec![0f32; m * n];
                mat.forward(&x, m, &mut y);
                let err = y
                    .iter()
                    .zip(&want)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0, f32::max);
                assert!(err < 1e-4, "n {n} k {k} m {m}: max err {err}");
                let mat16 = Matrix::<f16>::from_out_in(&w, n, k, Some(b.clone()));
                mat16.forward(&x, m, &mut y);
                let err = y
                    .iter()
                    .zip(&want)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0, f32::max);
                assert!(
                    err < 2e-2 * k as f32 / 32.0,
                    "f16 n {n} k {k} m {m}: max err {err}"
                );
            }
        }
    }

    #[test]
    fn a_row_gets_bitwise_the_same_result_whatever_the_row_count() {
        let (n, k) = (70, 45);
        let w = data(n * k, 6);
        let b = data(n, 7);
        let x = data(40 * k, 8);
        let f32s = Matrix::<f32>::from_out_in(&w, n, k, Some(b.clone()));
        let f16s = Matrix::<f16>::from_out_in(&w, n, k, Some(b));
        for m in [2, 4, 5, 9, 12, 13, 24, 40] {
            for dt in ["f32", "f16"] {
                let fwd = |x: &[f32], m: usize, y: &mut [f32]| match dt {
                    "f32" => f32s.forward(x, m, y),
                    _ => f16s.forward(x, m, y),
                };
                let mut all = vec![0f32; m * n];
                fwd(&x[..m * k], m, &mut all);
                for r in 0..m {
                    let mut one = vec![0f32; n];
                    fwd(&x[r * k..(r + 1) * k], 1, &mut one);
                    assert_eq!(one, all[r * n..(r + 1) * n], "{dt}: row {r} of {m}");
                }
            }
        }
    }

    #[test]
    fn fast_exp_has_relative_error_below_2e5_on_the_softmax_range() {
        let mut worst = 0f32;
        for i in 0..=870_000 {
            let x = -(i as f32) / 10_000.0;
            let (got, want) = (exp_neg(x), x.exp());
            worst = worst.max((got - want).abs() / want);
        }
        assert!(worst < 2e-5, "max relative error {worst}");
        assert_eq!(exp_neg(-100.0), 0.0);
        assert_eq!(exp_neg(0.0), 1.0);
    }

    #[test]
    fn fast_tanh_is_within_1e5_of_libm_everywhere() {
        let mut worst = 0f32;
        for i in -200_000..=200_000 {
            let x = i as f32 / 10_000.0;
            worst = worst.max((tanh_fast(x) - x.tanh()).abs());
        }
        assert!(worst < 1e-5, "max error {worst}");
    }

    #[test]
    fn attention_of_one_head_matches_the_portable_loop_for_every_width() {
        for hs in [16, 32, 64, 128] {
            for n in [1, 3, 4, 7, 130] {
                let q = data(hs, 11);
                let k = data(n * hs, 12);
                let v = data(n * hs, 13);
                let (mut att, mut want) = (vec![0f32; n], vec![0f32; hs]);
                attend_head_portable(&q, &k, &v, KeyRows::ALL, 0.125, &mut att, &mut want);
                let mut got = vec![0f32; hs];
                attend_head(&q, &k, &v, KeyRows::ALL, 0.125, &mut att, &mut got);
                let err = got
                    .iter()
                    .zip(&want)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0, f32::max);
                assert!(err < 1e-5, "hs {hs} n {n}: max err {err}");
            }
        }
    }

    #[test]
    fn attention_over_picked_rows_equals_attention_over_the_same_rows_stored_contiguously() {
        for hs in [16, 32, 64] {
            let (prefix, n_all) = (9, 17);
            let tail = [10usize, 12, 15, 16];
            let q = data(hs, 21);
            let k = data(n_all * hs, 22);
            let v = data(n_all * hs, 23);
            let picked: Vec<usize> = (0..prefix).chain(tail).collect();
            let gather = |m: &[f32]| -> Vec<f32> {
                picked
                    .iter()
                    .flat_map(|&r| m[r * hs..(r + 1) * hs].to_vec())
                    .collect()
            };
            let n = picked.len();
            let (mut att, mut want, mut got) = (vec![0f32; n], vec![0f32; hs], vec![0f32; hs]);
            attend_head(
                &q,
                &gather(&k),
                &gather(&v),
                KeyRows::ALL,
                0.125,
                &mut att,
                &mut want,
            );
            let keys = KeyRows {
                prefix,
                tail: Some(&tail),
            };
            attend_head(&q, &k, &v, keys, 0.125, &mut att, &mut got);
            assert_eq!(got, want, "hs {hs}");
        }
    }

    #[test]
    fn dot_and_axpy_match_scalar_loops_with_tails() {
        let a = data(37, 4);
        let b = data(37, 5);
        let want: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        assert!((dot(&a, &b) - want).abs() < 1e-4);
        let mut y = b.clone();
        axpy(&mut y, 0.5, &a);
        for i in 0..37 {
            assert!((y[i] - (b[i] + 0.5 * a[i])).abs() < 1e-6);
        }
    }
}
