//! The CPU model's weights: the checkpoint's tensors (GPT-2 names, as
//! [`crate::model::gpt::Gpt`] reads them) converted once at load into the
//! kernels' layouts, linear layers packed as [`Matrix`] in f32 or f16, or
//! quantized to GGUF's Q8_0/Q4_0 as a [`QMatrix`]. Loading runs in phases:
//! the embeddings, each block, each exit.

use std::collections::HashMap;

use candle_core::Tensor;
use half::f16;

use super::CpuGpt;
use crate::model::config::{Config, ExitHead};
use crate::model::kernels::{self, Matrix};
use crate::model::params;
use crate::model::quant::{QMatrix, QuantError, QuantKind};

/// Why the CPU model cannot be built from a checkpoint's tensors: the
/// weights cannot be stored in the asked dtype (a width GGUF's blocks do not
/// divide: the checkpoint is fine, another `--weights` serves it), or a
/// tensor is missing or malformed (the checkpoint is at fault).
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(
        "cannot store the weights as {dtype}: {source}; serve this model with --weights f16 or f32"
    )]
    Quantize {
        dtype: &'static str,
        source: QuantError,
    },
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
}

type Result<T> = std::result::Result<T, LoadError>;

fn bad(msg: String) -> LoadError {
    LoadError::Tensor(candle_core::Error::Msg(msg))
}

/// Storage of the linear layers' matrices (every block's `c_attn`,
/// `attn.c_proj`, `c_fc` and `mlp.c_proj`, own exit heads and the tied
/// output projection): f32, f16 (half the memory traffic; decode of models
/// that do not fit in cache is memory-bound), or GGUF's Q8_0 / Q4_0
/// (34 / 18 bytes per 32 weights). Embedding lookups, LayerNorms, biases
/// and attention stay f32 whatever the choice.
///
/// Quantized storage is made at load, from the checkpoint's f32/f16
/// tensors: the checkpoint stays one format, quantizing a 12M-parameter
/// model takes milliseconds, and the GGUF export quantizes with the same
/// code, so llama.cpp gets the very numbers served here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightDtype {
    F32,
    F16,
    Q8_0,
    Q4_0,
}

impl WeightDtype {
    /// Every spelling `--weights` / `--dtype` accepts besides `auto`.
    pub const NAMES: [&'static str; 4] = ["f32", "f16", "q8_0", "q4_0"];

    /// The `--weights` spelling.
    pub fn name(self) -> &'static str {
        match self {
            WeightDtype::F32 => "f32",
            WeightDtype::F16 => "f16",
            WeightDtype::Q8_0 => QuantKind::Q8_0.name(),
            WeightDtype::Q4_0 => QuantKind::Q4_0.name(),
        }
    }

    /// Whether the linear layers are GGUF blocks (their few-row matmuls
    /// run on the thread team, `model::team`).
    pub fn is_quantized(self) -> bool {
        self.quant().is_some()
    }

    fn quant(self) -> Option<QuantKind> {
        match self {
            WeightDtype::F32 | WeightDtype::F16 => None,
            WeightDtype::Q8_0 => Some(QuantKind::Q8_0),
            WeightDtype::Q4_0 => Some(QuantKind::Q4_0),
        }
    }
}

impl std::str::FromStr for WeightDtype {
    type Err = String;

    /// One of [`WeightDtype::NAMES`]; anything else is an error listing them.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        [
            WeightDtype::F32,
            WeightDtype::F16,
            WeightDtype::Q8_0,
            WeightDtype::Q4_0,
        ]
        .into_iter()
        .find(|d| d.name() == s)
        .ok_or_else(|| {
            format!(
                "unknown weight dtype `{s}` (expected one of: {})",
                WeightDtype::NAMES.join(", ")
            )
        })
    }
}

pub(super) enum Mat {
    F32(Matrix<f32>),
    F16(Matrix<f16>),
    Q(QMatrix),
}

impl Mat {
    /// Tensor `name`'s weights (out = n, in = k) stored as `dt`; a tensor
    /// that cannot be quantized (a row length not a multiple of 32, a
    /// non-finite value) is an error naming it.
    fn new(
        name: &str,
        w: &[f32],
        (n, k): (usize, usize),
        bias: Option<Vec<f32>>,
        dt: WeightDtype,
    ) -> Result<Self> {
        Ok(match (dt, dt.quant()) {
            (_, Some(kind)) => Mat::Q(QMatrix::from_out_in(name, kind, w, (n, k), bias).map_err(
                |source| LoadError::Quantize {
                    dtype: dt.name(),
                    source,
                },
            )?),
            (WeightDtype::F16, None) => Mat::F16(Matrix::from_out_in(w, n, k, bias)),
            (_, None) => Mat::F32(Matrix::from_out_in(w, n, k, bias)),
        })
    }

    /// Output `o`'s weights (dequantized for `Q`) and bias.
    pub(super) fn output(&self, o: usize) -> (Vec<f32>, f32) {
        match self {
            Mat::F32(a) => a.output(o),
            Mat::F16(a) => a.output(o),
            Mat::Q(a) => a.output(o),
        }
    }

    /// y (m, n) = x (m, k) W^T + b.
    pub(super) fn forward(&self, x: &[f32], m: usize) -> Vec<f32> {
        let n = match self {
            Mat::F32(a) => a.n,
            Mat::F16(a) => a.n,
            Mat::Q(a) => a.n,
        };
        let mut y = vec![0f32; m * n];
        match self {
            Mat::F32(a) => a.forward(x, m, &mut y),
            Mat::F16(a) => a.forward(x, m, &mut y),
            Mat::Q(a) => a.forward(x, m, &mut y),
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
        .ok_or_else(|| bad(format!("weights lack `{name}`")))?;
    let v = t
        .to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    if v.len() != len {
        return Err(bad(format!(
            "`{name}` has {} elements, expected {len}",
            v.len()
        )));
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
        let name = params::weight(p);
        let w = get(self.w, &name, n * k)?;
        Mat::new(&name, &w, (n, k), self.bias(p, n)?, self.dt)
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
                ExitHead::Own => {
                    let name = params::weight(&params::exit(b, params::EXIT_HEAD));
                    let w = get(self.w, &name, v * c)?;
                    Some(Mat::new(&name, &w, (v, c), None, self.dt)?)
                }
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
    ) -> candle_core::Result<Self> {
        Self::load(cfg, w, dt).map_err(|e| match e {
            LoadError::Tensor(e) => e,
            e => candle_core::Error::Msg(e.to_string()),
        })
    }

    /// [`CpuGpt::from_tensors`] with the error typed, so a caller can tell
    /// weights that cannot be quantized from a malformed checkpoint.
    pub fn load(cfg: &Config, w: &HashMap<String, Tensor>, dt: WeightDtype) -> Result<Self> {
        cfg.validate().map_err(|e| bad(e.to_string()))?;
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
            wte_head: Mat::new(params::WTE, &wte, (v, c), None, dt)?,
            wte,
            wpe: get(w, params::WPE, cfg.block_size * c)?,
            blocks,
            exits,
            kv: super::KvDtype::F32,
        })
    }
}
