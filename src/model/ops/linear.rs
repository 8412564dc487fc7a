//! nn.Linear for training, `y = x W^T + b`, as one op with its backward:
//! the bias is the GEMM's starting value, and the backward forms dX = dY W,
//! dW = dY^T X (contiguous, as the optimizer reads it) and db in one call.
//! Through candle's graph the same layer was a matmul of a transposed view,
//! a broadcast add, and in the backward a transposed weight gradient and a
//! reduction for the bias, each allocating.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

use super::f32_slice;
use crate::model::gemm::{matmul, Operand};

/// x (N, in), w (out, in), optional bias (out,) -> (N, out).
fn forward(
    x: &[f32],
    xl: &Layout,
    w: &[f32],
    wl: &Layout,
    b: Option<&[f32]>,
) -> Result<(CpuStorage, Shape)> {
    let (n, i) = xl.shape().dims2()?;
    let (o, wi) = wl.shape().dims2()?;
    if wi != i {
        candle_core::bail!("linear: input width {i}, weight ({o}, {wi})");
    }
    let mut y = vec![0f32; n * o];
    if let Some(b) = b {
        if b.len() != o {
            candle_core::bail!("linear: bias of {} for {o} outputs", b.len());
        }
        y.chunks_exact_mut(o.max(1))
            .for_each(|r| r.copy_from_slice(b));
    }
    matmul(
        &mut y,
        Operand::n(x, n, i),
        Operand::t(w, i, o),
        b.is_some(),
    );
    Ok((CpuStorage::F32(y), Shape::from((n, o))))
}

/// (dx, dw, db) for upstream `grad` (N, out).
fn backward(
    x: &Tensor,
    w: &Tensor,
    grad: &Tensor,
    bias: bool,
) -> Result<(Tensor, Tensor, Option<Tensor>)> {
    let (n, i) = x.dims2()?;
    let o = w.dim(0)?;
    let grad = grad.contiguous()?;
    let (gs, gl) = grad.storage_and_layout();
    let (xs, xl) = x.storage_and_layout();
    let (ws, wl) = w.storage_and_layout();
    let (
        candle_core::Storage::Cpu(gs),
        candle_core::Storage::Cpu(xs),
        candle_core::Storage::Cpu(ws),
    ) = (&*gs, &*xs, &*ws)
    else {
        candle_core::bail!("linear: backward expects CPU tensors")
    };
    let (g, xv, wv) = (f32_slice(gs, gl)?, f32_slice(xs, xl)?, f32_slice(ws, wl)?);
    let mut dx = vec![0f32; n * i];
    matmul(&mut dx, Operand::n(g, n, o), Operand::n(wv, o, i), false);
    let mut dw = vec![0f32; o * i];
    matmul(&mut dw, Operand::t(g, o, n), Operand::n(xv, n, i), false);
    let db = bias.then(|| {
        let mut db = vec![0f32; o];
        for row in g.chunks_exact(o.max(1)) {
            crate::model::kernels::axpy(&mut db, 1.0, row);
        }
        db
    });
    let dev = x.device();
    Ok((
        Tensor::from_vec(dx, (n, i), dev)?,
        Tensor::from_vec(dw, (o, i), dev)?,
        db.map(|db| Tensor::from_vec(db, o, dev)).transpose()?,
    ))
}

struct Linear;

impl CustomOp2 for Linear {
    fn name(&self) -> &'static str {
        "linear"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        forward(f32_slice(xs, xl)?, xl, f32_slice(ws, wl)?, wl, None)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, _) = backward(x, w, grad, false)?;
        Ok((Some(dx), Some(dw)))
    }
}

struct LinearBias;

impl CustomOp3 for LinearBias {
    fn name(&self) -> &'static str {
        "linear-bias"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let b = f32_slice(bs, bl)?;
        forward(f32_slice(xs, xl)?, xl, f32_slice(ws, wl)?, wl, Some(b))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, db) = backward(x, w, grad, true)?;
        Ok((Some(dx), Some(dw), db))
    }
}

/// `x (N, in) w^T + bias` for `w` (out, in): one op on the CPU, candle's
/// matmul and add elsewhere.
pub fn linear(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    if !x.device().is_cpu() {
        let y = x.matmul(&w.t()?)?;
        return match bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        };
    }
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    match bias {
        Some(b) => x.apply_op3(&w, &b.contiguous()?, LinearBias),
        None => x.apply_op2(&w, Linear),
    }
}
