//! The drafter's GBDT at the sizes: fit time on N rows x 32 features
//! with K classes (50 rounds, depth 6), and single-row prediction latency
//! (the drafter predicts one row per draft token). Synthetic rows whose
//! class is a function of a few features plus noise.
//!
//! `cargo run --release --example gbdt_bench -- 200000 255`

use std::time::Instant;

use gpt_serve::drafter::gbdt::{Gbdt, GbdtParams, Target};
use rand::{Rng, SeedableRng};

fn data(n: usize, k: usize, seed: u64) -> (Vec<Vec<f32>>, Vec<Target>) {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut rows = Vec::with_capacity(n);
    let mut targets = Vec::with_capacity(n);
    for _ in 0..n {
        let r: Vec<f32> = (0..32).map(|_| rng.random::<f32>()).collect();
        let class = if rng.random::<f32>() < 0.1 {
            rng.random_range(0..k)
        } else {
            ((r[0] * 16.0) as usize * 16 + (r[1] * 16.0) as usize) % k
        };
        rows.push(r);
        targets.push(vec![(class as u32, 1.0)]);
    }
    (rows, targets)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let n: usize = args.get(1).map_or(Ok(200_000), |s| s.parse())?;
    let k: usize = args.get(2).map_or(Ok(255), |s| s.parse())?;
    let (rows, targets) = data(n, k, 1);
    let (vr, vt) = data(n / 10, k, 2);
    let p = GbdtParams {
        rounds: std::env::var("ROUNDS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(50),
        early_stopping: usize::MAX / 2,
        ..Default::default()
    };
    let t = Instant::now();
    let g = Gbdt::fit(&rows, &targets, k, (&vr, &vt), &p)?;
    let fit_s = t.elapsed().as_secs_f64();
    eprintln!("valid loss by round: {:?}", g.valid_loss);
    let acc = vr
        .iter()
        .zip(&vt)
        .filter(|(r, t)| {
            let pr = g.predict_proba(r);
            let best = (0..pr.len())
                .max_by(|a, b| pr[*a].total_cmp(&pr[*b]))
                .unwrap_or(0);
            best as u32 == t[0].0
        })
        .count() as f64
        / vr.len() as f64;
    // Single-row latency over varied rows: the packed layout (f16 leaves,
    // trees walked side by side) that serving uses, and the plain f32 walk.
    let reps: usize = std::env::var("REPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let mut sink = 0f32;
    let mut out = vec![0f32; k];
    let t = Instant::now();
    for i in 0..reps {
        g.predict_proba_into(&vr[i % vr.len()], &mut out);
        sink += out[0];
    }
    let packed_us = t.elapsed().as_secs_f64() / reps as f64 * 1e6;
    let t = Instant::now();
    for i in 0..reps {
        sink += g.predict_proba_f32(&vr[i % vr.len()])[0];
    }
    let walk_us = t.elapsed().as_secs_f64() / reps as f64 * 1e6;
    // The same row again and again: its leaves stay in L1, so the gap to
    // the varied-row figure is the cost of fetching leaves.
    let t = Instant::now();
    for _ in 0..reps {
        g.predict_proba_into(&vr[7], &mut out);
        sink += out[0];
    }
    let hot_us = t.elapsed().as_secs_f64() / reps as f64 * 1e6;
    eprintln!("same row repeated (leaves in L1): {hot_us:.2} us");
    println!(
        "{{\"rows\": {n}, \"features\": 32, \"classes\": {k}, \"trees\": {}, \"fit_s\": {fit_s:.1}, \"val_accuracy\": {acc:.3}, \"predict_us_per_row\": {packed_us:.2}, \"predict_us_per_row_f32_walk\": {walk_us:.2}, \"sink\": {sink:.1}}}",
        g.n_trees()
    );
    Ok(())
}
