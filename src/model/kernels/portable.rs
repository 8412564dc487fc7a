//! The portable loops: what every CPU runs where no SIMD path applies, and
//! what the SIMD paths reuse where the compiler's own vectorisation of
//! them is enough (dot, axpy, GELU, softmax). Written so the compiler
//! vectorises them: fixed lane counts, no serial folds, no branches.

use half::f16;

use super::approx::{exp_neg, tanh_fast};
use super::{KeyRows, WeightElem, TILE};

/// `sum a[i] * b[i]`, 8 lanes (vectorised by the compiler).
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    dot_w(a, b)
}

/// `y += a * x`.
#[inline(always)]
pub fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    axpy_w(y, a, x)
}

/// `sum a[i] * b[i]` with `b` widened to f32: [`dot`]'s lanes and order.
#[inline(always)]
fn dot_w<W: WeightElem>(a: &[f32], b: &[W]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y.to_f32())
        .sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l].to_f32();
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `y += a * x` with `x` widened to f32.
#[inline(always)]
fn axpy_w<W: WeightElem>(y: &mut [f32], a: f32, x: &[W]) {
    for (yv, xv) in y.iter_mut().zip(x) {
        *yv += a * xv.to_f32();
    }
}

/// One head of one query row (see [`super::attend_head`]).
#[inline(always)]
pub fn attend_head<W: WeightElem>(
    q: &[f32],
    k: &[W],
    v: &[W],
    keys: KeyRows<'_>,
    scale: f32,
    att: &mut [f32],
    out: &mut [f32],
) {
    let hs = q.len();
    for (j, a) in att.iter_mut().enumerate() {
        let r = keys.row(j);
        *a = dot_w(q, &k[r * hs..(r + 1) * hs]) * scale;
    }
    super::softmax(att);
    out.fill(0.0);
    for (j, a) in att.iter().enumerate() {
        let r = keys.row(j);
        axpy_w(out, *a, &v[r * hs..(r + 1) * hs]);
    }
}

/// GELU, tanh approximation, in place.
#[inline(always)]
pub fn gelu_tanh(x: &mut [f32]) {
    const S: f32 = 0.797_884_6; // sqrt(2/pi)
    for v in x {
        let u = *v;
        *v = 0.5 * u * (1.0 + tanh_fast(S * (u + 0.044715 * u * u * u)));
    }
}

/// Max and sum in 16 independent lanes: a plain fold is a serial chain
/// (and `f32::max`'s NaN rule a compare per element) that the compiler does
/// not vectorise; this compiles to packed max/exp/add (a K = 255 drafter
/// softmax went from ~2.5 us to well under 1 us).
#[inline(always)]
pub fn softmax(x: &mut [f32]) -> f32 {
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

/// `acc[j] += sum over o in offsets of src[o + j]` (see
/// [`super::sum_rows_f16`]).
#[inline(always)]
pub fn sum_rows_f16(acc: &mut [f32], src: &[f16], offsets: &[u32]) {
    let n = acc.len();
    for &o in offsets {
        for (a, v) in acc.iter_mut().zip(&src[o as usize..o as usize + n]) {
            *a += v.to_f32();
        }
    }
}

/// Columns `c0..c0 + w` of `y = x W^T + b` for rows 0..m (see
/// `matmul`'s `tile`).
///
/// # Safety
/// `y` points to `m * n` writable floats.
#[inline(always)]
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
