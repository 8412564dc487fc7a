//! HTTP: `router(state) -> Router` with the OpenAI completions endpoint
//! (JSON and server-sent events), tokenize/detokenize, models, health and
//! Prometheus metrics. Handlers turn validated requests into engine jobs and
//! engine events into text; they never touch tensors.
//!
//! Back-pressure: a semaphore admits at most `max_active + max_waiting`
//! sequences; beyond that a request gets 429 with `Retry-After`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::StreamExt;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_stream::wrappers::{ReceiverStream, UnboundedReceiverStream};
use utoipa::OpenApi;

use crate::decode::{Finish, GenParams, SpecStats, TokenOut};
use crate::engine::{Engine, Event, Job};
use crate::metrics::Metrics;
use crate::openai::*;
use crate::sampling::SamplingParams;
use crate::stop::{Piece, StopText};
use crate::tokenizer::{StreamDecoder, Tokenizer};

#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// Bearer token required on the API routes (None: no auth).
    pub api_key: Option<String>,
    pub request_timeout: Duration,
    pub truncate_max_tokens: bool,
    pub max_waiting: usize,
    pub body_limit: usize,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            api_key: None,
            request_timeout: Duration::from_secs(600),
            truncate_max_tokens: false,
            max_waiting: 64,
            body_limit: 1 << 20,
        }
    }
}

pub struct Inner {
    pub engine: Engine,
    pub tokenizer: Tokenizer,
    pub model_id: String,
    pub block_size: usize,
    pub vocab_size: usize,
    pub metrics: Arc<Metrics>,
    pub opts: ServeOptions,
    limiter: Arc<Semaphore>,
    created: u64,
}

#[derive(Clone)]
pub struct AppState(pub Arc<Inner>);

impl AppState {
    pub fn new(
        engine: Engine,
        tokenizer: Tokenizer,
        model_id: String,
        block_size: usize,
        vocab_size: usize,
        metrics: Arc<Metrics>,
        opts: ServeOptions,
    ) -> Self {
        let permits = engine.config.max_active + opts.max_waiting;
        AppState(Arc::new(Inner {
            engine,
            tokenizer,
            model_id,
            block_size,
            vocab_size,
            metrics,
            opts,
            limiter: Arc::new(Semaphore::new(permits)),
            created: now(),
        }))
    }
}

impl AppState {
    /// The admission semaphore (one permit per decoding or queued sequence).
    pub fn limiter(&self) -> &Arc<Semaphore> {
        &self.0.limiter
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut resp = (status, Json(self.body())).into_response();
        if self.status == 429 || self.status == 503 {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        resp
    }
}

fn server_error(kind: &'static str, status: u16, message: &str) -> ApiError {
    ApiError {
        status,
        message: message.to_string(),
        kind,
        param: None,
        code: None,
    }
}

/// A sequence's events ended without `Done`: the engine stopped (failed)
/// before finishing it. Never a truncated success.
fn engine_stopped() -> ApiError {
    tracing::error!("a sequence ended without finishing: the engine stopped");
    server_error(
        "server_error",
        500,
        "the engine stopped before finishing this completion",
    )
}

/// The request body as bytes, with size and read errors as OpenAI errors.
pub struct Body(pub Bytes);

impl<S: Send + Sync> FromRequest<S> for Body {
    type Rejection = ApiError;
    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        // A body that says it is not JSON is refused before it is read: a
        // web page can post `text/plain` to a keyless local server without
        // a CORS preflight. (No content type at all is read as JSON.)
        if let Some(ct) = req.headers().get(header::CONTENT_TYPE) {
            let ct = ct.to_str().unwrap_or("").to_ascii_lowercase();
            let mime = ct.split(';').next().unwrap_or("").trim();
            if mime != "application/json" && !mime.ends_with("+json") {
                return Err(ApiError {
                    status: 415,
                    ..ApiError::invalid(
                        "",
                        format!("the request body must be JSON (content-type application/json), got `{mime}`"),
                    )
                });
            }
        }
        match Bytes::from_request(req, state).await {
            Ok(b) => Ok(Body(b)),
            Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => Err(ApiError {
                status: 413,
                ..ApiError::invalid(
                    "",
                    "request body is larger than the server's limit (--body-limit)",
                )
            }),
            Err(e) => Err(ApiError::invalid(
                "",
                format!("cannot read the request body: {e}"),
            )),
        }
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "gpt-serve",
        description = "OpenAI-compatible completions with speculative cascade decoding"
    ),
    paths(completions, list_models, tokenize, detokenize, health, metrics),
    components(schemas(
        CompletionRequest,
        CompletionResponse,
        Choice,
        Logprobs,
        Usage,
        ErrorBody,
        ErrorDetail,
        ModelList,
        ModelCard,
        TokenizeRequest,
        TokenizeResponse,
        DetokenizeRequest,
        DetokenizeResponse,
        Prompt,
        Stop,
        StreamOptions
    ))
)]
pub struct ApiDoc;

/// The OpenAPI document of this server (what `proto/openapi.json` holds).
pub fn openapi_json() -> String {
    ApiDoc::openapi()
        .to_pretty_json()
        .expect("the OpenAPI document serializes")
}

pub fn router(state: AppState) -> Router {
    let api = Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(list_models))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), auth));
    Router::new()
        .merge(api)
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route(
            "/openapi.json",
            get(|| async { ([(header::CONTENT_TYPE, "application/json")], openapi_json()) }),
        )
        .layer(DefaultBodyLimit::max(state.0.opts.body_limit))
        .with_state(state)
}

async fn auth(
    State(st): State<AppState>,
    headers: HeaderMap,
    req: Request,
    next: axum::middleware::Next,
) -> Response {
    if let Some(key) = &st.0.opts.api_key {
        let ok = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|t| t == key);
        if !ok {
            return ApiError {
                status: 401,
                code: Some("invalid_api_key"),
                ..ApiError::invalid("", "missing or invalid API key (Authorization: Bearer ...)")
            }
            .into_response();
        }
    }
    next.run(req).await
}

#[utoipa::path(get, path = "/health", responses((status = 200, description = "Model loaded"), (status = 503, description = "Still loading")))]
async fn health(State(st): State<AppState>) -> Response {
    if st.0.engine.failed.load(Ordering::SeqCst) {
        server_error(
            "server_error",
            503,
            "the engine has failed; the server is exiting",
        )
        .into_response()
    } else if st.0.engine.ready.load(Ordering::SeqCst) {
        (StatusCode::OK, "ok").into_response()
    } else {
        server_error("server_error", 503, "model is loading").into_response()
    }
}

#[utoipa::path(get, path = "/metrics", responses((status = 200, description = "Prometheus text format", body = String)))]
async fn metrics(State(st): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        st.0.metrics.render(),
    )
        .into_response()
}

#[utoipa::path(get, path = "/v1/models", responses((status = 200, body = ModelList)))]
async fn list_models(State(st): State<AppState>) -> Json<ModelList> {
    Json(ModelList {
        object: "list".into(),
        data: vec![ModelCard {
            id: st.0.model_id.clone(),
            object: "model".into(),
            created: st.0.created,
            owned_by: "gpt-serve".into(),
            max_model_len: st.0.block_size,
        }],
    })
}

fn check_model(st: &AppState, model: &Option<String>) -> Result<(), ApiError> {
    match model {
        Some(m) if *m != st.0.model_id => Err(ApiError {
            code: Some("model_not_found"),
            ..ApiError::invalid(
                "model",
                format!(
                    "model `{m}` is not served here; this server serves `{}`",
                    st.0.model_id
                ),
            )
        }),
        _ => Ok(()),
    }
}

#[utoipa::path(post, path = "/tokenize", request_body = TokenizeRequest, responses((status = 200, body = TokenizeResponse), (status = 400, body = ErrorBody)))]
async fn tokenize(
    State(st): State<AppState>,
    Body(body): Body,
) -> Result<Json<TokenizeResponse>, ApiError> {
    let req: TokenizeRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::invalid("", format!("invalid request: {e}")))?;
    check_model(&st, &req.model)?;
    let tokens =
        st.0.tokenizer
            .encode(&req.prompt)
            .map_err(|e| ApiError::invalid("prompt", e.to_string()))?;
    Ok(Json(TokenizeResponse {
        count: tokens.len(),
        tokens,
        max_model_len: st.0.block_size,
    }))
}

#[utoipa::path(post, path = "/detokenize", request_body = DetokenizeRequest, responses((status = 200, body = DetokenizeResponse), (status = 400, body = ErrorBody)))]
async fn detokenize(
    State(st): State<AppState>,
    Body(body): Body,
) -> Result<Json<DetokenizeResponse>, ApiError> {
    let req: DetokenizeRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::invalid("", format!("invalid request: {e}")))?;
    check_model(&st, &req.model)?;
    if let Some(t) = req.tokens.iter().find(|t| **t as usize >= st.0.vocab_size) {
        return Err(ApiError::invalid(
            "tokens",
            format!(
                "token id {t} is outside the vocabulary (0..{})",
                st.0.vocab_size
            ),
        ));
    }
    let prompt =
        st.0.tokenizer
            .decode(&req.tokens)
            .map_err(|e| ApiError::invalid("tokens", e.to_string()))?;
    Ok(Json(DetokenizeResponse { prompt }))
}

/// Text, logprobs and finish state of one choice, built from engine events.
struct ChoiceState {
    index: usize,
    decoder: StreamDecoder,
    stop: StopText,
    logprobs: Option<Logprobs>,
    want_logprobs: bool,
    echo: bool,
    prompt: Vec<u32>,
    offset: usize,
    completion_tokens: usize,
    finish: Option<&'static str>,
    cancel: Arc<AtomicBool>,
    stats: SpecStats,
}

impl ChoiceState {
    fn top_map(tok: &Tokenizer, top: &[(u32, f32)]) -> std::collections::BTreeMap<String, f32> {
        top.iter()
            .map(|(id, lp)| (tok.token_text(*id), *lp))
            .collect()
    }

    fn push_logprob(&mut self, tok: &Tokenizer, t: &Option<TokenOut>, id: u32, text_len: usize) {
        if let Some(lp) = &mut self.logprobs {
            lp.tokens.push(tok.token_text(id));
            lp.token_logprobs.push(t.as_ref().and_then(|t| t.logprob));
            lp.top_logprobs
                .push(t.as_ref().map(|t| Self::top_map(tok, &t.top)));
            lp.text_offset.push(self.offset);
        }
        self.offset += text_len;
    }

    /// Applies an event; returns the new text (and logprobs delta start).
    fn apply(&mut self, tok: &Tokenizer, ev: Event) -> Result<String, String> {
        let mut out = String::new();
        match ev {
            Event::Started { echo } => {
                if self.echo {
                    let texts = tok.token_texts(&self.prompt);
                    let prompt = self.prompt.clone();
                    for (i, id) in prompt.iter().enumerate() {
                        let t = echo.get(i).cloned().flatten();
                        self.push_logprob(tok, &t, *id, texts[i].len());
                        out.push_str(&texts[i]);
                    }
                }
            }
            Event::Tokens { tokens: ts, .. } => {
                for t in ts {
                    if self.finish.is_some() {
                        break;
                    }
                    self.completion_tokens += 1;
                    // End-of-text ends the choice; like OpenAI and vLLM, it
                    // is not part of the text (finish_reason says "stop").
                    let piece = match t.id == tok.eot() {
                        true => String::new(),
                        false => self.decoder.push(tok, t.id),
                    };
                    let (text, stopped) = match self.stop.push(&piece) {
                        Piece::Text(s) => (s, false),
                        Piece::Stopped(s) => (s, true),
                    };
                    let id = t.id;
                    self.push_logprob(tok, &Some(t), id, piece.len());
                    out.push_str(&text);
                    if stopped {
                        self.finish = Some("stop");
                        self.cancel.store(true, Ordering::Relaxed);
                    }
                }
            }
            Event::Done { finish, stats } => {
                self.stats = stats;
                if self.finish.is_none() {
                    let rest = self.decoder.flush(tok);
                    match self.stop.push(&rest) {
                        Piece::Text(s) => {
                            out.push_str(&s);
                            out.push_str(&self.stop.flush());
                            self.finish = Some(match finish {
                                Finish::Eot => "stop",
                                Finish::Length => "length",
                            });
                        }
                        Piece::Stopped(s) => {
                            out.push_str(&s);
                            self.finish = Some("stop");
                        }
                    }
                }
            }
            Event::Error(e) => return Err(e),
        }
        Ok(out)
    }

    fn take_logprobs_delta(&mut self) -> Option<Logprobs> {
        if !self.want_logprobs {
            return None;
        }
        self.logprobs.as_mut().map(std::mem::take)
    }
}

struct Submitted {
    states: Vec<ChoiceState>,
    receivers: Vec<mpsc::UnboundedReceiver<Event>>,
    prompt_tokens: usize,
    _permit: OwnedSemaphorePermit,
}

fn submit(st: &AppState, v: &Validated) -> Result<Submitted, ApiError> {
    let n_seq = v.prompts.len() * v.n;
    let capacity = st.0.engine.config.max_active + st.0.opts.max_waiting;
    if n_seq > capacity {
        let param = if v.n > 1 { "n" } else { "prompt" };
        return Err(ApiError::invalid(
            param,
            format!("{n_seq} sequences (prompts x n) exceed this server's capacity of {capacity}"),
        ));
    }
    let permit =
        st.0.limiter
            .clone()
            .try_acquire_many_owned(n_seq as u32)
            .map_err(|_| ApiError {
                status: 429,
                message: format!(
                    "server is at capacity ({} sequences decoding or queued); retry shortly",
                    st.0.engine.config.max_active + st.0.opts.max_waiting
                ),
                kind: "rate_limit_error",
                param: None,
                code: Some("overloaded"),
            })?;
    let seed = v.seed.unwrap_or_else(rand::random);
    let mut states = Vec::with_capacity(n_seq);
    let mut receivers = Vec::with_capacity(n_seq);
    for (i, prompt) in v.prompts.iter().enumerate() {
        for j in 0..v.n {
            let (tx, rx) = mpsc::unbounded_channel();
            let cancel = Arc::new(AtomicBool::new(false));
            let params = GenParams {
                max_tokens: v.max_tokens,
                sampling: SamplingParams {
                    temperature: v.temperature,
                    top_p: v.top_p,
                    presence_penalty: v.presence_penalty,
                    frequency_penalty: v.frequency_penalty,
                    seed,
                },
                choice: j as u32,
                prompt: i as u32,
                logprobs: v.logprobs,
                speculate: v.speculate,
                ..Default::default()
            };
            let echo_lp = (v.echo && v.logprobs.is_some()).then_some(v.logprobs.unwrap_or(0));
            st.0.engine
                .submit(Job {
                    prompt: prompt.clone(),
                    params,
                    echo_logprobs: echo_lp,
                    events: tx,
                    cancel: cancel.clone(),
                })
                .map_err(|e| server_error("server_error", 503, &e))?;
            states.push(ChoiceState {
                index: i * v.n + j,
                decoder: StreamDecoder::new(),
                stop: StopText::new(v.stop.clone()),
                logprobs: v.logprobs.map(|_| Logprobs::default()),
                want_logprobs: v.logprobs.is_some(),
                echo: v.echo,
                prompt: prompt.clone(),
                offset: 0,
                completion_tokens: 0,
                finish: None,
                cancel,
                stats: SpecStats::default(),
            });
            receivers.push(rx);
        }
    }
    let prompt_tokens = v.prompts.iter().map(Vec::len).sum::<usize>() * v.n;
    st.0.metrics.prompt_tokens.inc_by(prompt_tokens as u64);
    Ok(Submitted {
        states,
        receivers,
        prompt_tokens,
        _permit: permit,
    })
}

/// Latency bookkeeping of one request.
struct Timing {
    start: Instant,
    last: Option<Instant>,
}

impl Timing {
    fn tokens(&mut self, m: &Metrics, n: usize) {
        let now = Instant::now();
        match self.last {
            None => m.ttft.observe(now.duration_since(self.start).as_secs_f64()),
            Some(prev) => {
                let per = now.duration_since(prev).as_secs_f64() / n.max(1) as f64;
                for _ in 0..n {
                    m.itl.observe(per);
                }
            }
        }
        self.last = Some(now);
        m.generation_tokens.inc_by(n as u64);
    }
}

fn spec_json(states: &[ChoiceState]) -> serde_json::Value {
    let mut total = SpecStats::default();
    for s in states {
        total.add(&s.stats);
    }
    let mut v = serde_json::to_value(&total).unwrap_or_default();
    v["mean_accepted_per_step"] =
        serde_json::json!(total.accepted as f64 / total.steps.max(1) as f64);
    v
}

#[utoipa::path(post, path = "/v1/completions", request_body = CompletionRequest,
    responses((status = 200, description = "A completion, or server-sent events of chunks with the same shape ending in `data: [DONE]`", body = CompletionResponse),
              (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 413, body = ErrorBody), (status = 415, body = ErrorBody), (status = 429, body = ErrorBody)))]
async fn completions(State(st): State<AppState>, Body(body): Body) -> Result<Response, ApiError> {
    if !st.0.engine.ready.load(Ordering::SeqCst) {
        return Err(server_error("server_error", 503, "model is loading"));
    }
    let limits = Limits {
        model_id: &st.0.model_id,
        block_size: st.0.block_size,
        vocab_size: st.0.vocab_size,
        truncate_max_tokens: st.0.opts.truncate_max_tokens,
        tokenizer: &st.0.tokenizer,
    };
    let v = parse_request(&body)?.validate(&limits)?;
    let sub = submit(&st, &v)?;
    let id = format!("cmpl-{:016x}", rand::random::<u64>());
    if v.stream {
        Ok(stream(st, v, sub, id).into_response())
    } else {
        let timeout = st.0.opts.request_timeout;
        match tokio::time::timeout(timeout, collect(&st, &v, sub, id)).await {
            Ok(r) => r.map(|j| j.into_response()),
            Err(_) => Err(server_error(
                "timeout_error",
                504,
                &format!(
                    "request exceeded the server's timeout of {}s",
                    timeout.as_secs()
                ),
            )),
        }
    }
}

async fn collect(
    st: &AppState,
    v: &Validated,
    mut sub: Submitted,
    id: String,
) -> Result<Json<CompletionResponse>, ApiError> {
    let tok = &st.0.tokenizer;
    let m = &st.0.metrics;
    let mut timing = Timing {
        start: Instant::now(),
        last: None,
    };
    let mut texts = vec![String::new(); sub.states.len()];
    let mut merged = futures::stream::select_all(
        sub.receivers
            .drain(..)
            .enumerate()
            .map(|(i, rx)| UnboundedReceiverStream::new(rx).map(move |e| (i, e))),
    );
    while let Some((i, ev)) = merged.next().await {
        if let Event::Tokens { tokens: ts, .. } = &ev {
            timing.tokens(m, ts.len());
        }
        let s = &mut sub.states[i];
        let piece = s.apply(tok, ev).map_err(|e| {
            tracing::error!("generation failed: {e}");
            server_error("server_error", 500, "generation failed")
        })?;
        texts[i].push_str(&piece);
    }
    if sub.states.iter().any(|s| s.finish.is_none()) {
        return Err(engine_stopped());
    }
    m.e2e.observe(timing.start.elapsed().as_secs_f64());
    let completion_tokens: usize = sub.states.iter().map(|s| s.completion_tokens).sum();
    let choices = sub
        .states
        .iter_mut()
        .zip(texts)
        .map(|(s, text)| {
            let finish = s.finish.unwrap_or("length");
            m.finished(finish);
            Choice {
                text,
                index: s.index,
                logprobs: s.logprobs.take(),
                finish_reason: Some(finish.to_string()),
            }
        })
        .collect();
    Ok(Json(CompletionResponse {
        id,
        object: "text_completion".into(),
        created: now(),
        model: v.model.clone(),
        choices,
        usage: Some(Usage {
            prompt_tokens: sub.prompt_tokens,
            completion_tokens,
            total_tokens: sub.prompt_tokens + completion_tokens,
        }),
        spec_stats: v.spec_stats.then(|| spec_json(&sub.states)),
    }))
}

fn chunk(
    id: &str,
    model: &str,
    choices: Vec<Choice>,
    usage: Option<Usage>,
    spec: Option<serde_json::Value>,
) -> SseEvent {
    let c = CompletionResponse {
        id: id.to_string(),
        object: "text_completion".into(),
        created: now(),
        model: model.to_string(),
        choices,
        usage,
        spec_stats: spec,
    };
    SseEvent::default().data(serde_json::to_string(&c).unwrap_or_default())
}

fn stream(st: AppState, v: Validated, mut sub: Submitted, id: String) -> impl IntoResponse {
    let (tx, rx) = mpsc::channel::<Result<SseEvent, std::convert::Infallible>>(64);
    tokio::spawn(async move {
        let tok = &st.0.tokenizer;
        let m = &st.0.metrics;
        let deadline = tokio::time::Instant::now() + st.0.opts.request_timeout;
        let mut timing = Timing {
            start: Instant::now(),
            last: None,
        };
        let mut merged = futures::stream::select_all(
            sub.receivers
                .drain(..)
                .enumerate()
                .map(|(i, rx)| UnboundedReceiverStream::new(rx).map(move |e| (i, e))),
        );
        loop {
            let next = match tokio::time::timeout_at(deadline, merged.next()).await {
                Ok(Some(x)) => x,
                Ok(None) => break,
                Err(_) => {
                    for s in &sub.states {
                        s.cancel.store(true, Ordering::Relaxed);
                    }
                    let e = server_error(
                        "timeout_error",
                        504,
                        "request exceeded the server's timeout",
                    );
                    let _ = tx
                        .send(Ok(SseEvent::default()
                            .data(serde_json::to_string(&e.body()).unwrap_or_default())))
                        .await;
                    return;
                }
            };
            let (i, ev) = next;
            if let Event::Tokens { tokens: ts, .. } = &ev {
                timing.tokens(m, ts.len());
            }
            let s = &mut sub.states[i];
            let was_finished = s.finish.is_some();
            let text = match s.apply(tok, ev) {
                Ok(t) => t,
                Err(e) => {
                    tracing::error!("generation failed: {e}");
                    let body = server_error("server_error", 500, "generation failed").body();
                    let _ = tx
                        .send(Ok(SseEvent::default()
                            .data(serde_json::to_string(&body).unwrap_or_default())))
                        .await;
                    return;
                }
            };
            let finish = if !was_finished { s.finish } else { None };
            if text.is_empty()
                && finish.is_none()
                && s.logprobs.as_ref().is_none_or(|l| l.tokens.is_empty())
            {
                continue;
            }
            if let Some(f) = finish {
                m.finished(f);
            }
            let choice = Choice {
                text,
                index: s.index,
                logprobs: s.take_logprobs_delta(),
                finish_reason: finish.map(str::to_string),
            };
            if tx
                .send(Ok(chunk(&id, &v.model, vec![choice], None, None)))
                .await
                .is_err()
            {
                // Client gone: stop every sequence of this request.
                for s in &sub.states {
                    s.cancel.store(true, Ordering::Relaxed);
                }
                return;
            }
        }
        if sub.states.iter().any(|s| s.finish.is_none()) {
            let body = engine_stopped().body();
            let _ = tx
                .send(Ok(
                    SseEvent::default().data(serde_json::to_string(&body).unwrap_or_default())
                ))
                .await;
            return;
        }
        m.e2e.observe(timing.start.elapsed().as_secs_f64());
        if v.include_usage || v.spec_stats {
            let completion_tokens: usize = sub.states.iter().map(|s| s.completion_tokens).sum();
            let usage = v.include_usage.then_some(Usage {
                prompt_tokens: sub.prompt_tokens,
                completion_tokens,
                total_tokens: sub.prompt_tokens + completion_tokens,
            });
            let _ = tx
                .send(Ok(chunk(
                    &id,
                    &v.model,
                    vec![],
                    usage,
                    v.spec_stats.then(|| spec_json(&sub.states)),
                )))
                .await;
        }
        let _ = tx.send(Ok(SseEvent::default().data("[DONE]"))).await;
    });
    Sse::new(ReceiverStream::new(rx)).keep_alive(KeepAlive::default())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> ChoiceState {
        ChoiceState {
            index: 0,
            decoder: StreamDecoder::new(),
            stop: StopText::new(vec![]),
            logprobs: None,
            want_logprobs: false,
            echo: false,
            prompt: vec![],
            offset: 0,
            completion_tokens: 0,
            finish: None,
            cancel: Arc::new(AtomicBool::new(false)),
            stats: SpecStats::default(),
        }
    }

    fn token(id: u32) -> TokenOut {
        TokenOut {
            id,
            logprob: None,
            top: vec![],
            gap: 1.0,
        }
    }

    #[test]
    fn a_choice_that_ends_on_end_of_text_leaves_it_out_of_the_text() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/default");
        let Ok(tok) = Tokenizer::from_file(&dir.join("tokenizer.json")) else {
            eprintln!("skipping: models/default/tokenizer.json is absent");
            return;
        };
        let ids = tok.encode("The house").unwrap();
        let mut st = state();
        let mut tokens: Vec<TokenOut> = ids.iter().map(|&id| token(id)).collect();
        tokens.push(token(tok.eot()));
        let mut text = st
            .apply(
                &tok,
                Event::Tokens {
                    tokens,
                    iteration: 0,
                },
            )
            .unwrap();
        let done = Event::Done {
            finish: Finish::Eot,
            stats: SpecStats::default(),
        };
        text += &st.apply(&tok, done).unwrap();
        assert_eq!(text, "The house");
        assert_eq!(st.finish, Some("stop"));
        assert_eq!(st.completion_tokens, ids.len() + 1);
    }
}
