//! The CPU model's transformer blocks over the rows in flight: one
//! sequence's rows (`run_blocks`) or several sequences' rows as one batch
//! (`forward_batch`), every matmul over all rows at once and attention per
//! sequence over its own cache (a draft tree's rows over their ancestors).

use std::ops::Range;
use std::sync::Mutex;

use candle_core::{bail, Result};

use super::cache::KvBuf;
use super::{CpuCache, CpuGpt, CpuStream, Mat};
use crate::model::forward::{Logits, Segment, Tree};
use crate::model::kernels::{self, KeyRows};
use crate::model::team::Team;

/// A segment's layer as attention reads it: keys, values, position of
/// its first row, its first row among the rows in flight, and its rows'
/// ancestors when they are a draft tree.
type SegView<'a> = (&'a KvBuf, &'a KvBuf, usize, usize, Option<&'a [Vec<usize>]>);

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

impl CpuGpt {
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
    pub fn forward_batch(&self, segs: &mut [Segment<'_, CpuCache>]) -> Result<Vec<Logits>> {
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
        let f = e.ln.forward(&h);
        let all = head.forward(&f, m);
        let v = self.cfg.vocab_size;
        let mut out = Vec::with_capacity(segs.len());
        let mut at = 0;
        for want in &wanted {
            let (logits, feats) = (at * v..(at + want.len()) * v, at * c..(at + want.len()) * c);
            out.push(Logits::new(all[logits].to_vec(), v).with_features(f[feats].to_vec()));
            at += want.len();
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
                    kc.write(at, &row[c + h * hs..][..hs]);
                    vc.write(at, &row[2 * c + h * hs..][..hs]);
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
                (&l.k[layer], &l.v[layer], sg.pos, sg.rows.start, anc)
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
            let span = h * cap * hs..(h * cap + rows) * hs;
            // Scores on the stack up to 1024 positions (no allocator churn).
            let mut stack = [0f32; 1024];
            let mut heap = Vec::new();
            let att = if len <= stack.len() {
                &mut stack[..len]
            } else {
                heap.resize(len, 0f32);
                &mut heap[..]
            };
            attend_rows(q, (kc, vc), span, keys, scale, att, out);
        };
        // Below ~64k multiply-adds a rayon fork/join costs more than it
        // saves; the team's spin barrier (~1 us) pays from ~4k. Only where
        // the matmuls run on the team (quantized weights): its worker spins
        // 1 ms after a job, which took a core from the f32/f16 matmuls on
        // rayon's pool (shipped model f32 decode 2.4x slower, measured).
        let quantized = matches!(self.blocks[layer].c_attn, Mat::Q(_));
        match Team::for_rows(seg_of.len()).filter(|_| quantized) {
            Some(team) if macs >= 1 << 12 => on_team(team, &mut y, hs, &one),
            _ if macs < 1 << 16 => y.chunks_mut(hs).enumerate().for_each(one),
            _ => {
                use rayon::prelude::*;
                y.par_chunks_mut(hs).enumerate().for_each(one);
            }
        }
        y
    }
}

/// [`kernels::attend_head`] over elements `span` of a head's cached keys
/// and values, in the cache's dtype.
fn attend_rows(
    q: &[f32],
    (k, v): (&KvBuf, &KvBuf),
    span: Range<usize>,
    keys: KeyRows<'_>,
    scale: f32,
    att: &mut [f32],
    out: &mut [f32],
) {
    match (k, v) {
        (KvBuf::F32(k), KvBuf::F32(v)) => {
            kernels::attend_head(q, &k[span.clone()], &v[span], keys, scale, att, out)
        }
        (KvBuf::F16(k), KvBuf::F16(v)) => {
            kernels::attend_head(q, &k[span.clone()], &v[span], keys, scale, att, out)
        }
        _ => unreachable!("a cache's keys and values share one dtype"),
    }
}

/// `one((i, chunk))` for every `hs`-value chunk of `y`, the chunks split
/// in contiguous shares over `team`'s threads.
fn on_team<F>(team: &Team, y: &mut [f32], hs: usize, one: &F)
where
    F: Fn((usize, &mut [f32])) + Sync,
{
    let (tasks, parts) = (y.len() / hs, team.threads());
    let mut shares = Vec::with_capacity(parts);
    let mut rest = y;
    for p in 0..parts {
        let (lo, hi) = (p * tasks / parts, (p + 1) * tasks / parts);
        let (share, tail) = std::mem::take(&mut rest).split_at_mut((hi - lo) * hs);
        shares.push(Mutex::new((lo, share)));
        rest = tail;
    }
    team.run(&|p| {
        // Each part locks only its own share: never contended.
        let mut share = shares[p].lock().unwrap_or_else(|e| e.into_inner());
        let (lo, ref mut chunk) = *share;
        chunk
            .chunks_mut(hs)
            .enumerate()
            .for_each(|(j, out)| one((lo + j, out)));
    });
}

fn add(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}
