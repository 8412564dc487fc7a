//! The speculative figures of the bench: the same prompts decoded plainly
//! and in every selected mode (the tree drafter as served, as a chain and
//! as it drafted before, with the exits, the baselines), each run's
//! speedup overall and on the non-repeating stretches, and its outputs
//! checked against plain decoding.

use std::time::Instant;

use serde_json::{json, Value};

use super::BenchOptions;
use crate::decode::proposer::{
    Costs, HeadDrafter, Lookup, Oracle, Plain, SharedClock, TreeDrafter,
};
use crate::decode::{GenParams, Generator, Proposer, SelfDraft, SpecStats, TokenOut};
use crate::drafter::Drafter;
use crate::model::config::Config;
use crate::model::cpu::CpuGpt;
use crate::model::draft_head::DraftHead;
use crate::sampling::SamplingParams;

/// A speculative mode of the bench.
struct Mode {
    name: &'static str,
    /// Early exits truncate drafts.
    cascade: bool,
    /// An early exit drafts where the tree drafter does not (LayerSkip).
    self_draft: bool,
    /// The tree drafter may branch (greedy or sampled trees).
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

/// The tree drafter as served ("tree": draft trees, greedy or sampled
/// with the sampler's keyed noise), as a chain, and as it drafted
/// before both ("tree-before": a chain of its most likely tokens); with
/// the exits; and the baselines.
const MODES: [Mode; 9] = [
    mode("tree", false, false, true, true),
    mode("head", false, false, false, true),
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

#[derive(Default)]
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

/// A decoding run of the bench: who drafts for prompt i, and how.
type Decoder<'d, 'a> = (&'d dyn Fn(usize) -> Box<dyn Proposer + 'a>, Decoding);

/// Decodes every prompt with each of `decoders`, three times each, the
/// decoders taking turns within each prompt (so a shift of the shared
/// machine's load hits them alike); each keeps its median time per prompt.
fn decode_all<'a>(
    model: &CpuGpt,
    prompts: &[Vec<u32>],
    n: usize,
    decoders: &[Decoder<'_, 'a>],
) -> anyhow::Result<Vec<Run>> {
    let mut runs: Vec<Run> = decoders.iter().map(|_| Run::default()).collect();
    for (i, p) in prompts.iter().enumerate() {
        let mut timed: Vec<Vec<(f64, Vec<f64>)>> = vec![Vec::with_capacity(3); decoders.len()];
        for _ in 0..3 {
            for (d, (proposer, how)) in decoders.iter().enumerate() {
                let (secs, shares, g, out) = decode_one(model, proposer(i), p, n, i, *how)?;
                timed[d].push((secs, shares));
                if timed[d].len() == 3 {
                    let r = &mut runs[d];
                    r.last_secs += secs;
                    r.tokens.push(out.iter().map(|t| t.id).collect());
                    r.gaps.push(out.iter().map(|t| t.gap).collect());
                    r.stats.add(&g.stats);
                }
            }
        }
        for (r, mut t) in runs.iter_mut().zip(timed) {
            // Decoding is deterministic: every repeat yields the same tokens.
            t.sort_by(|a, b| a.0.total_cmp(&b.0));
            let median = t.swap_remove(1);
            r.secs.push(median.0);
            r.token_secs.push(median.1);
        }
    }
    Ok(runs)
}

/// One timed decoding of prompt `i`: (seconds, each token's share of its
/// step's time, the finished generator, the tokens).
fn decode_one<'a>(
    model: &'a CpuGpt,
    proposer: Box<dyn Proposer + 'a>,
    prompt: &[u32],
    n: usize,
    i: usize,
    how: Decoding,
) -> anyhow::Result<(f64, Vec<f64>, Generator<'a>, Vec<TokenOut>)> {
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
        sampled_trees: how.draft_tree,
        draft_with_noise: how.draft_with_noise,
        stop_at_eot: false,
        ..Default::default()
    };
    let t = Instant::now();
    let (mut g, _) = Generator::new(model, proposer, prompt, params, u32::MAX, None)?;
    let mut out = Vec::new();
    let mut shares = Vec::new();
    while g.finished.is_none() {
        let ts = Instant::now();
        let got = g.step()?;
        let dt = ts.elapsed().as_secs_f64() / got.len().max(1) as f64;
        shares.extend(std::iter::repeat_n(dt, got.len()));
        out.extend(got);
    }
    Ok((t.elapsed().as_secs_f64(), shares, g, out))
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
        "realized_verify_costs": s.realized_verify_costs(),
        "one_row_step_secs": s.step_secs_by_rows.first().copied().unwrap_or(0.0)
            / s.timed_steps_by_rows.first().copied().unwrap_or(0).max(1) as f64,
        "plain_step_secs": plain.stats.step_secs_by_rows.first().copied().unwrap_or(0.0)
            / plain.stats.timed_steps_by_rows.first().copied().unwrap_or(0).max(1) as f64,
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

/// What the bench drafts with: the tree drafter, the draft head if the
/// checkpoint has one, and the verify costs that size their drafts.
#[derive(Clone, Copy)]
pub(super) struct Drafting<'a> {
    pub drafter: &'a Drafter,
    pub head: Option<&'a DraftHead>,
    pub costs: &'a [f64],
    /// One head draft relative to a plain step (measured here).
    pub head_draft: f64,
}

/// Plain decoding and every selected speculative mode on `prompts` at
/// temperature `temp`: (distinct 4-grams of the plain output, share of
/// tokens on non-repeating stretches, one summary row per mode).
pub(super) fn speculative_suite(
    model: &CpuGpt,
    d: Drafting<'_>,
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
    let plain_prop = |_: usize| -> Box<dyn Proposer> { Box::new(Plain) };
    let plain = decode_all(model, prompts, n, &[(&plain_prop, plain_how)])?
        .pop()
        .expect("one decoder");
    let total: usize = plain.tokens.iter().map(Vec::len).sum();
    let conts = plain.tokens.clone();
    let mut rows = vec![summary("plain", prompts, &plain, &plain, total)];
    let exit_draft = self_draft_setting(&model.cfg);
    for m in &MODES {
        let name = m.name;
        let wanted = o.modes.as_ref().is_none_or(|w| w.iter().any(|x| x == name));
        let missing_head = name == "head" && d.head.is_none();
        if !wanted || (m.self_draft && exit_draft.is_none()) || missing_head {
            continue;
        }
        let (drafter, costs) = (d.drafter, d.costs);
        // One clock for the mode's prompts, as a server's engine has.
        let clock = SharedClock::default();
        let prop = |i: usize| -> Box<dyn Proposer> {
            match name {
                "prompt-lookup" => Box::new(Lookup::new(drafter.k_max)),
                "oracle" => Box::new(Oracle {
                    continuation: &conts[i],
                    k: drafter.k_max,
                }),
                "exit-draft" => Box::new(Plain),
                "head" => {
                    let tree = Box::new(TreeDrafter::with_costs(drafter, costs.to_vec()));
                    let head = d.head.expect("skipped without a head");
                    let costs = Costs {
                        verify: costs.to_vec(),
                        head_draft: d.head_draft,
                    };
                    Box::new(HeadDrafter::new(head, costs, tree).with_clock(clock.clone()))
                }
                _ => Box::new(TreeDrafter::with_costs(drafter, costs.to_vec())),
            }
        };
        let how = Decoding {
            cascade: m.cascade,
            self_draft: exit_draft.filter(|_| m.self_draft),
            draft_tree: m.branch,
            draft_with_noise: m.noise,
            ..plain_how
        };
        // Timed against plain decoding interleaved with it, prompt by prompt.
        let [paired, r]: [Run; 2] =
            decode_all(model, prompts, n, &[(&plain_prop, plain_how), (&prop, how)])?
                .try_into()
                .map_err(|_| anyhow::anyhow!("two decoders, two runs"))?;
        let mut row = summary(name, prompts, &paired, &r, total);
        if name == "head" {
            // The drafting gate's view: tokens/s of drafting and plain epochs.
            let (_, gate) = &*clock.lock();
            let ((on, off), (epochs, drafting)) = (gate.rates(), gate.epochs());
            row["gate"] = json!({"drafting_tok_s": on, "plain_tok_s": off,
                "epochs": epochs, "drafting_epochs": drafting});
            eprintln!("bench: gate: drafting {on:?} tok/s, plain {off:?}; {drafting} of {epochs} epochs drafted");
        }
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
}
