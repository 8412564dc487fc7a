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

/// mimalloc for every program built on this crate (the `gpt-serve` binary,
/// the examples, the tests), so benchmarks and profiles see the server's
/// allocation costs. Decoding allocates and frees many mid-size buffers
/// per step (activations, logits): glibc's malloc spent 7-10% of a decode
/// step in `_int_malloc` (perf), and in training it returned each large
/// buffer to the OS (page faults and TLB shootdowns on every op);
/// mimalloc's size-class free lists avoid both. Declared here rather than
/// in each program: `batch_step` ran under glibc while the binary did not,
/// and an A/B of it overstated a change's gain 2-4x
/// (bench/step-overhead/ab.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
