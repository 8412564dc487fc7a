//! Quantized linear layers for CPU inference: GGUF's Q8_0 and Q4_0 weight
//! formats (blocks of 32 with an f16 scale, byte for byte as ggml lays them
//! out, so the same weights can be handed to llama.cpp) and a matmul whose
//! activations are quantized per row to Q8_0 and multiplied with int8 dot
//! products (AVX-512 VNNI, AVX2 or a portable loop, chosen at run time).
//!
//! Why: decoding is memory-bound (each weight is read once per step), and
//! Q8_0 is 34 bytes per 32 weights against 128 for f32 (Q4_0: 18).
//!
//! The result is defined block by block, so every path and every row count
//! gives the same bits: for output `o` and row `r`,
//! `y = (sum over blocks b, in order, of (d_w * d_x) * dot_i32(w_b, x_b)) + bias`,
//! each step an f32 multiply or add (no FMA), the int32 dot exact.
//!
//! Files: `block` (the two block formats: quantize, dequantize, bytes),
//! `packed` (the grouped layout the kernels read, 16 outputs' quants
//! interleaved per 64-byte line), `matrix` (`QMatrix`: construction,
//! activation quantization, `forward`, the portable kernel), `x86` (the
//! AVX2 and VNNI kernels), `dispatch`
//! (which kernel runs, `GPT_SERVE_QUANT_KERNEL` to force one).

mod block;
mod dispatch;
mod matrix;
mod packed;
#[cfg(target_arch = "x86_64")]
mod x86;

pub use block::{
    dequantize_row_q4_0, dequantize_row_q8_0, quantize_row_q4_0, quantize_row_q8_0, BlockQ4_0,
    BlockQ8_0, QK,
};
pub use dispatch::KernelPath;
pub use matrix::{QMatrix, Split};

/// A quantized weight format (GGUF's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantKind {
    /// 32 int8 values and an f16 scale: 34 bytes per block.
    Q8_0,
    /// 32 4-bit values (offset 8) and an f16 scale: 18 bytes per block.
    Q4_0,
}

impl QuantKind {
    /// Bytes per block of 32 weights.
    pub fn block_bytes(self) -> usize {
        match self {
            QuantKind::Q8_0 => std::mem::size_of::<BlockQ8_0>(),
            QuantKind::Q4_0 => std::mem::size_of::<BlockQ4_0>(),
        }
    }

    /// The `--dtype` spelling.
    pub fn name(self) -> &'static str {
        match self {
            QuantKind::Q8_0 => "q8_0",
            QuantKind::Q4_0 => "q4_0",
        }
    }
}

/// A quantized tensor that cannot be built or read; each names the tensor.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum QuantError {
    #[error(
        "tensor `{name}`: its input width {k} is not a multiple of the block size {QK} (GGUF blocks hold {QK} values)"
    )]
    RowLength { name: String, k: usize },
    #[error(
        "tensor `{name}`: {what} has {got} values, expected {expected} ({n} outputs x {k} inputs)"
    )]
    Shape {
        name: String,
        what: &'static str,
        got: usize,
        expected: usize,
        n: usize,
        k: usize,
    },
    #[error("tensor `{name}`: {kind} data of {got} bytes is not {blocks} blocks of {block_bytes} bytes ({expected} bytes for {n} x {k})")]
    ByteLength {
        name: String,
        kind: &'static str,
        got: usize,
        blocks: usize,
        block_bytes: usize,
        expected: usize,
        n: usize,
        k: usize,
    },
    #[error("tensor `{name}`: {n} x {k} values overflow this machine's address space")]
    TooLarge { name: String, n: usize, k: usize },
    #[error("tensor `{name}`: {what} value at index {index} is not finite ({value})")]
    NotFinite {
        name: String,
        what: &'static str,
        index: usize,
        value: f32,
    },
}

#[cfg(test)]
mod tests;
