//! Draft trees at temperature > 0 (issue #31) give plain decoding's output
//! token for token: greedy, at temperature 0.8 with top_p 0.95, at 1.0, and
//! with penalties; each sequence decoded alone and in a batch of several
//! (one forward over every sequence's rows, as the engine runs them).
//!
//! Runs the shipped model (models/default) and its drafter on 200 prompts
//! of 12 tokens, 16 new tokens each: from the val split, or, when
//! ../shared/data is absent, overlapping windows of the shipped prose
//! fixture.

#[path = "common/skip.rs"]
mod skip;

use std::path::PathBuf;

use candle_core::Device;
use gpt_serve::checkpoint;
use gpt_serve::decode::proposer::{Plain, RowPrice, TreeDrafter};
use gpt_serve::decode::{GenParams, Generator, SpecStats};
use gpt_serve::drafter::Drafter;
use gpt_serve::model::cpu::CpuGpt;
use gpt_serve::model::forward::{Forward, Segment};
use gpt_serve::sampling::SamplingParams;

const PROMPTS: usize = 200;
const PROMPT_LEN: usize = 12;
const NEW_TOKENS: usize = 16;
/// Sequences decoded together in the batched runs.
const BATCH: usize = 8;
/// Rows one batched forward takes at most.
const BATCH_ROWS: usize = 48;

struct Shipped {
    model: CpuGpt,
    drafter: Drafter,
    eot: u32,
    prompts: Vec<Vec<u32>>,
}

fn shipped() -> Option<Shipped> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let dir = root.join("models/default");
    if !dir.join("drafter.json").exists() {
        skip::skip("models/default (model and drafter) is absent");
        return None;
    }
    let loaded = checkpoint::load(&dir, &Device::Cpu).unwrap();
    let model = loaded.cpu(loaded.serving_dtype()).unwrap();
    let drafter = Drafter::load(&dir.join("drafter.json"), model.cfg.vocab_size).unwrap();
    let val = root.join("../shared/data/gutenberg/val.txt.gz");
    let text = match val.exists() {
        true => gpt_serve::train::data::read_text(&val).unwrap()[..1 << 18].to_string(),
        false => {
            eprintln!("../shared/data is absent: prompts from tests/fixtures/prose.txt");
            std::fs::read_to_string(root.join("tests/fixtures/prose.txt")).unwrap()
        }
    };
    let ids = loaded.tokenizer.encode(&text).unwrap();
    let stride = (ids.len() - PROMPT_LEN) / PROMPTS;
    assert!(
        stride > 0,
        "the prose fixture is too short for {PROMPTS} prompts"
    );
    let prompts = (0..PROMPTS)
        .map(|i| ids[i * stride..i * stride + PROMPT_LEN].to_vec())
        .collect();
    Some(Shipped {
        model,
        drafter,
        eot: loaded.tokenizer.eot(),
        prompts,
    })
}

/// Prompt i's parameters: its own seed, so every prompt samples apart.
fn params(sampling: &SamplingParams, i: usize, speculate: bool) -> GenParams {
    GenParams {
        max_tokens: NEW_TOKENS,
        sampling: SamplingParams {
            seed: sampling.seed + i as u64,
            ..sampling.clone()
        },
        speculate,
        draft_tree: true,
        sampled_trees: true,
        stop_at_eot: false,
        ..Default::default()
    }
}

fn plain_outputs(s: &Shipped, sampling: &SamplingParams) -> Vec<Vec<u32>> {
    let mut out = Vec::new();
    for (i, p) in s.prompts.iter().enumerate() {
        let params = params(sampling, i, false);
        let (mut g, _) = Generator::new(&s.model, Box::new(Plain), p, params, s.eot, None).unwrap();
        out.push(g.run().unwrap().iter().map(|t| t.id).collect());
    }
    out
}

fn alone(s: &Shipped, sampling: &SamplingParams) -> (Vec<Vec<u32>>, SpecStats) {
    let (mut out, mut stats) = (Vec::new(), SpecStats::default());
    for (i, p) in s.prompts.iter().enumerate() {
        let params = params(sampling, i, true);
        let drafter = Box::new(TreeDrafter::new(&s.drafter));
        let (mut g, _) = Generator::new(&s.model, drafter, p, params, s.eot, None).unwrap();
        out.push(g.run().unwrap().iter().map(|t| t.id).collect());
        stats.add(&g.stats);
    }
    (out, stats)
}

/// Decodes the prompts [`BATCH`] at a time, every step one forward over
/// all their rows (at most [`BATCH_ROWS`]; each sequence's drafts priced
/// at `min_gain` a row, as the engine prices them).
fn batched(s: &Shipped, sampling: &SamplingParams, min_gain: f32) -> Vec<Vec<u32>> {
    let mut out = Vec::new();
    for (b, group) in s.prompts.chunks(BATCH).enumerate() {
        let mut gens: Vec<Generator> = group
            .iter()
            .enumerate()
            .map(|(j, p)| {
                let params = params(sampling, b * BATCH + j, true);
                let drafter = Box::new(TreeDrafter::new(&s.drafter));
                Generator::start(&s.model, drafter, p, params, s.eot, None).unwrap()
            })
            .collect();
        let mut done: Vec<Vec<u32>> = vec![vec![]; gens.len()];
        loop {
            let per_seq = BATCH_ROWS / gens.len();
            let rows: Vec<_> = gens
                .iter_mut()
                .map(|g| {
                    let price = RowPrice {
                        min_gain,
                        time_value: 1.0,
                    };
                    g.next_rows_in_batch(per_seq, price)
                })
                .collect();
            if rows.iter().all(Option::is_none) {
                break;
            }
            let logits = {
                let mut segs: Vec<Segment<_>> = gens
                    .iter_mut()
                    .zip(&rows)
                    .filter_map(|(g, r)| {
                        let r = r.as_ref()?;
                        Some(Segment {
                            tokens: r.tokens(),
                            pos: r.pos(),
                            logits: r.logits(),
                            tree: r.tree(),
                            cache: g.cache_mut(),
                        })
                    })
                    .collect();
                Forward::forward_batch(&s.model, &mut segs).unwrap()
            };
            let live = gens.iter_mut().zip(rows).zip(&mut done);
            let taken = live.filter_map(|((g, r), d)| Some((g, r?, d)));
            for ((g, r, d), l) in taken.zip(&logits) {
                d.extend(g.commit(r, l).iter().map(|t| t.id));
                g.check_cache().unwrap();
            }
        }
        out.extend(done);
    }
    out
}

/// Plain decoding, then the sampled trees alone and batched: every output
/// must be plain decoding's, and the trees must have branched and had a
/// draft accepted.
fn assert_trees_give_plain_output(sampling: SamplingParams) {
    let Some(s) = shipped() else { return };
    let t = sampling.temperature;
    let plain = plain_outputs(&s, &sampling);
    let (spec, stats) = alone(&s, &sampling);
    let diverged = (0..PROMPTS).filter(|&i| plain[i] != spec[i]).count();
    eprintln!(
        "t={t}: {diverged} of {PROMPTS} diverged alone; {} drafts accepted of {}, {} steps branched, {} accepted a later child",
        stats.accepted, stats.drafted, stats.tree_steps, stats.accepted_later_child
    );
    assert_eq!(
        diverged, 0,
        "speculative output differs from plain at t={t}"
    );
    assert!(stats.accepted > 0, "no draft was accepted at t={t}");
    assert!(stats.tree_steps > 0, "the drafter never branched at t={t}");
    for min_gain in [0.0, 0.1] {
        let together = batched(&s, &sampling, min_gain);
        let diverged = (0..PROMPTS).filter(|&i| plain[i] != together[i]).count();
        eprintln!("t={t}, batched (row price {min_gain}): {diverged} diverged");
        assert_eq!(diverged, 0, "batched output differs from plain at t={t}");
    }
}

#[test]
fn greedy_draft_trees_give_plain_output_alone_and_batched() {
    assert_trees_give_plain_output(SamplingParams::default());
}

#[test]
fn sampled_trees_at_temperature_0_8_with_top_p_give_plain_output_alone_and_batched() {
    assert_trees_give_plain_output(SamplingParams {
        temperature: 0.8,
        top_p: 0.95,
        seed: 100,
        ..Default::default()
    });
}

#[test]
fn sampled_trees_at_temperature_1_give_plain_output_alone_and_batched() {
    assert_trees_give_plain_output(SamplingParams {
        temperature: 1.0,
        seed: 900,
        ..Default::default()
    });
}

#[test]
fn sampled_trees_with_penalties_give_plain_output_alone_and_batched() {
    assert_trees_give_plain_output(SamplingParams {
        temperature: 0.8,
        top_p: 0.95,
        seed: 4000,
        presence_penalty: 0.5,
        frequency_penalty: 0.3,
    });
}
