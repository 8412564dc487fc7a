//! The model: its configuration, the multi-exit GPT on candle (training,
//! any device), the CPU inference path on plain buffers and its kernels,
//! the split forward decoding calls over either, the KV cache, and the
//! thread team that splits one-row decode steps.

pub mod config;
pub mod cpu;
pub mod device;
pub mod draft_head;
pub mod forward;
pub mod gemm;
pub mod gpt;
pub mod kernels;
pub mod kv_cache;
pub mod ops;
pub mod params;
pub mod quant;
pub mod team;
