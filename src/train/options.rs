//! What `gpt-serve train` takes (`TrainOptions`, stored in `trainer.json`
//! so `--resume` continues with the same options), the checks on it, and
//! the model config it names (a preset and overrides).

use std::path::PathBuf;

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

use super::label;
use super::schedule::ScheduleKind;
use super::snapshot;
use crate::model::config::{Config, Dwa, Exit, ExitHead};

/// Everything `gpt-serve train` takes. Stored in `trainer.json`, so
/// `--resume` continues with the same options.
#[derive(clap::Args, Serialize, Deserialize, Clone, Debug)]
pub struct TrainOptions {
    /// Training text files (.txt or .gz).
    #[arg(required = true)]
    pub data: Vec<PathBuf>,
    /// Validation text files; without them, a seeded split by document.
    #[arg(long)]
    pub val: Vec<PathBuf>,
    /// Output checkpoint directory.
    #[arg(long, short)]
    pub out: PathBuf,
    /// Model preset: tiny, small (6 x 384, vocab 8192), gpt2 (12 x 768).
    #[arg(long, default_value = "small")]
    pub preset: String,
    #[arg(long)]
    pub n_layer: Option<usize>,
    #[arg(long)]
    pub n_head: Option<usize>,
    #[arg(long)]
    pub n_embd: Option<usize>,
    /// Context window.
    #[arg(long)]
    pub block_size: Option<usize>,
    /// Vocabulary size of a trained BPE (ignored with --tokenizer gpt2).
    #[arg(long)]
    pub vocab_size: Option<usize>,
    /// Linear/LayerNorm biases.
    #[arg(long)]
    pub bias: Option<bool>,
    /// Exits as BLOCK:WEIGHT,... (the last must be n_layer), or "final".
    #[arg(long)]
    pub exits: Option<String>,
    /// Projection of non-final exits: tied (to wte) or own.
    #[arg(long, value_parser = ["tied", "own"], default_value = "tied")]
    pub exit_head: String,
    /// DenseFormer DWA as DILATIONxPERIOD (e.g. 1x1, 2x2).
    #[arg(long)]
    pub dwa: Option<String>,
    /// x0 skip before each block with learned scalars.
    #[arg(long)]
    pub x0_skip: bool,
    /// Tokenizer: "bpe" (train on the corpus), "gpt2" (from --gpt2-dir), or a tokenizer.json.
    #[arg(long, default_value = "bpe")]
    pub tokenizer: String,
    #[arg(long, default_value = "../shared/data/tokenizer-gpt2")]
    pub gpt2_dir: PathBuf,
    /// Megabytes of training text the BPE learns from.
    #[arg(long, default_value_t = 8)]
    pub tokenizer_sample_mb: usize,
    /// Budget: optimizer steps.
    #[arg(long)]
    pub steps: Option<u64>,
    /// Budget: training tokens.
    #[arg(long)]
    pub tokens: Option<u64>,
    /// Budget: wall-clock minutes (the step count is fixed after warm steps).
    #[arg(long)]
    pub minutes: Option<f64>,
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Sequence length of a batch row (default: block_size).
    #[arg(long)]
    pub context: Option<usize>,
    /// Peak learning rate.
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    #[arg(long, value_enum, default_value = "cosine")]
    pub schedule: ScheduleKind,
    #[arg(long, default_value_t = 50)]
    pub warmup: u64,
    #[arg(long, default_value_t = 0.1)]
    pub weight_decay: f64,
    #[arg(long, default_value_t = 1.0)]
    pub grad_clip: f64,
    /// Hypergradient step size of the hyper schedules.
    #[arg(long, default_value_t = 0.02)]
    pub hyper_beta: f64,
    /// Compute the non-final exit losses on every k-th step only [default:
    /// 8, or 1 with --freeze-backbone]. At `small` and equal tokens, every
    /// 8th step matched the full exit loss's final val loss and agreement;
    /// every 12th lost 1.5-2.8 points of agreement (docs/benchmarks.md,
    /// "Exit losses").
    #[arg(long)]
    pub exit_every: Option<u64>,
    /// Fraction of positions where non-final exit losses are scored.
    #[arg(long, default_value_t = 1.0)]
    pub exit_frac: f64,
    /// Scale the exit weights by k (--exit-every) and 1 / frac
    /// (--exit-frac), so the exits keep their share of the loss summed over
    /// steps and positions. Off, each scored step and position pulls as
    /// hard as under the full exit loss: compensating measured +0.11 to
    /// +0.49 nats of final val loss at `small` (the exits' gradient,
    /// concentrated, dominates the clipped norm).
    #[arg(long)]
    #[serde(default = "runs_before_the_flag_compensated")]
    pub exit_compensate: bool,
    /// Experimental, hidden: with --exit-frac below 1, score the non-final
    /// exits at the other positions on the target and the final head's best
    /// K other tokens (0: those positions are not scored). Measured so far
    /// it lets tokens outside the candidates take the exits' argmax
    /// (docs/benchmarks.md, "Exit losses").
    #[arg(long, default_value_t = 0, hide = true)]
    pub exit_candidates: usize,
    #[arg(long, default_value_t = 1337)]
    pub seed: u64,
    /// Evaluate every N steps (0: only at the end).
    #[arg(long, default_value_t = 100)]
    pub eval_every: u64,
    /// Validation batches per evaluation.
    #[arg(long, default_value_t = 8)]
    pub eval_batches: u64,
    /// Save a checkpoint every N steps (0: only at the end).
    #[arg(long, default_value_t = 200)]
    pub save_every: u64,
    /// Start from the weights of an existing checkpoint (fine-tuning). With
    /// --exits, the exits are replaced: new exit LayerNorms start as copies
    /// of ln_f, own heads as copies of wte.
    #[arg(long)]
    pub init_from: Option<PathBuf>,
    /// Train only the exit heads (exit LayerNorms, own projections): every
    /// block, the embeddings and the final head stay bitwise unchanged.
    /// Needs --init-from and --exits with an exit before the last block.
    #[arg(long)]
    #[serde(default)]
    pub freeze_backbone: bool,
    /// Continue the run in --out from its last checkpoint (stored options win).
    #[arg(long)]
    pub resume: bool,
    /// Storage dtype of the final weights: f32, f16 or bf16 (default: f32,
    /// or with --freeze-backbone the --init-from checkpoint's, so the
    /// backbone keeps its stored bits).
    #[arg(long, value_parser = ["f32", "f16", "bf16"])]
    #[serde(default)]
    pub save_dtype: Option<String>,
    /// Token cache directory.
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// Train the tree drafter after the model.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub drafter: bool,
    #[command(flatten)]
    pub drafter_opts: label::DrafterOptions,
    /// Stop after this many steps of this invocation (for tests of resume).
    #[arg(long, hide = true)]
    pub stop_after: Option<u64>,
    /// Make the first save stop at this point, as a kill would (for tests
    /// of crash safety).
    #[arg(long, value_enum, hide = true)]
    #[serde(skip)]
    pub crash_at: Option<snapshot::SavePoint>,
    /// Device: cpu, or cuda[:N] (builds with the `cuda` feature). A resumed
    /// run may move to another device.
    #[arg(long, default_value = "cpu")]
    #[serde(default = "default_device")]
    pub device: String,
}

fn default_device() -> String {
    "cpu".into()
}

pub(super) fn parse_exits(s: &str, n_layer: usize) -> anyhow::Result<Vec<Exit>> {
    if s == "final" {
        return Ok(vec![Exit {
            block: n_layer,
            weight: 1.0,
        }]);
    }
    s.split(',')
        .map(|p| {
            let (b, w) = p
                .split_once(':')
                .with_context(|| format!("--exits entry `{p}` is not BLOCK:WEIGHT"))?;
            Ok(Exit {
                block: b
                    .trim()
                    .parse()
                    .with_context(|| format!("--exits block `{b}` is not a number"))?,
                weight: w
                    .trim()
                    .parse()
                    .with_context(|| format!("--exits weight `{w}` is not a number"))?,
            })
        })
        .collect()
}

/// The model config from a preset and overrides.
pub fn model_config(o: &TrainOptions, vocab_size: usize) -> anyhow::Result<Config> {
    let mut c = Config::preset(&o.preset)?;
    let default_exits = o.n_layer.is_some_and(|n| n != c.n_layer);
    c.n_layer = o.n_layer.unwrap_or(c.n_layer);
    c.n_head = o.n_head.unwrap_or(c.n_head);
    c.n_embd = o.n_embd.unwrap_or(c.n_embd);
    c.block_size = o.block_size.unwrap_or(c.block_size);
    c.bias = o.bias.unwrap_or(c.bias);
    c.vocab_size = vocab_size;
    if default_exits {
        c.exits = crate::model::config::default_exits(c.n_layer);
    }
    if let Some(e) = &o.exits {
        c.exits = parse_exits(e, c.n_layer)?;
    }
    c.exit_head = exit_head(o);
    if let Some(d) = &o.dwa {
        let (a, b) = d
            .split_once('x')
            .with_context(|| format!("--dwa `{d}` is not DILATIONxPERIOD"))?;
        c.dwa = Some(Dwa {
            dilation: a.parse().with_context(|| format!("--dwa dilation `{a}`"))?,
            period: b.parse().with_context(|| format!("--dwa period `{b}`"))?,
        });
    }
    c.x0_skip = o.x0_skip;
    c.validate()?;
    Ok(c)
}

pub(super) fn exit_head(o: &TrainOptions) -> ExitHead {
    if o.exit_head == "own" {
        ExitHead::Own
    } else {
        ExitHead::Tied
    }
}

/// `--exit-every` when not given (every step when the exits are all that
/// trains). The exits then cost ~4% of a step at `small` and ~7% at `gpt2`
/// with own heads; every 12th step, under 5% at `gpt2`, lost agreement at
/// `small` (docs/benchmarks.md, "Exit losses").
pub const DEFAULT_EXIT_EVERY: u64 = 8;

/// Runs saved before `--exit-compensate` existed always compensated.
fn runs_before_the_flag_compensated() -> bool {
    true
}

impl TrainOptions {
    /// The steps between exit losses: `--exit-every`, else every step with
    /// `--freeze-backbone`, else [`DEFAULT_EXIT_EVERY`].
    pub fn exit_every(&self) -> u64 {
        match (self.exit_every, self.freeze_backbone) {
            (Some(k), _) => k,
            (None, true) => 1,
            (None, false) => DEFAULT_EXIT_EVERY,
        }
    }
}

pub(super) fn check_options(o: &TrainOptions) -> anyhow::Result<()> {
    if o.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    if !(o.lr > 0.0 && o.lr < 1.0) {
        bail!("--lr must be in (0, 1), got {}", o.lr);
    }
    match o.exit_every {
        Some(0) => bail!("--exit-every must be at least 1"),
        Some(k) if k > 1 && o.freeze_backbone => bail!(
            "--exit-every {k} skips the exit losses on {} of {k} steps, and with \
             --freeze-backbone the exits are all that trains: give 1 or leave it out",
            k - 1
        ),
        _ => {}
    }
    if !(o.exit_frac > 0.0 && o.exit_frac <= 1.0) {
        bail!("--exit-frac must be in (0, 1], got {}", o.exit_frac);
    }
    if o.exit_candidates > 0 && o.exit_frac >= 1.0 {
        bail!(
            "--exit-candidates {} scores the positions --exit-frac leaves out: give --exit-frac \
             below 1 (alone, candidates let tokens outside them take the exits' argmax)",
            o.exit_candidates
        );
    }
    if o.steps.is_none() && o.tokens.is_none() && o.minutes.is_none() {
        bail!("give a budget: --steps, --tokens or --minutes");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        o: TrainOptions,
    }

    fn options(args: &[&str]) -> TrainOptions {
        let mut all = vec!["train", "corpus.txt", "--out", "out", "--steps", "1"];
        all.extend_from_slice(args);
        Cli::try_parse_from(all).expect("valid arguments").o
    }

    #[test]
    fn exits_train_every_eighth_step_unless_they_are_all_that_trains() {
        assert_eq!(options(&[]).exit_every(), DEFAULT_EXIT_EVERY);
        assert_eq!(options(&["--exit-every", "3"]).exit_every(), 3);
        let frozen = ["--freeze-backbone", "--init-from", "x"];
        assert_eq!(options(&frozen).exit_every(), 1);
        let o = options(&[&frozen[..], &["--exit-every", "4"]].concat());
        let err = check_options(&o).unwrap_err().to_string();
        assert!(
            err.contains("--exit-every 4 skips the exit losses on 3 of 4"),
            "{err}"
        );
    }

    #[test]
    fn exit_candidates_without_exit_frac_are_refused_with_a_reason() {
        let err = check_options(&options(&["--exit-candidates", "32"])).unwrap_err();
        assert!(
            err.to_string().contains("give --exit-frac below 1"),
            "{err}"
        );
        check_options(&options(&[
            "--exit-candidates",
            "32",
            "--exit-frac",
            "0.125",
        ]))
        .expect("candidates with a fraction of positions");
    }
}
