//! The CPU model's weights: the checkpoint's tensors (GPT-2 names, as
//! [`crate::model::gpt::Gpt`] reads them) converted once at load into the
//! kernels' layouts, linear layers packed as [`Matrix`] in f32 or f16.
//! Loading runs in phases: the embeddings, each block, each exit.

use std::collections::HashMap;

use candle_core::{bail, Result, Tensor};
use half::f16;

use super::CpuGpt;
use crate::model::config::{Config, ExitHead};
use crate::model::kernels::{self, Matrix};
use crate::model::params;

/// Storage of the matrices: f32, or f16 (half the memory traffic; decode
/// of models that do not fit in cache is memory-bound).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightDtype {
    F32,
    F16,
}

pub(super) enum Mat {
    F32(Matrix<f32>),
    F16(Matrix<f16>),
}

impl Mat {
    fn new(w: &[f32], n: usize, k: usize, bias: Option<Vec<f32>>, dt: WeightDtype) -> Self {
        match dt {
            WeightDtype::F32 => Mat::F32(Matrix::from_out_in(w, n, k, bias)),
            WeightDtype::F16 => Mat::F16(Matrix::from_out_in(w, n, k, bias)),
        }
    }

    /// Output `o`'s weights and bias.
    pub(super) fn output(&self, o: usize) -> (Vec<f32>, f32) {
        match self {
            Mat::F32(a) => a.output(o),
            Mat::F16(a) => a.output(o),
        }
    }

    /// y (m, n) = x (m, k) W^T + b.
    pub(super) fn forward(&self, x: &[f32], m: usize) -> Vec<f32> {
        let n = match self {
            Mat::F32(a) => a.n,
            Mat::F16(a) => a.n,
        };
        let mut y = vec![0f32; m * n];
        match self {
            Mat::F32(a) => a.forward(x, m, &mut y),
            Mat::F16(a) => a.forward(x, m, &mut y),
        }
        y
    }
}

pub(super) struct Norm {
    w: Vec<f32>,
    b: Option<Vec<f32>>,
    eps: f32,
}

impl Norm {
    pub(super) fn forward(&self, x: &[f32]) -> Vec<f32> {
        let mut y = vec![0f32; x.len()];
        kernels::layer_norm(x, &self.w, self.b.as_deref(), self.eps, &mut y);
        y
    }
}

pub(super) struct Block {
    pub(super) ln_1: Norm,
    pub(super) c_attn: Mat,
    pub(super) attn_proj: Mat,
    pub(super) ln_2: Norm,
    pub(super) c_fc: Mat,
    pub(super) mlp_proj: Mat,
    pub(super) skip: Option<[f32; 2]>,
    pub(super) dwa: Option<Vec<f32>>,
}

pub(super) struct Exit {
    pub(super) ln: Norm,
    /// None: tied to `wte`.
    pub(super) head: Option<Mat>,
}

fn get(w: &HashMap<String, Tensor>, name: &str, len: usize) -> Result<Vec<f32>> {
    let t = w
        .get(name)
        .ok_or_else(|| candle_core::Error::Msg(format!("weights lack `{name}`")))?;
    let v = t
        .to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    if v.len() != len {
        bail!("`{name}` has {} elements, expected {len}", v.len());
    }
    Ok(v)
}

/// The checkpoint's tensors and what to convert them to: one method per
/// kind of layer, named by GPT-2 prefix.
struct Loader<'a> {
    cfg: &'a Config,
    w: &'a HashMap<String, Tensor>,
    dt: WeightDtype,
}

impl Loader<'_> {
    fn bias(&self, p: &str, n: usize) -> Result<Option<Vec<f32>>> {
        if self.cfg.bias {
            Ok(Some(get(self.w, &params::bias(p), n)?))
        } else {
            Ok(None)
        }
    }

    fn norm(&self, p: &str) -> Result<Norm> {
        let c = self.cfg.n_embd;
        Ok(Norm {
            w: get(self.w, &params::weight(p), c)?,
            b: self.bias(p, c)?,
            eps: self.cfg.layer_norm_epsilon as f32,
        })
    }

    fn linear(&self, p: &str, n: usize, k: usize) -> Result<Mat> {
        Ok(Mat::new(
            &get(self.w, &params::weight(p), n * k)?,
            n,
            k,
            self.bias(p, n)?,
            self.dt,
        ))
    }

    /// Block `i` (`h.{i}`): its norms, attention and MLP, and the x0 skip
    /// and DWA weights when the config has them.
    fn block(&self, i: usize) -> Result<Block> {
        let (cfg, w, c) = (self.cfg, self.w, self.cfg.n_embd);
        Ok(Block {
            ln_1: self.norm(&params::block(i, params::LN_1))?,
            c_attn: self.linear(&params::block(i, params::C_ATTN), 3 * c, c)?,
            attn_proj: self.linear(&params::block(i, params::ATTN_PROJ), c, c)?,
            ln_2: self.norm(&params::block(i, params::LN_2))?,
            c_fc: self.linear(&params::block(i, params::C_FC), 4 * c, c)?,
            mlp_proj: self.linear(&params::block(i, params::MLP_PROJ), c, 4 * c)?,
            skip: match cfg.x0_skip {
                true => {
                    let s = get(w, &params::block(i, params::SKIP), 2)?;
                    Some([s[0], s[1]])
                }
                false => None,
            },
            dwa: match cfg.dwa_inputs(i + 1) {
                Some(inputs) => Some(get(w, &params::block(i, params::DWA), inputs.len())?),
                None => None,
            },
        })
    }

    /// Exit `k`: the last is the final head (`ln_f`, tied to `wte`); the
    /// others read `exits.{block}`, with their own head when the config
    /// says so.
    fn exit(&self, k: usize) -> Result<Exit> {
        let cfg = self.cfg;
        if k == cfg.exits.len() - 1 {
            return Ok(Exit {
                ln: self.norm(params::LN_F)?,
                head: None,
            });
        }
        let (c, v) = (cfg.n_embd, cfg.vocab_size);
        let b = cfg.exits[k].block;
        Ok(Exit {
            ln: self.norm(&params::exit(b, params::EXIT_LN))?,
            head: match cfg.exit_head {
                ExitHead::Tied => None,
                ExitHead::Own => Some(Mat::new(
                    &get(
                        self.w,
                        &params::weight(&params::exit(b, params::EXIT_HEAD)),
                        v * c,
                    )?,
                    v,
                    c,
                    None,
                    self.dt,
                )),
            },
        })
    }
}

impl CpuGpt {
    /// Builds the inference model from checkpoint tensors (GPT-2 names).
    pub fn from_tensors(
        cfg: &Config,
        w: &HashMap<String, Tensor>,
        dt: WeightDtype,
    ) -> Result<Self> {
        cfg.validate()
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let (c, v) = (cfg.n_embd, cfg.vocab_size);
        let load = Loader { cfg, w, dt };
        let wte = get(w, params::WTE, v * c)?;
        let blocks = (0..cfg.n_layer)
            .map(|i| load.block(i))
            .collect::<Result<Vec<_>>>()?;
        let exits = (0..cfg.exits.len())
            .map(|k| load.exit(k))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            cfg: cfg.clone(),
            wte_head: Mat::new(&wte, v, c, None, dt),
            wte,
            wpe: get(w, params::WPE, cfg.block_size * c)?,
            blocks,
            exits,
        })
    }
}
