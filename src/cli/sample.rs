//! The `sample` subcommand: one prompt through the CPU inference path with
//! the checkpoint's drafter, text to stdout and speed to stderr.

use std::path::PathBuf;

use anyhow::Context;

use crate::checkpoint;
use crate::decode::{proposer, GenParams, Generator};
use crate::model::cpu::KvDtype;
use crate::sampling::SamplingParams;

#[derive(clap::Args, Debug)]
pub struct SampleArgs {
    #[arg(long, default_value = "models/default")]
    pub model: PathBuf,
    #[arg(long, default_value = "")]
    pub prompt: String,
    #[arg(long, default_value_t = 100)]
    pub max_tokens: usize,
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Decode without the drafter.
    #[arg(long)]
    pub no_speculate: bool,
    /// Weight storage, as `serve --weights`: auto, f32, f16, q8_0, q4_0.
    #[arg(long, alias = "dtype", value_parser = super::serve::WEIGHTS, default_value = "auto")]
    pub weights: String,
    /// KV cache storage, as `serve --kv-cache`: f32 or f16.
    #[arg(long, env = "GPT_SERVE_KV_CACHE", value_parser = KvDtype::NAMES, default_value = "f32")]
    pub kv_cache: String,
}

pub fn run(a: &SampleArgs) -> anyhow::Result<()> {
    let (model, prompt) = (&a.model, &a.prompt);
    let (max_tokens, temperature, seed, no_speculate) =
        (a.max_tokens, a.temperature, a.seed, a.no_speculate);
    let device = candle_core::Device::Cpu;
    let loaded = checkpoint::load(model, &device)?;
    let dtype = loaded
        .weight_dtype(&a.weights)
        .map_err(anyhow::Error::msg)?;
    let kv = KvDtype::parse(&a.kv_cache).map_err(anyhow::Error::msg)?;
    let gpt = loaded.cpu(dtype)?.with_kv_cache(kv);
    let drafters = proposer::Drafters {
        tree: crate::drafter::Drafter::load(
            &model.join(checkpoint::DRAFTER_FILE),
            gpt.cfg.vocab_size,
        )
        .ok(),
        head: crate::model::draft_head::DraftHead::load(model, &loaded.weights)?
            .map(|h| h.threaded_like_model(dtype.is_quantized())),
    };
    let tok = &loaded.tokenizer;
    let mut ids = tok.encode(prompt)?;
    if ids.is_empty() {
        ids.push(tok.eot());
    }
    let max_tokens = max_tokens.min(gpt.cfg.block_size.saturating_sub(ids.len()));
    let params = GenParams {
        max_tokens,
        sampling: SamplingParams {
            temperature,
            seed,
            ..Default::default()
        },
        speculate: !no_speculate,
        ..Default::default()
    };
    // Sized by the tree drafter's stored cost curve (the server measures its own).
    let costs = drafters.tree.as_ref().map_or_else(
        || {
            let guess = |k: usize| 1.0 + crate::drafter::GUESSED_COST_PER_DRAFT * k as f64;
            (0..=proposer::HEAD_K_MAX).map(guess).collect()
        },
        |d| d.verify_costs(),
    );
    let proposer: Box<dyn proposer::Proposer> = match &drafters.head {
        Some(h) => {
            let head_draft = crate::model::cpu::in_pool(|| proposer::measure_draft_cost(&gpt, h))?;
            let costs = proposer::Costs {
                verify: costs,
                head_draft,
            };
            let greedy = proposer::tree_or_plain(drafters.tree.as_ref(), None);
            Box::new(proposer::HeadDrafter::new(h, costs, greedy))
        }
        None => proposer::tree_or_plain(drafters.tree.as_ref(), None),
    };
    let (mut g, _) =
        Generator::new(&gpt, proposer, &ids, params, tok.eot(), None).context("prompt")?;
    let t0 = std::time::Instant::now();
    let out = crate::model::cpu::in_pool(|| g.run())?;
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
    Ok(())
}
