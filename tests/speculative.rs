//! Speculative decoding gives plain decoding's output: greedy and seeded
//! sampling, with and without the exit cascade, logprobs, EOS and
//! max_tokens inside accepted runs.
//!
//! Runs the shipped model (models/default) on 200 val-split prompts, or on
//! up to 40 prompts from the shipped prose fixture when ../shared/data is
//! absent.

use std::path::PathBuf;

use candle_core::Device;
use gpt_serve::checkpoint;
use gpt_serve::decode::proposer::{Costs, HeadDrafter, Plain, TreeDrafter};
use gpt_serve::decode::{GenParams, Generator, Proposer, SpecStats, TokenOut};
use gpt_serve::drafter::Drafter;
use gpt_serve::model::cpu::{CpuGpt, WeightDtype};
use gpt_serve::model::draft_head::DraftHead;
use gpt_serve::sampling::SamplingParams;

/// Positions whose top-2 logit gap is below this could flip between a k-row
/// verify and a 1-row step on a backend that sums rows in a different
/// order; such differences are counted apart from real divergences.
const NEAR_TIE: f32 = 1e-3;

/// Why the near-tie count must be 0 here, not merely small: the CPU
/// kernels sum every row in the same order whatever the number of rows
/// (docs/design.md, "Floating point"), so a verify's logits are bitwise a
/// single step's and no position, near a tie or not, can flip.
const BITWISE: &str = "the CPU path is bitwise: no divergence is excused, near a tie or not";

struct Fixture {
    model: CpuGpt,
    drafter: Drafter,
    head: Option<DraftHead>,
    eot: u32,
    prompts: Vec<Vec<u32>>,
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The shipped model with prompts from the val split, or, when
/// `../shared/data` is absent (a fresh clone), from the prose fixture that
/// ships with the tests. Skips (None) only when the model itself is absent.
fn fixture(n_prompts: usize) -> Option<Fixture> {
    let dir = root().join("models/default");
    if !dir.join("drafter.json").exists() {
        eprintln!("skipping: models/default (model and drafter) is absent");
        return None;
    }
    let loaded = checkpoint::load(&dir, &Device::Cpu).unwrap();
    let model = loaded.cpu(WeightDtype::F32).unwrap();
    let drafter = Drafter::load(&dir.join("drafter.json"), model.cfg.vocab_size).unwrap();
    let head = DraftHead::load(&dir, &loaded.weights).unwrap();
    let val = root().join("../shared/data/gutenberg/val.txt.gz");
    let (text, n_prompts) = if val.exists() {
        let text = gpt_serve::train::data::read_text(&val).unwrap();
        (text[..1 << 20].to_string(), n_prompts)
    } else {
        eprintln!("../shared/data is absent: prompts from tests/fixtures/prose.txt");
        let text = std::fs::read_to_string(root().join("tests/fixtures/prose.txt")).unwrap();
        (text, n_prompts.min(40))
    };
    let ids = loaded.tokenizer.encode(&text).unwrap();
    let stride = (ids.len() - 24) / n_prompts;
    let prompts = (0..n_prompts)
        .map(|i| ids[i * stride..i * stride + 24].to_vec())
        .collect();
    Some(Fixture {
        model,
        drafter,
        head,
        eot: loaded.tokenizer.eot(),
        prompts,
    })
}

/// Makes a fresh proposer for each sequence (a proposer keeps one
/// sequence's state).
type Make<'a> = &'a dyn Fn() -> Box<dyn Proposer + 'a>;

fn tree(f: &Fixture) -> Box<dyn Proposer + '_> {
    Box::new(TreeDrafter::new(&f.drafter))
}

fn plain<'a>() -> Box<dyn Proposer + 'a> {
    Box::new(Plain)
}

fn generate<'a>(
    f: &'a Fixture,
    prompt: &[u32],
    params: GenParams,
    proposer: Box<dyn Proposer + 'a>,
) -> (Vec<TokenOut>, u64) {
    generate_eot(f, prompt, params, proposer, f.eot)
}

fn generate_eot<'a>(
    f: &'a Fixture,
    prompt: &[u32],
    params: GenParams,
    proposer: Box<dyn Proposer + 'a>,
    eot: u32,
) -> (Vec<TokenOut>, u64) {
    let (mut g, _) = Generator::new(&f.model, proposer, prompt, params, eot, None).unwrap();
    let out = g.run().unwrap();
    (out, g.stats.accepted)
}

/// Compares plain and speculative outputs on every prompt; returns (real
/// divergences, near-tie divergences, accepted drafts).
fn compare(f: &Fixture, params: GenParams) -> (usize, usize, u64) {
    compare_with(f, params, &|| tree(f))
}

fn compare_with<'a>(f: &'a Fixture, params: GenParams, proposer: Make<'a>) -> (usize, usize, u64) {
    let (diverged, ties, stats) = compare_stats(f, params, proposer);
    (diverged, ties, stats.accepted + stats.exit_accepted)
}

/// As [`compare_with`], with the speculative runs' counters summed.
fn compare_stats<'a>(
    f: &'a Fixture,
    params: GenParams,
    proposer: Make<'a>,
) -> (usize, usize, SpecStats) {
    let (mut diverged, mut ties, mut stats) = (0, 0, SpecStats::default());
    for p in &f.prompts {
        let (plain, _) = generate(
            f,
            p,
            GenParams {
                speculate: false,
                ..params.clone()
            },
            plain(),
        );
        let (mut g, _) =
            Generator::new(&f.model, proposer(), p, params.clone(), f.eot, None).unwrap();
        let spec = g.run().unwrap();
        stats.add(&g.stats);
        match plain.iter().zip(&spec).position(|(a, b)| a.id != b.id) {
            None => assert_eq!(plain.len(), spec.len()),
            Some(i) if plain[i].gap < NEAR_TIE => ties += 1,
            Some(i) => {
                eprintln!(
                    "diverged at {i}: plain {} vs spec {} (gap {})",
                    plain[i].id, spec[i].id, plain[i].gap
                );
                diverged += 1;
            }
        }
    }
    (diverged, ties, stats)
}

#[test]
fn greedy_speculative_output_equals_plain_output() {
    let Some(f) = fixture(200) else { return };
    let params = GenParams {
        max_tokens: 24,
        stop_at_eot: false,
        ..Default::default()
    };
    let trees = GenParams {
        draft_tree: true,
        ..params.clone()
    };
    let (diverged, ties, st) = compare_stats(&f, trees, &|| tree(&f));
    eprintln!(
        "greedy, draft trees: {} prompts, {diverged} diverged, {ties} near ties, {} drafts accepted, {} steps branched, {} accepted a later child",
        f.prompts.len(),
        st.accepted,
        st.tree_steps,
        st.accepted_later_child
    );
    assert_eq!((diverged, ties), (0, 0), "{BITWISE}");
    assert!(
        st.accepted > 0,
        "the drafter never proposed an accepted token"
    );
    assert!(st.tree_steps > 0, "the drafter never branched");
    assert!(
        st.accepted_later_child > 0,
        "no draft but a first child was ever accepted"
    );
    let chains = GenParams {
        draft_tree: false,
        ..params.clone()
    };
    let (diverged, ties, st) = compare_stats(&f, chains, &|| tree(&f));
    eprintln!(
        "greedy, chains: {diverged} diverged, {ties} near ties, {} accepted",
        st.accepted
    );
    assert_eq!((diverged, ties), (0, 0), "{BITWISE}");
    assert_eq!(st.tree_steps, 0);
    assert_cascade_gives_plain_output(&f, params);
}

/// The exit cascade cuts drafts (at margin 0, more often than served) and
/// the output stays plain decoding's.
fn assert_cascade_gives_plain_output(f: &Fixture, params: GenParams) {
    let t = params.sampling.temperature;
    let cascade = GenParams {
        cascade: true,
        exit_margin: 0.0,
        ..params
    };
    let (diverged, ties, st) = compare_stats(f, cascade, &|| tree(f));
    let cut: u64 = st.truncated_by_exit.iter().sum();
    eprintln!("t={t} + exit cascade: {diverged} diverged, {ties} near ties, {cut} drafts cut");
    assert_eq!((diverged, ties), (0, 0), "{BITWISE}");
    assert!(cut > 0, "the exits never cut a draft");
}

#[test]
fn seeded_sampling_gives_the_same_tokens_speculatively() {
    let Some(f) = fixture(60) else { return };
    let params = GenParams {
        max_tokens: 24,
        sampling: SamplingParams {
            temperature: 0.8,
            top_p: 0.95,
            seed: 5,
            presence_penalty: 0.3,
            frequency_penalty: 0.2,
        },
        stop_at_eot: false,
        ..Default::default()
    };
    for draft_with_noise in [true, false] {
        let params = GenParams {
            draft_with_noise,
            ..params.clone()
        };
        let (diverged, ties, accepted) = compare(&f, params);
        eprintln!("t=0.8, drafts follow the noise: {draft_with_noise}: {diverged} diverged, {ties} near ties, {accepted} accepted");
        assert_eq!((diverged, ties), (0, 0), "{BITWISE}");
        assert!(accepted > 0, "no sampled draft was ever accepted");
    }
    assert_cascade_gives_plain_output(&f, params);
}

#[test]
fn the_draft_head_gives_plain_output_greedy_and_sampled_with_penalties() {
    let Some(f) = fixture(200) else { return };
    let Some(head) = &f.head else {
        panic!("models/default has no draft head (gpt-serve train-head writes it)");
    };
    // A head draft at 0.1 of a step, about what it costs on the 2-core EPYC.
    let costs = Costs {
        verify: f.drafter.verify_costs(),
        head_draft: 0.1,
    };
    let make = || -> Box<dyn Proposer + '_> {
        // Fixed costs: which drafts are made must not depend on timing.
        Box::new(HeadDrafter::new(head, costs.clone(), tree(&f)).with_fixed_costs())
    };
    let settings = [(0.0, 1.0, 0.0), (0.8, 0.95, 0.3), (1.0, 1.0, 0.0)];
    for (temperature, top_p, penalty) in settings {
        let params = GenParams {
            max_tokens: 24,
            sampling: SamplingParams {
                temperature,
                top_p,
                seed: 11,
                presence_penalty: penalty,
                frequency_penalty: penalty,
            },
            stop_at_eot: false,
            ..Default::default()
        };
        let (diverged, ties, accepted) = compare_with(&f, params, &make);
        eprintln!("draft head, t={temperature}: {} prompts, {diverged} diverged, {ties} near ties, {accepted} accepted", f.prompts.len());
        assert_eq!((diverged, ties), (0, 0), "{BITWISE}");
        assert!(
            accepted > 0,
            "no draft was ever accepted at t={temperature}"
        );
    }
}

#[test]
fn the_shipped_heads_calibration_holds_on_held_out_drafts() {
    use gpt_serve::decode::calibrate;
    let Some(f) = fixture(40) else { return };
    let head = f.head.as_ref().expect("models/default has a draft head");
    let cal = head
        .calibration()
        .expect("models/default's head is calibrated (calibrate-head --write)");
    let samples = calibrate::record(&f.model, head, &f.prompts, &[0.8, 1.0], 40).unwrap();
    let ece = calibrate::calibration_error(cal, &samples);
    let rate = |keep: &dyn Fn(f32) -> bool| {
        let v: Vec<_> = samples
            .iter()
            .filter(|s| s.depth == 1 && keep(s.margin))
            .collect();
        v.iter().filter(|s| s.accepted).count() as f64 / v.len().max(1) as f64
    };
    let (wide, narrow) = (rate(&|m| m > 2.0), rate(&|m| m < 0.5));
    eprintln!(
        "{} drafts: calibration error {ece:.3}; first drafts accepted {wide:.2} past margin 2, {narrow:.2} below 0.5",
        samples.len()
    );
    assert!(ece < 0.05, "calibration error {ece} on held-out drafts");
    assert!(wide > narrow + 0.3, "{wide} vs {narrow}");
}

#[test]
fn drafting_with_an_early_exit_gives_plain_output_alone_and_behind_the_tree() {
    let Some(f) = fixture(60) else { return };
    let self_draft = Some(gpt_serve::decode::SelfDraft {
        exit: 0,
        k_max: 4,
        min_confidence: 0.3,
    });
    for temperature in [0.0, 0.8] {
        let params = GenParams {
            max_tokens: 24,
            sampling: SamplingParams {
                temperature,
                seed: 9,
                ..Default::default()
            },
            self_draft,
            stop_at_eot: false,
            ..Default::default()
        };
        let proposers: [(&str, Make); 2] =
            [("exit only", &plain), ("tree, then exit", &|| tree(&f))];
        for (name, proposer) in proposers {
            let (diverged, ties, accepted) = compare_with(&f, params.clone(), proposer);
            eprintln!("t={temperature} {name}: {diverged} diverged, {ties} near ties, {accepted} accepted");
            assert_eq!((diverged, ties), (0, 0), "{BITWISE}");
            assert!(accepted > 0, "{name}: no draft was ever accepted");
        }
    }
}

#[test]
fn logprobs_eos_and_max_tokens_behave_as_in_plain_decoding() {
    let Some(f) = fixture(20) else { return };
    for p in &f.prompts {
        let params = GenParams {
            max_tokens: 17,
            logprobs: Some(3),
            stop_at_eot: false,
            ..Default::default()
        };
        let (plain, _) = generate(
            &f,
            p,
            GenParams {
                speculate: false,
                ..params.clone()
            },
            plain(),
        );
        let (spec, _) = generate(&f, p, params, tree(&f));
        assert_eq!(spec.len(), 17, "max_tokens is exact inside accepted runs");
        for (a, b) in plain.iter().zip(&spec) {
            if a.id != b.id {
                break;
            }
            assert!((a.logprob.unwrap() - b.logprob.unwrap()).abs() < 1e-4);
            assert_eq!(a.top.len(), 3);
        }
        // Treat a token from the middle of the plain output as end-of-text.
        let stop_tok = plain[8].id;
        let first = plain.iter().position(|t| t.id == stop_tok).unwrap();
        let params = GenParams {
            max_tokens: 17,
            ..Default::default()
        };
        let (spec, _) = generate_eot(&f, p, params, tree(&f), stop_tok);
        assert_eq!(
            spec.len(),
            first + 1,
            "generation stops at the end-of-text token"
        );
    }
}
