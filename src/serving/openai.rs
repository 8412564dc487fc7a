//! OpenAI completions wire types and validation.
//!
//! A raw [`CompletionRequest`] becomes a [`Validated`] request or an
//! [`ApiError`] naming the field and the limit; later code never sees
//! unchecked input. Fields OpenAI defines that we do not implement are
//! refused by name, except harmless defaults clients send anyway
//! (`best_of: 1`, `logit_bias: {}`, `suffix: null`). No tensors here.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::sampling::SamplingParams;
use crate::tokenizer::Tokenizer;

/// `prompt`: a string, strings, token ids, or lists of token ids.
#[derive(Deserialize, Serialize, Clone, Debug, ToSchema)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenLists(Vec<Vec<u32>>),
}

#[derive(Deserialize, Serialize, Clone, Debug, ToSchema)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

#[derive(Deserialize, Serialize, Clone, Debug, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CompletionRequest {
    pub model: String,
    pub prompt: Prompt,
    /// Default 16. 0 is allowed (with `echo`, scores the prompt only).
    pub max_tokens: Option<u32>,
    /// 0 to 2, default 1 (0 = greedy).
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    /// Completions per prompt, 1 to 16.
    pub n: Option<u32>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    /// 0 to 5 top alternatives per token.
    pub logprobs: Option<u32>,
    #[serde(default)]
    pub echo: bool,
    pub stop: Option<Stop>,
    pub seed: Option<u64>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub user: Option<String>,
    /// Only 1 (the default) is supported.
    pub best_of: Option<u32>,
    /// Only an empty map is supported.
    #[schema(value_type = Option<Object>)]
    pub logit_bias: Option<serde_json::Map<String, serde_json::Value>>,
    /// Only null is supported.
    pub suffix: Option<String>,
    /// gpt-serve: speculative decoding on (default) or off.
    pub speculate: Option<bool>,
    /// gpt-serve: include speculative decoding counters in the response.
    #[serde(default)]
    pub spec_stats: bool,
}

/// OpenAI's error body.
#[derive(Serialize, Deserialize, Debug, Clone, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Serialize, Deserialize, Debug, Clone, ToSchema)]
pub struct ErrorDetail {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub param: Option<String>,
    pub code: Option<String>,
}

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

/// Parses a JSON body, naming the offending field on failure.
pub fn parse_request(body: &[u8]) -> Result<CompletionRequest, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        let msg = e.to_string();
        let param = msg
            .split('`')
            .nth(1)
            .filter(|_| msg.starts_with("unknown field") || msg.starts_with("missing field"))
            .map(str::to_string);
        let message = match (&param, msg.starts_with("unknown field")) {
            (Some(p), true) => {
                format!("unsupported parameter `{p}`: gpt-serve does not implement it")
            }
            _ if e.is_syntax() || e.is_eof() => format!("malformed JSON body: {msg}"),
            _ => format!("invalid request: {msg}"),
        };
        ApiError::Invalid { param, message }
    })
}

pub const MAX_N: u32 = 16;
pub const MAX_LOGPROBS: u32 = 5;
pub const MAX_STOP: usize = 4;
/// Bytes of one stop sequence at most (each generated token is checked
/// against every stop sequence).
pub const MAX_STOP_BYTES: usize = 256;
pub const MAX_PROMPTS: usize = 64;

/// When to stop a choice.
#[derive(Clone, Debug)]
pub struct Stopping {
    pub max_tokens: usize,
    /// Shared by every choice of the request.
    pub stop: Arc<[String]>,
}

/// What the response carries besides the text.
#[derive(Clone, Debug, Default)]
pub struct Output {
    pub stream: bool,
    pub include_usage: bool,
    /// Top alternatives per token (None: no logprobs).
    pub logprobs: Option<usize>,
    /// Prompt tokens come back before the completion (scored when
    /// `logprobs` is set).
    pub echo: bool,
    pub spec_stats: bool,
}

/// A prompt as the client sent it, before tokenizing.
#[derive(Clone, Debug)]
pub enum PromptInput {
    Text(String),
    Ids(Vec<u32>),
}

/// A checked request, generic over its prompts: [`PromptInput`]s after
/// [`CompletionRequest::validate`] (every setting, count and byte length
/// checked, nothing tokenized yet), token ids after [`Validated::tokenize`]
/// (context checked). The tokenized form is the engine's input.
#[derive(Clone, Debug)]
pub struct Validated<P = Vec<u32>> {
    pub model: String,
    pub prompts: Vec<P>,
    /// Completions per prompt.
    pub n: usize,
    pub sampling: SamplingParams,
    pub stopping: Stopping,
    pub output: Output,
    pub speculate: bool,
    context: Context,
}

/// What `tokenize` checks the prompts against.
#[derive(Clone, Copy, Debug)]
struct Context {
    block_size: usize,
    truncate_max_tokens: bool,
}

/// Limits that come from the served model and the server's flags.
#[derive(Clone, Debug)]
pub struct Limits {
    pub model_id: String,
    pub block_size: usize,
    pub vocab_size: usize,
    /// Clamp max_tokens to the context instead of refusing.
    pub truncate_max_tokens: bool,
    /// Bytes of the longest token: a text prompt longer than `block_size`
    /// such tokens cannot fit, and is refused before tokenizing.
    pub max_token_bytes: usize,
}

impl Limits {
    pub fn new(
        model_id: &str,
        tokenizer: &Tokenizer,
        block_size: usize,
        vocab_size: usize,
        truncate_max_tokens: bool,
    ) -> Self {
        Self {
            model_id: model_id.to_string(),
            block_size,
            vocab_size,
            truncate_max_tokens,
            max_token_bytes: tokenizer.max_token_bytes(),
        }
    }

    /// A request's `model` must name the served one (404 otherwise).
    pub fn check_model(&self, model: &str) -> Result<(), ApiError> {
        match model == self.model_id {
            true => Ok(()),
            false => Err(ApiError::ModelNotFound {
                asked: model.to_string(),
                served: self.model_id.clone(),
            }),
        }
    }

    /// Bytes of a text prompt at most.
    pub fn max_prompt_bytes(&self) -> usize {
        self.block_size * self.max_token_bytes.max(1)
    }
}

fn range(param: &str, v: f32, lo: f32, hi: f32) -> Result<f32, ApiError> {
    if !(lo..=hi).contains(&v) || v.is_nan() {
        return Err(ApiError::invalid(
            param,
            format!("{param} must be between {lo} and {hi}, got {v}"),
        ));
    }
    Ok(v)
}

fn context_error(param: &'static str, message: String) -> ApiError {
    ApiError::ContextLength { param, message }
}

impl CompletionRequest {
    /// Checks every setting, the prompt count and each prompt's length in
    /// bytes or ids; tokenizing comes after, off the async runtime.
    pub fn validate(self, lim: &Limits) -> Result<Validated<PromptInput>, ApiError> {
        lim.check_model(&self.model)?;
        self.refuse_unsupported()?;
        let sampling = self.sampling()?;
        let n = self.n.unwrap_or(1);
        if !(1..=MAX_N).contains(&n) {
            return Err(ApiError::invalid(
                "n",
                format!("n must be between 1 and {MAX_N}, got {n}"),
            ));
        }
        if let Some(l) = self.logprobs.filter(|&l| l > MAX_LOGPROBS) {
            return Err(ApiError::invalid(
                "logprobs",
                format!("logprobs must be between 0 and {MAX_LOGPROBS}, got {l}"),
            ));
        }
        let stop = stop_list(self.stop)?;
        let prompts = prompt_inputs(self.prompt, lim)?;
        Ok(Validated {
            model: self.model,
            prompts,
            n: n as usize,
            sampling,
            stopping: Stopping {
                max_tokens: self.max_tokens.unwrap_or(16) as usize,
                stop,
            },
            output: Output {
                stream: self.stream,
                include_usage: self.stream_options.is_some_and(|o| o.include_usage),
                logprobs: self.logprobs.map(|l| l as usize),
                echo: self.echo,
                spec_stats: self.spec_stats,
            },
            speculate: self.speculate.unwrap_or(true),
            context: Context {
                block_size: lim.block_size,
                truncate_max_tokens: lim.truncate_max_tokens,
            },
        })
    }

    fn refuse_unsupported(&self) -> Result<(), ApiError> {
        if self.best_of.is_some_and(|b| b != 1) {
            return Err(ApiError::invalid(
                "best_of",
                "best_of other than 1 is not supported",
            ));
        }
        if self.logit_bias.as_ref().is_some_and(|m| !m.is_empty()) {
            return Err(ApiError::invalid(
                "logit_bias",
                "logit_bias is not supported (only an empty map)",
            ));
        }
        if self.suffix.is_some() {
            return Err(ApiError::invalid("suffix", "suffix is not supported"));
        }
        Ok(())
    }

    fn sampling(&self) -> Result<SamplingParams, ApiError> {
        let temperature = range("temperature", self.temperature.unwrap_or(1.0), 0.0, 2.0)?;
        let top_p = self.top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(ApiError::invalid(
                "top_p",
                format!("top_p must be in (0, 1], got {top_p}"),
            ));
        }
        let penalty = |name, v: Option<f32>| range(name, v.unwrap_or(0.0), -2.0, 2.0);
        Ok(SamplingParams {
            temperature,
            top_p,
            presence_penalty: penalty("presence_penalty", self.presence_penalty)?,
            frequency_penalty: penalty("frequency_penalty", self.frequency_penalty)?,
            seed: self.seed.unwrap_or_else(rand::random),
        })
    }
}

fn stop_list(stop: Option<Stop>) -> Result<Arc<[String]>, ApiError> {
    let stop = match stop {
        None => vec![],
        Some(Stop::One(s)) => vec![s],
        Some(Stop::Many(v)) => v,
    };
    if stop.len() > MAX_STOP {
        return Err(ApiError::invalid(
            "stop",
            format!("at most {MAX_STOP} stop sequences, got {}", stop.len()),
        ));
    }
    if let Some(long) = stop.iter().find(|s| s.len() > MAX_STOP_BYTES) {
        return Err(ApiError::invalid(
            "stop",
            format!(
                "a stop sequence may have at most {MAX_STOP_BYTES} bytes, got {}",
                long.len()
            ),
        ));
    }
    if stop.iter().any(String::is_empty) {
        return Err(ApiError::invalid(
            "stop",
            "stop sequences must not be empty",
        ));
    }
    Ok(stop.into())
}

/// The prompts, counted and measured before any tokenizing: at most
/// [`MAX_PROMPTS`], text within [`Limits::max_prompt_bytes`], ids within
/// the vocabulary and the context.
fn prompt_inputs(prompt: Prompt, lim: &Limits) -> Result<Vec<PromptInput>, ApiError> {
    let prompts: Vec<PromptInput> = match prompt {
        Prompt::Text(s) => vec![PromptInput::Text(s)],
        Prompt::Texts(v) => v.into_iter().map(PromptInput::Text).collect(),
        Prompt::Tokens(ids) => vec![PromptInput::Ids(ids)],
        Prompt::TokenLists(v) => v.into_iter().map(PromptInput::Ids).collect(),
    };
    if prompts.is_empty() {
        return Err(ApiError::invalid(
            "prompt",
            "prompt must not be an empty list",
        ));
    }
    if prompts.len() > MAX_PROMPTS {
        return Err(ApiError::invalid(
            "prompt",
            format!(
                "at most {MAX_PROMPTS} prompts per request, got {}",
                prompts.len()
            ),
        ));
    }
    for p in &prompts {
        match p {
            PromptInput::Text(s) if s.len() > lim.max_prompt_bytes() => {
                return Err(context_error(
                    "prompt",
                    format!(
                        "a prompt of {} bytes cannot fit this model's maximum context length of {} tokens (at most {} bytes)",
                        s.len(),
                        lim.block_size,
                        lim.max_prompt_bytes()
                    ),
                ));
            }
            PromptInput::Text(_) => {}
            PromptInput::Ids(ids) => check_ids(ids, lim)?,
        }
    }
    Ok(prompts)
}

fn check_ids(ids: &[u32], lim: &Limits) -> Result<(), ApiError> {
    if ids.is_empty() {
        return Err(ApiError::invalid(
            "prompt",
            "a token prompt must not be empty",
        ));
    }
    if let Some(t) = ids.iter().find(|t| **t as usize >= lim.vocab_size) {
        return Err(ApiError::invalid(
            "prompt",
            format!(
                "token id {t} is outside the vocabulary (0..{})",
                lim.vocab_size
            ),
        ));
    }
    if ids.len() > lim.block_size {
        return Err(prompt_too_long(ids.len(), lim.block_size));
    }
    Ok(())
}

fn prompt_too_long(len: usize, block_size: usize) -> ApiError {
    context_error(
        "prompt",
        format!(
            "prompt has {len} tokens; this model's maximum context length is {block_size} tokens"
        ),
    )
}

impl<P> Validated<P> {
    /// Sequences this request decodes (prompts x n).
    pub fn sequences(&self) -> usize {
        self.prompts.len() * self.n
    }
}

impl Validated {
    /// A request of token prompts already checked by the caller (the
    /// engine's own tests and benchmarks, which have no HTTP request).
    pub fn from_tokens(
        prompts: Vec<Vec<u32>>,
        n: usize,
        sampling: SamplingParams,
        stopping: Stopping,
        output: Output,
        speculate: bool,
    ) -> Self {
        Validated {
            model: String::new(),
            prompts,
            n,
            sampling,
            stopping,
            output,
            speculate,
            context: Context {
                block_size: usize::MAX,
                truncate_max_tokens: false,
            },
        }
    }
}

impl Validated<PromptInput> {
    /// Tokenizes the text prompts (CPU work: call it off the async
    /// runtime) and checks prompt plus `max_tokens` against the context.
    pub fn tokenize(self, tokenizer: &Tokenizer) -> Result<Validated, ApiError> {
        let ctx = self.context;
        let prompts = self
            .prompts
            .into_iter()
            .map(|p| match p {
                PromptInput::Ids(ids) => Ok(ids),
                PromptInput::Text(s) => {
                    let mut ids = tokenizer
                        .encode(&s)
                        .map_err(|e| ApiError::invalid("prompt", e.to_string()))?;
                    if ids.is_empty() {
                        ids.push(tokenizer.eot()); // an empty prompt starts a new document
                    }
                    match ids.len() > ctx.block_size {
                        true => Err(prompt_too_long(ids.len(), ctx.block_size)),
                        false => Ok(ids),
                    }
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
        let mut stopping = self.stopping;
        if longest + stopping.max_tokens > ctx.block_size {
            if !ctx.truncate_max_tokens || longest >= ctx.block_size {
                return Err(context_error(
                    "max_tokens",
                    format!(
                        "this model's maximum context length is {} tokens, however you requested {} tokens ({longest} in the prompt, {} for the completion)",
                        ctx.block_size,
                        longest + stopping.max_tokens,
                        stopping.max_tokens
                    ),
                ));
            }
            stopping.max_tokens = ctx.block_size - longest;
        }
        Ok(Validated {
            model: self.model,
            prompts,
            n: self.n,
            sampling: self.sampling,
            stopping,
            output: self.output,
            speculate: self.speculate,
            context: ctx,
        })
    }
}

#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, ToSchema)]
pub struct Logprobs {
    pub tokens: Vec<String>,
    pub token_logprobs: Vec<Option<f32>>,
    pub top_logprobs: Vec<Option<BTreeMap<String, f32>>>,
    pub text_offset: Vec<usize>,
}

#[derive(Serialize, Deserialize, Debug, Clone, ToSchema)]
pub struct Choice {
    pub text: String,
    pub index: usize,
    pub logprobs: Option<Logprobs>,
    /// "stop" or "length"; null in stream chunks until the last.
    pub finish_reason: Option<String>,
}

#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, ToSchema)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

#[derive(Serialize, Deserialize, Debug, Clone, ToSchema)]
pub struct CompletionResponse {
    pub id: String,
    /// Always "text_completion".
    pub object: String,
    pub created: u64,
    pub model: String,
    pub choices: Vec<Choice>,
    /// Absent in stream chunks, except the final one with include_usage.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    /// gpt-serve: speculative decoding counters, when asked.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub spec_stats: Option<serde_json::Value>,
}

#[derive(Serialize, Deserialize, Debug, Clone, ToSchema)]
pub struct ModelCard {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub owned_by: String,
    /// gpt-serve: context window.
    pub max_model_len: usize,
}

#[derive(Serialize, Deserialize, Debug, Clone, ToSchema)]
pub struct ModelList {
    pub object: String,
    pub data: Vec<ModelCard>,
}

#[derive(Deserialize, Serialize, Debug, Clone, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TokenizeRequest {
    pub model: Option<String>,
    pub prompt: String,
}

#[derive(Serialize, Deserialize, Debug, Clone, ToSchema)]
pub struct TokenizeResponse {
    pub tokens: Vec<u32>,
    pub count: usize,
    pub max_model_len: usize,
}

#[derive(Deserialize, Serialize, Debug, Clone, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DetokenizeRequest {
    pub model: Option<String>,
    pub tokens: Vec<u32>,
}

#[derive(Serialize, Deserialize, Debug, Clone, ToSchema)]
pub struct DetokenizeResponse {
    pub prompt: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tok() -> Tokenizer {
        Tokenizer::train_bpe(
            ["hello world, hello there. ".repeat(50).as_str()].into_iter(),
            300,
        )
        .unwrap()
    }

    fn lim(t: &Tokenizer) -> Limits {
        Limits::new("m", t, 64, t.vocab_size(), false)
    }

    fn req(json: &str) -> Result<Validated, ApiError> {
        let t = tok();
        parse_request(json.as_bytes())?
            .validate(&lim(&t))?
            .tokenize(&t)
    }

    #[test]
    fn defaults_follow_openai() {
        let v = req(r#"{"model":"m","prompt":"hello"}"#).unwrap();
        assert_eq!(
            (
                v.stopping.max_tokens,
                v.sampling.temperature,
                v.n,
                v.sampling.top_p
            ),
            (16, 1.0, 1, 1.0)
        );
        assert!(v.speculate && !v.output.stream && v.output.logprobs.is_none());
    }

    #[test]
    fn unknown_fields_are_refused_by_name() {
        let e = req(r#"{"model":"m","prompt":"x","tools":[]}"#).unwrap_err();
        assert_eq!(e.param(), Some("tools"));
        assert!(e.message().contains("`tools`"));
    }

    #[test]
    fn harmless_defaults_are_accepted() {
        req(r#"{"model":"m","prompt":"x","best_of":1,"logit_bias":{},"suffix":null,"user":"u"}"#)
            .unwrap();
        assert_eq!(
            req(r#"{"model":"m","prompt":"x","best_of":2}"#)
                .unwrap_err()
                .param(),
            Some("best_of")
        );
    }

    #[test]
    fn limits_are_named_in_errors() {
        let e = req(r#"{"model":"m","prompt":"x","temperature":-1}"#).unwrap_err();
        assert!(e.message().contains("temperature must be between 0 and 2"));
        let e = req(r#"{"model":"m","prompt":"x","max_tokens":100}"#).unwrap_err();
        assert_eq!(e.code(), Some("context_length_exceeded"));
        assert!(e.message().contains("maximum context length is 64"));
        let e = req(r#"{"model":"other","prompt":"x"}"#).unwrap_err();
        assert_eq!(e.code(), Some("model_not_found"));
        let e = req(r#"{"model":"m","prompt":[1,2,99999]}"#).unwrap_err();
        assert!(e.message().contains("99999"));
        let e = req(r#"{"model":"m","prompt":"x","logprobs":6}"#).unwrap_err();
        assert!(e.message().contains("between 0 and 5"));
        let e = req(r#"{"model":"m","prompt":"x","stop":["a","b","c","d","e"]}"#).unwrap_err();
        assert_eq!(e.param(), Some("stop"));
        let long = format!(
            r#"{{"model":"m","prompt":"x","stop":["{}"]}}"#,
            "a".repeat(257)
        );
        let e = req(&long).unwrap_err();
        assert_eq!(e.param(), Some("stop"));
        assert!(e.message().contains("at most 256 bytes"), "{}", e.message());
    }

    #[test]
    fn malformed_json_and_wrong_types_are_400s() {
        let e = req(r#"{"model":"m","#).unwrap_err();
        assert_eq!(e.status(), 400);
        assert!(e.message().contains("malformed JSON"));
        let e = req(r#"{"model":"m","prompt":"x","max_tokens":"ten"}"#).unwrap_err();
        assert_eq!(e.status(), 400);
    }

    #[test]
    fn every_prompt_shape_is_understood() {
        assert_eq!(
            req(r#"{"model":"m","prompt":["a","b"]}"#)
                .unwrap()
                .prompts
                .len(),
            2
        );
        assert_eq!(
            req(r#"{"model":"m","prompt":[1,2,3]}"#).unwrap().prompts,
            vec![vec![1, 2, 3]]
        );
        assert_eq!(
            req(r#"{"model":"m","prompt":[[1],[2,3]]}"#)
                .unwrap()
                .prompts
                .len(),
            2
        );
        assert!(!req(r#"{"model":"m","prompt":""}"#).unwrap().prompts[0].is_empty());
    }

    #[test]
    fn truncation_flag_clamps_max_tokens() {
        let t = tok();
        let l = Limits::new("m", &t, 64, t.vocab_size(), true);
        let v = parse_request(br#"{"model":"m","prompt":"hello","max_tokens":1000}"#)
            .unwrap()
            .validate(&l)
            .unwrap()
            .tokenize(&t)
            .unwrap();
        assert_eq!(v.stopping.max_tokens + v.prompts[0].len(), 64);
    }

    #[test]
    fn counts_and_byte_lengths_are_checked_before_tokenizing() {
        let t = tok();
        let l = lim(&t);
        let too_many = format!(r#"{{"model":"m","prompt":{:?}}}"#, vec!["a"; 65]);
        let e = parse_request(too_many.as_bytes())
            .unwrap()
            .validate(&l)
            .unwrap_err();
        assert!(
            e.message().contains("at most 64 prompts"),
            "{}",
            e.message()
        );
        let long = "a".repeat(l.max_prompt_bytes() + 1);
        let body = format!(r#"{{"model":"m","prompt":"{long}"}}"#);
        let e = parse_request(body.as_bytes())
            .unwrap()
            .validate(&l)
            .unwrap_err();
        assert_eq!(e.code(), Some("context_length_exceeded"));
        assert!(e.message().contains("bytes"), "{}", e.message());
        // Within the byte limit, the token count decides after tokenizing.
        let ok = "hello ".repeat(5);
        let body = format!(r#"{{"model":"m","prompt":"{ok}"}}"#);
        let v = parse_request(body.as_bytes())
            .unwrap()
            .validate(&l)
            .unwrap();
        assert_eq!(v.sequences(), 1);
        assert!(v.tokenize(&t).is_ok());
    }

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
