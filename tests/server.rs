//! The HTTP API over real loopback sockets: every parameter, every error
//! path, streaming, concurrency, cancellation and graceful shutdown.

use std::sync::Arc;
use std::time::Duration;

use candle_core::Device;
use futures::StreamExt;
use gpt_serve::checkpoint::{self, CheckpointConfig};
use gpt_serve::model::config::Config;
use gpt_serve::serving::engine::EngineConfig;
use gpt_serve::serving::metrics::Metrics;
use gpt_serve::serving::server::{self, AppState, ServeOptions};
use serde_json::{json, Value};

/// A tiny random-weight checkpoint with a real tokenizer.
fn checkpoint_dir() -> tempfile::TempDir {
    checkpoint_dir_with(|_| {})
}

fn checkpoint_dir_with(tweak: impl FnOnce(&mut Config)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let text =
        "The quick brown fox jumps over the lazy dog. Ünïcödé — 日本語 «text» here.\n".repeat(40);
    let tok = gpt_serve::tokenizer::Tokenizer::train_bpe([text.as_str()].into_iter(), 300).unwrap();
    let mut cfg = Config::preset("tiny").unwrap();
    cfg.vocab_size = tok.vocab_size();
    cfg.block_size = 128;
    tweak(&mut cfg);
    let w = gpt_serve::model::gpt::init_weights(&cfg, 1, &Device::Cpu).unwrap();
    let ck = CheckpointConfig::new(cfg, "f32");
    checkpoint::save(dir.path(), &ck, &w, &tok).unwrap();
    dir
}

struct Server {
    url: String,
    _dir: tempfile::TempDir,
    state: AppState,
}

async fn start(opts: ServeOptions, max_active: usize) -> Server {
    start_with(opts, max_active, checkpoint_dir()).await
}

async fn start_with(opts: ServeOptions, max_active: usize, dir: tempfile::TempDir) -> Server {
    start_faulty(opts, max_active, dir, None).await
}

async fn start_faulty(
    opts: ServeOptions,
    max_active: usize,
    dir: tempfile::TempDir,
    fault: Option<gpt_serve::serving::engine::Fault>,
) -> Server {
    start_until(opts, max_active, dir, fault, std::future::pending())
        .await
        .0
}

async fn start_until(
    opts: ServeOptions,
    max_active: usize,
    dir: tempfile::TempDir,
    fault: Option<gpt_serve::serving::engine::Fault>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> (Server, tokio::task::JoinHandle<server::Drained>) {
    start_on(opts, max_active, dir, fault, None, shutdown).await
}

/// A server that drains when `shutdown` resolves, its sockets' send
/// buffers `send_buffer` bytes when given; the accept loop's task gives how
/// the drain ended.
async fn start_on(
    opts: ServeOptions,
    max_active: usize,
    dir: tempfile::TempDir,
    fault: Option<gpt_serve::serving::engine::Fault>,
    send_buffer: Option<u32>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> (Server, tokio::task::JoinHandle<server::Drained>) {
    let loaded = checkpoint::load(dir.path(), &Device::Cpu).unwrap();
    let engine = EngineConfig {
        backend: gpt_serve::serving::engine::Backend::Cpu(gpt_serve::model::cpu::WeightDtype::F32),
        max_active,
        max_batch_rows: gpt_serve::serving::engine::DEFAULT_MAX_BATCH_ROWS,
        cascade: false,
        draft_trees: false,
        row_costs: None,
        exit_margin: gpt_serve::decode::DEFAULT_EXIT_MARGIN,
        kv_cache: Default::default(),
        suffix_cache: None,
        fault,
    };
    let metrics = Arc::new(Metrics::new());
    let state = server::build(loaded, None, engine, "tiny", metrics, opts).unwrap();
    let listener = match send_buffer {
        None => tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        // Accepted sockets inherit the listener's send buffer (tcp(7)).
        Some(bytes) => {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.set_send_buffer_size(bytes).unwrap();
            socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
            socket.listen(64).unwrap()
        }
    };
    let url = format!("http://{}", listener.local_addr().unwrap());
    let serving = state.clone();
    let task =
        tokio::spawn(async move { server::serve(listener, serving, shutdown).await.unwrap() });
    state.wait_ready(Duration::from_secs(5)).await;
    let s = Server {
        url,
        _dir: dir,
        state,
    };
    (s, task)
}

async fn post(s: &Server, path: &str, body: Value) -> (u16, Value) {
    post_url(&format!("{}{path}", s.url), body).await
}

async fn post_url(url: &str, body: Value) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(url)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn stream_events(s: &Server, body: Value) -> Vec<String> {
    let r = reqwest::Client::new()
        .post(format!("{}/v1/completions", s.url))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let text = r.text().await.unwrap();
    text.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(str::to_string)
        .collect()
}

/// The completion text of a stream: every chunk's choices before `[DONE]`.
fn streamed_text(events: &[String]) -> String {
    events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str::<Value>(e).unwrap())
        .flat_map(|c| {
            c["choices"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x["text"].as_str().unwrap().to_string())
                .collect::<Vec<_>>()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completion_has_openais_shape_and_usage() {
    let s = start(ServeOptions::default(), 4).await;
    let (st, v) = post(
        &s,
        "/v1/completions",
        json!({"model": "tiny", "prompt": "The quick", "max_tokens": 7, "temperature": 0}),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["object"], "text_completion");
    assert!(v["id"].as_str().unwrap().starts_with("cmpl-"));
    assert_eq!(v["model"], "tiny");
    let c = &v["choices"][0];
    assert_eq!(c["index"], 0);
    assert!(c["finish_reason"] == "length" || c["finish_reason"] == "stop");
    let u = &v["usage"];
    assert_eq!(
        u["total_tokens"].as_u64().unwrap(),
        u["prompt_tokens"].as_u64().unwrap() + u["completion_tokens"].as_u64().unwrap()
    );
    if c["finish_reason"] == "length" {
        assert_eq!(u["completion_tokens"], 7);
    }
    // Greedy is deterministic.
    let (_, v2) = post(
        &s,
        "/v1/completions",
        json!({"model": "tiny", "prompt": "The quick", "max_tokens": 7, "temperature": 0}),
    )
    .await;
    assert_eq!(v["choices"][0]["text"], v2["choices"][0]["text"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_temperature_below_1e_5_decodes_greedily() {
    let s = start(ServeOptions::default(), 4).await;
    let text = |temperature: f64, seed: u64| {
        let body = json!({"model": "tiny", "prompt": "The quick", "max_tokens": 12,
            "temperature": temperature, "seed": seed});
        let s = &s;
        async move {
            let (st, v) = post(s, "/v1/completions", body).await;
            assert_eq!(st, 200, "{v}");
            v["choices"][0]["text"].as_str().unwrap().to_string()
        }
    };
    let greedy = text(0.0, 1).await;
    for (t, seed) in [(1e-39, 1), (1e-39, 2), (1e-6, 3)] {
        assert_eq!(text(t, seed).await, greedy, "temperature {t}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_seed_gives_the_same_sample_and_n_gives_distinct_choices() {
    let s = start(ServeOptions::default(), 4).await;
    let body = json!({"model": "tiny", "prompt": "fox", "max_tokens": 12, "temperature": 1.5, "seed": 42, "n": 3, "top_p": 0.95,
                      "presence_penalty": 0.5, "frequency_penalty": 0.5, "user": "u1"});
    let (_, a) = post(&s, "/v1/completions", body.clone()).await;
    let (_, b) = post(&s, "/v1/completions", body).await;
    let texts = |v: &Value| {
        v["choices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["text"].as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(texts(&a), texts(&b));
    assert_eq!(texts(&a).len(), 3);
    let idx: Vec<u64> = a["choices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["index"].as_u64().unwrap())
        .collect();
    assert_eq!(idx, vec![0, 1, 2]);
    assert!(
        texts(&a)[0] != texts(&a)[1] || texts(&a)[1] != texts(&a)[2],
        "choices should differ"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_that_fails_gives_errors_not_truncated_successes_and_health_503() {
    use gpt_serve::serving::engine::Fault;
    let faulty = || {
        start_faulty(
            ServeOptions::default(),
            4,
            checkpoint_dir(),
            Some(Fault::PanicAtIteration(5)),
        )
    };
    // A request in flight when the engine panics: 500, not 200 + "length".
    let s = faulty().await;
    let body = json!({"model": "tiny", "prompt": "fox", "max_tokens": 40, "temperature": 0});
    let (st, v) = post(&s, "/v1/completions", body.clone()).await;
    assert_eq!(st, 500, "a completion cut by a failed engine: {v}");
    assert_eq!(v["error"]["type"], "server_error");
    let r = reqwest::get(format!("{}/health", s.url)).await.unwrap();
    assert_eq!(
        r.status().as_u16(),
        503,
        "health must report the failed engine"
    );
    let (st, _) = post(&s, "/v1/completions", body).await;
    assert!(st >= 500, "a request after the failure got {st}");
    // A stream in flight: an error event, not [DONE].
    let s = faulty().await;
    let events = stream_events(
        &s,
        // Greedy, as above: a sampled stream could end at end-of-text
        // before the panic at iteration 5 and say [DONE].
        json!({"model": "tiny", "prompt": "fox", "max_tokens": 40, "stream": true, "temperature": 0}),
    )
    .await;
    assert!(
        events.last().is_some_and(|e| e.contains("\"error\"")),
        "the stream ends with an error event: {events:?}"
    );
    assert!(!events.iter().any(|e| e == "[DONE]"), "{events:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_does_not_say_it_is_json_is_refused_with_415() {
    let s = start(ServeOptions::default(), 4).await;
    let body = r#"{"model": "tiny", "prompt": "fox", "max_tokens": 2}"#;
    for (ct, want) in [
        (Some("text/plain"), 415),
        (Some("application/x-www-form-urlencoded"), 415),
        (None, 415),
        (Some("application/json; charset=utf-8"), 200),
    ] {
        let mut req = reqwest::Client::new().post(format!("{}/v1/completions", s.url));
        if let Some(ct) = ct {
            req = req.header("content-type", ct);
        }
        let r = req.body(body).send().await.unwrap();
        assert_eq!(r.status().as_u16(), want, "content-type {ct:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn equal_prompts_in_one_request_sample_different_texts() {
    let s = start(ServeOptions::default(), 4).await;
    let body = json!({"model": "tiny", "prompt": ["fox", "fox", "fox"], "max_tokens": 12,
                      "temperature": 1.0, "seed": 3});
    let (st, v) = post(&s, "/v1/completions", body).await;
    assert_eq!(st, 200);
    let texts: Vec<&str> = v["choices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["text"].as_str().unwrap())
        .collect();
    assert_eq!(texts.len(), 3);
    assert!(
        texts[0] != texts[1] && texts[1] != texts[2] && texts[0] != texts[2],
        "equal prompts sampled the same text: {texts:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_prompt_shape_and_echo_logprobs_for_evaluation_harnesses() {
    let s = start(ServeOptions::default(), 4).await;
    let (st, v) = post(
        &s,
        "/v1/completions",
        json!({"model": "tiny", "prompt": ["a", "b"], "max_tokens": 2, "temperature": 0}),
    )
    .await;
    assert_eq!((st, v["choices"].as_array().unwrap().len()), (200, 2));
    let (_, v) = post(
        &s,
        "/v1/completions",
        json!({"model": "tiny", "prompt": [[5, 6], [7]], "max_tokens": 1, "temperature": 0}),
    )
    .await;
    assert_eq!(v["choices"].as_array().unwrap().len(), 2);
    // lm-eval style scoring: token prompt, echo, logprobs, max_tokens 0.
    let (st, v) = post(&s, "/v1/completions", json!({"model": "tiny", "prompt": [10, 20, 30, 40], "echo": true, "logprobs": 1, "max_tokens": 0, "temperature": 0})).await;
    assert_eq!(st, 200, "{v}");
    let lp = &v["choices"][0]["logprobs"];
    assert_eq!(lp["tokens"].as_array().unwrap().len(), 4);
    assert!(lp["token_logprobs"][0].is_null());
    for i in 1..4 {
        assert!(lp["token_logprobs"][i].as_f64().unwrap() <= 0.0);
        assert_eq!(lp["top_logprobs"][i].as_object().unwrap().len(), 1);
    }
    let off: Vec<u64> = lp["text_offset"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect();
    assert!(off.windows(2).all(|w| w[0] <= w[1]));
    assert_eq!(v["usage"]["completion_tokens"], 0);
    // With max_tokens 1, the generated token follows the echoed prompt.
    let (_, v) = post(&s, "/v1/completions", json!({"model": "tiny", "prompt": [10, 20], "echo": true, "logprobs": 5, "max_tokens": 1, "temperature": 0})).await;
    let lp = &v["choices"][0]["logprobs"];
    assert_eq!(lp["tokens"].as_array().unwrap().len(), 3);
    // Five alternatives; tokens whose text is the same (split UTF-8 bytes
    // render as U+FFFD) share a key, as in OpenAI's format.
    assert!((1..=5).contains(&lp["top_logprobs"][2].as_object().unwrap().len()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_sends_chunks_then_usage_then_done_and_matches_the_json_text() {
    let s = start(ServeOptions::default(), 4).await;
    let body = json!({"model": "tiny", "prompt": "日本", "max_tokens": 20, "temperature": 0, "stream": true, "stream_options": {"include_usage": true}, "logprobs": 2});
    let events = stream_events(&s, body.clone()).await;
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let usage = chunks.last().unwrap();
    assert!(usage["choices"].as_array().unwrap().is_empty());
    let streamed = streamed_text(&events);
    // Text came (the comparison with the JSON text below checks it).
    assert!(!streamed.is_empty(), "{events:?}");
    let finishes: Vec<&Value> = chunks
        .iter()
        .flat_map(|c| c["choices"].as_array().unwrap())
        .map(|c| &c["finish_reason"])
        .filter(|f| !f.is_null())
        .collect();
    assert_eq!(finishes.len(), 1);
    let mut plain = body.clone();
    plain["stream"] = json!(false);
    plain.as_object_mut().unwrap().remove("stream_options");
    let (_, v) = post(&s, "/v1/completions", plain).await;
    assert_eq!(streamed, v["choices"][0]["text"].as_str().unwrap());
    assert_eq!(usage["usage"], v["usage"]);
    let n_lp: usize = chunks
        .iter()
        .flat_map(|c| c["choices"].as_array().unwrap())
        .map(|c| c["logprobs"]["tokens"].as_array().map_or(0, |a| a.len()))
        .sum();
    assert_eq!(
        n_lp as u64,
        v["usage"]["completion_tokens"].as_u64().unwrap()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_string_cuts_the_text_and_finishes_with_stop() {
    let s = start(ServeOptions::default(), 4).await;
    let (_, full) = post(
        &s,
        "/v1/completions",
        json!({"model": "tiny", "prompt": "The", "max_tokens": 30, "temperature": 0}),
    )
    .await;
    let text = full["choices"][0]["text"].as_str().unwrap().to_string();
    // Pick a stop string from the middle of the greedy text.
    let chars: Vec<char> = text.chars().collect();
    if chars.len() < 6 {
        return;
    }
    let stop: String = chars[chars.len() / 2..chars.len() / 2 + 2].iter().collect();
    let (_, v) = post(&s, "/v1/completions", json!({"model": "tiny", "prompt": "The", "max_tokens": 30, "temperature": 0, "stop": [stop.clone()]})).await;
    let cut = v["choices"][0]["text"].as_str().unwrap();
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(cut, &text[..text.find(&stop).unwrap()]);
    assert!(v["usage"]["completion_tokens"].as_u64().unwrap() < 30);
    let events = stream_events(&s, json!({"model": "tiny", "prompt": "The", "max_tokens": 30, "temperature": 0, "stop": stop, "stream": true})).await;
    let streamed = streamed_text(&events);
    assert_eq!(streamed, cut);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_requests_get_openai_errors_naming_the_field() {
    let s = start(
        ServeOptions {
            body_limit: 4096,
            ..Default::default()
        },
        4,
    )
    .await;
    let cases = [
        (
            json!({"model": "tiny", "prompt": "x", "temperature": -0.5}),
            "temperature",
        ),
        (
            json!({"model": "tiny", "prompt": "x", "max_tokens": 100000}),
            "max_tokens",
        ),
        (
            json!({"model": "tiny", "prompt": "x", "logprobs": 9}),
            "logprobs",
        ),
        (json!({"model": "tiny", "prompt": "x", "n": 0}), "n"),
        (
            json!({"model": "tiny", "prompt": "x", "functions": []}),
            "functions",
        ),
        (json!({"model": "tiny", "prompt": [1, 2, 999999]}), "prompt"),
        (
            json!({"model": "tiny", "prompt": "x", "best_of": 3}),
            "best_of",
        ),
    ];
    for (body, param) in cases {
        let (st, v) = post(&s, "/v1/completions", body.clone()).await;
        assert_eq!(st, 400, "{body} -> {v}");
        assert_eq!(v["error"]["param"], param, "{v}");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert!(!v["error"]["message"].as_str().unwrap().is_empty());
    }
    // An unknown endpoint is a 404 with OpenAI's error body.
    let (st, v) = post(&s, "/v1/chat/nothing", json!({})).await;
    assert_eq!(st, 404);
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("/v1/chat/nothing"));
    // An unknown model is a 404 naming it, as with OpenAI and vLLM.
    let (st, v) = post(
        &s,
        "/v1/completions",
        json!({"model": "nope", "prompt": "x"}),
    )
    .await;
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (404, Some("model_not_found"))
    );
    assert_eq!(v["error"]["param"], "model");
    let r = reqwest::Client::new()
        .post(format!("{}/v1/completions", s.url))
        .header("content-type", "application/json")
        .body("{\"model\": ")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.json::<Value>().await.unwrap()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("malformed JSON"));
    let r = reqwest::Client::new()
        .post(format!("{}/v1/completions", s.url))
        .header("content-type", "application/json")
        .body(format!(
            "{{\"model\":\"tiny\",\"prompt\":\"{}\"}}",
            "a".repeat(10_000)
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    assert!(r.json::<Value>().await.unwrap()["error"]["message"].is_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_two_concurrent_clients_all_get_correct_answers() {
    let s = Arc::new(start(ServeOptions::default(), 32).await);
    let (_, reference) = post(
        &s,
        "/v1/completions",
        json!({"model": "tiny", "prompt": "lazy dog", "max_tokens": 10, "temperature": 0}),
    )
    .await;
    let mut tasks = Vec::new();
    for i in 0..32 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let stream = i % 2 == 0;
            let body = json!({"model": "tiny", "prompt": "lazy dog", "max_tokens": 10, "temperature": 0, "stream": stream});
            if stream {
                streamed_text(&stream_events(&s, body).await)
            } else {
                post(&s, "/v1/completions", body).await.1["choices"][0]["text"].as_str().unwrap().to_string()
            }
        }));
    }
    for t in tasks {
        assert_eq!(
            t.await.unwrap(),
            reference["choices"][0]["text"].as_str().unwrap()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_429_with_retry_after() {
    let s = start(
        ServeOptions {
            max_waiting: 2,
            ..Default::default()
        },
        1,
    )
    .await;
    let url = format!("{}/v1/completions", s.url);
    // More sequences than the server can ever hold: 400 naming n.
    let (st, v) = post(
        &s,
        "/v1/completions",
        json!({"model": "tiny", "prompt": "b", "max_tokens": 1, "n": 4}),
    )
    .await;
    assert_eq!((st, v["error"]["param"].as_str()), (400, Some("n")));
    // Every slot taken (as by other clients): 429 with Retry-After.
    let held = s
        .state
        .limiter()
        .clone()
        .acquire_many_owned(3)
        .await
        .unwrap();
    let r = reqwest::Client::new()
        .post(&url)
        .json(&json!({"model": "tiny", "prompt": "b", "max_tokens": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "1");
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["type"],
        "rate_limit_error"
    );
    drop(held);
    let (st, _) = post(
        &s,
        "/v1/completions",
        json!({"model": "tiny", "prompt": "b", "max_tokens": 1}),
    )
    .await;
    assert_eq!(st, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_stops_its_generation() {
    // Every engine turn sleeps PACE first, and without a drafter a
    // sequence gains at most one token a turn: 1,000 tokens take over 10 s.
    const PACE: Duration = Duration::from_millis(10);
    let fault = Some(gpt_serve::serving::engine::Fault::SlowIterations(10));
    let s = start_faulty(ServeOptions::default(), 4, long_context_dir(), fault).await;
    let sent = std::time::Instant::now();
    let r = reqwest::Client::new()
        .post(format!("{}/v1/completions", s.url))
        .json(&json!({"model": "tiny", "prompt": "a", "max_tokens": 1000, "stream": true, "temperature": 0}))
        .send()
        .await
        .unwrap();
    let mut body = r.bytes_stream();
    let _ = body.next().await; // first chunk arrived: it is decoding
    drop(body);
    // The engine notices at its next turn and goes idle.
    let mut idle = false;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(30)).await;
        if metric(&s, "vllm:num_requests_running").await == 0.0 {
            idle = true;
            break;
        }
    }
    assert!(idle, "generation kept running after the client left");
    let turns = (sent.elapsed().as_millis() / PACE.as_millis()) as f64 + 1.0;
    let generated = metric(&s, "vllm:generation_tokens_total").await;
    // At least the first chunk's token; at most one token per turn that
    // could run before the engine went idle (the sequence is dropped at
    // the first turn after its client left), far below 1,000.
    assert!(
        (1.0..=turns).contains(&generated) && turns < 1000.0,
        "{generated} tokens in at most {turns} turns for a client that left"
    );
    tokio::time::sleep(PACE * 10).await;
    assert_eq!(metric(&s, "vllm:generation_tokens_total").await, generated);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_models_health_metrics_and_tokenize_endpoints() {
    let s = start(
        ServeOptions {
            api_key: Some("sekret".into()),
            ..Default::default()
        },
        4,
    )
    .await;
    let c = reqwest::Client::new();
    let r = c.get(format!("{}/v1/models", s.url)).send().await.unwrap();
    assert_eq!(r.status(), 401);
    // Every API route refuses a request without the key, before reading it.
    for (path, body) in [
        (
            "/v1/completions",
            json!({"model": "tiny", "prompt": "x", "max_tokens": 1}),
        ),
        ("/tokenize", json!({"prompt": "x"})),
        ("/detokenize", json!({"tokens": [1]})),
    ] {
        let r = c
            .post(format!("{}{path}", s.url))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "{path} without the key");
        let r = c
            .post(format!("{}{path}", s.url))
            .bearer_auth("wrong")
            .json(&body);
        assert_eq!(
            r.send().await.unwrap().status(),
            401,
            "{path} with a wrong key"
        );
    }
    let r = c
        .get(format!("{}/v1/models", s.url))
        .bearer_auth("sekret")
        .send()
        .await
        .unwrap();
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["data"][0]["id"], "tiny");
    assert_eq!(
        c.get(format!("{}/health", s.url))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let r = c
        .post(format!("{}/tokenize", s.url))
        .bearer_auth("sekret")
        .json(&json!({"prompt": "The quick"}))
        .send()
        .await
        .unwrap();
    let t: Value = r.json().await.unwrap();
    let ids = t["tokens"].clone();
    assert_eq!(
        t["count"].as_u64().unwrap() as usize,
        ids.as_array().unwrap().len()
    );
    let r = c
        .post(format!("{}/detokenize", s.url))
        .bearer_auth("sekret")
        .json(&json!({"tokens": ids}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.json::<Value>().await.unwrap()["prompt"], "The quick");
    let r = c
        .post(format!("{}/v1/completions", s.url))
        .bearer_auth("sekret")
        .json(&json!({"model": "tiny", "prompt": "x", "max_tokens": 3}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let m = c
        .get(format!("{}/metrics", s.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for name in [
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
        "vllm:time_to_first_token_seconds_bucket",
        "vllm:time_per_output_token_seconds_count",
        "vllm:e2e_request_latency_seconds_sum",
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:spec_decode_num_draft_tokens_total",
    ] {
        assert!(m.contains(name), "missing {name}");
    }
    let _ = &s.state;
}

#[test]
fn the_committed_openapi_document_matches_the_code() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("proto/openapi.json");
    let committed = std::fs::read_to_string(&path)
        .expect("proto/openapi.json exists (gpt-serve openapi writes it)");
    assert_eq!(
        committed.trim(),
        gpt_serve::serving::server::openapi_json().trim(),
        "run `gpt-serve openapi` to refresh proto/openapi.json"
    );
}

/// A `gpt-serve serve` child, killed if a test fails before it exits.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `gpt-serve serve` on a free port with `args` added; the child and its
/// URL, once `/health` answers 200.
fn serve_cli(dir: &tempfile::TempDir, args: &[&str]) -> (Child, String) {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_gpt-serve"))
        .args(["serve", "--model", dir.path().to_str().unwrap()])
        .args(["--port", &port.to_string(), "--model-id", "tiny"])
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let child = Child(child);
    let url = format!("http://127.0.0.1:{port}");
    for _ in 0..400 {
        if health_status(port) == Some(200) {
            break;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    (child, url)
}

/// The status `/health` answers on `127.0.0.1:port`, if it answers.
fn health_status(port: u16) -> Option<u16> {
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    conn.write_all(b"GET /health HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
        .ok()?;
    let mut answer = String::new();
    conn.read_to_string(&mut answer).ok()?;
    answer.get(9..12)?.parse().ok()
}

/// A greedy stream of `max_tokens` tokens (with usage): its response, once
/// the first chunk has arrived, so it is decoding.
async fn stream_started(url: &str, max_tokens: usize) -> reqwest::Response {
    let r = reqwest::Client::new()
        .post(format!("{url}/v1/completions"))
        .json(
            &json!({"model": "tiny", "prompt": "a", "max_tokens": max_tokens, "temperature": 0,
            "stream": true, "stream_options": {"include_usage": true}}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r
}

/// The `data:` payloads of a stream, `first` (already read) included.
async fn rest_of_stream(
    first: axum::body::Bytes,
    mut body: impl futures::Stream<Item = reqwest::Result<axum::body::Bytes>> + Unpin,
) -> Vec<String> {
    let mut text = String::from_utf8_lossy(&first).into_owned();
    while let Some(chunk) = body.next().await {
        match chunk {
            Ok(c) => text.push_str(&String::from_utf8_lossy(&c)),
            Err(_) => break,
        }
    }
    text.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(str::to_string)
        .collect()
}

fn sigterm(child: &Child) {
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
}

#[test]
fn sigterm_lets_in_flight_requests_finish_then_exits() {
    // 600 tokens at ~1 ms each: the stream is mid-way when the signal
    // arrives, right after its first chunk.
    let dir = long_context_dir();
    let (mut child, url) = serve_cli(&dir, &[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let (st, whole) = post_url(
            &format!("{url}/v1/completions"),
            json!({"model": "tiny", "prompt": "a",
            "max_tokens": 600, "temperature": 0}),
        )
        .await;
        assert_eq!(st, 200, "{whole}");
        let mut body = stream_started(&url, 600).await.bytes_stream();
        let first = body.next().await.unwrap().unwrap();
        sigterm(&child);
        let events = rest_of_stream(first, body).await;
        assert_eq!(
            events.last().map(String::as_str),
            Some("[DONE]"),
            "{events:?}"
        );
        // Every token came: the text and the count of the same request
        // run to its end before the signal.
        assert_eq!(
            streamed_text(&events),
            whole["choices"][0]["text"].as_str().unwrap()
        );
        let usage: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
        assert_eq!(
            usage["usage"]["completion_tokens"],
            whole["usage"]["completion_tokens"]
        );
    });
    let status = child.0.wait().unwrap();
    assert!(status.success(), "{status:?}");
}

#[test]
fn a_stream_cut_at_the_shutdown_deadline_gets_an_error_event_and_the_exit_is_non_zero() {
    // A deadline of 0 s: the drain cuts whatever runs when SIGTERM comes,
    // and a 1,000-token stream is running after its first chunk.
    let dir = long_context_dir();
    let (mut child, url) = serve_cli(&dir, &["--shutdown-timeout", "0"]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let events = rt.block_on(async {
        let mut body = stream_started(&url, 1000).await.bytes_stream();
        let first = body.next().await.unwrap().unwrap();
        sigterm(&child);
        rest_of_stream(first, body).await
    });
    let last: Value = serde_json::from_str(events.last().unwrap()).unwrap();
    let message = last["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("--shutdown-timeout"), "{events:?}");
    assert!(
        !events.iter().any(|e| e == "[DONE]"),
        "a cut stream said [DONE]"
    );
    let status = child.0.wait().unwrap();
    assert_eq!(status.code(), Some(1), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_draining_new_connections_are_refused_and_health_answers_503() {
    use tower::ServiceExt;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let fault = Some(gpt_serve::serving::engine::Fault::SlowIterations(30));
    let shutdown = async move {
        let _ = stopped.await;
    };
    let (s, drained) = start_until(
        ServeOptions::default(),
        1,
        checkpoint_dir(),
        fault,
        shutdown,
    )
    .await;
    // ~100 iterations of 30 ms: in flight through the checks below.
    let busy = busy_request(&s).await;
    stop.send(()).unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The listener is closed: a probe's new connection is refused.
    let probe = reqwest::get(format!("{}/health", s.url)).await;
    assert!(
        probe.unwrap_err().is_connect(),
        "a new connection was accepted while draining"
    );
    // A request that still reaches the server (an open connection) is
    // told it is shutting down.
    let health = axum::http::Request::get("/health")
        .body(axum::body::Body::empty())
        .unwrap();
    let r = server::router(s.state.clone())
        .oneshot(health)
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert!(
        !busy.is_finished(),
        "the busy request ended too soon for this test"
    );
    assert_eq!(busy.await.unwrap(), 200, "the in-flight request finished");
    assert_eq!(drained.await.unwrap(), server::Drained::Finished);
}

/// A metric's value (the first sample whose name matches exactly).
async fn metric(s: &Server, name: &str) -> f64 {
    let m = reqwest::get(format!("{}/metrics", s.url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    m.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no metric {name}"))
        .parse()
        .unwrap()
}

/// Waits (up to 5 s) for a gauge to read `want`: the engine sets its
/// gauges between iterations, so a client can see its response a moment
/// before the gauge counts the request gone.
async fn gauge_settles(s: &Server, name: &str, want: f64) {
    let mut last = f64::NAN;
    for _ in 0..100 {
        last = metric(s, name).await;
        if last == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{name} stayed at {last}, not {want}");
}

/// A model with a 1024-token context, slow enough (~1 ms a token) for
/// requests to overlap.
fn long_context_dir() -> tempfile::TempDir {
    checkpoint_dir_with(|c| {
        c.n_layer = 4;
        c.n_embd = 256;
        c.n_head = 4;
        c.block_size = 1024;
        c.exits = gpt_serve::model::config::default_exits(4);
    })
}

/// Sends a raw HTTP/1.1 request on a fresh connection and returns it
/// unread; `recv_buffer` shrinks the client's receive window.
async fn raw_request(s: &Server, body: &Value, recv_buffer: Option<u32>) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let addr: std::net::SocketAddr = s.url.trim_start_matches("http://").parse().unwrap();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    if let Some(b) = recv_buffer {
        socket.set_recv_buffer_size(b).unwrap();
    }
    let mut conn = socket.connect(addr).await.unwrap();
    let body = body.to_string();
    let head = format!(
        "POST /v1/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    conn.write_all((head + &body).as_bytes()).await.unwrap();
    conn
}

/// A 100-token request decoding in the background (the engine is slowed
/// by a fault, so it outlasts what a test does meanwhile); its status.
async fn busy_request(s: &Server) -> tokio::task::JoinHandle<u16> {
    let url = format!("{}/v1/completions", s.url);
    let busy = tokio::spawn(async move {
        let body = json!({"model": "tiny", "prompt": "a", "max_tokens": 100, "temperature": 0});
        let r = reqwest::Client::new().post(url).json(&body).send().await;
        r.unwrap().status().as_u16()
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    busy
}

/// A server with one slot, `max_waiting` places in the queue and
/// iterations slowed to `slow_ms`, and the busy request holding its slot.
async fn one_slot_busy(max_waiting: usize, slow_ms: u64) -> (Server, tokio::task::JoinHandle<u16>) {
    let opts = ServeOptions {
        max_waiting,
        ..Default::default()
    };
    let fault = Some(gpt_serve::serving::engine::Fault::SlowIterations(slow_ms));
    let s = start_faulty(opts, 1, checkpoint_dir(), fault).await;
    let busy = busy_request(&s).await;
    (s, busy)
}

/// Status of a request that needs every slot of the server (n = capacity).
async fn status_of_a_request_for_every_slot(s: &Server, n: usize) -> u16 {
    let body = json!({"model": "tiny", "prompt": "a", "max_tokens": 1, "n": n});
    post(s, "/v1/completions", body).await.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_whose_client_never_reads_frees_its_slots_at_the_deadline() {
    let opts = ServeOptions {
        request_timeout: Duration::from_secs(3),
        max_waiting: 0,
        ..Default::default()
    };
    // Iterations slowed to 10 ms: 1,000 tokens take ten seconds, so the
    // request is still decoding when the deadline (3 s) passes, whatever
    // this machine's speed. (16 choices of 1,000 tokens with logprobs are
    // ~2.2 MB of events, which a 4 MiB socket send buffer can swallow
    // whole: without the slowdown a fast machine finished the stream
    // before the check below and freed the slots early.)
    let fault = Some(gpt_serve::serving::engine::Fault::SlowIterations(10));
    let s = start_faulty(opts, 16, long_context_dir(), fault).await;
    let body = json!({"model": "tiny", "prompt": "The quick brown fox", "max_tokens": 1000,
        "n": 16, "logprobs": 5, "stream": true, "temperature": 1.0});
    let sent = std::time::Instant::now();
    let unread = raw_request(&s, &body, Some(4096)).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(status_of_a_request_for_every_slot(&s, 16).await, 429);
    // Unfinished: each turn sleeps 10 ms and gives each sequence at most
    // one token (no drafter), so at most 16 tokens a turn are out, far
    // below the 16 x 1,000 asked.
    let turns = (sent.elapsed().as_millis() / 10) as f64 + 1.0;
    let generated = metric(&s, "vllm:generation_tokens_total").await;
    assert!(
        generated <= 16.0 * turns && turns < 1000.0,
        "{generated} tokens in at most {turns} turns for a client that never reads"
    );
    // Past the deadline the slots are back, though the connection is
    // still open and unread: polled until 9 s after sending, well before
    // the 1,000 tokens (10 s of 10 ms turns) or the write timeout (30 s)
    // could have freed them. A fixed 5.5 s failed once, with the other
    // tests of this file sharing the 2 cores.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let status = loop {
        let status = status_of_a_request_for_every_slot(&s, 16).await;
        if status == 200 || sent.elapsed() >= Duration::from_secs(9) {
            break status;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        status,
        200,
        "slots still held {:?} after sending",
        sent.elapsed()
    );
    gauge_settles(&s, "vllm:num_requests_running", 0.0).await;
    drop(unread);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_paused_by_a_client_that_stopped_reading_frees_its_slots_at_the_write_timeout() {
    // Small socket buffers on both sides (4 KiB, which Linux doubles), so
    // the unread stream fills them within a few tokens and back-pressure
    // reaches the engine: its per-sequence channels fill and it pauses
    // the sequences. The request timeout (600 s) is far away.
    let opts = ServeOptions {
        write_timeout: Duration::from_secs(2),
        max_waiting: 0,
        ..Default::default()
    };
    let pending = std::future::pending();
    let (s, _) = start_on(opts, 16, long_context_dir(), None, Some(4096), pending).await;
    let body = json!({"model": "tiny", "prompt": "The quick brown fox", "max_tokens": 1000,
        "n": 16, "logprobs": 5, "stream": true, "temperature": 1.0});
    let unread = raw_request(&s, &body, Some(4096)).await;
    // Paused, not finished: sequences still hold slots (a choice may end
    // early at end-of-text) while the token count stands still.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let before = metric(&s, "vllm:generation_tokens_total").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = metric(&s, "vllm:generation_tokens_total").await;
    let running = metric(&s, "vllm:num_requests_running").await;
    assert!(
        running > 0.0 && before == after,
        "{running} running, {before} then {after} tokens: not paused"
    );
    assert_eq!(status_of_a_request_for_every_slot(&s, 16).await, 429);
    // The write has made no progress for 2 s: the stream is dropped and
    // its slots are back, with the connection still open and unread.
    gauge_settles(&s, "vllm:num_requests_running", 0.0).await;
    assert_eq!(status_of_a_request_for_every_slot(&s, 16).await, 200);
    drop(unread);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_send_then_disconnect_cost_no_prefill_and_never_grow_the_queue() {
    // One request decodes for a while (~100 iterations of 30 ms).
    let (s, busy) = one_slot_busy(2, 30).await;
    // Ten clients send a request and hang up at once.
    let body = json!({"model": "tiny", "prompt": "b", "max_tokens": 20});
    for _ in 0..10 {
        let conn = raw_request(&s, &body, None).await;
        tokio::time::sleep(Duration::from_millis(30)).await; // queued by now
        drop(conn);
        tokio::time::sleep(Duration::from_millis(20)).await;
        let waiting = metric(&s, "vllm:num_requests_waiting").await;
        assert!(waiting <= 2.0, "{waiting} waiting with --max-waiting 2");
    }
    assert!(
        !busy.is_finished(),
        "the busy request ended too soon for this test"
    );
    assert_eq!(busy.await.unwrap(), 200);
    let (st, _) = post(
        &s,
        "/v1/completions",
        json!({"model": "tiny", "prompt": "c", "max_tokens": 1}),
    )
    .await;
    assert_eq!(st, 200);
    // Only the busy request and the last one were ever started.
    assert_eq!(
        metric(&s, "vllm:request_queue_time_seconds_count").await,
        2.0
    );
    assert!(metric(&s, "gpt_serve:abandoned_in_queue_total").await >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_stream_whose_client_leaves_frees_its_slot_before_any_token() {
    let (s, busy) = one_slot_busy(1, 10).await;
    // A stream queued behind it: its headers arrive, then its client goes.
    let r = reqwest::Client::new()
        .post(format!("{}/v1/completions", s.url))
        .json(&json!({"model": "tiny", "prompt": "b", "max_tokens": 20, "stream": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    drop(r);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !busy.is_finished(),
        "the busy request ended too soon for this test"
    );
    // Its slot is free while the busy request still decodes.
    let (st, v) = post(
        &s,
        "/v1/completions",
        json!({"model": "tiny", "prompt": "c", "max_tokens": 1}),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(busy.await.unwrap(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_over_capacity_or_too_long_are_refused_before_tokenizing() {
    let s = start(
        ServeOptions {
            max_waiting: 0,
            ..Default::default()
        },
        1,
    )
    .await;
    let count = "gpt_serve:tokenize_seconds_count";
    let held = s
        .state
        .limiter()
        .clone()
        .acquire_many_owned(1)
        .await
        .unwrap();
    let (st, _) = post(
        &s,
        "/v1/completions",
        json!({"model": "tiny", "prompt": "hello there"}),
    )
    .await;
    assert_eq!(st, 429);
    drop(held);
    let limits = &s.state.0.limits;
    let long = "z".repeat(limits.max_prompt_bytes() + 1);
    let (st, v) = post(
        &s,
        "/v1/completions",
        json!({"model": "tiny", "prompt": long}),
    )
    .await;
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (400, Some("context_length_exceeded"))
    );
    assert_eq!(
        metric(&s, count).await,
        0.0,
        "a refused prompt was tokenized"
    );
    let (st, _) = post(
        &s,
        "/v1/completions",
        json!({"model": "tiny", "prompt": "hello", "max_tokens": 1}),
    )
    .await;
    assert_eq!(st, 200);
    assert_eq!(metric(&s, count).await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_logprobs_are_computed_once_per_prompt_and_shared_by_its_choices() {
    let s = start(ServeOptions::default(), 4).await;
    let body = json!({"model": "tiny", "prompt": ["The quick brown", "lazy dog"], "n": 3,
        "echo": true, "logprobs": 2, "max_tokens": 3, "temperature": 1.0, "seed": 5});
    let (st, v) = post(&s, "/v1/completions", body.clone()).await;
    assert_eq!(st, 200, "{v}");
    let choices = v["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 6);
    for prompt in choices.chunks(3) {
        let echo = |c: &Value| c["logprobs"]["token_logprobs"].as_array().unwrap()[..3].to_vec();
        assert!(echo(&prompt[0])[1].is_number(), "{}", prompt[0]);
        assert_eq!(echo(&prompt[0]), echo(&prompt[1]));
        assert_eq!(echo(&prompt[0]), echo(&prompt[2]));
    }
    // Streaming gives the same texts and scores.
    let mut body = body;
    body["stream"] = json!(true);
    let events = stream_events(&s, body).await;
    let mut texts = vec![String::new(); 6];
    for e in &events[..events.len() - 1] {
        let c: Value = serde_json::from_str(e).unwrap();
        for ch in c["choices"].as_array().unwrap() {
            texts[ch["index"].as_u64().unwrap() as usize] += ch["text"].as_str().unwrap();
        }
    }
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(texts[i], c["text"].as_str().unwrap(), "choice {i}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_key_can_come_from_a_file_and_guard_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("key");
    std::fs::write(&path, "from-a-file\n").unwrap();
    let key = server::read_api_key(&path).unwrap();
    assert_eq!(key, "from-a-file");
    std::fs::write(&path, "\n").unwrap();
    assert!(server::read_api_key(&path).unwrap_err().contains("empty"));
    assert!(server::read_api_key(&dir.path().join("absent"))
        .unwrap_err()
        .contains("absent"));
    let opts = ServeOptions {
        api_key: Some(key),
        protect_metrics: true,
        ..Default::default()
    };
    let s = start(opts, 1).await;
    let c = reqwest::Client::new();
    let get = |auth: Option<&'static str>| {
        let r = c.get(format!("{}/metrics", s.url));
        let r = match auth {
            Some(k) => r.bearer_auth(k),
            None => r,
        };
        async move { r.send().await.unwrap().status().as_u16() }
    };
    assert_eq!(get(None).await, 401);
    assert_eq!(get(Some("from-a-filX")).await, 401);
    assert_eq!(get(Some("from-a-file-and-more")).await, 401);
    assert_eq!(get(Some("from-a-file")).await, 200);
    let health = c.get(format!("{}/health", s.url)).send().await.unwrap();
    assert_eq!(health.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_headers_are_cut_off_and_connections_beyond_the_cap_get_503() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let opts = ServeOptions {
        header_read_timeout: Duration::from_millis(500),
        max_connections: 2,
        // No probe reserve: a third connection gets the 503 at once.
        probe_connections: 0,
        ..Default::default()
    };
    let s = start(opts, 1).await;
    let addr = s.url.trim_start_matches("http://").to_string();
    // Two connections that send half a header hold both slots...
    let mut slow = Vec::new();
    for _ in 0..2 {
        let mut c = tokio::net::TcpStream::connect(&addr).await.unwrap();
        c.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\n")
            .await
            .unwrap();
        slow.push(c);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    // ...so a third gets a 503 and is closed.
    let mut third = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let mut answer = String::new();
    third.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    // The header timeout closes the slow ones, and the slots come back.
    for c in &mut slow {
        let mut buf = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(3), c.read_to_end(&mut buf)).await;
        assert!(
            read.is_ok(),
            "a connection that never finished its headers stayed open"
        );
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let r = reqwest::get(format!("{}/health", s.url)).await.unwrap();
    assert_eq!(r.status(), 200);
}

/// Sends `GET path` on a fresh connection (kept alive) and reads the
/// answer's first bytes; the connection and that answer.
async fn get_raw(addr: &str, path: &str) -> (tokio::net::TcpStream, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\n\r\n");
    conn.write_all(head.as_bytes()).await.unwrap();
    let mut buf = vec![0; 4096];
    let n = tokio::time::timeout(Duration::from_secs(3), conn.read(&mut buf))
        .await
        .expect("no answer within 3 s")
        .unwrap();
    (conn, String::from_utf8_lossy(&buf[..n]).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_answers_when_keyless_clients_hold_every_connection() {
    let opts = ServeOptions {
        api_key: Some("sekret".into()),
        max_connections: 2,
        probe_connections: 1,
        ..Default::default()
    };
    let s = start(opts, 1).await;
    let addr = s.url.trim_start_matches("http://").to_string();
    // Two keyless clients get their cheap 401s and keep their connections.
    let mut held = Vec::new();
    for _ in 0..2 {
        let (conn, answer) = get_raw(&addr, "/v1/models").await;
        assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
        held.push(conn);
    }
    // The cap is reached: the reserve answers a probe, and nothing else,
    // one request a connection (it closes; a moment later its slot is back).
    let reserve = |path: &'static str| {
        let addr = addr.clone();
        async move {
            let (mut conn, answer) = get_raw(&addr, path).await;
            let closed = answer_within(&mut conn, Duration::from_secs(3)).await;
            assert!(closed.is_some(), "a reserve connection stayed open");
            tokio::time::sleep(Duration::from_millis(50)).await;
            answer
        }
    };
    let answer = reserve("/v1/models").await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("too many open connections"), "{answer}");
    for _ in 0..3 {
        let answer = reserve("/health").await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    }
    drop(held);
}

/// The answer to `GET /v1/models` sent with this `Host` header.
async fn answer_for_host(s: &Server, host: &str) -> String {
    use tokio::io::AsyncWriteExt;
    let addr = s.url.trim_start_matches("http://");
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!("GET /v1/models HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n");
    conn.write_all(head.as_bytes()).await.unwrap();
    let answer = answer_within(&mut conn, Duration::from_secs(3)).await;
    answer.expect("no answer within 3 s")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_header_naming_another_host_is_refused_as_dns_rebinding() {
    let s = start(ServeOptions::default(), 1).await;
    let port = s.url.rsplit(':').next().unwrap().to_string();
    // Bound to 127.0.0.1: addresses and localhost are served...
    for host in ["127.0.0.1", "localhost", "[::1]", "LocalHost."] {
        let answer = answer_for_host(&s, &format!("{host}:{port}")).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{host}: {answer}");
    }
    // ...a rebinding page's own name is not, and the error says why.
    let answer = answer_for_host(&s, &format!("rebind.example:{port}")).await;
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
    let body: Value = serde_json::from_str(answer.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("rebind.example") && message.contains("--allowed-hosts"),
        "{message}"
    );
    // Names listed in --allowed-hosts are served.
    let opts = ServeOptions {
        allowed_hosts: Some(vec!["api.example".into(), ".svc.cluster.local".into()]),
        ..Default::default()
    };
    let s = start(opts, 1).await;
    for (host, status) in [
        ("api.example", 200),
        ("gpt.ns.svc.cluster.local", 200),
        ("rebind.example", 403),
    ] {
        let answer = answer_for_host(&s, &format!("{host}:{port}")).await;
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status}")),
            "{host}: {answer}"
        );
    }
}

/// Sends a request's headers, declaring `declared` body bytes, and `sent`
/// of them, then stalls; the connection, unread.
async fn stalled_body(s: &Server, declared: usize, sent: usize) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let addr = s.url.trim_start_matches("http://");
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /v1/completions HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\ncontent-length: {declared}\r\n\r\n"
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    conn.write_all(&vec![b' '; sent]).await.unwrap();
    conn
}

/// What the server answers on `conn` before closing it, read for at most
/// `limit` (None: it neither answered nor closed in time).
async fn answer_within(conn: &mut tokio::net::TcpStream, limit: Duration) -> Option<String> {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    let read = tokio::time::timeout(limit, conn.read_to_end(&mut buf)).await;
    read.ok()
        .map(|_| String::from_utf8_lossy(&buf).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_stalls_gets_408_at_the_body_read_timeout() {
    let opts = ServeOptions {
        body_read_timeout: Duration::from_millis(300),
        request_timeout: Duration::from_secs(600),
        ..Default::default()
    };
    let s = start(opts, 1).await;
    let mut conn = stalled_body(&s, 1000, 10).await;
    // Answered at the 0.3 s body timeout; 3 s allows for a loaded machine
    // and is far below the 600 s request timeout.
    let answer = answer_within(&mut conn, Duration::from_secs(3)).await;
    let answer = answer.expect("a stalled body held its connection");
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("--body-read-timeout"), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_server_answers_429_before_reading_the_body() {
    let (s, busy) = one_slot_busy(0, 30).await;
    // Nine bytes of a thousand: answered at once, without the rest.
    let mut conn = stalled_body(&s, 1000, 9).await;
    let answer = answer_within(&mut conn, Duration::from_secs(3)).await;
    let answer = answer.expect("no answer before the body arrived");
    assert!(answer.starts_with("HTTP/1.1 429"), "{answer}");
    assert!(!busy.is_finished(), "the busy request ended too soon");
    assert_eq!(busy.await.unwrap(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_in_transit_beyond_the_byte_budget_are_refused_before_reading() {
    let opts = ServeOptions {
        max_buffered_body_bytes: 1500,
        body_read_timeout: Duration::from_millis(500),
        ..Default::default()
    };
    let s = start(opts, 4).await;
    // One stalled body holds 1000 of the 1500 bytes...
    let mut first = stalled_body(&s, 1000, 1).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    // ...so a second of 1000 is refused at once, unread.
    let mut second = stalled_body(&s, 1000, 1).await;
    let answer = answer_within(&mut second, Duration::from_secs(3)).await;
    let answer = answer.expect("no answer before the body arrived");
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("--max-buffered-body-bytes"), "{answer}");
    // The first's 408 gives its bytes back.
    let answer = answer_within(&mut first, Duration::from_secs(3)).await;
    assert!(answer.is_some_and(|a| a.starts_with("HTTP/1.1 408")));
    let (st, v) = post(
        &s,
        "/v1/completions",
        json!({"model": "tiny", "prompt": "a", "max_tokens": 1}),
    )
    .await;
    assert_eq!(st, 200, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokenize_and_detokenize_have_size_limits_naming_the_field_and_admission() {
    let s = start(
        ServeOptions {
            max_waiting: 0,
            ..Default::default()
        },
        1,
    )
    .await;
    let limits = &s.state.0.limits;
    let (block, max_bytes) = (limits.block_size, limits.max_prompt_bytes());
    let long = "z".repeat(max_bytes + 1);
    let (st, v) = post(&s, "/tokenize", json!({"prompt": long})).await;
    assert_eq!(
        (st, v["error"]["param"].as_str()),
        (400, Some("prompt")),
        "{v}"
    );
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains(&max_bytes.to_string()),
        "{v}"
    );
    // One id past the context window: refused, naming the limit.
    let (st, v) = post(&s, "/detokenize", json!({"tokens": vec![5; block + 1]})).await;
    assert_eq!(
        (st, v["error"]["param"].as_str()),
        (400, Some("tokens")),
        "{v}"
    );
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains(&block.to_string()),
        "{v}"
    );
    let (st, _) = post(&s, "/detokenize", json!({"tokens": vec![5; block]})).await;
    assert_eq!(st, 200);
    // They take an admission slot: with the only one held, 429.
    let held = s.state.limiter().clone().acquire_owned().await.unwrap();
    assert_eq!(post(&s, "/tokenize", json!({"prompt": "a"})).await.0, 429);
    assert_eq!(post(&s, "/detokenize", json!({"tokens": [1]})).await.0, 429);
    drop(held);
    assert_eq!(post(&s, "/tokenize", json!({"prompt": "a"})).await.0, 200);
}
