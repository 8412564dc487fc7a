//! AVX2 + FMA + F16C: the matmul tile (rows two at a time, or in blocks
//! of up to `WIDE` rows over half a tile), one attention head held in
//! registers, and the f16 row sums; dot, axpy, GELU and softmax are the
//! portable loops compiled with these features enabled. Every path sums
//! each row in the same order whatever the row count.

// Register tiles read best as indexed loops (row r, register j).
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;

use super::{portable, KeyRows, WeightElem, TILE};

pub fn available() -> bool {
    use std::sync::OnceLock;
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        std::env::var_os("GPT_SERVE_NO_AVX2").is_none()
            && is_x86_feature_detected!("avx2")
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
    if m >= 4 {
        many_rows(x, m, k, wt, n, c0, w, bias, y);
        return;
    }
    let mut r = 0;
    while r + 2 <= m {
        two_rows(x, r, k, wt, n, c0, w, bias, y);
        r += 2;
    }
    if r < m {
        one_row(x, r, k, wt, n, c0, w, bias, y);
    }
}

/// The tile's bias in 4 registers: every output's sum starts from it.
#[inline(always)]
unsafe fn init(bias: &[f32]) -> [__m256; 4] {
    let b = bias.as_ptr();
    [
        _mm256_loadu_ps(b),
        _mm256_loadu_ps(b.add(8)),
        _mm256_loadu_ps(b.add(16)),
        _mm256_loadu_ps(b.add(24)),
    ]
}

/// Row `row`'s columns `c0..c0 + w` of `y` from 4 registers. A full tile
/// stores straight into y; the last, narrower one goes through a buffer.
#[inline(always)]
unsafe fn store(y: *mut f32, row: usize, n: usize, c0: usize, w: usize, a: &[__m256; 4]) {
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
}

/// Many rows (m >= 4): blocks of 4..=WIDE rows over half a tile each, the
/// rows spread evenly (8 rows as 4 + 4, not 6 + 2: a block needs 8+
/// independent FMA chains to hide the FMA latency).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn many_rows<W: WeightElem>(
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
}

/// Rows r and r + 1 over the whole tile: each weight load serves both.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn two_rows<W: WeightElem>(
    x: &[f32],
    r: usize,
    k: usize,
    wt: &[W],
    n: usize,
    c0: usize,
    w: usize,
    bias: &[f32],
    y: *mut f32,
) {
    let wp = wt.as_ptr();
    let (x0, x1) = (x.as_ptr().add(r * k), x.as_ptr().add((r + 1) * k));
    let mut a = init(bias);
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
    store(y, r, n, c0, w, &a);
    store(y, r + 1, n, c0, w, &b);
}

/// One row, summed in the same order as the two-row path (so results do
/// not depend on the row count).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn one_row<W: WeightElem>(
    x: &[f32],
    r: usize,
    k: usize,
    wt: &[W],
    n: usize,
    c0: usize,
    w: usize,
    bias: &[f32],
    y: *mut f32,
) {
    let wp = wt.as_ptr();
    let x0 = x.as_ptr().add(r * k);
    let mut a = init(bias);
    for i in 0..k {
        let p = wp.add(i * TILE);
        let u = _mm256_set1_ps(*x0.add(i));
        for j in 0..4 {
            a[j] = _mm256_fmadd_ps(u, load8(p.add(8 * j)), a[j]);
        }
    }
    store(y, r, n, c0, w, &a);
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
    portable::dot(a, b)
}

#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn attend_head<W: WeightElem>(
    q: &[f32],
    k: &[W],
    v: &[W],
    keys: KeyRows<'_>,
    scale: f32,
    att: &mut [f32],
    out: &mut [f32],
) {
    match (q.len(), keys.tail) {
        (64, None) => head::<8, _, _>(q, k, v, |j| j, scale, att, out),
        (128, None) => head::<16, _, _>(q, k, v, |j| j, scale, att, out),
        (32, None) => head::<4, _, _>(q, k, v, |j| j, scale, att, out),
        (64, Some(_)) => head::<8, _, _>(q, k, v, |j| keys.row(j), scale, att, out),
        (128, Some(_)) => head::<16, _, _>(q, k, v, |j| keys.row(j), scale, att, out),
        (32, Some(_)) => head::<4, _, _>(q, k, v, |j| keys.row(j), scale, att, out),
        _ => portable::attend_head(q, k, v, keys, scale, att, out),
    }
}

#[inline(always)]
unsafe fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)))
}

/// Bytes of keys ahead of the one being scored that are prefetched.
const KEY_BYTES_AHEAD: usize = 4096;

/// Asks for the cache lines of a row of `hs` elements at `p` (a hint: it
/// changes no result). At 32 sequences each head's keys and values come
/// from memory, and the hardware prefetcher alone left attention waiting
/// on them (`examples/attend_bench.rs`).
#[inline(always)]
unsafe fn prefetch_row<W>(p: *const W, hs: usize) {
    let (p, bytes) = (p as *const i8, hs * std::mem::size_of::<W>());
    for at in (0..bytes).step_by(64) {
        _mm_prefetch::<_MM_HINT_T0>(p.add(at));
    }
}

/// One head of width 8 L: scores four keys at a time (four independent
/// FMA chains), softmax, then the weighted sum of values kept in L
/// registers until the end (the portable loop stored and reloaded the
/// output for every key: a quarter of a batched forward's time).
#[inline(always)]
unsafe fn head<const L: usize, W: WeightElem, R: Fn(usize) -> usize>(
    q: &[f32],
    k: &[W],
    v: &[W],
    row: R,
    scale: f32,
    att: &mut [f32],
    out: &mut [f32],
) {
    let hs = 8 * L;
    let n = att.len();
    debug_assert!(n == 0 || (k.len() >= (row(n - 1) + 1) * hs && v.len() >= (row(n - 1) + 1) * hs));
    debug_assert!(out.len() == hs);
    let (qp, kp, vp) = (q.as_ptr(), k.as_ptr(), v.as_ptr());
    let mut qv = [_mm256_setzero_ps(); L];
    for (l, r) in qv.iter_mut().enumerate() {
        *r = _mm256_loadu_ps(qp.add(8 * l));
    }
    let ahead = KEY_BYTES_AHEAD / (hs * std::mem::size_of::<W>());
    let mut j = 0;
    while j + 4 <= n {
        for i in 0..4 {
            prefetch_row(kp.add(row((j + i + ahead).min(n - 1)) * hs), hs);
            prefetch_row(vp.add(row(j + i) * hs), hs);
        }
        let mut acc = [_mm256_setzero_ps(); 4];
        for (l, qr) in qv.iter().enumerate() {
            for (i, a) in acc.iter_mut().enumerate() {
                *a = _mm256_fmadd_ps(*qr, load8(kp.add(row(j + i) * hs + 8 * l)), *a);
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
            a = _mm256_fmadd_ps(*qr, load8(kp.add(row(j) * hs + 8 * l)), a);
        }
        att[j] = hsum(a) * scale;
        j += 1;
    }
    portable::softmax(att);
    let mut o = [_mm256_setzero_ps(); L];
    for (j, w) in att.iter().enumerate() {
        let w = _mm256_set1_ps(*w);
        for (l, r) in o.iter_mut().enumerate() {
            *r = _mm256_fmadd_ps(w, load8(vp.add(row(j) * hs + 8 * l)), *r);
        }
    }
    for (l, r) in o.iter().enumerate() {
        _mm256_storeu_ps(out.as_mut_ptr().add(8 * l), *r);
    }
}

#[target_feature(enable = "avx2,fma")]
pub unsafe fn gelu_tanh(x: &mut [f32]) {
    portable::gelu_tanh(x)
}

#[target_feature(enable = "avx2,fma")]
pub unsafe fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    portable::axpy(y, a, x)
}

#[target_feature(enable = "avx2,fma")]
pub unsafe fn softmax(x: &mut [f32]) -> f32 {
    portable::softmax(x)
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
