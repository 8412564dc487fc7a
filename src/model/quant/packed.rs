//! The in-memory weight layout the kernels read: GGUF's blocks regrouped at
//! load so that one 64-byte line feeds one int8 multiply-add for 16 outputs
//! at once (lanes = outputs), with no horizontal sums per block.
//!
//! Outputs are taken 16 at a time (a group; the last one padded with zero
//! weights and scales). For group `g` and block `b` (inputs `32b..32b+32`)
//! there are `lines_per_block` 64-byte lines, each holding 4 bytes for
//! each of the 16 outputs (bytes `4o..4o+4` are output `o`'s):
//! - Q8_0: lines 0..8, line `q` holds quants `4q..4q+4` stored as
//!   `w + 128` (`w ^ 0x80`: unsigned, as VNNI's `vpdpbusd` wants them);
//!   line 8 holds the 16 scales as f32.
//! - Q4_0: lines 0..4 are GGUF's `qs` bytes `4j..4j+4` verbatim (low
//!   nibbles: values `4j..4j+4`, high nibbles: values `16+4j..16+4j+4`);
//!   line 4 holds the 16 scales as f32.
//!
//! Lines are ordered by group, then block, so a group's weights are one
//! contiguous run read front to back. GGUF's bytes are rebuilt from this on
//! save (`unpack`): the f16 scales convert to f32 and back exactly.

use half::f16;

use super::block::{BlockQ4_0, BlockQ8_0, Blocks, QK};
use super::QuantKind;

/// Outputs per group (16 int32 or f32 lanes of a 512-bit register).
pub(super) const GROUP: usize = 16;

/// 64 bytes, aligned so that a line is one cache line and one aligned
/// 512-bit load.
#[derive(Debug, Clone, Copy, PartialEq)]
#[repr(C, align(64))]
pub(super) struct Line(pub [u8; 64]);

const ZERO_LINE: Line = Line([0; 64]);

/// A tensor's weights in the grouped layout (see the module doc).
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Packed {
    kind: QuantKind,
    lines: Vec<Line>,
    /// Outputs (not counting the padding of the last group).
    n: usize,
    /// Blocks per output (k / 32).
    nb: usize,
}

/// Lines per (group, block): the quants' lines, then one of scales.
pub(super) fn lines_per_block(kind: QuantKind) -> usize {
    match kind {
        QuantKind::Q8_0 => QK / 4 + 1,
        QuantKind::Q4_0 => QK / 8 + 1,
    }
}

impl Packed {
    /// From GGUF's row-major blocks (`n * nb` of them).
    pub(super) fn pack(blocks: &Blocks, n: usize, nb: usize) -> Self {
        let kind = blocks.kind();
        let lpb = lines_per_block(kind);
        let groups = n.div_ceil(GROUP);
        let mut lines = vec![ZERO_LINE; groups * nb * lpb];
        // Padding lanes: weight 0 and scale 0.
        let zero_byte = match kind {
            QuantKind::Q8_0 => 0x80,
            QuantKind::Q4_0 => 0x88,
        };
        for (i, line) in lines.iter_mut().enumerate() {
            if i % lpb != lpb - 1 {
                line.0 = [zero_byte; 64];
            }
        }
        for o in 0..n {
            let lane = o % GROUP;
            for b in 0..nb {
                let base = ((o / GROUP) * nb + b) * lpb;
                let at = |line: usize, t: usize| (base + line, lane * 4 + t);
                let d = match blocks {
                    Blocks::Q8_0(x) => {
                        for (j, q) in x[o * nb + b].qs.iter().enumerate() {
                            let (l, c) = at(j / 4, j % 4);
                            lines[l].0[c] = (*q as u8) ^ 0x80;
                        }
                        x[o * nb + b].d
                    }
                    Blocks::Q4_0(x) => {
                        for (j, q) in x[o * nb + b].qs.iter().enumerate() {
                            let (l, c) = at(j / 4, j % 4);
                            lines[l].0[c] = *q;
                        }
                        x[o * nb + b].d
                    }
                };
                let (l, c) = at(lpb - 1, 0);
                lines[l].0[c..c + 4].copy_from_slice(&d.to_f32().to_ne_bytes());
            }
        }
        Self { kind, lines, n, nb }
    }

    /// Back to GGUF's row-major blocks (the padding left out).
    pub(super) fn unpack(&self) -> Blocks {
        let idx = (0..self.n).flat_map(|o| (0..self.nb).map(move |b| (o, b)));
        match self.kind {
            QuantKind::Q8_0 => Blocks::Q8_0(
                idx.map(|(o, b)| {
                    let (v, d) = self.block(o / GROUP, b, o % GROUP);
                    BlockQ8_0 {
                        d,
                        qs: v.map(|x| (x ^ 0x80) as i8),
                    }
                })
                .collect(),
            ),
            QuantKind::Q4_0 => Blocks::Q4_0(
                idx.map(|(o, b)| {
                    let (v, d) = self.block(o / GROUP, b, o % GROUP);
                    BlockQ4_0 {
                        d,
                        qs: std::array::from_fn(|j| v[j]),
                    }
                })
                .collect(),
            ),
        }
    }

    /// Output `o`'s weights in f32 (`nb * 32` values), as unpacking and
    /// dequantizing everything would give them.
    pub(super) fn dequantize_row(&self, o: usize) -> Vec<f32> {
        let mut out = vec![0f32; self.nb * QK];
        for (b, dst) in out.as_chunks_mut::<QK>().0.iter_mut().enumerate() {
            let (v, d) = self.block(o / GROUP, b, o % GROUP);
            match self.kind {
                QuantKind::Q8_0 => BlockQ8_0 {
                    d,
                    qs: v.map(|x| (x ^ 0x80) as i8),
                }
                .dequantize(dst),
                QuantKind::Q4_0 => BlockQ4_0 {
                    d,
                    qs: std::array::from_fn(|j| v[j]),
                }
                .dequantize(dst),
            }
        }
        out
    }

    /// Lane `lane` of group `g`, block `b`: its stored bytes in GGUF order
    /// (Q8_0: 32 offset quants; Q4_0: the first 16 are `qs`) and its scale.
    fn block(&self, g: usize, b: usize, lane: usize) -> ([u8; QK], f16) {
        let lpb = lines_per_block(self.kind);
        let base = (g * self.nb + b) * lpb;
        let mut v = [0u8; QK];
        for (j, x) in v.iter_mut().take((lpb - 1) * 4).enumerate() {
            *x = self.lines[base + j / 4].0[lane * 4 + j % 4];
        }
        (v, f16::from_f32(self.scale(base + lpb - 1, lane)))
    }

    fn scale(&self, line: usize, lane: usize) -> f32 {
        let c = lane * 4;
        let bytes = &self.lines[line].0[c..c + 4];
        f32::from_ne_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])
    }

    /// Group `g`'s lines (`nb * lines_per_block`), for the SIMD kernels.
    pub(super) fn group(&self, g: usize) -> &[Line] {
        let len = self.nb * lines_per_block(self.kind);
        &self.lines[g * len..(g + 1) * len]
    }

    /// Group `g`'s weights as int8 values, `values[lane][b * 32 + j]`, and
    /// scales `scales[lane][b]` (for the portable kernel).
    pub(super) fn group_values(&self, g: usize, values: &mut [Vec<i8>], scales: &mut [Vec<f32>]) {
        let lpb = lines_per_block(self.kind);
        for lane in 0..GROUP {
            values[lane].resize(self.nb * QK, 0);
            scales[lane].resize(self.nb, 0.0);
            for b in 0..self.nb {
                let base = (g * self.nb + b) * lpb;
                let byte = |j: usize| self.lines[base + j / 4].0[lane * 4 + j % 4];
                let dst = &mut values[lane][b * QK..(b + 1) * QK];
                for (j, v) in dst.iter_mut().enumerate() {
                    *v = match self.kind {
                        QuantKind::Q8_0 => (byte(j) ^ 0x80) as i8,
                        QuantKind::Q4_0 if j < QK / 2 => (byte(j) & 15) as i8 - 8,
                        QuantKind::Q4_0 => (byte(j - QK / 2) >> 4) as i8 - 8,
                    };
                }
                scales[lane][b] = self.scale(base + lpb - 1, lane);
            }
        }
    }

    pub(super) fn kind(&self) -> QuantKind {
        self.kind
    }
}
