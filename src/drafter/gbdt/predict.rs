//! Prediction: the trees packed into one flat array of 12-byte nodes with
//! f16 leaf vectors (built on first use), walked eight trees at a time;
//! and the plain f32 walk over the trees that training and the tests use.

use std::ops::Not;

use super::{Gbdt, Node, Tree};

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
pub(super) struct Packed {
    roots: Vec<u32>,
    nodes: Vec<Flat>,
    leaves: Vec<half::f16>,
    /// Leaf vector stride: n_classes rounded up to 16, zero-padded, so the
    /// f16 adds run in whole SIMD registers with no scalar tail.
    stride: usize,
    depth: usize,
}

impl Gbdt {
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

/// Walks a tree; `go_left(feature, threshold)` decides each split.
pub(super) fn leaf<'a>(
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

pub(super) fn leaf_raw<'a>(t: &Tree, x: &[f32], leaves: &'a [f32], c: usize) -> &'a [f32] {
    leaf(t, leaves, c, |f, threshold| x[f] <= threshold)
}
