//! Writes a random-weight checkpoint of a preset (seed 0, the very weights
//! `gpt-serve bench --plain` times for its `gpt2` row) with GPT-2's own
//! tokenizer, f32, one exit: a gpt2-layout model for the llama.cpp side by
//! side of docs/benchmarks.md (export it with `gpt-serve export-gguf`)
//! without PyTorch.
//!
//! cargo run --release --example random_checkpoint -- gpt2 ../shared/data/tokenizer-gpt2 OUT

use std::path::Path;

use anyhow::Context;
use candle_core::Device;
use gpt_serve::checkpoint::{self, CheckpointConfig};
use gpt_serve::model::config::{Config, Exit};
use gpt_serve::model::gpt::init_weights;
use gpt_serve::tokenizer::Tokenizer;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [preset, tokenizer, out] = args.as_slice() else {
        anyhow::bail!("usage: random_checkpoint PRESET GPT2_TOKENIZER_DIR OUT");
    };
    let mut cfg = Config::preset(preset)?;
    cfg.exits = vec![Exit {
        block: cfg.n_layer,
        weight: 1.0,
    }];
    let tok = Tokenizer::gpt2(Path::new(tokenizer))
        .with_context(|| format!("reading vocab.json + merges.txt in {tokenizer}"))?;
    anyhow::ensure!(
        tok.vocab_size() <= cfg.vocab_size,
        "the tokenizer has {} tokens, the {preset} preset's vocab_size is {}",
        tok.vocab_size(),
        cfg.vocab_size
    );
    let w = init_weights(&cfg, 0, &Device::Cpu)?;
    let ck = CheckpointConfig {
        training: serde_json::json!({ "random": preset }),
        ..CheckpointConfig::new(cfg, "f32")
    };
    checkpoint::save(Path::new(out), &ck, &w, &tok)?;
    println!("wrote {out}");
    Ok(())
}
