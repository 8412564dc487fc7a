//! [`ApiError`]: every error the API answers with, and its one mapping to
//! an HTTP status, an OpenAI error `type`, `code` and `param`, and the
//! [`ErrorBody`] a client reads (as text-generation-inference's router
//! does). `server` turns it into a response.

use super::wire::{ErrorBody, ErrorDetail};

/// Every error the API answers with, and its one mapping to an HTTP status,
/// an OpenAI error `type` and `code` ([`ApiError::status`],
/// [`ApiError::body`]); `server` turns it into a response.
#[derive(Debug, Clone, PartialEq)]
pub enum ApiError {
    /// 400: a field is malformed or outside its limit (the message names
    /// both).
    Invalid {
        param: Option<String>,
        message: String,
    },
    /// 400 `context_length_exceeded`: prompt plus completion exceed the
    /// model's context.
    ContextLength {
        param: &'static str,
        message: String,
    },
    /// 401 `invalid_api_key`.
    Unauthorized,
    /// 403: the `Host` header names a host this server does not answer
    /// for (DNS-rebinding protection; `--allowed-hosts`).
    HostNotAllowed { host: String },
    /// 404 `model_not_found`.
    ModelNotFound { asked: String, served: String },
    /// 404: no such endpoint.
    NoRoute { path: String },
    /// 413: the body is larger than `--body-limit`.
    TooLarge,
    /// 408: the body did not arrive within `--body-read-timeout`.
    BodyTimeout { secs: u64 },
    /// 415: the body says it is not JSON.
    NotJson { mime: String },
    /// 429 `overloaded`: every decoding and queue slot is taken.
    Overloaded { capacity: usize },
    /// 500: the engine failed or stopped before finishing a sequence.
    Internal { message: String },
    /// 503: the model is still loading, or the engine has failed.
    Unavailable { message: &'static str },
    /// 504: the request ran past `--request-timeout`.
    Timeout { secs: u64 },
}

impl ApiError {
    /// A 400 naming the field (`param` empty: the body as a whole).
    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        Self::Invalid {
            param: (!param.is_empty()).then(|| param.to_string()),
            message: message.into(),
        }
    }

    pub fn status(&self) -> u16 {
        match self {
            Self::Invalid { .. } | Self::ContextLength { .. } => 400,
            Self::Unauthorized => 401,
            Self::HostNotAllowed { .. } => 403,
            Self::ModelNotFound { .. } | Self::NoRoute { .. } => 404,
            Self::BodyTimeout { .. } => 408,
            Self::TooLarge => 413,
            Self::NotJson { .. } => 415,
            Self::Overloaded { .. } => 429,
            Self::Internal { .. } => 500,
            Self::Unavailable { .. } => 503,
            Self::Timeout { .. } => 504,
        }
    }

    /// OpenAI's error `type`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Overloaded { .. } => "rate_limit_error",
            Self::Internal { .. } | Self::Unavailable { .. } => "server_error",
            Self::Timeout { .. } => "timeout_error",
            _ => "invalid_request_error",
        }
    }

    pub fn code(&self) -> Option<&'static str> {
        match self {
            Self::ContextLength { .. } => Some("context_length_exceeded"),
            Self::Unauthorized => Some("invalid_api_key"),
            Self::ModelNotFound { .. } => Some("model_not_found"),
            Self::Overloaded { .. } => Some("overloaded"),
            _ => None,
        }
    }

    pub fn param(&self) -> Option<&str> {
        match self {
            Self::Invalid { param, .. } => param.as_deref(),
            Self::ContextLength { param, .. } => Some(param),
            Self::ModelNotFound { .. } => Some("model"),
            _ => None,
        }
    }

    pub fn message(&self) -> String {
        match self {
            Self::Invalid { message, .. }
            | Self::ContextLength { message, .. }
            | Self::Internal { message } => message.clone(),
            Self::Unauthorized => "missing or invalid API key (Authorization: Bearer ...)".into(),
            Self::ModelNotFound { asked, served } => {
                format!("model `{asked}` is not served here; this server serves `{served}`")
            }
            Self::NoRoute { path } => format!("no endpoint at `{path}`"),
            Self::HostNotAllowed { host } => format!(
                "Host `{host}` is not a name this server answers for (DNS-rebinding \
                 protection); add it to --allowed-hosts (GPT_SERVE_ALLOWED_HOSTS) to allow it"
            ),
            Self::BodyTimeout { secs } => {
                format!("the request body did not arrive within {secs}s (--body-read-timeout)")
            }
            Self::TooLarge => {
                "request body is larger than the server's limit (--body-limit)".into()
            }
            Self::NotJson { mime } => format!(
                "the request body must be JSON (content-type application/json), got `{mime}`"
            ),
            Self::Overloaded { capacity } => format!(
                "server is at capacity ({capacity} sequences decoding or queued); retry shortly"
            ),
            Self::Unavailable { message } => message.to_string(),
            Self::Timeout { secs } => {
                format!("request exceeded the server's timeout of {secs}s")
            }
        }
    }

    /// Whether a client should retry later (`Retry-After`).
    pub fn retry_later(&self) -> bool {
        matches!(self, Self::Overloaded { .. } | Self::Unavailable { .. })
    }

    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                message: self.message(),
                kind: self.kind().to_string(),
                param: self.param().map(str::to_string),
                code: self.code().map(str::to_string),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_maps_to_one_status_type_and_code() {
        let cases = [
            (
                ApiError::invalid("n", "x"),
                400,
                "invalid_request_error",
                None,
            ),
            (
                ApiError::Unauthorized,
                401,
                "invalid_request_error",
                Some("invalid_api_key"),
            ),
            (
                ApiError::ModelNotFound {
                    asked: "a".into(),
                    served: "b".into(),
                },
                404,
                "invalid_request_error",
                Some("model_not_found"),
            ),
            (
                ApiError::NoRoute { path: "/x".into() },
                404,
                "invalid_request_error",
                None,
            ),
            (ApiError::TooLarge, 413, "invalid_request_error", None),
            (
                ApiError::NotJson {
                    mime: "text/plain".into(),
                },
                415,
                "invalid_request_error",
                None,
            ),
            (
                ApiError::Overloaded { capacity: 3 },
                429,
                "rate_limit_error",
                Some("overloaded"),
            ),
            (
                ApiError::Internal {
                    message: "x".into(),
                },
                500,
                "server_error",
                None,
            ),
            (
                ApiError::Unavailable { message: "x" },
                503,
                "server_error",
                None,
            ),
            (ApiError::Timeout { secs: 1 }, 504, "timeout_error", None),
        ];
        for (e, status, kind, code) in cases {
            let body = e.body();
            assert_eq!(
                (e.status(), body.error.kind.as_str()),
                (status, kind),
                "{e:?}"
            );
            assert_eq!(body.error.code.as_deref(), code, "{e:?}");
            assert!(!body.error.message.is_empty());
        }
    }
}
