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
    m: Tensor,
    v: Tensor,
    /// The previous update direction u_{t-1} (hypergradient only).
    prev_update: Option<Tensor>,
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
    rank >= 2 && !name.ends_with(".dwa") && !name.ends_with(".skip")
}

impl AdamW {
    pub fn new(vars: Vec<(String, Var)>, cfg: AdamWConfig) -> Result<Self> {
        let params = vars
            .into_iter()
            .map(|(name, var)| {
                let decay = decays(&name, var.rank());
                Ok(Param {
                    m: var.zeros_like()?,
                    v: var.zeros_like()?,
                    prev_update: None,
                    name,
                    var,
                    decay,
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
        let mut sq = 0f64;
        let present: Vec<Option<Tensor>> = self
            .params
            .iter()
            .map(|p| grads.get(p.var.as_tensor()).cloned())
            .collect();
        for g in present.iter().flatten() {
            sq += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
        }
        let grad_norm = sq.sqrt();
        let scale = if self.cfg.grad_clip > 0.0 && grad_norm > self.cfg.grad_clip {
            self.cfg.grad_clip / grad_norm
        } else {
            1.0
        };
        self.step += 1;
        let t = self.step as i32;
        let (b1, b2) = (self.cfg.beta1, self.cfg.beta2);
        let bc1 = 1.0 - b1.powi(t);
        let bc2 = 1.0 - b2.powi(t);
        let (mut dot, mut gn, mut un) = (0f64, 0f64, 0f64);
        for (p, g) in self.params.iter_mut().zip(present) {
            let Some(g) = g else { continue };
            let g = (g * scale)?;
            if let Some(u) = &p.prev_update {
                dot += (&g * u)?.sum_all()?.to_scalar::<f32>()? as f64;
                gn += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
                un += u.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
            }
            p.m = ((&p.m * b1)? + (&g * (1.0 - b1))?)?;
            p.v = ((&p.v * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let m_hat = (&p.m / bc1)?;
            let v_hat = (&p.v / bc2)?;
            let mut update = m_hat.div(&(v_hat.sqrt()? + self.cfg.eps)?)?;
            if p.decay && self.cfg.weight_decay > 0.0 {
                update = (update + (p.var.as_tensor() * self.cfg.weight_decay)?)?;
            }
            p.var.set(&(p.var.as_tensor() - (&update * lr)?)?)?;
            if self.cfg.hypergradient {
                p.prev_update = Some(update);
            }
        }
        let hyper_cos = if gn > 0.0 && un > 0.0 {
            dot / (gn.sqrt() * un.sqrt())
        } else {
            0.0
        };
        Ok(StepStats {
            grad_norm,
            hyper_cos,
        })
    }

    /// Optimizer state as named tensors (`m.{name}`, `v.{name}`, `u.{name}`).
    pub fn state(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for p in &self.params {
            out.push((format!("m.{}", p.name), p.m.clone()));
            out.push((format!("v.{}", p.name), p.v.clone()));
            if let Some(u) = &p.prev_update {
                out.push((format!("u.{}", p.name), u.clone()));
            }
        }
        out
    }

    /// Restores state saved by [`AdamW::state`].
    pub fn load_state(
        &mut self,
        state: &std::collections::HashMap<String, Tensor>,
        step: u64,
    ) -> Result<()> {
        for p in &mut self.params {
            let get = |k: String| {
                state
                    .get(&k)
                    .cloned()
                    .ok_or_else(|| candle_core::Error::Msg(format!("optimizer state has no `{k}`")))
            };
            p.m = get(format!("m.{}", p.name))?;
            p.v = get(format!("v.{}", p.name))?;
            p.prev_update = state.get(&format!("u.{}", p.name)).cloned();
        }
        self.step = step;
        Ok(())
    }
}
