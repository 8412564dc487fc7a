//! Times the parts of one draft-head draft of `models/default` (its next
//! features, its logits, the keyed draw with its margin), threaded on the
//! thread team (as beside a quantized model) and on rayon's pool, over
//! 3,000 drafts: where a draft's time goes (docs/benchmarks.md,
//! "Calibrated head drafts").
//!
//! cargo run --release --example head_profile

use std::path::Path;
use std::time::Instant;

use candle_core::Device;
use gpt_serve::checkpoint;
use gpt_serve::model::draft_head::DraftHead;
use gpt_serve::sampling::{self, SamplingParams};

fn main() -> anyhow::Result<()> {
    gpt_serve::model::cpu::in_pool(profile)
}

fn profile() -> anyhow::Result<()> {
    let dir = Path::new("models/default");
    let loaded = checkpoint::load(dir, &Device::Cpu)?;
    for team in [true, false] {
        let head = DraftHead::load(dir, &loaded.weights)?
            .ok_or_else(|| anyhow::anyhow!("models/default has no draft head"))?
            .threaded_like_model(team);
        let mut f = vec![0.1f32; head.n_embd()];
        let mut logits = vec![0f32; head.vocab()];
        let sp = SamplingParams {
            temperature: 1.0,
            ..Default::default()
        };
        let mut secs = [0f64; 3];
        let n = 3000;
        for i in 0..n {
            let t = Instant::now();
            let g = head
                .next_features(&f, (i % head.vocab()) as u32)
                .expect("a token in the vocabulary");
            secs[0] += t.elapsed().as_secs_f64();
            let t = Instant::now();
            head.logits(&g, &mut logits);
            secs[1] += t.elapsed().as_secs_f64();
            let t = Instant::now();
            std::hint::black_box(sampling::choose_with_margin(&logits, &sp, 0, i));
            secs[2] += t.elapsed().as_secs_f64();
            f = g.iter().map(|x| x * 0.5).collect();
        }
        let us = |x: f64| x / n as f64 * 1e6;
        println!(
            "{}: next features {:.1} us, logits {:.1} us, draw with margin {:.1} us",
            if team { "thread team" } else { "rayon" },
            us(secs[0]),
            us(secs[1]),
            us(secs[2])
        );
    }
    Ok(())
}
