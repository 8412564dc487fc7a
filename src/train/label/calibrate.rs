//! `gpt-serve calibrate-drafter`: fits the chances that a sampled draft
//! tree's child is the model's sample (`drafter::calibration`), one table
//! per sampling setting, on the model's own sampled continuations of
//! train-split prompts, and measures the calibration error on held-out
//! text.
//!
//! Each continuation is plain decoding with the keyed sampler; at every
//! generated position, and 1 and 2 positions deeper with the statistics
//! of the last verified position (as a tree's deeper nodes see them), the
//! drafter ranks its estimate with the same noise the sampler used there,
//! and each ranked child is an observation: its rank, its tempered
//! probability, and whether it is the token the model sampled.

use std::path::PathBuf;

use anyhow::Context;
use candle_core::Device;
use serde_json::{json, Value};

use crate::checkpoint;
use crate::cli::bench::prompts_from;
use crate::decode::proposer::plain::Recorder;
use crate::decode::{GenParams, Generator};
use crate::drafter::calibration::{
    expected_calibration_error, Calibration, CalibrationTable, Observation, RANKS,
};
use crate::drafter::features::Verified;
use crate::drafter::{Drafter, Estimate};
use crate::model::cpu::CpuGpt;
use crate::sampling::{Noise, SamplingParams};

/// Depths below a verified position that are observed: a tree's nodes
/// past the first level draft with the last verified statistics.
const DEPTHS: usize = 3;

#[derive(clap::Args, Debug)]
pub struct CalibrateArgs {
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
    /// Sampling settings, each `temperature:top_p`.
    #[arg(long, value_delimiter = ',', default_values_t = ["0.8:0.95".to_string(), "1.0:1".to_string()])]
    pub settings: Vec<String>,
    /// Prompts per text.
    #[arg(long, default_value_t = 200)]
    pub prompts: usize,
    #[arg(long, default_value_t = 32)]
    pub prompt_len: usize,
    #[arg(long, default_value_t = 64)]
    pub new_tokens: usize,
    /// Where the report (calibration error, reliability tables) goes.
    #[arg(long, default_value = "runs/calibration.json")]
    pub out: PathBuf,
    /// Save the fitted tables into the checkpoint's drafter file.
    #[arg(long)]
    pub write: bool,
    /// Measure (and with `--write`, save) this n-gram weight instead of the
    /// drafter file's (`count-ngrams`).
    #[arg(long)]
    pub ngram_weight: Option<f32>,
    /// Measure the drafter without its n-gram tables (the trees' candidates
    /// only); with `--write`, saves it so.
    #[arg(long)]
    pub without_ngrams: bool,
}

/// A `temperature:top_p` setting; an error names the setting and the limits.
fn parse_setting(s: &str) -> anyhow::Result<(f32, f32)> {
    let (t, p) = s
        .split_once(':')
        .with_context(|| format!("setting {s:?} must be temperature:top_p, e.g. 0.8:0.95"))?;
    let (t, p): (f32, f32) = (t.trim().parse()?, p.trim().parse()?);
    anyhow::ensure!(
        t > 0.0 && t.is_finite() && p > 0.0 && p <= 1.0,
        "setting {s:?}: the temperature must be > 0 and top_p in (0, 1]"
    );
    Ok((t, p))
}

/// The model's greedy continuation of `prompt` and the statistics of each
/// verified position.
fn continuation(
    model: &CpuGpt,
    prompt: &[u32],
    new_tokens: usize,
    sampling: SamplingParams,
) -> anyhow::Result<(Vec<u32>, Vec<Verified>, u64)> {
    let params = GenParams {
        max_tokens: new_tokens,
        sampling,
        speculate: false,
        stop_at_eot: false,
        ..Default::default()
    };
    let stream = params.stream();
    let mut stats = Vec::new();
    let recorder = Box::new(Recorder { out: &mut stats });
    let (mut g, _) = Generator::new(model, recorder, prompt, params, u32::MAX, None)?;
    g.run()?;
    let tokens = g.tokens().to_vec();
    drop(g);
    Ok((tokens, stats, stream))
}

/// How often the drafter's most likely candidate is the model's greedy
/// token, over the greedy continuations of `prompts`: with the trees'
/// estimate (what greedy drafting uses) and with the n-gram tables' too.
fn greedy_agreement(
    model: &CpuGpt,
    drafter: &Drafter,
    prompts: &[Vec<u32>],
    new_tokens: usize,
) -> anyhow::Result<Value> {
    let (mut trees, mut wide, mut positions) = (0usize, 0usize, 0usize);
    let top = |e: Estimate| e.tokens.into_iter().max_by(|a, b| a.1.total_cmp(&b.1));
    for prompt in prompts {
        let (tokens, stats, _) =
            continuation(model, prompt, new_tokens, SamplingParams::default())?;
        for (j, &verified) in stats.iter().enumerate() {
            let target = prompt.len() + j + 1;
            let Some(&next) = tokens.get(target) else {
                break;
            };
            let ctx = &tokens[..target];
            positions += 1;
            trees += usize::from(top(drafter.estimate(ctx, verified)).is_some_and(|t| t.0 == next));
            wide +=
                usize::from(top(drafter.estimate_wide(ctx, verified)).is_some_and(|t| t.0 == next));
        }
    }
    let share = |n: usize| n as f64 / positions.max(1) as f64;
    Ok(json!({"positions": positions, "top1_trees": share(trees), "top1_wide": share(wide)}))
}

/// Observations, and the positions they come from.
type Observed = (Vec<Observation>, usize);

/// Observations of `drafter` on the model's sampled continuations of
/// `prompts` at `temperature` and `top_p`.
fn observe(
    model: &CpuGpt,
    drafter: &Drafter,
    prompts: &[Vec<u32>],
    new_tokens: usize,
    (temperature, top_p): (f32, f32),
) -> anyhow::Result<Observed> {
    let sharpness = drafter.sample_sharpness / temperature;
    let (mut obs, mut positions) = (Vec::new(), 0);
    for (i, prompt) in prompts.iter().enumerate() {
        let seed = 7000 + i as u64;
        let sampling = SamplingParams {
            temperature,
            top_p,
            seed,
            ..Default::default()
        };
        let (tokens, stats, stream) = continuation(model, prompt, new_tokens, sampling)?;
        for (j, &verified) in stats.iter().enumerate() {
            for d in 0..DEPTHS {
                let target = prompt.len() + j + 1 + d;
                let Some(&next) = tokens.get(target) else {
                    break;
                };
                positions += 1;
                let ctx = &tokens[..target];
                let noise = Noise::at(seed, stream, ctx.len());
                let ranked = drafter
                    .estimate_wide(ctx, verified)
                    .ranked(noise, sharpness);
                obs.extend(ranked.into_iter().map(|r| Observation {
                    rank: r.rank,
                    tempered: r.tempered,
                    hit: r.token == next,
                }));
            }
        }
    }
    Ok((obs, positions))
}

/// The calibration error of `cal` and of the uncalibrated tempered
/// probabilities on `obs`, the reliability table, and how often the
/// model's token is among the first k ranks.
fn evaluate(cal: &Calibration, setting: (f32, f32), (obs, positions): &Observed) -> Value {
    let predicted: Vec<(f32, bool)> = obs
        .iter()
        .filter_map(|o| {
            let p = cal.hit_prob(setting.0, setting.1, o.rank, o.tempered)?;
            Some((p, o.hit))
        })
        .collect();
    let raw: Vec<(f32, bool)> = obs.iter().map(|o| (o.tempered, o.hit)).collect();
    let (ece, table) = expected_calibration_error(&predicted);
    let (ece_raw, _) = expected_calibration_error(&raw);
    let positions = (*positions).max(1);
    let hits_at = |k: usize| obs.iter().filter(|o| o.hit && o.rank < k).count();
    let coverage: Vec<f64> = (1..=RANKS)
        .map(|k| hits_at(k) as f64 / positions as f64)
        .collect();
    json!({
        "children": obs.len(),
        "ece": ece,
        "ece_uncalibrated": ece_raw,
        "reliability": table,
        "coverage_by_rank": coverage,
    })
}

/// Fits and evaluates every setting; saves the tables with `--write`.
pub fn run(a: &CalibrateArgs) -> anyhow::Result<()> {
    crate::model::cpu::in_pool(|| run_in_pool(a))
}

fn run_in_pool(a: &CalibrateArgs) -> anyhow::Result<()> {
    let settings: Vec<(f32, f32)> = a
        .settings
        .iter()
        .map(|s| parse_setting(s))
        .collect::<anyhow::Result<_>>()?;
    let loaded = checkpoint::load(&a.model, &Device::Cpu)?;
    let model = loaded.cpu(loaded.serving_dtype())?;
    let path = a.model.join(checkpoint::DRAFTER_FILE);
    let mut drafter = Drafter::load(&path, model.cfg.vocab_size)?;
    if let Some(w) = a.ngram_weight {
        anyhow::ensure!(
            (0.0..=1.0).contains(&w),
            "--ngram-weight {w} must be in 0..=1"
        );
        drafter.ngram_weight = w;
    }
    if a.without_ngrams {
        (drafter.ngram_file, drafter.ngrams) = (None, None);
    }
    let tok = &loaded.tokenizer;
    let train = prompts_from(&a.data, tok, a.prompts, a.prompt_len)?;
    let mut greedy = json!({});
    for path in &a.eval {
        let prompts = prompts_from(path.as_ref(), tok, a.prompts, a.prompt_len)?;
        greedy[path.as_str()] = greedy_agreement(&model, &drafter, &prompts, a.new_tokens)?;
    }
    eprintln!("calibrate-drafter: greedy {greedy}");
    let mut tables = Vec::new();
    let mut report = Vec::new();
    for &setting in &settings {
        let obs = observe(&model, &drafter, &train, a.new_tokens, setting)?;
        let cal = Calibration {
            tables: vec![CalibrationTable::fit(&obs.0, setting.0, setting.1)],
        };
        let mut row = json!({"temperature": setting.0, "top_p": setting.1,
            "train": evaluate(&cal, setting, &obs)});
        for path in &a.eval {
            let prompts = prompts_from(path.as_ref(), tok, a.prompts, a.prompt_len)?;
            let held = observe(&model, &drafter, &prompts, a.new_tokens, setting)?;
            row[path.as_str()] = evaluate(&cal, setting, &held);
        }
        eprintln!("calibrate-drafter: {row}");
        report.push(row);
        tables.extend(cal.tables);
    }
    if let Some(dir) = a.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    report.push(json!({"greedy": greedy}));
    std::fs::write(&a.out, serde_json::to_string_pretty(&report)?)?;
    if a.write {
        drafter.calibration = Calibration { tables };
        drafter.save(&path)?;
        eprintln!(
            "calibrate-drafter: saved the tables into {}",
            path.display()
        );
    }
    Ok(())
}
