//! AdamW (decoupled weight decay, Loshchilov & Hutter) with weight decay on
//! matrices only (not norms, biases, gains, DWA or skip scalars), global
//! gradient-norm clipping, and the hypergradient the differentiable LR
//! scheduler needs: `g_t . u_{t-1}`, the dot product of this step's
//! gradient with the previous update direction (Baydin et al., arXiv
//! 1703.04782), reported as a cosine.

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, Var};

pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Clip the global gradient norm to this (0 = off).
    pub grad_clip: f64,
    /// Track the previous update for the hypergradient.
    pub hypergradient: bool,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
            grad_clip: 1.0,
            hypergradient: false,
        }
    }
}

struct Param {
    name: String,
    var: Var,
    decay: bool,
    moments: Moments,
}

/// First and second moments, and the previous update direction u_{t-1}
/// (hypergradient only).
enum Moments {
    /// CPU parameters: flat buffers that one fused pass updates in place
    /// with the weights (the composed form below ran ~12 tensor ops per
    /// parameter, each allocating: 0.11-0.17 s of a 1.6 s step at `small`).
    Host {
        m: Vec<f32>,
        v: Vec<f32>,
        u: Option<Vec<f32>>,
    },
    /// Other devices: candle's tensor ops.
    Device {
        m: Tensor,
        v: Tensor,
        u: Option<Tensor>,
    },
}

pub struct AdamW {
    params: Vec<Param>,
    cfg: AdamWConfig,
    pub step: u64,
}

pub struct StepStats {
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// cos(g_t, u_{t-1}), or 0 on the first step / without hypergradient.
    pub hyper_cos: f64,
}

/// Weight decay applies to matrices only.
pub fn decays(name: &str, rank: usize) -> bool {
    use crate::model::params::{is_dwa, is_skip};
    rank >= 2 && !is_dwa(name) && !is_skip(name)
}

/// One step's constants, shared by every parameter.
#[derive(Clone, Copy)]
struct Hyper {
    lr: f32,
    b1: f32,
    b2: f32,
    bc1: f32,
    bc2: f32,
    eps: f32,
    /// Weight decay of this parameter (0 when it does not decay).
    wd: f32,
    /// Gradient clipping factor.
    scale: f32,
}

/// Sums a hypergradient step needs: g . u, |g|^2, |u|^2.
#[derive(Default, Clone, Copy)]
struct Dots {
    gu: f64,
    gg: f64,
    uu: f64,
}

impl std::ops::Add for Dots {
    type Output = Dots;
    fn add(self, o: Dots) -> Dots {
        Dots {
            gu: self.gu + o.gu,
            gg: self.gg + o.gg,
            uu: self.uu + o.uu,
        }
    }
}

/// Elements per parallel task of the fused update.
const CHUNK: usize = 1 << 14;

/// A parameter's m, v and (hypergradient only) u, borrowed for one update.
type Buffers<'a> = (&'a mut [f32], &'a mut [f32], Option<&'a mut [f32]>);

/// The fused AdamW update of one CPU parameter, applied to its storage.
struct FusedStep<'a> {
    g: &'a [f32],
    state: std::sync::Mutex<Buffers<'a>>,
    h: Hyper,
    dots: std::sync::Mutex<Dots>,
}

impl candle_core::InplaceOp1 for FusedStep<'_> {
    fn name(&self) -> &'static str {
        "fused-adamw"
    }

    fn cpu_fwd(
        &self,
        storage: &mut candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> Result<()> {
        let candle_core::CpuStorage::F32(data) = storage else {
            candle_core::bail!("fused AdamW expects f32 parameters")
        };
        let Some((a, b)) = layout.contiguous_offsets() else {
            candle_core::bail!("fused AdamW expects contiguous parameters")
        };
        let w = &mut data[a..b];
        let mut state = self.state.lock().expect("optimizer state");
        let (m, v, u) = &mut *state;
        if w.len() != self.g.len() || m.len() != w.len() || v.len() != w.len() {
            candle_core::bail!(
                "fused AdamW: parameter of {}, gradient of {}, moments of {}",
                w.len(),
                self.g.len(),
                m.len()
            );
        }
        use rayon::prelude::*;
        let h = self.h;
        let parts = w
            .par_chunks_mut(CHUNK)
            .zip(self.g.par_chunks(CHUNK))
            .zip(m.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK)));
        let dots = match u {
            Some(u) => parts
                .zip(u.par_chunks_mut(CHUNK))
                .map(|(((w, g), (m, v)), u)| update(h, w, g, m, v, Some(u)))
                .reduce(Dots::default, |a, b| a + b),
            None => parts
                .map(|((w, g), (m, v))| update(h, w, g, m, v, None))
                .reduce(Dots::default, |a, b| a + b),
        };
        *self.dots.lock().expect("dots") = dots;
        Ok(())
    }
}

/// AdamW on one chunk: moments, decoupled decay, the weight step, and the
/// update direction kept for the next hypergradient.
fn update(
    h: Hyper,
    w: &mut [f32],
    g: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    mut u: Option<&mut [f32]>,
) -> Dots {
    let mut d = Dots::default();
    for i in 0..w.len() {
        let gi = g[i] * h.scale;
        if let Some(u) = u.as_deref() {
            d.gu += (gi * u[i]) as f64;
            d.gg += (gi * gi) as f64;
            d.uu += (u[i] * u[i]) as f64;
        }
        m[i] = h.b1 * m[i] + (1.0 - h.b1) * gi;
        v[i] = h.b2 * v[i] + (1.0 - h.b2) * gi * gi;
        let step = (m[i] / h.bc1) / ((v[i] / h.bc2).sqrt() + h.eps) + h.wd * w[i];
        w[i] -= h.lr * step;
        if let Some(u) = u.as_deref_mut() {
            u[i] = step;
        }
    }
    d
}

/// Sum of squares of a tensor's elements.
fn sum_sq(g: &Tensor) -> Result<f64> {
    if g.device().is_cpu() {
        let g = g.contiguous()?;
        let (s, l) = g.storage_and_layout();
        if let (candle_core::Storage::Cpu(candle_core::CpuStorage::F32(d)), Some((a, b))) =
            (&*s, l.contiguous_offsets())
        {
            use rayon::prelude::*;
            return Ok(d[a..b]
                .par_chunks(CHUNK)
                .map(|c| c.iter().map(|x| (x * x) as f64).sum::<f64>())
                .sum());
        }
    }
    g.sqr()?
        .sum_all()?
        .to_dtype(candle_core::DType::F64)?
        .to_scalar::<f64>()
}

impl AdamW {
    pub fn new(vars: Vec<(String, Var)>, cfg: AdamWConfig) -> Result<Self> {
        let params = vars
            .into_iter()
            .map(|(name, var)| {
                let decay = decays(&name, var.rank());
                let fused = var.device().is_cpu() && var.dtype() == candle_core::DType::F32;
                let moments = if fused {
                    let n = var.elem_count();
                    Moments::Host {
                        m: vec![0.0; n],
                        v: vec![0.0; n],
                        u: None,
                    }
                } else {
                    Moments::Device {
                        m: var.zeros_like()?,
                        v: var.zeros_like()?,
                        u: None,
                    }
                };
                Ok(Param {
                    name,
                    var,
                    decay,
                    moments,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            params,
            cfg,
            step: 0,
        })
    }

    /// One AdamW update at learning rate `lr`.
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<StepStats> {
        let present: Vec<Option<Tensor>> = self
            .params
            .iter()
            .map(|p| {
                grads
                    .get(p.var.as_tensor())
                    .map(|g| g.contiguous())
                    .transpose()
            })
            .collect::<Result<_>>()?;
        let mut sq = 0f64;
        for g in present.iter().flatten() {
            sq += sum_sq(g)?;
        }
        let grad_norm = sq.sqrt();
        let scale = if self.cfg.grad_clip > 0.0 && grad_norm > self.cfg.grad_clip {
            self.cfg.grad_clip / grad_norm
        } else {
            1.0
        };
        self.step += 1;
        let t = self.step as i32;
        let mut dots = Dots::default();
        for (p, g) in self.params.iter_mut().zip(present) {
            let Some(g) = g else { continue };
            let h = Hyper {
                lr: lr as f32,
                b1: self.cfg.beta1 as f32,
                b2: self.cfg.beta2 as f32,
                bc1: (1.0 - self.cfg.beta1.powi(t)) as f32,
                bc2: (1.0 - self.cfg.beta2.powi(t)) as f32,
                eps: self.cfg.eps as f32,
                wd: if p.decay {
                    self.cfg.weight_decay as f32
                } else {
                    0.0
                },
                scale: scale as f32,
            };
            dots = dots + p.update(&g, h, self.cfg.hypergradient)?;
        }
        let hyper_cos = if dots.gg > 0.0 && dots.uu > 0.0 {
            dots.gu / (dots.gg.sqrt() * dots.uu.sqrt())
        } else {
            0.0
        };
        Ok(StepStats {
            grad_norm,
            hyper_cos,
        })
    }

    /// Optimizer state as named tensors (`m.{name}`, `v.{name}`, `u.{name}`).
    pub fn state(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        for p in &self.params {
            let shape = p.var.shape();
            let host = |x: &Vec<f32>| Tensor::from_vec(x.clone(), shape, p.var.device());
            let (m, v, u) = match &p.moments {
                Moments::Host { m, v, u } => {
                    (host(m)?, host(v)?, u.as_ref().map(host).transpose()?)
                }
                Moments::Device { m, v, u } => (m.clone(), v.clone(), u.clone()),
            };
            out.push((format!("m.{}", p.name), m));
            out.push((format!("v.{}", p.name), v));
            if let Some(u) = u {
                out.push((format!("u.{}", p.name), u));
            }
        }
        Ok(out)
    }

    /// Restores state saved by [`AdamW::state`].
    pub fn load_state(
        &mut self,
        state: &std::collections::HashMap<String, Tensor>,
        step: u64,
    ) -> Result<()> {
        for p in &mut self.params {
            let get = |k: String| -> Result<Tensor> {
                let t = state.get(&k).cloned().ok_or_else(|| {
                    candle_core::Error::Msg(format!("optimizer state has no `{k}`"))
                })?;
                if t.shape() != p.var.shape() {
                    candle_core::bail!(
                        "optimizer state `{k}` has shape {:?}, the parameter {:?}",
                        t.dims(),
                        p.var.dims()
                    );
                }
                Ok(t)
            };
            let (m, v) = (get(format!("m.{}", p.name))?, get(format!("v.{}", p.name))?);
            let u_key = format!("u.{}", p.name);
            let u = if state.contains_key(&u_key) {
                Some(get(u_key)?)
            } else {
                None
            };
            let host = |t: Tensor| {
                t.flatten_all()?
                    .to_dtype(candle_core::DType::F32)?
                    .to_vec1::<f32>()
            };
            p.moments = match p.moments {
                Moments::Host { .. } => Moments::Host {
                    m: host(m)?,
                    v: host(v)?,
                    u: u.map(host).transpose()?,
                },
                Moments::Device { .. } => Moments::Device { m, v, u },
            };
        }
        self.step = step;
        Ok(())
    }
}

impl Param {
    /// Applies one update with gradient `g` (contiguous); returns the
    /// hypergradient sums (zero without a previous update).
    fn update(&mut self, g: &Tensor, h: Hyper, hypergradient: bool) -> Result<Dots> {
        match &mut self.moments {
            Moments::Host { m, v, u } => {
                // A parameter's first update has no previous direction: it
                // adds nothing to the dots (as on other devices).
                let first = u.is_none();
                if hypergradient && first {
                    *u = Some(vec![0.0; m.len()]);
                }
                let (gs, gl) = g.storage_and_layout();
                let gv = match (&*gs, gl.contiguous_offsets()) {
                    (candle_core::Storage::Cpu(candle_core::CpuStorage::F32(d)), Some((a, b))) => {
                        &d[a..b]
                    }
                    _ => candle_core::bail!(
                        "gradient of {} is not contiguous f32 on the CPU",
                        self.name
                    ),
                };
                let op = FusedStep {
                    g: gv,
                    state: std::sync::Mutex::new((
                        m,
                        v,
                        if hypergradient {
                            u.as_deref_mut()
                        } else {
                            None
                        },
                    )),
                    h,
                    dots: std::sync::Mutex::new(Dots::default()),
                };
                self.var.as_tensor().inplace_op1(&op)?;
                let dots = *op.dots.lock().expect("dots");
                Ok(if first { Dots::default() } else { dots })
            }
            Moments::Device { m, v, u } => {
                let g = (g * h.scale as f64)?;
                let mut dots = Dots::default();
                if let Some(u) = u.as_ref().filter(|_| hypergradient) {
                    dots.gu = (&g * u)?.sum_all()?.to_scalar::<f32>()? as f64;
                    dots.gg = g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
                    dots.uu = u.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
                }
                let (b1, b2) = (h.b1 as f64, h.b2 as f64);
                *m = ((&*m * b1)? + (&g * (1.0 - b1))?)?;
                *v = ((&*v * b2)? + (g.sqr()? * (1.0 - b2))?)?;
                let m_hat = (&*m / h.bc1 as f64)?;
                let v_hat = (&*v / h.bc2 as f64)?;
                let mut step = m_hat.div(&(v_hat.sqrt()? + h.eps as f64)?)?;
                if h.wd > 0.0 {
                    step = (step + (self.var.as_tensor() * h.wd as f64)?)?;
                }
                self.var
                    .set(&(self.var.as_tensor() - (&step * h.lr as f64)?)?)?;
                if hypergradient {
                    *u = Some(step);
                }
                Ok(dots)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn vars(seed: u64) -> Vec<(String, Var)> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut t = |shape: &[usize]| {
            let n = shape.iter().product();
            let v: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
            Var::from_tensor(&Tensor::from_vec(v, shape, &Device::Cpu).unwrap()).unwrap()
        };
        vec![
            ("h.0.attn.c_attn.weight".into(), t(&[40_000, 3])),
            ("h.0.ln_1.bias".into(), t(&[7])),
        ]
    }

    /// Host moments turned into the composed tensor form.
    fn composed(opt: &mut AdamW) {
        for p in &mut opt.params {
            p.moments = Moments::Device {
                m: p.var.zeros_like().unwrap(),
                v: p.var.zeros_like().unwrap(),
                u: None,
            };
        }
    }

    #[test]
    fn the_fused_update_equals_the_composed_tensor_ops() {
        let cfg = || AdamWConfig {
            hypergradient: true,
            grad_clip: 5.0,
            ..Default::default()
        };
        let (a, b) = (vars(1), vars(1));
        let mut fused = AdamW::new(a.clone(), cfg()).unwrap();
        let mut plain = AdamW::new(b.clone(), cfg()).unwrap();
        composed(&mut plain);
        for step in 0..3u64 {
            // The same loss on both copies: sum(w * r) + sum(w^2).
            let stats: Vec<StepStats> = [(&a, &mut fused), (&b, &mut plain)]
                .into_iter()
                .map(|(vs, opt)| {
                    let mut loss = Tensor::new(0f32, &Device::Cpu).unwrap();
                    for (i, (_, v)) in vs.iter().enumerate() {
                        let r = Tensor::ones(v.shape(), candle_core::DType::F32, &Device::Cpu)
                            .unwrap()
                            .affine(0.3, i as f64 + step as f64)
                            .unwrap();
                        let term = ((v.as_tensor() * &r).unwrap() + v.as_tensor().sqr().unwrap())
                            .unwrap()
                            .sum_all()
                            .unwrap();
                        loss = (loss + term).unwrap();
                    }
                    opt.step(&loss.backward().unwrap(), 1e-2).unwrap()
                })
                .collect();
            let (f, p) = (&stats[0], &stats[1]);
            assert!((f.grad_norm - p.grad_norm).abs() < 1e-4 * p.grad_norm);
            assert!(
                (f.hyper_cos - p.hyper_cos).abs() < 1e-4,
                "{} vs {}",
                f.hyper_cos,
                p.hyper_cos
            );
            if step > 0 {
                assert!(f.hyper_cos.abs() > 0.0, "the hypergradient is measured");
            }
        }
        for ((name, x), (_, y)) in a.iter().zip(&b) {
            let d = (x.as_tensor() - y.as_tensor()).unwrap().abs().unwrap();
            let d = d.max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(d < 1e-5, "{name}: fused and composed differ by {d}");
        }
        let (sf, sp) = (fused.state().unwrap(), plain.state().unwrap());
        assert_eq!(sf.len(), 6, "m, v and u of both parameters");
        for ((kf, tf), (kp, tp)) in sf.iter().zip(&sp) {
            assert_eq!(kf, kp);
            let d = (tf - tp).unwrap().abs().unwrap().max_all().unwrap();
            assert!(d.to_scalar::<f32>().unwrap() < 1e-5, "{kf}");
        }
    }

    #[test]
    fn state_of_the_wrong_shape_is_an_error_that_names_it() {
        let mut opt = AdamW::new(vars(2), Default::default()).unwrap();
        let mut state: std::collections::HashMap<String, Tensor> =
            opt.state().unwrap().into_iter().collect();
        state.insert(
            "v.h.0.ln_1.bias".into(),
            Tensor::zeros(5, candle_core::DType::F32, &Device::Cpu).unwrap(),
        );
        let err = opt.load_state(&state, 3).unwrap_err().to_string();
        assert!(err.contains("`v.h.0.ln_1.bias` has shape [5]"), "{err}");
    }
}
