//! The exit cascade against final-only verification, interleaved: each
//! prompt is decoded with the tree drafter's chains, final-only and with
//! the cascade at each margin, one after the other, best of 3 each, so a
//! busy machine slows every arm alike. Prints seconds, tokens per verify
//! step and drafts cut, per arm, and the ratio to final-only.
//!
//! `cargo run --release -p gpt-serve-research --example cascade_ab -- MODEL_DIR TEXT PROMPTS TEMPERATURE MARGIN,..`
//! (`inf` as a margin: the exits score every draft but never cut, which
//! prices the cascade's own work). Tune on the train split.

use std::path::Path;
use std::time::Instant;

use anyhow::Context;
use candle_core::Device;
use gpt_serve::checkpoint;
use gpt_serve::decode::proposer::TreeDrafter;
use gpt_serve::decode::{GenParams, Generator, SpecStats};
use gpt_serve::drafter::Drafter;
use gpt_serve::model::cpu::CpuGpt;
use gpt_serve::sampling::SamplingParams;

const PROMPT_LEN: usize = 32;
const NEW_TOKENS: usize = 128;

/// Seconds (best of 3) and counters of decoding `prompt` with `params`.
fn decode(
    model: &CpuGpt,
    drafter: &Drafter,
    prompt: &[u32],
    params: &GenParams,
) -> anyhow::Result<(f64, SpecStats)> {
    let mut best = f64::MAX;
    let mut stats = SpecStats::default();
    for _ in 0..3 {
        let t = Instant::now();
        let (mut g, _) = Generator::new(
            model,
            Box::new(TreeDrafter::new(drafter)),
            prompt,
            params.clone(),
            u32::MAX,
            None,
        )?;
        while g.finished.is_none() {
            g.step()?;
        }
        best = best.min(t.elapsed().as_secs_f64());
        stats = g.stats;
    }
    Ok((best, stats))
}

fn main() -> anyhow::Result<()> {
    let a: Vec<String> = std::env::args().collect();
    anyhow::ensure!(
        a.len() == 6,
        "usage: cascade_ab MODEL_DIR TEXT PROMPTS TEMPERATURE MARGIN,.."
    );
    let dir = Path::new(&a[1]);
    let n: usize = a[3].parse().context("PROMPTS")?;
    let temperature: f32 = a[4].parse().context("TEMPERATURE")?;
    let margins: Vec<f32> = a[5]
        .split(',')
        .map(str::parse)
        .collect::<Result<_, _>>()
        .context("MARGIN,..")?;
    let loaded = checkpoint::load(dir, &Device::Cpu)?;
    let model = loaded.cpu(loaded.serving_dtype())?;
    let drafter = Drafter::load(&dir.join(checkpoint::DRAFTER_FILE), model.cfg.vocab_size)?;
    let prompts =
        gpt_serve::cli::bench::prompts_from(Path::new(&a[2]), &loaded.tokenizer, n, PROMPT_LEN)?;
    let arms: Vec<Option<f32>> = std::iter::once(None)
        .chain(margins.iter().copied().map(Some))
        .collect();
    let mut secs = vec![0.0; arms.len()];
    let mut stats = vec![SpecStats::default(); arms.len()];
    gpt_serve::model::cpu::in_pool(|| -> anyhow::Result<()> {
        for (i, prompt) in prompts.iter().enumerate() {
            for (k, arm) in arms.iter().enumerate() {
                let params = GenParams {
                    max_tokens: NEW_TOKENS,
                    sampling: SamplingParams {
                        temperature,
                        top_p: if temperature > 0.0 { 0.95 } else { 1.0 },
                        seed: 1000 + i as u64,
                        ..Default::default()
                    },
                    cascade: arm.is_some(),
                    exit_margin: arm.unwrap_or(f32::INFINITY),
                    stop_at_eot: false,
                    ..Default::default()
                };
                let (s, st) = decode(&model, &drafter, prompt, &params)?;
                secs[k] += s;
                stats[k].add(&st);
            }
        }
        Ok(())
    })?;
    println!("| arm | seconds | vs final-only | tokens/step | drafts cut by exit |");
    println!("|---|---|---|---|---|");
    for (k, arm) in arms.iter().enumerate() {
        let st = &stats[k];
        let name = arm.map_or("final-only".into(), |m| format!("cascade, margin {m}"));
        println!(
            "| {name} | {:.2} | {:.3} | {:.2} | {:?} |",
            secs[k],
            secs[0] / secs[k],
            (st.accepted + st.steps) as f64 / st.steps.max(1) as f64,
            st.truncated_by_exit
        );
    }
    Ok(())
}
