//! The CPU inference path: the same model as [`crate::model::gpt::Gpt`] (built
//! from the same checkpoint tensors, same names, same split forward), run
//! on plain buffers with the kernels in [`kernels`] instead of candle ops.
//!
//! Why a second forward: decoding is 1..16 rows per step, where candle's
//! per-op allocation and per-call weight packing dominate (see
//! `kernels`). Training keeps candle (it needs autograd); this path is
//! checked against it by `tests/cpu.rs` for every option (DWA, x0 skips,
//! own exit heads) and for split forwards with truncation.
//!
//! The KV cache here is a preallocated buffer per layer, laid out
//! `[head][position][head_size]`, written in place; rolling back is
//! setting a length (the invariant is the one in `kv_cache.rs`).

use std::borrow::Cow;
use std::collections::HashMap;
use std::ops::Range;

use candle_core::{bail, Result, Tensor};
use half::f16;

use crate::model::config::{Config, ExitHead};
use crate::model::forward::{Segment, Tree};
use crate::model::kernels::{self, KeyRows, Matrix};

/// Runs `f` on a worker of the inference thread pool (one thread per
/// core). Fork/join from inside a pool is work stealing; from an outside
/// thread every parallel matmul is a cross-thread wake-up, which made a
/// decode step 1.5x slower on this 2-core machine (measured with
/// `examples/verify_profile.rs`, removed after `cc6f1c3`; see git history).
pub fn in_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    use std::sync::OnceLock;
    static POOL: OnceLock<Option<rayon::ThreadPool>> = OnceLock::new();
    let pool = POOL.get_or_init(|| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(rayon::current_num_threads())
            .thread_name(|i| format!("gpt-serve-infer-{i}"))
            .stack_size(16 << 20)
            .build()
            .ok()
    });
    match pool {
        Some(p) => p.install(f),
        None => f(),
    }
}

/// Storage of the matrices: f32, or f16 (half the memory traffic; decode
/// of models that do not fit in cache is memory-bound).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightDtype {
    F32,
    F16,
}

enum Mat {
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
    fn output(&self, o: usize) -> (Vec<f32>, f32) {
        match self {
            Mat::F32(a) => a.output(o),
            Mat::F16(a) => a.output(o),
        }
    }

    /// y (m, n) = x (m, k) W^T + b.
    fn forward(&self, x: &[f32], m: usize) -> Vec<f32> {
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

struct Norm {
    w: Vec<f32>,
    b: Option<Vec<f32>>,
    eps: f32,
}

impl Norm {
    fn forward(&self, x: &[f32]) -> Vec<f32> {
        let mut y = vec![0f32; x.len()];
        kernels::layer_norm(x, &self.w, self.b.as_deref(), self.eps, &mut y);
        y
    }
}

struct Block {
    ln_1: Norm,
    c_attn: Mat,
    attn_proj: Mat,
    ln_2: Norm,
    c_fc: Mat,
    mlp_proj: Mat,
    skip: Option<[f32; 2]>,
    dwa: Option<Vec<f32>>,
}

struct Exit {
    ln: Norm,
    /// None: tied to `wte`.
    head: Option<Mat>,
}

pub struct CpuGpt {
    pub cfg: Config,
    wte: Vec<f32>, // (V, C)
    wpe: Vec<f32>, // (block_size, C)
    /// wte as a (C -> V) projection, for the tied heads.
    wte_head: Mat,
    blocks: Vec<Block>,
    exits: Vec<Exit>,
}

/// Per-sequence KV cache: `k[layer]`, `v[layer]` of (nh, block_size, hs).
pub struct CpuCache {
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    len: Vec<usize>,
    cap: usize,
    head_size: usize,
}

impl CpuCache {
    /// Rows held by every layer (the minimum over layers).
    pub fn len(&self) -> usize {
        self.len.iter().copied().min().unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn layer_len(&self, i: usize) -> usize {
        self.len[i]
    }

    /// Rolls every layer back to at most `len` rows.
    pub fn truncate(&mut self, len: usize) {
        for l in &mut self.len {
            *l = (*l).min(len);
        }
    }

    /// Moves slots `from + keep[i]` (ascending) to `from + i` in every
    /// layer and head, and drops every slot after them.
    pub fn compact(&mut self, from: usize, keep: &[usize]) -> Result<()> {
        if keep.windows(2).any(|w| w[0] >= w[1]) {
            bail!("cache slots to keep must ascend: {keep:?}");
        }
        if let Some(&last) = keep.last() {
            if let Some(l) = self.len.iter().position(|&l| l <= from + last) {
                bail!("cache layer {l} has no slot {} to keep", from + last);
            }
        }
        if keep.iter().enumerate().all(|(i, &slot)| slot == i) {
            // A chain's accepted prefix (every verify step's case unless
            // the drafts branch): nothing moves.
            self.truncate(from + keep.len());
            return Ok(());
        }
        let (cap, hs) = (self.cap, self.head_size);
        for layer in 0..self.len.len() {
            for buf in [&mut self.k[layer], &mut self.v[layer]] {
                for head in buf.chunks_exact_mut(cap * hs) {
                    for (i, &slot) in keep.iter().enumerate() {
                        let src = (from + slot) * hs;
                        head.copy_within(src..src + hs, (from + i) * hs);
                    }
                }
            }
            self.len[layer] = from + keep.len();
        }
        Ok(())
    }
}

/// Rows in flight through the blocks (as [`crate::model::gpt::Stream`]).
pub struct CpuStream {
    /// (T, C) residual stream after `block` blocks.
    x: Vec<f32>,
    /// (T, C) embedding, for x0 skips.
    x0: Vec<f32>,
    /// DWA's X_0..X_block.
    xs: Vec<Vec<f32>>,
    rows: usize,
    pub pos: usize,
    pub block: usize,
}

impl CpuStream {
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Keeps the first `rows` rows.
    pub fn truncate(&mut self, rows: usize, c: usize) {
        if rows >= self.rows {
            return;
        }
        self.rows = rows;
        self.x.truncate(rows * c);
        self.x0.truncate(rows * c);
        for t in &mut self.xs {
            t.truncate(rows * c);
        }
    }

    /// Appends `next`'s rows (same block, the positions right after ours).
    pub fn append(&mut self, next: CpuStream) -> Result<()> {
        crate::model::gpt::check_append(self.pos, self.rows, self.block, next.pos, next.block)?;
        self.x.extend(next.x);
        self.x0.extend(next.x0);
        for (t, n) in self.xs.iter_mut().zip(next.xs) {
            t.extend(n);
        }
        self.rows += next.rows;
        Ok(())
    }
}

/// A segment's layer as attention reads it: keys, values, position of
/// its first row, its first row among the rows in flight, and its rows'
/// ancestors when they are a draft tree.
type SegView<'a> = (&'a [f32], &'a [f32], usize, usize, Option<&'a [Vec<usize>]>);

/// One sequence's rows inside a forward over several sequences.
struct SegRows<'c> {
    /// Its rows among the rows in flight.
    rows: Range<usize>,
    /// Absolute position of its first row (= rows every layer has cached).
    pos: usize,
    cache: &'c mut CpuCache,
    /// For a draft tree: each row's ancestors' cache slots, itself last.
    ancestors: Option<Vec<Vec<usize>>>,
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
        let bias = |p: &str, n: usize| -> Result<Option<Vec<f32>>> {
            if cfg.bias {
                Ok(Some(get(w, &format!("{p}.bias"), n)?))
            } else {
                Ok(None)
            }
        };
        let norm = |p: &str| -> Result<Norm> {
            Ok(Norm {
                w: get(w, &format!("{p}.weight"), c)?,
                b: bias(p, c)?,
                eps: cfg.layer_norm_epsilon as f32,
            })
        };
        let linear = |p: &str, n: usize, k: usize| -> Result<Mat> {
            Ok(Mat::new(
                &get(w, &format!("{p}.weight"), n * k)?,
                n,
                k,
                bias(p, n)?,
                dt,
            ))
        };
        let wte = get(w, "wte.weight", v * c)?;
        let blocks = (0..cfg.n_layer)
            .map(|i| {
                let p = format!("h.{i}");
                Ok(Block {
                    ln_1: norm(&format!("{p}.ln_1"))?,
                    c_attn: linear(&format!("{p}.attn.c_attn"), 3 * c, c)?,
                    attn_proj: linear(&format!("{p}.attn.c_proj"), c, c)?,
                    ln_2: norm(&format!("{p}.ln_2"))?,
                    c_fc: linear(&format!("{p}.mlp.c_fc"), 4 * c, c)?,
                    mlp_proj: linear(&format!("{p}.mlp.c_proj"), c, 4 * c)?,
                    skip: match cfg.x0_skip {
                        true => {
                            let s = get(w, &format!("{p}.skip"), 2)?;
                            Some([s[0], s[1]])
                        }
                        false => None,
                    },
                    dwa: match cfg.dwa_inputs(i + 1) {
                        Some(inputs) => Some(get(w, &format!("{p}.dwa"), inputs.len())?),
                        None => None,
                    },
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let last = cfg.exits.len() - 1;
        let exits = cfg
            .exits
            .iter()
            .enumerate()
            .map(|(k, e)| {
                if k == last {
                    return Ok(Exit {
                        ln: norm("ln_f")?,
                        head: None,
                    });
                }
                let p = format!("exits.{}", e.block);
                Ok(Exit {
                    ln: norm(&format!("{p}.ln"))?,
                    head: match cfg.exit_head {
                        ExitHead::Tied => None,
                        ExitHead::Own => Some(Mat::new(
                            &get(w, &format!("{p}.lm_head.weight"), v * c)?,
                            v,
                            c,
                            None,
                            dt,
                        )),
                    },
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            cfg: cfg.clone(),
            wte_head: Mat::new(&wte, v, c, None, dt),
            wte,
            wpe: get(w, "wpe.weight", cfg.block_size * c)?,
            blocks,
            exits,
        })
    }

    pub fn new_cache(&self) -> CpuCache {
        let (c, cap) = (self.cfg.n_embd, self.cfg.block_size);
        let n = self.cfg.n_layer;
        CpuCache {
            k: vec![vec![0f32; cap * c]; n],
            v: vec![vec![0f32; cap * c]; n],
            len: vec![0; n],
            cap,
            head_size: c / self.cfg.n_head,
        }
    }

    /// Embeds `tokens` at positions `pos..pos + T`.
    pub fn embed(&self, tokens: &[u32], pos: usize) -> Result<CpuStream> {
        let mut x = Vec::new();
        self.embed_into(tokens, pos, None, &mut x)?;
        Ok(self.stream(x, pos))
    }

    /// Appends the embeddings of `tokens` at positions `pos..` to `x`.
    /// Embeds `tokens` at positions `pos..`, or at `pos + depth` for the
    /// rows of a draft tree.
    fn embed_into(
        &self,
        tokens: &[u32],
        pos: usize,
        tree: Option<&Tree>,
        x: &mut Vec<f32>,
    ) -> Result<()> {
        let (c, t) = (self.cfg.n_embd, tokens.len());
        if pos + t > self.cfg.block_size {
            bail!(
                "sequence of {} positions exceeds block_size {}",
                pos + t,
                self.cfg.block_size
            );
        }
        x.reserve(t * c);
        for (r, &tok) in tokens.iter().enumerate() {
            let tok = tok as usize;
            if tok >= self.cfg.vocab_size {
                bail!(
                    "token id {tok} is outside the vocabulary (size {})",
                    self.cfg.vocab_size
                );
            }
            let at = pos + tree.map_or(r, |t| t.depth(r));
            let (e, p) = (&self.wte[tok * c..][..c], &self.wpe[at * c..][..c]);
            x.extend(e.iter().zip(p).map(|(a, b)| a + b));
        }
        Ok(())
    }

    /// Rows `x` (embeddings) in flight at block 0, the first at `pos`.
    fn stream(&self, x: Vec<f32>, pos: usize) -> CpuStream {
        CpuStream {
            xs: if self.cfg.dwa.is_some() {
                vec![x.clone()]
            } else {
                vec![]
            },
            x0: x.clone(),
            rows: x.len() / self.cfg.n_embd,
            x,
            pos,
            block: 0,
        }
    }

    /// Runs blocks `s.block..to` on the rows of `s`, appending their keys
    /// and values to `cache`.
    pub fn run_blocks(&self, s: &mut CpuStream, to: usize, cache: &mut CpuCache) -> Result<()> {
        if s.rows == 0 {
            s.block = to.max(s.block);
            return Ok(());
        }
        let mut segs = [SegRows {
            rows: 0..s.rows,
            pos: s.pos,
            cache,
            ancestors: None,
        }];
        for i in s.block..to {
            self.block(i, s, &mut segs)?;
        }
        s.block = to;
        Ok(())
    }

    /// One forward over the rows of several sequences: every matmul takes
    /// all rows at once (each weight is read once per forward), attention
    /// runs per sequence over its own cache. Returns, per segment, the final
    /// head's logits (row-major) for its rows `logits`.
    ///
    /// A row's result does not depend on the other rows in the batch (the
    /// kernels sum every row in the same order whatever the row count), so
    /// a sequence decoded in a batch gets bitwise what it gets alone.
    pub fn forward_batch(&self, segs: &mut [Segment<'_, CpuCache>]) -> Result<Vec<Vec<f32>>> {
        let c = self.cfg.n_embd;
        let wanted: Vec<Range<usize>> = segs.iter().map(|sg| sg.logits.clone()).collect();
        let mut x = Vec::new();
        let mut rows = Vec::with_capacity(segs.len());
        for sg in segs.iter_mut() {
            if sg.logits.end > sg.tokens.len() {
                bail!(
                    "logits of rows {:?} asked for a segment of {} rows",
                    sg.logits,
                    sg.tokens.len()
                );
            }
            let start = x.len() / c;
            let tree = sg.tree.filter(|t| !t.is_chain());
            if tree.is_some_and(|t| t.len() != sg.tokens.len()) {
                bail!(
                    "a tree of {} rows for {} tokens",
                    tree.map_or(0, Tree::len),
                    sg.tokens.len()
                );
            }
            self.embed_into(sg.tokens, sg.pos, tree, &mut x)?;
            rows.push(SegRows {
                rows: start..start + sg.tokens.len(),
                pos: sg.pos,
                cache: &mut *sg.cache,
                ancestors: tree.map(|t| {
                    let slots = |r: usize| t.path_to(r).iter().map(|a| sg.pos + a).collect();
                    (0..t.len()).map(slots).collect()
                }),
            });
        }
        // The batch's stream: `pos` is per segment (in `rows`), not used.
        let mut s = self.stream(x, 0);
        if s.rows > 0 {
            for i in 0..self.cfg.n_layer {
                self.block(i, &mut s, &mut rows)?;
            }
        }
        // The final head on the wanted rows only.
        let mut h = Vec::new();
        for (want, r) in wanted.iter().zip(&rows) {
            let at = r.rows.start + want.start..r.rows.start + want.end;
            h.extend_from_slice(&s.x[at.start * c..at.end * c]);
        }
        let m = h.len() / c;
        let e = self.exits.last().expect("at least one exit");
        let head = e.head.as_ref().unwrap_or(&self.wte_head);
        let all = head.forward(&e.ln.forward(&h), m);
        let v = self.cfg.vocab_size;
        let mut out = Vec::with_capacity(segs.len());
        let mut at = 0;
        for want in &wanted {
            let len = want.len() * v;
            out.push(all[at..at + len].to_vec());
            at += len;
        }
        Ok(out)
    }

    /// Block `i` on every row of `s`; `segs` says which rows belong to
    /// which sequence (in order, covering all rows) and where its cache is.
    fn block(&self, i: usize, s: &mut CpuStream, segs: &mut [SegRows<'_>]) -> Result<()> {
        let (c, t) = (self.cfg.n_embd, s.rows);
        for sg in segs.iter() {
            let offset = sg.cache.len[i];
            if offset != sg.pos {
                bail!(
                    "kv cache layer {i} holds {offset} rows, expected {}",
                    sg.pos
                );
            }
            if offset + sg.rows.len() > sg.cache.cap {
                bail!(
                    "kv cache overflow: {offset} cached + {} new rows exceed block_size {}",
                    sg.rows.len(),
                    sg.cache.cap
                );
            }
        }
        let b = &self.blocks[i];
        let mut x = std::mem::take(&mut s.x);
        if let Some([a, bb]) = b.skip {
            for (xv, x0) in x.iter_mut().zip(&s.x0) {
                *xv = a * *xv + bb * x0;
            }
        }
        // Attention.
        let qkv = b.c_attn.forward(&b.ln_1.forward(&x), t); // (T, 3C)
        let y = self.attend(i, &qkv, segs); // (T, C)
        add(&mut x, &b.attn_proj.forward(&y, t));
        // MLP.
        let mut f = b.c_fc.forward(&b.ln_2.forward(&x), t); // (T, 4C)
        kernels::gelu_tanh(&mut f);
        add(&mut x, &b.mlp_proj.forward(&f, t));
        // DWA: the new block output joins the history, then the mix.
        if self.cfg.dwa.is_some() {
            s.xs.push(x.clone());
        }
        if let (Some(alpha), Some(inputs)) = (&b.dwa, self.cfg.dwa_inputs(i + 1)) {
            let mut mix = vec![0f32; t * c];
            for (a, j) in alpha.iter().zip(&inputs) {
                kernels::axpy(&mut mix, *a, &s.xs[*j]);
            }
            x = mix;
        }
        s.x = x;
        Ok(())
    }

    /// Causal attention in layer `layer` of every segment's new rows (their
    /// q, k, v in `qkv`, (T, 3C)) over that segment's cached rows plus its
    /// own new rows (a tree row: its ancestors' rows); writes their k, v
    /// into the segment's cache.
    fn attend(&self, layer: usize, qkv: &[f32], segs: &mut [SegRows<'_>]) -> Vec<f32> {
        let (c, nh) = (self.cfg.n_embd, self.cfg.n_head);
        let (hs, cap) = (c / nh, self.cfg.block_size);
        let mut macs = 0;
        let mut seg_of = Vec::new();
        for (si, sg) in segs.iter_mut().enumerate() {
            let (kc, vc) = (&mut sg.cache.k[layer], &mut sg.cache.v[layer]);
            for (j, r) in sg.rows.clone().enumerate() {
                let row = &qkv[r * 3 * c..(r + 1) * 3 * c];
                for h in 0..nh {
                    let at = (h * cap + sg.pos + j) * hs;
                    kc[at..at + hs].copy_from_slice(&row[c + h * hs..][..hs]);
                    vc[at..at + hs].copy_from_slice(&row[2 * c + h * hs..][..hs]);
                }
                seg_of.push(si);
            }
            sg.cache.len[layer] = sg.pos + sg.rows.len();
            macs += sg.rows.len() * nh * (sg.pos + sg.rows.len()) * hs;
        }
        let views: Vec<SegView> = segs
            .iter()
            .map(|sg| {
                let l = &*sg.cache;
                let anc = sg.ancestors.as_deref();
                (&l.k[layer][..], &l.v[layer][..], sg.pos, sg.rows.start, anc)
            })
            .collect();
        let scale = 1.0 / (hs as f32).sqrt();
        let mut y = vec![0f32; seg_of.len() * c];
        // One task per (row, head): y's chunk of hs floats at r * nh + h.
        let one = |(i, out): (usize, &mut [f32])| {
            let (r, h) = (i / nh, i % nh);
            let (kc, vc, pos, start, anc) = views[seg_of[r]];
            let (len, keys) = match anc {
                None => (pos + (r - start) + 1, KeyRows::ALL),
                Some(a) => {
                    let tail = &a[r - start];
                    let keys = KeyRows {
                        prefix: pos,
                        tail: Some(tail),
                    };
                    (pos + tail.len(), keys)
                }
            };
            let q = &qkv[r * 3 * c + h * hs..][..hs];
            let rows = pos + (r - start) + 1;
            let (kh, vh) = (
                &kc[h * cap * hs..][..rows * hs],
                &vc[h * cap * hs..][..rows * hs],
            );
            // Scores on the stack up to 1024 positions (no allocator churn).
            let mut stack = [0f32; 1024];
            let mut heap = Vec::new();
            let att = if len <= stack.len() {
                &mut stack[..len]
            } else {
                heap.resize(len, 0f32);
                &mut heap[..]
            };
            kernels::attend_head(q, kh, vh, keys, scale, att, out);
        };
        // Below ~64k multiply-adds the fork/join costs more than it saves.
        if macs < 1 << 16 {
            y.chunks_mut(hs).enumerate().for_each(one);
        } else {
            use rayon::prelude::*;
            y.par_chunks_mut(hs).enumerate().for_each(one);
        }
        y
    }

    /// Logits (rows.len(), V), row-major, of exit `exit` for rows `rows`
    /// of `s`, which must have run exactly to that exit's block.
    pub fn exit_logits(&self, s: &CpuStream, exit: usize, rows: Range<usize>) -> Result<Vec<f32>> {
        let h = self.exit_input(s, exit, rows.clone())?;
        let head = self.exits[exit].head.as_ref().unwrap_or(&self.wte_head);
        Ok(head.forward(&h, rows.len()))
    }

    /// Logits (rows.len(), ids.len()), row-major, of exit `exit` for rows
    /// `rows` of `s` and the tokens `ids` only: a dot product per token
    /// instead of the vocabulary projection. A tied head reads the f32
    /// embedding rows, which an f16 head rounds (a difference far below
    /// the margins the exit cascade acts on).
    pub fn exit_scores(
        &self,
        s: &CpuStream,
        exit: usize,
        rows: Range<usize>,
        ids: &[u32],
    ) -> Result<Vec<f32>> {
        let (c, v) = (self.cfg.n_embd, self.cfg.vocab_size);
        if let Some(bad) = ids.iter().find(|t| **t as usize >= v) {
            bail!("token id {bad} is outside the vocabulary (size {v})");
        }
        let h = self.exit_input(s, exit, rows)?;
        let weights: Vec<(Cow<[f32]>, f32)> = match &self.exits[exit].head {
            Some(m) => ids
                .iter()
                .map(|&t| {
                    let (w, b) = m.output(t as usize);
                    (Cow::Owned(w), b)
                })
                .collect(),
            None => ids
                .iter()
                .map(|&t| (Cow::Borrowed(&self.wte[t as usize * c..][..c]), 0.0))
                .collect(),
        };
        Ok(h.chunks_exact(c)
            .flat_map(|x| weights.iter().map(move |(w, b)| kernels::dot(x, w) + b))
            .collect())
    }

    /// Exit `exit`'s normalised input for rows `rows` of `s`, which must
    /// have run exactly to that exit's block.
    fn exit_input(&self, s: &CpuStream, exit: usize, rows: Range<usize>) -> Result<Vec<f32>> {
        let block = self.cfg.exits[exit].block;
        if s.block != block {
            bail!(
                "exit {exit} reads block {block}, stream is at block {}",
                s.block
            );
        }
        let c = self.cfg.n_embd;
        if rows.end > s.rows {
            bail!("rows {rows:?} outside the {} rows in flight", s.rows);
        }
        Ok(self.exits[exit]
            .ln
            .forward(&s.x[rows.start * c..rows.end * c]))
    }
}

fn add(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}
