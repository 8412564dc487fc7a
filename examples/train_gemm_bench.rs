//! Training-shape GEMMs (quick check): candle's matmul for the forward
//! (X W^T), dX = dY W and dW = dY^T X at M = 1024.
use candle_core::{Device, Tensor};
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

fn main() -> candle_core::Result<()> {
    let m = 1024;
    let d = Device::Cpu;
    for (k, n) in [
        (384, 1152),
        (384, 384),
        (384, 1536),
        (1536, 384),
        (384, 8192),
    ] {
        let x = Tensor::randn(0f32, 1.0, (m, k), &d)?;
        let w = Tensor::randn(0f32, 1.0, (n, k), &d)?;
        let dy = Tensor::randn(0f32, 1.0, (m, n), &d)?;
        let fl = 2.0 * (m * n * k) as f64 / 1e9;
        let f = best(3, || {
            x.matmul(&w.t().unwrap()).unwrap();
        });
        let dx = best(3, || {
            dy.matmul(&w).unwrap();
        });
        let dw = best(3, || {
            dy.t().unwrap().matmul(&x).unwrap();
        });
        println!(
            "k {k} n {n}: fwd {:.1} dX {:.1} dW {:.1} GFLOP/s",
            fl / f,
            fl / dx,
            fl / dw
        );
    }
    Ok(())
}
