//! Fused CPU training ops with their backward passes.
//!
//! candle builds cross-entropy, the tanh GELU, LayerNorm (`layer_norm_slow`)
//! and the masked softmax of attention from 5-10 elementwise ops each (each
//! allocating a tensor); their backward passes are longer still. On the
//! `small` preset they cost more than the matmuls, so on the CPU we use one
//! pass forward and one pass backward (measured by
//! `examples/profile_train.rs`). Other devices use candle's composite ops.
//! The gradient test in `tests/model.rs` covers both; exponentials use the
//! vectorising [`exp_neg`] (relative error < 2e-5) instead of libm's.

use candle_core::{CpuStorage, CustomOp1, CustomOp3, Device, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

use crate::model::kernels::exp_neg;

mod attention;
mod head;
mod linear;

pub use attention::causal_attention;
pub(crate) use attention::causal_mask;
pub use head::{candidate_cross_entropy, projected_cross_entropy, projected_cross_entropy_top};
pub use linear::linear;

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

/// tanh from one exponential of -2|u| (vectorises; libm's tanhf does not).
#[inline(always)]
fn tanh(u: f32) -> f32 {
    let e = exp_neg(-2.0 * u.abs());
    ((1.0 - e) / (1.0 + e)).copysign(u)
}

fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + tanh(SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)))
}

fn gelu_grad(x: f32) -> f32 {
    let u = SQRT_2_OVER_PI * (x + 0.044715 * x * x * x);
    let t = tanh(u);
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
                let lse = row.iter().map(|r| exp_neg(r - m)).sum::<f32>().ln() + m;
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
                    *o = exp_neg(r - m);
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

/// Mean and reciprocal standard deviation of a row (population variance).
fn row_stats(x: &[f32], eps: f32) -> (f32, f32) {
    let n = x.len() as f32;
    let mean = x.iter().sum::<f32>() / n;
    let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
    (mean, 1.0 / (var + eps).sqrt())
}

struct LayerNorm {
    eps: f32,
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "fused-layer-norm"
    }

    /// x (..., C), weight (C,), bias (C,) -> (..., C).
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w, b) = (f32_slice(s1, l1)?, f32_slice(s2, l2)?, f32_slice(s3, l3)?);
        let c = w.len();
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(c).zip(x.par_chunks(c)).for_each(|(y, x)| {
            let (mean, rstd) = row_stats(x, self.eps);
            for ((y, x), (w, b)) in y.iter_mut().zip(x).zip(w.iter().zip(b)) {
                *y = (x - mean) * rstd * w + b;
            }
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    /// dx = rstd (g w - mean(g w) - xhat mean(g w xhat)), dw = sum g xhat,
    /// db = sum g (sums over rows).
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (xs, ws, gs) = (to_vec(x)?, to_vec(w)?, to_vec(grad)?);
        let c = ws.len();
        let mut dx = vec![0f32; xs.len()];
        // Rows in chunks of 64: each chunk sums its own dw, db.
        let rows = 64 * c;
        let (dw, db) = dx
            .par_chunks_mut(rows)
            .zip(xs.par_chunks(rows).zip(gs.par_chunks(rows)))
            .map(|(dx, (x, g))| {
                let (mut dw, mut db) = (vec![0f32; c], vec![0f32; c]);
                let mut xhat = vec![0f32; c];
                for (dx, (x, g)) in dx.chunks_mut(c).zip(x.chunks(c).zip(g.chunks(c))) {
                    let (mean, rstd) = row_stats(x, self.eps);
                    let (mut s_gw, mut s_gwx) = (0f32, 0f32);
                    for i in 0..c {
                        xhat[i] = (x[i] - mean) * rstd;
                        let gw = g[i] * ws[i];
                        s_gw += gw;
                        s_gwx += gw * xhat[i];
                        dw[i] += g[i] * xhat[i];
                        db[i] += g[i];
                    }
                    let (m_gw, m_gwx) = (s_gw / c as f32, s_gwx / c as f32);
                    for i in 0..c {
                        dx[i] = rstd * (g[i] * ws[i] - m_gw - xhat[i] * m_gwx);
                    }
                }
                (dw, db)
            })
            .reduce(
                || (vec![0f32; c], vec![0f32; c]),
                |(mut a, mut b), (c2, d)| {
                    a.iter_mut().zip(&c2).for_each(|(a, c)| *a += c);
                    b.iter_mut().zip(&d).for_each(|(b, d)| *b += d);
                    (a, b)
                },
            );
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), dev)?),
            Some(Tensor::from_vec(dw, w.shape(), dev)?),
            Some(Tensor::from_vec(db, w.shape(), dev)?),
        ))
    }
}

/// LayerNorm over the last dimension, fused on the CPU (training: candle's
/// fused `layer_norm` has no backward).
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f32) -> Result<Tensor> {
    match x.device() {
        Device::Cpu => x.contiguous()?.apply_op3(weight, bias, LayerNorm { eps }),
        _ => candle_nn::ops::layer_norm_slow(x, weight, bias, eps),
    }
}

struct CausalSoftmax {
    scale: f32,
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "fused-causal-softmax"
    }

    /// scores (..., T, L) -> softmax(scale * scores) over L, where row i sees
    /// keys j <= i + (L - T) (the others get probability 0).
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l)?;
        let dims = l.shape().dims();
        let (t, len) = (dims[dims.len() - 2], dims[dims.len() - 1]);
        let offset = len - t;
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(len)
            .zip(x.par_chunks(len))
            .enumerate()
            .for_each(|(r, (y, x))| {
                let seen = offset + r % t + 1;
                let m = x[..seen].iter().copied().fold(f32::MIN, f32::max);
                let mut sum = 0f32;
                for (y, x) in y[..seen].iter_mut().zip(&x[..seen]) {
                    *y = exp_neg(self.scale * (x - m));
                    sum += *y;
                }
                let k = 1.0 / sum;
                y[..seen].iter_mut().for_each(|y| *y *= k);
            });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    /// dx = scale * y * (g - sum(g y)) along the row.
    fn bwd(&self, arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let len = arg.dim(arg.rank() - 1)?;
        let (y, g) = (to_vec(res)?, to_vec(grad)?);
        let mut dx = vec![0f32; y.len()];
        dx.par_chunks_mut(len)
            .zip(y.par_chunks(len).zip(g.par_chunks(len)))
            .for_each(|(dx, (y, g))| {
                let dot: f32 = y.iter().zip(g).map(|(y, g)| y * g).sum();
                for ((dx, y), g) in dx.iter_mut().zip(y).zip(g) {
                    *dx = self.scale * y * (g - dot);
                }
            });
        Ok(Some(Tensor::from_vec(dx, arg.shape(), arg.device())?))
    }
}

/// Causal attention weights: softmax(scale * scores) over the last dimension
/// of scores (B, nh, T, L), row i seeing keys j <= i + (L - T). Fused on the
/// CPU; elsewhere candle's ops with an additive mask.
pub fn causal_softmax(scores: &Tensor, scale: f64) -> Result<Tensor> {
    match scores.device() {
        Device::Cpu => scores.contiguous()?.apply_op1(CausalSoftmax {
            scale: scale as f32,
        }),
        _ => {
            let (t, len) = (scores.dim(D::Minus2)?, scores.dim(D::Minus1)?);
            let scaled = (scores * scale)?;
            match causal_mask(t, len - t, scores.device())? {
                Some(mask) => candle_nn::ops::softmax(&scaled.broadcast_add(&mask)?, D::Minus1),
                None => candle_nn::ops::softmax(&scaled, D::Minus1),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Var};

    pub(super) fn randn(shape: &[usize], seed: u64) -> Tensor {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// Checks d/dx sum(f(x) * r) along a random direction against central
    /// differences, for every input of `f`, and the forward against `reference`.
    fn check(
        inputs: &[Tensor],
        f: impl Fn(&[Tensor]) -> Result<Tensor>,
        reference: impl Fn(&[Tensor]) -> Result<Tensor>,
    ) {
        let vars: Vec<Var> = inputs
            .iter()
            .map(|t| Var::from_tensor(t).unwrap())
            .collect();
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let out = f(&ts).unwrap();
        let want = reference(inputs).unwrap();
        let err = (&out - &want).unwrap().abs().unwrap().max_all().unwrap();
        assert!(
            err.to_scalar::<f32>().unwrap() < 1e-4,
            "forward differs from candle's ops"
        );
        let r = randn(out.dims(), 99);
        let loss = |xs: &[Tensor]| -> f64 {
            (f(xs).unwrap() * &r)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap() as f64
        };
        let grads = (&out * &r).unwrap().sum_all().unwrap().backward().unwrap();
        for (i, v) in vars.iter().enumerate() {
            let g = grads.get(v.as_tensor()).expect("input has a gradient");
            let dir = randn(v.dims(), i as u64 + 7);
            let analytic = (g * &dir)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap() as f64;
            let eps = 1e-2;
            let moved = |s: f64| -> Vec<Tensor> {
                let mut xs = inputs.to_vec();
                xs[i] = (&xs[i] + (&dir * s).unwrap()).unwrap();
                xs
            };
            let numeric = (loss(&moved(eps)) - loss(&moved(-eps))) / (2.0 * eps);
            assert!(
                (analytic - numeric).abs() < 1e-2 * numeric.abs().max(1e-1),
                "input {i}: analytic {analytic} vs numeric {numeric}"
            );
        }
    }

    #[test]
    fn fused_layer_norm_matches_candle_and_its_finite_differences() {
        let inputs = [randn(&[3, 5, 16], 1), randn(&[16], 2), randn(&[16], 3)];
        check(
            &inputs,
            |x| layer_norm(&x[0], &x[1], &x[2], 1e-5),
            |x| candle_nn::ops::layer_norm_slow(&x[0], &x[1], &x[2], 1e-5),
        );
    }

    #[test]
    fn fused_causal_softmax_matches_candle_and_its_finite_differences() {
        // T = 4 new rows after 3 cached keys: L = 7.
        let scores = (randn(&[2, 3, 4, 7], 4) * 3.0).unwrap();
        let mask: Vec<f32> = (0..4)
            .flat_map(|i| (0..7).map(move |j| if j > 3 + i { f32::NEG_INFINITY } else { 0.0 }))
            .collect();
        let mask = Tensor::from_vec(mask, (4, 7), &Device::Cpu).unwrap();
        check(
            &[scores],
            |x| causal_softmax(&x[0], 0.5),
            |x| candle_nn::ops::softmax(&(&x[0] * 0.5)?.broadcast_add(&mask)?, D::Minus1),
        );
    }

    /// Candle's composition of causal attention, for the fused op to match.
    fn composed_attention(qkv: &Tensor, n_head: usize) -> Result<Tensor> {
        let (b, t, c3) = qkv.dims3()?;
        let hs = c3 / 3 / n_head;
        let qkv = qkv
            .reshape((b, t, 3, n_head, hs))?
            .permute((2, 0, 3, 1, 4))?;
        let (q, k, v) = (qkv.get(0)?, qkv.get(1)?, qkv.get(2)?);
        let s = (q.contiguous()?.matmul(&k.contiguous()?.t()?)? / (hs as f64).sqrt())?;
        let mask = causal_mask(t, 0, &Device::Cpu)?.expect("t > 1");
        let p = candle_nn::ops::softmax(&s.broadcast_add(&mask)?, D::Minus1)?;
        p.matmul(&v.contiguous()?)?
            .transpose(1, 2)?
            .reshape((b, t, c3 / 3))
    }

    #[test]
    fn fused_attention_matches_candle_and_its_finite_differences() {
        let qkv = (randn(&[2, 7, 3 * 12], 8) * 2.0).unwrap();
        check(
            &[qkv],
            |x| causal_attention(&x[0], 3),
            |x| composed_attention(&x[0], 3),
        );
    }

    #[test]
    fn fused_linear_matches_candle_and_its_finite_differences() {
        let inputs = [randn(&[6, 5], 9), randn(&[4, 5], 10), randn(&[4], 11)];
        check(
            &inputs,
            |x| linear(&x[0], &x[1], Some(&x[2])),
            |x| x[0].matmul(&x[1].t()?)?.broadcast_add(&x[2]),
        );
        check(
            &inputs[..2],
            |x| linear(&x[0], &x[1], None),
            |x| x[0].matmul(&x[1].t()?),
        );
    }

    #[test]
    fn candidate_cross_entropy_matches_gathered_logits_and_finite_differences() {
        // 5 rows, 3 candidates each (target first), vocabulary 11.
        let cand: Vec<u32> = vec![2, 7, 0, 9, 1, 2, 4, 4, 10, 0, 5, 6, 3, 8, 1];
        let idx = Tensor::new(cand.as_slice(), &Device::Cpu).unwrap();
        let zeros = Tensor::zeros(5, DType::U32, &Device::Cpu).unwrap();
        let inputs = [randn(&[5, 6], 12), (randn(&[11, 6], 13) * 2.0).unwrap()];
        check(
            &inputs,
            |x| candidate_cross_entropy(&x[0], &x[1], cand.clone(), 3),
            |x| {
                let w = x[1].index_select(&idx, 0)?.reshape((5, 3, 6))?;
                let logits = w.matmul(&x[0].unsqueeze(2)?)?.squeeze(2)?;
                candle_nn::loss::cross_entropy(&logits, &zeros)
            },
        );
    }

    #[test]
    fn fused_gelu_and_cross_entropy_match_their_finite_differences() {
        let x = (randn(&[4, 9], 5) * 3.0).unwrap();
        check(&[x], |x| gelu_tanh(&x[0]), |x| x[0].gelu());
        let targets = Tensor::new(&[1u32, 0, 8, 3], &Device::Cpu).unwrap();
        let logits = (randn(&[4, 9], 6) * 2.0).unwrap();
        check(
            &[logits],
            |x| cross_entropy(&x[0], &targets),
            |x| candle_nn::loss::cross_entropy(&x[0], &targets),
        );
    }
}
