//! Single-sequence plain decode of the random gpt2-layout model (seed 0,
//! the weights `gpt-serve bench --plain` times), as `bench --plain` times
//! it: a 16-token prompt then 32 tokens, repeated, so `perf record` sees
//! the decode loop and not the load.
//!
//! cargo run --release --example decode_profile -- [f32|f16|q8_0|q4_0] [REPEATS]
//!
//! `chain` times the step's 49 matmuls alone (q8_0 and q4_0); `split`
//! times them at 1..64 rows on the thread team and on rayon's pool (where
//! `team::MAX_ROWS` comes from).

use std::time::Instant;

use candle_core::Device;
use gpt_serve::cli::bench::plain_decode_seconds;
use gpt_serve::model::config::{Config, Exit};
use gpt_serve::model::cpu::{in_pool, CpuGpt, WeightDtype};
use gpt_serve::model::gpt::init_weights;
use gpt_serve::model::quant::{KernelPath, QMatrix, Split};
use gpt_serve::model::team::Team;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("chain") {
        use gpt_serve::model::quant::QuantKind;
        chain(QuantKind::Q8_0, 50)?;
        return chain(QuantKind::Q4_0, 50);
    }
    if args.first().map(String::as_str) == Some("split") {
        return split_rows(20);
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

/// The 49 matmuls of a gpt2 decode step (distinct weights, made up).
fn step_matrices(kind: gpt_serve::model::quant::QuantKind) -> anyhow::Result<Vec<QMatrix>> {
    let c = 768;
    let mut shapes = Vec::new();
    for _ in 0..12 {
        shapes.extend([(3 * c, c), (c, c), (4 * c, c), (c, 4 * c)]);
    }
    shapes.push((50257, c));
    let ms = shapes
        .iter()
        .enumerate()
        .map(|(i, &(n, k))| {
            let w: Vec<f32> = (0..n * k)
                .map(|j| ((j * 2654435761 + i) % 1000) as f32 / 500.0 - 1.0)
                .collect();
            QMatrix::from_out_in("w", kind, &w, (n, k), None)
        })
        .collect::<Result<_, _>>()?;
    Ok(ms)
}

/// Best-of-`repeats` seconds of the 49 matmuls at `m` rows split as `split`.
fn time_chain(ms: &[QMatrix], m: usize, split: Split<'_>, repeats: usize) -> f64 {
    let x = vec![0.5f32; m * 4 * 768];
    let mut y = vec![0f32; m * 50257];
    let path = KernelPath::selected();
    let mut best = f64::MAX;
    for _ in 0..repeats {
        let t = Instant::now();
        in_pool(|| {
            for q in ms {
                q.forward_split(path, split, &x[..m * q.k], m, &mut y[..m * q.n]);
            }
        });
        best = best.min(t.elapsed().as_secs_f64());
    }
    best
}

/// The 49 matmuls of a gpt2 decode step alone (m = 1), distinct weights.
pub fn chain(kind: gpt_serve::model::quant::QuantKind, repeats: usize) -> anyhow::Result<()> {
    let ms = step_matrices(kind)?;
    let bytes: usize = ms.iter().map(|q| q.n * q.k / 32 * kind.block_bytes()).sum();
    let best = time_chain(&ms, 1, Split::for_product(1, 768, 768), repeats);
    println!(
        "{}: chain of 49 matmuls best {:.3} ms ({:.1} GB/s, {:.0} steps/s)",
        kind.name(),
        best * 1e3,
        bytes as f64 / best / 1e9,
        1.0 / best
    );
    Ok(())
}

/// The q8_0 chain at 1..64 rows, on the team and on rayon's pool.
fn split_rows(repeats: usize) -> anyhow::Result<()> {
    let ms = step_matrices(gpt_serve::model::quant::QuantKind::Q8_0)?;
    for m in [1, 2, 4, 8, 12, 16, 24, 32, 64] {
        let team = time_chain(&ms, m, Split::Team(Team::global()), repeats);
        let rayon = time_chain(&ms, m, Split::Rayon, repeats);
        println!(
            "q8_0 chain at {m} rows: team {:.3} ms, rayon {:.3} ms (team / rayon {:.3})",
            team * 1e3,
            rayon * 1e3,
            team / rayon
        );
    }
    Ok(())
}
