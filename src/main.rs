//! The `gpt-serve` command line: train, sample, eval, train-drafter, serve, bench,
//! import-hf, export-hf, export-gguf.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

use gpt_serve::train;

#[derive(Parser)]
#[command(
    name = "gpt-serve",
    version,
    about = "Train small multi-exit GPTs and serve them with speculative cascade decoding"
)]
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
    TrainDrafter(train::label::TrainDrafterArgs),
    /// Fit the drafter's sampled-tree calibration on the train split and
    /// measure its calibration error on held-out text.
    CalibrateDrafter(train::label::calibrate::CalibrateArgs),
    /// Count the drafter's n-gram continuation tables on the train split
    /// and link them from its file (sampled drafts rank their successors).
    CountNgrams(train::label::ngrams::CountNgramsArgs),
    /// Train the draft head (drafts from the model's hidden state) on the
    /// train split and write it beside the checkpoint.
    TrainHead(train::head::TrainHeadArgs),
    /// Fit the draft head's calibration (a draft's chance from its margin)
    /// on the train split and measure its calibration error on held-out text.
    CalibrateHead(train::head_calibrate::CalibrateHeadArgs),
    /// Generate text from a checkpoint.
    Sample(gpt_serve::cli::sample::SampleArgs),
    /// Serve a checkpoint over an OpenAI-compatible HTTP API.
    Serve(gpt_serve::cli::serve::ServeArgs),
    /// Benchmarks: plain decode figures and speculative decoding side by side.
    Bench(gpt_serve::cli::bench::BenchOptions),
    /// Import a local Hugging Face GPT-2 directory (GPT2LMHeadModel) as a checkpoint.
    ImportHf {
        /// Directory with config.json, model.safetensors (or shards and
        /// their index) and tokenizer.json (or vocab.json + merges.txt).
        dir: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// auto (the source dtype), f32 or f16 (model.safetensors in that
        /// dtype), or q8_0 / q4_0 (recorded in config.json: `--weights auto`
        /// then serves those blocks).
        #[arg(long, default_value = "auto")]
        dtype: String,
    },
    /// Export a baseline-architecture checkpoint to Hugging Face GPT2LMHeadModel format.
    ExportHf {
        #[arg(long, default_value = "models/default")]
        model: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    /// Export a baseline-architecture checkpoint as a GGUF file for llama.cpp (gpt2).
    ExportGguf {
        #[arg(long, default_value = "models/default")]
        model: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// Matrices as auto (the checkpoint's serving dtype), f32, f16,
        /// q8_0 or q4_0 (the blocks gpt-serve serves, byte for byte).
        #[arg(long, alias = "dtype", default_value = "auto")]
        weights: String,
    },
    /// Write the OpenAPI document of the HTTP API.
    Openapi {
        #[arg(long, default_value = "proto/openapi.json")]
        out: PathBuf,
    },
    /// Exit 0 when a local server answers /health with 200 (for container HEALTHCHECKs).
    Healthcheck {
        #[arg(long, env = "GPT_SERVE_PORT", default_value_t = 8000)]
        port: u16,
    },
    /// Loss of every exit on text files, and its agreement with the final head.
    Eval(train::eval::EvalArgs),
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    if let Some(n) = cli.threads {
        // candle's CPU kernels and gemm read the rayon pool size.
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global();
    }
    match cli.cmd {
        Cmd::Train(o) => {
            let s = train::run(*o)?;
            println!("{}", serde_json::to_string_pretty(&s)?);
        }
        Cmd::TrainDrafter(a) => train::label::run(&a)?,
        Cmd::CalibrateDrafter(a) => train::label::calibrate::run(&a)?,
        Cmd::CountNgrams(a) => train::label::ngrams::run(&a)?,
        Cmd::TrainHead(a) => train::head::run(&a)?,
        Cmd::CalibrateHead(a) => {
            train::head_calibrate::run(&a)?;
        }
        Cmd::Sample(a) => gpt_serve::cli::sample::run(&a)?,
        Cmd::Serve(a) => gpt_serve::cli::serve::run(a)?,
        Cmd::ImportHf { dir, out, dtype } => {
            let c = gpt_serve::hf::import::import_hf_as(&dir, &out, &dtype)?;
            println!("{}", gpt_serve::hf::import::summary(&out, &c));
        }
        Cmd::ExportHf { model, out } => gpt_serve::hf::export::export_hf(&model, &out)?,
        Cmd::ExportGguf {
            model,
            out,
            weights,
        } => {
            let dt = gpt_serve::gguf::export::export_gguf(&model, &out, &weights)?;
            println!("wrote {} ({} matrices)", out.display(), dt.name());
        }
        Cmd::Bench(o) => {
            let r = gpt_serve::cli::bench::run(&o)?;
            let md = gpt_serve::cli::bench::markdown(&r);
            std::fs::write(o.out.with_extension("md"), &md)?;
            println!("{md}");
        }
        Cmd::Healthcheck { port } => gpt_serve::cli::serve::healthcheck(port)?,
        Cmd::Openapi { out } => {
            std::fs::write(&out, gpt_serve::serving::server::openapi_json() + "\n")
                .with_context(|| format!("writing {}", out.display()))?;
        }
        Cmd::Eval(a) => train::eval::run(&a)?,
    }
    Ok(())
}
