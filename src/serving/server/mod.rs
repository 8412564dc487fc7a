//! HTTP: [`router`] with the OpenAI completions endpoint (JSON and
//! server-sent events), tokenize/detokenize, models, health and Prometheus
//! metrics; [`build`] assembles the engine and the state from a checkpoint
//! and [`serve`] runs the accept loop, for `gpt-serve serve` and the tests
//! alike. Handlers turn validated requests into engine jobs and engine
//! events into text; they never touch tensors.
//!
//! A request's path: parse and check every field, counts and byte lengths
//! ([`crate::serving::openai`]); take admission slots (429 beyond `max_active +
//! max_waiting`); tokenize off the async runtime; one engine job per
//! sequence, each carrying its slot, which the engine frees when it drops
//! the sequence; then the events become a JSON body or a stream
//! ([`completion`]). Every wait is bounded by the request's deadline.

mod body;
mod completion;
mod drain;
mod host;
mod listen;
mod openapi;
mod stream;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::StreamExt;
use subtle::ConstantTimeEq;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::checkpoint::Loaded;
use crate::decode::proposer::Drafters;
use crate::serving::engine::{Engine, EngineConfig, Job, EVENT_BUFFER};
use crate::serving::metrics::Metrics;
use crate::serving::openai::*;
use crate::tokenizer::Tokenizer;
pub use body::Body;
use completion::{ChoiceState, Completion, Delta};
pub use drain::{Drain, Drained};
pub use host::HostPolicy;
pub use listen::serve;
pub use openapi::{openapi_json, openapi_json_for, ApiDoc, DOCUMENTED_MODEL_ID};

#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// Bearer token required on the API routes (None: no auth).
    pub api_key: Option<String>,
    /// Put `/metrics` behind the API key too.
    pub protect_metrics: bool,
    pub request_timeout: Duration,
    pub truncate_max_tokens: bool,
    pub max_waiting: usize,
    pub body_limit: usize,
    /// Open connections at most; beyond, a connection gets 503 and is
    /// closed.
    pub max_connections: usize,
    /// Connections kept beyond `max_connections` for `/health` alone (one
    /// request each), so probes answer when clients hold every other one.
    pub probe_connections: usize,
    /// A client must send a request's headers within this time.
    pub header_read_timeout: Duration,
    /// A client must send a request's body within this time (408 beyond).
    pub body_read_timeout: Duration,
    /// A write of the response that makes no progress for this long closes
    /// the connection (a client that stopped reading).
    pub write_timeout: Duration,
    /// Request bodies being received, all together, hold at most this many
    /// bytes (each counts its Content-Length, or `body_limit` without
    /// one); beyond, 503 before the body is read.
    pub max_buffered_body_bytes: usize,
    /// `Host` names served besides IP literals and `localhost` (`*`: any;
    /// `.example.com`: a domain); None: none on a loopback address, any
    /// elsewhere ([`HostPolicy`]).
    pub allowed_hosts: Option<Vec<String>>,
    /// After shutdown begins, in-flight requests get this long to finish;
    /// then they are cut (a stream gets an error event).
    pub shutdown_timeout: Duration,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            api_key: None,
            protect_metrics: false,
            request_timeout: Duration::from_secs(600),
            truncate_max_tokens: false,
            max_waiting: 64,
            body_limit: 1 << 20,
            max_connections: 1024,
            probe_connections: 8,
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(30),
            write_timeout: Duration::from_secs(30),
            max_buffered_body_bytes: 64 << 20,
            shutdown_timeout: Duration::from_secs(30),
            allowed_hosts: None,
        }
    }
}

/// Reads an API key from a file (a mounted secret): the first line,
/// without surrounding whitespace; an unreadable or empty file is an error
/// naming it.
pub fn read_api_key(path: &std::path::Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("--api-key-file {}: {e}", path.display()))?;
    match text.lines().next().map(str::trim) {
        Some(key) if !key.is_empty() => Ok(key.to_string()),
        _ => Err(format!(
            "--api-key-file {}: the file is empty (expected the key on its first line)",
            path.display()
        )),
    }
}

pub struct Inner {
    pub engine: Engine,
    pub tokenizer: Arc<Tokenizer>,
    pub limits: Limits,
    pub metrics: Arc<Metrics>,
    pub opts: ServeOptions,
    limiter: Arc<Semaphore>,
    /// Bytes of request bodies being received (`max_buffered_body_bytes`).
    body_budget: Arc<Semaphore>,
    /// Shutdown: draining, then cutting what is left.
    pub drain: Drain,
    created: u64,
}

#[derive(Clone)]
pub struct AppState(pub Arc<Inner>);

/// Starts the engine on a loaded checkpoint and builds the server's state:
/// what `gpt-serve serve` and the tests both run.
pub fn build(
    loaded: Loaded,
    drafters: impl Into<Drafters>,
    engine: EngineConfig,
    model_id: &str,
    metrics: Arc<Metrics>,
    opts: ServeOptions,
) -> std::io::Result<AppState> {
    if opts.api_key.as_deref().is_some_and(|k| k.trim().is_empty()) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "api_key is empty: an empty key would turn authentication off",
        ));
    }
    let cfg = loaded.config.model.clone();
    let tokenizer = Arc::new(loaded.tokenizer.clone());
    let engine = Engine::spawn(loaded, drafters, engine, metrics.clone())?;
    let limits = Limits::new(
        model_id,
        &tokenizer,
        cfg.block_size,
        cfg.vocab_size,
        opts.truncate_max_tokens,
    );
    let permits = engine.config.max_active + opts.max_waiting;
    Ok(AppState(Arc::new(Inner {
        engine,
        tokenizer,
        limits,
        metrics,
        limiter: Arc::new(Semaphore::new(permits)),
        body_budget: Arc::new(Semaphore::new(
            opts.max_buffered_body_bytes.min(u32::MAX as usize),
        )),
        opts,
        drain: Drain::default(),
        created: now(),
    })))
}

impl AppState {
    /// The admission semaphore (one permit per decoding or queued sequence).
    pub fn limiter(&self) -> &Arc<Semaphore> {
        &self.0.limiter
    }

    /// Decoding plus queued sequences at most.
    pub fn capacity(&self) -> usize {
        self.0.engine.config.max_active + self.0.opts.max_waiting
    }

    /// Waits until the model is loaded (or `limit` passes); tests use it.
    pub async fn wait_ready(&self, limit: Duration) -> bool {
        let until = Instant::now() + limit;
        while Instant::now() < until {
            if self.0.engine.ready.load(Ordering::SeqCst) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    }

    fn check_ready(&self) -> Result<(), ApiError> {
        if self.0.drain.is_draining() {
            return Err(ApiError::Unavailable {
                message: "the server is shutting down; retry on another replica",
            });
        }
        if self.0.engine.failed.load(Ordering::SeqCst) {
            return Err(ApiError::Unavailable {
                message: "the engine has failed; the server is exiting",
            });
        }
        match self.0.engine.ready.load(Ordering::SeqCst) {
            true => Ok(()),
            false => Err(ApiError::Unavailable {
                message: "model is loading",
            }),
        }
    }

    /// One slot per sequence, or 429 (400 when no server state could ever
    /// take the request).
    fn admit<P>(&self, v: &Validated<P>) -> Result<OwnedSemaphorePermit, ApiError> {
        let (n_seq, capacity) = (v.sequences(), self.capacity());
        if n_seq > capacity {
            let param = if v.n > 1 { "n" } else { "prompt" };
            return Err(ApiError::invalid(
                param,
                format!(
                    "{n_seq} sequences (prompts x n) exceed this server's capacity of {capacity}"
                ),
            ));
        }
        self.0
            .limiter
            .clone()
            .try_acquire_many_owned(n_seq as u32)
            .map_err(|_| ApiError::Overloaded { capacity })
    }

    /// One slot for a /tokenize or /detokenize request, or 429: their
    /// tokenizer work counts against the same capacity as sequences.
    fn admit_one(&self) -> Result<OwnedSemaphorePermit, ApiError> {
        self.0
            .limiter
            .clone()
            .try_acquire_owned()
            .map_err(|_| ApiError::Overloaded {
                capacity: self.capacity(),
            })
    }

    /// Tokenizes the prompts on a blocking thread.
    async fn tokenize(&self, v: Validated<PromptInput>) -> Result<Validated, ApiError> {
        let (tok, m) = (self.0.tokenizer.clone(), self.0.metrics.clone());
        blocking(move || {
            let t = std::time::Instant::now();
            let v = v.tokenize(&tok);
            m.tokenize_seconds.observe(t.elapsed().as_secs_f64());
            v
        })
        .await?
    }

    /// One engine job per sequence, each with one of the request's slots.
    fn submit(
        &self,
        v: Arc<Validated>,
        mut permit: OwnedSemaphorePermit,
        deadline: Instant,
    ) -> Result<Completion, ApiError> {
        let mut choices = Vec::with_capacity(v.sequences());
        let mut receivers = Vec::with_capacity(v.sequences());
        let mut permits: Vec<OwnedSemaphorePermit> = std::iter::from_fn(|| {
            (permit.num_permits() > 1)
                .then(|| permit.split(1))
                .flatten()
        })
        .collect();
        permits.push(permit);
        let mut permits = permits.into_iter();
        for prompt in 0..v.prompts.len() {
            for choice in 0..v.n {
                let (events, rx) = mpsc::channel(EVENT_BUFFER);
                let cancel = Arc::new(AtomicBool::new(false));
                let index = prompt * v.n + choice;
                let permit = permits.next().ok_or_else(|| ApiError::Internal {
                    message: "fewer admission slots than sequences".into(),
                })?;
                self.0
                    .engine
                    .submit(Job {
                        request: v.clone(),
                        prompt,
                        choice,
                        events,
                        cancel: cancel.clone(),
                        permit,
                        deadline: deadline.into_std(),
                    })
                    .map_err(|_| ApiError::Unavailable {
                        message: "the engine has stopped",
                    })?;
                choices.push(ChoiceState::new(
                    index,
                    prompt,
                    v.stopping.stop.clone(),
                    cancel,
                ));
                receivers.push(rx);
            }
        }
        let m = &self.0.metrics;
        m.prompt_tokens
            .inc_by(v.prompts.iter().map(Vec::len).sum::<usize>() as u64 * v.n as u64);
        Ok(Completion::new(v, choices, receivers))
    }
}

/// Runs tokenizer work off the async workers holding an admission slot;
/// work still queued for a blocking thread when the client leaves (the
/// handler is dropped) is skipped. Started work runs to its end, bounded
/// by the endpoint's size limits, and keeps its slot until then.
async fn cancellable<T: Send + 'static>(
    permit: OwnedSemaphorePermit,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApiError> {
    struct CancelOnDrop(Arc<AtomicBool>);
    impl Drop for CancelOnDrop {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }
    let guard = CancelOnDrop(Arc::new(AtomicBool::new(false)));
    let cancelled = guard.0.clone();
    let done = blocking(move || {
        let _permit = permit;
        (!cancelled.load(Ordering::SeqCst)).then(f)
    })
    .await?;
    done.ok_or_else(|| ApiError::Internal {
        message: "cancelled".into(),
    })
}

/// Runs CPU work (tokenizing) off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::Internal {
            message: format!("a tokenizer task failed: {e}"),
        })
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut resp = (status, Json(self.body())).into_response();
        if self.retry_later() {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        resp
    }
}

pub fn router(state: AppState) -> Router {
    let mut api = Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(list_models))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize));
    let mut open = Router::new().route("/health", get(health)).route(
        "/openapi.json",
        get(|State(st): State<AppState>| async move {
            let doc = openapi_json_for(&st.0.limits.model_id);
            ([(header::CONTENT_TYPE, "application/json")], doc)
        }),
    );
    match state.0.opts.protect_metrics {
        true => api = api.route("/metrics", get(metrics)),
        false => open = open.route("/metrics", get(metrics)),
    }
    let api = api.route_layer(axum::middleware::from_fn_with_state(state.clone(), auth));
    Router::new()
        .merge(api)
        .merge(open)
        .fallback(no_route)
        .layer(DefaultBodyLimit::max(state.0.opts.body_limit))
        .with_state(state)
}

/// An unknown path: OpenAI's error body, not an empty 404.
async fn no_route(uri: axum::http::Uri) -> ApiError {
    ApiError::NoRoute {
        path: uri.path().to_string(),
    }
}

async fn auth(
    State(st): State<AppState>,
    headers: HeaderMap,
    req: Request,
    next: axum::middleware::Next,
) -> Response {
    if let Some(key) = &st.0.opts.api_key {
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        // Constant time: the comparison takes as long whichever byte
        // differs (only the length can be told apart).
        if !bool::from(given.as_bytes().ct_eq(key.as_bytes())) {
            return ApiError::Unauthorized.into_response();
        }
    }
    next.run(req).await
}

#[utoipa::path(get, path = "/health", responses((status = 200, description = "Model loaded"), (status = 503, description = "Still loading, or the engine failed", body = ErrorBody)))]
pub(super) async fn health(State(st): State<AppState>) -> Response {
    match st.check_ready() {
        Ok(()) => (StatusCode::OK, "ok").into_response(),
        Err(e) => e.into_response(),
    }
}

#[utoipa::path(get, path = "/metrics", responses((status = 200, description = "Prometheus text format", body = String), (status = 401, body = ErrorBody)))]
async fn metrics(State(st): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        st.0.metrics.render(),
    )
        .into_response()
}

#[utoipa::path(get, path = "/v1/models", responses((status = 200, body = ModelList), (status = 401, body = ErrorBody)))]
async fn list_models(State(st): State<AppState>) -> Json<ModelList> {
    Json(ModelList {
        object: "list".into(),
        data: vec![ModelCard {
            id: st.0.limits.model_id.clone(),
            object: "model".into(),
            created: st.0.created,
            owned_by: "gpt-serve".into(),
            max_model_len: st.0.limits.block_size,
        }],
    })
}

/// An optional `model` (tokenize, detokenize) must name the served one.
fn check_model(st: &AppState, model: &Option<String>) -> Result<(), ApiError> {
    model
        .as_deref()
        .map_or(Ok(()), |m| st.0.limits.check_model(m))
}

fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::invalid("", format!("invalid request: {e}")))
}

#[utoipa::path(post, path = "/tokenize", request_body = TokenizeRequest, responses((status = 200, body = TokenizeResponse), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody), (status = 413, body = ErrorBody), (status = 415, body = ErrorBody), (status = 429, body = ErrorBody)))]
async fn tokenize(
    State(st): State<AppState>,
    req: Request,
) -> Result<Json<TokenizeResponse>, ApiError> {
    let req: TokenizeRequest = parse(&st.read_body(req).await?.bytes)?;
    check_model(&st, &req.model)?;
    let limits = &st.0.limits;
    let max = limits.max_prompt_bytes();
    if req.prompt.len() > max {
        return Err(ApiError::invalid(
            "prompt",
            format!(
                "prompt is {} bytes; /tokenize takes at most {max} (what the {}-token context window can hold)",
                req.prompt.len(),
                limits.block_size
            ),
        ));
    }
    let permit = st.admit_one()?;
    let tok = st.0.tokenizer.clone();
    let tokens = cancellable(permit, move || tok.encode(&req.prompt))
        .await?
        .map_err(|e| ApiError::invalid("prompt", e.to_string()))?;
    Ok(Json(TokenizeResponse {
        count: tokens.len(),
        tokens,
        max_model_len: st.0.limits.block_size,
    }))
}

#[utoipa::path(post, path = "/detokenize", request_body = DetokenizeRequest, responses((status = 200, body = DetokenizeResponse), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody), (status = 413, body = ErrorBody), (status = 415, body = ErrorBody), (status = 429, body = ErrorBody)))]
async fn detokenize(
    State(st): State<AppState>,
    req: Request,
) -> Result<Json<DetokenizeResponse>, ApiError> {
    let req: DetokenizeRequest = parse(&st.read_body(req).await?.bytes)?;
    check_model(&st, &req.model)?;
    check_detokenize(&st.0.limits, &req.tokens)?;
    let permit = st.admit_one()?;
    let tok = st.0.tokenizer.clone();
    let prompt = cancellable(permit, move || tok.decode(&req.tokens))
        .await?
        .map_err(|e| ApiError::invalid("tokens", e.to_string()))?;
    Ok(Json(DetokenizeResponse { prompt }))
}

/// At most a context window of ids, each in the vocabulary: the text is
/// then at most `max_prompt_bytes` (a window of the longest token), where
/// unbounded ids of a long token multiplied the body many times over.
fn check_detokenize(limits: &Limits, tokens: &[u32]) -> Result<(), ApiError> {
    let (block, vocab) = (limits.block_size, limits.vocab_size);
    if tokens.len() > block {
        return Err(ApiError::invalid(
            "tokens",
            format!(
                "{} token ids; /detokenize takes at most {block} (the context window; output at most {} bytes)",
                tokens.len(),
                limits.max_prompt_bytes()
            ),
        ));
    }
    match tokens.iter().find(|t| **t as usize >= vocab) {
        Some(t) => Err(ApiError::invalid(
            "tokens",
            format!("token id {t} is outside the vocabulary (0..{vocab})"),
        )),
        None => Ok(()),
    }
}

#[utoipa::path(post, path = "/v1/completions", request_body = CompletionRequest,
    responses((status = 200, description = "A completion, or (with `stream`) server-sent events of chunks with the same shape ending in `data: [DONE]`",
               content((CompletionResponse = "application/json"), (Object = "text/event-stream"))),
              (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody), (status = 408, body = ErrorBody), (status = 413, body = ErrorBody), (status = 415, body = ErrorBody),
              (status = 429, body = ErrorBody), (status = 500, body = ErrorBody), (status = 503, body = ErrorBody), (status = 504, body = ErrorBody)))]
async fn completions(State(st): State<AppState>, req: Request) -> Result<Response, ApiError> {
    // The deadline counts from the request's arrival, body read included.
    let timeout = st.0.opts.request_timeout;
    let deadline = Instant::now() + timeout;
    st.check_ready()?;
    let body = st.read_body(req).await?;
    let checked = parse_request(&body.bytes)?.validate(&st.0.limits)?;
    drop(body);
    let permit = st.admit(&checked)?;
    let v = Arc::new(st.tokenize(checked).await?);
    let comp = st.submit(v.clone(), permit, deadline)?;
    let id = format!("cmpl-{:016x}", rand::random::<u64>());
    if v.output.stream {
        return Ok(stream::stream(st, comp, id, deadline).into_response());
    }
    let collected = tokio::time::timeout_at(deadline, collect(&st, comp, id));
    tokio::select! {
        done = collected => match done {
            Ok(r) => r.map(IntoResponse::into_response),
            Err(_) => Err(ApiError::Timeout {
                secs: timeout.as_secs(),
            }),
        },
        _ = st.0.drain.cut() => Err(ApiError::Unavailable { message: drain::CUT }),
    }
}

fn response(
    id: &str,
    v: &Validated,
    choices: Vec<Choice>,
    usage: Option<Usage>,
    spec_stats: Option<serde_json::Value>,
) -> CompletionResponse {
    CompletionResponse {
        id: id.to_string(),
        object: "text_completion".into(),
        created: now(),
        model: v.model.clone(),
        choices,
        usage,
        spec_stats,
    }
}

async fn collect(
    st: &AppState,
    mut comp: Completion,
    id: String,
) -> Result<Json<CompletionResponse>, ApiError> {
    let (tok, m) = (&st.0.tokenizer, &st.0.metrics);
    let v = comp.request.clone();
    let mut all: Vec<Delta> = (0..v.sequences()).map(|i| Delta::new(i, &v)).collect();
    let mut events = comp.events();
    while let Some((i, ev)) = events.next().await {
        for d in comp.apply(tok, m, i, ev)? {
            let index = d.index;
            all[index].absorb(d);
        }
    }
    comp.finish(m)?;
    let choices = all.into_iter().map(Delta::into_choice).collect();
    Ok(Json(response(
        &id,
        &v,
        choices,
        Some(comp.usage()),
        comp.spec_stats(),
    )))
}
