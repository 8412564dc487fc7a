//! Causal self-attention for training as one op: the fused qkv projection's
//! output (B, T, 3C) in, the heads' outputs merged back to (B, T, C) out.
//!
//! Composed from candle's ops, each layer split the heads (a permute and
//! three copies), ran six batched matmuls, and in the backward zero-padded
//! each of q, k and v to the width of qkv and summed them. Here each
//! (sequence, head) pair reads its rows of qkv in place and writes its
//! columns of the output. The forward keeps the attention weights P
//! (B, nh, T, T): at T = 128 that is 64 KB per head, less than recomputing
//! them costs, so the T x T tile is materialised (flash-style tiling pays at
//! long sequences, not at the block sizes trained here).

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp1, Device, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::f32_slice;
use crate::model::gemm::{matmul, matmul_into, Operand};
use crate::model::kernels::softmax;

/// Additive causal mask (T, offset + T) for T new rows after `offset` cached
/// rows; None when T == 1 (the single new row sees everything).
pub(crate) fn causal_mask(t: usize, offset: usize, device: &Device) -> Result<Option<Tensor>> {
    if t == 1 {
        return Ok(None);
    }
    let l = offset + t;
    let mask: Vec<f32> = (0..t)
        .flat_map(|i| {
            (0..l).map(move |j| {
                if j > offset + i {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
        })
        .collect();
    Ok(Some(Tensor::from_vec(mask, (t, l), device)?))
}

struct CausalAttention {
    n_head: usize,
    /// Attention weights from the forward, (B, nh, T, T), taken by `bwd`.
    probs: Mutex<Option<Vec<f32>>>,
    keep_probs: bool,
}

/// Dimensions of one call: batch, time, width, heads, head size.
#[derive(Clone, Copy)]
struct Dims {
    b: usize,
    t: usize,
    c: usize,
    nh: usize,
    hs: usize,
}

impl Dims {
    fn of(shape: &Shape, n_head: usize) -> Result<Self> {
        let (b, t, c3) = shape.dims3()?;
        if c3 % 3 != 0 || (c3 / 3) % n_head != 0 {
            candle_core::bail!("causal attention: qkv width {c3} is not 3 x {n_head} heads");
        }
        let c = c3 / 3;
        Ok(Self {
            b,
            t,
            c,
            nh: n_head,
            hs: c / n_head,
        })
    }

    /// Offset of head `h`'s query (part 0), key (1) or value (2) in row `i`
    /// of one sequence's qkv.
    fn at(&self, i: usize, part: usize, h: usize) -> usize {
        i * 3 * self.c + part * self.c + h * self.hs
    }
}

impl CausalAttention {
    /// One sequence: y (T, C) from qkv (T, 3C); p (nh, T, T) receives the
    /// weights (zero above the diagonal).
    fn forward_seq(&self, d: Dims, qkv: &[f32], y: &mut [f32], p: &mut [f32]) {
        let scale = 1.0 / (d.hs as f32).sqrt();
        let (t, ld) = (d.t, 3 * d.c);
        for h in 0..d.nh {
            let p = &mut p[h * t * t..(h + 1) * t * t];
            let q = Operand::n(&qkv[d.at(0, 0, h)..], t, d.hs).stride(ld);
            let k = Operand::t(&qkv[d.at(0, 1, h)..], d.hs, t).stride(ld);
            // The full T x T product: the GEMM runs the masked half at
            // the speed a triangular loop would run the other half.
            matmul(p, q, k, false);
            for (i, row) in p.chunks_exact_mut(t).enumerate() {
                row[..=i].iter_mut().for_each(|s| *s *= scale);
                softmax(&mut row[..=i]);
                row[i + 1..].fill(0.0);
            }
            let v = Operand::n(&qkv[d.at(0, 2, h)..], t, d.hs).stride(ld);
            matmul_into(&mut y[h * d.hs..], d.c, Operand::n(p, t, t), v, false);
        }
    }

    /// One sequence's dqkv (T, 3C) from qkv, the weights p and dy (T, C).
    fn backward_seq(&self, d: Dims, qkv: &[f32], p: &[f32], dy: &[f32], dqkv: &mut [f32]) {
        let scale = 1.0 / (d.hs as f32).sqrt();
        let (t, ld) = (d.t, 3 * d.c);
        let mut ds = vec![0f32; t * t];
        for h in 0..d.nh {
            let p = &p[h * t * t..(h + 1) * t * t];
            let g = Operand::n(&dy[h * d.hs..], t, d.hs).stride(d.c);
            // dP = dy V^T; dS = P (dP - rowsum(P dP)) scale, row by row.
            let vt = Operand::t(&qkv[d.at(0, 2, h)..], d.hs, t).stride(ld);
            matmul(&mut ds, g, vt, false);
            for (i, (s, pr)) in ds.chunks_exact_mut(t).zip(p.chunks_exact(t)).enumerate() {
                let mean: f32 = s[..=i].iter().zip(&pr[..=i]).map(|(a, b)| a * b).sum();
                for (a, b) in s[..=i].iter_mut().zip(&pr[..=i]) {
                    *a = b * (*a - mean) * scale;
                }
                s[i + 1..].fill(0.0);
            }
            let ds = Operand::n(&ds, t, t);
            let dst = Operand::t(ds.data, t, t);
            // dV = P^T dy; dQ = dS K; dK = dS^T Q.
            let pt = Operand::t(p, t, t);
            matmul_into(&mut dqkv[d.at(0, 2, h)..], ld, pt, g, false);
            let k = Operand::n(&qkv[d.at(0, 1, h)..], t, d.hs).stride(ld);
            matmul_into(&mut dqkv[d.at(0, 0, h)..], ld, ds, k, false);
            let q = Operand::n(&qkv[d.at(0, 0, h)..], t, d.hs).stride(ld);
            matmul_into(&mut dqkv[d.at(0, 1, h)..], ld, dst, q, false);
        }
    }
}

impl CustomOp1 for CausalAttention {
    fn name(&self) -> &'static str {
        "causal-attention"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let qkv = f32_slice(s, l)?;
        let d = Dims::of(l.shape(), self.n_head)?;
        let mut y = vec![0f32; d.b * d.t * d.c];
        let mut p = vec![0f32; d.b * d.nh * d.t * d.t];
        if d.b * d.t > 0 {
            y.par_chunks_mut(d.t * d.c)
                .zip(p.par_chunks_mut(d.nh * d.t * d.t))
                .zip(qkv.par_chunks(d.t * 3 * d.c))
                .for_each(|((y, p), qkv)| self.forward_seq(d, qkv, y, p));
        }
        if self.keep_probs {
            *self.probs.lock().expect("weights slot") = Some(p);
        }
        Ok((CpuStorage::F32(y), Shape::from((d.b, d.t, d.c))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let Some(p) = self.probs.lock().expect("weights slot").take() else {
            candle_core::bail!("causal attention: backward ran twice or without weights")
        };
        let d = Dims::of(arg.shape(), self.n_head)?;
        let grad = grad.contiguous()?;
        let (gs, gl) = grad.storage_and_layout();
        let (qs, ql) = arg.storage_and_layout();
        let (candle_core::Storage::Cpu(gs), candle_core::Storage::Cpu(qs)) = (&*gs, &*qs) else {
            candle_core::bail!("causal attention: backward expects CPU tensors")
        };
        let (dy, qkv) = (f32_slice(gs, gl)?, f32_slice(qs, ql)?);
        let mut dqkv = vec![0f32; qkv.len()];
        if d.b * d.t > 0 {
            dqkv.par_chunks_mut(d.t * 3 * d.c)
                .zip(qkv.par_chunks(d.t * 3 * d.c))
                .zip(p.par_chunks(d.nh * d.t * d.t).zip(dy.par_chunks(d.t * d.c)))
                .for_each(|((dq, qkv), (p, dy))| self.backward_seq(d, qkv, p, dy, dq));
        }
        Ok(Some(Tensor::from_vec(dqkv, arg.shape(), arg.device())?))
    }
}

/// Causal self-attention of `qkv` (B, T, 3C), laid out as nn.Linear's
/// `c_attn` output (q | k | v, each `n_head` heads), to (B, T, C) with the
/// heads merged. One op on the CPU; elsewhere candle's ops.
pub fn causal_attention(qkv: &Tensor, n_head: usize) -> Result<Tensor> {
    if qkv.device().is_cpu() {
        let op = CausalAttention {
            n_head,
            probs: Mutex::new(None),
            keep_probs: qkv.track_op(),
        };
        return qkv.contiguous()?.apply_op1(op);
    }
    let (b, t, c3) = qkv.dims3()?;
    let (c, hs) = (c3 / 3, c3 / 3 / n_head);
    let qkv = qkv
        .reshape((b, t, 3, n_head, hs))?
        .permute((2, 0, 3, 1, 4))?;
    let (q, k, v) = (
        qkv.get(0)?.contiguous()?,
        qkv.get(1)?.contiguous()?,
        qkv.get(2)?.contiguous()?,
    );
    let att = super::causal_softmax(&q.matmul(&k.t()?)?, 1.0 / (hs as f64).sqrt())?;
    let y = att.matmul(&v)?; // (B, nh, T, hs)
    y.transpose(1, 2)?.reshape((b, t, c))
}
