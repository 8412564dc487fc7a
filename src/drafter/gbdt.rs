//! A compact histogram gradient-boosted tree classifier with a softmax loss
//! and vector-valued leaves: one tree per round predicts all C classes at
//! once (instead of C trees per round).
//!
//! Split search on C-dimensional gradients is the cost at large C, so the
//! tree structure is found on a sketch of the gradients: the `sketch_dim`
//! classes with the largest gradient mass this round ("top outputs",
//! SketchBoost, arXiv 2211.12858); the leaf values then use every class
//! (a Newton step with the diagonal softmax Hessian). Features are binned
//! into at most 255 quantile bins. Rows take soft targets (a distribution
//! over classes), so a row whose answer several classes give can say so.
//!
//! No published crate does multiclass softmax boosting in pure stable Rust
//! (linfa-trees and smartcore: single trees / forests, MSE boosting only),
//! hence this module.

use std::ops::Not;
use std::sync::OnceLock;

use rand::seq::index::sample;
use rand::SeedableRng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

pub const FORMAT_VERSION: u32 = 1;

#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct GbdtParams {
    pub rounds: usize,
    pub max_depth: usize,
    pub learning_rate: f32,
    /// L2 regularisation of leaf values.
    pub lambda: f32,
    pub min_rows_leaf: usize,
    pub max_bins: usize,
    /// Fraction of rows each round sees.
    pub subsample: f64,
    /// Classes the split search looks at (0 = all).
    pub sketch_dim: usize,
    /// Largest Newton step of a leaf value before the learning rate
    /// (XGBoost's max_delta_step; 0 = none). A leaf holding many rows of a
    /// class the model still gives ~1/C gets a step of ~C (the diagonal
    /// Hessian p(1-p) is tiny there): at 1e6 rows x 255 classes that
    /// overshoot made the validation loss jump from 3.2 to 6.5 in a round.
    #[serde(default)]
    pub max_delta_step: f32,
    /// Stop when the validation loss has not improved for this many rounds.
    pub early_stopping: usize,
    pub seed: u64,
}

impl Default for GbdtParams {
    fn default() -> Self {
        Self {
            rounds: 50,
            max_depth: 6,
            learning_rate: 0.3,
            lambda: 1.0,
            min_rows_leaf: 20,
            max_bins: 64,
            subsample: 1.0,
            sketch_dim: 8,
            max_delta_step: 10.0,
            early_stopping: 5,
            seed: 0,
        }
    }
}

/// Soft target of a row: (class, weight) pairs summing to 1.
pub type Target = Vec<(u32, f32)>;

#[derive(Serialize, Deserialize, Clone, Debug)]
enum Node {
    Split {
        feature: u16,
        threshold: f32,
        left: u32,
        right: u32,
    },
    Leaf {
        values: u32,
    },
}

#[derive(Serialize, Deserialize, Clone, Debug)]
struct Tree {
    nodes: Vec<Node>,
}

#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct Gbdt {
    pub version: u32,
    pub n_features: usize,
    pub n_classes: usize,
    base: Vec<f32>,
    trees: Vec<Tree>,
    /// Leaf value vectors, `n_classes` floats each.
    leaves: Vec<f32>,
    /// Total split gain per feature (importance).
    pub importance: Vec<f64>,
    /// Validation loss after each round.
    pub valid_loss: Vec<f64>,
    /// Prediction layout, built on first use (not serialised).
    #[serde(skip)]
    packed: OnceLock<Packed>,
}

/// Marks a leaf in [`Flat::feature`].
const LEAF: u32 = u32::MAX;

/// A node of the prediction layout: a split sends `x[feature] <= threshold`
/// to `next` and the rest to `next + 1` (children are adjacent, so a step
/// is an add, not a branch); a leaf's `next` is the offset of its values.
#[derive(Clone, Copy, Debug)]
struct Flat {
    feature: u32,
    threshold: f32,
    next: u32,
}

/// Every tree's nodes in one array of 12-byte nodes and the leaf vectors in
/// f16. Measured (`examples/gbdt_bench.rs`, K = 255, 50 trees of depth 6):
/// the f32 leaves are 3.3 MB, more than this CPU's L2 (1 MB per core), and
/// fetching them was most of a prediction; f16 halves that traffic, and the
/// error it adds to a summed logit (< 1e-3 relative per leaf) is far below
/// the draft threshold's resolution.
#[derive(Clone, Debug, Default)]
struct Packed {
    roots: Vec<u32>,
    nodes: Vec<Flat>,
    leaves: Vec<half::f16>,
    /// Leaf vector stride: n_classes rounded up to 16, zero-padded, so the
    /// f16 adds run in whole SIMD registers with no scalar tail.
    stride: usize,
    depth: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum GbdtError {
    #[error("gbdt: {0}")]
    Invalid(String),
}

/// Column-major binned features.
struct Binned {
    edges: Vec<Vec<f32>>,
    cols: Vec<Vec<u8>>,
}

fn bin_features(rows: &[Vec<f32>], max_bins: usize) -> Binned {
    let nf = rows[0].len();
    let edges: Vec<Vec<f32>> = (0..nf)
        .into_par_iter()
        .map(|f| {
            let step = (rows.len() / 20_000).max(1);
            let mut v: Vec<f32> = rows.iter().step_by(step).map(|r| r[f]).collect();
            v.sort_by(|a, b| a.total_cmp(b));
            v.dedup();
            if v.len() <= max_bins {
                // Each distinct value its own bin: edges between values.
                return v.windows(2).map(|w| (w[0] + w[1]) * 0.5).collect();
            }
            let mut e: Vec<f32> = (1..max_bins).map(|i| v[i * v.len() / max_bins]).collect();
            e.dedup();
            e
        })
        .collect();
    let cols = (0..nf)
        .into_par_iter()
        .map(|f| rows.iter().map(|r| bin_of(&edges[f], r[f])).collect())
        .collect();
    Binned { edges, cols }
}

/// Bin b holds values in (edges[b-1], edges[b]].
fn bin_of(edges: &[f32], x: f32) -> u8 {
    edges.partition_point(|e| *e < x) as u8
}

fn softmax_into(raw: &[f32], out: &mut [f32]) {
    out.copy_from_slice(raw);
    crate::model::kernels::softmax(out);
}

fn soft_ce(raw: &[f32], t: &Target, scratch: &mut [f32]) -> f64 {
    softmax_into(raw, scratch);
    t.iter()
        .map(|&(c, w)| -(w as f64) * (scratch[c as usize].max(1e-12) as f64).ln())
        .sum()
}

impl Gbdt {
    /// A model without trees: every row gets the uniform distribution.
    pub fn constant(n_features: usize, n_classes: usize) -> Gbdt {
        Gbdt {
            version: FORMAT_VERSION,
            n_features,
            n_classes,
            base: vec![0.0; n_classes],
            trees: vec![],
            leaves: vec![],
            importance: vec![0.0; n_features],
            valid_loss: vec![],
            packed: OnceLock::new(),
        }
    }

    /// Fits on `rows` (n x features) with soft `targets`; `valid` is used for
    /// early stopping and the reported loss curve.
    pub fn fit(
        rows: &[Vec<f32>],
        targets: &[Target],
        n_classes: usize,
        valid: (&[Vec<f32>], &[Target]),
        p: &GbdtParams,
    ) -> Result<Gbdt, GbdtError> {
        let n = rows.len();
        if n == 0 || rows.len() != targets.len() {
            return Err(GbdtError::Invalid(format!(
                "need rows and targets of equal, positive length ({n} vs {})",
                targets.len()
            )));
        }
        let nf = rows[0].len();
        if rows.iter().any(|r| r.len() != nf) {
            return Err(GbdtError::Invalid(
                "rows have different feature counts".into(),
            ));
        }
        if targets
            .iter()
            .flatten()
            .any(|(c, _)| *c as usize >= n_classes)
        {
            return Err(GbdtError::Invalid(format!(
                "a target class is >= n_classes ({n_classes})"
            )));
        }
        let c = n_classes;
        let binned = bin_features(rows, p.max_bins.clamp(2, 255));
        // Base score: log of the class prior.
        let mut prior = vec![1e-3f64; c];
        for t in targets {
            for &(k, w) in t {
                prior[k as usize] += w as f64;
            }
        }
        let total: f64 = prior.iter().sum();
        let base: Vec<f32> = prior.iter().map(|x| (x / total).ln() as f32).collect();
        let mut model = Gbdt {
            version: FORMAT_VERSION,
            n_features: nf,
            n_classes: c,
            base: base.clone(),
            trees: vec![],
            leaves: vec![],
            importance: vec![0.0; nf],
            valid_loss: vec![],
            packed: OnceLock::new(),
        };
        let mut raw: Vec<f32> = base.iter().copied().cycle().take(n * c).collect();
        let mut vraw: Vec<f32> = base
            .iter()
            .copied()
            .cycle()
            .take(valid.0.len() * c)
            .collect();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(p.seed);
        let (mut best, mut best_round) = (f64::MAX, 0usize);
        let mut grad = vec![0f32; n * c];
        let mut hess = vec![0f32; n * c];
        for round in 0..p.rounds {
            // Softmax gradients and Hessians of every row.
            grad.par_chunks_mut(c)
                .zip(hess.par_chunks_mut(c))
                .zip(raw.par_chunks(c))
                .zip(targets.par_iter())
                .for_each(|(((g, h), r), t)| {
                    softmax_into(r, g);
                    for k in 0..c {
                        h[k] = (g[k] * (1.0 - g[k])).max(1e-6);
                    }
                    for &(k, w) in t {
                        g[k as usize] -= w;
                    }
                });
            let sample_rows: Vec<u32> = if p.subsample < 1.0 {
                let m = ((n as f64 * p.subsample) as usize).max(1);
                let mut v: Vec<u32> = sample(&mut rng, n, m)
                    .into_iter()
                    .map(|i| i as u32)
                    .collect();
                v.sort_unstable();
                v
            } else {
                (0..n as u32).collect()
            };
            let sketch = top_outputs(&grad, c, &sample_rows, p.sketch_dim);
            // The sketched gradients gathered into n x d once per round: the
            // split search then reads d contiguous floats per row instead of
            // d scattered ones from a c-wide row for every feature and level
            // (at 100k rows x 255 classes those cache misses were 90% of
            // the fit).
            let d = sketch.len();
            let mut sk = vec![0f32; n * d];
            sk.par_chunks_mut(d)
                .zip(grad.par_chunks(c))
                .for_each(|(s, g)| {
                    for (sv, &k) in s.iter_mut().zip(&sketch) {
                        *sv = g[k];
                    }
                });
            let tree = model.grow(&binned, &grad, &hess, &sk, d, sample_rows, p);
            // Update raw scores of every row.
            let t = &tree;
            let leaves = &model.leaves;
            raw.par_chunks_mut(c).enumerate().for_each(|(i, r)| {
                let v = leaf_binned(t, &binned, i, leaves, c);
                for k in 0..c {
                    r[k] += v[k];
                }
            });
            vraw.par_chunks_mut(c)
                .zip(valid.0.par_iter())
                .for_each(|(r, x)| {
                    let v = leaf_raw(t, x, leaves, c);
                    for k in 0..c {
                        r[k] += v[k];
                    }
                });
            model.trees.push(tree);
            let vloss = if valid.0.is_empty() {
                0.0
            } else {
                vraw.par_chunks(c)
                    .zip(valid.1.par_iter())
                    .map_init(|| vec![0f32; c], |s, (r, t)| soft_ce(r, t, s))
                    .sum::<f64>()
                    / valid.0.len() as f64
            };
            model.valid_loss.push(vloss);
            if vloss < best - 1e-6 {
                (best, best_round) = (vloss, round);
            } else if !valid.0.is_empty() && round - best_round >= p.early_stopping {
                break;
            }
        }
        if !valid.0.is_empty() {
            model.trees.truncate(best_round + 1);
        }
        Ok(model)
    }

    #[allow(clippy::too_many_arguments)]
    fn grow(
        &mut self,
        b: &Binned,
        grad: &[f32],
        hess: &[f32],
        sk: &[f32],
        d: usize,
        rows: Vec<u32>,
        p: &GbdtParams,
    ) -> Tree {
        let c = self.n_classes;
        let mut nodes: Vec<Node> = vec![Node::Leaf { values: 0 }];
        // (node index, rows, depth, its histograms when already known)
        let mut frontier = vec![(0usize, rows, 0usize, None)];
        while let Some((node, rows, depth, hist)) = frontier.pop() {
            let can_split = depth < p.max_depth && rows.len() >= 2 * p.min_rows_leaf;
            let hist = match hist {
                Some(h) if can_split => Some(h),
                None if can_split => Some(histograms(b, sk, d, &rows)),
                _ => None,
            };
            let split = hist.as_ref().and_then(|h| best_split(h, d, rows.len(), p));
            match split {
                Some((f, bin, gain)) => {
                    self.importance[f] += gain;
                    let col = &b.cols[f];
                    let (l, r): (Vec<u32>, Vec<u32>) =
                        rows.iter().partition(|&&i| col[i as usize] <= bin);
                    // Histogram subtraction: build the smaller child's, the
                    // larger one is the parent's minus it (half the passes).
                    let (lh, rh) = if depth + 1 < p.max_depth {
                        let parent = hist.expect("split from a histogram");
                        let (small, small_is_left) = if l.len() <= r.len() {
                            (&l, true)
                        } else {
                            (&r, false)
                        };
                        let sh = histograms(b, sk, d, small);
                        let big = subtract(parent, &sh);
                        if small_is_left {
                            (Some(sh), Some(big))
                        } else {
                            (Some(big), Some(sh))
                        }
                    } else {
                        (None, None)
                    };
                    let li = nodes.len();
                    nodes.push(Node::Leaf { values: 0 });
                    nodes.push(Node::Leaf { values: 0 });
                    let threshold = b.edges[f][bin as usize];
                    nodes[node] = Node::Split {
                        feature: f as u16,
                        threshold,
                        left: li as u32,
                        right: li as u32 + 1,
                    };
                    frontier.push((li, l, depth + 1, lh));
                    frontier.push((li + 1, r, depth + 1, rh));
                }
                None => {
                    // Newton step per class with the diagonal Hessian; the
                    // sums over the leaf's rows (c-wide each) in parallel.
                    let (gs, hs) = rows
                        .par_chunks(2048)
                        .fold(
                            || (vec![0f64; c], vec![0f64; c]),
                            |(mut gs, mut hs), chunk| {
                                for &i in chunk {
                                    let o = i as usize * c;
                                    for k in 0..c {
                                        gs[k] += grad[o + k] as f64;
                                        hs[k] += hess[o + k] as f64;
                                    }
                                }
                                (gs, hs)
                            },
                        )
                        .reduce(
                            || (vec![0f64; c], vec![0f64; c]),
                            |(mut ga, mut ha), (gb, hb)| {
                                for k in 0..c {
                                    ga[k] += gb[k];
                                    ha[k] += hb[k];
                                }
                                (ga, ha)
                            },
                        );
                    let at = (self.leaves.len() / c) as u32;
                    let cap = if p.max_delta_step > 0.0 {
                        p.max_delta_step as f64
                    } else {
                        f64::INFINITY
                    };
                    self.leaves.extend((0..c).map(|k| {
                        let step = (-gs[k] / (hs[k] + p.lambda as f64)).clamp(-cap, cap);
                        (p.learning_rate as f64 * step) as f32
                    }));
                    nodes[node] = Node::Leaf { values: at };
                }
            }
        }
        Tree { nodes }
    }

    /// Class probabilities of one row of raw features.
    pub fn predict_proba(&self, x: &[f32]) -> Vec<f32> {
        let mut out = vec![0.0; self.n_classes];
        self.predict_proba_into(x, &mut out);
        out
    }

    /// The plain walk over the trees with f32 leaves: the reference the
    /// packed layout is tested and benchmarked against.
    pub fn predict_proba_f32(&self, x: &[f32]) -> Vec<f32> {
        let mut raw = self.base.clone();
        for t in &self.trees {
            let v = leaf_raw(t, x, &self.leaves, self.n_classes);
            for (r, a) in raw.iter_mut().zip(v) {
                *r += a;
            }
        }
        crate::model::kernels::softmax(&mut raw);
        raw
    }

    /// [`Gbdt::predict_proba`] into `out` (`n_classes` long), no allocation.
    pub fn predict_proba_into(&self, x: &[f32], out: &mut [f32]) {
        let pk = self.packed.get_or_init(|| self.pack());
        let c = self.n_classes;
        let mut stack = [0f32; 1024];
        let mut heap;
        let raw: &mut [f32] = if pk.stride <= stack.len() {
            &mut stack[..pk.stride]
        } else {
            heap = vec![0f32; pk.stride];
            &mut heap
        };
        raw[..c].copy_from_slice(&self.base);
        // Eight trees walked side by side: their node loads do not depend on
        // each other, so the CPU overlaps them instead of waiting on each.
        // Then every leaf vector is summed in one pass.
        let mut leaf_at = [0u32; 256];
        for (g, roots) in pk.roots.chunks(8).enumerate() {
            let mut at = [0u32; 8];
            at[..roots.len()].copy_from_slice(roots);
            let at = &mut at[..roots.len()];
            for _ in 0..pk.depth {
                for a in at.iter_mut() {
                    let nd = pk.nodes[*a as usize];
                    if nd.feature != LEAF {
                        // NaN goes right, as in training's `x <= threshold`.
                        *a = nd.next + u32::from(x[nd.feature as usize].le(&nd.threshold).not());
                    }
                }
            }
            for (i, a) in at.iter().enumerate() {
                let off = pk.nodes[*a as usize].next;
                let slot = (g * 8 + i) % leaf_at.len();
                leaf_at[slot] = off;
                if slot == leaf_at.len() - 1 {
                    crate::model::kernels::sum_rows_f16(raw, &pk.leaves, &leaf_at);
                }
            }
        }
        let rest = pk.roots.len() % leaf_at.len();
        crate::model::kernels::sum_rows_f16(raw, &pk.leaves, &leaf_at[..rest]);
        let out = &mut out[..c];
        out.copy_from_slice(&raw[..c]);
        crate::model::kernels::softmax(out);
    }

    fn pack(&self) -> Packed {
        let c = self.n_classes;
        let stride = c.next_multiple_of(16);
        let mut pk = Packed {
            stride,
            ..Default::default()
        };
        for t in &self.trees {
            let base = pk.nodes.len() as u32;
            pk.roots.push(base);
            for nd in &t.nodes {
                pk.nodes.push(match nd {
                    Node::Split {
                        feature,
                        threshold,
                        left,
                        ..
                    } => Flat {
                        feature: *feature as u32,
                        threshold: *threshold,
                        next: base + left,
                    },
                    Node::Leaf { values } => Flat {
                        feature: LEAF,
                        threshold: 0.0,
                        next: values * stride as u32,
                    },
                });
            }
            pk.depth = pk.depth.max(depth_of(t, 0));
        }
        pk.leaves = self
            .leaves
            .chunks(c.max(1))
            .flat_map(|l| l.iter().copied().chain(std::iter::repeat(0.0)).take(stride))
            .map(half::f16::from_f32)
            .collect();
        pk
    }

    /// Checks a loaded model: every index in range, right child after left,
    /// no cycles (children come after their parent), leaf vectors complete.
    pub fn validate(&self) -> Result<(), GbdtError> {
        let bad = |m: String| Err(GbdtError::Invalid(m));
        if self.base.len() != self.n_classes {
            return bad(format!(
                "base has {} values, n_classes is {}",
                self.base.len(),
                self.n_classes
            ));
        }
        if !self.leaves.len().is_multiple_of(self.n_classes.max(1)) {
            return bad("leaf values are not whole vectors".into());
        }
        let n_leaves = self.leaves.len() / self.n_classes.max(1);
        for (ti, t) in self.trees.iter().enumerate() {
            if t.nodes.is_empty() {
                return bad(format!("tree {ti} has no nodes"));
            }
            for (i, nd) in t.nodes.iter().enumerate() {
                let ok = match nd {
                    Node::Split {
                        feature,
                        left,
                        right,
                        ..
                    } => {
                        (*feature as usize) < self.n_features
                            && *left as usize > i
                            && *right == left + 1
                            && (*right as usize) < t.nodes.len()
                    }
                    Node::Leaf { values } => (*values as usize) < n_leaves,
                };
                if !ok {
                    return bad(format!("tree {ti} node {i} is out of range"));
                }
            }
        }
        Ok(())
    }

    pub fn n_trees(&self) -> usize {
        self.trees.len()
    }
}

/// Depth of the subtree at `n` (a leaf is depth 0).
fn depth_of(t: &Tree, n: usize) -> usize {
    match &t.nodes[n] {
        Node::Leaf { .. } => 0,
        Node::Split { left, right, .. } => {
            1 + depth_of(t, *left as usize).max(depth_of(t, *right as usize))
        }
    }
}

/// The `dim` classes with the largest squared-gradient mass over `rows`.
fn top_outputs(grad: &[f32], c: usize, rows: &[u32], dim: usize) -> Vec<usize> {
    if dim == 0 || dim >= c {
        return (0..c).collect();
    }
    let mut mass = vec![0f64; c];
    for &i in rows.iter().step_by((rows.len() / 50_000).max(1)) {
        let o = i as usize * c;
        for k in 0..c {
            mass[k] += (grad[o + k] as f64).powi(2);
        }
    }
    let mut idx: Vec<usize> = (0..c).collect();
    idx.sort_by(|a, b| mass[*b].total_cmp(&mass[*a]));
    idx.truncate(dim);
    idx
}

/// Per-feature histograms of a node: (gradient sums nb x d, row counts nb).
type Hist = Vec<(Vec<f64>, Vec<usize>)>;

/// Histograms of the sketched gradients `sk` (n x d) over `rows`, one per
/// feature.
fn histograms(b: &Binned, sk: &[f32], d: usize, rows: &[u32]) -> Hist {
    (0..b.cols.len())
        .into_par_iter()
        .map(|f| {
            let nb = b.edges[f].len() + 1;
            let col = &b.cols[f];
            let mut hist = vec![0f64; nb * d];
            let mut cnt = vec![0usize; nb];
            if nb < 2 {
                return (hist, cnt);
            }
            for &i in rows {
                let bin = col[i as usize] as usize;
                cnt[bin] += 1;
                let g = &sk[i as usize * d..(i as usize + 1) * d];
                let h = &mut hist[bin * d..(bin + 1) * d];
                for (hk, gk) in h.iter_mut().zip(g) {
                    *hk += *gk as f64;
                }
            }
            (hist, cnt)
        })
        .collect()
}

/// `parent - child`, feature by feature.
fn subtract(mut parent: Hist, child: &Hist) -> Hist {
    for ((ph, pc), (ch, cc)) in parent.iter_mut().zip(child) {
        for (a, b) in ph.iter_mut().zip(ch) {
            *a -= b;
        }
        for (a, b) in pc.iter_mut().zip(cc) {
            *a -= b;
        }
    }
    parent
}

/// Best (feature, bin, gain) split of a node of `n` rows from its
/// histograms, with gain = sum_d G_L^2/(n_L+l) + G_R^2/(n_R+l) - G^2/(n+l).
fn best_split(hist: &Hist, d: usize, n: usize, p: &GbdtParams) -> Option<(usize, u8, f64)> {
    let lambda = p.lambda as f64;
    hist.par_iter()
        .enumerate()
        .filter_map(|(f, (hist, cnt))| {
            let nb = cnt.len();
            if nb < 2 {
                return None;
            }
            let mut tot = vec![0f64; d];
            for bin in 0..nb {
                for k in 0..d {
                    tot[k] += hist[bin * d + k];
                }
            }
            let score =
                |g: &[f64], m: usize| g.iter().map(|x| x * x).sum::<f64>() / (m as f64 + lambda);
            let parent = score(&tot, n);
            let mut left = vec![0f64; d];
            let mut nl = 0usize;
            let mut best: Option<(usize, u8, f64)> = None;
            for bin in 0..nb - 1 {
                nl += cnt[bin];
                for k in 0..d {
                    left[k] += hist[bin * d + k];
                }
                let nr = n - nl;
                if nl < p.min_rows_leaf || nr < p.min_rows_leaf {
                    continue;
                }
                let right: Vec<f64> = tot.iter().zip(&left).map(|(t, l)| t - l).collect();
                let gain = score(&left, nl) + score(&right, nr) - parent;
                if gain > best.map_or(1e-9, |b| b.2) {
                    best = Some((f, bin as u8, gain));
                }
            }
            best
        })
        .max_by(|a, b| a.2.total_cmp(&b.2).then(b.0.cmp(&a.0)))
}

/// Walks a tree; `go_left(feature, threshold)` decides each split.
fn leaf<'a>(
    t: &Tree,
    leaves: &'a [f32],
    c: usize,
    go_left: impl Fn(usize, f32) -> bool,
) -> &'a [f32] {
    let mut n = 0usize;
    loop {
        match &t.nodes[n] {
            Node::Leaf { values } => {
                return &leaves[*values as usize * c..(*values as usize + 1) * c]
            }
            Node::Split {
                feature,
                threshold,
                left,
                right,
            } => {
                n = if go_left(*feature as usize, *threshold) {
                    *left
                } else {
                    *right
                } as usize;
            }
        }
    }
}

/// Leaf of a training row, from its bins: left holds the bins whose upper
/// edge is <= threshold.
fn leaf_binned<'a>(t: &Tree, b: &Binned, row: usize, leaves: &'a [f32], c: usize) -> &'a [f32] {
    leaf(t, leaves, c, |f, threshold| {
        let bin = b.cols[f][row] as usize;
        b.edges[f].get(bin).is_some_and(|e| *e <= threshold)
    })
}

fn leaf_raw<'a>(t: &Tree, x: &[f32], leaves: &'a [f32], c: usize) -> &'a [f32] {
    leaf(t, leaves, c, |f, threshold| x[f] <= threshold)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hard(c: u32) -> Target {
        vec![(c, 1.0)]
    }

    #[test]
    fn learns_a_synthetic_rule_exactly() {
        // class = (x0 > 0.5) * 2 + (x1 > 0.3), x2 is noise.
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        use rand::Rng;
        let rows: Vec<Vec<f32>> = (0..4000)
            .map(|_| vec![rng.random(), rng.random(), rng.random()])
            .collect();
        let label = |r: &Vec<f32>| (u32::from(r[0] > 0.5)) * 2 + u32::from(r[1] > 0.3);
        let targets: Vec<Target> = rows.iter().map(|r| hard(label(r))).collect();
        let p = GbdtParams {
            rounds: 30,
            max_depth: 3,
            min_rows_leaf: 5,
            sketch_dim: 2,
            ..Default::default()
        };
        let m = Gbdt::fit(&rows, &targets, 4, (&[], &[]), &p).unwrap();
        let test: Vec<Vec<f32>> = (0..1000)
            .map(|_| vec![rng.random(), rng.random(), rng.random()])
            .collect();
        let wrong = test
            .iter()
            .filter(|r| {
                let pr = m.predict_proba(r);
                let arg = (0..4).max_by(|a, b| pr[*a].total_cmp(&pr[*b])).unwrap() as u32;
                arg != label(r)
            })
            .count();
        assert!(wrong <= 10, "{wrong} of 1000 wrong");
        assert!(m.importance[2] < 0.01 * (m.importance[0] + m.importance[1]));
    }

    #[test]
    fn soft_targets_give_split_probabilities() {
        let rows: Vec<Vec<f32>> = (0..1000).map(|i| vec![(i % 2) as f32]).collect();
        let targets: Vec<Target> = rows
            .iter()
            .map(|r| {
                if r[0] > 0.5 {
                    vec![(0, 0.5), (1, 0.5)]
                } else {
                    hard(2)
                }
            })
            .collect();
        let p = GbdtParams {
            rounds: 60,
            max_depth: 1,
            min_rows_leaf: 1,
            ..Default::default()
        };
        let m = Gbdt::fit(&rows, &targets, 3, (&[], &[]), &p).unwrap();
        let pr = m.predict_proba(&[1.0]);
        assert!(
            (pr[0] - 0.5).abs() < 0.05 && (pr[1] - 0.5).abs() < 0.05,
            "{pr:?}"
        );
        assert!(m.predict_proba(&[0.0])[2] > 0.95);
    }

    #[test]
    fn early_stopping_keeps_the_best_round() {
        // Labels are noise: the validation loss stops improving within a
        // few rounds, and the model keeps the rounds up to its best one.
        let noise = |i: usize| ((i as u64).wrapping_mul(0x9E3779B97F4A7C15) >> 63) as u32;
        let rows: Vec<Vec<f32>> = (0..2000)
            .map(|i| vec![(i % 7) as f32, (i % 13) as f32])
            .collect();
        let targets: Vec<Target> = (0..2000).map(|i| hard(noise(i))).collect();
        let valid: Vec<Vec<f32>> = (0..500)
            .map(|i| vec![(i % 7) as f32, (i % 11) as f32])
            .collect();
        let vt: Vec<Target> = (0..500).map(|i| hard(noise(i + 7919))).collect();
        let p = GbdtParams {
            rounds: 200,
            max_depth: 4,
            min_rows_leaf: 1,
            early_stopping: 3,
            ..Default::default()
        };
        let m = Gbdt::fit(&rows, &targets, 2, (&valid, &vt), &p).unwrap();
        assert!(m.n_trees() < 50, "{} trees", m.n_trees());
        let best = m.valid_loss.iter().copied().fold(f64::MAX, f64::min);
        assert_eq!(m.valid_loss[m.n_trees() - 1], best);
    }

    #[test]
    fn packed_prediction_matches_the_f32_walk_within_f16_rounding() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        use rand::Rng;
        let rows: Vec<Vec<f32>> = (0..3000)
            .map(|_| (0..5).map(|_| rng.random::<f32>()).collect())
            .collect();
        let targets: Vec<Target> = rows
            .iter()
            .map(|r| hard(((r[0] * 7.0) as u32 + (r[1] * 3.0) as u32) % 9))
            .collect();
        let p = GbdtParams {
            rounds: 20,
            max_depth: 5,
            min_rows_leaf: 5,
            ..Default::default()
        };
        let m = Gbdt::fit(&rows, &targets, 9, (&[], &[]), &p).unwrap();
        m.validate().unwrap();
        for r in rows.iter().take(300) {
            let (a, b) = (m.predict_proba(r), m.predict_proba_f32(r));
            for (x, y) in a.iter().zip(&b) {
                assert!((x - y).abs() < 2e-3, "{a:?} vs {b:?}");
            }
        }
        // NaN goes right in both.
        let nan = [f32::NAN; 5];
        let (a, b) = (m.predict_proba(&nan), m.predict_proba_f32(&nan));
        assert!(a.iter().zip(&b).all(|(x, y)| (x - y).abs() < 2e-3));
    }

    #[test]
    fn a_tree_pointing_outside_itself_fails_validation() {
        let mut m = Gbdt::constant(2, 3);
        m.leaves = vec![0.0; 3];
        m.trees.push(Tree {
            nodes: vec![Node::Split {
                feature: 0,
                threshold: 0.5,
                left: 1,
                right: 2,
            }],
        });
        let e = m.validate().unwrap_err();
        assert!(e.to_string().contains("tree 0 node 0"), "{e}");
        m.trees[0].nodes.push(Node::Leaf { values: 0 });
        m.trees[0].nodes.push(Node::Leaf { values: 1 });
        assert!(m.validate().is_err(), "leaf 1 does not exist");
        m.trees[0].nodes[2] = Node::Leaf { values: 0 };
        m.validate().unwrap();
    }

    #[test]
    fn bad_targets_are_an_error_not_a_panic() {
        let rows = vec![vec![0.0f32]];
        let e = Gbdt::fit(&rows, &[hard(5)], 3, (&[], &[]), &GbdtParams::default()).unwrap_err();
        assert!(e.to_string().contains("n_classes"));
    }
}
