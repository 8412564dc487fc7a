//! `gpt-serve train`: corpus -> tokenizer -> multi-exit GPT -> checkpoint
//! (-> tree drafter, see [`label`]).
//!
//! Deterministic given `--seed`: batch `s` depends only on (seed, s), so a
//! run resumed from its last checkpoint (`--resume`) replays exactly what an
//! uninterrupted run does. Snapshots hold weights, optimizer moments and
//! the trainer state (step, schedule state, elapsed time, budget), each set
//! whole or absent ([`snapshot`]); the newest weights are also published as
//! a servable checkpoint in `--out`.

pub mod data;
pub mod eval;
pub mod label;
pub mod optim;
pub mod report;
pub mod schedule;
pub mod snapshot;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use indicatif::ProgressBar;
use serde::{Deserialize, Serialize};

use crate::checkpoint::{self, CheckpointConfig, FORMAT_VERSION};
use crate::model::config::{Config, Dwa, Exit, ExitHead};
use crate::model::gpt::{init_weights, Gpt, LossOptions, Losses};
use crate::tokenizer::Tokenizer;
use schedule::{Schedule, ScheduleKind};
use snapshot::Saved;

pub const TRAINER_FILE: &str = "trainer.json";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const METRICS_FILE: &str = "metrics.jsonl";

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

fn parse_exits(s: &str, n_layer: usize) -> anyhow::Result<Vec<Exit>> {
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

fn exit_head(o: &TrainOptions) -> ExitHead {
    if o.exit_head == "own" {
        ExitHead::Own
    } else {
        ExitHead::Tied
    }
}

/// The config of an `--init-from` run: the checkpoint's, with `--exits`
/// (and `--exit-head`) replacing its exits when given.
fn init_config(o: &TrainOptions, dir: &Path) -> anyhow::Result<Config> {
    let mut c = checkpoint::load_config(dir)?.model;
    if let Some(e) = &o.exits {
        c.exits = parse_exits(e, c.n_layer)?;
        c.exit_head = exit_head(o);
        c.validate()?;
    }
    Ok(c)
}

/// `--freeze-backbone` trains exits of a given backbone: it needs one, and
/// an exit to train.
fn check_freeze(o: &TrainOptions, cfg: &Config) -> anyhow::Result<()> {
    if !o.freeze_backbone {
        return Ok(());
    }
    if o.init_from.is_none() {
        bail!("--freeze-backbone needs --init-from DIR (the trained or imported backbone)");
    }
    if cfg.exits.len() < 2 {
        bail!(
            "--freeze-backbone trains exit heads only, and the model has none before block {}: give --exits (e.g. {})",
            cfg.n_layer,
            crate::hf::import::exits_hint(cfg.n_layer)
        );
    }
    Ok(())
}

/// Whether `name` learns: everything, or with `--freeze-backbone` the exit
/// heads only.
fn trainable(o: &TrainOptions, name: &str) -> bool {
    !o.freeze_backbone || name.starts_with("exits.")
}

/// The final weights' dtype: `--save-dtype`, else the backbone's when it
/// is frozen, else f32. A frozen backbone is never rounded: it is saved in
/// its own dtype or in f32.
fn save_dtype(o: &TrainOptions) -> anyhow::Result<String> {
    let frozen = match &o.init_from {
        Some(dir) if o.freeze_backbone => Some(checkpoint::load_config(dir)?.dtype),
        _ => None,
    };
    match (&o.save_dtype, frozen) {
        (Some(d), Some(src)) if *d != src && d != "f32" => bail!(
            "--save-dtype {d} would round the frozen backbone, stored in {src}: use {src} or f32"
        ),
        (Some(d), _) => Ok(d.clone()),
        (None, Some(src)) => Ok(src),
        (None, None) => Ok("f32".into()),
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

fn check_options(o: &TrainOptions) -> anyhow::Result<()> {
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

fn build_tokenizer(
    o: &TrainOptions,
    docs_sample: impl FnOnce() -> anyhow::Result<String>,
) -> anyhow::Result<Tokenizer> {
    if let Some(dir) = &o.init_from {
        return Ok(Tokenizer::from_file(&dir.join(checkpoint::TOKENIZER_FILE))?);
    }
    Ok(match o.tokenizer.as_str() {
        "gpt2" => Tokenizer::gpt2(&o.gpt2_dir)?,
        "bpe" => {
            let sample = docs_sample()?;
            let vocab = o
                .vocab_size
                .unwrap_or(Config::preset(&o.preset)?.vocab_size);
            Tokenizer::train_bpe(sample.lines(), vocab)?
        }
        path => Tokenizer::from_file(Path::new(path))?,
    })
}

pub fn default_cache_dir() -> Option<PathBuf> {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .map(|d| d.join("gpt-serve"))
}

/// Checks the output directory can be written before spending time.
fn prepare_out(out: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(out)
        .with_context(|| format!("cannot create output directory {}", out.display()))?;
    let probe = out.join(".write-test");
    std::fs::write(&probe, b"")
        .with_context(|| format!("output directory {} is not writable", out.display()))?;
    let _ = std::fs::remove_file(probe);
    Ok(())
}

pub fn run(cli: TrainOptions) -> anyhow::Result<TrainSummary> {
    prepare_out(&cli.out)?;
    let (o, resumed) = resume_or_start(cli)?;
    let mut r = setup(o, resumed.as_ref())?;
    let mut state = initial_state(&mut r, resumed)?;
    let last_loss = train_loop(&mut r, &mut state)?;
    finish(&r, &state, last_loss)
}

/// The options this invocation runs with: the command line's, or with
/// `--resume` those stored in the newest complete snapshot (the command
/// line keeps `--out`, `--stop-after`, `--crash-at` and `--device`).
fn resume_or_start(cli: TrainOptions) -> anyhow::Result<(TrainOptions, Option<Saved>)> {
    if !cli.resume {
        return Ok((cli, None));
    }
    snapshot::remove_stale(&cli.out)?;
    let saved = snapshot::latest(&cli.out)?.with_context(|| {
        format!(
            "--resume: no complete snapshot in {} (nothing to resume; train without --resume to start over)",
            cli.out.join(snapshot::SNAPSHOTS_DIR).display()
        )
    })?;
    if saved.dir != cli.out {
        snapshot::publish(&saved.dir, &cli.out, None)?;
    }
    let o = TrainOptions {
        out: cli.out.clone(),
        resume: true,
        stop_after: cli.stop_after,
        crash_at: cli.crash_at,
        device: cli.device.clone(),
        ..saved.state.options.clone()
    };
    Ok((o, Some(saved)))
}

/// The fixed parts of a run: options, tokens, model and optimizer.
struct Run {
    o: TrainOptions,
    device: Device,
    cfg: Config,
    /// Sequence length of a batch row.
    t: usize,
    tokenizer: Tokenizer,
    train: Vec<u32>,
    val: Vec<u32>,
    varmap: VarMap,
    /// With `--freeze-backbone`: the backbone, constants (no gradients).
    frozen: Vec<(String, Tensor)>,
    model: Gpt,
    opt: optim::AdamW,
}

impl Run {
    fn tokens_per_step(&self) -> u64 {
        (self.o.batch_size * self.t) as u64
    }
}

/// Tokenizer, token streams, model config and initial weights.
fn setup(mut o: TrainOptions, resumed: Option<&Saved>) -> anyhow::Result<Run> {
    check_options(&o)?;
    let device = crate::model::device::parse(&o.device)?;
    let t_setup = Instant::now();
    let tokenizer = match resumed {
        Some(r) => Tokenizer::from_file(&r.dir.join(checkpoint::TOKENIZER_FILE))?,
        None => build_tokenizer(&o, || tokenizer_sample(&o))?,
    };
    let (train, val) = token_splits(&o, &tokenizer)?;
    let cfg = match (resumed, &o.init_from) {
        (Some(r), _) => checkpoint::load_config(&r.dir)?.model,
        (None, Some(dir)) => init_config(&o, dir)?,
        (None, None) => model_config(&o, tokenizer.vocab_size())?,
    };
    check_freeze(&o, &cfg)?;
    if o.exit_candidates >= cfg.vocab_size {
        bail!(
            "--exit-candidates {} must be below the vocabulary size {}",
            o.exit_candidates,
            cfg.vocab_size
        );
    }
    o.save_dtype = Some(save_dtype(&o)?);
    let t = o.context.unwrap_or(cfg.block_size).min(cfg.block_size);
    o.context = Some(t);
    data::check_len("train", &train, t)?;
    data::check_len("val", &val, t)?;
    eprintln!(
        "data: {} train / {} val tokens, vocab {}, setup {:.1}s; model {} params",
        train.len(),
        val.len(),
        tokenizer.vocab_size(),
        t_setup.elapsed().as_secs_f64(),
        cfg.n_params()
    );
    let initial = initial_weights(&o, &cfg, resumed, &device)?;
    let Built {
        varmap,
        frozen,
        model,
        opt,
    } = build_model(&o, &cfg, initial, &device)?;
    Ok(Run {
        o,
        device,
        cfg,
        t,
        tokenizer,
        train,
        val,
        varmap,
        frozen,
        model,
        opt,
    })
}

/// The first `--tokenizer-sample-mb` of the training documents.
fn tokenizer_sample(o: &TrainOptions) -> anyhow::Result<String> {
    let mut s = String::new();
    for d in data::read_documents(&o.data)? {
        s.push_str(&d);
        if s.len() >= o.tokenizer_sample_mb << 20 {
            break;
        }
    }
    Ok(s)
}

/// Train and validation tokens: the `--val` files, or a seeded split by
/// document (the last 5% of the train tokens when it leaves none).
fn token_splits(o: &TrainOptions, tok: &Tokenizer) -> anyhow::Result<(Vec<u32>, Vec<u32>)> {
    if !o.val.is_empty() {
        let cache = o.cache_dir.clone().or_else(default_cache_dir);
        return Ok((
            data::load_tokens(&o.data, tok, cache.as_deref())?,
            data::load_tokens(&o.val, tok, cache.as_deref())?,
        ));
    }
    let docs = data::read_documents(&o.data)?;
    let (tr, va) = data::split_by_document(docs, 0.05, o.seed);
    let tr = data::encode_documents(tok, &tr)?;
    if va.is_empty() {
        let cut = tr.len() - tr.len() / 20;
        Ok((tr[..cut].to_vec(), tr[cut..].to_vec()))
    } else {
        Ok((tr, data::encode_documents(tok, &va)?))
    }
}

/// The starting weights: the resumed run's, `--init-from`'s (with new
/// exits started by [`new_exit`]), or seeded random ones.
fn initial_weights(
    o: &TrainOptions,
    cfg: &Config,
    resumed: Option<&Saved>,
    device: &Device,
) -> anyhow::Result<Vec<(String, Tensor)>> {
    let dir = match (resumed, &o.init_from) {
        (Some(r), _) => &r.dir,
        (None, Some(dir)) => dir,
        (None, None) => return Ok(init_weights(cfg, o.seed, device)?),
    };
    let path = dir.join(checkpoint::WEIGHTS_FILE);
    let w = checkpoint::load_tensors(&path, device)?;
    crate::model::gpt::param_shapes(cfg)
        .into_iter()
        .map(|(n, _)| {
            let t = w.get(&n).cloned().or_else(|| new_exit(&n, &w));
            let t = t.with_context(|| {
                format!(
                    "{} lacks tensor `{n}`: it holds another model config",
                    path.display()
                )
            })?;
            Ok((n, t))
        })
        .collect()
}

/// The start of an exit the checkpoint lacks: its LayerNorm a copy of
/// `ln_f`, its own head a copy of `wte` (the final head's projection), so
/// it begins as the final head applied early.
fn new_exit(name: &str, w: &HashMap<String, Tensor>) -> Option<Tensor> {
    let rest = name.strip_prefix("exits.")?;
    let (_, param) = rest.split_once('.')?;
    let source = match param {
        "ln.weight" => "ln_f.weight",
        "ln.bias" => "ln_f.bias",
        "lm_head.weight" => "wte.weight",
        _ => return None,
    };
    w.get(source).cloned()
}

/// What [`build_model`] makes.
struct Built {
    varmap: VarMap,
    frozen: Vec<(String, Tensor)>,
    model: Gpt,
    opt: optim::AdamW,
}

/// Variables holding the trainable part of `initial`, the frozen rest,
/// the model that reads both, and AdamW over the variables.
fn build_model(
    o: &TrainOptions,
    cfg: &Config,
    initial: Vec<(String, Tensor)>,
    device: &Device,
) -> anyhow::Result<Built> {
    let varmap = VarMap::new();
    let mut vars = Vec::new();
    let mut frozen = Vec::new();
    let mut all = HashMap::new();
    {
        let mut data = varmap.data().lock().expect("varmap lock");
        for (name, t) in initial {
            if !trainable(o, &name) {
                all.insert(name.clone(), t.clone());
                frozen.push((name, t));
                continue;
            }
            let v = Var::from_tensor(&t)?;
            all.insert(name.clone(), v.as_tensor().clone());
            data.insert(name.clone(), v.clone());
            vars.push((name, v));
        }
    }
    let model = Gpt::new(
        cfg,
        VarBuilder::from_tensors(all, DType::F32, device),
        false,
    )?;
    let opt = optim::AdamW::new(
        vars,
        optim::AdamWConfig {
            weight_decay: o.weight_decay,
            grad_clip: o.grad_clip,
            hypergradient: matches!(o.schedule, ScheduleKind::Hyper | ScheduleKind::HyperSpeed),
            ..Default::default()
        },
    )?;
    Ok(Built {
        varmap,
        frozen,
        model,
        opt,
    })
}

/// The resumed trainer state (with its optimizer moments loaded and the
/// metrics log cut back to its step), or a fresh one at step 0.
fn initial_state(r: &mut Run, resumed: Option<Saved>) -> anyhow::Result<TrainerState> {
    let log = r.o.out.join(METRICS_FILE);
    if let Some(Saved { state, dir }) = resumed {
        let moments = checkpoint::load_tensors(&dir.join(OPTIMIZER_FILE), &r.device)?;
        r.opt.load_state(&moments, state.step)?;
        report::truncate_log(&log, state.step)?;
        eprintln!("resuming at step {} of {}", state.step, state.total_steps);
        return Ok(state);
    }
    let o = &r.o;
    let total = o
        .steps
        .or(o.tokens.map(|n| n.div_ceil(r.tokens_per_step())))
        .unwrap_or(u64::MAX);
    let mut schedule = Schedule::new(o.schedule, o.lr, o.warmup, total);
    schedule.hyper_beta = o.hyper_beta;
    let _ = std::fs::remove_file(log);
    snapshot::clear(&o.out)?;
    Ok(TrainerState {
        step: 0,
        total_steps: total,
        tokens_seen: 0,
        elapsed_secs: 0.0,
        schedule,
        options: o.clone(),
    })
}

/// Clocks of this invocation (a resumed run starts them again).
struct Pace {
    start: Instant,
    /// Training seconds before this invocation.
    elapsed0: f64,
    steps: u64,
    /// Seconds into this invocation when its 5th step ended.
    warm_mark: f64,
    /// Start and step count of the window `tok/s` is measured over.
    window: (Instant, u64),
}

impl Pace {
    fn new(elapsed0: f64) -> Self {
        Pace {
            start: Instant::now(),
            elapsed0,
            steps: 0,
            warm_mark: 0.0,
            window: (Instant::now(), 0),
        }
    }

    fn tokens_per_sec(&self, tokens_per_step: u64) -> f64 {
        self.window.1 as f64 * tokens_per_step as f64 / self.window.0.elapsed().as_secs_f64()
    }
}

/// Steps until the budget is spent or `--stop-after`; logs, evaluates and
/// saves along the way. Returns the last training loss of the final exit.
fn train_loop(r: &mut Run, state: &mut TrainerState) -> anyhow::Result<f32> {
    let log_path = r.o.out.join(METRICS_FILE);
    let pb = report::progress(state.total_steps, state.step);
    let mut pace = Pace::new(state.elapsed_secs);
    let mut last_loss = f32::NAN;
    while state.step < state.total_steps {
        let s = train_step(r, state)?;
        last_loss = s.final_loss;
        state.step += 1;
        state.tokens_seen += r.tokens_per_step();
        state.elapsed_secs = pace.elapsed0 + pace.start.elapsed().as_secs_f64();
        pace.steps += 1;
        pace.window.1 += 1;
        fix_step_budget(&r.o, state, &mut pace, &pb);
        let tok_s = pace.tokens_per_sec(r.tokens_per_step());
        let rec = step_record(r, state, &s, tok_s, &pb)?;
        report::append_log(&log_path, &rec)?;
        if pace.window.1 >= 20 {
            pace.window = (Instant::now(), 0);
        }
        pb.set_position(state.step);
        pb.set_message(format!("loss {last_loss:.3} | {tok_s:.0} tok/s"));
        let last = state.step == state.total_steps;
        let stop_now = r.o.stop_after.is_some_and(|n| pace.steps >= n);
        if (r.o.save_every > 0 && state.step.is_multiple_of(r.o.save_every)) || last || stop_now {
            let final_dtype = r.o.save_dtype.as_deref().unwrap_or("f32");
            save_training(r, state, if last { final_dtype } else { "f32" })?;
        }
        if stop_now {
            break;
        }
    }
    pb.finish_and_clear();
    Ok(last_loss)
}

/// What one optimizer step reports.
struct StepOut {
    lr: f64,
    losses: Losses,
    grad_norm: f64,
    /// Whether the non-final exits were computed this step.
    exits_on: bool,
    final_loss: f32,
}

/// The factor on the exits' weights when they are scored on every
/// `every`-th step and on a share `scored` of the positions (their loss is
/// a mean over the scored rows). Compensated, the exits keep their share of
/// the loss summed over steps and positions; otherwise each scored row
/// pulls as hard as under the full loss. Candidates score the positions the
/// whole-vocabulary loss skips, so every position counts once.
fn exit_scale(every: u64, scored: f64, candidates: bool, compensate: bool) -> f64 {
    match (candidates, compensate) {
        (true, true) => every as f64,
        (true, false) => 1.0,
        (false, true) => every as f64 / scored,
        (false, false) => scored,
    }
}

/// One optimizer step on batch `state.step`; tells the schedule its cost.
fn train_step(r: &mut Run, state: &mut TrainerState) -> anyhow::Result<StepOut> {
    let (o, t, step) = (&r.o, r.t, state.step);
    let lr = state.schedule.lr(step);
    let (x, y) = data::batch(&r.train, o.batch_size, t, o.seed, step);
    let x = Tensor::from_vec(x, (o.batch_size, t), &r.device)?;
    let y = Tensor::from_vec(y, (o.batch_size, t), &r.device)?;
    let every = o.exit_every();
    let exits_on = step.is_multiple_of(every) && r.cfg.exits.len() > 1;
    let exit_rows = (o.exit_frac < 1.0).then(|| sample_rows(t, o.exit_frac, o.seed, step));
    let n_rows = exit_rows.as_ref().map_or(t, Vec::len);
    let candidates = o.exit_candidates;
    let scored = n_rows as f64 / t as f64;
    let exit_scale = exit_scale(every, scored, candidates > 0, o.exit_compensate);
    let lopt = LossOptions {
        exits: exits_on,
        exit_scale,
        exit_rows: exit_rows
            .map(|rows| Tensor::from_vec(rows, n_rows, &r.device))
            .transpose()?,
        exit_candidates: candidates,
        grads: true,
    };
    let losses = r.model.loss_with(&x, &y, &lopt)?;
    let grads = losses.total.backward()?;
    let stats = r.opt.step(&grads, lr)?;
    // Step cost in units of one block; each computed exit head ~ one block.
    let cheap_cost = r.cfg.n_layer as f64 + 1.0;
    // Each exit head costs ~ one block per position on the whole vocabulary,
    // (K + 1) / V of that on candidates.
    let per_head = match candidates {
        0 => scored,
        k => scored + (1.0 - scored) * (k + 1) as f64 / r.cfg.vocab_size as f64,
    };
    let n_heads = if exits_on {
        (r.cfg.exits.len() - 1) as f64 * per_head
    } else {
        0.0
    };
    state
        .schedule
        .observe(step, stats.hyper_cos, (cheap_cost + n_heads) / cheap_cost);
    let final_loss = losses
        .per_exit
        .last()
        .expect("final exit")
        .to_scalar::<f32>()?;
    Ok(StepOut {
        lr,
        losses,
        grad_norm: stats.grad_norm,
        exits_on,
        final_loss,
    })
}

/// Wall-clock budget: time steps 5..15 of this run (the first ones pay for
/// allocator and kernel warm-up, on a GPU for PTX compilation), then fix the
/// step count so that the time left at that pace fills it.
fn fix_step_budget(o: &TrainOptions, state: &mut TrainerState, pace: &mut Pace, pb: &ProgressBar) {
    let (Some(min), u64::MAX) = (o.minutes, state.total_steps) else {
        return;
    };
    let now = pace.start.elapsed().as_secs_f64();
    if pace.steps == 5 {
        pace.warm_mark = now;
    } else if pace.steps == 15 {
        let per_step = (now - pace.warm_mark) / 10.0;
        let left = (min * 60.0 - now).max(0.0);
        state.total_steps = state.step + ((left / per_step) as u64).max(1);
        state.schedule.total = state.total_steps;
        pb.set_length(state.total_steps);
    }
}

/// The metrics line of a step, with the validation loss of every exit
/// every `--eval-every` steps and at the end (also printed).
fn step_record(
    r: &Run,
    state: &TrainerState,
    s: &StepOut,
    tok_s: f64,
    pb: &ProgressBar,
) -> anyhow::Result<serde_json::Value> {
    let (o, cfg) = (&r.o, &r.cfg);
    let mut rec = serde_json::json!({
        "step": state.step, "lr": s.lr, "loss": s.losses.total.to_scalar::<f32>()?, "grad_norm": s.grad_norm,
        "tokens": state.tokens_seen, "elapsed": state.elapsed_secs, "tok_per_s": tok_s,
    });
    let computed = cfg
        .exits
        .iter()
        .enumerate()
        .filter(|(k, _)| s.exits_on || *k == cfg.exits.len() - 1)
        .map(|(_, e)| e);
    for (e, l) in computed.zip(&s.losses.per_exit) {
        rec[format!("train_loss_{}", e.block)] = serde_json::json!(l.to_scalar::<f32>()?);
    }
    let last = state.step == state.total_steps;
    if (o.eval_every > 0 && state.step.is_multiple_of(o.eval_every)) || last {
        let vl = eval::exit_losses(&r.model, &r.val, o.batch_size, r.t, o.eval_batches)?;
        for (e, l) in cfg.exits.iter().zip(&vl) {
            rec[format!("val_loss_{}", e.block)] = serde_json::json!(l);
        }
        let vl: Vec<String> = vl.iter().map(|l| format!("{l:.4}")).collect();
        pb.println(format!(
            "step {} | train {:.4} | val {} | lr {:.2e} | {:.0} tok/s",
            state.step,
            s.final_loss,
            vl.join("/"),
            s.lr,
            tok_s
        ));
    }
    Ok(rec)
}

/// The plot, the final evaluation and, when the budget is spent, the
/// training metadata and the drafter.
fn finish(r: &Run, state: &TrainerState, last_loss: f32) -> anyhow::Result<TrainSummary> {
    let (o, cfg) = (&r.o, &r.cfg);
    let _ = report::plot(&o.out.join(METRICS_FILE), &o.out.join("loss.png"), cfg);
    let val_loss = eval::exit_losses(&r.model, &r.val, o.batch_size, r.t, o.eval_batches)?;
    let summary = TrainSummary {
        steps: state.step,
        tokens: state.tokens_seen,
        elapsed_secs: state.elapsed_secs,
        tokens_per_sec: state.tokens_seen as f64 / state.elapsed_secs.max(1e-9),
        train_loss: last_loss,
        val_loss: cfg.exits.iter().map(|e| e.block).zip(val_loss).collect(),
        exit_agreement: agreement(r)?,
    };
    if state.step == state.total_steps {
        write_training_meta(&o.out, &summary)?;
        if o.drafter {
            label::train_drafter(&o.out, &o.drafter_opts, &r.val, &r.train)?;
        }
    }
    Ok(summary)
}

/// Validation windows scored for exit agreement at the end of a run.
const AGREEMENT_WINDOWS: usize = 16;

/// Each exit's top-1 agreement with the final head on validation windows
/// (on the serving path, f32), printed as it goes; empty without exits.
fn agreement(r: &Run) -> anyhow::Result<Vec<(usize, f32)>> {
    if r.cfg.exits.len() < 2 {
        return Ok(vec![]);
    }
    let weights: HashMap<String, Tensor> = all_weights(r).into_iter().collect();
    let fast = crate::model::cpu::CpuGpt::from_tensors(
        &r.cfg,
        &weights,
        crate::model::cpu::WeightDtype::F32,
    )?;
    let agree =
        crate::model::cpu::in_pool(|| eval::exit_agreement(&fast, &r.val, r.t, AGREEMENT_WINDOWS))?;
    let out: Vec<(usize, f32)> = r.cfg.exits.iter().map(|e| e.block).zip(agree).collect();
    for (block, a) in &out {
        eprintln!(
            "exit {block:>3}: top-1 agreement with the final head {:.1}%",
            100.0 * a
        );
    }
    Ok(out)
}

/// Positions for exit losses: a seeded sample of ceil(frac * t) of 0..t.
fn sample_rows(t: usize, frac: f64, seed: u64, step: u64) -> Vec<u32> {
    use rand::seq::index::sample;
    use rand::SeedableRng;
    let n = ((frac * t as f64).ceil() as usize).clamp(1, t);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed.wrapping_add(0xE717) ^ step);
    let mut rows: Vec<u32> = sample(&mut rng, t, n)
        .into_iter()
        .map(|i| i as u32)
        .collect();
    rows.sort_unstable();
    rows
}

/// Every weight of the run, trained and frozen, sorted by name.
fn all_weights(r: &Run) -> Vec<(String, Tensor)> {
    let data = r.varmap.data().lock().expect("varmap lock");
    let mut w: Vec<_> = data
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .chain(r.frozen.iter().cloned())
        .collect();
    w.sort_by(|a, b| a.0.cmp(&b.0));
    w
}

/// Saves weights (in `dtype`), optimizer moments, tokenizer, config and
/// trainer state as one snapshot, and publishes the weights in `--out`.
fn save_training(r: &Run, state: &TrainerState, dtype: &str) -> anyhow::Result<()> {
    let out = &r.o.out;
    let weights = all_weights(r);
    let prev_training = checkpoint::load_config(out)
        .map(|c| c.training)
        .unwrap_or_default();
    let config = CheckpointConfig {
        format_version: FORMAT_VERSION,
        model: r.cfg.clone(),
        dtype: dtype.to_string(),
        training: prev_training,
    };
    let snap = snapshot::Snapshot {
        config: &config,
        weights: &weights,
        optimizer: &r.opt.state()?,
        tokenizer: &r.tokenizer,
        state,
    };
    snapshot::save(out, &snap, r.o.crash_at)
}

fn write_training_meta(out: &Path, s: &TrainSummary) -> anyhow::Result<()> {
    let mut ck = checkpoint::load_config(out)?;
    let args: Vec<String> = std::env::args().collect();
    ck.training = serde_json::json!({
        "command": args.join(" "),
        "summary": s,
    });
    checkpoint::save_config(out, &ck)?;
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
    fn each_scored_row_keeps_its_weight_unless_compensated() {
        // 1/8 of the positions: a mean over them, times 1/8, is a sum over
        // them divided by all positions, as under the full loss.
        assert_eq!(exit_scale(1, 0.125, false, false), 0.125);
        assert_eq!(exit_scale(8, 1.0, false, false), 1.0);
        assert_eq!(exit_scale(8, 0.125, false, true), 64.0);
        assert_eq!(exit_scale(2, 0.125, true, true), 2.0);
        assert_eq!(exit_scale(2, 0.125, true, false), 1.0);
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
