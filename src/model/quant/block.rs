//! GGUF's Q8_0 and Q4_0 blocks, laid out and quantized exactly as ggml's
//! reference (`quantize_row_q8_0_ref`, `quantize_row_q4_0_ref` in
//! ggml-quants.c), so a tensor written here reads back in llama.cpp and
//! the other way round; little-endian bytes with validation.

use half::f16;

use super::QuantKind;

/// Values per block (ggml's `QK8_0` = `QK4_0` = 32).
pub const QK: usize = 32;

/// ggml's `block_q8_0`: value `j` is `qs[j] * d` (34 bytes, no padding).
#[derive(Debug, Clone, Copy, PartialEq)]
#[repr(C)]
pub struct BlockQ8_0 {
    pub d: f16,
    pub qs: [i8; QK],
}

/// ggml's `block_q4_0`: value `j < 16` is `((qs[j] & 15) - 8) * d`, value
/// `j + 16` is `((qs[j] >> 4) - 8) * d` (18 bytes, no padding).
#[derive(Debug, Clone, Copy, PartialEq)]
#[repr(C)]
pub struct BlockQ4_0 {
    pub d: f16,
    pub qs: [u8; QK / 2],
}

const _: () = assert!(std::mem::size_of::<BlockQ8_0>() == 34);
const _: () = assert!(std::mem::size_of::<BlockQ4_0>() == 18);

impl BlockQ8_0 {
    /// One block from 32 values: `d = amax / 127`, `q = round(x / d)`
    /// (half away from zero; an all-zero block gets d = 0 and q = 0).
    pub fn quantize(x: &[f32; QK]) -> Self {
        let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let mut qs = [0i8; QK];
        for (q, v) in qs.iter_mut().zip(x) {
            *q = round_to_i8(v * id);
        }
        Self {
            d: f16::from_f32(d),
            qs,
        }
    }

    pub fn dequantize(&self, out: &mut [f32; QK]) {
        let d = self.d.to_f32();
        for (o, q) in out.iter_mut().zip(&self.qs) {
            *o = *q as f32 * d;
        }
    }

    /// The 32 values as int8 (for the dot product).
    pub fn values(&self) -> [i8; QK] {
        self.qs
    }

    fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.d.to_bits().to_le_bytes());
        out.extend(self.qs.iter().map(|q| *q as u8));
    }

    fn read(b: &[u8]) -> Self {
        let mut qs = [0i8; QK];
        for (q, v) in qs.iter_mut().zip(&b[2..2 + QK]) {
            *q = *v as i8;
        }
        Self {
            d: f16::from_bits(u16::from_le_bytes([b[0], b[1]])),
            qs,
        }
    }
}

/// `v.round() as i8` (halves away from zero; `as` saturates, NaN -> 0)
/// without `roundf`, which baseline x86-64 calls out of line: `v - trunc(v)`
/// is exact, so comparing it with 0.5 decides the rounding exactly. This
/// quantizes every activation, so it is on the matmul's path.
#[inline]
pub(super) fn round_to_i8(v: f32) -> i8 {
    // Clamped first so `t +- 1` cannot overflow; NaN stays NaN -> t = 0.
    let v = v.clamp(-1000.0, 1000.0);
    let t = v as i32;
    let f = v - t as f32;
    let r = t + (f >= 0.5) as i32 - (f <= -0.5) as i32;
    r.clamp(i8::MIN as i32, i8::MAX as i32) as i8
}

impl BlockQ4_0 {
    /// One block from 32 values: `max` is the value of largest magnitude
    /// (its sign kept), `d = max / -8`, `q = min(15, trunc(x / d + 8.5))`.
    pub fn quantize(x: &[f32; QK]) -> Self {
        let (mut amax, mut max) = (0f32, 0f32);
        for v in x {
            if amax < v.abs() {
                amax = v.abs();
                max = *v;
            }
        }
        let d = max / -8.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let q = |v: f32| ((v * id + 8.5) as i8).min(15) as u8;
        let mut qs = [0u8; QK / 2];
        for (j, b) in qs.iter_mut().enumerate() {
            *b = q(x[j]) | (q(x[j + QK / 2]) << 4);
        }
        Self {
            d: f16::from_f32(d),
            qs,
        }
    }

    pub fn dequantize(&self, out: &mut [f32; QK]) {
        let d = self.d.to_f32();
        for (j, v) in self.values().iter().enumerate() {
            out[j] = *v as f32 * d;
        }
    }

    /// The 32 values as int8 in -8..=7 (for the dot product).
    pub fn values(&self) -> [i8; QK] {
        let mut v = [0i8; QK];
        for (j, b) in self.qs.iter().enumerate() {
            v[j] = (b & 15) as i8 - 8;
            v[j + QK / 2] = (b >> 4) as i8 - 8;
        }
        v
    }

    fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.d.to_bits().to_le_bytes());
        out.extend_from_slice(&self.qs);
    }

    fn read(b: &[u8]) -> Self {
        let mut qs = [0u8; QK / 2];
        qs.copy_from_slice(&b[2..2 + QK / 2]);
        Self {
            d: f16::from_bits(u16::from_le_bytes([b[0], b[1]])),
            qs,
        }
    }
}

/// Quantizes a row to Q8_0 blocks; a tail shorter than a block (GGUF
/// rows have none; `QMatrix` checks) is left out.
pub fn quantize_row_q8_0(x: &[f32]) -> Vec<BlockQ8_0> {
    x.as_chunks::<QK>()
        .0
        .iter()
        .map(BlockQ8_0::quantize)
        .collect()
}

/// Quantizes a row to Q4_0 blocks; a tail shorter than a block is left out.
pub fn quantize_row_q4_0(x: &[f32]) -> Vec<BlockQ4_0> {
    x.as_chunks::<QK>()
        .0
        .iter()
        .map(BlockQ4_0::quantize)
        .collect()
}

pub fn dequantize_row_q8_0(blocks: &[BlockQ8_0]) -> Vec<f32> {
    let mut out = vec![0f32; blocks.len() * QK];
    for (b, o) in blocks.iter().zip(out.as_chunks_mut::<QK>().0) {
        b.dequantize(o);
    }
    out
}

pub fn dequantize_row_q4_0(blocks: &[BlockQ4_0]) -> Vec<f32> {
    let mut out = vec![0f32; blocks.len() * QK];
    for (b, o) in blocks.iter().zip(out.as_chunks_mut::<QK>().0) {
        b.dequantize(o);
    }
    out
}

/// A tensor's blocks in one of the two formats, row-major by output
/// (GGUF's order: output `o`'s blocks are `o * k / 32 ..`).
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Blocks {
    Q8_0(Vec<BlockQ8_0>),
    Q4_0(Vec<BlockQ4_0>),
}

impl Blocks {
    pub(super) fn kind(&self) -> QuantKind {
        match self {
            Blocks::Q8_0(_) => QuantKind::Q8_0,
            Blocks::Q4_0(_) => QuantKind::Q4_0,
        }
    }

    pub(super) fn len(&self) -> usize {
        match self {
            Blocks::Q8_0(b) => b.len(),
            Blocks::Q4_0(b) => b.len(),
        }
    }

    /// Block `i`'s scale.
    pub(super) fn scale(&self, i: usize) -> f16 {
        match self {
            Blocks::Q8_0(b) => b[i].d,
            Blocks::Q4_0(b) => b[i].d,
        }
    }

    /// The blocks as GGUF stores them: each block's f16 scale
    /// (little-endian) then its quants.
    pub(super) fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.len() * self.kind().block_bytes());
        match self {
            Blocks::Q8_0(b) => b.iter().for_each(|b| b.write(&mut out)),
            Blocks::Q4_0(b) => b.iter().for_each(|b| b.write(&mut out)),
        }
        out
    }

    /// `blocks` blocks of `kind` from GGUF bytes; the caller checked the
    /// length is `blocks * kind.block_bytes()`.
    pub(super) fn from_bytes(kind: QuantKind, bytes: &[u8]) -> Self {
        let size = kind.block_bytes();
        match kind {
            QuantKind::Q8_0 => {
                Blocks::Q8_0(bytes.chunks_exact(size).map(BlockQ8_0::read).collect())
            }
            QuantKind::Q4_0 => {
                Blocks::Q4_0(bytes.chunks_exact(size).map(BlockQ4_0::read).collect())
            }
        }
    }
}
