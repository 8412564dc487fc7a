//! The plain figures of the bench: decode and prefill tokens/s and the
//! cost of verifying k rows vs one, for one model on each CPU backend
//! (candle, the fast path with f32 and with f16 weights, and with
//! `--weights` when that is q8_0 or q4_0), and the
//! random-weight models they are also measured on.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde_json::{json, Value};

use crate::decode::proposer::Plain;
use crate::decode::{GenParams, Generator};
use crate::model::config::Config;
use crate::model::cpu::{CpuGpt, KvDtype, WeightDtype};
use crate::model::forward::Forward;
use crate::model::gpt::{init_weights, Gpt};

/// Best-of-3 seconds of `f`.
fn time<F: FnMut() -> anyhow::Result<()>>(mut f: F) -> anyhow::Result<f64> {
    let mut best = f64::MAX;
    for _ in 0..3 {
        let t = Instant::now();
        f()?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(best)
}

/// The prompt plain decodes start from: 16 fixed token ids.
const DECODE_PROMPT_LEN: usize = 16;

/// One plain decode of `n` tokens after a fixed 16-token prompt: seconds
/// in all (the prompt's prefill counted) and in the `n` one-token steps
/// after it alone (what llama-bench's `tg` times). `examples/decode_profile`
/// runs it too.
pub fn plain_decode_seconds<M: Forward>(model: &M, n: usize) -> anyhow::Result<(f64, f64)> {
    let vocab = model.config().vocab_size as u32;
    let prompt: Vec<u32> = (0..DECODE_PROMPT_LEN as u32)
        .map(|i| i * 7 % vocab)
        .collect();
    let params = GenParams {
        max_tokens: n,
        speculate: false,
        stop_at_eot: false,
        ..Default::default()
    };
    let start = Instant::now();
    let (mut g, _) = Generator::new(model, Box::new(Plain), &prompt, params, u32::MAX, None)?;
    let steps = Instant::now();
    g.run()?;
    Ok((start.elapsed().as_secs_f64(), steps.elapsed().as_secs_f64()))
}

/// Decode/prefill/verify figures of one model on one backend.
pub fn plain_figures<M: Forward>(model: &M, decode_tokens: usize) -> anyhow::Result<Value> {
    let cfg = model.config().clone();
    let last = cfg.exits.len() - 1;
    let n = decode_tokens.min(cfg.block_size - DECODE_PROMPT_LEN - 1);
    // `decode` counts the prompt's prefill; `steps` only the n one-token
    // steps after it: best of 3 each.
    let (mut decode, mut steps) = (f64::MAX, f64::MAX);
    for _ in 0..3 {
        let (all, after) = plain_decode_seconds(model, n)?;
        decode = decode.min(all);
        steps = steps.min(after);
    }
    let pre_n = 64.min(cfg.block_size);
    let pre_ids: Vec<u32> = (0..pre_n as u32)
        .map(|i| i * 13 % cfg.vocab_size as u32)
        .collect();
    let prefill = time(|| {
        let mut cache = model.new_cache()?;
        let mut s = model.embed(&pre_ids, 0)?;
        model.run_blocks(&mut s, cfg.n_layer, &mut cache)?;
        model.exit_logits(&s, last, pre_n - 1..pre_n)?;
        Ok(())
    })?;
    // Verify k rows after a context of 128 (or half the window).
    let ctx = 128.min(cfg.block_size / 2);
    let mut cache = model.new_cache()?;
    let ids: Vec<u32> = (0..ctx as u32)
        .map(|i| i * 3 % cfg.vocab_size as u32)
        .collect();
    let mut s = model.embed(&ids, 0)?;
    model.run_blocks(&mut s, cfg.n_layer, &mut cache)?;
    // The sizes interleaved round by round, best of 10 each, so warm-up
    // and the shared machine's drift hit 1, 4 and 8 rows alike.
    let sizes = [1usize, 4, 8, 16, 32, 64].map(|k| k.min(cfg.block_size - ctx));
    let mut best = [f64::MAX; 6];
    for _ in 0..10 {
        for (b, &k) in best.iter_mut().zip(&sizes) {
            let rows: Vec<u32> = (0..k as u32).collect();
            let t = Instant::now();
            let mut s = model.embed(&rows, ctx)?;
            model.run_blocks(&mut s, cfg.n_layer, &mut cache)?;
            model.exit_logits(&s, last, 0..k)?;
            *b = b.min(t.elapsed().as_secs_f64());
            model.truncate_cache(&mut cache, ctx);
        }
    }
    let r = |i: usize| best[i] / best[0];
    Ok(json!({
        "config": format!("{} x {}, vocab {}", cfg.n_layer, cfg.n_embd, cfg.vocab_size),
        "decode_tok_s": n as f64 / decode,
        "decode_steps_tok_s": n as f64 / steps,
        "prefill_64_tok_s": pre_n as f64 / prefill,
        "verify_4_over_1": r(1),
        "verify_8_over_1": r(2),
        "verify_16_over_1": r(3),
        "verify_32_over_1": r(4),
        "verify_64_over_1": r(5),
    }))
}

/// The plain figures of one model's weights on every CPU backend: candle's
/// model, the fast path with f32 weights and with f16 weights, and with
/// `extra` weights (`bench --weights`) when that is neither; the fast
/// path's KV caches are stored as `kv` (`bench --kv-cache`).
pub fn plain_backends(
    cfg: &Config,
    w: &std::collections::HashMap<String, Tensor>,
    decode_tokens: usize,
    extra: Option<WeightDtype>,
    kv: KvDtype,
) -> anyhow::Result<Value> {
    let mut out = serde_json::Map::new();
    let mut dtypes = vec![WeightDtype::F32, WeightDtype::F16];
    dtypes.extend(extra.filter(|d| !dtypes.contains(d)));
    for dt in dtypes {
        let fast = CpuGpt::from_tensors(cfg, w, dt)?.with_kv_cache(kv);
        out.insert(
            format!("fast_{}", dt.name()),
            plain_figures(&fast, decode_tokens)?,
        );
    }
    let gpt = Gpt::new(
        cfg,
        VarBuilder::from_tensors(w.clone(), DType::F32, &Device::Cpu),
        true,
    )?;
    out.insert("candle_f32".into(), plain_figures(&gpt, decode_tokens)?);
    Ok(Value::Object(out))
}

/// Random weights (seeded) for a preset with one exit.
pub(super) fn random_weights(
    preset: &str,
) -> anyhow::Result<(Config, std::collections::HashMap<String, Tensor>)> {
    let mut cfg = Config::preset(preset)?;
    cfg.exits = vec![crate::model::config::Exit {
        block: cfg.n_layer,
        weight: 1.0,
    }];
    let w = init_weights(&cfg, 0, &Device::Cpu)?.into_iter().collect();
    Ok((cfg, w))
}
