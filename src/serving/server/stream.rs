//! A completion as server-sent events: engine events become chunks as they
//! come, then usage and `[DONE]`. The stream ends early, with an error
//! event where one can still be sent, when the client goes, the request's
//! deadline passes, generation fails, or the shutdown deadline cuts it.

use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::IntoResponse;
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;

use super::completion::Completion;
use super::{drain, response, AppState};
use crate::serving::openai::ApiError;

fn sse_json<T: serde::Serialize>(x: &T) -> SseEvent {
    SseEvent::default().data(serde_json::to_string(x).unwrap_or_default())
}

type SseSender = mpsc::Sender<Result<SseEvent, std::convert::Infallible>>;

/// Why a stream ended early.
enum Ended {
    /// The client went away (its connection closed).
    ClientGone,
    /// The request's deadline passed.
    TimedOut,
    /// An error to report as the stream's last event.
    Failed(ApiError),
}

pub(super) fn stream(
    st: AppState,
    mut comp: Completion,
    id: String,
    deadline: Instant,
) -> impl IntoResponse {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        let error = match pump(&st, &mut comp, &id, deadline, &tx).await {
            Ok(()) => return,
            Err(Ended::ClientGone) => None,
            Err(Ended::TimedOut) => Some(ApiError::Timeout {
                secs: st.0.opts.request_timeout.as_secs(),
            }),
            Err(Ended::Failed(e)) => Some(e),
        };
        comp.cancel();
        if let Some(e) = error {
            // Never waits: a client that does not read gets nothing more.
            let _ = tx.try_send(Ok(sse_json(&e.body())));
        }
    });
    Sse::new(ReceiverStream::new(rx)).keep_alive(KeepAlive::default())
}

/// Sends one event, within the request's deadline.
async fn send(tx: &SseSender, deadline: Instant, ev: SseEvent) -> Result<(), Ended> {
    match tokio::time::timeout_at(deadline, tx.send(Ok(ev))).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(Ended::ClientGone),
        Err(_) => Err(Ended::TimedOut),
    }
}

/// Engine events to chunks until every choice is done, then usage and
/// `[DONE]`. A closed connection is seen at once, even while no tokens come.
async fn pump(
    st: &AppState,
    comp: &mut Completion,
    id: &str,
    deadline: Instant,
    tx: &SseSender,
) -> Result<(), Ended> {
    let (tok, m) = (&st.0.tokenizer, &st.0.metrics);
    let v = comp.request.clone();
    let mut events = comp.events();
    loop {
        let next = tokio::select! {
            _ = tx.closed() => return Err(Ended::ClientGone),
            _ = st.0.drain.cut() => {
                return Err(Ended::Failed(ApiError::Unavailable { message: drain::CUT }))
            }
            next = tokio::time::timeout_at(deadline, events.next()) => next,
        };
        let Some((i, ev)) = next.map_err(|_| Ended::TimedOut)? else {
            break;
        };
        for d in comp.apply(tok, m, i, ev).map_err(Ended::Failed)? {
            if !d.is_empty() {
                let chunk = response(id, &v, vec![d.into_choice()], None, None);
                send(tx, deadline, sse_json(&chunk)).await?;
            }
        }
    }
    comp.finish(m).map_err(Ended::Failed)?;
    if v.output.include_usage || v.output.spec_stats {
        let usage = v.output.include_usage.then(|| comp.usage());
        let last = response(id, &v, vec![], usage, comp.spec_stats());
        send(tx, deadline, sse_json(&last)).await?;
    }
    send(tx, deadline, SseEvent::default().data("[DONE]")).await
}
