//! Small-batch matmul: our packed kernel (f32, f16) vs candle's matmul, for
//! the shapes of decoding and batched serving (m = 1..64 rows) on the
//! `small` and `gpt2` presets, and 1024 x 1024 (compare m = 64 there with a
//! reference GEMM: `scripts/gemm_reference.py`).
//! Prints GFLOP/s and weight GB/s per shape.
//!
//! `cargo run --release --example matmul_bench`

use std::time::Instant;

use candle_core::{Device, Tensor};
use gpt_serve::model::kernels::Matrix;
use half::f16;

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

fn main() -> candle_core::Result<()> {
    println!("| k x n | m | ours f32 GFLOP/s (GB/s) | ours f16 GFLOP/s (GB/s) | candle f32 GFLOP/s | ours/candle |");
    println!("|---|---|---|---|---|---|");
    for (k, n) in [
        (384, 1152),
        (384, 1536),
        (1536, 384),
        (384, 8192),
        (768, 3072),
        (768, 50257),
        (1024, 1024),
    ] {
        let w: Vec<f32> = (0..k * n)
            .map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5)
            .collect();
        let m32 = Matrix::<f32>::from_out_in(&w, n, k, None);
        let m16 = Matrix::<f16>::from_out_in(&w, n, k, None);
        let wt = Tensor::from_vec(w.clone(), (n, k), &Device::Cpu)?;
        for m in [1usize, 4, 8, 16, 32, 64] {
            let x: Vec<f32> = (0..m * k).map(|i| (i % 13) as f32 / 13.0).collect();
            let mut y = vec![0f32; m * n];
            let reps = (2e8 / (k * n) as f64).max(2.0) as usize;
            let t32 = best(reps, || m32.forward(&x, m, &mut y));
            let t16 = best(reps, || m16.forward(&x, m, &mut y));
            let xt = Tensor::from_vec(x.clone(), (m, k), &Device::Cpu)?;
            let tc = best(reps, || {
                let _ = xt.matmul(&wt.t().unwrap()).unwrap();
            });
            let flops = 2.0 * (m * k * n) as f64;
            println!(
                "| {k} x {n} | {m} | {:.1} ({:.1}) | {:.1} ({:.1}) | {:.1} | {:.2}x |",
                flops / t32 / 1e9,
                (k * n * 4) as f64 / t32 / 1e9,
                flops / t16 / 1e9,
                (k * n * 2) as f64 / t16 / 1e9,
                flops / tc / 1e9,
                tc / t32
            );
        }
    }
    Ok(())
}
