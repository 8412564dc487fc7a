//! Single-sequence plain decode of the random gpt2-layout model (seed 0,
//! the weights `gpt-serve bench --plain` times), as `bench --plain` times
//! it: a 16-token prompt then 32 tokens, repeated, so `perf record` sees
//! the decode loop and not the load.
//!
//! cargo run --release --example decode_profile -- [f32|f16|q8_0|q4_0] [REPEATS]

use std::time::Instant;

use candle_core::Device;
use gpt_serve::cli::bench::plain_decode_seconds;
use gpt_serve::model::config::{Config, Exit};
use gpt_serve::model::cpu::{in_pool, CpuGpt, WeightDtype};
use gpt_serve::model::gpt::init_weights;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("chain") {
        use gpt_serve::model::quant::QuantKind;
        chain(QuantKind::Q8_0, 50)?;
        return chain(QuantKind::Q4_0, 50);
    }
    let dt: WeightDtype = args
        .first()
        .map_or("q8_0", |s| s)
        .parse()
        .map_err(anyhow::Error::msg)?;
    let repeats: usize = args.get(1).map_or(Ok(20), |s| s.parse())?;
    let mut cfg = Config::preset("gpt2")?;
    cfg.exits = vec![Exit {
        block: cfg.n_layer,
        weight: 1.0,
    }];
    let w = init_weights(&cfg, 0, &Device::Cpu)?.into_iter().collect();
    let model = CpuGpt::from_tensors(&cfg, &w, dt)?;
    let (mut best, mut best_steps) = (f64::MAX, f64::MAX);
    for _ in 0..repeats {
        let (all, steps) = in_pool(|| plain_decode_seconds(&model, 32))?;
        best = best.min(all);
        best_steps = best_steps.min(steps);
    }
    println!(
        "{}: best {:.1} tok/s with the prompt, {:.1} steps only",
        dt.name(),
        32.0 / best,
        32.0 / best_steps
    );
    Ok(())
}

/// The 49 matmuls of a gpt2 decode step alone (m = 1), distinct weights.
pub fn chain(kind: gpt_serve::model::quant::QuantKind, repeats: usize) -> anyhow::Result<()> {
    use gpt_serve::model::quant::QMatrix;
    let c = 768;
    let mut shapes = Vec::new();
    for _ in 0..12 {
        shapes.extend([(3 * c, c), (c, c), (4 * c, c), (c, 4 * c)]);
    }
    shapes.push((50257, c));
    let ms: Vec<QMatrix> = shapes
        .iter()
        .enumerate()
        .map(|(i, &(n, k))| {
            let w: Vec<f32> = (0..n * k)
                .map(|j| ((j * 2654435761 + i) % 1000) as f32 / 500.0 - 1.0)
                .collect();
            QMatrix::from_out_in("w", kind, &w, (n, k), None)
        })
        .collect::<Result<_, _>>()?;
    let bytes: usize = shapes
        .iter()
        .map(|(n, k)| n * k / 32 * kind.block_bytes())
        .sum();
    let x = vec![0.5f32; 4 * c];
    let mut y = vec![0f32; 50257];
    let mut best = f64::MAX;
    for _ in 0..repeats {
        let t = Instant::now();
        in_pool(|| {
            for m in &ms {
                m.forward(&x[..m.k], 1, &mut y[..m.n]);
            }
        });
        best = best.min(t.elapsed().as_secs_f64());
    }
    println!(
        "{}: chain of 49 matmuls best {:.3} ms ({:.1} GB/s, {:.0} steps/s)",
        kind.name(),
        best * 1e3,
        bytes as f64 / best / 1e9,
        1.0 / best
    );
    Ok(())
}
