//! `gpt-serve train` end to end: learning, exact resume, and clear errors.

use std::path::{Path, PathBuf};

use clap::Parser;
use gpt_serve::train::{self, TrainOptions};

mod common;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    o: TrainOptions,
}

fn opts(args: &[&str]) -> TrainOptions {
    let mut v = vec!["train"];
    v.extend_from_slice(args);
    Cli::try_parse_from(v).unwrap().o
}

/// A synthetic corpus with structure a model can learn.
fn corpus(dir: &Path, words: usize) -> PathBuf {
    let names = ["alice", "bob", "carol", "dave", "erin"];
    let verbs = ["sees", "helps", "calls", "finds"];
    let mut s = String::new();
    let mut x = 7u64;
    for i in 0..words {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let a = names[(x >> 33) as usize % 5];
        let v = verbs[(x >> 40) as usize % 4];
        let b = names[(x >> 50) as usize % 5];
        s.push_str(&format!("{a} {v} {b}. "));
        if i % 8 == 7 {
            s.push('\n');
        }
    }
    let p = dir.join("corpus.txt");
    std::fs::write(&p, s).unwrap();
    p
}

fn shakespeare() -> Option<PathBuf> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data/tinyshakespeare.txt");
    if p.exists() {
        Some(p)
    } else {
        eprintln!("skipping: {} is absent", p.display());
        None
    }
}

#[test]
fn loss_falls_well_below_the_unigram_entropy_on_tinyshakespeare() {
    let Some(data) = shakespeare() else { return };
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("ck");
    let o = opts(&[
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--preset",
        "tiny",
        "--n-embd",
        "64",
        "--n-head",
        "4",
        "--vocab-size",
        "512",
        "--steps",
        "150",
        "--batch-size",
        "16",
        "--context",
        "64",
        "--lr",
        "3e-3",
        "--warmup",
        "20",
        "--eval-every",
        "0",
        "--drafter",
        "false",
        "--cache-dir",
        dir.path().to_str().unwrap(),
    ]);
    let s = train::run(o).unwrap();
    // Unigram entropy of the same token stream.
    let tok = gpt_serve::tokenizer::Tokenizer::from_file(&out.join("tokenizer.json")).unwrap();
    let ids = tok
        .encode(&std::fs::read_to_string(&data).unwrap())
        .unwrap();
    let mut counts = vec![0f64; tok.vocab_size()];
    for i in &ids {
        counts[*i as usize] += 1.0;
    }
    let n = ids.len() as f64;
    let h: f64 = counts
        .iter()
        .filter(|c| **c > 0.0)
        .map(|c| -(c / n) * (c / n).ln())
        .sum();
    let val = s.val_loss.last().unwrap().1 as f64;
    assert!(val < h - 0.7, "val loss {val} vs unigram entropy {h}");
    // Reports exist.
    assert!(out.join("metrics.jsonl").exists() && out.join("loss.png").exists());
}

fn weights(dir: &Path) -> std::collections::HashMap<String, candle_core::Tensor> {
    gpt_serve::checkpoint::load_tensors(&dir.join("model.safetensors"), &candle_core::Device::Cpu)
        .unwrap()
}

#[test]
fn a_run_stopped_and_resumed_ends_exactly_where_an_uninterrupted_run_does() {
    let dir = tempfile::tempdir().unwrap();
    let data = corpus(dir.path(), 4000);
    let common = |out: &str| -> Vec<String> {
        [
            data.to_str().unwrap(),
            "--out",
            out,
            "--preset",
            "tiny",
            "--vocab-size",
            "300",
            "--steps",
            "16",
            "--batch-size",
            "4",
            "--context",
            "32",
            "--warmup",
            "4",
            "--eval-every",
            "0",
            "--save-every",
            "0",
            "--drafter",
            "false",
            "--exit-every",
            "2",
            "--schedule",
            "hyper-speed",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let a = dir.path().join("a");
    let b = dir.path().join("b");
    let args_a = common(a.to_str().unwrap());
    train::run(opts(&args_a.iter().map(String::as_str).collect::<Vec<_>>())).unwrap();
    let mut args_b = common(b.to_str().unwrap());
    args_b.extend(["--stop-after".to_string(), "7".to_string()]);
    let first = train::run(opts(&args_b.iter().map(String::as_str).collect::<Vec<_>>())).unwrap();
    assert_eq!(first.steps, 7);
    let resumed = train::run(opts(&[
        data.to_str().unwrap(),
        "--out",
        b.to_str().unwrap(),
        "--resume",
    ]))
    .unwrap();
    assert_eq!(resumed.steps, 16);
    let (wa, wb) = (weights(&a), weights(&b));
    for (k, ta) in &wa {
        let d = common::max_abs_diff(ta, &wb[k]);
        assert!(d < 1e-6, "{k} differs by {d}");
    }
    // The metrics log has each step once.
    let log = std::fs::read_to_string(b.join("metrics.jsonl")).unwrap();
    assert_eq!(log.lines().count(), 16);
}

#[test]
fn a_wall_clock_budget_fixes_the_step_count_after_the_warm_steps_and_the_schedule_follows() {
    let dir = tempfile::tempdir().unwrap();
    let data = corpus(dir.path(), 4000);
    let out = dir.path().join("ck");
    let summary = train::run(opts(&[
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--preset",
        "tiny",
        "--vocab-size",
        "300",
        "--minutes",
        "0.03",
        "--batch-size",
        "4",
        "--context",
        "32",
        "--warmup",
        "2",
        "--lr",
        "1e-3",
        "--eval-every",
        "0",
        "--save-every",
        "0",
        "--drafter",
        "false",
    ]))
    .unwrap();
    // Steps 5..15 are timed, so the budget is fixed after step 15.
    assert!(summary.steps > 15, "{} steps", summary.steps);
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("trainer.json")).unwrap()).unwrap();
    assert_eq!(state["total_steps"].as_u64(), Some(summary.steps));
    assert_eq!(state["schedule"]["total"].as_u64(), Some(summary.steps));
    // The cosine schedule ran to its end: the last step's rate is near 10% of peak.
    let log = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let last: serde_json::Value = serde_json::from_str(log.lines().last().unwrap()).unwrap();
    let lr = last["lr"].as_f64().unwrap();
    assert!(lr < 2e-4, "last lr {lr}");
}

fn err(args: &[&str]) -> String {
    match train::run(opts(args)) {
        Ok(_) => panic!("expected an error for {args:?}"),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn bad_inputs_get_errors_that_name_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o");
    let o = out.to_str().unwrap();
    let base = [
        "--preset",
        "tiny",
        "--steps",
        "2",
        "--vocab-size",
        "300",
        "--drafter",
        "false",
    ];
    let with = |first: &str, extra: &[&str]| {
        let mut v = vec![first, "--out", o];
        v.extend_from_slice(&base);
        v.extend_from_slice(extra);
        err(&v)
    };
    assert!(with("/nonexistent/corpus.txt", &[]).contains("/nonexistent/corpus.txt"));
    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, "  \n").unwrap();
    assert!(with(empty.to_str().unwrap(), &[]).contains("empty"));
    let short = dir.path().join("short.txt");
    std::fs::write(
        &short,
        "a tiny corpus, far shorter than one window. ".repeat(3),
    )
    .unwrap();
    let e = with(short.to_str().unwrap(), &[]);
    assert!(e.contains("block_size + 1"), "{e}");
    let data = corpus(dir.path(), 3000);
    let d = data.to_str().unwrap();
    let e = with(d, &["--n-embd", "33"]);
    assert!(
        e.contains("n_embd (33) must be divisible by n_head (2)"),
        "{e}"
    );
    let e = with(d, &["--exits", "2:0.5,9:0.5"]);
    assert!(e.contains("exit block 9"), "{e}");
    let e = with(d, &["--exits", "2:0,3:1"]);
    assert!(e.contains("must be positive"), "{e}");
    let e = err(&[d, "--out", "/proc/forbidden/out", "--steps", "1"]);
    assert!(e.contains("/proc/forbidden/out"), "{e}");
    let e = err(&[
        d,
        "--out",
        dir.path().join("never").to_str().unwrap(),
        "--resume",
    ]);
    assert!(e.contains("nothing to resume"), "{e}");
    let e = err(&[d, "--out", o]);
    assert!(e.contains("budget"), "{e}");
}
