//! `gpt-serve train`: corpus -> tokenizer -> multi-exit GPT -> checkpoint
//! (-> tree drafter, see [`label`]).
//!
//! Deterministic given `--seed`: batch `s` depends only on (seed, s), so a
//! run resumed from its last checkpoint (`--resume`) replays exactly what an
//! uninterrupted run does. Snapshots hold weights, optimizer moments and
//! the trainer state (step, schedule state, elapsed time, budget), each set
//! whole or absent ([`snapshot`]); the newest weights are also published as
//! a servable checkpoint in `--out`.
//!
//! A run reads top to bottom across three files: [`options`] (what the
//! command line asks for, checked), `setup` (tokenizer, tokens, model,
//! optimizer, the starting state) and `steps` (the loop of optimizer
//! steps, evaluations and saves, then the end of the run); [`losses`] is
//! what a step minimises.

pub mod data;
pub mod eval;
pub mod head;
pub mod head_calibrate;
pub mod label;
pub mod losses;
pub mod optim;
pub mod options;
pub mod report;
pub mod schedule;
mod setup;
pub mod snapshot;
mod steps;

use serde::{Deserialize, Serialize};

pub use options::{model_config, TrainOptions, DEFAULT_EXIT_EVERY};
pub use setup::default_cache_dir;

use schedule::Schedule;

pub const TRAINER_FILE: &str = "trainer.json";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const METRICS_FILE: &str = "metrics.jsonl";

/// Trainer state saved beside the weights.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct TrainerState {
    pub step: u64,
    pub total_steps: u64,
    pub tokens_seen: u64,
    pub elapsed_secs: f64,
    pub schedule: Schedule,
    pub options: TrainOptions,
}

/// What a finished run reports.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct TrainSummary {
    pub steps: u64,
    pub tokens: u64,
    pub elapsed_secs: f64,
    pub tokens_per_sec: f64,
    pub train_loss: f32,
    /// Validation loss of each exit (block, loss).
    pub val_loss: Vec<(usize, f32)>,
    /// Top-1 agreement of each exit with the final head on validation
    /// windows (block, share of positions), when the model has exits.
    #[serde(default)]
    pub exit_agreement: Vec<(usize, f32)>,
}

/// Trains as the options say; see the module doc for the parts.
pub fn run(cli: TrainOptions) -> anyhow::Result<TrainSummary> {
    setup::prepare_out(&cli.out)?;
    let (o, resumed) = setup::resume_or_start(cli)?;
    let mut r = setup::setup(o, resumed.as_ref())?;
    let mut state = setup::initial_state(&mut r, resumed)?;
    let last_loss = steps::train_loop(&mut r, &mut state)?;
    steps::finish(&r, &state, last_loss)
}
