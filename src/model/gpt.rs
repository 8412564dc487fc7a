//! The multi-exit GPT: GPT-2's layout (nanoGPT names: `wte`, `wpe`,
//! `h.{i}.{ln_1, attn.c_attn, attn.c_proj, ln_2, mlp.c_fc, mlp.c_proj}`,
//! `ln_f`, `lm_head` tied to `wte`) plus the options in [`Config`]:
//! extra exits (own LayerNorm `exits.{b}.ln`, projection tied or own
//! `exits.{b}.lm_head`), DenseFormer DWA weights `h.{i}.dwa` (arXiv
//! 2402.02622) and x0 skips `h.{i}.skip`. The names are spelled in
//! [`crate::model::params`]; the training losses live in
//! [`crate::train::losses`].
//!
//! One definition trains and serves. Training builds the model with
//! `fused = false` (candle's fused LayerNorm and softmax have no backward);
//! inference uses the fused kernels. The forward is split so the speculative
//! verifier can run blocks `a..b` for some rows, read an exit, drop rows, and
//! continue: [`Stream`] carries the rows in flight and their per-position
//! state (x0, DWA's earlier block outputs).

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;

use crate::model::config::{Config, ExitHead};
use crate::model::kv_cache::{KvCache, LayerCache};
use crate::model::params;

struct Norm {
    weight: Tensor,
    bias: Option<Tensor>,
    eps: f32,
}

impl Norm {
    /// The LayerNorm named `name`.
    fn new(cfg: &Config, vb: &VarBuilder, name: &str) -> Result<Self> {
        let c = cfg.n_embd;
        let weight = vb.get(c, &params::weight(name))?;
        let bias = if cfg.bias {
            Some(vb.get(c, &params::bias(name))?)
        } else {
            None
        };
        let eps = cfg.layer_norm_epsilon as f32;
        Ok(Self { weight, bias, eps })
    }

    fn forward(&self, x: &Tensor, fused: bool) -> Result<Tensor> {
        let zeros;
        let bias = match &self.bias {
            Some(b) => b,
            None => {
                zeros = self.weight.zeros_like()?;
                &zeros
            }
        };
        if fused {
            candle_nn::ops::layer_norm(x, &self.weight, bias, self.eps)
        } else {
            crate::model::ops::layer_norm(x, &self.weight, bias, self.eps)
        }
    }
}

/// `y = x W^T + b` with W (out, in), as nn.Linear.
struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    /// x: (B, T, in) -> (B, T, out). The batch is folded into one 2-D
    /// product: candle's batched form broadcasts W per batch row, and its
    /// backward then materialises and sums B weight gradients (measured
    /// ~2x slower per training step on the `small` preset).
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, t, i) = x.dims3()?;
        let y =
            crate::model::ops::linear(&x.reshape((b * t, i))?, &self.weight, self.bias.as_ref())?;
        y.reshape((b, t, ()))
    }
}

/// The Linear layer `name` of block `block_i`, (out, in) from
/// [`params::LINEARS`].
fn linear(cfg: &Config, vb: &VarBuilder, block_i: usize, name: &str) -> Result<Linear> {
    let (_, o, i) = params::LINEARS
        .into_iter()
        .find(|(l, _, _)| *l == name)
        .expect("a block's Linear layer");
    let (o, i, p) = (o * cfg.n_embd, i * cfg.n_embd, params::block(block_i, name));
    let weight = vb.get((o, i), &params::weight(&p))?;
    let bias = if cfg.bias {
        Some(vb.get(o, &params::bias(&p))?)
    } else {
        None
    };
    Ok(Linear { weight, bias })
}

/// (B, T, C) x (V, C)^T -> (B, T, V) as one 2-D matmul.
fn project(h: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (b, t, c) = h.dims3()?;
    crate::model::ops::linear(&h.reshape((b * t, c))?, w, None)?.reshape((b, t, ()))
}

struct Attention {
    c_attn: Linear,
    c_proj: Linear,
    n_head: usize,
}

impl Attention {
    fn new(cfg: &Config, vb: &VarBuilder, i: usize) -> Result<Self> {
        Ok(Self {
            c_attn: linear(cfg, vb, i, params::C_ATTN)?,
            c_proj: linear(cfg, vb, i, params::ATTN_PROJ)?,
            n_head: cfg.n_head,
        })
    }

    /// x: (B, T, C); mask: (T, L) additive, None when every key is visible.
    fn forward(
        &self,
        x: &Tensor,
        mask: Option<&Tensor>,
        cache: Option<&mut LayerCache>,
        fused: bool,
    ) -> Result<Tensor> {
        let (b, t, c) = x.dims3()?;
        let hs = c / self.n_head;
        let qkv = self.c_attn.forward(x)?; // (B, T, 3C)
        let Some(cache) = cache else {
            // Causal among the rows themselves: one op (its backward too).
            return self
                .c_proj
                .forward(&crate::model::ops::causal_attention(&qkv, self.n_head)?);
        };
        let qkv = qkv
            .reshape((b, t, 3, self.n_head, hs))?
            .permute((2, 0, 3, 1, 4))?; // (3, B, nh, T, hs)
        let q = qkv.get(0)?.contiguous()?;
        let (k, v) = cache.append(&qkv.get(1)?, &qkv.get(2)?)?; // (1, nh, L, hs)
        let scale = 1.0 / (hs as f64).sqrt();
        let att = q.matmul(&k.t()?)?; // (B, nh, T, L)
        let att = if fused {
            let att = (att * scale)?;
            let att = match mask {
                Some(m) => att.broadcast_add(m)?,
                None => att,
            };
            candle_nn::ops::softmax_last_dim(&att)?
        } else {
            // The mask is always causal_mask(T, L - T): the fused training op
            // applies it itself.
            crate::model::ops::causal_softmax(&att, scale)?
        };
        let y = att.matmul(&v.contiguous()?)?; // (B, nh, T, hs)
        let y = y.transpose(1, 2)?.reshape((b, t, c))?; // (B, T, C)
        self.c_proj.forward(&y)
    }
}

struct Mlp {
    c_fc: Linear,
    c_proj: Linear,
}

impl Mlp {
    fn new(cfg: &Config, vb: &VarBuilder, i: usize) -> Result<Self> {
        Ok(Self {
            c_fc: linear(cfg, vb, i, params::C_FC)?,
            c_proj: linear(cfg, vb, i, params::MLP_PROJ)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // GELU with the tanh approximation, as GPT-2 ("gelu_new").
        self.c_proj
            .forward(&crate::model::ops::gelu_tanh(&self.c_fc.forward(x)?)?)
    }
}

struct Block {
    ln_1: Norm,
    attn: Attention,
    ln_2: Norm,
    mlp: Mlp,
    /// (2,): [a, b] in `x = a * x + b * x0`, when x0 skips are on.
    skip: Option<Tensor>,
    /// DWA weights over the block outputs listed by `Config::dwa_inputs`.
    dwa: Option<Tensor>,
}

impl Block {
    fn new(cfg: &Config, i: usize, vb: &VarBuilder) -> Result<Self> {
        let skip = if cfg.x0_skip {
            Some(vb.get(2, &params::block(i, params::SKIP))?)
        } else {
            None
        };
        let dwa = match cfg.dwa_inputs(i + 1) {
            Some(inputs) => Some(vb.get(inputs.len(), &params::block(i, params::DWA))?),
            None => None,
        };
        Ok(Self {
            ln_1: Norm::new(cfg, vb, &params::block(i, params::LN_1))?,
            attn: Attention::new(cfg, vb, i)?,
            ln_2: Norm::new(cfg, vb, &params::block(i, params::LN_2))?,
            mlp: Mlp::new(cfg, vb, i)?,
            skip,
            dwa,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        mask: Option<&Tensor>,
        cache: Option<&mut LayerCache>,
        fused: bool,
    ) -> Result<Tensor> {
        let x = (x + self
            .attn
            .forward(&self.ln_1.forward(x, fused)?, mask, cache, fused)?)?;
        &x + self.mlp.forward(&self.ln_2.forward(&x, fused)?)?
    }
}

struct ExitLayer {
    ln: Norm,
    /// None: project with `wte` (tied).
    lm_head: Option<Tensor>,
}

/// Rows in flight through the blocks, and their per-position state.
pub struct Stream {
    /// (B, T, C): the residual stream after `block` blocks (after DWA).
    x: Tensor,
    /// (B, T, C): the embedding, for x0 skips.
    x0: Tensor,
    /// DWA's X_0..X_block (embedding and raw block outputs), when DWA is on.
    xs: Vec<Tensor>,
    /// Absolute position of the first row.
    pub pos: usize,
    /// Blocks already applied.
    pub block: usize,
}

impl Stream {
    /// (B, T, C): the residual stream after `block` blocks.
    pub(crate) fn hidden(&self) -> &Tensor {
        &self.x
    }

    pub fn rows(&self) -> usize {
        self.x.dim(1).unwrap_or(0)
    }

    /// Keeps the first `rows` rows (drops rejected draft positions).
    pub fn truncate(&mut self, rows: usize) -> Result<()> {
        if rows >= self.rows() {
            return Ok(());
        }
        self.x = self.x.narrow(1, 0, rows)?;
        self.x0 = self.x0.narrow(1, 0, rows)?;
        for t in &mut self.xs {
            *t = t.narrow(1, 0, rows)?;
        }
        Ok(())
    }

    /// Appends `next`'s rows (same block, the positions right after ours).
    pub fn append(&mut self, next: Stream) -> Result<()> {
        check_append(self.pos, self.rows(), self.block, next.pos, next.block)?;
        self.x = Tensor::cat(&[&self.x, &next.x], 1)?;
        self.x0 = Tensor::cat(&[&self.x0, &next.x0], 1)?;
        for (t, n) in self.xs.iter_mut().zip(&next.xs) {
            *t = Tensor::cat(&[&*t, n], 1)?;
        }
        Ok(())
    }
}

/// Streams join only at the same block with consecutive positions.
pub fn check_append(
    pos: usize,
    rows: usize,
    block: usize,
    next_pos: usize,
    next_block: usize,
) -> Result<()> {
    if next_block != block || next_pos != pos + rows {
        candle_core::bail!(
            "cannot append rows at position {next_pos}, block {next_block} to {rows} rows at position {pos}, block {block}"
        );
    }
    Ok(())
}

pub struct Gpt {
    pub cfg: Config,
    wte: Tensor, // (V, C)
    wpe: Tensor, // (block_size, C)
    blocks: Vec<Block>,
    /// One per exit; the last is `ln_f` with the tied `lm_head`.
    exits: Vec<ExitLayer>,
    /// Fused inference kernels (no backward) when true.
    pub fused: bool,
}

impl Gpt {
    pub fn new(cfg: &Config, vb: VarBuilder, fused: bool) -> Result<Self> {
        let c = cfg.n_embd;
        let wte = vb.get((cfg.vocab_size, c), params::WTE)?;
        let wpe = vb.get((cfg.block_size, c), params::WPE)?;
        let blocks = (0..cfg.n_layer)
            .map(|i| Block::new(cfg, i, &vb))
            .collect::<Result<Vec<_>>>()?;
        let last = cfg.exits.len() - 1;
        let exits = cfg
            .exits
            .iter()
            .enumerate()
            .map(|(k, e)| {
                if k == last {
                    return Ok(ExitLayer {
                        ln: Norm::new(cfg, &vb, params::LN_F)?,
                        lm_head: None,
                    });
                }
                let head = params::weight(&params::exit(e.block, params::EXIT_HEAD));
                let lm_head = match cfg.exit_head {
                    ExitHead::Tied => None,
                    ExitHead::Own => Some(vb.get((cfg.vocab_size, c), &head)?),
                };
                Ok(ExitLayer {
                    ln: Norm::new(cfg, &vb, &params::exit(e.block, params::EXIT_LN))?,
                    lm_head,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            cfg: cfg.clone(),
            wte,
            wpe,
            blocks,
            exits,
            fused,
        })
    }

    pub fn device(&self) -> &Device {
        self.wte.device()
    }

    pub fn dtype(&self) -> DType {
        self.wte.dtype()
    }

    pub fn new_cache(&self) -> Result<KvCache> {
        KvCache::new(&self.cfg, self.dtype(), self.device())
    }

    /// Embeds `idx` (B, T) at positions `pos..pos + T`.
    pub fn embed(&self, idx: &Tensor, pos: usize) -> Result<Stream> {
        let (b, t) = idx.dims2()?;
        if pos + t > self.cfg.block_size {
            candle_core::bail!(
                "sequence of {} positions exceeds block_size {}",
                pos + t,
                self.cfg.block_size
            );
        }
        let tok = self
            .wte
            .embedding(&idx.flatten_all()?)?
            .reshape((b, t, self.cfg.n_embd))?;
        let x = tok.broadcast_add(&self.wpe.narrow(0, pos, t)?)?; // (B, T, C)
        let xs = if self.cfg.dwa.is_some() {
            vec![x.clone()]
        } else {
            vec![]
        };
        Ok(Stream {
            x: x.clone(),
            x0: x,
            xs,
            pos,
            block: 0,
        })
    }

    /// Runs blocks `s.block..to` on the rows of `s`, appending their keys and
    /// values to `cache` (or attending causally among themselves without one).
    pub fn run_blocks(
        &self,
        s: &mut Stream,
        to: usize,
        mut cache: Option<&mut KvCache>,
    ) -> Result<()> {
        let t = s.rows();
        if t == 0 {
            s.block = to.max(s.block);
            return Ok(());
        }
        let offset = match &cache {
            Some(c) => c.layer_len(s.block.min(self.cfg.n_layer - 1)),
            None => 0,
        };
        let mask = crate::model::ops::causal_mask(t, offset, s.x.device())?;
        for i in s.block..to {
            let block = &self.blocks[i];
            let mut x = s.x.clone();
            if let Some(skip) = &block.skip {
                let a = skip.narrow(0, 0, 1)?;
                let b = skip.narrow(0, 1, 1)?;
                x = (x.broadcast_mul(&a)? + s.x0.broadcast_mul(&b)?)?;
            }
            let layer = cache.as_deref_mut().map(|c| c.layer_mut(i));
            if let Some(l) = &layer {
                if l.len() != offset {
                    candle_core::bail!(
                        "kv cache layer {i} holds {} rows, expected {offset}",
                        l.len()
                    );
                }
            }
            x = block.forward(&x, mask.as_ref(), layer, self.fused)?;
            if self.cfg.dwa.is_some() {
                s.xs.push(x.clone());
            }
            if let (Some(alpha), Some(inputs)) = (&block.dwa, self.cfg.dwa_inputs(i + 1)) {
                let mut y: Option<Tensor> = None;
                for (k, j) in inputs.iter().enumerate() {
                    let term = s.xs[*j].broadcast_mul(&alpha.narrow(0, k, 1)?)?;
                    y = Some(match y {
                        Some(y) => (y + term)?,
                        None => term,
                    });
                }
                x = y.expect("dwa_inputs always contains the block itself");
            }
            s.x = x;
        }
        s.block = to;
        Ok(())
    }

    /// Logits (B, rows.len(), V) of exit `exit` (index into `cfg.exits`) for
    /// the rows `rows` of `s`; `s` must have run exactly to that exit's block.
    pub fn exit_logits(
        &self,
        s: &Stream,
        exit: usize,
        rows: std::ops::Range<usize>,
    ) -> Result<Tensor> {
        let block = self.cfg.exits[exit].block;
        if s.block != block {
            candle_core::bail!(
                "exit {exit} reads block {block}, stream is at block {}",
                s.block
            );
        }
        let x = s.x.narrow(1, rows.start, rows.len())?;
        project(&self.exit_norm(exit, &x)?, self.exit_head(exit))
    }

    /// Exit `exit`'s LayerNorm applied to hidden rows `x` (B, T, C).
    pub(crate) fn exit_norm(&self, exit: usize, x: &Tensor) -> Result<Tensor> {
        self.exits[exit].ln.forward(x, self.fused)
    }

    /// Exit `exit`'s projection (V, C): its own head, or `wte` when tied.
    pub(crate) fn exit_head(&self, exit: usize) -> &Tensor {
        self.exits[exit].lm_head.as_ref().unwrap_or(&self.wte)
    }

    /// Logits of every exit for `idx` (B, T) from position 0, no cache.
    pub fn forward_all_exits(&self, idx: &Tensor) -> Result<Vec<Tensor>> {
        let mut s = self.embed(idx, 0)?;
        let t = s.rows();
        let mut out = Vec::with_capacity(self.cfg.exits.len());
        for (k, e) in self.cfg.exits.iter().enumerate() {
            self.run_blocks(&mut s, e.block, None)?;
            out.push(self.exit_logits(&s, k, 0..t)?);
        }
        Ok(out)
    }
}

/// nanoGPT's initialisation, seeded: N(0, 0.02) for matrices and
/// embeddings, N(0, 0.02 / sqrt(2 * n_layer)) for residual projections,
/// zero biases, unit LayerNorm gains, identity DWA and skips (so step 0 is
/// exactly the baseline).
pub fn init_weights(cfg: &Config, seed: u64, device: &Device) -> Result<Vec<(String, Tensor)>> {
    use rand::SeedableRng;
    use rand_distr::{Distribution, Normal};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    params::param_shapes(cfg)
        .into_iter()
        .map(|(name, shape)| {
            let n: usize = shape.iter().product();
            let data: Vec<f32> = if params::is_bias(&name) {
                vec![0.0; n]
            } else if params::is_skip(&name) {
                vec![1.0, 0.0]
            } else if params::is_dwa(&name) {
                (0..n).map(|k| if k + 1 == n { 1.0 } else { 0.0 }).collect()
            } else if shape.len() == 1 {
                vec![1.0; n]
            } else {
                let std = if params::is_residual_projection(&name) {
                    0.02 / (2.0 * cfg.n_layer as f32).sqrt()
                } else {
                    0.02
                };
                let normal = Normal::new(0.0, std).expect("std is positive");
                (0..n).map(|_| normal.sample(&mut rng)).collect()
            };
            Ok((name, Tensor::from_vec(data, shape, device)?))
        })
        .collect()
}
