//! `gpt-serve calibrate-head`: fits the draft head's calibration (the
//! chance that a draft is the model's draw, from its margin:
//! `decode::calibrate`) on the model's own sampled continuations of
//! train-split prompts, measures its calibration error on held-out text,
//! and with `--write` stores it in the head's config. `train-head` runs it
//! on the head it trained.

use std::path::PathBuf;

use anyhow::Context;
use candle_core::Device;
use serde_json::{json, Value};

use crate::checkpoint;
use crate::cli::bench::prompts_from;
use crate::decode::calibrate;
use crate::model::draft_head::{DraftHead, HEAD_CONFIG_FILE};

#[derive(clap::Args, Debug, Clone)]
pub struct CalibrateHeadArgs {
    #[arg(long, default_value = "models/default")]
    pub model: PathBuf,
    /// Text to fit on (the train split).
    #[arg(long, default_value = "../shared/data/gutenberg/train.txt.gz")]
    pub data: PathBuf,
    /// Held-out texts the calibration error is measured on.
    #[arg(long, value_delimiter = ',', default_values_t = [
        "../shared/data/gutenberg/val.txt.gz".to_string(),
        "../shared/data/tinyshakespeare.txt".to_string()])]
    pub eval: Vec<String>,
    /// Sampling temperatures to decode at (each above 0).
    #[arg(long, value_delimiter = ',', default_values_t = [0.8, 1.0])]
    pub temperatures: Vec<f32>,
    /// Prompts per text.
    #[arg(long, default_value_t = 150)]
    pub prompts: usize,
    #[arg(long, default_value_t = 32)]
    pub prompt_len: usize,
    #[arg(long, default_value_t = 128)]
    pub new_tokens: usize,
    /// Where the report (coefficients, calibration errors) goes.
    #[arg(long, default_value = "runs/head-calibration.json")]
    pub out: PathBuf,
    /// Save the fitted calibration into the head's config.
    #[arg(long)]
    pub write: bool,
}

pub fn run(a: &CalibrateHeadArgs) -> anyhow::Result<Value> {
    crate::model::cpu::in_pool(|| run_in_pool(a))
}

fn run_in_pool(a: &CalibrateHeadArgs) -> anyhow::Result<Value> {
    anyhow::ensure!(a.prompts > 0, "--prompts must be positive");
    let loaded = checkpoint::load(&a.model, &Device::Cpu)?;
    let dtype = loaded.serving_dtype();
    let model = loaded.cpu(dtype)?;
    let head = DraftHead::load(&a.model, &loaded.weights)?
        .with_context(|| format!("{} has no draft head (train-head)", a.model.display()))?
        .threaded_like_model(dtype.is_quantized());
    let block = loaded.config.model.block_size;
    anyhow::ensure!(
        a.prompt_len + a.new_tokens <= block,
        "--prompt-len {} + --new-tokens {} exceed the context window of {block}",
        a.prompt_len,
        a.new_tokens
    );
    let tok = &loaded.tokenizer;
    let samples_of = |path: &std::path::Path| -> anyhow::Result<Vec<calibrate::Sample>> {
        let prompts = prompts_from(path, tok, a.prompts, a.prompt_len)?;
        calibrate::record(&model, &head, &prompts, &a.temperatures, a.new_tokens)
    };
    let fitted = calibrate::fit(&samples_of(&a.data)?)?;
    let mut eval = serde_json::Map::new();
    for path in &a.eval {
        let s = samples_of(std::path::Path::new(path))?;
        let rate = s.iter().filter(|x| x.accepted).count() as f64 / s.len().max(1) as f64;
        let ece = calibrate::calibration_error(&fitted, &s);
        eprintln!(
            "calibrate-head: {path}: {} drafts, {rate:.3} accepted, calibration error {ece:.4}",
            s.len()
        );
        let deciles = calibrate::by_margin_decile(&fitted, &s);
        eval.insert(
            path.clone(),
            json!({"drafts": s.len(), "acceptance": rate, "calibration_error": ece,
                   "first_by_margin_decile": deciles}),
        );
    }
    let mut cal = fitted;
    cal.fit["data"] = json!(a.data);
    cal.fit["temperatures"] = json!(a.temperatures);
    cal.fit["prompts"] = json!(a.prompts);
    cal.fit["new_tokens"] = json!(a.new_tokens);
    cal.fit["weights"] = json!(dtype.name());
    cal.fit["eval"] = Value::Object(eval);
    let report = serde_json::to_value(&cal)?;
    eprintln!("calibrate-head: {}", serde_json::to_string(&report)?);
    if let Some(dir) = a.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&a.out, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("writing {}", a.out.display()))?;
    if a.write {
        let path = a.model.join(HEAD_CONFIG_FILE);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let mut cfg: Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not JSON", path.display()))?;
        cfg["calibration"] = report.clone();
        checkpoint::write_atomic(&path, serde_json::to_string_pretty(&cfg)?.as_bytes())?;
        eprintln!(
            "calibrate-head: wrote the calibration into {}",
            path.display()
        );
    }
    Ok(report)
}
