//! Fused CPU training ops with their backward passes.
//!
//! candle builds cross-entropy and the tanh GELU from ~10 elementwise ops
//! each (each allocating a tensor); their backward passes are longer still.
//! On the `small` preset they cost more than the matmuls, so on the CPU we
//! use one pass forward and one pass backward (measured by
//! `examples/profile_train.rs`). Other devices use candle's composite ops.
//! The gradient test in `tests/model.rs` covers both.

use candle_core::{CpuStorage, CustomOp1, Device, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    let data = match s {
        CpuStorage::F32(d) => d,
        _ => candle_core::bail!("fused op expects f32"),
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("fused op expects a contiguous tensor"),
    }
}

fn to_vec(t: &Tensor) -> Result<Vec<f32>> {
    t.flatten_all()?.to_vec1::<f32>()
}

const SQRT_2_OVER_PI: f32 = 0.797_884_6;

fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)).tanh())
}

fn gelu_grad(x: f32) -> f32 {
    let u = SQRT_2_OVER_PI * (x + 0.044715 * x * x * x);
    let t = u.tanh();
    0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * SQRT_2_OVER_PI * (1.0 + 3.0 * 0.044715 * x * x)
}

struct Gelu;

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "fused-gelu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l)?;
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(4096)
            .zip(x.par_chunks(4096))
            .for_each(|(y, x)| {
                for (o, i) in y.iter_mut().zip(x) {
                    *o = gelu(*i);
                }
            });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let x = to_vec(arg)?;
        let g = to_vec(grad)?;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(4096)
            .zip(x.par_chunks(4096).zip(g.par_chunks(4096)))
            .for_each(|(o, (x, g))| {
                for ((o, x), g) in o.iter_mut().zip(x).zip(g) {
                    *o = g * gelu_grad(*x);
                }
            });
        Ok(Some(Tensor::from_vec(out, arg.shape(), arg.device())?))
    }
}

/// GELU with the tanh approximation (GPT-2's), fused on the CPU.
pub fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
    match x.device() {
        Device::Cpu => x.contiguous()?.apply_op1(Gelu),
        _ => x.gelu(),
    }
}

struct CrossEntropy {
    targets: Vec<u32>,
}

impl CustomOp1 for CrossEntropy {
    fn name(&self) -> &'static str {
        "fused-cross-entropy"
    }

    /// logits (N, V) -> per-row loss (N,).
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l)?;
        let (n, v) = l.shape().dims2()?;
        if self.targets.len() != n {
            candle_core::bail!("cross-entropy: {} targets for {n} rows", self.targets.len());
        }
        if let Some(t) = self.targets.iter().find(|t| **t as usize >= v) {
            candle_core::bail!("cross-entropy: target {t} outside the vocabulary of {v}");
        }
        let loss: Vec<f32> = x
            .par_chunks(v)
            .zip(self.targets.par_iter())
            .map(|(row, &t)| {
                let m = row.iter().copied().fold(f32::MIN, f32::max);
                let lse = row.iter().map(|r| (r - m).exp()).sum::<f32>().ln() + m;
                lse - row[t as usize]
            })
            .collect();
        Ok((CpuStorage::F32(loss), Shape::from(n)))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (_, v) = arg.dims2()?;
        let x = to_vec(arg)?;
        let g = to_vec(grad)?;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(v)
            .zip(x.par_chunks(v))
            .zip(g.par_iter().zip(self.targets.par_iter()))
            .for_each(|((o, row), (&g, &t))| {
                let m = row.iter().copied().fold(f32::MIN, f32::max);
                let mut s = 0f32;
                for (o, r) in o.iter_mut().zip(row) {
                    *o = (r - m).exp();
                    s += *o;
                }
                let k = g / s;
                for o in o.iter_mut() {
                    *o *= k;
                }
                o[t as usize] -= g;
            });
        Ok(Some(Tensor::from_vec(out, arg.shape(), arg.device())?))
    }
}

/// Mean cross-entropy of `logits` (N, V) against `targets` (N,) u32.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    match logits.device() {
        Device::Cpu => {
            let targets = targets.to_vec1::<u32>()?;
            logits
                .contiguous()?
                .apply_op1(CrossEntropy { targets })?
                .mean_all()
        }
        _ => candle_nn::loss::cross_entropy(logits, targets),
    }
}
