//! An exit's vocabulary projection and cross-entropy as one op, in chunks of
//! rows: no (N, V) logits tensor is kept, and the gradients are computed in
//! the forward pass while each chunk's logits are in cache.
//!
//! The loss is a mean over rows, so d loss / d logits = (softmax - onehot) /
//! N is known once the logits are: each chunk's `dh = dlogits W` and
//! `dW += dlogits^T h` are formed right away (the same products a backward
//! pass would run), and `bwd` only scales them by the upstream gradient.
//! Saves, per exit at `small` (N = 1024, V = 8192): a 32 MB logits tensor,
//! its 32 MB gradient, two passes over each, and candle's transposed weight
//! gradient.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::f32_slice;
use crate::model::gemm::{matmul, Operand};
use crate::model::kernels::{axpy, dot, softmax};

/// Logit rows per chunk: about 16 M floats (64 MB), 256-1024 rows. Each
/// chunk adds its part of dW into the whole (V, C) gradient, so small
/// chunks multiply that traffic: at `gpt2` (V = 50257) 41-row chunks made
/// an own exit head cost ~1.7x its FLOPs.
fn chunk_rows(vocab: usize) -> usize {
    ((1 << 24) / vocab.max(1)).clamp(256, 1024)
}

struct ProjectedCrossEntropy {
    targets: Vec<u32>,
    /// Form the gradients in the forward (false when nothing tracks them).
    grads_wanted: bool,
    /// (dh, dW) of the mean loss, taken by `bwd`.
    grads: Mutex<Option<(Vec<f32>, Vec<f32>)>>,
    /// Also record each row's `top` highest-scoring tokens (0: none).
    top: usize,
    /// (N, top) token ids, best first, when `top > 0`.
    best: Arc<Mutex<Vec<u32>>>,
}

impl CustomOp2 for ProjectedCrossEntropy {
    fn name(&self) -> &'static str {
        "projected-cross-entropy"
    }

    /// h (N, C), w (V, C) -> mean over rows of -log softmax(h w^T)[target].
    fn cpu_fwd(
        &self,
        hs: &CpuStorage,
        hl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (h, w) = (f32_slice(hs, hl)?, f32_slice(ws, wl)?);
        let (n, c) = hl.shape().dims2()?;
        let (v, wc) = wl.shape().dims2()?;
        if wc != c {
            candle_core::bail!("projected cross-entropy: hidden width {c}, weight width {wc}");
        }
        if self.targets.len() != n {
            candle_core::bail!(
                "projected cross-entropy: {} targets for {n} rows",
                self.targets.len()
            );
        }
        if let Some(t) = self.targets.iter().find(|t| **t as usize >= v) {
            candle_core::bail!("projected cross-entropy: target {t} outside the vocabulary of {v}");
        }
        let rows = chunk_rows(v);
        let mut logits = vec![0f32; rows.min(n) * v];
        let (mut dh, mut dw) = if self.grads_wanted {
            (vec![0f32; n * c], vec![0f32; v * c])
        } else {
            (Vec::new(), Vec::new())
        };
        let mut total = 0f64;
        let mut best = vec![0u32; n * self.top];
        for r0 in (0..n).step_by(rows) {
            let r = rows.min(n - r0);
            let hc = &h[r0 * c..(r0 + r) * c];
            let lg = &mut logits[..r * v];
            matmul(lg, Operand::n(hc, r, c), Operand::t(w, c, v), false);
            let targets = &self.targets[r0..r0 + r];
            if self.top > 0 {
                let k = self.top;
                lg.par_chunks(v)
                    .zip(best[r0 * k..(r0 + r) * k].par_chunks_mut(k))
                    .for_each(|(row, out)| top_k(row, out));
            }
            // Each row becomes softmax - onehot, scaled by 1 / N.
            let inv_n = 1.0 / n as f32;
            total += lg
                .par_chunks_mut(v)
                .zip(targets.par_iter())
                .map(|(row, &t)| {
                    let target_logit = row[t as usize];
                    let lse = softmax(row);
                    row[t as usize] -= 1.0;
                    row.iter_mut().for_each(|x| *x *= inv_n);
                    (lse - target_logit) as f64
                })
                .sum::<f64>();
            if self.grads_wanted {
                let d = Operand::n(lg, r, v);
                matmul(&mut dh[r0 * c..(r0 + r) * c], d, Operand::n(w, v, c), false);
                matmul(&mut dw, Operand::t(lg, v, r), Operand::n(hc, r, c), true);
            }
        }
        if self.grads_wanted {
            *self.grads.lock().expect("gradient slot") = Some((dh, dw));
        }
        *self.best.lock().expect("candidates slot") = best;
        Ok(mean_loss(total, n))
    }

    fn bwd(
        &self,
        h: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        scaled_grads(&self.grads, h, w, grad)
    }
}

/// Mean cross-entropy of the logits `h (N, C) w^T` against `targets (N,)`
/// u32, without keeping the logits on the CPU. Other devices project, then
/// take candle's cross-entropy.
pub fn projected_cross_entropy(h: &Tensor, w: &Tensor, targets: &Tensor) -> Result<Tensor> {
    Ok(projected_cross_entropy_top(h, w, targets, 0, true)?.0)
}

/// As [`projected_cross_entropy`], also returning each row's `top` best
/// tokens (N x top ids, best first; empty when `top` is 0). `grads: false`
/// skips the gradients (evaluation).
pub fn projected_cross_entropy_top(
    h: &Tensor,
    w: &Tensor,
    targets: &Tensor,
    top: usize,
    grads: bool,
) -> Result<(Tensor, Vec<u32>)> {
    let v = w.dim(0)?;
    if top > v {
        candle_core::bail!("projected cross-entropy: top {top} of a vocabulary of {v}");
    }
    if !h.device().is_cpu() {
        let logits = h.matmul(&w.t()?)?;
        let mut best = vec![0u32; h.dim(0)? * top];
        if top > 0 {
            // On the host: a device sort of 50k-wide rows needs more shared
            // memory than a block has, and ties must break as on the CPU.
            let rows = logits
                .to_device(&candle_core::Device::Cpu)?
                .to_vec2::<f32>()?;
            for (row, out) in rows.iter().zip(best.chunks_mut(top)) {
                top_k(row, out);
            }
        }
        return Ok((super::cross_entropy(&logits, targets)?, best));
    }
    let best = Arc::new(Mutex::new(Vec::new()));
    let op = ProjectedCrossEntropy {
        targets: targets.to_vec1::<u32>()?,
        grads_wanted: grads && (h.track_op() || w.track_op()),
        grads: Mutex::new(None),
        top,
        best: best.clone(),
    };
    let (h, w) = (h.contiguous()?, w.contiguous()?);
    let loss = if op.grads_wanted {
        h.apply_op2(&w, op)?
    } else {
        h.apply_op2_no_bwd(&w, &op)?
    };
    let best = std::mem::take(&mut *best.lock().expect("candidates slot"));
    Ok((loss, best))
}

/// The indices of the `out.len()` largest values of `row`, largest first
/// (ties: the lower index first).
fn top_k(row: &[f32], out: &mut [u32]) {
    let k = out.len();
    // (value, index), sorted descending; most values fail the first test.
    let mut held: Vec<(f32, u32)> = Vec::with_capacity(k + 1);
    for (i, &x) in row.iter().enumerate() {
        if held.len() == k && x <= held[k - 1].0 {
            continue;
        }
        let at = held.partition_point(|&(y, _)| y >= x);
        held.insert(at, (x, i as u32));
        held.truncate(k);
    }
    for (o, (_, i)) in out.iter_mut().zip(&held) {
        *o = *i;
    }
}

/// An exit's cross-entropy over a candidate set per row instead of the
/// whole vocabulary: row r's logits are `h_r . w_c` for its candidates c
/// (the target first), so a row costs `S x C` multiply-adds, not `V x C`.
/// With the final head's top tokens as candidates this trains an exit to
/// rank the tokens the final head ranks high, with the target, at ~S/V of
/// a full exit's cost.
struct CandidateCrossEntropy {
    /// (N, S) token ids per row; column 0 is the target.
    candidates: Vec<u32>,
    s: usize,
    grads: Mutex<Option<(Vec<f32>, Vec<f32>)>>,
}

impl CustomOp2 for CandidateCrossEntropy {
    fn name(&self) -> &'static str {
        "candidate-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        hs: &CpuStorage,
        hl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (h, w) = (f32_slice(hs, hl)?, f32_slice(ws, wl)?);
        let (n, c) = hl.shape().dims2()?;
        let (v, wc) = wl.shape().dims2()?;
        if wc != c || self.candidates.len() != n * self.s {
            candle_core::bail!(
                "candidate cross-entropy: h ({n}, {c}), w ({v}, {wc}), {} candidates of {} per row",
                self.candidates.len(),
                self.s
            );
        }
        if let Some(t) = self.candidates.iter().find(|t| **t as usize >= v) {
            candle_core::bail!("candidate cross-entropy: token {t} outside the vocabulary of {v}");
        }
        let inv_n = 1.0 / n.max(1) as f32;
        // Per row: the candidates' logits become d loss / d logit.
        let mut d = vec![0f32; n * self.s];
        let mut dh = vec![0f32; n * c];
        let total: f64 = d
            .par_chunks_mut(self.s)
            .zip(dh.par_chunks_mut(c.max(1)))
            .zip(
                h.par_chunks(c.max(1))
                    .zip(self.candidates.par_chunks(self.s)),
            )
            .map(|((d, dh), (hr, cand))| {
                for (x, &t) in d.iter_mut().zip(cand) {
                    *x = dot(hr, &w[t as usize * c..(t as usize + 1) * c]);
                }
                let target_logit = d[0];
                let lse = softmax(d);
                d[0] -= 1.0;
                for (x, &t) in d.iter_mut().zip(cand) {
                    *x *= inv_n;
                    axpy(dh, *x, &w[t as usize * c..(t as usize + 1) * c]);
                }
                (lse - target_logit) as f64
            })
            .sum();
        // dW rows of the candidates; rows repeat across positions, so
        // this scatter runs on one thread.
        let mut dw = vec![0f32; v * c];
        for ((d, cand), hr) in d
            .chunks(self.s)
            .zip(self.candidates.chunks(self.s))
            .zip(h.chunks(c.max(1)))
        {
            for (&x, &t) in d.iter().zip(cand) {
                axpy(&mut dw[t as usize * c..(t as usize + 1) * c], x, hr);
            }
        }
        *self.grads.lock().expect("gradient slot") = Some((dh, dw));
        Ok(mean_loss(total, n))
    }

    fn bwd(
        &self,
        h: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        scaled_grads(&self.grads, h, w, grad)
    }
}

/// The scalar output of a loss summed over `n` rows: their mean.
fn mean_loss(total: f64, n: usize) -> (CpuStorage, Shape) {
    let mean = if n == 0 { 0.0 } else { total / n as f64 };
    (CpuStorage::F32(vec![mean as f32]), Shape::from(()))
}

/// The stored (dh, dW) of a mean loss, scaled by the upstream gradient.
fn scaled_grads(
    slot: &Mutex<Option<(Vec<f32>, Vec<f32>)>>,
    h: &Tensor,
    w: &Tensor,
    grad: &Tensor,
) -> Result<(Option<Tensor>, Option<Tensor>)> {
    let Some((mut dh, mut dw)) = slot.lock().expect("gradient slot").take() else {
        candle_core::bail!("a fused loss's backward ran twice or without gradients")
    };
    let g = grad.to_scalar::<f32>()?;
    if g != 1.0 {
        dh.par_iter_mut().for_each(|x| *x *= g);
        dw.par_iter_mut().for_each(|x| *x *= g);
    }
    Ok((
        Some(Tensor::from_vec(dh, h.shape(), h.device())?),
        Some(Tensor::from_vec(dw, w.shape(), w.device())?),
    ))
}

/// Mean cross-entropy of `h (N, C)` projected by `w (V, C)` onto each row's
/// candidates only: `candidates` holds N rows of S token ids, the target in
/// column 0 (training only: evaluation scores the whole vocabulary).
pub fn candidate_cross_entropy(
    h: &Tensor,
    w: &Tensor,
    candidates: Vec<u32>,
    s: usize,
) -> Result<Tensor> {
    if s == 0 {
        candle_core::bail!("candidate cross-entropy: no candidates per row");
    }
    if !h.device().is_cpu() {
        // Gather the candidates' weight rows: (N, S, C) . (N, C, 1).
        let n = h.dim(0)?;
        let idx = Tensor::from_vec(candidates, n * s, h.device())?;
        let wc = w.index_select(&idx, 0)?.reshape((n, s, ()))?;
        let logits = wc.matmul(&h.unsqueeze(2)?)?.squeeze(2)?; // (N, S)
        let zeros = Tensor::zeros(n, candle_core::DType::U32, h.device())?;
        return super::cross_entropy(&logits, &zeros);
    }
    let op = CandidateCrossEntropy {
        candidates,
        s,
        grads: Mutex::new(None),
    };
    h.contiguous()?.apply_op2(&w.contiguous()?, op)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ops::tests::randn;
    use candle_core::{Device, Var};

    /// Several chunks (V = 70000 gives 256-row chunks) with a short last one.
    #[test]
    fn chunked_loss_and_gradients_equal_projecting_then_cross_entropy() {
        let (n, c, v) = (600, 8, 70_000);
        let h = Var::from_tensor(&randn(&[n, c], 1)).unwrap();
        let w = Var::from_tensor(&(randn(&[v, c], 2) * 2.0).unwrap()).unwrap();
        let t: Vec<u32> = (0..n as u32).map(|i| i * 997 % v as u32).collect();
        let t = Tensor::new(t.as_slice(), &Device::Cpu).unwrap();
        let ours = (projected_cross_entropy(&h, &w, &t).unwrap() * 0.7).unwrap();
        let logits = h.matmul(&w.t().unwrap()).unwrap();
        let want = (candle_nn::loss::cross_entropy(&logits, &t).unwrap() * 0.7).unwrap();
        let (a, b) = (
            ours.to_scalar::<f32>().unwrap(),
            want.to_scalar::<f32>().unwrap(),
        );
        assert!((a - b).abs() < 1e-4 * b.abs(), "loss {a} vs {b}");
        let (g1, g2) = (ours.backward().unwrap(), want.backward().unwrap());
        for (name, var) in [("h", &h), ("w", &w)] {
            let (p, q) = (g1.get(var).unwrap(), g2.get(var).unwrap());
            let scale = q
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            let err = (p - q).unwrap().abs().unwrap().max_all().unwrap();
            let err = err.to_scalar::<f32>().unwrap();
            assert!(
                err <= 1e-4 * scale,
                "gradient of {name}: max error {err} vs {scale}"
            );
        }
    }

    #[test]
    fn top_k_lists_the_largest_values_best_first() {
        let row = [0.5, 3.0, -1.0, 3.0, 2.0, 9.0, 0.0];
        let mut out = [0u32; 4];
        top_k(&row, &mut out);
        assert_eq!(out, [5, 1, 3, 4]);
    }

    #[test]
    fn a_target_outside_the_vocabulary_is_an_error_that_names_it() {
        let (h, w) = (randn(&[2, 4], 1), randn(&[5, 4], 2));
        let t = Tensor::new(&[1u32, 9], &Device::Cpu).unwrap();
        let err = projected_cross_entropy(&h, &w, &t).unwrap_err().to_string();
        assert!(
            err.contains("target 9 outside the vocabulary of 5"),
            "{err}"
        );
    }
}
