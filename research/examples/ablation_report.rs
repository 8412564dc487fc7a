//! The training-efficiency ablation's report (issue #6), from the runs of
//! `scripts/ablate.sh`: a table (val loss of the final exit at equal tokens
//! and at equal wall-clock, parameters, tokens/s measured side by side,
//! FLOPs per token, time to the baseline's final loss, exit agreement) and a
//! plot of val loss vs wall-clock for every run.
//!
//! `cargo run --release -p gpt-serve-research --example ablation_report -- runs/ablation bench`

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use gpt_serve::checkpoint;
use gpt_serve::train::report::{multi_plot, series, Curve};
use gpt_serve::train::snapshot;
use serde_json::json;

struct RunData {
    arm: String,
    seed: String,
    /// (tokens, val loss of the final exit) at each evaluation.
    val: Vec<(f64, f64)>,
    params: usize,
    flops_per_token: f64,
    agreement: Vec<(usize, f32)>,
    peak_lr: f64,
    /// Mean training loss of the last 20 steps (batches seen once: a slice
    /// of train, what the peak-LR sweep is judged on).
    train_tail: f64,
}

/// Tokens/s of an arm from its side-by-side speed run (steps 3..11: the
/// last step also evaluates and saves).
fn speed(runs: &Path, arm: &str) -> Option<f64> {
    // `base-lr2e-3` is `base` at another peak LR: the same step cost.
    let arm = arm.split_once("-lr").map_or(arm, |(a, _)| a);
    let log = runs.join("speed").join(arm).join("metrics.jsonl");
    let el = series(&log, "elapsed");
    let tok = series(&log, "tokens");
    let (a, b) = (el.get(2)?, el.get(el.len().checked_sub(2)?)?);
    let (ta, tb) = (tok.get(2)?, tok.get(tok.len().checked_sub(2)?)?);
    (b.1 > a.1).then(|| (tb.1 - ta.1) / (b.1 - a.1))
}

/// Linear interpolation of `pts` (sorted by x) at `x`; None outside.
fn interp(pts: &[(f64, f64)], x: f64) -> Option<f64> {
    let first = pts.first()?;
    if x < first.0 {
        return None;
    }
    for w in pts.windows(2) {
        let ((x0, y0), (x1, y1)) = (w[0], w[1]);
        if x >= x0 && x <= x1 {
            return Some(y0 + (y1 - y0) * (x - x0) / (x1 - x0).max(1e-12));
        }
    }
    (x == pts.last()?.0)
        .then(|| pts.last().map(|p| p.1))
        .flatten()
}

/// First x where the curve reaches `target` (interpolated).
fn reach(pts: &[(f64, f64)], target: f64) -> Option<f64> {
    for w in pts.windows(2) {
        let ((x0, y0), (x1, y1)) = (w[0], w[1]);
        if y0 <= target {
            return Some(x0);
        }
        if y1 <= target {
            return Some(x0 + (x1 - x0) * (y0 - target) / (y0 - y1).max(1e-12));
        }
    }
    None
}

fn load_run(
    dir: &Path,
    val_tokens: &mut BTreeMap<String, Vec<u32>>,
    val: &Path,
) -> anyhow::Result<RunData> {
    let name = dir.file_name().unwrap().to_string_lossy().to_string();
    let (arm, seed) = name.rsplit_once("-s").context("run dir is not ARM-sSEED")?;
    let ck = checkpoint::load_config(dir)?;
    let cfg = ck.model.clone();
    let saved = snapshot::latest(dir)?
        .with_context(|| format!("{} has no complete training snapshot", dir.display()))?;
    let trainer = serde_json::to_value(&saved.state)?;
    let o = &trainer["options"];
    let ctx = o["context"].as_u64().unwrap_or(64) as usize;
    let frac = o["exit_frac"].as_f64().unwrap_or(1.0);
    let peak_lr = trainer["schedule"]["peak"].as_f64().unwrap_or(f64::NAN);
    // null: the default (runs before it existed always stored a number).
    let every = o["exit_every"]
        .as_f64()
        .unwrap_or(gpt_serve::train::DEFAULT_EXIT_EVERY as f64);
    // FLOPs per token (forward): blocks + final head + the extra exit heads
    // on the fraction of positions and steps where they are computed.
    let c = cfg.n_embd as f64;
    let head = 2.0 * c * cfg.vocab_size as f64;
    let blocks = cfg.flops_per_token(ctx) - cfg.exits.len() as f64 * head;
    let flops = blocks + head + (cfg.exits.len() - 1) as f64 * head * frac / every;
    let last = cfg.exits.last().unwrap().block;
    let log = dir.join("metrics.jsonl");
    let tokens = series(&log, "tokens");
    let vals = series(&log, &format!("val_loss_{last}"));
    let losses = series(&log, "loss");
    let tail = &losses[losses.len().saturating_sub(20)..];
    let train_tail = tail.iter().map(|p| p.1).sum::<f64>() / tail.len().max(1) as f64;
    let val_pts: Vec<(f64, f64)> = vals
        .iter()
        .filter_map(|(step, l)| tokens.iter().find(|t| t.0 == *step).map(|t| (t.1, *l)))
        .collect();
    // Exit agreement on the val split, with the run's own tokenizer.
    let loaded = checkpoint::load(dir, &candle_core::Device::Cpu)?;
    let key = format!("{:?}", loaded.tokenizer.vocab_size());
    if !val_tokens.contains_key(&key) {
        let cache = gpt_serve::train::default_cache_dir();
        let t = gpt_serve::train::data::load_tokens(
            &[val.to_path_buf()],
            &loaded.tokenizer,
            cache.as_deref(),
        )?;
        val_tokens.insert(key.clone(), t);
    }
    let fast = loaded.cpu(loaded.serving_dtype())?;
    let agree = gpt_serve::model::cpu::in_pool(|| {
        gpt_serve::train::eval::exit_agreement(&fast, &val_tokens[&key], ctx, 40)
    })?;
    Ok(RunData {
        arm: arm.to_string(),
        seed: seed.to_string(),
        val: val_pts,
        params: cfg.n_params(),
        flops_per_token: flops,
        agreement: cfg.exits.iter().map(|e| e.block).zip(agree).collect(),
        peak_lr,
        train_tail,
    })
}

/// The peak-LR sweep of the fixed schedules (`base`, `wsd` and their
/// `-lr` arms, seed 1): the best peak of each is picked on the training
/// loss of its last 20 steps; val is shown, not used.
fn lr_sweep(data: &[RunData]) -> String {
    let mut md = String::from(
        "\nPeak-LR sweep (seed 1; picked on the mean training loss of the last 20 steps, batches seen once; val shown, not used to pick):\n\n| schedule | peak lr | train loss, last 20 steps | val loss, final | picked |\n|---|---|---|---|---|\n",
    );
    for family in ["base", "wsd"] {
        let mut runs: Vec<&RunData> = data
            .iter()
            .filter(|r| r.seed == "1")
            .filter(|r| r.arm == family || r.arm.starts_with(&format!("{family}-lr")))
            .collect();
        runs.sort_by(|a, b| a.peak_lr.total_cmp(&b.peak_lr));
        let best = runs
            .iter()
            .min_by(|a, b| a.train_tail.total_cmp(&b.train_tail))
            .map(|r| r.arm.clone());
        for r in &runs {
            md += &format!(
                "| {} | {:e} | {:.3} | {} | {} |\n",
                if family == "base" { "cosine" } else { "wsd" },
                r.peak_lr,
                r.train_tail,
                r.val.last().map_or("-".into(), |p| format!("{:.3}", p.1)),
                if best.as_deref() == Some(r.arm.as_str()) {
                    "yes"
                } else {
                    ""
                },
            );
        }
    }
    md
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let runs = PathBuf::from(args.get(1).map_or("runs/ablation", String::as_str));
    let out = PathBuf::from(args.get(2).map_or("bench", String::as_str));
    let val = PathBuf::from(
        args.get(3)
            .map_or("../shared/data/gutenberg/val.txt.gz", String::as_str),
    );
    let mut val_tokens = BTreeMap::new();
    let mut data = Vec::new();
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&runs)
        .with_context(|| format!("reading {}", runs.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("done").exists())
        .collect();
    dirs.sort();
    for d in dirs {
        match load_run(&d, &mut val_tokens, &val) {
            Ok(r) => data.push(r),
            Err(e) => eprintln!("skipping {}: {e:#}", d.display()),
        }
    }
    anyhow::ensure!(!data.is_empty(), "no finished runs in {}", runs.display());
    let speeds: BTreeMap<String, f64> = data
        .iter()
        .filter_map(|r| speed(&runs, &r.arm).map(|s| (r.arm.clone(), s)))
        .collect();
    // Wall-clock curves: tokens / the arm's side-by-side tokens/s.
    let wall = |r: &RunData| -> Option<Vec<(f64, f64)>> {
        let s = speeds.get(&r.arm)?;
        Some(r.val.iter().map(|(t, l)| (t / s, *l)).collect())
    };
    let base: Vec<&RunData> = data.iter().filter(|r| r.arm == "base").collect();
    let base_final = base
        .iter()
        .filter_map(|r| r.val.last().map(|p| p.1))
        .sum::<f64>()
        / base.len().max(1) as f64;
    let base_time = base
        .iter()
        .filter_map(|r| wall(r).and_then(|w| w.last().map(|p| p.0)))
        .fold(f64::NAN, f64::max);
    // Equal wall-clock: the longest time every run covers.
    let common_t = data
        .iter()
        .filter_map(|r| wall(r).and_then(|w| w.last().map(|p| p.0)))
        .fold(f64::INFINITY, f64::min);
    // Equal FLOPs: the most training FLOPs every run covers (tokens x
    // forward FLOPs per token; backward is ~2x forward for every arm).
    let flops_curve = |r: &RunData| -> Vec<(f64, f64)> {
        r.val
            .iter()
            .map(|(t, l)| (t * r.flops_per_token, *l))
            .collect()
    };
    let common_f = data
        .iter()
        .filter_map(|r| flops_curve(r).last().map(|p| p.0))
        .fold(f64::INFINITY, f64::min);
    let spread = if base.len() >= 2 {
        let f: Vec<f64> = base
            .iter()
            .filter_map(|r| r.val.last().map(|p| p.1))
            .collect();
        f.iter().copied().fold(f64::MIN, f64::max) - f.iter().copied().fold(f64::MAX, f64::min)
    } else {
        f64::NAN
    };

    let mut rows = Vec::new();
    let mut md = format!(
        "Final-exit val loss on the val split; equal tokens = each run's last evaluation; equal wall-clock = at {common_t:.0} s of measured throughput (the shortest run); equal FLOPs = at {:.2} TFLOP of forward compute (the smallest run); baseline seed-to-seed spread {spread:.3} (differences below it are no difference).\n\n| arm | seed | params | FLOPs/token | tokens/s | val loss, equal tokens | val loss, equal wall-clock | val loss, equal FLOPs | time to baseline's final loss | exit agreement with final |\n|---|---|---|---|---|---|---|---|---|---|\n",
        common_f / 1e12
    );
    let mut curves: Vec<Curve> = Vec::new();
    for r in &data {
        let w = wall(r);
        let at_t = w.as_ref().and_then(|w| interp(w, common_t));
        let at_f = interp(&flops_curve(r), common_f);
        let to_base = w
            .as_ref()
            .and_then(|w| reach(w, base_final))
            .map(|t| t / base_time);
        let final_loss = r.val.last().map(|p| p.1);
        let agree = r
            .agreement
            .iter()
            .take(r.agreement.len().saturating_sub(1))
            .map(|(b, a)| format!("{b}: {:.0}%", 100.0 * a))
            .collect::<Vec<_>>()
            .join(", ");
        md += &format!(
            "| {} | {} | {:.2}M | {:.1}M | {} | {} | {} | {} | {} | {} |\n",
            r.arm,
            r.seed,
            r.params as f64 / 1e6,
            r.flops_per_token / 1e6,
            speeds.get(&r.arm).map_or("-".into(), |s| format!("{s:.0}")),
            final_loss.map_or("-".into(), |l| format!("{l:.3}")),
            at_t.map_or("-".into(), |l| format!("{l:.3}")),
            at_f.map_or("-".into(), |l| format!("{l:.3}")),
            to_base.map_or("not reached".into(), |x| format!("{x:.2}x")),
            if agree.is_empty() { "-".into() } else { agree },
        );
        rows.push(json!({
            "arm": r.arm, "seed": r.seed, "params": r.params, "flops_per_token": r.flops_per_token,
            "tokens_per_s": speeds.get(&r.arm), "val_curve_tokens": r.val, "val_final": final_loss,
            "val_at_equal_time": at_t, "val_at_equal_flops": at_f, "time_to_base_final": to_base, "exit_agreement": r.agreement,
        }));
        if let Some(w) = w {
            curves.push((format!("{} s{}", r.arm, r.seed), w, r.seed == "1"));
        }
    }
    md += &lr_sweep(&data);
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("ablation.md"), &md)?;
    std::fs::write(
        out.join("ablation.json"),
        serde_json::to_string_pretty(
            &json!({"equal_time_s": common_t, "equal_flops": common_f, "base_spread": spread, "runs": rows}),
        )?,
    )?;
    if !curves.is_empty() {
        multi_plot(
            &out.join("ablation.png"),
            "val loss vs wall-clock (s)",
            "seconds",
            &curves,
        )?;
    }
    println!("{md}");
    Ok(())
}
