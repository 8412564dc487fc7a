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
//! `cargo run --release --example verify_profile -- models/default layerskip f16 0.770,0.877`
//! measures self-speculative drafting with each early exit (LayerSkip): one
//! row through the blocks up to the exit plus its head, and r rows continuing
//! from that exit's states through the final head, against a plain step;
//! then the greedy speedup those costs imply at the given per-token agreement
//! of each exit with the final head (`gpt-serve eval`), for 1..=8 drafts.

use gpt_serve::checkpoint;
use gpt_serve::cpu::{CpuCache, CpuGpt, WeightDtype};
use gpt_serve::forward::Forward;

/// One forward of `rows` after the `ctx` cached tokens, through the blocks
/// up to `to` and exit `exit`'s head; then the cache is rolled back to `ctx`.
fn pass(
    m: &CpuGpt,
    cache: &mut CpuCache,
    ctx: usize,
    rows: &[u32],
    to: usize,
    exit: usize,
) -> anyhow::Result<()> {
    let mut s = m.embed(rows, ctx)?;
    m.run_blocks(&mut s, to, cache)?;
    Forward::exit_logits(m, &s, exit, 0..rows.len())?;
    cache.truncate(ctx);
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let dir = args.get(1).map_or("models/default", String::as_str);
    let curve = args.get(2).is_some_and(|s| s == "curve");
    let layerskip = args.get(2).is_some_and(|s| s == "layerskip");
    let k: usize = if curve || layerskip {
        1
    } else {
        args.get(2).map_or(Ok(4), |s| s.parse())?
    };
    let dt = match args.get(3).map(String::as_str) {
        Some("f32") => WeightDtype::F32,
        _ => WeightDtype::F16,
    };
    let loaded = checkpoint::load(std::path::Path::new(dir), &candle_core::Device::Cpu)?;
    let m = loaded.cpu(dt)?;
    let cfg = m.cfg.clone();
    let ctx = 128.min(cfg.block_size / 2);
    let ids: Vec<u32> = (0..ctx as u32)
        .map(|i| i * 3 % cfg.vocab_size as u32)
        .collect();
    let mut cache = m.new_cache();
    let mut s = m.embed(&ids, 0)?;
    m.run_blocks(&mut s, cfg.n_layer, &mut cache)?;
    if layerskip {
        let agree: Vec<f64> = args.get(4).map_or(Ok(vec![]), |a| {
            a.split(',').map(str::parse).collect::<Result<_, _>>()
        })?;
        return layerskip_costs(&m, &mut cache, ctx, &agree);
    }
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
                        pass(&m, &mut cache, ctx, &rows, cfg.n_layer, cfg.exits.len() - 1)?;
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
    let mut step = || pass(&m, &mut cache, ctx, &rows, cfg.n_layer, cfg.exits.len() - 1);
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

/// Best-of-9-rounds costs, relative to a plain 1-row step, of drafting one
/// token with each non-final exit and of finishing r = 1..=8 rows from that
/// exit's states; then the implied greedy speedup at agreement `agree[e]`.
fn layerskip_costs(
    m: &CpuGpt,
    cache: &mut CpuCache,
    ctx: usize,
    agree: &[f64],
) -> anyhow::Result<()> {
    use std::time::Instant;
    let cfg = &m.cfg;
    let last = cfg.exits.len() - 1;
    let pool = rayon::ThreadPoolBuilder::new().build()?;
    let mut plain = f64::MAX;
    let mut draft = vec![f64::MAX; last];
    let mut rest = vec![[f64::MAX; 9]; last];
    pool.install(|| -> anyhow::Result<()> {
        for _round in 0..9 {
            let reps = 100;
            let t = Instant::now();
            for _ in 0..reps {
                pass(m, cache, ctx, &[1], cfg.n_layer, last)?;
            }
            plain = plain.min(t.elapsed().as_secs_f64() / reps as f64);
            for e in 0..last {
                let block = cfg.exits[e].block;
                let t = Instant::now();
                for _ in 0..reps {
                    pass(m, cache, ctx, &[1], block, e)?;
                }
                draft[e] = draft[e].min(t.elapsed().as_secs_f64() / reps as f64);
                for (r, best) in rest[e].iter_mut().enumerate().skip(1) {
                    let rows: Vec<u32> = (0..r as u32).collect();
                    let mut spent = 0.0;
                    for _ in 0..reps {
                        let mut s = m.embed(&rows, ctx)?;
                        m.run_blocks(&mut s, block, cache)?;
                        let t = Instant::now();
                        m.run_blocks(&mut s, cfg.n_layer, cache)?;
                        Forward::exit_logits(m, &s, last, 0..r)?;
                        spent += t.elapsed().as_secs_f64();
                        cache.truncate(ctx);
                    }
                    *best = best.min(spent / reps as f64);
                }
            }
        }
        Ok(())
    })?;
    println!("plain step: {:.0} us", plain * 1e6);
    for e in 0..last {
        let block = cfg.exits[e].block;
        let d = draft[e] / plain;
        let r: Vec<String> = (1..=8)
            .map(|r| format!("{:.2}", rest[e][r] / plain))
            .collect();
        println!(
            "exit {block}: draft one token {d:.2}x a plain step; finish r rows from block {block}: {}",
            r.join(" / ")
        );
        let Some(&a) = agree.get(e) else { continue };
        // k drafts d1..dk from the exit (k passes over pending, d1..d(k-1)),
        // then those k rows finish from block `block`: m leading matches give
        // m + 1 tokens (the final head's correction), all k give k.
        let best = (1..=8usize)
            .map(|k| {
                let tokens: f64 = (0..k)
                    .map(|m| a.powi(m as i32) * (1.0 - a) * (m + 1) as f64)
                    .sum::<f64>()
                    + a.powi(k as i32) * k as f64;
                let cost = k as f64 * d + rest[e][k] / plain;
                (k, tokens / cost)
            })
            .fold((0, 0.0), |b, x| if x.1 > b.1 { x } else { b });
        println!(
            "exit {block} at agreement {a:.3}: best {} drafts -> {:.2}x a plain step (greedy, implied)",
            best.0, best.1
        );
    }
    Ok(())
}
