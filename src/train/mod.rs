//! `gpt-serve train`: corpus -> tokenizer -> multi-exit GPT -> checkpoint
//! (-> tree drafter, see [`label`]).
//!
//! Deterministic given `--seed`: batch `s` depends only on (seed, s), so a
//! run resumed from its last checkpoint (`--resume`) replays exactly what an
//! uninterrupted run does. Checkpoints hold weights, optimizer moments and
//! the trainer state (step, schedule state, elapsed time, budget).

pub mod data;
pub mod eval;
pub mod label;
pub mod optim;
pub mod report;
pub mod schedule;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::{DType, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use serde::{Deserialize, Serialize};

use crate::checkpoint::{self, CheckpointConfig, FORMAT_VERSION};
use crate::config::{Config, Dwa, Exit, ExitHead};
use crate::model::{init_weights, Gpt, LossOptions};
use crate::tokenizer::Tokenizer;
use schedule::{Schedule, ScheduleKind};

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
    /// Compute non-final exit losses every k-th step only (weights scaled by k).
    #[arg(long, default_value_t = 1)]
    pub exit_every: u64,
    /// Fraction of positions where non-final exit losses are scored (scaled by 1/frac).
    #[arg(long, default_value_t = 1.0)]
    pub exit_frac: f64,
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
    /// Start from the weights of an existing checkpoint (fine-tuning).
    #[arg(long)]
    pub init_from: Option<PathBuf>,
    /// Continue the run in --out from its last checkpoint (stored options win).
    #[arg(long)]
    pub resume: bool,
    /// Storage dtype of the final weights: f32 or f16.
    #[arg(long, value_parser = ["f32", "f16"], default_value = "f32")]
    pub save_dtype: String,
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
        c.exits = crate::config::default_exits(c.n_layer);
    }
    if let Some(e) = &o.exits {
        c.exits = parse_exits(e, c.n_layer)?;
    }
    c.exit_head = if o.exit_head == "own" {
        ExitHead::Own
    } else {
        ExitHead::Tied
    };
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

fn check_options(o: &TrainOptions) -> anyhow::Result<()> {
    if o.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    if !(o.lr > 0.0 && o.lr < 1.0) {
        bail!("--lr must be in (0, 1), got {}", o.lr);
    }
    if o.exit_every == 0 {
        bail!("--exit-every must be at least 1");
    }
    if !(o.exit_frac > 0.0 && o.exit_frac <= 1.0) {
        bail!("--exit-frac must be in (0, 1], got {}", o.exit_frac);
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
    let resumed: Option<TrainerState> = if cli.resume {
        let p = cli.out.join(TRAINER_FILE);
        let text = std::fs::read_to_string(&p).with_context(|| {
            format!(
                "--resume: no trainer state at {} (nothing to resume)",
                p.display()
            )
        })?;
        Some(
            serde_json::from_str(&text)
                .with_context(|| format!("--resume: {} is corrupt", p.display()))?,
        )
    } else {
        None
    };
    let mut o = match &resumed {
        Some(s) => TrainOptions {
            out: cli.out.clone(),
            resume: true,
            stop_after: cli.stop_after,
            device: cli.device.clone(),
            ..s.options.clone()
        },
        None => cli,
    };
    check_options(&o)?;
    let device = crate::device::parse(&o.device)?;
    let t_setup = Instant::now();

    // Tokenizer and token streams.
    let tokenizer = if resumed.is_some() {
        Tokenizer::from_file(&o.out.join(checkpoint::TOKENIZER_FILE))?
    } else {
        build_tokenizer(&o, || {
            let mut s = String::new();
            for d in data::read_documents(&o.data)? {
                s.push_str(&d);
                if s.len() >= o.tokenizer_sample_mb << 20 {
                    break;
                }
            }
            Ok(s)
        })?
    };
    let cache = o.cache_dir.clone().or_else(default_cache_dir);
    let (train, val) = if o.val.is_empty() {
        let docs = data::read_documents(&o.data)?;
        let (tr, va) = data::split_by_document(docs, 0.05, o.seed);
        let tr = data::encode_documents(&tokenizer, &tr)?;
        if va.is_empty() {
            let cut = tr.len() - tr.len() / 20;
            (tr[..cut].to_vec(), tr[cut..].to_vec())
        } else {
            (tr, data::encode_documents(&tokenizer, &va)?)
        }
    } else {
        (
            data::load_tokens(&o.data, &tokenizer, cache.as_deref())?,
            data::load_tokens(&o.val, &tokenizer, cache.as_deref())?,
        )
    };
    let cfg = match &o.init_from {
        Some(dir) => checkpoint::load_config(dir)?.model,
        None => model_config(&o, tokenizer.vocab_size())?,
    };
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

    // Model parameters.
    let varmap = VarMap::new();
    let initial: Vec<(String, Tensor)> = if resumed.is_some() {
        let w = checkpoint::load_tensors(&o.out.join(checkpoint::WEIGHTS_FILE), &device)?;
        crate::model::param_shapes(&cfg)
            .into_iter()
            .map(|(n, _)| {
                Ok((
                    n.clone(),
                    w.get(&n)
                        .with_context(|| format!("checkpoint lacks `{n}`"))?
                        .clone(),
                ))
            })
            .collect::<anyhow::Result<_>>()?
    } else if let Some(dir) = &o.init_from {
        let w = checkpoint::load_tensors(&dir.join(checkpoint::WEIGHTS_FILE), &device)?;
        crate::model::param_shapes(&cfg)
            .into_iter()
            .map(|(n, _)| {
                Ok((
                    n.clone(),
                    w.get(&n)
                        .with_context(|| format!("--init-from lacks `{n}`"))?
                        .clone(),
                ))
            })
            .collect::<anyhow::Result<_>>()?
    } else {
        init_weights(&cfg, o.seed, &device)?
    };
    let mut vars = Vec::new();
    {
        let mut data = varmap.data().lock().expect("varmap lock");
        for (name, t) in initial {
            let v = Var::from_tensor(&t)?;
            data.insert(name.clone(), v.clone());
            vars.push((name, v));
        }
    }
    let model = Gpt::new(
        &cfg,
        VarBuilder::from_varmap(&varmap, DType::F32, &device),
        false,
    )?;
    let mut opt = optim::AdamW::new(
        vars.clone(),
        optim::AdamWConfig {
            weight_decay: o.weight_decay,
            grad_clip: o.grad_clip,
            hypergradient: matches!(o.schedule, ScheduleKind::Hyper | ScheduleKind::HyperSpeed),
            ..Default::default()
        },
    )?;

    let tokens_per_step = (o.batch_size * t) as u64;
    let mut state = match resumed {
        Some(s) => {
            let st = checkpoint::load_tensors(&o.out.join(OPTIMIZER_FILE), &device)?;
            opt.load_state(&st, s.step)?;
            report::truncate_log(&o.out.join(METRICS_FILE), s.step)?;
            eprintln!("resuming at step {} of {}", s.step, s.total_steps);
            s
        }
        None => {
            let total = o
                .steps
                .or(o.tokens.map(|n| n.div_ceil(tokens_per_step)))
                .unwrap_or(u64::MAX);
            let mut sched = Schedule::new(o.schedule, o.lr, o.warmup, total);
            sched.hyper_beta = o.hyper_beta;
            let _ = std::fs::remove_file(o.out.join(METRICS_FILE));
            TrainerState {
                step: 0,
                total_steps: total,
                tokens_seen: 0,
                elapsed_secs: 0.0,
                schedule: sched,
                options: o.clone(),
            }
        }
    };

    let log_path = o.out.join(METRICS_FILE);
    let pb = report::progress(state.total_steps, state.step);
    let run_start = Instant::now();
    let elapsed0 = state.elapsed_secs;
    let cheap_cost = cfg.n_layer as f64 + 1.0;
    let mut last_loss = f32::NAN;
    let mut steps_this_run = 0u64;
    let mut warm_mark = 0f64;
    let mut window = (Instant::now(), 0u64);
    while state.step < state.total_steps {
        let step = state.step;
        let lr = state.schedule.lr(step);
        let (x, y) = data::batch(&train, o.batch_size, t, o.seed, step);
        let x = Tensor::from_vec(x, (o.batch_size, t), &device)?;
        let y = Tensor::from_vec(y, (o.batch_size, t), &device)?;
        let exits_on = step % o.exit_every == 0 && cfg.exits.len() > 1;
        let exit_rows = (o.exit_frac < 1.0).then(|| sample_rows(t, o.exit_frac, o.seed, step));
        let n_rows = exit_rows.as_ref().map_or(t, Vec::len);
        let lopt = LossOptions {
            exits: exits_on,
            exit_scale: o.exit_every as f64 * t as f64 / n_rows as f64,
            exit_rows: exit_rows
                .map(|r| Tensor::from_vec(r, n_rows, &device))
                .transpose()?,
        };
        let losses = model.loss_with(&x, &y, &lopt)?;
        let grads = losses.total.backward()?;
        let stats = opt.step(&grads, lr)?;
        // Step cost in units of one block; each computed exit head ~ one block.
        let n_heads = if exits_on {
            (cfg.exits.len() - 1) as f64 * n_rows as f64 / t as f64
        } else {
            0.0
        };
        state
            .schedule
            .observe(step, stats.hyper_cos, (cheap_cost + n_heads) / cheap_cost);
        last_loss = losses
            .per_exit
            .last()
            .expect("final exit")
            .to_scalar::<f32>()?;
        state.step += 1;
        state.tokens_seen += tokens_per_step;
        state.elapsed_secs = elapsed0 + run_start.elapsed().as_secs_f64();
        steps_this_run += 1;
        window.1 += 1;

        // Wall-clock budget: time steps 5..15 of this run (the first ones pay
        // for allocator and kernel warm-up, on a GPU for PTX compilation), then
        // fix the step count so that the time left at that pace fills it.
        if let (Some(min), u64::MAX) = (o.minutes, state.total_steps) {
            let now = run_start.elapsed().as_secs_f64();
            if steps_this_run == 5 {
                warm_mark = now;
            } else if steps_this_run == 15 {
                let per_step = (now - warm_mark) / 10.0;
                let left = (min * 60.0 - now).max(0.0);
                state.total_steps = state.step + ((left / per_step) as u64).max(1);
                state.schedule.total = state.total_steps;
                pb.set_length(state.total_steps);
            }
        }
        let tok_s = window.1 as f64 * tokens_per_step as f64 / window.0.elapsed().as_secs_f64();
        let mut rec = serde_json::json!({
            "step": state.step, "lr": lr, "loss": losses.total.to_scalar::<f32>()?, "grad_norm": stats.grad_norm,
            "tokens": state.tokens_seen, "elapsed": state.elapsed_secs, "tok_per_s": tok_s,
        });
        let computed: Vec<&Exit> = cfg
            .exits
            .iter()
            .enumerate()
            .filter(|(k, _)| exits_on || *k == cfg.exits.len() - 1)
            .map(|(_, e)| e)
            .collect();
        for (e, l) in computed.iter().zip(&losses.per_exit) {
            rec[format!("train_loss_{}", e.block)] = serde_json::json!(l.to_scalar::<f32>()?);
        }
        let last = state.step == state.total_steps;
        if (o.eval_every > 0 && state.step % o.eval_every == 0) || last {
            let vl = eval::exit_losses(&model, &val, o.batch_size, t, o.eval_batches)?;
            for (e, l) in cfg.exits.iter().zip(&vl) {
                rec[format!("val_loss_{}", e.block)] = serde_json::json!(l);
            }
            pb.println(format!(
                "step {} | train {:.4} | val {} | lr {:.2e} | {:.0} tok/s",
                state.step,
                last_loss,
                vl.iter()
                    .map(|l| format!("{l:.4}"))
                    .collect::<Vec<_>>()
                    .join("/"),
                lr,
                tok_s
            ));
        }
        report::append_log(&log_path, &rec)?;
        if window.1 >= 20 {
            window = (Instant::now(), 0);
        }
        pb.set_position(state.step);
        pb.set_message(format!("loss {last_loss:.3} | {tok_s:.0} tok/s"));
        let stop_now = o.stop_after.is_some_and(|n| steps_this_run >= n);
        if (o.save_every > 0 && state.step % o.save_every == 0) || last || stop_now {
            save_training(
                &o.out,
                &cfg,
                &varmap,
                &opt,
                &tokenizer,
                &state,
                if last { &o.save_dtype } else { "f32" },
            )?;
        }
        if stop_now {
            break;
        }
    }
    pb.finish_and_clear();
    let _ = report::plot(&log_path, &o.out.join("loss.png"), &cfg);
    let val_loss = eval::exit_losses(&model, &val, o.batch_size, t, o.eval_batches)?;
    let summary = TrainSummary {
        steps: state.step,
        tokens: state.tokens_seen,
        elapsed_secs: state.elapsed_secs,
        tokens_per_sec: state.tokens_seen as f64 / state.elapsed_secs.max(1e-9),
        train_loss: last_loss,
        val_loss: cfg.exits.iter().map(|e| e.block).zip(val_loss).collect(),
    };
    if state.step == state.total_steps {
        write_training_meta(&o.out, &summary)?;
        if o.drafter {
            label::train_drafter(&o.out, &o.drafter_opts, &val, &train)?;
        }
    }
    Ok(summary)
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

fn save_training(
    out: &Path,
    cfg: &Config,
    varmap: &VarMap,
    opt: &optim::AdamW,
    tok: &Tokenizer,
    state: &TrainerState,
    dtype: &str,
) -> anyhow::Result<()> {
    let weights: Vec<(String, Tensor)> = {
        let data = varmap.data().lock().expect("varmap lock");
        let mut w: Vec<_> = data
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect();
        w.sort_by(|a, b| a.0.cmp(&b.0));
        w
    };
    let prev_training = checkpoint::load_config(out)
        .map(|c| c.training)
        .unwrap_or_default();
    let ck = CheckpointConfig {
        format_version: FORMAT_VERSION,
        model: cfg.clone(),
        dtype: dtype.to_string(),
        training: prev_training,
    };
    // Optimizer and trainer state first: a crash between files leaves the
    // previous weights with newer state only if the trainer file is last.
    checkpoint::save_tensors(&out.join(OPTIMIZER_FILE), &opt.state(), DType::F32)?;
    checkpoint::save(out, &ck, &weights, tok)?;
    checkpoint::write_atomic(
        &out.join(TRAINER_FILE),
        serde_json::to_string_pretty(state)?.as_bytes(),
    )?;
    Ok(())
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
