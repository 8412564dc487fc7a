//! Draining on shutdown (SIGTERM): the accept loop closes its listener, so
//! new connections are refused and a Kubernetes readiness probe fails at
//! once; a request that still reaches the server on an open connection
//! (`/health` included) answers 503; in-flight requests get
//! `--shutdown-timeout` to finish, and those still running at that
//! deadline are cut: a stream ends with an error event, a JSON request
//! with a 503. [`Drained`] tells the caller whether work was cut, so
//! `serve` exits non-zero when it was.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use hyper_util::server::graceful::GracefulShutdown;
use tokio::sync::watch;

/// How a drain ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Drained {
    /// Every in-flight request finished before the deadline.
    Finished,
    /// The deadline passed with requests still running; they were cut.
    Cut,
}

/// After the cut, how long the cut requests get to send their error
/// (event or 503) before the server stops waiting for their connections.
const CUT_GRACE: Duration = Duration::from_secs(2);

/// The drain's two moments, shared by the accept loop and the handlers.
pub struct Drain {
    /// Set when the drain starts: new requests and `/health` answer 503.
    draining: AtomicBool,
    /// Set at the drain deadline: in-flight requests end with an error.
    cut: watch::Sender<bool>,
}

impl Default for Drain {
    fn default() -> Self {
        Self {
            draining: AtomicBool::new(false),
            cut: watch::Sender::new(false),
        }
    }
}

impl Drain {
    /// Whether the server is draining (it answers new requests with 503).
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Resolves once the drain deadline has cut in-flight work (never,
    /// while the server runs normally).
    pub async fn cut(&self) {
        let mut rx = self.cut.subscribe();
        // The sender lives as long as `self`: wait_for fails only without it.
        let _ = rx.wait_for(|&cut| cut).await;
    }

    /// Starts the drain, waits up to `limit` for the open connections to
    /// finish their requests, and cuts what is left.
    pub(super) async fn run(&self, graceful: GracefulShutdown, limit: Duration) -> Drained {
        self.draining.store(true, Ordering::SeqCst);
        let mut done = Box::pin(graceful.shutdown());
        if tokio::time::timeout(limit, &mut done).await.is_ok() {
            return Drained::Finished;
        }
        tracing::warn!("the shutdown deadline passed with requests in flight; cutting them");
        self.cut.send_replace(true);
        let _ = tokio::time::timeout(CUT_GRACE, done).await;
        Drained::Cut
    }
}

/// What a request cut at the shutdown deadline is told.
pub const CUT: &str =
    "the server shut down before this completion finished (--shutdown-timeout passed); retry";
