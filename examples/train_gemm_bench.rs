//! GFLOP/s of the training GEMM (`gpt_serve::model::gemm`, as the CPU training ops
//! call it) at the `small` preset's training shapes, M = 1024 rows
//! (batch 8 x 128): the forward X W^T, and the backward's dX = dY W and
//! dW = dY^T X. `scripts/torch_train_speed.py --gemm` prints torch.matmul's
//! figures for the same shapes; `scripts/train-speed.sh` runs both.
//!
//! cargo run --release --example train_gemm_bench
use gpt_serve::model::gemm::{matmul, Operand};
use std::time::Instant;

fn best<F: FnMut()>(reps: usize, mut f: F) -> f64 {
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        for _ in 0..reps {
            f();
        }
        best = best.min(t.elapsed().as_secs_f64() / reps as f64);
    }
    best
}

fn data(len: usize) -> Vec<f32> {
    (0..len)
        .map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5)
        .collect()
}

fn main() {
    let m = 1024;
    for (k, n) in [
        (384, 1152),
        (384, 384),
        (384, 1536),
        (1536, 384),
        (384, 8192),
    ] {
        let (x, w, dy) = (data(m * k), data(n * k), data(m * n));
        let (mut y, mut dx, mut dw) = (vec![0f32; m * n], vec![0f32; m * k], vec![0f32; n * k]);
        let gf = 2.0 * (m * n * k) as f64 / 1e9;
        let f = best(3, || {
            matmul(&mut y, Operand::n(&x, m, k), Operand::t(&w, k, n), false)
        });
        let b1 = best(3, || {
            matmul(&mut dx, Operand::n(&dy, m, n), Operand::n(&w, n, k), false)
        });
        let b2 = best(3, || {
            matmul(&mut dw, Operand::t(&dy, n, m), Operand::n(&x, m, k), false)
        });
        println!(
            "{{\"side\": \"ours\", \"m\": {m}, \"k\": {k}, \"n\": {n}, \"fwd\": {:.1}, \"dx\": {:.1}, \"dw\": {:.1}}}",
            gf / f,
            gf / b1,
            gf / b2
        );
    }
}
