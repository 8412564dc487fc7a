//! `gpt-serve train-head`: trains the draft head (`model::draft_head`) of
//! a checkpoint on the train split. The model's final features are
//! computed once for `--seqs` random windows; the head then learns, from
//! the features at position t and the token at t + 1, the model's own
//! distribution at t + 1 (cross-entropy against the tied head's softmax:
//! distillation, so it learns the model, not the text). With `--unroll 2`
//! it also learns the step after, from its own guess of the features at
//! t + 1 and the token at t + 2, as a served chain's second draft is made:
//! a head trained on true features only drifts off them at depth 2 (HASS,
//! arXiv 2408.15766, trains the same way). That pays where chains are long
//! (cheap rows); on the 2-core CPU the served chains are one draft long
//! and it did not (docs/benchmarks.md), so the default is 1. The report
//! gives how often the head's Gumbel draw equals the model's on val
//! windows, at depth 1 and 2.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{Optimizer, VarBuilder, VarMap};

use crate::checkpoint;
use crate::model::draft_head::{self, HeadConfig, B1, B2, W1, W2};
use crate::model::gpt::Gpt;
use crate::sampling::Noise;
use crate::train::data::load_tokens;

#[derive(clap::Args, Debug)]
pub struct TrainHeadArgs {
    #[arg(long, default_value = "models/default")]
    pub model: PathBuf,
    /// Text to train on (the train split only).
    #[arg(long, default_value = "../shared/data/gutenberg/train.txt.gz")]
    pub data: PathBuf,
    /// Held-out text the report measures on.
    #[arg(long, default_value = "../shared/data/gutenberg/val.txt.gz")]
    pub val: PathBuf,
    /// Training windows (each the model's block_size tokens).
    #[arg(long, default_value_t = 2048)]
    pub seqs: usize,
    /// Optimizer steps (512 pairs each).
    #[arg(long, default_value_t = 3000)]
    pub steps: usize,
    /// Width of the head's hidden layer.
    #[arg(long, default_value_t = 768)]
    pub hidden: usize,
    /// Steps of its own chain the head is trained on: 1 (from the model's
    /// features only) or 2 (also from its own guess, as a chain's second
    /// draft: better second drafts, slightly worse first ones).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=2))]
    pub unroll: u8,
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    /// Seed of the head's starting weights (the windows are fixed): the
    /// same seed on the same data gives the same head.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Where the tokenized text is cached between runs.
    #[arg(long, default_value = "runs/cache")]
    pub cache_dir: PathBuf,
}

const BATCH: usize = 512;
const VAL_SEQS: usize = 64;

/// The model's final features at every position of `n` random windows of
/// `tokens` (seeded), and the windows' tokens.
fn features(gpt: &Gpt, tokens: &[u32], n: usize, seed: u64) -> anyhow::Result<(Tensor, Vec<u32>)> {
    let t = gpt.cfg.block_size.min(tokens.len().saturating_sub(1));
    anyhow::ensure!(t >= 2, "{} tokens are too few to train on", tokens.len());
    let mut rng = seed;
    let (mut fs, mut toks) = (Vec::new(), Vec::with_capacity(n * t));
    for chunk in 0..n.div_ceil(16) {
        let b = 16.min(n - chunk * 16);
        let mut idx = Vec::with_capacity(b * t);
        for _ in 0..b {
            rng = rng
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let off = (rng >> 33) as usize % (tokens.len() - t);
            idx.extend_from_slice(&tokens[off..off + t]);
        }
        let mut s = gpt.embed(&Tensor::from_vec(idx.clone(), (b, t), &Device::Cpu)?, 0)?;
        gpt.run_blocks(&mut s, gpt.cfg.n_layer, None)?;
        fs.push(gpt.exit_norm(gpt.cfg.exits.len() - 1, s.hidden())?);
        toks.extend(idx);
    }
    Ok((Tensor::cat(&fs, 0)?, toks))
}

/// Training pairs, flattened over windows: (features at t, embedding of
/// token t + 1) -> features at t + 1, and for the unrolled step the
/// embedding of token t + 2 -> features at t + 2.
struct Pairs {
    from: Tensor,
    emb: Tensor,
    to: Tensor,
    emb2: Tensor,
    to2: Tensor,
}

fn pairs(f: &Tensor, toks: &[u32], wte: &Tensor) -> anyhow::Result<Pairs> {
    let (n, t, c) = f.dims3()?;
    anyhow::ensure!(t >= 3, "windows of {t} tokens are too short for two steps");
    let rows = n * (t - 2);
    let shifted = |by: usize| -> anyhow::Result<(Tensor, Tensor)> {
        let next: Vec<u32> = (0..n)
            .flat_map(|i| toks[i * t + by..i * t + by + t - 2].to_vec())
            .collect();
        let emb = wte.embedding(&Tensor::from_vec(next, rows, &Device::Cpu)?)?;
        Ok((emb, f.narrow(1, by, t - 2)?.reshape((rows, c))?))
    };
    let ((emb, to), (emb2, to2)) = (shifted(1)?, shifted(2)?);
    Ok(Pairs {
        from: f.narrow(1, 0, t - 2)?.reshape((rows, c))?,
        emb,
        to,
        emb2,
        to2,
    })
}

struct Head {
    w1: candle_nn::Linear,
    w2: candle_nn::Linear,
}

impl Head {
    fn forward(&self, f: &Tensor, e: &Tensor) -> candle_core::Result<Tensor> {
        let z = self.w1.forward(&Tensor::cat(&[f, e], D::Minus1)?)?.gelu()?;
        f + self.w2.forward(&z)?
    }
}

/// Trains, measures and writes the head beside the checkpoint.
pub fn run(a: &TrainHeadArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        a.seqs > 0 && a.steps > 0,
        "--seqs and --steps must be positive"
    );
    anyhow::ensure!(
        a.hidden.is_multiple_of(32) && a.hidden > 0,
        "--hidden {} must be a positive multiple of 32",
        a.hidden
    );
    let dev = Device::Cpu;
    let ck = checkpoint::load(&a.model, &dev)?;
    let cfg = &ck.config.model;
    anyhow::ensure!(
        cfg.n_embd.is_multiple_of(32),
        "n_embd {} is not a multiple of 32 (the head is served as Q8_0)",
        cfg.n_embd
    );
    let gpt = Gpt::new(
        cfg,
        VarBuilder::from_tensors(ck.weights.clone(), DType::F32, &dev),
        true,
    )?;
    let wte = ck.weights[crate::model::params::WTE].to_dtype(DType::F32)?;
    let train = load_tokens(
        std::slice::from_ref(&a.data),
        &ck.tokenizer,
        Some(&a.cache_dir),
    )?;
    let val = load_tokens(
        std::slice::from_ref(&a.val),
        &ck.tokenizer,
        Some(&a.cache_dir),
    )?;
    let t0 = std::time::Instant::now();
    let (f, toks) = features(&gpt, &train, a.seqs, 1)?;
    let tr = pairs(&f, &toks, &wte)?;
    drop(f);
    let (vf, vtoks) = features(&gpt, &val, VAL_SEQS, 2)?;
    let va = pairs(&vf, &vtoks, &wte)?;
    eprintln!(
        "train-head: features of {} pairs in {:.0?}",
        tr.from.dim(0)?,
        t0.elapsed()
    );
    let c = cfg.n_embd;
    let vm = seeded_vars(c, a.hidden, a.seed)?;
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
    let head = Head {
        w1: candle_nn::linear(2 * c, a.hidden, vb.pp("w1"))?,
        w2: candle_nn::linear(a.hidden, c, vb.pp("w2"))?,
    };
    let loss = fit(&head, &vm, &tr, &wte, a)?;
    let [depth1, depth2] = measure(&head, &va, &wte)?;
    let report = serde_json::json!({
        "command": std::env::args().collect::<Vec<_>>().join(" "),
        "seqs": a.seqs, "steps": a.steps, "lr": a.lr, "unroll": a.unroll,
        "final_train_loss": loss,
        "val_draw_match": depth1,
        "val_draw_match_depth2": depth2,
    });
    eprintln!("train-head: {report}");
    save(a, &vm, c, report)?;
    calibrate(a, cfg.block_size);
    Ok(())
}

/// Calibrates the head just saved (`calibrate-head --write` on the same
/// texts, shortened to fit the model's window). A head whose drafts cannot
/// be fitted (all accepted or all rejected) stays uncalibrated: it drafts
/// by its running acceptance, and the reason is printed.
fn calibrate(a: &TrainHeadArgs, block_size: usize) {
    let prompt_len = 32.min(block_size / 4).max(1);
    let args = crate::train::head_calibrate::CalibrateHeadArgs {
        model: a.model.clone(),
        data: a.data.clone(),
        eval: vec![a.val.display().to_string()],
        temperatures: vec![0.8, 1.0],
        prompts: 150,
        prompt_len,
        new_tokens: 128.min(block_size - prompt_len),
        out: a.cache_dir.join("head-calibration.json"),
        write: true,
    };
    if let Err(e) = crate::train::head_calibrate::run(&args) {
        eprintln!("train-head: the head stays uncalibrated: {e:#}");
    }
}

/// The head's starting weights, from the distributions `candle_nn::linear`
/// draws from (Kaiming-normal weights, std sqrt(2 / fan_in); biases uniform
/// within 1/sqrt(fan_in)) but from `seed`: candle's own draw is unseeded,
/// and the same run then gave heads whose greedy second drafts matched the
/// model's 27% or 75% of the time.
fn seeded_vars(c: usize, hidden: usize, seed: u64) -> anyhow::Result<VarMap> {
    use rand::{Rng, SeedableRng};
    use rand_distr::Distribution;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let vm = VarMap::new();
    let mut vars = vm.data().lock().expect("a new var map is not poisoned");
    for (name, out, fan_in) in [("w1", hidden, 2 * c), ("w2", c, hidden)] {
        let normal = rand_distr::Normal::new(0.0, (2.0 / fan_in as f32).sqrt())?;
        let w: Vec<f32> = (0..out * fan_in).map(|_| normal.sample(&mut rng)).collect();
        let bound = 1.0 / (fan_in as f32).sqrt();
        let b: Vec<f32> = (0..out).map(|_| rng.random_range(-bound..bound)).collect();
        let w = Tensor::from_vec(w, (out, fan_in), &Device::Cpu)?;
        let b = Tensor::from_vec(b, out, &Device::Cpu)?;
        vars.insert(format!("{name}.weight"), candle_core::Var::from_tensor(&w)?);
        vars.insert(format!("{name}.bias"), candle_core::Var::from_tensor(&b)?);
    }
    drop(vars);
    Ok(vm)
}

/// Cross-entropy of the head's distribution against the model's (the
/// mean over the unrolled steps), AdamW with a cosine decay; returns the
/// mean loss of the last 100 steps.
fn fit(
    head: &Head,
    vm: &VarMap,
    tr: &Pairs,
    wte: &Tensor,
    a: &TrainHeadArgs,
) -> anyhow::Result<f32> {
    let params = candle_nn::ParamsAdamW {
        lr: a.lr,
        weight_decay: 0.0,
        ..Default::default()
    };
    let mut opt = candle_nn::AdamW::new(vm.all_vars(), params)?;
    let (n, wt) = (tr.from.dim(0)?, wte.t()?);
    anyhow::ensure!(
        n > BATCH,
        "{n} training pairs are fewer than a batch of {BATCH}"
    );
    let (mut rng, mut tail) = (7u64, Vec::new());
    for step in 0..a.steps {
        let cos = 0.5 * (1.0 + (std::f64::consts::PI * step as f64 / a.steps as f64).cos());
        opt.set_learning_rate(a.lr * (0.1 + 0.9 * cos));
        rng = rng
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let off = (rng >> 33) as usize % (n - BATCH);
        let batch = |x: &Tensor| x.narrow(0, off, BATCH);
        let guess = head.forward(&batch(&tr.from)?, &batch(&tr.emb)?)?;
        let mut loss = cross_entropy(&guess, &batch(&tr.to)?, &wt)?;
        if a.unroll == 2 {
            let second = head.forward(&guess, &batch(&tr.emb2)?)?;
            loss = ((loss + cross_entropy(&second, &batch(&tr.to2)?, &wt)?)? * 0.5)?;
        }
        opt.backward_step(&loss)?;
        if step + 100 >= a.steps {
            tail.push(loss.to_scalar::<f32>()?);
        }
        if step % 250 == 0 {
            eprintln!(
                "train-head: step {step} loss {:.4}",
                loss.to_scalar::<f32>()?
            );
        }
    }
    Ok(tail.iter().sum::<f32>() / tail.len().max(1) as f32)
}

/// Mean cross-entropy of the distribution of features `guess` against the
/// model's own at features `to` (`wt`: the tied output projection).
fn cross_entropy(guess: &Tensor, to: &Tensor, wt: &Tensor) -> candle_core::Result<Tensor> {
    let target = candle_nn::ops::softmax(&to.matmul(wt)?, D::Minus1)?;
    let logq = candle_nn::ops::log_softmax(&guess.matmul(wt)?, D::Minus1)?;
    (target * logq)?.sum(D::Minus1)?.mean_all()?.neg()
}

/// How often the head's draw equals the model's at temperatures 0 (the
/// argmax), 0.8 and 1.0, with the same keyed noise at each position: at
/// depth 1 (from the model's features) and at depth 2 (from the head's own
/// guess, as a chain's second draft, after the text's token).
fn measure(head: &Head, va: &Pairs, wte: &Tensor) -> anyhow::Result<[serde_json::Value; 2]> {
    let wt = wte.t()?;
    let guess = head.forward(&va.from, &va.emb)?;
    let second = head.forward(&guess, &va.emb2)?;
    Ok([
        draw_match(&va.to, &guess, &wt)?,
        draw_match(&va.to2, &second, &wt)?,
    ])
}

/// The share of rows where the keyed draws from features `to` (the
/// model's) and `guess` (the head's) agree, per temperature.
fn draw_match(to: &Tensor, guess: &Tensor, wt: &Tensor) -> anyhow::Result<serde_json::Value> {
    let p: Vec<Vec<f32>> = to.matmul(wt)?.to_vec2()?;
    let q: Vec<Vec<f32>> = guess.matmul(wt)?.to_vec2()?;
    let mut out = serde_json::Map::new();
    for temp in [0.0f32, 0.8, 1.0] {
        let draw = |z: &[f32], g: Noise| match temp {
            0.0 => crate::sampling::argmax(z),
            _ => crate::sampling::argmax(
                &z.iter()
                    .enumerate()
                    .map(|(t, &v)| v / temp + g.gumbel(t as u32))
                    .collect::<Vec<_>>(),
            ),
        };
        let hits = (0..p.len())
            .filter(|&i| draw(&p[i], Noise::at(99, 0, i)) == draw(&q[i], Noise::at(99, 0, i)))
            .count();
        out.insert(
            format!("{temp}"),
            serde_json::json!(hits as f64 / p.len().max(1) as f64),
        );
    }
    Ok(serde_json::Value::Object(out))
}

fn save(a: &TrainHeadArgs, vm: &VarMap, c: usize, report: serde_json::Value) -> anyhow::Result<()> {
    let data = vm.data().lock().expect("the var map is not poisoned");
    let tensors: HashMap<String, Tensor> = [
        (W1, "w1.weight"),
        (B1, "w1.bias"),
        (W2, "w2.weight"),
        (B2, "w2.bias"),
    ]
    .iter()
    .map(|(name, var)| {
        Ok((
            name.to_string(),
            data.get(*var)
                .ok_or_else(|| anyhow::anyhow!("no {var}"))?
                .as_tensor()
                .clone(),
        ))
    })
    .collect::<anyhow::Result<_>>()?;
    let path = a.model.join(draft_head::HEAD_FILE);
    let tmp = path.with_extension("safetensors.tmp");
    candle_core::safetensors::save(&tensors, &tmp)?;
    std::fs::rename(&tmp, &path)?;
    let cfg = HeadConfig {
        format_version: draft_head::FORMAT_VERSION,
        n_embd: c,
        hidden: a.hidden,
        report,
        // A new head's margins mean something else: `calibrate-head` fits it.
        calibration: None,
    };
    checkpoint::write_atomic(
        &a.model.join(draft_head::HEAD_CONFIG_FILE),
        serde_json::to_string_pretty(&cfg)?.as_bytes(),
    )?;
    eprintln!(
        "train-head: wrote {} and {}",
        path.display(),
        draft_head::HEAD_CONFIG_FILE
    );
    Ok(())
}
