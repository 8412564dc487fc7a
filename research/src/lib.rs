//! gpt-serve's lab: experiments that measured a design choice, kept runnable
//! but out of the product's build. Each is an example:
//!
//! - `drafter_compare`: our GBDT against linfa-trees, smartcore and LightGBM
//!   on the same labelled rows (`--features compare` / `lightgbm`;
//!   `scripts/drafter-compare.sh`);
//! - `ablation_report`: tables and plots of `scripts/ablate.sh` runs;
//! - `cascade_ab`: the exit cascade against final-only verification,
//!   interleaved (`scripts/exit-cascade.sh`).
//!
//! Build them with `cargo build --release -p gpt-serve-research --examples`;
//! the binaries land in the workspace's `target/release/examples/`.
