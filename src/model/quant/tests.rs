//! Tests of the quantized formats and matmul: ggml's quantization on
//! hand-computed blocks, round-trip error bounds, `forward` against an f64
//! reference for every row count 1..=64 and odd shapes, the batching
//! invariant, every kernel path against the portable one, every split over
//! threads against the serial one, and malformed tensors as errors naming
//! the tensor.

use super::*;

/// Deterministic values in about -1..1, their magnitude varying by block
/// so that block scales differ.
fn data(len: usize, seed: u32) -> Vec<f32> {
    (0..len)
        .map(|i| {
            let h = (i as u32)
                .wrapping_mul(2654435761)
                .wrapping_add(seed.wrapping_mul(97));
            let v = (h % 1000) as f32 / 500.0 - 1.0;
            v * (1.0 + ((i / QK) % 5) as f32) / 5.0
        })
        .collect()
}

/// `x W^T + b` in f64 from the dequantized weights and the dequantized
/// Q8_0 activations: what `forward` computes, up to f32 rounding.
fn reference(q: &QMatrix, x: &[f32], m: usize) -> (Vec<f64>, Vec<f64>) {
    let (n, k) = (q.n, q.k);
    let w = q.dequantize();
    let (mut y, mut mag) = (vec![0f64; m * n], vec![0f64; m * n]);
    for r in 0..m {
        let xr = dequantize_row_q8_0(&quantize_row_q8_0(&x[r * k..(r + 1) * k]));
        for o in 0..n {
            let terms = (0..k).map(|i| xr[i] as f64 * w[o * k + i] as f64);
            y[r * n + o] = terms.clone().sum::<f64>() + q.bias()[o] as f64;
            mag[r * n + o] = terms.map(f64::abs).sum::<f64>() + q.bias()[o].abs() as f64;
        }
    }
    (y, mag)
}

fn matrix(kind: QuantKind, n: usize, k: usize, seed: u32) -> QMatrix {
    let w = data(n * k, seed);
    QMatrix::from_out_in("test.w", kind, &w, (n, k), Some(data(n, seed + 1))).expect("valid")
}

fn run(q: &QMatrix, path: KernelPath, x: &[f32], m: usize) -> Vec<f32> {
    let mut y = vec![f32::NAN; m * q.n];
    q.forward_with(path, x, m, &mut y);
    y
}

const KINDS: [QuantKind; 2] = [QuantKind::Q8_0, QuantKind::Q4_0];

#[test]
fn q8_0_quantizes_as_ggml_does_on_hand_computed_blocks() {
    // amax 127 -> d = 1: q = round(x), halves away from zero.
    let mut x = [0f32; QK];
    x[..8].copy_from_slice(&[127.0, -127.0, 2.5, -2.5, 0.49, 3.5, -0.5, 1.0]);
    let b = BlockQ8_0::quantize(&x);
    assert_eq!(b.d, half::f16::from_f32(1.0));
    assert_eq!(b.qs[..8], [127, -127, 3, -3, 0, 4, -1, 1]);
    // amax 4 -> d = 4/127 (f16-rounded when stored), q = round(x * 127/4).
    let x: [f32; QK] = std::array::from_fn(|j| (j as f32 - 16.0) * 0.25);
    let b = BlockQ8_0::quantize(&x);
    assert_eq!(b.d, half::f16::from_f32(4.0 / 127.0));
    assert_eq!(b.qs[0], -127); // -4
    assert_eq!(b.qs[1], -119); // -3.75 * 31.75 = -119.06
    assert_eq!(b.qs[17], 8); // 0.25 * 31.75 = 7.94
    assert_eq!(b.qs[18], 16); // 15.875
    assert_eq!(b.qs[16], 0);
}

#[test]
fn q4_0_quantizes_as_ggml_does_on_hand_computed_blocks() {
    // max -8 -> d = 1: q = min(15, trunc(x + 8.5)).
    let mut x = [0f32; QK];
    x[..6].copy_from_slice(&[-8.0, 7.0, 7.9, -0.6, 0.5, 0.0]);
    x[16] = 3.0;
    let b = BlockQ4_0::quantize(&x);
    assert_eq!(b.d, half::f16::from_f32(1.0));
    let lows: Vec<u8> = b.qs[..6].iter().map(|q| q & 15).collect();
    assert_eq!(lows, [0, 15, 15, 7, 9, 8]);
    assert_eq!(
        b.qs[0] >> 4,
        11,
        "value 16 (3.0) sits in the high nibble of byte 0"
    );
    assert_eq!(b.values()[16], 3);
    // max +8 -> d = -1: the largest magnitude keeps its sign.
    let mut x = [0f32; QK];
    x[..2].copy_from_slice(&[8.0, -7.0]);
    let b = BlockQ4_0::quantize(&x);
    assert_eq!(b.d, half::f16::from_f32(-1.0));
    let mut out = [0f32; QK];
    b.dequantize(&mut out);
    assert_eq!(out[..3], [8.0, -7.0, 0.0]);
}

#[test]
fn an_all_zero_block_gets_scale_zero_and_dequantizes_to_zeros_without_nan() {
    let x = [0f32; QK];
    let (q8, q4) = (BlockQ8_0::quantize(&x), BlockQ4_0::quantize(&x));
    assert_eq!((q8.d.to_f32(), q4.d.to_f32()), (0.0, 0.0));
    assert_eq!(q8.qs, [0; QK]);
    assert_eq!(q4.qs, [0x88; QK / 2], "zero is nibble 8 in Q4_0");
    assert_eq!(dequantize_row_q8_0(&[q8]), vec![0f32; QK]);
    assert_eq!(dequantize_row_q4_0(&[q4]), vec![0f32; QK]);
}

#[test]
fn dequantized_values_are_within_half_a_step_of_the_input() {
    let x = data(QK * 64, 3);
    let q8 = dequantize_row_q8_0(&quantize_row_q8_0(&x));
    let q4 = dequantize_row_q4_0(&quantize_row_q4_0(&x));
    for (b, blk) in x.chunks(QK).enumerate() {
        let amax = blk.iter().fold(0f32, |a, v| a.max(v.abs()));
        for j in 0..QK {
            let i = b * QK + j;
            // Half a step, plus the f16 rounding of the scale.
            assert!(
                (x[i] - q8[i]).abs() <= amax * (0.5 / 127.0 + 1e-3),
                "q8_0 at {i}"
            );
            // Q4_0's step is amax / 8; -max clamps from 8 to 7 steps.
            assert!(
                (x[i] - q4[i]).abs() <= amax * (1.0 / 8.0 + 1e-2),
                "q4_0 at {i}"
            );
        }
    }
}

#[test]
fn forward_matches_the_f64_reference_for_every_row_count_and_odd_shapes() {
    for kind in KINDS {
        for (n, k) in [(37, 64), (100, 96), (8, 32)] {
            let q = matrix(kind, n, k, 11);
            let x = data(64 * k, 12);
            for m in 1..=64 {
                let (want, mag) = reference(&q, &x[..m * k], m);
                for path in KernelPath::available() {
                    let y = run(&q, path, &x[..m * k], m);
                    for (i, v) in y.iter().enumerate() {
                        let err = (*v as f64 - want[i]).abs();
                        let tol = 1e-5 * mag[i] + 1e-6;
                        assert!(
                            err <= tol,
                            "{kind:?} {path:?} {n}x{k} m {m} at {i}: {v} vs {}",
                            want[i]
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn a_row_gets_bitwise_the_same_output_alone_or_batched_with_any_row_count() {
    // 300 x 256 at m >= 1 crosses the parallel threshold for m > 0, and
    // the activations' (8,192 values) for m >= 32.
    for kind in KINDS {
        for (n, k) in [(37, 96), (300, 256)] {
            let q = matrix(kind, n, k, 21);
            let x = data(64 * k, 22);
            for path in KernelPath::available() {
                let alone: Vec<Vec<f32>> = (0..64)
                    .map(|r| run(&q, path, &x[r * k..(r + 1) * k], 1))
                    .collect();
                for m in 1..=64 {
                    let y = run(&q, path, &x[..m * k], m);
                    for (r, want) in alone.iter().take(m).enumerate() {
                        let got = &y[r * n..(r + 1) * n];
                        assert!(
                            bits(got) == bits(want),
                            "{kind:?} {path:?} {n}x{k}: row {r} of {m}"
                        );
                    }
                }
            }
        }
    }
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn every_kernel_path_on_this_cpu_gives_the_portable_paths_bits() {
    let paths = KernelPath::available();
    eprintln!("kernel paths on this CPU: {paths:?}");
    for kind in KINDS {
        for (n, k) in [(37, 64), (100, 96), (64, 768)] {
            let q = matrix(kind, n, k, 31);
            let x = data(64 * k, 32);
            for m in 1..=64 {
                let want = run(&q, KernelPath::Portable, &x[..m * k], m);
                for path in &paths {
                    let got = run(&q, *path, &x[..m * k], m);
                    assert!(bits(&got) == bits(&want), "{kind:?} {path:?} {n}x{k} m {m}");
                }
            }
        }
    }
}

#[test]
fn activations_quantize_to_the_portable_bits_on_every_path_even_at_ties_and_non_finite_values() {
    let mut x = data(QK * 64, 41);
    // amax 127 makes the step 1: values at exact halves are ties, and
    // their neighbours one ulp either side are not.
    let ties: Vec<f32> = (0..QK).map(|i| (i as f32 - 15.5) * 4.0 + 0.5).collect();
    let mut block = |f: &dyn Fn(usize) -> f32| x.extend((0..QK).map(f));
    block(&|i| if i == 0 { 127.0 } else { ties[i] });
    block(&|i| if i == 0 { -127.0 } else { ties[i].next_up() });
    block(&|i| if i == 0 { 127.0 } else { -ties[i].next_down() });
    block(&|_| 0.0);
    block(&|i| if i % 2 == 0 { -0.0 } else { 1e-40 });
    block(&|i| f32::MIN_POSITIVE * i as f32);
    block(&|i| [f32::NAN, 1.0][i % 2]);
    block(&|i| [f32::INFINITY, -2.0][i % 2]);
    block(&|i| [f32::NEG_INFINITY, f32::MAX][i % 2]);
    block(&|i| f32::MAX * (i as f32 / 31.0 - 0.5));
    let k = x.len();
    let want = matrix::Activations::quantize(&x, k, KernelPath::Portable);
    for path in KernelPath::available() {
        let got = matrix::Activations::quantize(&x, k, path);
        let first = got.qs.iter().zip(&want.qs).position(|(a, b)| a != b);
        assert_eq!(first, None, "{path:?}: the first quant that differs");
        assert_eq!(bits(&got.d), bits(&want.d), "{path:?} scales");
        assert_eq!(got.sum, want.sum, "{path:?} sums");
    }
    // The ties rounded away from zero, as ggml's `roundf` does.
    let tie_block = &want.qs[64 * QK..65 * QK];
    assert_eq!(&tie_block[1..4], &[-58, -54, -50]);
}

#[test]
fn extreme_quants_give_exact_dots_on_every_path_with_no_i16_saturation() {
    // Q8_0 blocks whose quants are -128 and 127 (GGUF bytes may hold -128),
    // scale 1, against activations whose every value is its block's
    // magnitude: each AVX2 pair sum is then at its largest (2 * 128 * 127).
    let (n, k) = (16, 64);
    let mut bytes = Vec::new();
    for o in 0..n {
        for _ in 0..k / QK {
            bytes.extend_from_slice(&half::f16::ONE.to_bits().to_le_bytes());
            bytes.extend((0..QK).map(|i| if (i + o) % 3 == 0 { 0x80u8 } else { 0x7f }));
        }
    }
    let q = QMatrix::from_bytes("test.w", QuantKind::Q8_0, &bytes, (n, k), None).unwrap();
    let w = q.dequantize();
    for signs in [[1f32, 1.0], [-1.0, -1.0], [1.0, -1.0]] {
        // Every value is its block's largest, 127 / 16: it quantizes to
        // +-127 at scale 1 / 16, so every product and sum is exact in f32.
        let x: Vec<f32> = (0..k).map(|i| signs[i % 2] * 127.0 / 16.0).collect();
        let want: Vec<f32> = (0..n)
            .map(|o| (0..k).map(|i| w[o * k + i] * x[i]).sum())
            .collect();
        for path in KernelPath::available() {
            assert_eq!(run(&q, path, &x, 1), want, "{path:?} signs {signs:?}");
        }
    }
}

#[test]
fn every_split_over_threads_gives_the_serial_bits_for_every_row_count() {
    use crate::model::team::Team;
    let teams: Vec<Team> = (1..=3).map(Team::new).collect();
    for kind in KINDS {
        // 17 groups (the last one partial) over teams of 1..3 threads.
        let (n, k) = (263, 96);
        let q = matrix(kind, n, k, 51);
        let x = data(24 * k, 52);
        let path = KernelPath::best();
        for m in 1..=24 {
            let mut want = vec![f32::NAN; m * n];
            q.forward_split(path, Split::Serial, &x[..m * k], m, &mut want);
            let splits = teams.iter().map(Split::Team).chain([Split::Rayon]);
            for (i, split) in splits.enumerate() {
                let mut got = vec![f32::NAN; m * n];
                q.forward_split(path, split, &x[..m * k], m, &mut got);
                assert!(bits(&got) == bits(&want), "{kind:?} m {m} split {i}");
            }
        }
    }
}

#[test]
fn weights_round_trip_through_gguf_bytes() {
    for kind in KINDS {
        let q = matrix(kind, 5, 64, 41);
        let bytes = q.to_bytes();
        assert_eq!(bytes.len(), 5 * 2 * kind.block_bytes());
        let back = QMatrix::from_bytes("test.w", kind, &bytes, (5, 64), Some(q.bias().to_vec()));
        assert_eq!(back.as_ref(), Ok(&q));
    }
    // Block layout: the f16 scale little-endian, then the quants.
    let q = matrix(QuantKind::Q8_0, 1, 32, 42);
    let bytes = q.to_bytes();
    let blocks = quantize_row_q8_0(&q.dequantize());
    assert_eq!(bytes[..2], blocks[0].d.to_bits().to_le_bytes());
    assert_eq!(bytes[2] as i8, blocks[0].qs[0]);
}

#[test]
fn a_byte_buffer_that_is_not_whole_blocks_is_an_error_naming_the_tensor() {
    let q = matrix(QuantKind::Q4_0, 3, 64, 51);
    let mut bytes = q.to_bytes();
    bytes.pop();
    let err = QMatrix::from_bytes(
        "h.0.mlp.c_fc.weight",
        QuantKind::Q4_0,
        &bytes,
        (3, 64),
        None,
    )
    .expect_err("short buffer");
    let msg = err.to_string();
    assert!(
        msg.contains("h.0.mlp.c_fc.weight") && msg.contains("107 bytes"),
        "{msg}"
    );
    assert!(
        msg.contains("6 blocks of 18 bytes") && msg.contains("108"),
        "{msg}"
    );
    // The right length for the other format is still the wrong one.
    let err = QMatrix::from_bytes("t", QuantKind::Q8_0, &q.to_bytes(), (3, 64), None);
    assert!(matches!(
        err,
        Err(QuantError::ByteLength {
            got: 108,
            expected: 204,
            ..
        })
    ));
}

#[test]
fn a_non_finite_block_scale_in_the_bytes_is_an_error_naming_the_tensor() {
    let q = matrix(QuantKind::Q8_0, 2, 64, 61);
    let mut bytes = q.to_bytes();
    let at = 2 * QuantKind::Q8_0.block_bytes();
    bytes[at..at + 2].copy_from_slice(&half::f16::NAN.to_bits().to_le_bytes());
    let err = QMatrix::from_bytes("lm_head", QuantKind::Q8_0, &bytes, (2, 64), None);
    assert!(
        matches!(&err, Err(QuantError::NotFinite { name, what: "block scale", index: 2, .. }) if name == "lm_head"),
        "{err:?}"
    );
}

#[test]
fn shapes_that_gguf_cannot_hold_are_errors_naming_the_tensor_and_sizes() {
    let err = QMatrix::from_out_in("a.w", QuantKind::Q8_0, &[0.0; 40], (1, 40), None);
    assert_eq!(
        err.unwrap_err().to_string(),
        "tensor `a.w`: its input width 40 is not a multiple of the block size 32 (GGUF blocks hold 32 values)"
    );
    let err = QMatrix::from_out_in("b.w", QuantKind::Q4_0, &[0.0; 64], (3, 32), None);
    assert!(matches!(
        err,
        Err(QuantError::Shape {
            what: "weight",
            got: 64,
            expected: 96,
            ..
        })
    ));
    let err = QMatrix::from_out_in(
        "c.w",
        QuantKind::Q8_0,
        &[0.0; 64],
        (2, 32),
        Some(vec![0.0; 3]),
    );
    assert!(matches!(
        err,
        Err(QuantError::Shape {
            what: "bias",
            got: 3,
            expected: 2,
            ..
        })
    ));
    let mut w = vec![0.5; 64];
    w[9] = f32::INFINITY;
    let err = QMatrix::from_out_in("d.w", QuantKind::Q8_0, &w, (2, 32), None);
    assert!(matches!(
        err,
        Err(QuantError::NotFinite {
            what: "weight",
            index: 9,
            ..
        })
    ));
    let err = QMatrix::from_bytes("e.w", QuantKind::Q8_0, &[], (usize::MAX, 64), None);
    assert!(matches!(err, Err(QuantError::TooLarge { .. })));
}

#[test]
fn an_unknown_or_unavailable_forced_kernel_falls_back_with_a_warning() {
    let best = KernelPath::best();
    assert_eq!(KernelPath::resolve(None), (best, None));
    assert_eq!(
        KernelPath::resolve(Some("portable")),
        (KernelPath::Portable, None)
    );
    let (path, warning) = KernelPath::resolve(Some("sse9"));
    assert_eq!(path, best);
    assert!(warning.is_some_and(|w| w.contains("GPT_SERVE_QUANT_KERNEL=sse9")));
    for p in [KernelPath::Avx2, KernelPath::Vnni] {
        let (path, warning) = KernelPath::resolve(Some(p.name()));
        if p.is_available() {
            assert_eq!((path, warning), (p, None));
        } else {
            assert_eq!(path, best);
            assert!(warning.is_some_and(|w| w.contains("lacks")));
        }
    }
}

#[test]
fn rounding_to_i8_matches_round_then_a_saturating_cast() {
    let mut values: Vec<f32> = (-600..=600).map(|i| i as f32 * 0.5).collect();
    for h in [0.5f32, 1.5, 2.5, 126.5, 127.5, 128.5] {
        for v in [h, -h] {
            values.extend([v.next_up(), v.next_down()]);
        }
    }
    values.extend(data(10_000, 71).iter().map(|v| v * 140.0));
    values.extend([
        0.0,
        -0.0,
        f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        1e30,
        -1e30,
    ]);
    values.extend([f32::MIN_POSITIVE, 8388607.5, -8388607.5, 16777216.0]);
    for v in values {
        assert_eq!(block::round_to_i8(v), v.round() as i8, "{v}");
    }
}

#[test]
fn gguf_bytes_come_back_unchanged_whatever_the_padding_of_the_last_group() {
    for kind in KINDS {
        for n in [1, 15, 16, 17, 37] {
            let k = 96;
            let w = data(n * k, 81);
            let q = QMatrix::from_out_in("t.w", kind, &w, (n, k), None).expect("valid");
            let mut want = Vec::new();
            for row in w.chunks(k) {
                match kind {
                    QuantKind::Q8_0 => quantize_row_q8_0(row).iter().for_each(|b| {
                        want.extend(b.d.to_bits().to_le_bytes());
                        want.extend(b.qs.iter().map(|q| *q as u8));
                    }),
                    QuantKind::Q4_0 => quantize_row_q4_0(row).iter().for_each(|b| {
                        want.extend(b.d.to_bits().to_le_bytes());
                        want.extend(b.qs);
                    }),
                }
            }
            assert!(q.to_bytes() == want, "{kind:?} n {n}");
            let back = QMatrix::from_bytes("t.w", kind, &want, (n, k), None).expect("valid");
            assert!(back.to_bytes() == want && back == q, "{kind:?} n {n}");
        }
    }
}
