//! Branch-free approximations of exp and tanh, so the loops that call them
//! (softmax, GELU) vectorise: libm's `expf` and `tanhf` are scalar calls
//! with branches, and were measured at 4-16% of a decode step.

/// tanh by Lambert's continued fraction truncated to a [9/8] rational,
/// clamped to [-1, 1]: branch-free, so the GELU loop vectorises (libm's
/// tanhf took 16% of a verify step). Max error 7e-6 (test in `tests.rs`),
/// far below the f32 rounding of the matmuls around it.
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
/// (f32 rounding of x log2 e at large |x|; test in `tests.rs`); 0 below
/// -87 (f32's smallest normal). libm's expf was 4-10% of a decode step and
/// most of a drafter prediction.
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
