//! Unit tests of the kernels: the matmul against a naive product for
//! every row count (and bitwise row-count independence), the fast exp and
//! tanh against libm, attention and dot/axpy against the portable loops.

use half::f16;

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
            portable::attend_head(&q, &k, &v, KeyRows::ALL, 0.125, &mut att, &mut want);
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

#[test]
fn attention_over_f16_keys_and_values_equals_attention_over_their_f32_values_bitwise() {
    for hs in [16, 32, 64, 128] {
        for n in [1, 5, 33] {
            let q = data(hs, 31);
            let k16: Vec<f16> = data(n * hs, 32).into_iter().map(f16::from_f32).collect();
            let v16: Vec<f16> = data(n * hs, 33).into_iter().map(f16::from_f32).collect();
            let (k, v): (Vec<f32>, Vec<f32>) = (
                k16.iter().map(|x| x.to_f32()).collect(),
                v16.iter().map(|x| x.to_f32()).collect(),
            );
            let mut att = vec![0f32; n];
            let (mut want, mut got) = (vec![0f32; hs], vec![0f32; hs]);
            attend_head(&q, &k, &v, KeyRows::ALL, 0.125, &mut att, &mut want);
            attend_head(&q, &k16, &v16, KeyRows::ALL, 0.125, &mut att, &mut got);
            assert_eq!(got, want, "dispatched path, hs {hs} n {n}");
            portable::attend_head(&q, &k, &v, KeyRows::ALL, 0.125, &mut att, &mut want);
            portable::attend_head(&q, &k16, &v16, KeyRows::ALL, 0.125, &mut att, &mut got);
            assert_eq!(got, want, "portable path, hs {hs} n {n}");
        }
    }
}
