//! The `serve` subcommand: its flags, loading the checkpoint and drafter,
//! the memory check, starting the engine and the HTTP server, and what
//! happens on SIGTERM (the server drains: in-flight requests finish, and
//! the exit status is 1 when the deadline cut some) or an engine failure
//! (exit 1, so an orchestrator restarts the process); and the
//! `healthcheck` subcommand that container HEALTHCHECKs run.

use std::path::PathBuf;

use anyhow::Context;

use crate::decode::proposer::Drafters;
use crate::decode::SuffixCache;
use crate::model::cpu::KvDtype;
use crate::model::draft_head::DraftHead;
use crate::{checkpoint, serving::engine, serving::metrics, serving::server};

#[derive(clap::Args)]
pub struct ServeArgs {
    /// Checkpoint directory.
    #[arg(long, env = "GPT_SERVE_MODEL", default_value = "models/default")]
    model: PathBuf,
    #[arg(long, env = "GPT_SERVE_HOST", default_value = "127.0.0.1")]
    host: String,
    #[arg(long, env = "GPT_SERVE_PORT", default_value_t = 8000)]
    port: u16,
    /// Name clients use in `model` (default: the directory name).
    #[arg(long, env = "GPT_SERVE_MODEL_ID")]
    model_id: Option<String>,
    /// Sequences decoding at once (continuous batching: one forward serves
    /// all of them on the CPU; with --device cuda, one forward per sequence).
    #[arg(long, env = "GPT_SERVE_MAX_ACTIVE", default_value_t = 32)]
    max_active: usize,
    /// Rows per forward, all sequences together: prompt chunks, pending
    /// tokens and drafts share it.
    #[arg(long, env = "GPT_SERVE_MAX_BATCH_ROWS", default_value_t = crate::serving::engine::DEFAULT_MAX_BATCH_ROWS)]
    max_batch_rows: usize,
    /// Sequences allowed to wait; beyond, 429.
    #[arg(long, env = "GPT_SERVE_MAX_WAITING", default_value_t = 64)]
    max_waiting: usize,
    /// Bearer token required on API routes (an empty key is refused: it
    /// would turn authentication off). `--help` never prints its value.
    #[arg(
        long,
        env = "GPT_SERVE_API_KEY",
        conflicts_with = "api_key_file",
        hide_env_values = true
    )]
    api_key: Option<String>,
    /// Read the bearer token from this file's first line (a mounted secret).
    #[arg(long, env = "GPT_SERVE_API_KEY_FILE")]
    api_key_file: Option<PathBuf>,
    /// Put /metrics behind the API key too.
    #[arg(long, env = "GPT_SERVE_PROTECT_METRICS")]
    protect_metrics: bool,
    /// Open connections at most; beyond, a new connection gets 503.
    #[arg(long, env = "GPT_SERVE_MAX_CONNECTIONS", default_value_t = 1024)]
    max_connections: usize,
    /// Connections kept beyond --max-connections for /health alone, so
    /// liveness and readiness probes answer when clients hold every other.
    #[arg(long, env = "GPT_SERVE_PROBE_CONNECTIONS", default_value_t = 8)]
    probe_connections: usize,
    /// Host names served (comma-separated; `*`: any; `.example.com`: a
    /// domain and its subdomains), besides IP literals and localhost, which
    /// always are: DNS-rebinding protection. Default: none on a loopback
    /// --host, any elsewhere.
    #[arg(long, env = "GPT_SERVE_ALLOWED_HOSTS", value_delimiter = ',')]
    allowed_hosts: Option<Vec<String>>,
    /// Seconds a client gets to send a request's headers (also closes idle
    /// keep-alive connections).
    #[arg(long, env = "GPT_SERVE_HEADER_READ_TIMEOUT", default_value_t = 10)]
    header_read_timeout: u64,
    /// Seconds a client gets to send a request's body once its headers
    /// are in (408 beyond).
    #[arg(long, env = "GPT_SERVE_BODY_READ_TIMEOUT", default_value_t = 30)]
    body_read_timeout: u64,
    /// Seconds a response write may make no progress (a client that stopped
    /// reading) before the connection is closed.
    #[arg(long, env = "GPT_SERVE_WRITE_TIMEOUT", default_value_t = 30)]
    write_timeout: u64,
    /// Bytes of request bodies being received at once, all connections
    /// together (each counts its Content-Length); beyond, 503 before reading.
    #[arg(long, env = "GPT_SERVE_MAX_BUFFERED_BODY_BYTES", default_value_t = 64 << 20)]
    max_buffered_body_bytes: usize,
    /// Seconds a request may take, counted from its arrival.
    #[arg(long, env = "GPT_SERVE_REQUEST_TIMEOUT", default_value_t = 600)]
    request_timeout: u64,
    /// Clamp max_tokens to the context window instead of answering 400.
    #[arg(long, env = "GPT_SERVE_TRUNCATE_MAX_TOKENS")]
    truncate_max_tokens: bool,
    /// Largest request body in bytes (413 beyond).
    #[arg(long, env = "GPT_SERVE_BODY_LIMIT", default_value_t = 1 << 20)]
    body_limit: usize,
    /// Let early exits truncate drafts (cascade verification).
    #[arg(long, env = "GPT_SERVE_CASCADE")]
    cascade: bool,
    /// Draft trees: greedy (the drafter branches where it is unsure) and
    /// at temperature > 0 (Gumbel-top-k children with the sampler's keyed
    /// noise). Off by default: on the default model they add 2-7% tokens
    /// per verify step but no speed (docs/benchmarks.md).
    #[arg(long, env = "GPT_SERVE_DRAFT_TREES")]
    draft_trees: bool,
    /// With --cascade: an exit truncates at a draft when a rival candidate's
    /// logit beats the draft's by this much.
    #[arg(long, default_value_t = crate::decode::DEFAULT_EXIT_MARGIN)]
    exit_margin: f32,
    /// Tokens of recent prompts and outputs the continuation cache keeps
    /// to draft from (oldest request evicted first; at most 96 bytes a
    /// token; e.g. 262144); 0, the default, turns it off: over HTTP it
    /// did not pay beyond noise on this project's machine
    /// (docs/benchmarks.md).
    #[arg(long, env = "GPT_SERVE_SUFFIX_CACHE_TOKENS", default_value_t = 0)]
    suffix_cache_tokens: usize,
    /// Serve without the drafter (plain decoding only).
    #[arg(long, env = "GPT_SERVE_NO_SPECULATE")]
    no_speculate: bool,
    /// Leave the checkpoint's draft head (draft-head.json) unused: sampled
    /// requests then draft with the tree drafter.
    #[arg(long, env = "GPT_SERVE_NO_DRAFT_HEAD")]
    no_draft_head: bool,
    /// Seconds in-flight requests get to finish after SIGTERM; those still
    /// running then are cut (a stream gets an error event) and the exit
    /// status is 1.
    #[arg(long, env = "GPT_SERVE_SHUTDOWN_TIMEOUT", default_value_t = 30)]
    shutdown_timeout: u64,
    /// Weight storage of the CPU inference path's linear layers: auto (as
    /// the checkpoint stores them), f32, f16 (half the memory traffic), or
    /// GGUF's q8_0 / q4_0 (quantized at load; needs n_embd a multiple of 32).
    #[arg(long, alias = "dtype", env = "GPT_SERVE_WEIGHTS", value_parser = WEIGHTS, default_value = "auto")]
    weights: String,
    /// Storage of the CPU path's KV cache: f32, or f16 (half the bytes
    /// attention reads; logits within f16 rounding of f32's).
    #[arg(long, env = "GPT_SERVE_KV_CACHE", value_parser = KvDtype::NAMES, default_value = "f32")]
    kv_cache: String,
    /// cpu (the CPU inference path), or cuda[:N] (candle's model on the GPU;
    /// builds with the `cuda` feature).
    #[arg(long, env = "GPT_SERVE_DEVICE", default_value = "cpu")]
    device: String,
}

/// The values `--weights` (alias `--dtype`) accepts, here and in `sample`.
pub(crate) const WEIGHTS: [&str; 5] = ["auto", "f32", "f16", "q8_0", "q4_0"];

/// Runs `gpt-serve serve` until SIGTERM, or exits 1 if the engine fails.
pub fn run(a: ServeArgs) -> anyhow::Result<()> {
    let opts = server_options(&a)?;
    let loaded = checkpoint::load(&a.model, &candle_core::Device::Cpu)
        .with_context(|| format!("cannot serve model directory {}", a.model.display()))?;
    let model_id = a.model_id.clone().unwrap_or_else(|| {
        a.model
            .canonicalize()
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "default".into())
    });
    let engine_config = engine_config(&a, &loaded)?;
    let drafters = drafters(&a, &loaded, &engine_config.backend);
    let metrics = std::sync::Arc::new(metrics::Metrics::new());
    let state = server::build(loaded, drafters, engine_config, &model_id, metrics, opts)?;
    serve_until_shutdown(&a, &model_id, state)
}

/// The checkpoint's drafter and draft head, unless `--no-speculate`; one
/// that cannot be loaded is a warning, and serving goes on without it.
fn drafters(a: &ServeArgs, loaded: &checkpoint::Loaded, backend: &engine::Backend) -> Drafters {
    if a.no_speculate {
        return Drafters::default();
    }
    let path = a.model.join(checkpoint::DRAFTER_FILE);
    let tree = crate::drafter::Drafter::load(&path, loaded.config.model.vocab_size)
        .inspect_err(|e| eprintln!("warning: {e}; serving without a drafter (plain decoding)"))
        .ok();
    let head = match a.no_draft_head {
        true => None,
        false => DraftHead::load(&a.model, &loaded.weights)
            .inspect_err(|e| eprintln!("warning: {e}; serving without the draft head"))
            .ok()
            .flatten(),
    };
    let quantized = matches!(backend, engine::Backend::Cpu(dt) if dt.is_quantized());
    let head = head.map(|h| h.threaded_like_model(quantized));
    Drafters { tree, head }
}

/// The engine's settings; on the CPU, refuses to start when the KV caches
/// of `--max-active` sequences cannot fit in memory.
fn engine_config(
    a: &ServeArgs,
    loaded: &checkpoint::Loaded,
) -> anyhow::Result<engine::EngineConfig> {
    let backend = match crate::model::device::parse(&a.device)? {
        candle_core::Device::Cpu => engine::Backend::Cpu(
            loaded
                .weight_dtype(&a.weights)
                .map_err(anyhow::Error::msg)?,
        ),
        gpu => engine::Backend::Candle(gpu),
    };
    check_exit_margin(a.exit_margin)?;
    let kv_cache = KvDtype::parse(&a.kv_cache).map_err(anyhow::Error::msg)?;
    if matches!(backend, engine::Backend::Cpu(_)) {
        if let Some(avail) = crate::serving::memory::available_bytes() {
            let (cfg, n) = (&loaded.config.model, a.max_active.max(1));
            crate::serving::memory::check_kv_fits(cfg, kv_cache, n, avail)
                .map_err(anyhow::Error::msg)?;
        }
    }
    Ok(engine::EngineConfig {
        max_active: a.max_active.max(1),
        max_batch_rows: a.max_batch_rows.max(1),
        fault: None,
        backend,
        cascade: a.cascade,
        draft_trees: a.draft_trees,
        row_costs: None,
        kv_cache,
        exit_margin: a.exit_margin,
        suffix_cache: (a.suffix_cache_tokens > 0 && !a.no_speculate)
            .then(|| std::sync::Arc::new(SuffixCache::new(a.suffix_cache_tokens))),
    })
}

/// `--exit-margin` is a logit margin: 0 or more, `inf` for exits that
/// never cut.
fn check_exit_margin(m: f32) -> anyhow::Result<()> {
    if m.is_nan() || m < 0.0 {
        anyhow::bail!(
            "--exit-margin must be a logit margin of 0 or more (inf: exits never cut), got {m}"
        );
    }
    Ok(())
}

/// An `--api-key` that is empty (or only whitespace) is refused: it would
/// look like a key and turn authentication off. No key at all is keyless.
fn check_api_key(key: Option<String>) -> anyhow::Result<Option<String>> {
    match key {
        Some(k) if k.trim().is_empty() => anyhow::bail!(
            "--api-key (GPT_SERVE_API_KEY) is empty: give a non-empty key, or leave the flag \
             and the variable unset to serve without authentication"
        ),
        key => Ok(key),
    }
}

fn server_options(a: &ServeArgs) -> anyhow::Result<server::ServeOptions> {
    let api_key = match &a.api_key_file {
        Some(path) => Some(server::read_api_key(path).map_err(anyhow::Error::msg)?),
        None => check_api_key(a.api_key.clone())?,
    };
    Ok(server::ServeOptions {
        api_key,
        protect_metrics: a.protect_metrics,
        request_timeout: std::time::Duration::from_secs(a.request_timeout),
        truncate_max_tokens: a.truncate_max_tokens,
        max_waiting: a.max_waiting,
        body_limit: a.body_limit,
        max_connections: a.max_connections,
        probe_connections: a.probe_connections,
        header_read_timeout: std::time::Duration::from_secs(a.header_read_timeout),
        body_read_timeout: std::time::Duration::from_secs(a.body_read_timeout),
        write_timeout: std::time::Duration::from_secs(a.write_timeout),
        max_buffered_body_bytes: a.max_buffered_body_bytes,
        shutdown_timeout: std::time::Duration::from_secs(a.shutdown_timeout),
        allowed_hosts: a.allowed_hosts.clone(),
    })
}

/// Listens and serves until SIGTERM (in-flight requests get
/// `--shutdown-timeout` to finish; an error when some were cut) or an
/// engine failure (exit 1).
fn serve_until_shutdown(
    a: &ServeArgs,
    model_id: &str,
    state: server::AppState,
) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let addr = format!("{}:{}", a.host, a.port);
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        eprintln!(
            "gpt-serve: serving `{model_id}` on http://{}",
            listener.local_addr()?
        );
        let deadline = a.shutdown_timeout;
        let failed = state.0.engine.failed.clone();
        tokio::spawn(async move {
            // An engine that cannot continue takes the process down (after
            // in-flight requests got their errors), so an orchestrator
            // restarts it instead of routing to a server that answers 503.
            while !failed.load(std::sync::atomic::Ordering::SeqCst) {
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            eprintln!("gpt-serve: the engine failed (see the log above); exiting");
            std::process::exit(1);
        });
        let drained = server::serve(listener, state, async move {
            shutdown_signal().await;
            eprintln!("gpt-serve: shutting down, finishing in-flight requests (up to {deadline}s)");
        })
        .await?;
        match drained {
            server::Drained::Finished => Ok(()),
            server::Drained::Cut => anyhow::bail!(
                "the shutdown deadline (--shutdown-timeout {deadline}s) cut in-flight requests"
            ),
        }
    })
}

/// `gpt-serve healthcheck`: Ok when a local server answers /health with 200.
pub fn healthcheck(port: u16) -> anyhow::Result<()> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))
        .with_context(|| format!("no server on port {port}"))?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(3)))?;
    s.write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    if resp.starts_with("HTTP/1.1 200") {
        Ok(())
    } else {
        anyhow::bail!("unhealthy: {}", resp.lines().next().unwrap_or(""))
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            s.recv().await;
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_api_key_is_refused_by_name_and_no_key_is_keyless() {
        for empty in ["", "  "] {
            let e = check_api_key(Some(empty.into())).unwrap_err().to_string();
            assert!(e.contains("--api-key") && e.contains("empty"), "{e}");
        }
        assert_eq!(check_api_key(None).unwrap(), None);
        assert_eq!(
            check_api_key(Some("k".into())).unwrap().as_deref(),
            Some("k")
        );
    }

    #[test]
    fn an_exit_margin_below_zero_or_not_a_number_is_refused_by_name() {
        for ok in [0.0, 1.0, f32::INFINITY] {
            assert!(check_exit_margin(ok).is_ok(), "{ok}");
        }
        for bad in [-0.5, f32::NAN] {
            let e = check_exit_margin(bad).unwrap_err().to_string();
            assert!(
                e.contains("--exit-margin") && e.contains("0 or more"),
                "{e}"
            );
        }
    }
}
