//! The x86-64 int8 kernels of the quantized matmul: 8 outputs (one weight
//! block each per step) against up to 4 activation rows at a time, so each
//! weight block is loaded once per 4 rows and the group's weights stay in
//! L1 across all rows.
//!
//! Per (weight block, activation block) a kernel yields 8 int32 partial
//! sums; `reduce8` folds 8 outputs' partials into one register of 8 exact
//! block dots, which is scaled and added in f32 per lane: each lane does
//! the portable loop's operations in its order (see `quant`'s doc).
//!
//! The two int8 products (ggml uses the same tricks):
//! - AVX2 `vpmaddubsw` multiplies unsigned by signed bytes, so a Q8_0
//!   weight enters as |w| and the activation takes w's sign (`vpsignb`);
//!   pair sums stay below i16's limit (2 * 128 * 127 < 32767).
//! - VNNI `vpdpbusd` has no i16 step, so Q8_0 weights enter offset by 128
//!   (w ^ 0x80 = w + 128 as u8) and `128 * sum(x)` is subtracted after.
//! - Q4_0 nibbles (0..15) enter unsigned in both and `8 * sum(x)` is
//!   subtracted: the nibble offset of 8 taken out once per block.

use std::arch::x86_64::*;

use super::block::{BlockQ4_0, BlockQ8_0, QK};
use super::matrix::{Activations, GROUP};

/// Activation rows per pass over a group's weights (registers: 8 weight
/// blocks + 4 accumulators + temporaries fit AVX2's 16).
const ROWS: usize = 4;

/// How one kernel multiplies a weight block by an activation block.
trait Dot {
    type Block;
    /// Subtracted per block as `OFFSET * sum(x)`.
    const OFFSET: i32;
    /// The block's f16 scale bits.
    fn scale_bits(b: &Self::Block) -> u16;
    /// The weight operand, 32 bytes.
    unsafe fn prep(b: &Self::Block) -> __m256i;
    /// 8 int32 partial sums of the block's 32 products.
    unsafe fn dot(w: __m256i, x: __m256i) -> __m256i;
}

struct Q8Avx2;
struct Q8Vnni;
struct Q4Avx2;
struct Q4Vnni;

#[inline(always)]
unsafe fn load_q8(b: &BlockQ8_0) -> __m256i {
    _mm256_loadu_si256(b.qs.as_ptr() as *const __m256i)
}

/// Q4_0's 16 bytes to 32 unsigned nibbles: low nibbles are values 0..16,
/// high nibbles 16..32.
#[inline(always)]
unsafe fn load_q4(b: &BlockQ4_0) -> __m256i {
    let q = _mm_loadu_si128(b.qs.as_ptr() as *const __m128i);
    let mask = _mm_set1_epi8(15);
    let lo = _mm_and_si128(q, mask);
    let hi = _mm_and_si128(_mm_srli_epi16(q, 4), mask);
    _mm256_set_m128i(hi, lo)
}

#[inline(always)]
unsafe fn maddubs(u: __m256i, s: __m256i) -> __m256i {
    _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1))
}

impl Dot for Q8Avx2 {
    type Block = BlockQ8_0;
    const OFFSET: i32 = 0;
    fn scale_bits(b: &BlockQ8_0) -> u16 {
        b.d.to_bits()
    }
    #[inline(always)]
    unsafe fn prep(b: &BlockQ8_0) -> __m256i {
        load_q8(b)
    }
    #[inline(always)]
    unsafe fn dot(w: __m256i, x: __m256i) -> __m256i {
        maddubs(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w))
    }
}

impl Dot for Q8Vnni {
    type Block = BlockQ8_0;
    const OFFSET: i32 = 128;
    fn scale_bits(b: &BlockQ8_0) -> u16 {
        b.d.to_bits()
    }
    #[inline(always)]
    unsafe fn prep(b: &BlockQ8_0) -> __m256i {
        _mm256_xor_si256(load_q8(b), _mm256_set1_epi8(-128))
    }
    #[inline(always)]
    unsafe fn dot(w: __m256i, x: __m256i) -> __m256i {
        _mm256_dpbusd_epi32(_mm256_setzero_si256(), w, x)
    }
}

impl Dot for Q4Avx2 {
    type Block = BlockQ4_0;
    const OFFSET: i32 = 8;
    fn scale_bits(b: &BlockQ4_0) -> u16 {
        b.d.to_bits()
    }
    #[inline(always)]
    unsafe fn prep(b: &BlockQ4_0) -> __m256i {
        load_q4(b)
    }
    #[inline(always)]
    unsafe fn dot(w: __m256i, x: __m256i) -> __m256i {
        maddubs(w, x)
    }
}

impl Dot for Q4Vnni {
    type Block = BlockQ4_0;
    const OFFSET: i32 = 8;
    fn scale_bits(b: &BlockQ4_0) -> u16 {
        b.d.to_bits()
    }
    #[inline(always)]
    unsafe fn prep(b: &BlockQ4_0) -> __m256i {
        load_q4(b)
    }
    #[inline(always)]
    unsafe fn dot(w: __m256i, x: __m256i) -> __m256i {
        _mm256_dpbusd_epi32(_mm256_setzero_si256(), w, x)
    }
}

/// 8 registers of 8 int32 partials -> one register of their 8 totals
/// (exact: |total| <= 32 * 128 * 255 fits i32).
#[inline(always)]
unsafe fn reduce8(p: &[__m256i; GROUP]) -> __m256i {
    let a = _mm256_hadd_epi32(_mm256_hadd_epi32(p[0], p[1]), _mm256_hadd_epi32(p[2], p[3]));
    let b = _mm256_hadd_epi32(_mm256_hadd_epi32(p[4], p[5]), _mm256_hadd_epi32(p[6], p[7]));
    // a = [t0 t1 t2 t3 | u0 u1 u2 u3] (t: lanes 0..4, u: lanes 4..8), b likewise for 4..8.
    let lo = _mm256_permute2x128_si256(a, b, 0x20);
    let hi = _mm256_permute2x128_si256(a, b, 0x31);
    _mm256_add_epi32(lo, hi)
}

/// Rows `r0..r0 + R` of the group: `acc[r][j] = sum over blocks b of
/// (d_w * d_x) * dot`, f32 multiply then add, blocks in order.
#[inline(always)]
unsafe fn rows<D: Dot, const R: usize>(
    w: &[D::Block],
    act: &Activations,
    r0: usize,
    acc: &mut [[f32; GROUP]],
) {
    let nb = act.nb;
    let mut sums = [_mm256_setzero_ps(); R];
    for b in 0..nb {
        let wv: [__m256i; GROUP] = std::array::from_fn(|j| D::prep(&w[j * nb + b]));
        let bits: [u16; GROUP] = std::array::from_fn(|j| D::scale_bits(&w[j * nb + b]));
        let dw = _mm256_cvtph_ps(_mm_loadu_si128(bits.as_ptr() as *const __m128i));
        for (r, sum) in sums.iter_mut().enumerate() {
            let i = (r0 + r) * nb + b;
            // SAFETY (of the load): `run` checked act.qs holds every row.
            let x = _mm256_loadu_si256(act.qs.as_ptr().add(i * QK) as *const __m256i);
            let p: [__m256i; GROUP] = std::array::from_fn(|j| D::dot(wv[j], x));
            let mut s = reduce8(&p);
            if D::OFFSET != 0 {
                s = _mm256_sub_epi32(s, _mm256_set1_epi32(D::OFFSET * act.sum[i]));
            }
            let scale = _mm256_mul_ps(dw, _mm256_set1_ps(act.d[i]));
            *sum = _mm256_add_ps(*sum, _mm256_mul_ps(_mm256_cvtepi32_ps(s), scale));
        }
    }
    for (r, sum) in sums.iter().enumerate() {
        _mm256_storeu_ps(acc[r0 + r].as_mut_ptr(), *sum);
    }
}

/// Every row of `acc` (one per activation row) for the group whose
/// weights are `w` (8 outputs' blocks, row-major).
#[inline(always)]
unsafe fn run<D: Dot>(w: &[D::Block], act: &Activations, acc: &mut [[f32; GROUP]]) {
    let m = acc.len();
    assert_eq!(w.len(), GROUP * act.nb, "weight blocks of a group");
    assert!(
        act.qs.len() >= m * act.nb * QK,
        "activation quants of {m} rows"
    );
    let mut r0 = 0;
    while r0 + ROWS <= m {
        rows::<D, ROWS>(w, act, r0, acc);
        r0 += ROWS;
    }
    match m - r0 {
        1 => rows::<D, 1>(w, act, r0, acc),
        2 => rows::<D, 2>(w, act, r0, acc),
        3 => rows::<D, 3>(w, act, r0, acc),
        _ => {}
    }
}

/// # Safety
/// The CPU has AVX2 and F16C.
#[target_feature(enable = "avx2,f16c")]
pub(super) unsafe fn q8_avx2(w: &[BlockQ8_0], act: &Activations, acc: &mut [[f32; GROUP]]) {
    run::<Q8Avx2>(w, act, acc)
}

/// # Safety
/// The CPU has AVX2 and F16C.
#[target_feature(enable = "avx2,f16c")]
pub(super) unsafe fn q4_avx2(w: &[BlockQ4_0], act: &Activations, acc: &mut [[f32; GROUP]]) {
    run::<Q4Avx2>(w, act, acc)
}

/// # Safety
/// The CPU has AVX2, F16C, AVX-512F, AVX-512VL and AVX-512 VNNI.
#[target_feature(enable = "avx2,f16c,avx512f,avx512vl,avx512vnni")]
pub(super) unsafe fn q8_vnni(w: &[BlockQ8_0], act: &Activations, acc: &mut [[f32; GROUP]]) {
    run::<Q8Vnni>(w, act, acc)
}

/// # Safety
/// The CPU has AVX2, F16C, AVX-512F, AVX-512VL and AVX-512 VNNI.
#[target_feature(enable = "avx2,f16c,avx512f,avx512vl,avx512vnni")]
pub(super) unsafe fn q4_vnni(w: &[BlockQ4_0], act: &Activations, acc: &mut [[f32; GROUP]]) {
    run::<Q4Vnni>(w, act, acc)
}
