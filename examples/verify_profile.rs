//! Loops a k-row verify step of the served model on the CPU inference path,
//! called from a plain thread and from inside a rayon pool (where the
//! matmuls' fork/join is work stealing instead of a cross-thread wake-up);
//! also the loop to `perf record`.
//!
//! `cargo run --release --example verify_profile -- models/default 4 f16`
//! `cargo run --release --example verify_profile -- models/default curve f16`
//! prints the cost of verifying 1..=9 rows relative to 1, inside the pool,
//! the sizes interleaved round by round (so drift hits them alike), best of
//! 9 rounds.

use gpt_serve::checkpoint;
use gpt_serve::fast::WeightDtype;
use gpt_serve::forward::Forward;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let dir = args.get(1).map_or("models/default", String::as_str);
    let curve = args.get(2).is_some_and(|s| s == "curve");
    let k: usize = if curve {
        1
    } else {
        args.get(2).map_or(Ok(4), |s| s.parse())?
    };
    let dt = match args.get(3).map(String::as_str) {
        Some("f32") => WeightDtype::F32,
        _ => WeightDtype::F16,
    };
    let loaded = checkpoint::load(std::path::Path::new(dir), &candle_core::Device::Cpu)?;
    let m = loaded.fast(dt)?;
    let cfg = m.cfg.clone();
    let ctx = 128.min(cfg.block_size / 2);
    let ids: Vec<u32> = (0..ctx as u32)
        .map(|i| i * 3 % cfg.vocab_size as u32)
        .collect();
    let mut cache = m.new_cache();
    let mut s = m.embed(&ids, 0)?;
    m.run_blocks(&mut s, cfg.n_layer, &mut cache)?;
    if curve {
        let pool = rayon::ThreadPoolBuilder::new().build()?;
        let mut best = [f64::MAX; 10];
        pool.install(|| -> anyhow::Result<()> {
            for _round in 0..9 {
                for (k, b) in best.iter_mut().enumerate().skip(1) {
                    let rows: Vec<u32> = (0..k as u32).collect();
                    let reps = 200;
                    let t = std::time::Instant::now();
                    for _ in 0..reps {
                        let mut s = m.embed(&rows, ctx)?;
                        m.run_blocks(&mut s, cfg.n_layer, &mut cache)?;
                        Forward::exit_logits(&m, &s, cfg.exits.len() - 1, 0..k)?;
                        cache.truncate(ctx);
                    }
                    *b = b.min(t.elapsed().as_secs_f64() / reps as f64);
                }
            }
            Ok(())
        })?;
        for (k, b) in best.iter().enumerate().skip(1) {
            println!(
                "verify {k} rows: {:.0} us, {:.2}x one row",
                b * 1e6,
                b / best[1]
            );
        }
        return Ok(());
    }
    let rows: Vec<u32> = (0..k as u32).collect();
    let mut step = || -> anyhow::Result<()> {
        let mut s = m.embed(&rows, ctx)?;
        m.run_blocks(&mut s, cfg.n_layer, &mut cache)?;
        Forward::exit_logits(&m, &s, cfg.exits.len() - 1, 0..k)?;
        cache.truncate(ctx);
        Ok(())
    };
    let n = 1000;
    let t = std::time::Instant::now();
    for _ in 0..n {
        step()?;
    }
    let outside = t.elapsed().as_secs_f64() / n as f64 * 1e6;
    let pool = rayon::ThreadPoolBuilder::new().build()?;
    let t = std::time::Instant::now();
    pool.install(|| -> anyhow::Result<()> {
        for _ in 0..n {
            step()?;
        }
        Ok(())
    })?;
    let inside = t.elapsed().as_secs_f64() / n as f64 * 1e6;
    println!("verify {k}: {outside:.0} us from a plain thread, {inside:.0} us inside a rayon pool");
    Ok(())
}
