//! Sweeps LayerSkip self-drafting settings (which exit, how many drafts,
//! the confidence floor) on prompts of a text file, against plain decoding,
//! greedy, the configurations interleaved round by round so the shared
//! machine's drift hits them alike; prints tokens per verify step and the
//! speedup (best of the rounds per configuration). Tune on the train split,
//! report on val/unseen with `gpt-serve bench`.
//!
//! `cargo run --release --example self_draft_sweep -- models/default ../shared/data/gutenberg/train.txt.gz`

use std::time::Instant;

use gpt_serve::checkpoint;
use gpt_serve::decode::{GenParams, Generator, Proposer, SelfDraft};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    anyhow::ensure!(
        args.len() >= 3,
        "usage: self_draft_sweep MODEL_DIR TEXT [PROMPTS] [ROUNDS]"
    );
    let n_prompts: usize = args.get(3).map_or(Ok(8), |s| s.parse())?;
    let rounds: usize = args.get(4).map_or(Ok(3), |s| s.parse())?;
    let loaded = checkpoint::load(std::path::Path::new(&args[1]), &candle_core::Device::Cpu)?;
    let model = loaded.cpu(loaded.serving_dtype())?;
    let text = gpt_serve::train::data::read_text(std::path::Path::new(&args[2]))?;
    let ids = loaded.tokenizer.encode(&text[..text.len().min(2 << 20)])?;
    let stride = (ids.len() - 64) / n_prompts;
    let prompts: Vec<&[u32]> = (0..n_prompts)
        .map(|i| &ids[i * stride..i * stride + 64])
        .collect();
    let mut configs = vec![None];
    for exit in 0..model.cfg.exits.len() - 1 {
        for k_max in [2, 3, 4, 6] {
            for min_confidence in [0.0, 0.2, 0.4, 0.6] {
                configs.push(Some(SelfDraft {
                    exit,
                    k_max,
                    min_confidence,
                }));
            }
        }
    }
    let mut best = vec![f64::MAX; configs.len()];
    let mut steps = vec![0u64; configs.len()];
    let mut tokens = 0usize;
    gpt_serve::cpu::in_pool(|| -> anyhow::Result<()> {
        for round in 0..rounds {
            for (c, sd) in configs.iter().enumerate() {
                let t = Instant::now();
                let (mut n_steps, mut n_tok) = (0, 0);
                for p in &prompts {
                    let params = GenParams {
                        max_tokens: 128,
                        speculate: sd.is_some(),
                        self_draft: *sd,
                        stop_at_eot: false,
                        ..Default::default()
                    };
                    let (mut g, _) =
                        Generator::new(&model, Proposer::None, p, params, u32::MAX, None)?;
                    n_tok += g.run()?.len();
                    n_steps += g.stats.steps;
                }
                best[c] = best[c].min(t.elapsed().as_secs_f64());
                steps[c] = n_steps;
                tokens = n_tok;
            }
            eprintln!("round {round} done");
        }
        Ok(())
    })?;
    println!("| exit block | k_max | min confidence | tokens/step | tok/s | speedup |");
    println!("|---|---|---|---|---|---|");
    for (c, sd) in configs.iter().enumerate() {
        let (e, k, m) = sd.map_or(("plain".into(), "-".into(), "-".into()), |s| {
            (
                model.cfg.exits[s.exit].block.to_string(),
                s.k_max.to_string(),
                s.min_confidence.to_string(),
            )
        });
        println!(
            "| {e} | {k} | {m} | {:.2} | {:.0} | {:.2}x |",
            tokens as f64 / steps[c] as f64,
            tokens as f64 / best[c],
            best[0] / best[c]
        );
    }
    Ok(())
}
