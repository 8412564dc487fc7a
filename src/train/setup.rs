//! The fixed parts of a training run, built before the first step: the
//! options (or a resumed run's), tokenizer, train and validation tokens,
//! model config, starting weights (seeded, `--init-from`'s or resumed),
//! the model over them and its optimizer, and the trainer state to start
//! from.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};

use super::options::{check_options, exit_head, model_config, parse_exits, TrainOptions};
use super::schedule::{Schedule, ScheduleKind};
use super::snapshot::{self, Saved};
use super::{data, optim, report, TrainerState, METRICS_FILE, OPTIMIZER_FILE};
use crate::checkpoint;
use crate::model::config::Config;
use crate::model::gpt::{init_weights, Gpt};
use crate::model::params;
use crate::tokenizer::Tokenizer;

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
    !o.freeze_backbone || params::is_exit(name)
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
pub(super) fn prepare_out(out: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(out)
        .with_context(|| format!("cannot create output directory {}", out.display()))?;
    let probe = out.join(".write-test");
    std::fs::write(&probe, b"")
        .with_context(|| format!("output directory {} is not writable", out.display()))?;
    let _ = std::fs::remove_file(probe);
    Ok(())
}

/// The options this invocation runs with: the command line's, or with
/// `--resume` those stored in the newest complete snapshot (the command
/// line keeps `--out`, `--stop-after`, `--crash-at` and `--device`).
pub(super) fn resume_or_start(cli: TrainOptions) -> anyhow::Result<(TrainOptions, Option<Saved>)> {
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
pub(super) struct Run {
    pub(super) o: TrainOptions,
    pub(super) device: Device,
    pub(super) cfg: Config,
    /// Sequence length of a batch row.
    pub(super) t: usize,
    pub(super) tokenizer: Tokenizer,
    pub(super) train: Vec<u32>,
    pub(super) val: Vec<u32>,
    pub(super) varmap: VarMap,
    /// With `--freeze-backbone`: the backbone, constants (no gradients).
    pub(super) frozen: Vec<(String, Tensor)>,
    pub(super) model: Gpt,
    pub(super) opt: optim::AdamW,
}

impl Run {
    pub(super) fn tokens_per_step(&self) -> u64 {
        (self.o.batch_size * self.t) as u64
    }
}

/// Tokenizer, token streams, model config and initial weights.
pub(super) fn setup(mut o: TrainOptions, resumed: Option<&Saved>) -> anyhow::Result<Run> {
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
    params::param_shapes(cfg)
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
    w.get(&params::final_counterpart(name)?).cloned()
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
pub(super) fn initial_state(r: &mut Run, resumed: Option<Saved>) -> anyhow::Result<TrainerState> {
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
