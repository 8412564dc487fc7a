//! The CPU inference path (`fast`) against candle's model: same logits at
//! every exit for every option (DWA with dilation/period, x0 skips, own and
//! tied exit heads, no biases), for a prefill, for k-row verify steps after
//! a cache, for rows dropped mid-way (cascade), and after cache rollback;
//! exit scores of a few candidate tokens equal the full logits there.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use gpt_serve::model::config::{Config, Dwa, Exit, ExitHead};
use gpt_serve::model::cpu::{CpuGpt, KvDtype, WeightDtype};
use gpt_serve::model::forward::{Forward, Segment, Tree};
use gpt_serve::model::gpt::{init_weights, Gpt};

fn configs() -> Vec<(&'static str, Config)> {
    let mut base = Config::preset("tiny").unwrap();
    base.vocab_size = 300;
    base.block_size = 24;
    base.n_layer = 4;
    base.exits = vec![
        Exit {
            block: 2,
            weight: 0.2,
        },
        Exit {
            block: 3,
            weight: 0.3,
        },
        Exit {
            block: 4,
            weight: 0.5,
        },
    ];
    let mut full = base.clone();
    full.exit_head = ExitHead::Own;
    full.dwa = Some(Dwa {
        dilation: 1,
        period: 1,
    });
    full.x0_skip = true;
    let mut dilated = base.clone();
    dilated.dwa = Some(Dwa {
        dilation: 2,
        period: 2,
    });
    dilated.bias = false;
    vec![
        ("baseline", base),
        ("dwa+skips+own heads", full),
        ("dwa 2x2, no bias", dilated),
    ]
}

/// Seeded weights with DWA/skip scalars off their identity init.
fn weights(cfg: &Config) -> HashMap<String, Tensor> {
    init_weights(cfg, 7, &Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(n, t)| {
            if n.ends_with(".dwa") || n.ends_with(".skip") {
                let k = t.elem_count();
                let j: Vec<f32> = (0..k)
                    .map(|i| 0.3 * ((i * 37 % 11) as f32 / 11.0 - 0.5))
                    .collect();
                let t = (t + Tensor::from_vec(j, k, &Device::Cpu).unwrap()).unwrap();
                (n, t)
            } else {
                (n, t)
            }
        })
        .collect()
}

/// candle's model and the fast path (f32) on the same seeded weights.
fn both_backends(cfg: &Config) -> (Gpt, CpuGpt, HashMap<String, Tensor>) {
    let w = weights(cfg);
    let gpt = Gpt::new(
        cfg,
        VarBuilder::from_tensors(w.clone(), DType::F32, &Device::Cpu),
        true,
    )
    .unwrap();
    let fast = CpuGpt::from_tensors(cfg, &w, WeightDtype::F32).unwrap();
    (gpt, fast, w)
}

fn max_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| x.iter().zip(y).map(|(p, q)| (p - q).abs()))
        .fold(0.0, f32::max)
}

/// Logits of every exit for `tokens` fed as: prefill of `split` tokens,
/// then the rest in chunks of `chunk` rows.
fn run<M: Forward>(m: &M, tokens: &[u32], split: usize, chunk: usize) -> Vec<Vec<Vec<f32>>> {
    let cfg = m.config().clone();
    let mut cache = m.new_cache().unwrap();
    let mut per_exit = vec![Vec::new(); cfg.exits.len()];
    let mut pos = 0;
    for part in std::iter::once(&tokens[..split]).chain(tokens[split..].chunks(chunk)) {
        let mut s = m.embed(part, pos).unwrap();
        for (e, ex) in cfg.exits.iter().enumerate() {
            m.run_blocks(&mut s, ex.block, &mut cache).unwrap();
            per_exit[e].extend(
                m.exit_logits(&s, e, 0..part.len())
                    .unwrap()
                    .iter()
                    .map(<[f32]>::to_vec),
            );
        }
        pos += part.len();
    }
    per_exit
}

#[test]
fn fast_logits_equal_candle_logits_at_every_exit_for_every_option() {
    let tokens: Vec<u32> = (0..20).map(|i| (i * 37 + 5) % 300).collect();
    for (name, cfg) in configs() {
        let (gpt, fast, w) = both_backends(&cfg);
        let want = run(&gpt, &tokens, 20, 1);
        for (split, chunk) in [(20, 1), (1, 1), (7, 4), (5, 8)] {
            let got = run(&fast, &tokens, split, chunk);
            for e in 0..cfg.exits.len() {
                let d = max_diff(&got[e], &want[e]);
                assert!(
                    d < 1e-4,
                    "{name}, prefill {split} + chunks of {chunk}, exit {e}: max diff {d}"
                );
            }
        }
        let f16 = CpuGpt::from_tensors(&cfg, &w, WeightDtype::F16).unwrap();
        let got = run(&f16, &tokens, 7, 4);
        let d = max_diff(got.last().unwrap(), want.last().unwrap());
        assert!(d < 2e-2, "{name} f16 weights: max diff {d}");
    }
}

#[test]
fn a_verify_step_gives_bitwise_the_logits_of_one_row_steps() {
    // So speculative output equals plain output exactly, even where a
    // sampled token sits at a boundary of the cumulative distribution.
    let tokens: Vec<u32> = (0..20).map(|i| (i * 29 + 3) % 300).collect();
    for (name, cfg) in configs() {
        let fast = CpuGpt::from_tensors(&cfg, &weights(&cfg), WeightDtype::F16).unwrap();
        let one_by_one = run(&fast, &tokens, 1, 1);
        for (split, chunk) in [(20, 1), (4, 9), (6, 5)] {
            assert!(
                run(&fast, &tokens, split, chunk) == one_by_one,
                "{name}: prefill {split} + chunks of {chunk} differ from one-row steps"
            );
        }
    }
}

#[test]
fn dropping_rows_and_rolling_the_cache_back_equals_a_fresh_run() {
    let (_, cfg) = configs().remove(1);
    let w = weights(&cfg);
    let fast = CpuGpt::from_tensors(&cfg, &w, WeightDtype::F32).unwrap();
    let tokens: Vec<u32> = (0..12).map(|i| (i * 11 + 2) % 300).collect();
    let last = cfg.exits.len() - 1;
    // Prefill 6, then a 5-row step whose rows 3.. are dropped after exit 0,
    // then roll back to 8 committed rows and feed the true continuation.
    let mut cache = fast.new_cache();
    let mut s = fast.embed(&tokens[..6], 0).unwrap();
    fast.run_blocks(&mut s, cfg.n_layer, &mut cache).unwrap();
    let mut s = fast.embed(&[tokens[6], tokens[7], 99, 98, 97], 6).unwrap();
    fast.run_blocks(&mut s, cfg.exits[0].block, &mut cache)
        .unwrap();
    Forward::keep_rows(&fast, &mut s, 3).unwrap();
    fast.run_blocks(&mut s, cfg.n_layer, &mut cache).unwrap();
    cache.truncate(8);
    assert_eq!(cache.len(), 8);
    let mut s = fast.embed(&tokens[8..], 8).unwrap();
    fast.run_blocks(&mut s, cfg.n_layer, &mut cache).unwrap();
    let got: Vec<Vec<f32>> = Forward::exit_logits(&fast, &s, last, 0..4)
        .unwrap()
        .iter()
        .map(<[f32]>::to_vec)
        .collect();
    let want = run(&fast, &tokens, 12, 1).remove(last).split_off(8);
    assert!(max_diff(&got, &want) < 1e-5);
}

#[test]
fn a_cache_that_does_not_hold_the_committed_rows_is_an_error_not_a_panic() {
    let (_, cfg) = configs().remove(0);
    let fast = CpuGpt::from_tensors(&cfg, &weights(&cfg), WeightDtype::F32).unwrap();
    let mut cache = fast.new_cache();
    let mut s = fast.embed(&[1, 2, 3], 5).unwrap();
    let err = fast
        .run_blocks(&mut s, cfg.n_layer, &mut cache)
        .unwrap_err();
    assert!(
        err.to_string().contains("holds 0 rows, expected 5"),
        "{err}"
    );
    assert!(fast.embed(&[1; 30], 0).is_err(), "past block_size");
    let err = fast.embed(&[300], 0).err().unwrap();
    assert!(err.to_string().contains("outside the vocabulary"), "{err}");
    let mut w = weights(&cfg);
    w.remove("h.1.mlp.c_fc.weight");
    let err = CpuGpt::from_tensors(&cfg, &w, WeightDtype::F32)
        .err()
        .unwrap();
    assert!(err.to_string().contains("h.1.mlp.c_fc.weight"), "{err}");
}

/// Tokens of `max` steps from `prompt`, and the generator's stats.
fn decode<M: Forward>(
    m: &M,
    prompt: &[u32],
    params: gpt_serve::decode::GenParams,
) -> (Vec<u32>, gpt_serve::decode::SpecStats) {
    use gpt_serve::decode::{proposer::Plain, Generator};
    let (mut g, _) = Generator::new(m, Box::new(Plain), prompt, params, u32::MAX, None).unwrap();
    let mut out = Vec::new();
    while g.finished.is_none() {
        out.extend(g.step().unwrap().into_iter().map(|t| t.id));
        assert_eq!(
            g.cache_len(),
            g.tokens().len() - 1,
            "cache holds all but the pending token"
        );
    }
    (out, g.stats.clone())
}

#[test]
fn drafting_with_an_early_exit_gives_plain_tokens_on_both_backends_for_every_option() {
    use gpt_serve::decode::{GenParams, SelfDraft};
    let prompt = [5u32, 17, 42];
    for (name, cfg) in configs() {
        let (gpt, fast, _) = both_backends(&cfg);
        for temperature in [0.0, 0.9] {
            let plain = plain_steps(temperature);
            let (want, _) = decode(&fast, &prompt, plain.clone());
            for exit in 0..cfg.exits.len() - 1 {
                let spec = GenParams {
                    speculate: true,
                    self_draft: Some(SelfDraft {
                        exit,
                        k_max: 3,
                        min_confidence: 0.0,
                    }),
                    ..plain.clone()
                };
                let (got, st) = decode(&fast, &prompt, spec.clone());
                assert_eq!(got, want, "{name}, t={temperature}, exit {exit}: fast");
                // Every step drafts with the exit but a last one with no room.
                assert!(st.exit_drafted > 0, "{name}: nothing drafted");
                assert!(st.exit_draft_steps + 1 >= st.steps, "{name}: {st:?}");
                let (got, _) = decode(&gpt, &prompt, spec);
                assert_eq!(got, want, "{name}, t={temperature}, exit {exit}: candle");
            }
        }
    }
}

#[test]
fn rows_join_a_stream_only_at_the_same_block_and_the_next_position() {
    let (_, cfg) = configs().remove(0);
    let fast = CpuGpt::from_tensors(&cfg, &weights(&cfg), WeightDtype::F32).unwrap();
    let mut cache = fast.new_cache();
    let mut s = fast.embed(&[1, 2], 0).unwrap();
    let err = Forward::append_rows(&fast, &mut s, fast.embed(&[3], 3).unwrap()).unwrap_err();
    assert!(
        err.to_string().contains("cannot append rows at position 3"),
        "{err}"
    );
    fast.run_blocks(&mut s, 2, &mut cache).unwrap();
    let err = Forward::append_rows(&fast, &mut s, fast.embed(&[3], 2).unwrap()).unwrap_err();
    assert!(err.to_string().contains("block 0"), "{err}");
    let mut next = fast.embed(&[3], 2).unwrap();
    fast.run_blocks(&mut next, 2, &mut cache).unwrap();
    Forward::append_rows(&fast, &mut s, next).unwrap();
    assert_eq!(Forward::rows(&fast, &s), 3);
}

/// The final logits of `tokens` at `pos` on `cache`, as a chain or a tree.
fn forward_rows(
    m: &CpuGpt,
    cache: &mut <CpuGpt as Forward>::Cache,
    tokens: &[u32],
    pos: usize,
    tree: Option<&Tree>,
) -> Vec<Vec<f32>> {
    let mut seg = [Segment {
        tokens,
        pos,
        cache,
        logits: 0..tokens.len(),
        tree,
    }];
    let out = Forward::forward_batch(m, &mut seg).unwrap();
    out[0].iter().map(<[f32]>::to_vec).collect()
}

#[test]
fn a_draft_tree_gives_each_path_a_chains_logits_and_compaction_equals_a_fresh_prefill() {
    let prompt: Vec<u32> = (0..8).map(|i| (i * 41 + 3) % 300).collect();
    // Root 7; children 11 (row 1) and 22 (row 2); 33 under 11, 44 under 22.
    let rows = [7u32, 11, 22, 33, 44];
    let tree = Tree::from_parents(vec![0, 0, 0, 1, 2]).unwrap();
    for (name, cfg) in configs() {
        let (_, fast, _) = both_backends(&cfg);
        let mut cache = fast.new_cache();
        forward_rows(&fast, &mut cache, &prompt, 0, None);
        let tree_logits = forward_rows(&fast, &mut cache, &rows, prompt.len(), Some(&tree));
        for path in [[0usize, 1, 3], [0, 2, 4]] {
            let chain: Vec<u32> = path.iter().map(|&r| rows[r]).collect();
            let mut fresh = fast.new_cache();
            forward_rows(&fast, &mut fresh, &prompt, 0, None);
            let want = forward_rows(&fast, &mut fresh, &chain, prompt.len(), None);
            for (i, &r) in path.iter().enumerate() {
                assert_eq!(tree_logits[r], want[i], "{name}: path {path:?}, row {r}");
            }
            if path[1] == 2 {
                // Keep the accepted path's slots; the next step must see
                // exactly what a fresh prefill of the path gives.
                fast.compact_cache(&mut cache, prompt.len(), &path).unwrap();
                assert_eq!(fast.cache_len(&cache), prompt.len() + 3);
                let at = prompt.len() + 3;
                let got = forward_rows(&fast, &mut cache, &[55], at, None);
                let want = forward_rows(&fast, &mut fresh, &[55], at, None);
                assert_eq!(got, want, "{name}: the step after compaction");
            }
        }
    }
}

/// How far candidate scores may sit from the full logits: f32 weights sum
/// in another order; an f16 head rounds the embedding the scores read in f32.
const SCORES_F32_TOL: f32 = 1e-4;
const SCORES_F16_TOL: f32 = 2e-2;

/// Exit `exit`'s scores of `ids` and its full logits at `ids`, for rows
/// 2.. of `tokens` after a prefill of the first two.
fn scores_and_logits<M: Forward>(
    m: &M,
    tokens: &[u32],
    exit: usize,
    ids: &[u32],
) -> (Vec<f32>, Vec<f32>) {
    let block = m.config().exits[exit].block;
    let mut cache = m.new_cache().unwrap();
    let mut s = m.embed(&tokens[..2], 0).unwrap();
    m.run_blocks(&mut s, block, &mut cache).unwrap();
    let mut s = m.embed(&tokens[2..], 2).unwrap();
    m.run_blocks(&mut s, block, &mut cache).unwrap();
    let rows = 0..tokens.len() - 2;
    let got = m.exit_scores(&s, exit, rows.clone(), ids).unwrap();
    let logits = m.exit_logits(&s, exit, rows).unwrap();
    let want = logits
        .iter()
        .flat_map(|row| ids.iter().map(|&t| row[t as usize]))
        .collect();
    (got, want)
}

#[test]
fn exit_scores_equal_the_exit_logits_at_the_candidate_tokens_for_every_option() {
    let tokens: Vec<u32> = (0..12).map(|i| (i * 37 + 5) % 300).collect();
    let ids = [0u32, 7, 299, 150, 42];
    for (name, cfg) in configs() {
        let (gpt, fast, w) = both_backends(&cfg);
        let f16 = CpuGpt::from_tensors(&cfg, &w, WeightDtype::F16).unwrap();
        for e in 0..cfg.exits.len() {
            let (got, want) = scores_and_logits(&gpt, &tokens, e, &ids);
            assert_eq!(got, want, "{name}, exit {e}: candle slices its logits");
            let (got, want) = scores_and_logits(&fast, &tokens, e, &ids);
            let d = max_diff(&[got], &[want]);
            assert!(d < SCORES_F32_TOL, "{name}, exit {e}: max diff {d}");
            let (got, want) = scores_and_logits(&f16, &tokens, e, &ids);
            let d = max_diff(&[got], &[want]);
            assert!(
                d < SCORES_F16_TOL,
                "{name} f16 weights, exit {e}: max diff {d}"
            );
        }
        let mut cache = fast.new_cache();
        let mut s = fast.embed(&tokens, 0).unwrap();
        fast.run_blocks(&mut s, cfg.exits[0].block, &mut cache)
            .unwrap();
        let err = fast
            .exit_scores(&s, 0, 0..1, &[300])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("token id 300") && err.contains("vocabulary"),
            "{err}"
        );
    }
}

/// The fast path (f32 weights) with its KV caches stored in f16.
fn f16_kv(cfg: &Config) -> CpuGpt {
    CpuGpt::from_tensors(cfg, &weights(cfg), WeightDtype::F32)
        .unwrap()
        .with_kv_cache(KvDtype::F16)
}

#[test]
fn f16_kv_logits_are_within_a_hundredth_of_f32_kv_logits_at_every_exit() {
    let tokens: Vec<u32> = (0..20).map(|i| (i * 37 + 5) % 300).collect();
    for (name, cfg) in configs() {
        let (_, fast, _) = both_backends(&cfg);
        let half = f16_kv(&cfg);
        assert_eq!(half.kv_cache(), KvDtype::F16);
        for (split, chunk) in [(20, 1), (1, 1), (7, 4)] {
            let (want, got) = (
                run(&fast, &tokens, split, chunk),
                run(&half, &tokens, split, chunk),
            );
            for e in 0..cfg.exits.len() {
                let d = max_diff(&got[e], &want[e]);
                assert!(d < 1e-2, "{name}, prefill {split}, exit {e}: max diff {d}");
            }
        }
    }
}

#[test]
fn a_verify_step_gives_bitwise_the_logits_of_one_row_steps_with_an_f16_kv_cache() {
    let tokens: Vec<u32> = (0..20).map(|i| (i * 29 + 3) % 300).collect();
    for (name, cfg) in configs() {
        let half = f16_kv(&cfg);
        let one_by_one = run(&half, &tokens, 1, 1);
        for (split, chunk) in [(20, 1), (4, 9), (6, 5)] {
            assert!(
                run(&half, &tokens, split, chunk) == one_by_one,
                "{name}: prefill {split} + chunks of {chunk} differ from one-row steps"
            );
        }
    }
}

/// Each sequence prefilled alone, then one step of `steps[i]` rows each,
/// alone or all in one forward: the step's logits per sequence.
fn step_after_prefill(
    m: &CpuGpt,
    seqs: &[Vec<u32>],
    split: &[usize],
    batched: bool,
) -> Vec<Vec<f32>> {
    let mut caches: Vec<_> = seqs.iter().map(|_| m.new_cache()).collect();
    for ((s, &k), c) in seqs.iter().zip(split).zip(&mut caches) {
        forward_rows(m, c, &s[..k], 0, None);
    }
    let mut segs: Vec<Segment<'_, _>> = seqs
        .iter()
        .zip(split)
        .zip(caches.iter_mut())
        .map(|((s, &k), cache)| Segment {
            tokens: &s[k..],
            pos: k,
            cache,
            logits: 0..s.len() - k,
            tree: None,
        })
        .collect();
    let out = if batched {
        Forward::forward_batch(m, &mut segs).unwrap()
    } else {
        let one = |sg: &mut Segment<'_, _>| Forward::forward_batch(m, std::slice::from_mut(sg));
        segs.iter_mut()
            .map(|sg| one(sg).unwrap().remove(0))
            .collect()
    };
    out.iter()
        .map(|l| l.iter().flatten().copied().collect())
        .collect()
}

#[test]
fn sequences_in_a_batch_get_bitwise_their_logits_alone_with_an_f16_kv_cache() {
    let seqs: Vec<Vec<u32>> = (0..3u32)
        .map(|s| {
            (0..12 + 3 * s)
                .map(|i| (i * 31 + 7 * s + 1) % 300)
                .collect()
        })
        .collect();
    let split = [11, 9, 7];
    for (name, cfg) in configs() {
        let half = f16_kv(&cfg);
        let alone = step_after_prefill(&half, &seqs, &split, false);
        let batched = step_after_prefill(&half, &seqs, &split, true);
        assert!(batched == alone, "{name}: batched logits differ from alone");
    }
}

#[test]
fn speculative_decoding_gives_bitwise_plain_tokens_with_an_f16_kv_cache() {
    use gpt_serve::decode::{GenParams, SelfDraft};
    let prompt = [5u32, 17, 42];
    for (name, cfg) in configs() {
        let half = f16_kv(&cfg);
        for temperature in [0.0, 0.9] {
            let plain = plain_steps(temperature);
            let (want, _) = decode(&half, &prompt, plain.clone());
            let spec = GenParams {
                speculate: true,
                self_draft: Some(SelfDraft {
                    exit: 0,
                    k_max: 3,
                    min_confidence: 0.0,
                }),
                ..plain.clone()
            };
            let (got, st) = decode(&half, &prompt, spec);
            assert_eq!(got, want, "{name}, t={temperature}");
            assert!(st.exit_drafted > 0, "{name}: nothing drafted");
        }
    }
}

#[test]
fn a_bad_kv_cache_value_is_refused_naming_the_flag() {
    assert_eq!(KvDtype::parse("f16"), Ok(KvDtype::F16));
    assert!(KvDtype::parse("q8_0").unwrap_err().contains("--kv-cache"));
    for cmd in ["serve", "sample", "bench"] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_gpt-serve"))
            .args([cmd, "--kv-cache", "bf16"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{cmd} accepted --kv-cache bf16");
        assert!(err.contains("--kv-cache"), "{cmd}: {err}");
    }
}

/// Plain decoding of 18 tokens at `temperature`, seed 3, past end-of-text:
/// what the self-drafting tests compare speculation with.
fn plain_steps(temperature: f32) -> gpt_serve::decode::GenParams {
    gpt_serve::decode::GenParams {
        max_tokens: 18,
        sampling: gpt_serve::sampling::SamplingParams {
            temperature,
            seed: 3,
            ..Default::default()
        },
        speculate: false,
        stop_at_eot: false,
        ..Default::default()
    }
}
