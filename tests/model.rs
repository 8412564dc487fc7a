//! The model's correctness: gradients of every parameter against finite
//! differences, KV-cache decoding, split forwards and cache truncation
//! against a full forward, and the checkpoint round trip.

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use gpt_serve::model::config::{Config, Dwa, Exit, ExitHead};
use gpt_serve::model::gpt::{init_weights, Gpt};
use gpt_serve::train::losses::MultiExitLoss;

mod common;
use common::max_abs_diff;

/// Tiny config with every option on, so every kind of parameter exists.
fn full_config() -> Config {
    let mut c = Config::preset("tiny").unwrap();
    c.vocab_size = 300;
    c.block_size = 16;
    c.exits = vec![
        Exit {
            block: 1,
            weight: 0.2,
        },
        Exit {
            block: 2,
            weight: 0.3,
        },
        Exit {
            block: 3,
            weight: 0.5,
        },
    ];
    c.exit_head = ExitHead::Own;
    c.dwa = Some(Dwa {
        dilation: 1,
        period: 1,
    });
    c.x0_skip = true;
    c
}

/// Weights with DWA/skip scalars moved off their identity init so their
/// gradients are generic.
fn weights(cfg: &Config, seed: u64) -> Vec<(String, Tensor)> {
    init_weights(cfg, seed, &Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(n, t)| {
            if n.ends_with(".dwa") || n.ends_with(".skip") || n.ends_with("ln_1.weight") {
                let jitter = (seeded_randn(t.elem_count(), seed) * 0.3)
                    .unwrap()
                    .reshape(t.shape())
                    .unwrap();
                (n, (t + jitter).unwrap())
            } else {
                (n, t)
            }
        })
        .collect()
}

fn seeded_randn(n: usize, seed: u64) -> Tensor {
    use rand::SeedableRng;
    use rand_distr::Distribution;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let normal = rand_distr::Normal::new(0f32, 1.0).unwrap();
    Tensor::from_vec(
        (0..n).map(|_| normal.sample(&mut rng)).collect::<Vec<_>>(),
        n,
        &Device::Cpu,
    )
    .unwrap()
}

fn build(cfg: &Config, w: &[(String, Tensor)], fused: bool) -> (Gpt, Vec<(String, Var)>) {
    let varmap = VarMap::new();
    let mut vars = Vec::new();
    for (n, t) in w {
        let v = Var::from_tensor(t).unwrap();
        varmap.data().lock().unwrap().insert(n.clone(), v.clone());
        vars.push((n.clone(), v));
    }
    let m = Gpt::new(
        cfg,
        VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu),
        fused,
    )
    .unwrap();
    (m, vars)
}

fn batch(cfg: &Config) -> (Tensor, Tensor) {
    let x: Vec<u32> = (0..2 * 8)
        .map(|i| (i * 7 + 3) % cfg.vocab_size as u32)
        .collect();
    let y: Vec<u32> = (0..2 * 8)
        .map(|i| (i * 5 + 1) % cfg.vocab_size as u32)
        .collect();
    (
        Tensor::from_vec(x, (2, 8), &Device::Cpu).unwrap(),
        Tensor::from_vec(y, (2, 8), &Device::Cpu).unwrap(),
    )
}

/// With every other token a candidate, the positions outside `exit_rows`
/// cost what the whole vocabulary would: the mixed loss is the full one.
#[test]
fn scoring_exits_on_every_candidate_equals_the_full_exit_loss() {
    use gpt_serve::train::losses::LossOptions;
    let cfg = full_config();
    let w = weights(&cfg, 4);
    let (x, y) = batch(&cfg);
    let (model, vars) = build(&cfg, &w, false);
    let full = model.loss(&x, &y).unwrap();
    let rows = |r: &[u32]| Some(Tensor::new(r, &Device::Cpu).unwrap());
    let every = LossOptions {
        exit_candidates: cfg.vocab_size - 1,
        exit_rows: rows(&[5, 2]),
        ..Default::default()
    };
    let mixed = model.loss_with(&x, &y, &every).unwrap();
    for (a, b) in full.per_exit.iter().zip(&mixed.per_exit) {
        let (a, b) = (a.to_scalar::<f32>().unwrap(), b.to_scalar::<f32>().unwrap());
        assert!((a - b).abs() < 1e-5, "exit loss {a} vs {b}");
    }
    let (g1, g2) = (
        full.total.backward().unwrap(),
        mixed.total.backward().unwrap(),
    );
    for (name, var) in &vars {
        let d = max_abs_diff(g1.get(var).unwrap(), g2.get(var).unwrap());
        assert!(d < 1e-5, "{name}: gradients differ by {d}");
    }
    // Fewer candidates: a lower loss at the candidate positions.
    let few = LossOptions {
        exit_candidates: 4,
        exit_rows: rows(&[5, 2]),
        ..Default::default()
    };
    let l = model.loss_with(&x, &y, &few).unwrap();
    let first = l.per_exit[0].to_scalar::<f32>().unwrap();
    let full_first = full.per_exit[0].to_scalar::<f32>().unwrap();
    assert!(
        first.is_finite() && first < full_first,
        "{first} vs {full_first}"
    );
    // Candidates alone are refused.
    let alone = LossOptions {
        exit_candidates: 4,
        ..Default::default()
    };
    let err = model.loss_with(&x, &y, &alone).err().unwrap().to_string();
    assert!(err.contains("exit_rows"), "{err}");
}

#[test]
fn every_parameter_gets_the_finite_difference_gradient() {
    let cfg = full_config();
    let w = weights(&cfg, 3);
    let (x, y) = batch(&cfg);
    let (model, vars) = build(&cfg, &w, false);
    let grads = model.loss(&x, &y).unwrap().total.backward().unwrap();
    let loss_at = |name: &str, dir: &Tensor, eps: f64| -> f64 {
        let moved: Vec<(String, Tensor)> = w
            .iter()
            .map(|(n, t)| {
                if n == name {
                    (n.clone(), (t + (dir * eps).unwrap()).unwrap())
                } else {
                    (n.clone(), t.clone())
                }
            })
            .collect();
        let (m, _) = build(&cfg, &moved, false);
        m.loss(&x, &y).unwrap().total.to_scalar::<f32>().unwrap() as f64
    };
    assert_eq!(
        vars.len(),
        gpt_serve::model::params::param_shapes(&cfg).len()
    );
    for (name, var) in &vars {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name} has no gradient"));
        // Directional derivative along a random direction.
        let dir = seeded_randn(var.shape().elem_count(), name.len() as u64)
            .reshape(var.shape())
            .unwrap();
        let analytic = (g * &dir)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64;
        let eps = 5e-4;
        let numeric = (loss_at(name, &dir, eps) - loss_at(name, &dir, -eps)) / (2.0 * eps);
        let tol = 2e-2 * numeric.abs().max(analytic.abs()) + 2e-3;
        assert!(
            (analytic - numeric).abs() < tol,
            "{name}: analytic {analytic} vs numeric {numeric}"
        );
        assert!(analytic.abs() > 1e-6, "{name}: zero gradient");
    }
}

#[test]
fn fused_inference_ops_match_the_training_ops() {
    let cfg = full_config();
    let w = weights(&cfg, 4);
    let (x, _) = batch(&cfg);
    let (train, _) = build(&cfg, &w, false);
    let (infer, _) = build(&cfg, &w, true);
    for (a, b) in train
        .forward_all_exits(&x)
        .unwrap()
        .iter()
        .zip(infer.forward_all_exits(&x).unwrap())
    {
        assert!(max_abs_diff(a, &b) < 1e-4);
    }
}

/// Logits of the final exit for `tokens` fed one position at a time.
fn incremental(model: &Gpt, tokens: &[u32]) -> Vec<Tensor> {
    let mut cache = model.new_cache().unwrap();
    let last = model.cfg.exits.len() - 1;
    tokens
        .iter()
        .enumerate()
        .map(|(pos, t)| {
            let idx = Tensor::from_slice(&[*t], (1, 1), &Device::Cpu).unwrap();
            let mut s = model.embed(&idx, pos).unwrap();
            model
                .run_blocks(&mut s, model.cfg.n_layer, Some(&mut cache))
                .unwrap();
            model
                .exit_logits(&s, last, 0..1)
                .unwrap()
                .squeeze(0)
                .unwrap()
                .squeeze(0)
                .unwrap()
        })
        .collect()
}

// Tolerance for f32 logits computed with different summation orders.
const TOL: f32 = 1e-4;

#[test]
fn kv_cache_decoding_equals_a_full_forward() {
    let cfg = full_config();
    let (model, _) = build(&cfg, &weights(&cfg, 5), true);
    let tokens: Vec<u32> = (0..12).map(|i| (i * 11 + 2) % 61).collect();
    let full = model
        .forward_all_exits(&Tensor::from_slice(&tokens, (1, 12), &Device::Cpu).unwrap())
        .unwrap();
    let full = full.last().unwrap().squeeze(0).unwrap();
    for (i, row) in incremental(&model, &tokens).iter().enumerate() {
        assert!(
            max_abs_diff(row, &full.get(i).unwrap()) < TOL,
            "position {i}"
        );
    }
}

#[test]
fn a_forward_split_at_every_exit_and_resumed_equals_one_forward() {
    let cfg = full_config();
    let (model, _) = build(&cfg, &weights(&cfg, 6), true);
    let tokens: Vec<u32> = (0..10).map(|i| (i * 3 + 1) % 61).collect();
    let idx = Tensor::from_slice(&tokens, (1, 10), &Device::Cpu).unwrap();
    let full = model.forward_all_exits(&idx).unwrap();
    // Prefill 4 with a cache, then 6 more rows block by block, reading exits.
    let mut cache = model.new_cache().unwrap();
    let mut s = model.embed(&idx.narrow(1, 0, 4).unwrap(), 0).unwrap();
    model
        .run_blocks(&mut s, cfg.n_layer, Some(&mut cache))
        .unwrap();
    let mut s = model.embed(&idx.narrow(1, 4, 6).unwrap(), 4).unwrap();
    for (k, e) in cfg.exits.iter().enumerate() {
        model.run_blocks(&mut s, e.block, Some(&mut cache)).unwrap();
        let part = model.exit_logits(&s, k, 0..6).unwrap();
        assert!(
            max_abs_diff(&part, &full[k].narrow(1, 4, 6).unwrap()) < TOL,
            "exit {}",
            e.block
        );
    }
}

#[test]
fn dropping_rows_mid_forward_and_truncating_the_cache_equals_a_fresh_prefill() {
    let cfg = full_config();
    let (model, _) = build(&cfg, &weights(&cfg, 7), true);
    let tokens: Vec<u32> = (0..14).map(|i| (i * 13 + 5) % 61).collect();
    let reference = incremental(&model, &tokens);
    for cut in [1usize, 5, 9] {
        let mut cache = model.new_cache().unwrap();
        // Feed all 14 rows, but drop rows after `cut + 2` at the first exit.
        let idx = Tensor::from_slice(&tokens, (1, 14), &Device::Cpu).unwrap();
        let mut s = model.embed(&idx.narrow(1, 0, cut + 3).unwrap(), 0).unwrap();
        model
            .run_blocks(&mut s, cfg.exits[0].block, Some(&mut cache))
            .unwrap();
        s.truncate(cut + 1).unwrap();
        model
            .run_blocks(&mut s, cfg.n_layer, Some(&mut cache))
            .unwrap();
        // Roll back to `cut` rows, then extend one row at a time.
        cache.truncate(cut);
        let last = cfg.exits.len() - 1;
        for pos in cut..14 {
            let idx = Tensor::from_slice(&tokens[pos..pos + 1], (1, 1), &Device::Cpu).unwrap();
            let mut s = model.embed(&idx, pos).unwrap();
            model
                .run_blocks(&mut s, cfg.n_layer, Some(&mut cache))
                .unwrap();
            let l = model
                .exit_logits(&s, last, 0..1)
                .unwrap()
                .squeeze(0)
                .unwrap()
                .squeeze(0)
                .unwrap();
            assert!(
                max_abs_diff(&l, &reference[pos]) < TOL,
                "cut {cut}, position {pos}"
            );
        }
    }
}

#[test]
fn dwa_and_skips_at_init_are_exactly_the_baseline() {
    let mut base = Config::preset("tiny").unwrap();
    base.vocab_size = 61;
    let mut dense = base.clone();
    dense.dwa = Some(Dwa {
        dilation: 1,
        period: 1,
    });
    dense.x0_skip = true;
    let wb = init_weights(&base, 9, &Device::Cpu).unwrap();
    let wd = init_weights(&dense, 9, &Device::Cpu).unwrap();
    let (mb, _) = build(&base, &wb, true);
    let (md, _) = build(&dense, &wd, true);
    let (x, _) = batch(&base);
    for (a, b) in mb
        .forward_all_exits(&x)
        .unwrap()
        .iter()
        .zip(md.forward_all_exits(&x).unwrap())
    {
        assert!(max_abs_diff(a, &b) < 1e-6);
    }
}

#[test]
fn a_checkpoint_round_trip_gives_identical_logits() {
    use gpt_serve::checkpoint::{self, CheckpointConfig};
    let cfg = full_config();
    let w = weights(&cfg, 8);
    let dir = tempfile::tempdir().unwrap();
    let tok = gpt_serve::tokenizer::Tokenizer::train_bpe(
        ["some text for a tokenizer, some text."].into_iter(),
        260,
    )
    .unwrap();
    let ck = CheckpointConfig::new(cfg.clone(), "f32");
    checkpoint::save(dir.path(), &ck, &w, &tok).unwrap();
    let loaded = checkpoint::load(dir.path(), &Device::Cpu).unwrap();
    let m2 = loaded.model(&Device::Cpu).unwrap();
    let (m1, _) = build(&cfg, &w, true);
    let (x, _) = batch(&cfg);
    for (a, b) in m1
        .forward_all_exits(&x)
        .unwrap()
        .iter()
        .zip(m2.forward_all_exits(&x).unwrap())
    {
        assert_eq!(max_abs_diff(a, &b), 0.0);
    }
    assert_eq!(loaded.config.model, cfg);
}

#[test]
fn a_checkpoint_of_another_format_version_is_refused_clearly() {
    use gpt_serve::checkpoint;
    let dir = tempfile::tempdir().unwrap();
    let cfg = serde_json::json!({"format_version": 99, "model": full_config(), "dtype": "f32"});
    std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
    let e = checkpoint::load(dir.path(), &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("format version 99") && e.contains("reads version 1"),
        "{e}"
    );
    let e = checkpoint::load(std::path::Path::new("/nonexistent/ck"), &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("/nonexistent/ck") && e.contains("does not exist"),
        "{e}"
    );
    std::fs::write(dir.path().join("config.json"), "{ not json").unwrap();
    let e = checkpoint::load(dir.path(), &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("corrupt"), "{e}");
}
