//! OpenAI completions wire types and validation.
//!
//! A raw [`CompletionRequest`] becomes a [`Validated`] request or an
//! [`ApiError`] naming the field and the limit; later code never sees
//! unchecked input. Fields OpenAI defines that we do not implement are
//! refused by name, except harmless defaults clients send anyway
//! (`best_of: 1`, `logit_bias: {}`, `suffix: null`). No tensors here.
//!
//! - `wire`: the serde request and response bodies, as OpenAI spells them;
//! - `error`: [`ApiError`], every error the API answers with, and its one
//!   mapping to a status and an OpenAI error body;
//! - `validate`: raw request -> [`Validated`] (then tokenized), against
//!   the served model's [`Limits`].

mod error;
mod validate;
mod wire;

pub use error::ApiError;
pub use validate::*;
pub use wire::*;
