//! The accept loop: HTTP/1.1 connections on hyper, each bounded in time to
//! send its headers (`header_read_timeout`, which also closes idle
//! keep-alive connections) and in number (`max_connections`: beyond it a
//! new connection gets a 503 and is closed). Beyond the cap,
//! `probe_connections` more are kept for `/health` alone, so liveness and
//! readiness probes still answer when clients hold every other connection
//! (Kubernetes would otherwise restart a busy pod). Every request's `Host`
//! is checked first ([`super::host`]). On shutdown the listener is
//! closed and open connections drain ([`super::drain`]).
//!
//! A write that makes no progress for `write_timeout` (a client that
//! stopped reading) ends the connection: see [`WriteTimeout`].
//!
//! `axum::serve` offers none of these bounds, hence this loop.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use axum::routing::get;
use axum::Router;

use super::drain::Drained;
use super::host::{check_host, HostPolicy};
use super::{health, router, AppState};
use crate::serving::openai::ApiError;

/// Serves `state` on `listener` until `shutdown` resolves, then closes the
/// listener and drains: open connections get `shutdown_timeout` to finish
/// their requests, and what runs past it is cut.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send,
) -> std::io::Result<Drained> {
    let opts = state.0.opts.clone();
    let hosts = Arc::new(HostPolicy::new(
        opts.allowed_hosts.as_deref(),
        listener.local_addr()?,
    ));
    let check = axum::middleware::from_fn_with_state(hosts, check_host);
    let app = router(state.clone()).layer(check.clone());
    let probe_app = probe_router(state.clone()).layer(check);
    let slots = Arc::new(Semaphore::new(opts.max_connections.max(1)));
    let probe_slots = Arc::new(Semaphore::new(opts.probe_connections));
    let graceful = GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(opts.header_read_timeout);
    let mut probe_http = http.clone();
    probe_http
        .keep_alive(false)
        .header_read_timeout(opts.header_read_timeout.min(PROBE_HEADER_TIMEOUT));
    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors and the like: pause, go on.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        // Beyond the cap, the probe reserve; beyond both, a 503.
        let (slot, app, http) = match slots.clone().try_acquire_owned() {
            Ok(slot) => (slot, app.clone(), &http),
            Err(_) => match probe_slots.clone().try_acquire_owned() {
                Ok(slot) => (slot, probe_app.clone(), &probe_http),
                Err(_) => {
                    tokio::spawn(refuse(stream));
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(app);
        let io = WriteTimeout::new(stream, opts.write_timeout);
        let conn = http.serve_connection(TokioIo::new(io), service);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!("connection ended: {e}");
            }
            drop(slot);
        });
    }
    // Closed, not just unpolled: new connections are refused at once
    // instead of waiting in the kernel's backlog until the process exits.
    drop(listener);
    Ok(state.0.drain.run(graceful, opts.shutdown_timeout).await)
}

/// A connection in the probe reserve must send its request this fast
/// (a probe sends it as soon as it connects), so connections that send
/// nothing cannot hold the reserve for long.
const PROBE_HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// What a connection beyond the cap is told.
const FULL: ApiError = ApiError::Unavailable {
    message: "too many open connections; retry shortly",
};

/// What a connection in the probe reserve may ask: `/health`, one request
/// per connection; any other path gets the 503 of a connection beyond the
/// cap.
fn probe_router(state: AppState) -> Router {
    Router::new()
        .route("/health", get(health))
        .fallback(|| async { FULL })
        .with_state(state)
}

/// Answers a connection beyond the cap (and the probe reserve) with a 503
/// and closes it.
async fn refuse(mut stream: TcpStream) {
    let body = serde_json::to_string(&FULL.body()).unwrap_or_default();
    let head = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    let _ = stream.write_all((head + &body).as_bytes()).await;
    let _ = stream.shutdown().await;
}

/// A connection whose writes fail with `TimedOut` once one has been
/// pending (the peer's receive window full) for `limit`: hyper has no
/// write timeout, and a client that never reads would otherwise hold its
/// connection, and the response behind it, for as long as it likes.
struct WriteTimeout<S> {
    inner: S,
    limit: std::time::Duration,
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<S> WriteTimeout<S> {
    fn new(inner: S, limit: std::time::Duration) -> Self {
        Self {
            inner,
            limit,
            stalled: None,
        }
    }

    /// Passes `ready` through, starting the stall clock on `Pending` and
    /// failing once it runs out.
    fn watch<T>(
        &mut self,
        cx: &mut Context<'_>,
        ready: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if ready.is_ready() {
            self.stalled = None;
            return ready;
        }
        let limit = self.limit;
        let clock = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match clock.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client read nothing for --write-timeout",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for WriteTimeout<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for WriteTimeout<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let ready = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.watch(cx, ready)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let ready = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.watch(cx, ready)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let ready = Pin::new(&mut self.inner).poll_flush(cx);
        self.watch(cx, ready)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let ready = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.watch(cx, ready)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_write_the_peer_never_reads_fails_at_the_write_timeout() {
        // An in-memory pipe with a 1 KiB buffer that nobody reads.
        let (ours, _peer) = tokio::io::duplex(1024);
        let mut io = WriteTimeout::new(ours, Duration::from_millis(200));
        let wrote = tokio::time::timeout(Duration::from_secs(10), io.write_all(&[0; 4096])).await;
        let err = wrote.expect("the write hung past its timeout").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    }

    #[tokio::test]
    async fn writes_the_peer_reads_slowly_never_time_out() {
        use tokio::io::AsyncReadExt;
        let (ours, mut peer) = tokio::io::duplex(1024);
        let mut io = WriteTimeout::new(ours, Duration::from_millis(300));
        let reader = tokio::spawn(async move {
            let mut buf = [0; 512];
            let mut total = 0;
            while total < 8192 {
                tokio::time::sleep(Duration::from_millis(20)).await;
                total += peer.read(&mut buf).await.unwrap();
            }
        });
        io.write_all(&[0; 8192])
            .await
            .expect("progress resets the clock");
        reader.await.unwrap();
    }
}
