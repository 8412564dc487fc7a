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

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde_json::{json, Value};

use crate::checkpoint;
use crate::decode::proposer::{Lookup, Oracle, Plain, TreeDrafter};
use crate::decode::{GenParams, Generator, Proposer, SelfDraft, SpecStats};
use crate::drafter::Drafter;
use crate::model::config::Config;
use crate::model::cpu::{CpuGpt, WeightDtype};
use crate::model::forward::Forward;
use crate::model::gpt::{init_weights, Gpt};

use crate::sampling::SamplingParams;

#[derive(clap::Args, Clone, Debug)]
pub struct BenchOptions {
    #[arg(long, default_value = "models/default")]
    pub model: PathBuf,
    /// Only the plain decoding figures.
    #[arg(long)]
    pub plain: bool,
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
    /// tree, tree-chain, tree-before, tree+exits, exit-draft,
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
    /// The exit cascade's margin (`inf`: the exits only measure; tuning,
    /// on the train split).
    #[arg(long, default_value_t = crate::decode::DEFAULT_EXIT_MARGIN)]
    pub exit_margin: f32,
}

/// A speculative mode of the bench.
struct Mode {
    name: &'static str,
    /// Early exits truncate drafts.
    cascade: bool,
    /// An early exit drafts where the tree drafter does not (LayerSkip).
    self_draft: bool,
    /// The tree drafter may branch (greedy).
    branch: bool,
    /// The tree drafter follows the sampler's noise (temperature > 0).
    noise: bool,
}

const fn mode(
    name: &'static str,
    cascade: bool,
    self_draft: bool,
    branch: bool,
    noise: bool,
) -> Mode {
    Mode {
        name,
        cascade,
        self_draft,
        branch,
        noise,
    }
}

/// The tree drafter as served ("tree": draft trees when greedy, drafts
/// that follow the noise when sampling), as a chain, and as it drafted
/// before both ("tree-before": a chain of its most likely tokens); with
/// the exits; and the baselines.
const MODES: [Mode; 8] = [
    mode("tree", false, false, true, true),
    mode("tree-chain", false, false, false, true),
    mode("tree-before", false, false, false, false),
    mode("tree+exits", true, false, false, true),
    mode("exit-draft", false, true, false, true),
    mode("tree+exit-draft", false, true, false, true),
    mode("prompt-lookup", false, false, false, true),
    mode("oracle", false, false, false, true),
];

/// How one decoding run of the bench decodes.
#[derive(Clone, Copy)]
struct Decoding {
    temperature: f32,
    top_p: f32,
    cascade: bool,
    exit_margin: f32,
    self_draft: Option<SelfDraft>,
    draft_tree: bool,
    draft_with_noise: bool,
}

/// Best-of-3 seconds of `f`.
fn time<F: FnMut() -> anyhow::Result<()>>(mut f: F) -> anyhow::Result<f64> {
    let mut best = f64::MAX;
    for _ in 0..3 {
        let t = Instant::now();
        f()?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(best)
}

/// Decode/prefill/verify figures of one model on one backend.
pub fn plain_figures<M: Forward>(model: &M, decode_tokens: usize) -> anyhow::Result<Value> {
    let cfg = model.config().clone();
    let last = cfg.exits.len() - 1;
    let prompt: Vec<u32> = (0..16u32).map(|i| i * 7 % cfg.vocab_size as u32).collect();
    let n = decode_tokens.min(cfg.block_size - prompt.len() - 1);
    let params = GenParams {
        max_tokens: n,
        speculate: false,
        stop_at_eot: false,
        ..Default::default()
    };
    let decode = time(|| {
        let (mut g, _) = Generator::new(
            model,
            Box::new(Plain),
            &prompt,
            params.clone(),
            u32::MAX,
            None,
        )?;
        g.run()?;
        Ok(())
    })?;
    let pre_n = 64.min(cfg.block_size);
    let pre_ids: Vec<u32> = (0..pre_n as u32)
        .map(|i| i * 13 % cfg.vocab_size as u32)
        .collect();
    let prefill = time(|| {
        let mut cache = model.new_cache()?;
        let mut s = model.embed(&pre_ids, 0)?;
        model.run_blocks(&mut s, cfg.n_layer, &mut cache)?;
        model.exit_logits(&s, last, pre_n - 1..pre_n)?;
        Ok(())
    })?;
    // Verify k rows after a context of 128 (or half the window).
    let ctx = 128.min(cfg.block_size / 2);
    let mut cache = model.new_cache()?;
    let ids: Vec<u32> = (0..ctx as u32)
        .map(|i| i * 3 % cfg.vocab_size as u32)
        .collect();
    let mut s = model.embed(&ids, 0)?;
    model.run_blocks(&mut s, cfg.n_layer, &mut cache)?;
    // The sizes interleaved round by round, best of 10 each, so warm-up
    // and the shared machine's drift hit 1, 4 and 8 rows alike.
    let sizes = [1usize, 4, 8, 16, 32, 64].map(|k| k.min(cfg.block_size - ctx));
    let mut best = [f64::MAX; 6];
    for _ in 0..10 {
        for (b, &k) in best.iter_mut().zip(&sizes) {
            let rows: Vec<u32> = (0..k as u32).collect();
            let t = Instant::now();
            let mut s = model.embed(&rows, ctx)?;
            model.run_blocks(&mut s, cfg.n_layer, &mut cache)?;
            model.exit_logits(&s, last, 0..k)?;
            *b = b.min(t.elapsed().as_secs_f64());
            model.truncate_cache(&mut cache, ctx);
        }
    }
    let r = |i: usize| best[i] / best[0];
    Ok(json!({
        "config": format!("{} x {}, vocab {}", cfg.n_layer, cfg.n_embd, cfg.vocab_size),
        "decode_tok_s": n as f64 / decode,
        "prefill_64_tok_s": pre_n as f64 / prefill,
        "verify_4_over_1": r(1),
        "verify_8_over_1": r(2),
        "verify_16_over_1": r(3),
        "verify_32_over_1": r(4),
        "verify_64_over_1": r(5),
    }))
}

/// The plain figures of one model's weights on every CPU backend: candle's
/// model, the fast path with f32 weights and with f16 weights.
pub fn plain_backends(
    cfg: &Config,
    w: &std::collections::HashMap<String, Tensor>,
    decode_tokens: usize,
) -> anyhow::Result<Value> {
    let fast32 = CpuGpt::from_tensors(cfg, w, WeightDtype::F32)?;
    let fast16 = CpuGpt::from_tensors(cfg, w, WeightDtype::F16)?;
    let gpt = Gpt::new(
        cfg,
        VarBuilder::from_tensors(w.clone(), DType::F32, &Device::Cpu),
        true,
    )?;
    Ok(json!({
        "fast_f32": plain_figures(&fast32, decode_tokens)?,
        "fast_f16": plain_figures(&fast16, decode_tokens)?,
        "candle_f32": plain_figures(&gpt, decode_tokens)?,
    }))
}

/// Random weights (seeded) for a preset with one exit.
fn random_weights(
    preset: &str,
) -> anyhow::Result<(Config, std::collections::HashMap<String, Tensor>)> {
    let mut cfg = Config::preset(preset)?;
    cfg.exits = vec![crate::model::config::Exit {
        block: cfg.n_layer,
        weight: 1.0,
    }];
    let w = init_weights(&cfg, 0, &Device::Cpu)?.into_iter().collect();
    Ok((cfg, w))
}

/// Distinct 4-gram ratio of a token sequence.
pub fn distinct4(ids: &[u32]) -> f64 {
    if ids.len() < 4 {
        return 1.0;
    }
    let grams: std::collections::HashSet<&[u32]> = ids.windows(4).collect();
    grams.len() as f64 / (ids.len() - 3) as f64
}

/// Which tokens of `out` (generated after `prompt`) continue a repeat: the
/// 4-gram ending at the token already occurred earlier in prompt + output
/// (the first tokens after a prompt of under 3 have none: not repeats).
pub fn repeating(prompt: &[u32], out: &[u32]) -> Vec<bool> {
    let all: Vec<u32> = prompt.iter().chain(out).copied().collect();
    let mut seen: std::collections::HashSet<&[u32]> = all[..prompt.len()].windows(4).collect();
    (prompt.len() + 1..=all.len())
        .map(|end| end >= 4 && !seen.insert(&all[end - 4..end]))
        .collect()
}

struct Run {
    tokens: Vec<Vec<u32>>,
    secs: Vec<f64>,
    /// Each token's share of the time of the step that produced it.
    token_secs: Vec<Vec<f64>>,
    gaps: Vec<Vec<f32>>,
    /// The counters of the last of the three runs, and its seconds.
    stats: SpecStats,
    last_secs: f64,
}

fn decode_all<'a>(
    model: &CpuGpt,
    prompts: &[Vec<u32>],
    n: usize,
    proposer: &dyn Fn(usize) -> Box<dyn Proposer + 'a>,
    how: Decoding,
) -> anyhow::Result<Run> {
    let mut r = Run {
        tokens: vec![],
        secs: vec![],
        token_secs: vec![],
        gaps: vec![],
        stats: SpecStats::default(),
        last_secs: 0.0,
    };
    for (i, p) in prompts.iter().enumerate() {
        let params = GenParams {
            max_tokens: n,
            sampling: SamplingParams {
                temperature: how.temperature,
                top_p: how.top_p,
                seed: 1000 + i as u64,
                ..Default::default()
            },
            speculate: true,
            cascade: how.cascade,
            exit_margin: how.exit_margin,
            self_draft: how.self_draft,
            draft_tree: how.draft_tree,
            draft_with_noise: how.draft_with_noise,
            stop_at_eot: false,
            ..Default::default()
        };
        // Best of 3 (decoding is deterministic, so every repeat yields the
        // same tokens): the shared machine's noise only ever adds time.
        let mut best = (f64::MAX, vec![]);
        let mut last = None;
        for _ in 0..3 {
            let t = Instant::now();
            let (mut g, _) = Generator::new(model, proposer(i), p, params.clone(), u32::MAX, None)?;
            let mut out = Vec::new();
            let mut shares = Vec::new();
            while g.finished.is_none() {
                let ts = Instant::now();
                let got = g.step()?;
                let dt = ts.elapsed().as_secs_f64() / got.len().max(1) as f64;
                shares.extend(std::iter::repeat_n(dt, got.len()));
                out.extend(got);
            }
            let secs = t.elapsed().as_secs_f64();
            if secs < best.0 {
                best = (secs, shares);
            }
            last = Some((g, out, secs));
        }
        let (g, out, secs) = last.expect("three runs");
        r.last_secs += secs;
        r.secs.push(best.0);
        r.token_secs.push(best.1);
        r.tokens.push(out.iter().map(|t| t.id).collect());
        r.gaps.push(out.iter().map(|t| t.gap).collect());
        r.stats.add(&g.stats);
    }
    Ok(r)
}

/// Compares a run with plain decoding: (identical outputs, near-tie
/// divergences, real divergences).
fn compare(plain: &Run, other: &Run) -> (usize, usize, usize) {
    let (mut same, mut ties, mut diff) = (0, 0, 0);
    for ((a, b), gaps) in plain.tokens.iter().zip(&other.tokens).zip(&plain.gaps) {
        match a.iter().zip(b).position(|(x, y)| x != y) {
            None => same += 1,
            Some(i) if gaps[i] < 1e-3 => ties += 1,
            Some(_) => diff += 1,
        }
    }
    (same, ties, diff)
}

fn summary(name: &str, prompts: &[Vec<u32>], plain: &Run, r: &Run, n_tokens: usize) -> Value {
    let secs: f64 = r.secs.iter().sum();
    let psecs: f64 = plain.secs.iter().sum();
    let (same, ties, diff) = compare(plain, r);
    // Speedup on the stretches that do not repeat: tokens whose 4-gram is
    // new in prompt + output (the same tokens in both runs, which give
    // identical outputs), each timed by its share of its step.
    let (mut fresh, mut plain_t, mut r_t) = (0usize, 0.0, 0.0);
    for (i, p) in prompts.iter().enumerate() {
        let rep = repeating(p, &plain.tokens[i]);
        for (j, rep) in rep.iter().enumerate() {
            if let (false, Some(a), Some(b)) =
                (rep, plain.token_secs[i].get(j), r.token_secs[i].get(j))
            {
                fresh += 1;
                plain_t += a;
                r_t += b;
            }
        }
    }
    let fresh_speedup = if fresh == 0 || r_t == 0.0 {
        Value::Null
    } else {
        json!(plain_t / r_t)
    };
    let s = &r.stats;
    json!({
        "mode": name,
        "tok_s": n_tokens as f64 / secs,
        "speedup": psecs / secs,
        "speedup_non_repeating": fresh_speedup,
        "non_repeating_tokens": fresh,
        "tokens_per_step": n_tokens as f64 / s.steps.max(1) as f64,
        "drafted": s.drafted,
        "accepted": s.accepted,
        "acceptance": (s.accepted + s.exit_accepted) as f64 / (s.drafted + s.exit_drafted).max(1) as f64,
        "accepted_by_pos": s.accepted_by_pos,
        "drafted_by_pos": s.drafted_by_pos,
        "truncated_by_exit": s.truncated_by_exit,
        "exit_margins": s.exit_margins,
        "no_draft_steps": s.no_draft_steps,
        "draft_share": s.draft_secs / r.last_secs.max(1e-9),
        "tree_steps": s.tree_steps,
        "accepted_later_child": s.accepted_later_child,
        "exit_draft_steps": s.exit_draft_steps,
        "exit_drafted": s.exit_drafted,
        "exit_accepted": s.exit_accepted,
        "identical_to_plain": same,
        "near_tie_divergences": ties,
        "divergences": diff,
    })
}

/// Plain decoding and every selected speculative mode on `prompts` at
/// temperature `temp`: (distinct 4-grams of the plain output, share of
/// tokens on non-repeating stretches, one summary row per mode).
fn speculative_suite(
    model: &CpuGpt,
    drafter: &Drafter,
    prompts: &[Vec<u32>],
    n: usize,
    temp: f32,
    o: &BenchOptions,
) -> anyhow::Result<(f64, f64, Vec<Value>)> {
    let plain_how = Decoding {
        temperature: temp,
        top_p: if temp > 0.0 { o.top_p } else { 1.0 },
        cascade: false,
        exit_margin: o.exit_margin,
        self_draft: None,
        draft_tree: true,
        draft_with_noise: true,
    };
    let plain = decode_all(model, prompts, n, &|_| Box::new(Plain), plain_how)?;
    let total: usize = plain.tokens.iter().map(Vec::len).sum();
    let conts = plain.tokens.clone();
    let mut rows = vec![summary("plain", prompts, &plain, &plain, total)];
    let exit_draft = self_draft_setting(&model.cfg);
    for m in &MODES {
        let name = m.name;
        let wanted = o.modes.as_ref().is_none_or(|w| w.iter().any(|x| x == name));
        if !wanted || (m.self_draft && exit_draft.is_none()) {
            continue;
        }
        let prop = |i: usize| -> Box<dyn Proposer> {
            match name {
                "prompt-lookup" => Box::new(Lookup::new(drafter.k_max)),
                "oracle" => Box::new(Oracle {
                    continuation: &conts[i],
                    k: drafter.k_max,
                }),
                "exit-draft" => Box::new(Plain),
                _ => Box::new(TreeDrafter::new(drafter)),
            }
        };
        let how = Decoding {
            cascade: m.cascade,
            self_draft: exit_draft.filter(|_| m.self_draft),
            draft_tree: m.branch,
            draft_with_noise: m.noise,
            ..plain_how
        };
        let r = decode_all(model, prompts, n, &prop, how)?;
        let row = summary(name, prompts, &plain, &r, total);
        eprintln!(
            "bench: t={temp} {name}: {:.1} tok/s, speedup {:.2}x, {:.2} tokens/step",
            row["tok_s"].as_f64().unwrap_or(0.0),
            row["speedup"].as_f64().unwrap_or(0.0),
            row["tokens_per_step"].as_f64().unwrap_or(0.0)
        );
        rows.push(row);
    }
    let d4 = plain.tokens.iter().map(|t| distinct4(t)).sum::<f64>() / plain.tokens.len() as f64;
    let fresh = rows[0]["non_repeating_tokens"].as_u64().unwrap_or(0) as f64;
    Ok((d4, fresh / total.max(1) as f64, rows))
}

/// The LayerSkip setting the bench measures: the exit one block below the
/// final, 2 drafts, confidence floor 0.2 (the best of a sweep on
/// train-split prompts for the shipped model, `bench/self-draft/`, made with
/// `examples/self_draft_sweep.rs`, removed after `cc6f1c3`; see git
/// history); None when the model has no early exit.
fn self_draft_setting(cfg: &Config) -> Option<SelfDraft> {
    let n = cfg.exits.len();
    (n >= 2).then_some(SelfDraft {
        exit: n - 2,
        k_max: 2,
        min_confidence: 0.2,
    })
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
    let model = loaded.cpu(loaded.serving_dtype())?;
    let mut plain_rows = vec![
        json!({"model": "served", "backends": plain_backends(&loaded.config.model, &loaded.weights, 128)?}),
    ];
    eprintln!("bench: served model {}", plain_rows[0]);
    if o.plain {
        let (cfg, w) = random_weights("small")?;
        plain_rows
            .push(json!({"model": "random small", "backends": plain_backends(&cfg, &w, 128)?}));
        eprintln!("bench: random small {}", plain_rows[1]);
        if !o.no_gpt2 {
            let (cfg, w) = random_weights("gpt2")?;
            plain_rows
                .push(json!({"model": "random gpt2", "backends": plain_backends(&cfg, &w, 32)?}));
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
        let tok = &loaded.tokenizer;
        let n = o.new_tokens.min(model.cfg.block_size - o.prompt_len);
        let mut suites = Vec::new();
        for (source, path) in [("val", &o.val), ("unseen", &o.unseen)] {
            let prompts = prompts_from(path, tok, o.prompts, o.prompt_len)?;
            for &temp in &o.temperatures {
                let suite = speculative_suite(&model, &drafter, &prompts, n, temp, o)?;
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

/// The re-measured references (if any) as rows of the plain table, then
/// ours over them for each random-weight model.
fn reference_markdown(result: &Value) -> String {
    let mut s = String::new();
    fn rows(v: &Value) -> &[Value] {
        v.as_array().map_or(&[], Vec::as_slice)
    }
    let (refs, plain) = (rows(&result["reference"]["rows"]), rows(&result["plain"]));
    let mut ratios = String::new();
    for r in refs {
        // "served": the checkpoint under test (`cpu_reference.py --hf`).
        let model = match r["preset"].as_str().unwrap_or("") {
            "served" => "served".to_string(),
            preset => format!("random {preset}"),
        };
        let ours = plain
            .iter()
            .find(|p| p["model"].as_str() == Some(model.as_str()));
        for engine in ["pytorch_eager_f32", "llama_cpp_f32"] {
            let p = &r[engine];
            let Some(theirs) = p["decode_tok_s"].as_f64() else {
                continue;
            };
            s += &format!(
                "| {model} (reference) | {engine} | {:.0} | {:.0} | {:.2}x | {:.2}x |\n",
                theirs,
                p["prefill_64_tok_s"].as_f64().unwrap_or(0.0),
                p["verify_4_over_1"].as_f64().unwrap_or(0.0),
                p["verify_8_over_1"].as_f64().unwrap_or(0.0)
            );
            if let Some(o) = ours {
                let f = |b: &str| o["backends"][b]["decode_tok_s"].as_f64().unwrap_or(0.0) / theirs;
                ratios += &format!(
                    "| {model} | {engine} | {:.2}x | {:.2}x |\n",
                    f("fast_f32"),
                    f("fast_f16")
                );
            }
        }
    }
    if !ratios.is_empty() {
        s += "\n| model | reference | ours f32 / reference decode | ours f16 / reference decode |\n|---|---|---|---|\n";
        s += &ratios;
    }
    s
}

/// A markdown table of the speculative results.
pub fn markdown(result: &Value) -> String {
    let mut s = String::new();
    s += "| model | backend | decode tok/s | prefill-64 tok/s | verify 4/1 | verify 8/1 | verify 16/1 | verify 64/1 |\n|---|---|---|---|---|---|---|---|\n";
    let rows = result["plain"].as_array().into_iter().flatten();
    for (name, p) in rows.flat_map(|r| {
        let model = format!(
            "{} ({})",
            r["model"].as_str().unwrap_or(""),
            r["backends"]["fast_f32"]["config"].as_str().unwrap_or("")
        );
        ["fast_f32", "fast_f16", "candle_f32"]
            .map(|b| (format!("| {model} | {b}"), r["backends"][b].clone()))
    }) {
        s += &format!(
            "{} | {:.0} | {:.0} | {:.2}x | {:.2}x | {:.2}x | {:.2}x |\n",
            name,
            p["decode_tok_s"].as_f64().unwrap_or(0.0),
            p["prefill_64_tok_s"].as_f64().unwrap_or(0.0),
            p["verify_4_over_1"].as_f64().unwrap_or(0.0),
            p["verify_8_over_1"].as_f64().unwrap_or(0.0),
            p["verify_16_over_1"].as_f64().unwrap_or(0.0),
            p["verify_64_over_1"].as_f64().unwrap_or(0.0)
        );
    }
    s += &reference_markdown(result);
    for suite in result["speculative"].as_array().into_iter().flatten() {
        s += &format!(
            "\n{} prompts, temperature {}, {} new tokens, distinct-4 {:.2}, non-repeating tokens {:.0}% (4-gram new in prompt + output)\n\n| mode | tok/s | speedup | non-repeating speedup | tokens/step | acceptance | drafting share of time | identical / near-tie / diverged |\n|---|---|---|---|---|---|---|---|\n",
            suite["source"].as_str().unwrap_or(""),
            suite["temperature"],
            suite["new_tokens"],
            suite["distinct4"].as_f64().unwrap_or(0.0),
            100.0 * suite["non_repeating_share"].as_f64().unwrap_or(0.0)
        );
        for m in suite["modes"].as_array().into_iter().flatten() {
            s += &format!(
                "| {} | {:.1} | {:.2}x | {} | {:.2} | {:.2} | {:.1}% | {} / {} / {} |\n",
                m["mode"].as_str().unwrap_or(""),
                m["tok_s"].as_f64().unwrap_or(0.0),
                m["speedup"].as_f64().unwrap_or(0.0),
                m["speedup_non_repeating"]
                    .as_f64()
                    .map_or("-".into(), |x| format!("{x:.2}x")),
                m["tokens_per_step"].as_f64().unwrap_or(0.0),
                m["acceptance"].as_f64().unwrap_or(0.0),
                100.0 * m["draft_share"].as_f64().unwrap_or(0.0),
                m["identical_to_plain"],
                m["near_tie_divergences"],
                m["divergences"]
            );
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_repeats_when_its_4_gram_occurred_before_in_prompt_or_output() {
        // Prompt 1 2 3 4; output 5 1 2 3 4 6: "1 2 3 4" recurs at the 5th token.
        let rep = repeating(&[1, 2, 3, 4], &[5, 1, 2, 3, 4, 6]);
        assert_eq!(rep, [false, false, false, false, true, false]);
        // A short prompt: the first outputs have no full 4-gram yet.
        assert_eq!(
            repeating(&[7], &[7, 7, 7, 7, 7]),
            [false, false, false, true, true]
        );
    }

    #[test]
    fn reference_figures_print_beside_ours_with_ratios() {
        let fig = |d: f64| json!({"decode_tok_s": d, "prefill_64_tok_s": 1000.0, "verify_4_over_1": 1.5, "verify_8_over_1": 2.0});
        let result = json!({
            "plain": [{"model": "random small", "backends": {"fast_f32": fig(300.0), "fast_f16": fig(600.0), "candle_f32": fig(100.0)}}],
            "reference": {"rows": [{"preset": "small", "pytorch_eager_f32": fig(200.0), "llama_cpp_f32": fig(600.0)}]},
        });
        let md = markdown(&result);
        assert!(
            md.contains(
                "| random small (reference) | llama_cpp_f32 | 600 | 1000 | 1.50x | 2.00x |"
            ),
            "{md}"
        );
        assert!(
            md.contains("| random small | llama_cpp_f32 | 0.50x | 1.00x |"),
            "{md}"
        );
        assert!(
            md.contains("| random small | pytorch_eager_f32 | 1.50x | 3.00x |"),
            "{md}"
        );
        // Without a reference file nothing is added.
        let plain_only = json!({"plain": result["plain"].clone()});
        assert!(!markdown(&plain_only).contains("reference"));
    }
}
