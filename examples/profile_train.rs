//! Times the parts of one training step (forward, backward, optimizer).
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use gpt_serve::config::Config;
use gpt_serve::model::{init_weights, Gpt};
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    let mut cfg = Config::preset("small")?;
    if let Some(e) = std::env::args().nth(1) {
        if e == "final" {
            cfg.exits = vec![gpt_serve::config::Exit {
                block: 6,
                weight: 1.0,
            }];
        }
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
    let (b, t) = (8, 128);
    let steps = 5;
    let x: Vec<u32> = (0..b * t).map(|i| (i * 7 % 8192) as u32).collect();
    let x = Tensor::from_vec(x, (b, t), &dev)?;
    let mut total = 0.0;
    for i in 0..steps {
        let t0 = Instant::now();
        let l = model.loss(&x, &x)?;
        let _ = l.total.to_scalar::<f32>()?;
        let t1 = Instant::now();
        let g = l.total.backward()?;
        let t2 = Instant::now();
        opt.step(&g, 1e-4)?;
        let t3 = Instant::now();
        println!(
            "fwd {:.3}s bwd {:.3}s opt {:.3}s",
            (t1 - t0).as_secs_f64(),
            (t2 - t1).as_secs_f64(),
            (t3 - t2).as_secs_f64()
        );
        if i >= 1 {
            total += (t3 - t0).as_secs_f64();
        }
    }
    println!(
        "{{\"exits\": {}, \"tok_s\": {:.1}}}",
        cfg.exits.len(),
        (steps - 1) as f64 * (b * t) as f64 / total
    );
    Ok(())
}
