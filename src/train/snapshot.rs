//! Training snapshots: every save is one whole set or nothing, so a kill at
//! any moment leaves a run that `--resume` continues exactly.
//!
//! ```text
//! OUT/snapshots/step-00000123/   model.safetensors, optimizer.safetensors,
//!                                config.json, tokenizer.json, trainer.json
//! OUT/model.safetensors, config.json, tokenizer.json
//!                                the newest weights, published for serving
//! ```
//! A save writes the set into `step-N.tmp/`, fsyncs every file and the
//! directory, then renames it to `step-N/` and fsyncs `snapshots/`: that
//! rename is the commit. Only then are older sets removed and the weights
//! published at OUT's top level (hard links, or copies, each renamed into
//! place). `--resume` takes the newest `step-N/` whose trainer.json says
//! step N, so it continues from the new set or the previous one, never from
//! a mix of the two; it publishes that set again, which repairs a publish
//! cut short.

use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context};
use candle_core::{DType, Tensor};

use super::{TrainerState, OPTIMIZER_FILE, TRAINER_FILE};
use crate::atomic_file::{rename_durably, sync_dir, sync_file, tmp_path};
use crate::checkpoint::{
    self, CheckpointConfig, CONFIG_FILE, DRAFTER_FILE, TOKENIZER_FILE, WEIGHTS_FILE,
};
use crate::tokenizer::Tokenizer;

pub const SNAPSHOTS_DIR: &str = "snapshots";

/// The files of a set, all required.
const SET_FILES: [&str; 5] = [
    WEIGHTS_FILE,
    OPTIMIZER_FILE,
    CONFIG_FILE,
    TOKENIZER_FILE,
    TRAINER_FILE,
];

/// The files published at OUT's top level, in publishing order.
const PUBLISHED: [&str; 3] = [WEIGHTS_FILE, TOKENIZER_FILE, CONFIG_FILE];

/// A point in a save, in order (`ValueEnum::value_variants` lists them).
/// `--crash-at` (a test hook) makes the save
/// stop right after it, leaving the disk as a kill there would.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum SavePoint {
    Optimizer,
    Weights,
    Tokenizer,
    Config,
    TrainerState,
    Commit,
    Prune,
    PublishWeights,
    PublishTokenizer,
    PublishConfig,
}

/// What one save holds.
pub struct Snapshot<'a> {
    pub config: &'a CheckpointConfig,
    pub weights: &'a [(String, Tensor)],
    pub optimizer: &'a [(String, Tensor)],
    pub tokenizer: &'a Tokenizer,
    pub state: &'a TrainerState,
}

/// A complete set on disk.
pub struct Saved {
    pub dir: PathBuf,
    pub state: TrainerState,
}

/// Saves `snap` as `OUT/snapshots/step-N/`, then removes older sets and
/// publishes its weights at OUT's top level.
pub fn save(out: &Path, snap: &Snapshot, crash_at: Option<SavePoint>) -> anyhow::Result<()> {
    remove_stale(out)?;
    let root = out.join(SNAPSHOTS_DIR);
    let name = format!("step-{:08}", snap.state.step);
    let dir = root.join(&name);
    if !root.exists() {
        // The first save creates `snapshots/`: its entry in OUT must be on
        // disk too, or a power cut could lose the whole set after the rename.
        std::fs::create_dir_all(&root).with_context(|| cannot_write(&root))?;
        sync_dir(out).with_context(|| cannot_write(out))?;
    }
    let tmp = tmp_path(&dir);
    std::fs::create_dir_all(&tmp).with_context(|| cannot_write(&tmp))?;
    write_set(&tmp, snap, crash_at)?;
    sync_dir(&tmp).with_context(|| cannot_write(&tmp))?;
    if dir.exists() {
        // A set of this step that failed its checks on resume.
        std::fs::remove_dir_all(&dir).with_context(|| cannot_write(&dir))?;
    }
    rename_durably(&tmp, &dir).with_context(|| cannot_write(&dir))?;
    reached(SavePoint::Commit, crash_at)?;
    remove_all_but(out, Some(&name))?;
    reached(SavePoint::Prune, crash_at)?;
    publish(&dir, out, crash_at)
}

/// Writes the files of a set into `dir`, trainer.json last.
fn write_set(dir: &Path, snap: &Snapshot, crash_at: Option<SavePoint>) -> anyhow::Result<()> {
    checkpoint::save_tensors(&dir.join(OPTIMIZER_FILE), snap.optimizer, DType::F32)?;
    reached(SavePoint::Optimizer, crash_at)?;
    let dtype = snap.config.storage_dtype();
    checkpoint::save_tensors(&dir.join(WEIGHTS_FILE), snap.weights, dtype)?;
    reached(SavePoint::Weights, crash_at)?;
    checkpoint::save_tokenizer(dir, snap.tokenizer)?;
    reached(SavePoint::Tokenizer, crash_at)?;
    checkpoint::save_config(dir, snap.config)?;
    reached(SavePoint::Config, crash_at)?;
    let state = serde_json::to_string_pretty(snap.state)?;
    checkpoint::write_atomic(&dir.join(TRAINER_FILE), state.as_bytes())?;
    reached(SavePoint::TrainerState, crash_at)
}

fn reached(point: SavePoint, crash_at: Option<SavePoint>) -> anyhow::Result<()> {
    if crash_at == Some(point) {
        bail!("--crash-at {point:?}: the save stops here, as a kill would");
    }
    Ok(())
}

/// Puts the weights, tokenizer and config of the set in `dir` at OUT's top
/// level, each file atomically (a hard link to the set's file, or a copy).
pub fn publish(dir: &Path, out: &Path, crash_at: Option<SavePoint>) -> anyhow::Result<()> {
    let points = [
        SavePoint::PublishWeights,
        SavePoint::PublishTokenizer,
        SavePoint::PublishConfig,
    ];
    for (file, point) in PUBLISHED.into_iter().zip(points) {
        let (from, to) = (dir.join(file), out.join(file));
        let tmp = tmp_path(&to);
        let _ = std::fs::remove_file(&tmp);
        if std::fs::hard_link(&from, &tmp).is_err() {
            std::fs::copy(&from, &tmp)
                .and_then(|_| sync_file(&tmp))
                .with_context(|| format!("cannot copy {} to {}", from.display(), tmp.display()))?;
        }
        rename_durably(&tmp, &to).with_context(|| cannot_write(&to))?;
        reached(point, crash_at)?;
    }
    Ok(())
}

/// The newest complete set in `out`, skipping (with a warning) any that
/// fails its checks. A run saved before snapshots existed (trainer.json
/// at OUT's top level, no `snapshots/`) is its own set.
pub fn latest(out: &Path) -> anyhow::Result<Option<Saved>> {
    let root = out.join(SNAPSHOTS_DIR);
    if !root.is_dir() {
        let legacy = out.join(TRAINER_FILE);
        if !legacy.exists() {
            return Ok(None);
        }
        let state = read_state(&legacy)?;
        return Ok(Some(Saved {
            dir: out.to_path_buf(),
            state,
        }));
    }
    let mut sets: Vec<(u64, PathBuf)> = std::fs::read_dir(&root)
        .with_context(|| format!("cannot list {}", root.display()))?
        .filter_map(|e| {
            let e = e.ok()?;
            let step = e
                .file_name()
                .to_str()?
                .strip_prefix("step-")?
                .parse()
                .ok()?;
            Some((step, e.path()))
        })
        .collect();
    sets.sort_by_key(|s| std::cmp::Reverse(s.0));
    for (step, dir) in sets {
        match check_set(&dir, step) {
            Ok(state) => return Ok(Some(Saved { dir, state })),
            Err(e) => eprintln!("warning: skipping snapshot {}: {e:#}", dir.display()),
        }
    }
    Ok(None)
}

/// The set in `dir` has every file and its trainer state is at `step`.
fn check_set(dir: &Path, step: u64) -> anyhow::Result<TrainerState> {
    for f in SET_FILES {
        ensure!(dir.join(f).is_file(), "{f} is missing");
    }
    let path = dir.join(TRAINER_FILE);
    let state = read_state(&path)?;
    ensure!(
        state.step == step,
        "{} is at step {}, the directory says step {step}",
        path.display(),
        state.step
    );
    Ok(state)
}

fn read_state(path: &Path) -> anyhow::Result<TrainerState> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| {
        format!(
            "{} is corrupt (delete its snapshot directory to resume from an older one)",
            path.display()
        )
    })
}

/// Removes what a killed save leaves behind: `snapshots/*.tmp` and the
/// temporaries of the files published at OUT's top level.
pub fn remove_stale(out: &Path) -> anyhow::Result<()> {
    let root = out.join(SNAPSHOTS_DIR);
    if let Ok(entries) = std::fs::read_dir(&root) {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().ends_with(".tmp") {
                remove(&e.path())?;
            }
        }
    }
    for f in PUBLISHED
        .iter()
        .chain(&[DRAFTER_FILE, OPTIMIZER_FILE, TRAINER_FILE])
    {
        let tmp = tmp_path(&out.join(f));
        if tmp.exists() {
            remove(&tmp)?;
        }
    }
    Ok(())
}

/// Removes every snapshot, and the trainer files of the layout before
/// snapshots: a fresh run in `out` starts clean.
pub fn clear(out: &Path) -> anyhow::Result<()> {
    remove_all_but(out, None)?;
    remove_stale(out)
}

/// Removes every entry of `snapshots/` but `keep`, and the top-level
/// trainer files of the layout before snapshots.
fn remove_all_but(out: &Path, keep: Option<&str>) -> anyhow::Result<()> {
    let root = out.join(SNAPSHOTS_DIR);
    if let Ok(entries) = std::fs::read_dir(&root) {
        for e in entries.flatten() {
            if keep.is_none_or(|k| e.file_name() != k) {
                remove(&e.path())?;
            }
        }
        sync_dir(&root).with_context(|| cannot_write(&root))?;
    }
    for f in [OPTIMIZER_FILE, TRAINER_FILE] {
        let p = out.join(f);
        if p.exists() {
            remove(&p)?;
        }
    }
    Ok(())
}

fn remove(path: &Path) -> anyhow::Result<()> {
    let r = if path.is_dir() {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    };
    r.with_context(|| {
        format!(
            "cannot remove {} (remove it by hand, or check permissions)",
            path.display()
        )
    })
}

fn cannot_write(path: &Path) -> String {
    format!(
        "cannot write {} (check that the directory is writable and has space; \
         the previous snapshot is kept)",
        path.display()
    )
}
