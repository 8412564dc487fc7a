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
//! `main` is the command line only: each subcommand's body lives beside its
//! module (`serve`, `sample`, `train`, `train::label`, `train::eval`, `bench`).
//! Boundaries: `server`/`openai` never touch tensors; `drafter` never touches
//! candle; `decode` knows nothing of HTTP; `engine` is where async code meets
//! tensors. The model takes its KV cache as an argument, so one model serves
//! many sequences.

pub mod atomic_file;
pub mod bench;
pub mod checkpoint;
pub mod config;
pub mod cpu;
pub mod decode;
pub mod device;
pub mod drafter;
pub mod engine;
pub mod forward;
pub mod gemm;
pub mod hf;
pub mod kernels;
pub mod kv_cache;
pub mod memory;
pub mod metrics;
pub mod model;
pub mod openai;
pub mod ops;
pub mod sample;
pub mod sampling;
pub mod scheduler;
pub mod serve;
pub mod server;
pub mod stop;
pub mod tokenizer;
pub mod train;
