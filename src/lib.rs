//! gpt-serve trains small multi-exit GPT models and serves them with
//! speculative cascade decoding.
//!
//! ```text
//! train:  corpus -> tokenizer -> token cache -> multi-exit GPT (AdamW) -> checkpoint
//!         -> label positions with the model -> gradient-boosted tree drafter
//! serve:  HTTP (server, openai: validate, admit, tokenize) -> engine (queue,
//!         continuous batching by scheduler: one forward over every sequence's
//!         rows) -> decode (tree drafts -> final head accepts -> commit) -> SSE/JSON
//! ```
//! `main` is the command line only: each subcommand's body lives in `cli`
//! (`serve`, `sample`, `bench`) or beside its module (`train`, `train::label`,
//! `train::eval`).
//! Boundaries: `server`/`openai` never touch tensors; `drafter` never touches
//! candle; `decode` knows nothing of HTTP; `engine` is where async code meets
//! tensors. The model takes its KV cache as an argument, so one model serves
//! many sequences.

pub mod atomic_file;
pub mod checkpoint;
pub mod cli;
pub mod decode;
pub mod drafter;
pub mod gguf;
pub mod hf;
pub mod model;
pub mod sampling;
pub mod serving;
pub mod tokenizer;
pub mod train;
