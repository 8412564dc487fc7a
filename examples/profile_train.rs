//! Times the parts of a training step (forward, backward, optimizer) on
//! synthetic tokens, for one preset and exit loss; prints one JSON line.
//! `scripts/train-speed.sh` runs it beside PyTorch on the same config.
//!
//! cargo run --release --example profile_train -- [--preset small]
//!     [--exits full|final] [--exit-frac F [--exit-candidates K]] [--exit-every K]
//!     [--exit-head tied|own] [--batch 8] [--context 128] [--steps 6]
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use clap::Parser;
use gpt_serve::model::config::{Config, Exit, ExitHead};
use gpt_serve::model::gpt::{init_weights, Gpt};
use gpt_serve::train::losses::{LossOptions, MultiExitLoss};
use std::time::Instant;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "small")]
    preset: String,
    /// `full`: the preset's exits; `final`: the final head only.
    #[arg(long, default_value = "full")]
    exits: String,
    /// `own`: each non-final exit has its own lm_head (the mission's layout).
    #[arg(long)]
    exit_head: Option<String>,
    #[arg(long, default_value_t = 0)]
    exit_candidates: usize,
    #[arg(long, default_value_t = 1.0)]
    exit_frac: f64,
    /// The exit losses on every k-th timed step only (time a multiple of
    /// k steps for their mean; `train` defaults to 8).
    #[arg(long, default_value_t = 1)]
    exit_every: usize,
    #[arg(long, default_value_t = 8)]
    batch: usize,
    #[arg(long, default_value_t = 128)]
    context: usize,
    /// Steps timed after one warm-up step.
    #[arg(long, default_value_t = 5)]
    steps: usize,
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let dev = Device::Cpu;
    let mut cfg = Config::preset(&a.preset)?;
    if a.exits == "final" {
        cfg.exits = vec![Exit {
            block: cfg.n_layer,
            weight: 1.0,
        }];
    }
    if a.exit_head.as_deref() == Some("own") {
        cfg.exit_head = ExitHead::Own;
    }
    let varmap = VarMap::new();
    let mut vars = vec![];
    for (n, t) in init_weights(&cfg, 1, &dev)? {
        let v = Var::from_tensor(&t)?;
        varmap.data().lock().unwrap().insert(n.clone(), v.clone());
        vars.push((n, v));
    }
    let model = Gpt::new(
        &cfg,
        VarBuilder::from_varmap(&varmap, DType::F32, &dev),
        false,
    )?;
    let mut opt = gpt_serve::train::optim::AdamW::new(vars, Default::default())?;
    let (b, t) = (a.batch, a.context.min(cfg.block_size));
    let v = cfg.vocab_size;
    let x: Vec<u32> = (0..b * t).map(|i| (i * 7 % v) as u32).collect();
    let y: Vec<u32> = (0..b * t).map(|i| (i * 13 % v) as u32).collect();
    let (x, y) = (
        Tensor::from_vec(x, (b, t), &dev)?,
        Tensor::from_vec(y, (b, t), &dev)?,
    );
    let n_rows = ((t as f64 * a.exit_frac).round() as usize).clamp(1, t);
    let rows: Vec<u32> = (0..n_rows).map(|i| (i * t / n_rows) as u32).collect();
    let lopt = LossOptions {
        exit_rows: (n_rows < t)
            .then(|| Tensor::from_vec(rows, n_rows, &dev))
            .transpose()?,
        exit_scale: t as f64 / n_rows as f64,
        exit_candidates: a.exit_candidates,
        ..Default::default()
    };
    let mut phases = [0f64; 3];
    for i in 0..=a.steps {
        let t0 = Instant::now();
        let lopt = LossOptions {
            exits: i % a.exit_every.max(1) == 0,
            exit_rows: lopt.exit_rows.clone(),
            ..lopt
        };
        let l = model.loss_with(&x, &y, &lopt)?;
        let _ = l.total.to_scalar::<f32>()?;
        let t1 = Instant::now();
        let g = l.total.backward()?;
        let t2 = Instant::now();
        opt.step(&g, 1e-4)?;
        let t3 = Instant::now();
        if i >= 1 {
            phases[0] += (t1 - t0).as_secs_f64();
            phases[1] += (t2 - t1).as_secs_f64();
            phases[2] += (t3 - t2).as_secs_f64();
        }
    }
    let n = a.steps as f64;
    let total: f64 = phases.iter().sum();
    println!(
        "{{\"preset\": \"{}\", \"exits\": {}, \"exit_head\": \"{:?}\", \"exit_candidates\": {}, \"exit_frac\": {}, \"exit_every\": {}, \"batch\": [{b}, {t}], \"tok_s\": {:.1}, \"step_s\": {:.4}, \"fwd_s\": {:.4}, \"bwd_s\": {:.4}, \"opt_s\": {:.4}}}",
        a.preset,
        cfg.exits.len(),
        cfg.exit_head,
        a.exit_candidates,
        a.exit_frac,
        a.exit_every,
        n * (b * t) as f64 / total,
        total / n,
        phases[0] / n,
        phases[1] / n,
        phases[2] / n,
    );
    Ok(())
}
