//! HTTP serving benchmark, side by side in one run on one model:
//! requests/s and p50/p99 time-to-first-token and inter-token latency for 1,
//! 8 and 32 concurrent streaming clients, and the overhead of the HTTP path
//! over calling the decode loop directly (same prompts, same tokens).
//!
//! cargo run --release --example http_bench -- [MODEL_DIR] [OUT_JSON]

use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::Device;
use futures::StreamExt;
use gpt_serve::checkpoint;
use gpt_serve::decode::{GenParams, Generator, Proposer};
use gpt_serve::drafter::Drafter;
use gpt_serve::engine::EngineConfig;
use gpt_serve::metrics::Metrics;
use gpt_serve::server::{self, ServeOptions};
use serde_json::json;

const TOKENS: usize = 64;

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(((v.len() as f64 - 1.0) * p).round() as usize)
        .copied()
        .unwrap_or(f64::NAN)
}

/// One streaming request: (time to first token, inter-token gaps, total).
async fn stream_one(url: &str, prompt: &str) -> (f64, Vec<f64>, f64) {
    let t0 = Instant::now();
    let body = json!({"model": "m", "prompt": prompt, "max_tokens": TOKENS, "temperature": 0, "stream": true});
    let r = reqwest::Client::new()
        .post(format!("{url}/v1/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    let mut s = r.bytes_stream();
    let (mut first, mut last, mut gaps) = (None, None, vec![]);
    while let Some(chunk) = s.next().await {
        let chunk = chunk.unwrap();
        if chunk.windows(6).any(|w| w == b"[DONE]") {
            break;
        }
        let now = Instant::now();
        match last {
            None => first = Some(now.duration_since(t0).as_secs_f64()),
            Some(l) => gaps.push(now.duration_since(l).as_secs_f64()),
        }
        last = Some(now);
    }
    (first.unwrap_or(f64::NAN), gaps, t0.elapsed().as_secs_f64())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let dir = std::path::PathBuf::from(args.get(1).map(String::as_str).unwrap_or("models/default"));
    let out = args
        .get(2)
        .cloned()
        .unwrap_or_else(|| "bench/http.json".into());
    let loaded = checkpoint::load(&dir, &Device::Cpu)?;
    let model = loaded.cpu(gpt_serve::cpu::WeightDtype::F32)?;
    let drafter = Drafter::load(&dir.join(checkpoint::DRAFTER_FILE), model.cfg.vocab_size).ok();
    let tok = loaded.tokenizer.clone();
    let prompts: Vec<String> = [
        "The old house stood",
        "It was a dark night and",
        "She said that the",
        "In the morning the men",
        "When he came back to",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();

    // Direct decode loop: the same requests without HTTP.
    let t = Instant::now();
    for p in &prompts {
        let ids = tok.encode(p)?;
        let params = GenParams {
            max_tokens: TOKENS,
            ..Default::default()
        };
        let proposer = drafter.as_ref().map_or(Proposer::None, Proposer::Tree);
        let (mut g, _) = Generator::new(&model, proposer, &ids, params, tok.eot(), None)?;
        g.run()?;
        // Detokenize as the server does.
        let _ = tok.decode(g.generated())?;
    }
    let direct = t.elapsed().as_secs_f64();

    let metrics = Arc::new(Metrics::new());
    let engine = EngineConfig {
        backend: gpt_serve::engine::Backend::Cpu(gpt_serve::cpu::WeightDtype::F32),
        max_active: 32,
        max_batch_rows: gpt_serve::engine::DEFAULT_MAX_BATCH_ROWS,
        cascade: false,
        exit_confidence: 0.5,
        fault: None,
    };
    let state = server::build(loaded, drafter, engine, "m", metrics, ServeOptions::default())?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let result = rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let serving = state.clone();
        tokio::spawn(async move {
            server::serve(listener, serving, std::future::pending())
                .await
                .unwrap()
        });
        while !state
            .0
            .engine
            .ready
            .load(std::sync::atomic::Ordering::SeqCst)
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let t = Instant::now();
        for p in &prompts {
            stream_one(&url, p).await;
        }
        let http_one = t.elapsed().as_secs_f64();
        let mut rows = vec![];
        for clients in [1usize, 8, 32] {
            let t = Instant::now();
            let tasks: Vec<_> = (0..clients)
                .map(|i| {
                    let (url, p) = (url.clone(), prompts[i % prompts.len()].clone());
                    tokio::spawn(async move { stream_one(&url, &p).await })
                })
                .collect();
            let mut ttft = vec![];
            let mut itl = vec![];
            for task in tasks {
                let (f, g, _) = task.await.unwrap();
                ttft.push(f);
                itl.extend(g);
            }
            let secs = t.elapsed().as_secs_f64();
            rows.push(json!({
                "clients": clients, "requests_per_s": clients as f64 / secs,
                "ttft_p50_ms": 1e3 * pct(&mut ttft, 0.5), "ttft_p99_ms": 1e3 * pct(&mut ttft, 0.99),
                "itl_p50_ms": 1e3 * pct(&mut itl, 0.5), "itl_p99_ms": 1e3 * pct(&mut itl, 0.99),
            }));
        }
        json!({"tokens_per_request": TOKENS, "direct_secs": direct, "http_secs_1_client": http_one,
               "http_overhead": http_one / direct - 1.0, "concurrency": rows})
    });
    println!("{}", serde_json::to_string_pretty(&result)?);
    if let Some(p) = std::path::Path::new(&out).parent() {
        std::fs::create_dir_all(p)?;
    }
    std::fs::write(&out, serde_json::to_string_pretty(&result)?)?;
    Ok(())
}
