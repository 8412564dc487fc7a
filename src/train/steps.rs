//! The trainer's loop: optimizer steps on seeded batches until the budget
//! is spent (or `--stop-after`), each logged to `metrics.jsonl`, with
//! validation every `--eval-every` steps and snapshots every
//! `--save-every`; then the end of the run (plot, final evaluation, exit
//! agreement, training metadata and the drafter).

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use candle_core::Tensor;
use indicatif::ProgressBar;

use super::losses::{LossOptions, Losses, MultiExitLoss};
use super::options::TrainOptions;
use super::setup::Run;
use super::{data, eval, label, report, snapshot, TrainSummary, TrainerState, METRICS_FILE};
use crate::checkpoint::{self, CheckpointConfig, FORMAT_VERSION};

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
pub(super) fn train_loop(r: &mut Run, state: &mut TrainerState) -> anyhow::Result<f32> {
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
pub(super) fn finish(
    r: &Run,
    state: &TrainerState,
    last_loss: f32,
) -> anyhow::Result<TrainSummary> {
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
        weights: None,
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
}
