//! The OpenAI completions API's JSON bodies as serde types: the request as
//! the client sends it (checked later by `validate`), the
//! responses, the error body, and gpt-serve's tokenize/detokenize bodies.
//! Field names follow OpenAI so existing clients work unchanged.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

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
