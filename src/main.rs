//! The `gpt-serve` command line: train, sample, eval, train-drafter, serve, bench.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

use gpt_serve::checkpoint;
use gpt_serve::decode::{GenParams, Generator};
use gpt_serve::sampling::SamplingParams;
use gpt_serve::train;

#[derive(Parser)]
#[command(name = "gpt-serve", version, about = "Train small multi-exit GPTs and serve them with speculative cascade decoding")]
struct Cli {
    /// Compute threads (default: all cores).
    #[arg(long, global = true, env = "GPT_SERVE_THREADS")]
    threads: Option<usize>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Train a model (and its drafter) on text files.
    Train(Box<train::TrainOptions>),
    /// Retrain the tree drafter of an existing checkpoint.
    TrainDrafter {
        #[arg(long, default_value = "models/default")]
        model: PathBuf,
        /// Text to label with (train split).
        #[arg(long, required = true)]
        data: Vec<PathBuf>,
        /// Held-out text for the replay report.
        #[arg(long, required = true)]
        val: Vec<PathBuf>,
        #[command(flatten)]
        opts: train::label::DrafterOptions,
    },
    /// Generate text from a checkpoint.
    Sample {
        #[arg(long, default_value = "models/default")]
        model: PathBuf,
        #[arg(long, default_value = "")]
        prompt: String,
        #[arg(long, default_value_t = 100)]
        max_tokens: usize,
        #[arg(long, default_value_t = 0.0)]
        temperature: f32,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Decode without the drafter.
        #[arg(long)]
        no_speculate: bool,
    },
    /// Loss of every exit on text files.
    Eval {
        #[arg(long, default_value = "models/default")]
        model: PathBuf,
        #[arg(required = true)]
        data: Vec<PathBuf>,
        /// Windows of block_size tokens to score.
        #[arg(long, default_value_t = 200)]
        max_windows: usize,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(n) = cli.threads {
        // candle's CPU kernels and gemm read the rayon pool size.
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
        let _ = rayon::ThreadPoolBuilder::new().num_threads(n).build_global();
    }
    match cli.cmd {
        Cmd::Train(o) => {
            let s = train::run(*o)?;
            println!("{}", serde_json::to_string_pretty(&s)?);
        }
        Cmd::TrainDrafter { model, data, val, opts } => {
            let loaded = checkpoint::load(&model, &candle_core::Device::Cpu)?;
            let tr = train::data::load_tokens(&data, &loaded.tokenizer, None)?;
            let va = train::data::load_tokens(&val, &loaded.tokenizer, None)?;
            let d = train::label::train_drafter(&model, &opts, &va, &tr)?;
            println!("{}", serde_json::to_string_pretty(&d.report)?);
        }
        Cmd::Sample { model, prompt, max_tokens, temperature, seed, no_speculate } => {
            let device = candle_core::Device::Cpu;
            let loaded = checkpoint::load(&model, &device)?;
            let gpt = loaded.model(&device)?;
            let drafter = gpt_serve::drafter::Drafter::load(&model.join(checkpoint::DRAFTER_FILE), gpt.cfg.vocab_size).ok();
            let tok = &loaded.tokenizer;
            let mut ids = tok.encode(&prompt)?;
            if ids.is_empty() {
                ids.push(tok.eot());
            }
            let max_tokens = max_tokens.min(gpt.cfg.block_size.saturating_sub(ids.len()));
            let params = GenParams {
                max_tokens,
                sampling: SamplingParams { temperature, seed, ..Default::default() },
                speculate: !no_speculate,
                ..Default::default()
            };
            let (mut g, _) = Generator::new(&gpt, drafter.as_ref(), &ids, params, tok.eot(), None).context("prompt")?;
            let t0 = std::time::Instant::now();
            let out = g.run()?;
            let secs = t0.elapsed().as_secs_f64();
            let ids: Vec<u32> = out.iter().map(|t| t.id).collect();
            println!("{prompt}{}", tok.decode(&ids)?);
            eprintln!(
                "{} tokens in {:.2}s ({:.1} tok/s), {} steps, {} drafted, {} accepted",
                ids.len(),
                secs,
                ids.len() as f64 / secs,
                g.stats.steps,
                g.stats.drafted,
                g.stats.accepted
            );
        }
        Cmd::Eval { model, data, max_windows } => {
            let device = candle_core::Device::Cpu;
            let loaded = checkpoint::load(&model, &device)?;
            let gpt = loaded.model(&device)?;
            let tokens = train::data::load_tokens(&data, &loaded.tokenizer, None)?;
            let losses = train::eval::exit_losses_sequential(&gpt, &tokens, gpt.cfg.block_size, max_windows)?;
            for (e, l) in gpt.cfg.exits.iter().zip(losses) {
                println!("exit {:>3}: loss {l:.4}", e.block);
            }
        }
    }
    Ok(())
}
