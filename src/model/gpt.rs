//! The multi-exit GPT: GPT-2's layout (nanoGPT names: `wte`, `wpe`,
//! `h.{i}.{ln_1, attn.c_attn, attn.c_proj, ln_2, mlp.c_fc, mlp.c_proj}`,
//! `ln_f`, `lm_head` tied to `wte`) plus the options in [`Config`]:
//! extra exits (own LayerNorm `exits.{b}.ln`, projection tied or own
//! `exits.{b}.lm_head`), DenseFormer DWA weights `h.{i}.dwa` (arXiv
//! 2402.02622) and x0 skips `h.{i}.skip`.
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

struct Norm {
    weight: Tensor,
    bias: Option<Tensor>,
    eps: f32,
}

impl Norm {
    fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let c = cfg.n_embd;
        let weight = vb.get(c, "weight")?;
        let bias = if cfg.bias {
            Some(vb.get(c, "bias")?)
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

fn linear(i: usize, o: usize, bias: bool, vb: VarBuilder) -> Result<Linear> {
    let weight = vb.get((o, i), "weight")?;
    let bias = if bias { Some(vb.get(o, "bias")?) } else { None };
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
    fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let c = cfg.n_embd;
        Ok(Self {
            c_attn: linear(c, 3 * c, cfg.bias, vb.pp("c_attn"))?,
            c_proj: linear(c, c, cfg.bias, vb.pp("c_proj"))?,
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
    fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let c = cfg.n_embd;
        Ok(Self {
            c_fc: linear(c, 4 * c, cfg.bias, vb.pp("c_fc"))?,
            c_proj: linear(4 * c, c, cfg.bias, vb.pp("c_proj"))?,
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
    fn new(cfg: &Config, i: usize, vb: VarBuilder) -> Result<Self> {
        let skip = if cfg.x0_skip {
            Some(vb.get(2, "skip")?)
        } else {
            None
        };
        let dwa = match cfg.dwa_inputs(i + 1) {
            Some(inputs) => Some(vb.get(inputs.len(), "dwa")?),
            None => None,
        };
        Ok(Self {
            ln_1: Norm::new(cfg, vb.pp("ln_1"))?,
            attn: Attention::new(cfg, vb.pp("attn"))?,
            ln_2: Norm::new(cfg, vb.pp("ln_2"))?,
            mlp: Mlp::new(cfg, vb.pp("mlp"))?,
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

/// The weighted training loss and each computed exit's cross-entropy.
pub struct Losses {
    pub total: Tensor,
    /// Cross-entropy of each computed exit, in `cfg.exits` order (only the
    /// final one when the step skips exits).
    pub per_exit: Vec<Tensor>,
}

impl Gpt {
    pub fn new(cfg: &Config, vb: VarBuilder, fused: bool) -> Result<Self> {
        let c = cfg.n_embd;
        let wte = vb.get((cfg.vocab_size, c), "wte.weight")?;
        let wpe = vb.get((cfg.block_size, c), "wpe.weight")?;
        let blocks = (0..cfg.n_layer)
            .map(|i| Block::new(cfg, i, vb.pp(format!("h.{i}"))))
            .collect::<Result<Vec<_>>>()?;
        let last = cfg.exits.len() - 1;
        let exits = cfg
            .exits
            .iter()
            .enumerate()
            .map(|(k, e)| {
                if k == last {
                    return Ok(ExitLayer {
                        ln: Norm::new(cfg, vb.pp("ln_f"))?,
                        lm_head: None,
                    });
                }
                let vb = vb.pp(format!("exits.{}", e.block));
                let lm_head = match cfg.exit_head {
                    ExitHead::Tied => None,
                    ExitHead::Own => Some(vb.get((cfg.vocab_size, c), "lm_head.weight")?),
                };
                Ok(ExitLayer {
                    ln: Norm::new(cfg, vb.pp("ln"))?,
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
        let mask = causal_mask(t, offset, s.x.device())?;
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
        let e = &self.exits[exit];
        let h = e.ln.forward(&x, self.fused)?;
        project(&h, e.lm_head.as_ref().unwrap_or(&self.wte))
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

    /// Weighted multi-exit cross-entropy for inputs `idx` and `targets` (B, T).
    pub fn loss(&self, idx: &Tensor, targets: &Tensor) -> Result<Losses> {
        self.loss_with(idx, targets, &LossOptions::default())
    }

    /// As [`Gpt::loss`], with the non-final exits skipped, computed on a
    /// subset of positions and rescaled (unbiased, cheaper), or scored on
    /// the final head's top candidates only.
    pub fn loss_with(&self, idx: &Tensor, targets: &Tensor, opt: &LossOptions) -> Result<Losses> {
        if opt.exit_candidates > 0 && opt.exit_rows.is_none() {
            candle_core::bail!(
                "exit candidates score the positions outside exit_rows: give exit_rows \
                 (the positions scored on the whole vocabulary)"
            );
        }
        let mut s = self.embed(idx, 0)?;
        let last = self.cfg.exits.len() - 1;
        // The hidden rows at each computed exit.
        let mut at_exits = Vec::with_capacity(self.cfg.exits.len());
        for (k, e) in self.cfg.exits.iter().enumerate() {
            if k < last && !opt.exits {
                continue;
            }
            self.run_blocks(&mut s, e.block, None)?;
            at_exits.push((k, s.x.clone()));
        }
        // The final exit first: its best tokens are the other exits'
        // candidates.
        let (_, x) = at_exits.pop().expect("the final exit always runs");
        let top = if opt.exit_candidates > 0 && !at_exits.is_empty() {
            candidate_set_size(opt.exit_candidates, self.cfg.vocab_size)
        } else {
            0
        };
        let (final_ce, best) = self.exit_loss(last, &x, targets, top, opt.grads)?;
        // The positions scored on candidates, the same for every exit.
        let rest = match (&opt.exit_rows, top) {
            (Some(rows), 1..) => Some(RestRows::new(rows, targets)?),
            _ => None,
        };
        let mut per_exit = Vec::with_capacity(at_exits.len() + 1);
        let mut total: Option<Tensor> = None;
        for (k, x) in at_exits {
            let ce = self.early_exit_loss(k, &x, targets, opt, &best, rest.as_ref())?;
            let wl = (&ce * (self.cfg.exits[k].weight as f64 * opt.exit_scale))?;
            total = Some(match total {
                Some(t) => (t + wl)?,
                None => wl,
            });
            per_exit.push(ce);
        }
        let wl = (&final_ce * self.cfg.exits[last].weight as f64)?;
        per_exit.push(final_ce);
        Ok(Losses {
            total: match total {
                Some(t) => (t + wl)?,
                None => wl,
            },
            per_exit,
        })
    }

    /// The loss of a non-final exit `k` on its hidden rows `x` (B, T, C):
    /// the whole vocabulary on every position, or on `opt.exit_rows` only;
    /// with candidates, those positions on the whole vocabulary and the
    /// others on their candidates (`best`: the final head's best tokens),
    /// averaged over all positions.
    fn early_exit_loss(
        &self,
        k: usize,
        x: &Tensor,
        targets: &Tensor,
        opt: &LossOptions,
        best: &[u32],
        rest: Option<&RestRows>,
    ) -> Result<Tensor> {
        let Some(rows) = &opt.exit_rows else {
            return Ok(self.exit_loss(k, x, targets, 0, opt.grads)?.0);
        };
        let (xr, yr) = (x.index_select(rows, 1)?, targets.index_select(rows, 1)?);
        let exit_top = if rest.is_some() { EXIT_TOP } else { 0 };
        let (full, exit_best) = self.exit_loss(k, &xr, &yr, exit_top, opt.grads)?;
        let Some(rest) = rest.filter(|r| !r.rows.is_empty()) else {
            return Ok(full);
        };
        // The exit's own best tokens where it saw the whole vocabulary: the
        // tokens it ranks high that candidates from the final head would
        // never push down.
        let mut hard: Vec<u32> = Vec::with_capacity(HARD_NEGATIVES);
        for &c in &exit_best {
            if hard.len() == HARD_NEGATIVES {
                break;
            }
            if !hard.contains(&c) {
                hard.push(c);
            }
        }
        let size = candidate_set_size(opt.exit_candidates, self.cfg.vocab_size);
        let sets = CandidateSets {
            best,
            top: size,
            shared: &hard,
            targets: &rest.targets,
            t: rest.t,
        };
        let cand = sets.build(Some(&rest.rows));
        let xc = x.index_select(&rest.index, 1)?;
        let h = self.exits[k].ln.forward(&xc, self.fused)?.flatten_to(1)?;
        let head = self.exits[k].lm_head.as_ref().unwrap_or(&self.wte);
        let cand_ce = crate::model::ops::candidate_cross_entropy(&h, head, cand, size)?;
        let (t, n) = (rest.t as f64, (rest.t - rest.rows.len()) as f64);
        (full * (n / t))? + (cand_ce * ((t - n) / t))?
    }

    /// Mean cross-entropy of exit `k` on hidden rows `x` (B, n, C) against
    /// `y` (B, n), and each row's `top` best tokens.
    fn exit_loss(
        &self,
        k: usize,
        x: &Tensor,
        y: &Tensor,
        top: usize,
        grads: bool,
    ) -> Result<(Tensor, Vec<u32>)> {
        let ex = &self.exits[k];
        let h = ex.ln.forward(x, self.fused)?.flatten_to(1)?; // (B n, C)
        let head = ex.lm_head.as_ref().unwrap_or(&self.wte);
        crate::model::ops::projected_cross_entropy_top(&h, head, &y.flatten_all()?, top, grads)
    }
}

/// Tokens the exit scores itself on where it sees the whole vocabulary, as
/// shared hard negatives for the candidate positions.
const EXIT_TOP: usize = 2;
/// At most this many of them per step.
const HARD_NEGATIVES: usize = 32;

/// Candidates per row: the target, the hard negatives, the final head's
/// best `k` (capped at the vocabulary).
fn candidate_set_size(k: usize, vocab: usize) -> usize {
    (k + 1 + HARD_NEGATIVES).min(vocab)
}

/// The positions the whole-vocabulary exit loss skips, scored on
/// candidates instead; computed once per step for every exit.
struct RestRows {
    /// Positions (in each sequence) outside `exit_rows`, and as a tensor.
    rows: Vec<u32>,
    index: Tensor,
    /// (B T) targets on the host, and T.
    targets: Vec<u32>,
    t: usize,
}

impl RestRows {
    fn new(scored: &Tensor, targets: &Tensor) -> Result<Self> {
        let t = targets.dim(1)?;
        let mut seen = vec![false; t];
        for r in scored.to_vec1::<u32>()? {
            match seen.get_mut(r as usize) {
                Some(s) => *s = true,
                None => candle_core::bail!("exit row {r} outside the {t} positions"),
            }
        }
        let rows: Vec<u32> = (0..t as u32).filter(|&r| !seen[r as usize]).collect();
        Ok(Self {
            index: Tensor::new(rows.as_slice(), targets.device())?,
            rows,
            targets: targets.flatten_all()?.to_vec1::<u32>()?,
            t,
        })
    }
}

/// Candidate tokens of the cheap exit loss, from the final head's best.
struct CandidateSets<'a> {
    /// (B T, top) best tokens of the final head per position.
    best: &'a [u32],
    /// Tokens per row in `best`, and the size of each candidate set.
    top: usize,
    /// Tokens in every row's set (after the target).
    shared: &'a [u32],
    /// (B T) targets.
    targets: &'a [u32],
    t: usize,
}

impl CandidateSets<'_> {
    /// Per scored row: its target, the shared tokens, then the final
    /// head's best tokens, each once, `top` in all. `rows`: the positions
    /// scored in each sequence (all when None).
    fn build(&self, rows: Option<&[u32]>) -> Vec<u32> {
        let all: Vec<u32>;
        let rows = match rows {
            Some(r) => r,
            None => {
                all = (0..self.t as u32).collect();
                &all
            }
        };
        let b = self.targets.len() / self.t.max(1);
        let mut out = Vec::with_capacity(b * rows.len() * self.top);
        for seq in 0..b {
            for &r in rows {
                let i = seq * self.t + r as usize;
                let start = out.len();
                out.push(self.targets[i]);
                let best = &self.best[i * self.top..(i + 1) * self.top];
                for &c in self.shared.iter().chain(best) {
                    if out.len() - start == self.top {
                        break;
                    }
                    if !out[start..].contains(&c) {
                        out.push(c);
                    }
                }
            }
        }
        out
    }
}

/// Which exit losses a training step computes.
pub struct LossOptions {
    /// Compute the non-final exits at all.
    pub exits: bool,
    /// Positions (n,) u32 at which the non-final exits are scored.
    pub exit_rows: Option<Tensor>,
    /// Multiplies the non-final exits' weights (1 / sampling rate keeps the
    /// expected gradient equal to scoring every position on every step).
    pub exit_scale: f64,
    /// Score the non-final exits, at the positions outside `exit_rows`, on
    /// the target and the final head's best `exit_candidates` other tokens
    /// (0: those positions are not scored).
    pub exit_candidates: usize,
    /// Form gradients (false: evaluation, which never runs a backward).
    pub grads: bool,
}

impl Default for LossOptions {
    fn default() -> Self {
        Self {
            exits: true,
            exit_rows: None,
            exit_scale: 1.0,
            exit_candidates: 0,
            grads: true,
        }
    }
}

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

/// Names and shapes of every parameter, in a stable order.
pub fn param_shapes(cfg: &Config) -> Vec<(String, Vec<usize>)> {
    let c = cfg.n_embd;
    let mut out = vec![
        ("wte.weight".to_string(), vec![cfg.vocab_size, c]),
        ("wpe.weight".to_string(), vec![cfg.block_size, c]),
    ];
    let norm = |out: &mut Vec<(String, Vec<usize>)>, p: &str| {
        out.push((format!("{p}.weight"), vec![c]));
        if cfg.bias {
            out.push((format!("{p}.bias"), vec![c]));
        }
    };
    for i in 0..cfg.n_layer {
        let p = format!("h.{i}");
        norm(&mut out, &format!("{p}.ln_1"));
        norm(&mut out, &format!("{p}.ln_2"));
        for (name, o, inp) in [
            ("attn.c_attn", 3 * c, c),
            ("attn.c_proj", c, c),
            ("mlp.c_fc", 4 * c, c),
            ("mlp.c_proj", c, 4 * c),
        ] {
            out.push((format!("{p}.{name}.weight"), vec![o, inp]));
            if cfg.bias {
                out.push((format!("{p}.{name}.bias"), vec![o]));
            }
        }
        if cfg.x0_skip {
            out.push((format!("{p}.skip"), vec![2]));
        }
        if let Some(inputs) = cfg.dwa_inputs(i + 1) {
            out.push((format!("{p}.dwa"), vec![inputs.len()]));
        }
    }
    for e in &cfg.exits[..cfg.exits.len() - 1] {
        let p = format!("exits.{}", e.block);
        norm(&mut out, &format!("{p}.ln"));
        if cfg.exit_head == ExitHead::Own {
            out.push((format!("{p}.lm_head.weight"), vec![cfg.vocab_size, c]));
        }
    }
    norm(&mut out, "ln_f");
    out
}

/// nanoGPT's initialisation, seeded: N(0, 0.02) for matrices and
/// embeddings, N(0, 0.02 / sqrt(2 * n_layer)) for residual projections,
/// zero biases, unit LayerNorm gains, identity DWA and skips (so step 0 is
/// exactly the baseline).
pub fn init_weights(cfg: &Config, seed: u64, device: &Device) -> Result<Vec<(String, Tensor)>> {
    use rand::SeedableRng;
    use rand_distr::{Distribution, Normal};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    param_shapes(cfg)
        .into_iter()
        .map(|(name, shape)| {
            let n: usize = shape.iter().product();
            let data: Vec<f32> = if name.ends_with(".bias") {
                vec![0.0; n]
            } else if name.ends_with(".skip") {
                vec![1.0, 0.0]
            } else if name.ends_with(".dwa") {
                (0..n).map(|k| if k + 1 == n { 1.0 } else { 0.0 }).collect()
            } else if shape.len() == 1 {
                vec![1.0; n]
            } else {
                let std = if name.ends_with("c_proj.weight") {
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
