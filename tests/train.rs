//! `gpt-serve train` end to end: learning, exact resume, and clear errors.

#[path = "common/skip.rs"]
mod skip;

use std::path::{Path, PathBuf};

use clap::{Parser, ValueEnum};
use gpt_serve::train::snapshot::{self, SavePoint};
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
        skip::skip(&format!("{} is absent", p.display()));
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
    let a = dir.path().join("a");
    let b = dir.path().join("b");
    let exits = ["--exit-every", "2"];
    train::run(tiny_run(&data, &a, 16, 0, &exits)).unwrap();
    let stop = ["--exit-every", "2", "--stop-after", "7"];
    let first = train::run(tiny_run(&data, &b, 16, 0, &stop)).unwrap();
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

/// Options of a tiny run of `steps` steps saving every `save_every`
/// (0: at the end only), without a drafter.
fn tiny_run(data: &Path, out: &Path, steps: u32, save_every: u32, extra: &[&str]) -> TrainOptions {
    let (steps, save_every) = (steps.to_string(), save_every.to_string());
    let mut v = vec![
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--preset",
        "tiny",
        "--vocab-size",
        "300",
        "--steps",
        &steps,
        "--batch-size",
        "4",
        "--context",
        "32",
        "--warmup",
        "4",
        "--eval-every",
        "0",
        "--save-every",
        &save_every,
        "--drafter",
        "false",
        "--schedule",
        "hyper-speed",
    ];
    v.extend_from_slice(extra);
    opts(&v)
}

/// Options of a 12-step run saving every 4 steps, for the crash tests.
fn crash_run(data: &Path, out: &Path, extra: &[&str]) -> TrainOptions {
    tiny_run(data, out, 12, 4, extra)
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// Paths under `dir` whose name ends in `.tmp`.
fn temporaries(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.to_string_lossy().ends_with(".tmp") {
            found.push(p.clone());
        }
        if p.is_dir() {
            found.extend(temporaries(&p));
        }
    }
    found
}

#[test]
fn a_save_killed_at_any_point_resumes_bitwise_equal_to_an_uninterrupted_run() {
    let dir = tempfile::tempdir().unwrap();
    let data = corpus(dir.path(), 4000);
    let whole = dir.path().join("whole");
    train::run(crash_run(&data, &whole, &[])).unwrap();
    // A run stopped cleanly at step 4; every copy of it is killed while
    // saving step 8, then resumed to the end.
    let at4 = dir.path().join("at4");
    train::run(crash_run(&data, &at4, &["--stop-after", "4"])).unwrap();
    for &point in SavePoint::value_variants() {
        let out = dir.path().join(format!("{point:?}"));
        copy_dir(&at4, &out);
        let name = format!("{point:?}");
        let flag = clap::ValueEnum::to_possible_value(&point).unwrap();
        let killed = train::run(crash_run(
            &data,
            &out,
            &["--resume", "--crash-at", flag.get_name()],
        ));
        let e = format!("{:#}", killed.expect_err("the hook stops the save"));
        assert!(e.contains("--crash-at"), "{name}: {e}");
        // Work is kept from the commit on, and never half of it.
        let kept = snapshot::latest(&out).unwrap().unwrap().state.step;
        let committed = point as usize >= SavePoint::Commit as usize;
        assert_eq!(kept, if committed { 8 } else { 4 }, "{name}");
        let resumed = train::run(crash_run(&data, &out, &["--resume"])).unwrap();
        assert_eq!(resumed.steps, 12, "{name}");
        let (wa, wb) = (weights(&whole), weights(&out));
        assert_eq!(wa.len(), wb.len(), "{name}");
        for (k, ta) in &wa {
            let d = common::max_abs_diff(ta, &wb[k]);
            assert!(d == 0.0, "after a kill at {name}, {k} differs by {d}");
        }
        assert_eq!(temporaries(&out), Vec::<PathBuf>::new(), "{name}");
        let sets = std::fs::read_dir(out.join(snapshot::SNAPSHOTS_DIR)).unwrap();
        assert_eq!(sets.count(), 1, "{name}: older snapshots are removed");
    }
}

#[test]
fn resume_skips_a_snapshot_that_fails_its_checks_and_takes_the_previous_one() {
    let dir = tempfile::tempdir().unwrap();
    let data = corpus(dir.path(), 4000);
    let out = dir.path().join("ck");
    train::run(crash_run(&data, &out, &["--stop-after", "4"])).unwrap();
    let sets = out.join(snapshot::SNAPSHOTS_DIR);
    let older = sets.join("step-00000004");
    // A newer set whose trainer state is not at its step.
    copy_dir(&older, &sets.join("step-00000008"));
    assert_eq!(snapshot::latest(&out).unwrap().unwrap().state.step, 4);
    // Without any complete set, resume says so and what to do.
    std::fs::remove_file(older.join("trainer.json")).unwrap();
    let e = format!(
        "{:#}",
        train::run(crash_run(&data, &out, &["--resume"]))
            .err()
            .unwrap()
    );
    assert!(
        e.contains("nothing to resume") && e.contains("without --resume"),
        "{e}"
    );
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
    let state = snapshot::latest(&out).unwrap().unwrap().state;
    assert_eq!(state.total_steps, summary.steps);
    assert_eq!(state.schedule.total, summary.steps);
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

#[derive(Parser)]
struct HeadCli {
    #[command(flatten)]
    a: gpt_serve::train::head::TrainHeadArgs,
}

/// The report of a head trained `steps` steps, two steps deep, from
/// `seed` on the checkpoint in `model`.
fn train_head(model: &Path, data: &Path, steps: &str, seed: &str) -> serde_json::Value {
    use gpt_serve::model::draft_head::{HeadConfig, HEAD_CONFIG_FILE};
    let cache = model.join("cache");
    let (m, d) = (model.to_str().unwrap(), data.to_str().unwrap());
    let args = HeadCli::try_parse_from([
        "train-head",
        "--model",
        m,
        "--data",
        d,
        "--val",
        d,
        "--seqs",
        "64",
        "--steps",
        steps,
        "--hidden",
        "64",
        "--unroll",
        "2",
        "--seed",
        seed,
        "--cache-dir",
        cache.to_str().unwrap(),
    ])
    .unwrap()
    .a;
    gpt_serve::train::head::run(&args).unwrap();
    let text = std::fs::read_to_string(model.join(HEAD_CONFIG_FILE)).unwrap();
    let mut cfg: HeadConfig = serde_json::from_str(&text).unwrap();
    cfg.report.as_object_mut().unwrap().remove("command");
    cfg.report
}

#[test]
fn a_draft_head_trained_two_steps_deep_learns_the_models_next_tokens_and_loads_beside_it() {
    let dir = tempfile::tempdir().unwrap();
    let data = corpus(dir.path(), 4000);
    let m = dir.path().join("m");
    train::run(tiny_run(&data, &m, 300, 0, &[])).unwrap();
    // One step leaves the head about where it starts: the model's features
    // at t guess those at t + 1.
    let untrained = train_head(&m, &data, "1", "3");
    let trained = train_head(&m, &data, "200", "3");
    let share = |r: &serde_json::Value, depth: &str, temp: &str| r[depth][temp].as_f64().unwrap();
    for (depth, temp, gain) in [
        ("val_draw_match", "0", 0.2),
        ("val_draw_match", "0.8", 0.2),
        ("val_draw_match_depth2", "0.8", 0.1),
        ("val_draw_match_depth2", "1", 0.1),
    ] {
        let (before, after) = (share(&untrained, depth, temp), share(&trained, depth, temp));
        assert!(
            after > before + gain,
            "{depth} at temperature {temp}: {after} trained against {before} untrained"
        );
    }
    let head = gpt_serve::model::draft_head::DraftHead::load(&m, &weights(&m)).unwrap();
    assert!(head.is_some(), "the head loads beside its checkpoint");
    let again = train_head(&m, &data, "200", "3");
    assert_eq!(trained, again, "the same seed trains the same head");
}

#[test]
fn train_head_takes_one_or_two_unrolled_steps_and_names_the_flag_otherwise() {
    let e = HeadCli::try_parse_from(["train-head", "--unroll", "3"])
        .err()
        .expect("--unroll 3 is refused")
        .to_string();
    assert!(e.contains("--unroll") && e.contains("1..=2"), "{e}");
    let default = HeadCli::try_parse_from(["train-head"]).unwrap();
    assert_eq!(
        default.a.unroll, 1,
        "one step by default, as the shipped head"
    );
}
