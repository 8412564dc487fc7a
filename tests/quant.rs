//! Quantized weights (`WeightDtype::Q8_0` / `Q4_0`) end to end on the CPU
//! inference path, on tiny seeded random-weight models: logits close to
//! f32's, a row's logits bitwise the same alone and among other rows (so
//! speculative decoding gives plain decoding's tokens and logprobs
//! exactly), and a model that cannot be quantized refused with an error
//! naming the tensor.

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use gpt_serve::decode::proposer::Plain;
use gpt_serve::decode::{GenParams, Generator, SelfDraft, TokenOut};
use gpt_serve::model::config::{Config, Exit, ExitHead};
use gpt_serve::model::cpu::{CpuGpt, WeightDtype};
use gpt_serve::model::forward::Forward;
use gpt_serve::model::gpt::init_weights;
use gpt_serve::sampling::SamplingParams;

/// The tiny preset (n_embd 32: one Q8_0 block per row) with 4 blocks,
/// exits at 2, 3 and 4, and tied or own exit heads.
fn config(exit_head: ExitHead) -> Config {
    let mut cfg = Config::preset("tiny").unwrap();
    cfg.vocab_size = 300;
    cfg.block_size = 40;
    cfg.n_layer = 4;
    cfg.exit_head = exit_head;
    cfg.exits = [(2, 0.2), (3, 0.3), (4, 0.5)]
        .map(|(block, weight)| Exit { block, weight })
        .to_vec();
    cfg
}

fn weights(cfg: &Config) -> HashMap<String, Tensor> {
    init_weights(cfg, 7, &Device::Cpu)
        .unwrap()
        .into_iter()
        .collect()
}

/// Logits of every exit (exit-major) for `tokens` fed as a prefill of
/// `split` tokens, then the rest in chunks of `chunk` rows.
fn run(m: &CpuGpt, tokens: &[u32], split: usize, chunk: usize) -> Vec<Vec<Vec<f32>>> {
    let cfg = m.config().clone();
    let mut cache = Forward::new_cache(m).unwrap();
    let (mut out, mut pos) = (vec![Vec::new(); cfg.exits.len()], 0);
    for part in std::iter::once(&tokens[..split]).chain(tokens[split..].chunks(chunk)) {
        let mut s = Forward::embed(m, part, pos).unwrap();
        for (e, exit) in cfg.exits.iter().enumerate() {
            Forward::run_blocks(m, &mut s, exit.block, &mut cache).unwrap();
            let logits = Forward::exit_logits(m, &s, e, 0..part.len()).unwrap();
            out[e].extend(logits.iter().map(<[f32]>::to_vec));
        }
        pos += part.len();
    }
    out
}

fn tokens(n: u32) -> Vec<u32> {
    (0..n).map(|i| (i * 37 + 5) % 300).collect()
}

#[test]
fn q8_0_logits_are_within_two_percent_of_the_logit_range_of_f32_logits() {
    // Q8_0 rounds each weight and each activation to within half a step of
    // 1/127 of its 32-block's largest magnitude (0.4% at worst, ~0.1% on
    // average); the errors are independent across the k terms of a dot
    // product, so they add like a random walk, and 4 blocks deep they stay
    // well under 2% of the largest |logit| (measured: 0.7% at every exit).
    // Q4_0's step is 1/8 of the block maximum: a loose 20% bound (measured
    // 9%). Checked at every exit, so own exit heads are covered too.
    let t = tokens(24);
    for head in [ExitHead::Tied, ExitHead::Own] {
        let cfg = config(head);
        let w = weights(&cfg);
        let want = run(
            &CpuGpt::from_tensors(&cfg, &w, WeightDtype::F32).unwrap(),
            &t,
            24,
            1,
        );
        let spread = want
            .iter()
            .flatten()
            .flatten()
            .fold(0f32, |a, x| a.max(x.abs()));
        for (dt, tol) in [(WeightDtype::Q8_0, 0.02), (WeightDtype::Q4_0, 0.2)] {
            let got = run(&CpuGpt::from_tensors(&cfg, &w, dt).unwrap(), &t, 24, 1);
            let d = got
                .iter()
                .flatten()
                .flatten()
                .zip(want.iter().flatten().flatten())
                .fold(0f32, |a, (p, q)| a.max((p - q).abs()));
            eprintln!("{head:?} {dt:?}: max diff {d}, largest |logit| {spread}");
            assert!(
                d > 0.0,
                "{head:?} {dt:?}: logits equal f32's: not quantized?"
            );
            assert!(
                d <= tol * spread,
                "{head:?} {dt:?}: max diff {d} > {tol} x {spread}"
            );
        }
    }
}

#[test]
fn a_rows_quantized_logits_are_bitwise_the_same_alone_and_among_other_rows() {
    let t = tokens(30);
    for dt in [WeightDtype::Q8_0, WeightDtype::Q4_0] {
        let cfg = config(ExitHead::Own);
        let fast = CpuGpt::from_tensors(&cfg, &weights(&cfg), dt).unwrap();
        let one_by_one = run(&fast, &t, 1, 1);
        for (split, chunk) in [(30, 1), (4, 9), (6, 5), (2, 16)] {
            assert!(
                run(&fast, &t, split, chunk) == one_by_one,
                "{dt:?}: prefill {split} + chunks of {chunk} differ from one-row steps"
            );
        }
    }
}

#[test]
fn a_wider_models_logits_are_bitwise_the_same_on_the_thread_team_and_on_rayons_pool() {
    // n_embd 128: the MLP's matmuls cross the parallel threshold at one
    // row, so in steps of 1..16 rows they run on `team::Team`, in longer
    // prefills on rayon's pool; a one-row step's attention splits its
    // heads over the team from position 31 on.
    let mut cfg = config(ExitHead::Own);
    (cfg.n_embd, cfg.n_head, cfg.block_size) = (128, 4, 48);
    let t = tokens(44);
    for dt in [WeightDtype::Q8_0, WeightDtype::Q4_0] {
        let fast = CpuGpt::from_tensors(&cfg, &weights(&cfg), dt).unwrap();
        let one_by_one = run(&fast, &t, 1, 1);
        for (split, chunk) in [(44, 1), (20, 16), (3, 7), (17, 2)] {
            assert!(
                run(&fast, &t, split, chunk) == one_by_one,
                "{dt:?}: prefill {split} + chunks of {chunk} differ from one-row steps"
            );
        }
    }
}

fn generate(m: &CpuGpt, prompt: &[u32], params: GenParams) -> (Vec<TokenOut>, u64, u64) {
    let (mut g, _) = Generator::new(m, Box::new(Plain), prompt, params, u32::MAX, None).unwrap();
    let out = g.run().unwrap();
    (out, g.stats.exit_drafted, g.stats.exit_accepted)
}

#[test]
fn speculative_decoding_with_q8_0_weights_gives_plain_decodings_tokens_and_logprobs_bitwise() {
    // Drafts from exit 0 (min_confidence 0: always 4 rows to verify), so
    // every step is a multi-row verify checked against one-row plain steps.
    let cfg = config(ExitHead::Tied);
    let m = CpuGpt::from_tensors(&cfg, &weights(&cfg), WeightDtype::Q8_0).unwrap();
    let (mut drafted, mut accepted) = (0, 0);
    for temperature in [0.0, 0.8] {
        for p in 0..5u32 {
            let prompt: Vec<u32> = (0..6).map(|i| (i * 41 + p * 13 + 1) % 300).collect();
            let params = GenParams {
                max_tokens: 20,
                sampling: SamplingParams {
                    temperature,
                    seed: 3 + p as u64,
                    ..Default::default()
                },
                logprobs: Some(2),
                self_draft: Some(SelfDraft {
                    exit: 0,
                    k_max: 4,
                    min_confidence: 0.0,
                }),
                stop_at_eot: false,
                ..Default::default()
            };
            let plain = GenParams {
                speculate: false,
                ..params.clone()
            };
            let (want, _, _) = generate(&m, &prompt, plain);
            let (got, d, a) = generate(&m, &prompt, params);
            assert!(
                got == want,
                "t={temperature}, prompt {p}: speculative output differs"
            );
            (drafted, accepted) = (drafted + d, accepted + a);
        }
    }
    eprintln!("{drafted} drafted, {accepted} accepted");
    assert!(
        drafted > 0 && accepted > 0,
        "{drafted} drafted, {accepted} accepted"
    );
}

#[test]
fn a_model_whose_width_is_not_a_multiple_of_32_asked_for_q8_0_gets_an_error_naming_the_tensor() {
    let mut cfg = config(ExitHead::Tied);
    cfg.n_embd = 48;
    let w = weights(&cfg);
    assert!(CpuGpt::from_tensors(&cfg, &w, WeightDtype::F32).is_ok());
    let err = CpuGpt::from_tensors(&cfg, &w, WeightDtype::Q8_0)
        .err()
        .expect("q8_0 of a 48-wide model is refused")
        .to_string();
    assert!(err.contains("`h.0.attn.c_attn.weight`"), "{err}");
    assert!(err.contains("not a multiple of the block size 32"), "{err}");
    assert!(err.contains("q8_0"), "{err}");
}

/// A checkpoint of `cfg` with seeded weights, saved in `dir` as f32.
fn save_checkpoint(dir: &std::path::Path, cfg: &Config) {
    use gpt_serve::checkpoint::{self, CheckpointConfig};
    let tok =
        gpt_serve::tokenizer::Tokenizer::train_bpe(["a small text, a text."].into_iter(), 260)
            .unwrap();
    let ck = CheckpointConfig::new(cfg.clone(), "f32");
    let mut w: Vec<(String, Tensor)> = weights(cfg).into_iter().collect();
    w.sort_by(|a, b| a.0.cmp(&b.0));
    checkpoint::save(dir, &ck, &w, &tok).unwrap();
}

#[test]
fn a_sound_checkpoint_too_narrow_for_q8_0_is_refused_as_unquantizable_not_as_corrupt() {
    use gpt_serve::checkpoint::{self, CheckpointError};
    let mut cfg = config(ExitHead::Tied);
    cfg.n_embd = 48;
    let dir = tempfile::tempdir().unwrap();
    save_checkpoint(dir.path(), &cfg);
    let loaded = checkpoint::load(dir.path(), &Device::Cpu).unwrap();
    assert!(loaded.cpu(WeightDtype::F16).is_ok());
    let err = loaded
        .cpu(WeightDtype::Q8_0)
        .err()
        .expect("q8_0 of a 48-wide model is refused");
    assert!(matches!(err, CheckpointError::Quantize { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(!msg.contains("corrupt"), "{msg}");
    for part in [
        "cannot store the weights as q8_0",
        "`h.0.attn.c_attn.weight`",
        "input width 48 is not a multiple of the block size 32",
        "--weights f16",
    ] {
        assert!(msg.contains(part), "{part:?} missing from: {msg}");
    }
}

#[test]
fn an_unknown_weight_dtype_is_an_error_listing_the_accepted_ones() {
    for name in WeightDtype::NAMES {
        assert_eq!(name.parse::<WeightDtype>().unwrap().name(), name);
    }
    let err = "q5_1".parse::<WeightDtype>().unwrap_err();
    assert!(err.contains("`q5_1`"), "{err}");
    assert!(err.contains("f32, f16, q8_0, q4_0"), "{err}");
}
