//! `gpt-serve bench`: every figure side by side in one run, on one machine.
//!
//! - plain: decode and prefill tokens/s and the cost of verifying k tokens
//!   vs one, for the served model and random-weight `small` and `gpt2`
//!   shapes;
//! - speculative: the same prompts (val split and text the model never saw)
//!   decoded plainly and with (a) the tree, (b) the tree + exit cascade,
//!   (c) prompt lookup, (d) an oracle drafter (the model's own greedy
//!   output), (e) drafting with an early exit (LayerSkip) alone and (f)
//!   behind the tree, greedy and at temperature 0.8; the speedup is also
//!   given on the non-repeating stretches (tokens whose 4-gram is new,
//!   each timed by its share of its step), since loops are easy to draft;
//!   outputs are checked equal to plain decoding (differences at near-ties,
//!   top-2 logit gap < 1e-3, are counted separately).
//!
//! `plain` measures the plain figures, `speculative` the decoding modes,
//! and `report` turns the JSON results into markdown tables.

mod plain;
pub use plain::plain_decode_seconds;
mod report;
mod row_costs;
mod speculative;

use std::path::PathBuf;

use anyhow::Context;
use candle_core::Device;
use serde_json::{json, Value};

use crate::checkpoint;
use crate::decode::proposer::measure_draft_cost;
use crate::drafter::Drafter;
use crate::model::cpu::KvDtype;
use plain::random_weights;
use speculative::speculative_suite;

pub use plain::{plain_backends, plain_figures};
pub use report::markdown;
pub use speculative::{distinct4, repeating};

#[derive(clap::Args, Clone, Debug)]
pub struct BenchOptions {
    #[arg(long, default_value = "models/default")]
    pub model: PathBuf,
    /// Only the plain decoding figures.
    #[arg(long)]
    pub plain: bool,
    /// Also time the fast path with this weight storage (q8_0, q4_0; f32,
    /// f16 and the checkpoint's served storage always run), and run the
    /// speculative figures with it (default: the served storage).
    #[arg(long, alias = "dtype", value_parser = ["f32", "f16", "q8_0", "q4_0"])]
    pub weights: Option<String>,
    /// KV cache storage of the fast path, as `serve --kv-cache`.
    #[arg(long, env = "GPT_SERVE_KV_CACHE", value_parser = KvDtype::NAMES, default_value = "f32")]
    pub kv_cache: String,
    /// Skip the random-weight gpt2-shaped model (slow).
    #[arg(long)]
    pub no_gpt2: bool,
    #[arg(long, default_value = "../shared/data/gutenberg/val.txt.gz")]
    pub val: PathBuf,
    /// Text the model never saw.
    #[arg(long, default_value = "../shared/data/tinyshakespeare.txt")]
    pub unseen: PathBuf,
    /// Prompts per source.
    #[arg(long, default_value_t = 12)]
    pub prompts: usize,
    #[arg(long, default_value_t = 32)]
    pub prompt_len: usize,
    #[arg(long, default_value_t = 128)]
    pub new_tokens: usize,
    /// Where the JSON results go (untracked by default; pass a path under
    /// bench/ to update the committed figures).
    #[arg(long, default_value = "runs/bench/results.json")]
    pub out: PathBuf,
    /// PyTorch eager / llama.cpp figures re-measured on this machine by
    /// scripts/cpu_reference.py (run by scripts/cpu-reference.sh, which runs
    /// this bench right after, so both come from one run); shown side by side.
    #[arg(long)]
    pub reference: Option<PathBuf>,
    /// Only these speculative modes (comma-separated; plain always runs):
    /// tree, head, tree-chain, tree-before, tree+exits, exit-draft,
    /// tree+exit-draft, prompt-lookup, oracle.
    #[arg(long, value_delimiter = ',')]
    pub modes: Option<Vec<String>>,
    /// Sampling temperatures to run (0 = greedy).
    #[arg(long, value_delimiter = ',', default_values_t = [0.0f32, 0.8])]
    pub temperatures: Vec<f32>,
    /// top_p for temperatures above 0.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Override the drafter's `sample_sharpness` (tuning, on the train split).
    #[arg(long, hide = true)]
    pub sample_sharpness: Option<f32>,
    /// Override the drafter's `sibling_floor` (tuning, on the train split).
    #[arg(long, hide = true)]
    pub sibling_floor: Option<f32>,
    /// Size the tree drafter's drafts by the verify costs stored in the
    /// drafter file instead of measuring them on this machine.
    #[arg(long)]
    pub stored_costs: bool,
    /// The exit cascade's margin (`inf`: the exits only measure; tuning,
    /// on the train split).
    #[arg(long, default_value_t = crate::decode::DEFAULT_EXIT_MARGIN)]
    pub exit_margin: f32,
}

/// `n` prompts of `len` tokens, evenly spaced over the first 4 MB of the
/// text at `path`; a text shorter than one prompt is an error.
pub fn prompts_from(
    path: &std::path::Path,
    tok: &crate::tokenizer::Tokenizer,
    n: usize,
    len: usize,
) -> anyhow::Result<Vec<Vec<u32>>> {
    let text = crate::train::data::read_text(path)
        .with_context(|| format!("bench prompts from {}", path.display()))?;
    let mut end = text.len().min(4 << 20);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let ids = tok.encode(&text[..end])?;
    anyhow::ensure!(
        ids.len() > len,
        "{} gives {} tokens, fewer than one {len}-token prompt",
        path.display(),
        ids.len()
    );
    let stride = (ids.len() - len) / n.max(1);
    Ok((0..n)
        .map(|i| ids[i * stride..i * stride + len].to_vec())
        .collect())
}

pub fn run(o: &BenchOptions) -> anyhow::Result<Value> {
    crate::model::cpu::in_pool(|| run_in_pool(o))
}

fn run_in_pool(o: &BenchOptions) -> anyhow::Result<Value> {
    let device = Device::Cpu;
    let loaded = checkpoint::load(&o.model, &device)?;
    let extra = match &o.weights {
        Some(s) => Some(loaded.weight_dtype(s).map_err(anyhow::Error::msg)?),
        None => None,
    };
    let kv = KvDtype::parse(&o.kv_cache).map_err(anyhow::Error::msg)?;
    let dtype = extra.unwrap_or(loaded.serving_dtype());
    let model = loaded.cpu(dtype)?.with_kv_cache(kv);
    // f32 and f16 always, and what is served (q8_0 for models/default).
    let served = plain_backends(&loaded.config.model, &loaded.weights, 128, Some(dtype), kv)?;
    let mut plain_rows = vec![json!({"model": "served", "backends": served})];
    eprintln!("bench: served model {}", plain_rows[0]);
    if o.plain {
        let (cfg, w) = random_weights("small")?;
        plain_rows.push(
            json!({"model": "random small", "backends": plain_backends(&cfg, &w, 128, extra, kv)?}),
        );
        eprintln!("bench: random small {}", plain_rows[1]);
        if !o.no_gpt2 {
            let (cfg, w) = random_weights("gpt2")?;
            plain_rows.push(
                json!({"model": "random gpt2", "backends": plain_backends(&cfg, &w, 32, extra, kv)?}),
            );
            eprintln!("bench: random gpt2 {}", plain_rows[2]);
        }
    }
    let reference = match &o.reference {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading the reference figures {}", path.display()))?;
            serde_json::from_str::<Value>(&text).with_context(|| {
                format!(
                    "{} is not the JSON of scripts/cpu_reference.py",
                    path.display()
                )
            })?
        }
        None => Value::Null,
    };
    let mut result = json!({
        "machine": format!("{} threads", rayon::current_num_threads()),
        "plain": plain_rows,
        "reference": reference,
    });
    if !o.plain {
        let mut drafter = Drafter::load(
            &o.model.join(checkpoint::DRAFTER_FILE),
            model.cfg.vocab_size,
        )?;
        if let Some(s) = o.sample_sharpness {
            drafter.sample_sharpness = s;
        }
        if let Some(f) = o.sibling_floor {
            drafter.sibling_floor = f;
        }
        let costs = match o.stored_costs {
            true => drafter.verify_costs(),
            false => row_costs::measure(&model, drafter.k_max)?,
        };
        eprintln!("bench: verify cost of k = 0.. drafts: {costs:.2?}");
        result["verify_costs"] = json!(costs);
        let quantized = dtype.is_quantized();
        let head = crate::model::draft_head::DraftHead::load(&o.model, &loaded.weights)?
            .map(|h| h.threaded_like_model(quantized));
        let head_draft = match &head {
            Some(h) => measure_draft_cost(&model, h)?,
            None => 0.0,
        };
        eprintln!("bench: one draft-head draft costs {head_draft:.3} of a step");
        result["head_draft_cost"] = json!(head_draft);
        let d = speculative::Drafting {
            drafter: &drafter,
            head: head.as_ref(),
            costs: &costs,
            head_draft,
        };
        let tok = &loaded.tokenizer;
        let n = o.new_tokens.min(model.cfg.block_size - o.prompt_len);
        let mut suites = Vec::new();
        for (source, path) in [("val", &o.val), ("unseen", &o.unseen)] {
            let prompts = prompts_from(path, tok, o.prompts, o.prompt_len)?;
            for &temp in &o.temperatures {
                let suite = speculative_suite(&model, d, &prompts, n, temp, o)?;
                eprintln!("bench: {source} t={temp} done");
                suites.push(json!({"source": source, "temperature": (temp as f64 * 100.0).round() / 100.0, "top_p": if temp > 0.0 { o.top_p } else { 1.0 }, "prompts": prompts.len(), "new_tokens": n, "distinct4": suite.0, "non_repeating_share": suite.1, "modes": suite.2}));
            }
        }
        result["speculative"] = json!(suites);
        result["drafter_threshold"] = json!(drafter.threshold);
    }
    if let Some(dir) = o.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&o.out, serde_json::to_string_pretty(&result)?)?;
    Ok(result)
}
