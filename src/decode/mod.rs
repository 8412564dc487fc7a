//! Plain and speculative cascade decoding of one sequence (docs/design.md).
//!
//! One step feeds `[pending, d1..dk]` (k = 0 is a plain step):
//! 1. the proposer (the tree drafter, see `proposer`) proposes d1..dk
//!    (clamped by max_tokens and the context window); when it proposes
//!    nothing the step is plain, or, with [`SelfDraft`], an early exit
//!    drafts and the rows arrive at its block (LayerSkip; off by default:
//!    slower than a plain step on the shipped model, see the README);
//! 2. with the exit cascade (off by default: no faster on the shipped
//!    model), blocks run up to each early exit, whose head scores only the
//!    candidates (the drafts and the drafter's classes: a few dot products,
//!    not the vocabulary); at the first row i where a rival outscores
//!    d(i+1) by `exit_margin`, rows i+1.. are dropped, and the next blocks
//!    run on fewer rows (exits only truncate, never accept);
//! 3. the final head gives f0..fm; with the keyed sample f(i) at each
//!    absolute position, d1..da are accepted while d(i) == f(i-1), and fa is
//!    the new token: every step yields at least one token, the same tokens
//!    plain decoding yields;
//! 4. every KV-cache layer is rolled back to the committed length and fa
//!    becomes the pending token.
//!
//! Stop strings are text, so the caller cuts at them (see `stop`); this
//! module stops at end-of-text and `max_tokens`.
//!
//! Files by role: `generator` (the loop: draft -> verify -> accept ->
//! commit), `rows` (a step's rows and the acceptance rule), `proposer`
//! (the [`Proposer`] trait, one file per drafter), `calibrate` (fits the
//! draft head's calibration from decoded drafts), `suffix_cache` (the
//! cross-request continuation cache), `cascade` (the exit
//! cascade and LayerSkip drafting, a step of their own), `stats` (the
//! counters), `params` (what a caller asks and gets back).

pub mod calibrate;
mod cascade;
mod generator;
mod params;
pub mod proposer;
mod rows;
mod stats;
pub mod suffix_cache;

pub use cascade::{exit_margin, DEFAULT_EXIT_MARGIN};
pub use generator::{greedy_with_stats, Generator};
pub use params::{Finish, GenParams, SelfDraft, TokenOut};
pub use proposer::Proposer;
pub use rows::{accept, Rows};
pub use stats::{MarginHist, SpecStats, MARGIN_BIN, MARGIN_BIN_LO};
pub use suffix_cache::SuffixCache;
