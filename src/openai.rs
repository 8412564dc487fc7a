//! OpenAI completions wire types and validation.
//!
//! A raw [`CompletionRequest`] becomes a [`Validated`] request or an
//! [`ApiError`] naming the field and the limit; later code never sees
//! unchecked input. Fields OpenAI defines that we do not implement are
//! refused by name, except harmless defaults clients send anyway
//! (`best_of: 1`, `logit_bias: {}`, `suffix: null`). No tensors here.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

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

/// An error with its HTTP status; `server` turns it into a response.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        Self {
            status: 400,
            message: message.into(),
            kind: "invalid_request_error",
            param: Some(param.into()),
            code: None,
        }
    }
    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                message: self.message.clone(),
                kind: self.kind.to_string(),
                param: self.param.clone(),
                code: self.code.map(str::to_string),
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
        ApiError {
            param,
            ..ApiError::invalid("", message)
        }
    })
}

pub const MAX_N: u32 = 16;
pub const MAX_LOGPROBS: u32 = 5;
pub const MAX_STOP: usize = 4;
/// Bytes of one stop sequence at most (each generated token is checked
/// against every stop sequence).
pub const MAX_STOP_BYTES: usize = 256;
pub const MAX_PROMPTS: usize = 64;

/// A checked request: token prompts and every setting within its limits.
#[derive(Clone, Debug)]
pub struct Validated {
    pub model: String,
    pub prompts: Vec<Vec<u32>>,
    pub max_tokens: usize,
    pub temperature: f32,
    pub top_p: f32,
    pub n: usize,
    pub stream: bool,
    pub include_usage: bool,
    pub logprobs: Option<usize>,
    pub echo: bool,
    pub stop: Vec<String>,
    pub seed: Option<u64>,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    pub speculate: bool,
    pub spec_stats: bool,
}

/// Limits that come from the served model and the server's flags.
pub struct Limits<'a> {
    pub model_id: &'a str,
    pub block_size: usize,
    pub vocab_size: usize,
    /// Clamp max_tokens to the context instead of refusing.
    pub truncate_max_tokens: bool,
    pub tokenizer: &'a Tokenizer,
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

impl CompletionRequest {
    pub fn validate(self, lim: &Limits) -> Result<Validated, ApiError> {
        if self.model != lim.model_id {
            return Err(ApiError {
                code: Some("model_not_found"),
                ..ApiError::invalid(
                    "model",
                    format!(
                        "model `{}` is not served here; this server serves `{}`",
                        self.model, lim.model_id
                    ),
                )
            });
        }
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
        let temperature = range("temperature", self.temperature.unwrap_or(1.0), 0.0, 2.0)?;
        let top_p = self.top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(ApiError::invalid(
                "top_p",
                format!("top_p must be in (0, 1], got {top_p}"),
            ));
        }
        let n = self.n.unwrap_or(1);
        if !(1..=MAX_N).contains(&n) {
            return Err(ApiError::invalid(
                "n",
                format!("n must be between 1 and {MAX_N}, got {n}"),
            ));
        }
        if let Some(l) = self.logprobs {
            if l > MAX_LOGPROBS {
                return Err(ApiError::invalid(
                    "logprobs",
                    format!("logprobs must be between 0 and {MAX_LOGPROBS}, got {l}"),
                ));
            }
        }
        let presence_penalty = range(
            "presence_penalty",
            self.presence_penalty.unwrap_or(0.0),
            -2.0,
            2.0,
        )?;
        let frequency_penalty = range(
            "frequency_penalty",
            self.frequency_penalty.unwrap_or(0.0),
            -2.0,
            2.0,
        )?;
        let prompts = self.prompt_tokens(lim)?;
        let stop = match self.stop {
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
        let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
        let mut max_tokens = self.max_tokens.unwrap_or(16) as usize;
        if longest + max_tokens > lim.block_size {
            if lim.truncate_max_tokens && longest < lim.block_size {
                max_tokens = lim.block_size - longest;
            } else {
                return Err(ApiError {
                    code: Some("context_length_exceeded"),
                    ..ApiError::invalid(
                        "max_tokens",
                        format!(
                            "this model's maximum context length is {} tokens, however you requested {} tokens ({longest} in the prompt, {max_tokens} for the completion)",
                            lim.block_size,
                            longest + max_tokens
                        ),
                    )
                });
            }
        }
        Ok(Validated {
            model: self.model,
            prompts,
            max_tokens,
            temperature,
            top_p,
            n: n as usize,
            stream: self.stream,
            include_usage: self.stream_options.is_some_and(|o| o.include_usage),
            logprobs: self.logprobs.map(|l| l as usize),
            echo: self.echo,
            stop,
            seed: self.seed,
            presence_penalty,
            frequency_penalty,
            speculate: self.speculate.unwrap_or(true),
            spec_stats: self.spec_stats,
        })
    }

    fn prompt_tokens(&self, lim: &Limits) -> Result<Vec<Vec<u32>>, ApiError> {
        let encode = |s: &str| -> Result<Vec<u32>, ApiError> {
            let mut ids = lim
                .tokenizer
                .encode(s)
                .map_err(|e| ApiError::invalid("prompt", e.to_string()))?;
            if ids.is_empty() {
                // An empty prompt starts a new document.
                ids.push(lim.tokenizer.eot());
            }
            Ok(ids)
        };
        let check_ids = |ids: &Vec<u32>| -> Result<(), ApiError> {
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
            Ok(())
        };
        let prompts = match &self.prompt {
            Prompt::Text(s) => vec![encode(s)?],
            Prompt::Texts(v) => v.iter().map(|s| encode(s)).collect::<Result<_, _>>()?,
            Prompt::Tokens(ids) => vec![ids.clone()],
            Prompt::TokenLists(v) => v.clone(),
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
            check_ids(p)?;
            if p.len() > lim.block_size {
                return Err(ApiError {
                    code: Some("context_length_exceeded"),
                    ..ApiError::invalid(
                        "prompt",
                        format!("prompt has {} tokens; this model's maximum context length is {} tokens", p.len(), lim.block_size),
                    )
                });
            }
        }
        Ok(prompts)
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

    fn lim(t: &Tokenizer) -> Limits<'_> {
        Limits {
            model_id: "m",
            block_size: 64,
            vocab_size: t.vocab_size(),
            truncate_max_tokens: false,
            tokenizer: t,
        }
    }

    fn req(json: &str) -> Result<Validated, ApiError> {
        let t = tok();
        parse_request(json.as_bytes())?.validate(&lim(&t))
    }

    #[test]
    fn defaults_follow_openai() {
        let v = req(r#"{"model":"m","prompt":"hello"}"#).unwrap();
        assert_eq!(
            (v.max_tokens, v.temperature, v.n, v.top_p),
            (16, 1.0, 1, 1.0)
        );
        assert!(v.speculate && !v.stream && v.logprobs.is_none());
    }

    #[test]
    fn unknown_fields_are_refused_by_name() {
        let e = req(r#"{"model":"m","prompt":"x","tools":[]}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("tools"));
        assert!(e.message.contains("`tools`"));
    }

    #[test]
    fn harmless_defaults_are_accepted() {
        req(r#"{"model":"m","prompt":"x","best_of":1,"logit_bias":{},"suffix":null,"user":"u"}"#)
            .unwrap();
        assert_eq!(
            req(r#"{"model":"m","prompt":"x","best_of":2}"#)
                .unwrap_err()
                .param
                .as_deref(),
            Some("best_of")
        );
    }

    #[test]
    fn limits_are_named_in_errors() {
        let e = req(r#"{"model":"m","prompt":"x","temperature":-1}"#).unwrap_err();
        assert!(e.message.contains("temperature must be between 0 and 2"));
        let e = req(r#"{"model":"m","prompt":"x","max_tokens":100}"#).unwrap_err();
        assert_eq!(e.code, Some("context_length_exceeded"));
        assert!(e.message.contains("maximum context length is 64"));
        let e = req(r#"{"model":"other","prompt":"x"}"#).unwrap_err();
        assert_eq!(e.code, Some("model_not_found"));
        let e = req(r#"{"model":"m","prompt":[1,2,99999]}"#).unwrap_err();
        assert!(e.message.contains("99999"));
        let e = req(r#"{"model":"m","prompt":"x","logprobs":6}"#).unwrap_err();
        assert!(e.message.contains("between 0 and 5"));
        let e = req(r#"{"model":"m","prompt":"x","stop":["a","b","c","d","e"]}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("stop"));
        let long = format!(
            r#"{{"model":"m","prompt":"x","stop":["{}"]}}"#,
            "a".repeat(257)
        );
        let e = req(&long).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("stop"));
        assert!(e.message.contains("at most 256 bytes"), "{}", e.message);
    }

    #[test]
    fn malformed_json_and_wrong_types_are_400s() {
        let e = req(r#"{"model":"m","#).unwrap_err();
        assert_eq!(e.status, 400);
        assert!(e.message.contains("malformed JSON"));
        let e = req(r#"{"model":"m","prompt":"x","max_tokens":"ten"}"#).unwrap_err();
        assert_eq!(e.status, 400);
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
        let l = Limits {
            truncate_max_tokens: true,
            ..lim(&t)
        };
        let v = parse_request(br#"{"model":"m","prompt":"hello","max_tokens":1000}"#)
            .unwrap()
            .validate(&l)
            .unwrap();
        assert_eq!(v.max_tokens + v.prompts[0].len(), 64);
    }
}
