//! The bodies of the subcommands that are not a library module's own:
//! `serve`, `sample` and `bench` (`train`, `train-drafter` and `eval` live
//! in `train`, `import-hf` and `export-hf` in `hf`).

pub mod bench;
pub mod sample;
pub mod serve;
