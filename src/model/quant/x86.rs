//! The x86-64 int8 kernels of the quantized matmul, over `packed`'s
//! layout: a 64-byte line holds 4 quants of each of 16 outputs, so one
//! multiply-add of the line by 4 activation bytes broadcast to every lane
//! adds 4 products into each output's own int32 lane. A block's 32
//! products accumulate exactly in that lane (no horizontal sums), then
//! every lane does the portable loop's f32 steps in its order:
//! `sum += (d_w * d_x) * dot` (see `quant`'s doc). Up to 4 activation rows
//! share each loaded line, and a group's lines stay in L1 across all rows.
//!
//! The two int8 products (ggml uses the same tricks):
//! - VNNI `vpdpbusd` (512-bit, 16 outputs per register) multiplies
//!   unsigned by signed bytes with no i16 step: Q8_0 weights are stored as
//!   `w + 128` and Q4_0 nibbles (0..15) enter as they are; the int32 lane
//!   starts at `-128 * sum(x)` or `-8 * sum(x)` to take the offset out.
//! - AVX2 `vpmaddubsw` (256-bit, 8 outputs, so a group is two halves)
//!   sums pairs in i16, so a Q8_0 weight enters as |w| and the activation
//!   takes w's sign (`vpsignb`); pair sums stay below i16's limit
//!   (2 * 128 * 127 < 32767). Q4_0 nibbles enter unsigned, offset as above.
//!
//! The SIMD functions run past 80 lines where splitting them would cost
//! registers (exempt per the style guide's SIMD note).

use std::arch::x86_64::*;

use super::block::QK;
use super::matrix::Activations;
use super::packed::{lines_per_block, Line, GROUP};
use super::QuantKind;

/// Activation rows per pass over a group's lines.
const ROWS: usize = 4;

/// 4 activation bytes (quants `4q..4q+4` of block `i`) as one i32.
#[inline(always)]
unsafe fn x4(act: &Activations, i: usize, q: usize) -> i32 {
    // SAFETY: `run` checked act.qs holds every row's blocks.
    act.qs
        .as_ptr()
        .add(i * QK + q * 4)
        .cast::<i32>()
        .read_unaligned()
}

/// One kernel: rows `r0..r0 + R` of a group into `acc[r0..r0 + R]`.
trait Kernel {
    const KIND: QuantKind;
    unsafe fn rows<const R: usize>(
        lines: &[Line],
        act: &Activations,
        r0: usize,
        acc: &mut [[f32; GROUP]],
    );
}

struct Q8Vnni;
struct Q4Vnni;
struct Q8Avx2;
struct Q4Avx2;

/// `sums[r] += (dw * d_x) * f32(dots[r])` per lane, 16 lanes.
#[inline(always)]
unsafe fn scale_add_512<const R: usize>(
    sums: &mut [__m512; R],
    dots: &[__m512i; R],
    scales: *const Line,
    act: &Activations,
    r0: usize,
    b: usize,
) {
    let dw = _mm512_load_ps(scales.cast::<f32>());
    for r in 0..R {
        let scale = _mm512_mul_ps(dw, _mm512_set1_ps(act.d[(r0 + r) * act.nb + b]));
        sums[r] = _mm512_add_ps(sums[r], _mm512_mul_ps(_mm512_cvtepi32_ps(dots[r]), scale));
    }
}

/// The int32 lanes' starting values: `-offset * sum(x)` of each row's block.
#[inline(always)]
unsafe fn start_512<const R: usize>(
    act: &Activations,
    r0: usize,
    b: usize,
    offset: i32,
) -> [__m512i; R] {
    std::array::from_fn(|r| _mm512_set1_epi32(-offset * act.sum[(r0 + r) * act.nb + b]))
}

impl Kernel for Q8Vnni {
    const KIND: QuantKind = QuantKind::Q8_0;
    #[inline(always)]
    unsafe fn rows<const R: usize>(
        lines: &[Line],
        act: &Activations,
        r0: usize,
        acc: &mut [[f32; GROUP]],
    ) {
        let nb = act.nb;
        let mut sums = [_mm512_setzero_ps(); R];
        for b in 0..nb {
            let line = lines.as_ptr().add(b * (QK / 4 + 1));
            let mut dots = start_512::<R>(act, r0, b, 128);
            for q in 0..QK / 4 {
                let w = _mm512_load_si512(line.add(q).cast::<__m512i>());
                for (r, dot) in dots.iter_mut().enumerate() {
                    let x = _mm512_set1_epi32(x4(act, (r0 + r) * nb + b, q));
                    *dot = _mm512_dpbusd_epi32(*dot, w, x);
                }
            }
            scale_add_512(&mut sums, &dots, line.add(QK / 4), act, r0, b);
        }
        for (r, sum) in sums.iter().enumerate() {
            _mm512_storeu_ps(acc[r0 + r].as_mut_ptr(), *sum);
        }
    }
}

impl Kernel for Q4Vnni {
    const KIND: QuantKind = QuantKind::Q4_0;
    #[inline(always)]
    unsafe fn rows<const R: usize>(
        lines: &[Line],
        act: &Activations,
        r0: usize,
        acc: &mut [[f32; GROUP]],
    ) {
        let nb = act.nb;
        let mask = _mm512_set1_epi8(15);
        let mut sums = [_mm512_setzero_ps(); R];
        for b in 0..nb {
            let line = lines.as_ptr().add(b * (QK / 8 + 1));
            let mut dots = start_512::<R>(act, r0, b, 8);
            for j in 0..QK / 8 {
                let raw = _mm512_load_si512(line.add(j).cast::<__m512i>());
                let lo = _mm512_and_si512(raw, mask);
                let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(raw), mask);
                for (r, dot) in dots.iter_mut().enumerate() {
                    let i = (r0 + r) * nb + b;
                    let xl = _mm512_set1_epi32(x4(act, i, j));
                    let xh = _mm512_set1_epi32(x4(act, i, j + QK / 8));
                    *dot = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(*dot, lo, xl), hi, xh);
                }
            }
            scale_add_512(&mut sums, &dots, line.add(QK / 8), act, r0, b);
        }
        for (r, sum) in sums.iter().enumerate() {
            _mm512_storeu_ps(acc[r0 + r].as_mut_ptr(), *sum);
        }
    }
}

/// AVX2: `sums[r] += (dw * d_x) * f32(dots[r])` per lane, 8 lanes (half `h`).
#[inline(always)]
unsafe fn scale_add_256<const R: usize>(
    sums: &mut [__m256; R],
    dots: &[__m256i; R],
    scales: *const Line,
    h: usize,
    act: &Activations,
    (r0, b): (usize, usize),
) {
    let dw = _mm256_load_ps(scales.cast::<f32>().add(h * 8));
    for r in 0..R {
        let scale = _mm256_mul_ps(dw, _mm256_set1_ps(act.d[(r0 + r) * act.nb + b]));
        sums[r] = _mm256_add_ps(sums[r], _mm256_mul_ps(_mm256_cvtepi32_ps(dots[r]), scale));
    }
}

/// AVX2 `vpmaddubsw` then `vpmaddwd` by ones: 8 int32 sums of 4 products.
#[inline(always)]
unsafe fn maddubs(u: __m256i, s: __m256i) -> __m256i {
    _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1))
}

/// Half `h` of line `l` (outputs `8h..8h + 8`).
#[inline(always)]
unsafe fn half(l: *const Line, h: usize) -> __m256i {
    _mm256_load_si256(l.cast::<__m256i>().add(h))
}

impl Kernel for Q8Avx2 {
    const KIND: QuantKind = QuantKind::Q8_0;
    #[inline(always)]
    unsafe fn rows<const R: usize>(
        lines: &[Line],
        act: &Activations,
        r0: usize,
        acc: &mut [[f32; GROUP]],
    ) {
        let nb = act.nb;
        let flip = _mm256_set1_epi8(-128);
        for h in 0..2 {
            let mut sums = [_mm256_setzero_ps(); R];
            for b in 0..nb {
                let line = lines.as_ptr().add(b * (QK / 4 + 1));
                let mut dots = [_mm256_setzero_si256(); R];
                for q in 0..QK / 4 {
                    let w = _mm256_xor_si256(half(line.add(q), h), flip);
                    let aw = _mm256_sign_epi8(w, w);
                    for (r, dot) in dots.iter_mut().enumerate() {
                        let x = _mm256_set1_epi32(x4(act, (r0 + r) * nb + b, q));
                        let p = maddubs(aw, _mm256_sign_epi8(x, w));
                        *dot = _mm256_add_epi32(*dot, p);
                    }
                }
                scale_add_256(&mut sums, &dots, line.add(QK / 4), h, act, (r0, b));
            }
            for (r, sum) in sums.iter().enumerate() {
                _mm256_storeu_ps(acc[r0 + r].as_mut_ptr().add(h * 8), *sum);
            }
        }
    }
}

impl Kernel for Q4Avx2 {
    const KIND: QuantKind = QuantKind::Q4_0;
    #[inline(always)]
    unsafe fn rows<const R: usize>(
        lines: &[Line],
        act: &Activations,
        r0: usize,
        acc: &mut [[f32; GROUP]],
    ) {
        let nb = act.nb;
        let mask = _mm256_set1_epi8(15);
        for h in 0..2 {
            let mut sums = [_mm256_setzero_ps(); R];
            for b in 0..nb {
                let line = lines.as_ptr().add(b * (QK / 8 + 1));
                let mut dots: [__m256i; R] =
                    std::array::from_fn(|r| _mm256_set1_epi32(-8 * act.sum[(r0 + r) * nb + b]));
                for j in 0..QK / 8 {
                    let raw = half(line.add(j), h);
                    let lo = _mm256_and_si256(raw, mask);
                    let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(raw), mask);
                    for (r, dot) in dots.iter_mut().enumerate() {
                        let i = (r0 + r) * nb + b;
                        let xl = _mm256_set1_epi32(x4(act, i, j));
                        let xh = _mm256_set1_epi32(x4(act, i, j + QK / 8));
                        let p = _mm256_add_epi32(maddubs(lo, xl), maddubs(hi, xh));
                        *dot = _mm256_add_epi32(*dot, p);
                    }
                }
                scale_add_256(&mut sums, &dots, line.add(QK / 8), h, act, (r0, b));
            }
            for (r, sum) in sums.iter().enumerate() {
                _mm256_storeu_ps(acc[r0 + r].as_mut_ptr().add(h * 8), *sum);
            }
        }
    }
}

/// Every row of `acc` (one per activation row) for the group whose lines
/// are `lines`, `ROWS` rows per pass.
#[inline(always)]
unsafe fn run<K: Kernel>(lines: &[Line], act: &Activations, acc: &mut [[f32; GROUP]]) {
    let (m, nb) = (acc.len(), act.nb);
    assert_eq!(
        lines.len(),
        lines_per_block(K::KIND) * nb,
        "a group's lines"
    );
    assert!(
        act.qs.len() >= m * nb * QK && act.d.len() >= m * nb && act.sum.len() >= m * nb,
        "activations of {m} rows"
    );
    let mut r0 = 0;
    while r0 + ROWS <= m {
        K::rows::<ROWS>(lines, act, r0, acc);
        r0 += ROWS;
    }
    match m - r0 {
        1 => K::rows::<1>(lines, act, r0, acc),
        2 => K::rows::<2>(lines, act, r0, acc),
        3 => K::rows::<3>(lines, act, r0, acc),
        _ => {}
    }
}

/// One block of 32 activations quantized as `BlockQ8_0::quantize` does,
/// with the same f32 operations in the same order per value (so the same
/// bits): `amax`, `d = amax / 127`, `id = 1 / d`, and each `v * id`
/// rounded half away from zero from its truncation. Writes the quants, and
/// returns the unrounded scale and the quants' sum; None (nothing written)
/// when a value is not finite, for the scalar path's handling.
///
/// The activations are quantized on the calling thread before each
/// matmul's parts start: the scalar loop was 2.7-4.4% of a one-row decode
/// step's samples, while the other thread waited (`perf`, docs/benchmarks.md).
///
/// # Safety
/// The CPU has AVX2.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn quantize_q8_avx2(x: &[f32; QK], qs: &mut [i8; QK]) -> Option<(f32, i32)> {
    let p = x.as_ptr();
    let v: [__m256; 4] = std::array::from_fn(|i| _mm256_loadu_ps(p.add(8 * i)));
    let sign = _mm256_set1_ps(-0.0);
    let abs = v.map(|v| _mm256_andnot_ps(sign, v));
    // Every |v| <= f32::MAX (false for NaN and infinities).
    let max = _mm256_set1_ps(f32::MAX);
    let finite = abs.iter().fold(-1, |m, a| {
        m & _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_LE_OQ>(*a, max))
    });
    if finite & 0xff != 0xff {
        return None;
    }
    let m = _mm256_max_ps(_mm256_max_ps(abs[0], abs[1]), _mm256_max_ps(abs[2], abs[3]));
    let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
    let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    if !id.is_finite() {
        // A subnormal scale: the scalar path's clamp decides those values.
        return None;
    }
    let id = _mm256_set1_ps(id);
    let (half, one) = (_mm256_set1_ps(0.5), _mm256_set1_ps(1.0));
    let q = v.map(|v| {
        let s = _mm256_mul_ps(v, id);
        let t = _mm256_round_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(s);
        let f = _mm256_sub_ps(s, t);
        let up = _mm256_and_ps(_mm256_cmp_ps::<_CMP_GE_OQ>(f, half), one);
        let down = _mm256_and_ps(_mm256_cmp_ps::<_CMP_LE_OQ>(f, _mm256_set1_ps(-0.5)), one);
        _mm256_cvtps_epi32(_mm256_sub_ps(_mm256_add_ps(t, up), down))
    });
    // Saturating packs clamp to i8 as `round_to_i8` does; they interleave
    // 128-bit lanes, which the permute puts back in order.
    let w = _mm256_packs_epi16(
        _mm256_packs_epi32(q[0], q[1]),
        _mm256_packs_epi32(q[2], q[3]),
    );
    let w = _mm256_permutevar8x32_epi32(w, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(qs.as_mut_ptr().cast(), w);
    // The sum of the clamped quants: widen the bytes back, in pairs.
    let pairs = _mm256_madd_epi16(
        _mm256_maddubs_epi16(_mm256_set1_epi8(1), w),
        _mm256_set1_epi16(1),
    );
    let s = _mm_add_epi32(
        _mm256_castsi256_si128(pairs),
        _mm256_extracti128_si256::<1>(pairs),
    );
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
    Some((d, _mm_cvtsi128_si32(s)))
}

/// # Safety
/// The CPU has AVX2.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn q8_avx2(lines: &[Line], act: &Activations, acc: &mut [[f32; GROUP]]) {
    run::<Q8Avx2>(lines, act, acc)
}

/// # Safety
/// The CPU has AVX2.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn q4_avx2(lines: &[Line], act: &Activations, acc: &mut [[f32; GROUP]]) {
    run::<Q4Avx2>(lines, act, acc)
}

/// # Safety
/// The CPU has AVX-512F and AVX-512 VNNI.
#[target_feature(enable = "avx2,avx512f,avx512vnni")]
pub(super) unsafe fn q8_vnni(lines: &[Line], act: &Activations, acc: &mut [[f32; GROUP]]) {
    run::<Q8Vnni>(lines, act, acc)
}

/// # Safety
/// The CPU has AVX-512F, AVX-512BW (nibble shifts) and AVX-512 VNNI.
#[target_feature(enable = "avx2,avx512f,avx512bw,avx512vnni")]
pub(super) unsafe fn q4_vnni(lines: &[Line], act: &Activations, acc: &mut [[f32; GROUP]]) {
    run::<Q4Vnni>(lines, act, acc)
}
