//! Reading a request body under the server's limits: what cannot be
//! served is refused before a byte is read (a non-JSON content type, a full
//! server, a declared length over `--body-limit`, a body that would exceed
//! the byte budget of bodies in transit), and the read itself is bounded by
//! `--body-read-timeout`, so slow or stalled bodies cannot pile up memory.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{header, HeaderMap, StatusCode};
use tokio::sync::OwnedSemaphorePermit;

use super::AppState;
use crate::serving::openai::ApiError;

/// A request body, read whole, and the share of the body budget it holds
/// until the handler drops it (right after parsing).
pub struct Body {
    pub bytes: Bytes,
    _budget: OwnedSemaphorePermit,
}

impl AppState {
    /// Reads a request's body, refusing before reading what cannot be
    /// served: a non-JSON content type (415), a full server (429), a
    /// declared length over `--body-limit` (413), bodies in transit over
    /// `--max-buffered-body-bytes` (503); and a body slower than
    /// `--body-read-timeout` (408).
    pub(super) async fn read_body(&self, req: Request) -> Result<Body, ApiError> {
        check_json(req.headers())?;
        if self.0.limiter.available_permits() == 0 {
            return Err(ApiError::Overloaded {
                capacity: self.capacity(),
            });
        }
        let budget = self.reserve_body(req.headers())?;
        let wait = self.0.opts.body_read_timeout;
        let read = tokio::time::timeout(wait, Bytes::from_request(req, &()));
        match read.await {
            Err(_) => Err(ApiError::BodyTimeout {
                secs: wait.as_secs(),
            }),
            Ok(Ok(bytes)) => Ok(Body {
                bytes,
                _budget: budget,
            }),
            Ok(Err(e)) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => Err(ApiError::TooLarge),
            Ok(Err(e)) => Err(ApiError::invalid(
                "",
                format!("cannot read the request body: {e}"),
            )),
        }
    }

    /// The body's share of the budget: its declared length, or the body
    /// limit when it declares none.
    fn reserve_body(&self, headers: &HeaderMap) -> Result<OwnedSemaphorePermit, ApiError> {
        let limit = self.0.opts.body_limit;
        let declared = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if declared.is_some_and(|n| n > limit as u64) {
            return Err(ApiError::TooLarge);
        }
        let total = self.0.opts.max_buffered_body_bytes.min(u32::MAX as usize);
        let want = declared.map_or(limit, |n| n as usize).min(total) as u32;
        self.0
            .body_budget
            .clone()
            .try_acquire_many_owned(want)
            .map_err(|_| ApiError::Unavailable {
                message: "too many request bodies are being received (--max-buffered-body-bytes); retry shortly",
            })
    }
}

/// A body that does not say it is JSON is refused before it is read: a
/// web page can post `text/plain`, or a body with no content type, to a
/// keyless local server without a CORS preflight, but not
/// `application/json`.
fn check_json(headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(ct) = headers.get(header::CONTENT_TYPE) else {
        return Err(ApiError::NotJson {
            mime: "(no content-type)".into(),
        });
    };
    let ct = ct.to_str().unwrap_or("").to_ascii_lowercase();
    let mime = ct.split(';').next().unwrap_or("").trim();
    if mime != "application/json" && !mime.ends_with("+json") {
        return Err(ApiError::NotJson {
            mime: mime.to_string(),
        });
    }
    Ok(())
}
