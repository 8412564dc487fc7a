//! AVX-512: rows four at a time, each with 2 registers of 16 columns and
//! `k` split in two halves (16 accumulators, 16 independent FMAs per
//! weight pair), so a verify step reads each weight once per 4 rows. Also
//! the f16 row sums, 16 columns at a time. `GPT_SERVE_NO_AVX512` turns
//! this path off (the AVX2 one then runs; `GPT_SERVE_NO_AVX2` as well
//! leaves the portable one, which CI tests that way).

// Register blocks read best as indexed loops (row rr, register j).
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;

use super::{WeightElem, TILE};

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
