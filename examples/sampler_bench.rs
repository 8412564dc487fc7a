//! The sampler's cost per row: `sampling::choose` (the pruned Gumbel-max
//! scan) against the full scan it draws the token of
//! (`sampling::gumbel_argmax_reference`), on the shipped model's logits
//! for 256 positions of tinyshakespeare, at temperatures 0.8 and 1.0
//! (top_p 1). Interleaved rounds, best of each; checks that both draw the
//! same tokens.
//!
//! `cargo run --release --example sampler_bench` (needs models/default and
//! ../shared/data/tinyshakespeare.txt)

use std::time::Instant;

use candle_core::Device;
use gpt_serve::checkpoint;
use gpt_serve::model::cpu::{in_pool, WeightDtype};
use gpt_serve::model::forward::Segment;
use gpt_serve::sampling::{self, Noise, SamplingParams};

const ROWS: usize = 256;
const ROUNDS: usize = 15;

fn main() -> anyhow::Result<()> {
    let loaded = checkpoint::load(std::path::Path::new("models/default"), &Device::Cpu)?;
    let model = loaded.cpu(WeightDtype::F16)?;
    let text = std::fs::read_to_string("../shared/data/tinyshakespeare.txt")?;
    let ids = loaded.tokenizer.encode(&text[..20_000])?;
    let rows: Vec<Vec<f32>> = in_pool(|| -> candle_core::Result<Vec<Vec<f32>>> {
        let mut cache = model.new_cache();
        let mut seg = [Segment {
            tokens: &ids[..ROWS],
            pos: 0,
            cache: &mut cache,
            logits: 0..ROWS,
            tree: None,
        }];
        let l = model.forward_batch(&mut seg)?.pop().expect("one segment");
        Ok(l.iter().map(<[f32]>::to_vec).collect())
    })?;
    for temperature in [0.8f32, 1.0] {
        let sp = SamplingParams {
            temperature,
            seed: 5,
            ..SamplingParams::default()
        };
        let (mut pruned, mut full) = (f64::MAX, f64::MAX);
        for _ in 0..ROUNDS {
            let t = Instant::now();
            let a: Vec<u32> = rows
                .iter()
                .enumerate()
                .map(|(i, r)| sampling::choose(r, &sp, 0, i))
                .collect();
            pruned = pruned.min(t.elapsed().as_secs_f64());
            let t = Instant::now();
            let b: Vec<u32> = rows
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    sampling::gumbel_argmax_reference(r, 1.0 / temperature, Noise::at(5, 0, i))
                })
                .collect();
            full = full.min(t.elapsed().as_secs_f64());
            assert_eq!(a, b, "the pruned scan drew another token");
        }
        let us = |s: f64| s / ROWS as f64 * 1e6;
        println!(
            "T={temperature}: choose {:.2} us a row, full scan {:.2} us ({:.1}x), vocabulary {}",
            us(pruned),
            us(full),
            full / pruned,
            rows[0].len()
        );
    }
    Ok(())
}
