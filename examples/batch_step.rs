//! One engine decode step at 32 sequences, without HTTP: the shipped
//! model (q8_0 weights unless `WEIGHTS` says otherwise), 32 caches each
//! holding 120 positions (about what the serving benchmark's sequences
//! hold mid-way: 57-token prompts, 128 new tokens), one forward over the
//! 32 pending rows, then each cache truncated back so every step is alike.
//! Prints the median step; `KV=f16` for an f16 cache, `SEQS=n` for n
//! sequences instead of 32, `STEPS=n` for n steps instead of 200. A profile of this
//! loop (`perf record`) is the server's step at 32 clients without the
//! clients, the HTTP side and the scheduler.
//!
//! `cargo run --release --example batch_step` (needs models/default)

use std::time::Instant;

use candle_core::Device;
use gpt_serve::checkpoint;
use gpt_serve::model::cpu::{in_pool, KvDtype, WeightDtype};
use gpt_serve::model::forward::{Forward, Segment};

const HELD: usize = 120;

fn main() -> anyhow::Result<()> {
    let loaded = checkpoint::load(std::path::Path::new("models/default"), &Device::Cpu)?;
    let weights = std::env::var("WEIGHTS").unwrap_or_else(|_| "q8_0".into());
    let kv = KvDtype::parse(&std::env::var("KV").unwrap_or_else(|_| "f32".into()))
        .map_err(anyhow::Error::msg)?;
    let seqs: usize = std::env::var("SEQS").map_or(Ok(32), |s| s.parse())?;
    let steps: usize = std::env::var("STEPS").map_or(Ok(200), |s| s.parse())?;
    anyhow::ensure!(steps > 0, "STEPS must be at least 1");
    let dtype: WeightDtype = weights.parse().map_err(anyhow::Error::msg)?;
    let model = loaded.cpu(dtype)?.with_kv_cache(kv);
    let vocab = model.cfg.vocab_size as u32;
    let mut caches: Vec<_> = (0..seqs).map(|_| model.new_cache()).collect();
    let prompt = |s: usize| -> Vec<u32> {
        (0..HELD as u32)
            .map(|i| (i * 31 + s as u32 * 7) % vocab)
            .collect()
    };
    let times = in_pool(|| -> candle_core::Result<Vec<f64>> {
        for (s, c) in caches.iter_mut().enumerate() {
            let p = prompt(s);
            let mut seg = [Segment {
                tokens: &p,
                pos: 0,
                cache: c,
                logits: HELD - 1..HELD,
                tree: None,
            }];
            model.forward_batch(&mut seg)?;
        }
        let tokens: Vec<[u32; 1]> = (0..seqs).map(|s| [(s as u32 * 13) % vocab]).collect();
        let mut times = Vec::with_capacity(steps);
        for _ in 0..steps {
            let mut segs: Vec<_> = caches
                .iter_mut()
                .zip(&tokens)
                .map(|(cache, t)| Segment {
                    tokens: t,
                    pos: HELD,
                    cache,
                    logits: 0..1,
                    tree: None,
                })
                .collect();
            let t0 = Instant::now();
            model.forward_batch(&mut segs)?;
            times.push(t0.elapsed().as_secs_f64());
            for c in caches.iter_mut() {
                model.truncate_cache(c, HELD);
            }
        }
        Ok(times)
    })?;
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    let med = sorted[sorted.len() / 2];
    println!(
        "weights {weights}, kv {}: {seqs} rows over {HELD} cached positions each: median step {:.3} ms ({:.0} rows/s), p10 {:.3} ms",
        kv.name(),
        1e3 * med,
        seqs as f64 / med,
        1e3 * sorted[sorted.len() / 10]
    );
    Ok(())
}
