//! One tree grown on a round's gradients, depth first: per-feature
//! histograms of the sketched gradients (the smaller child's built, the
//! larger one's by subtraction), the best split by sketched gain, and at
//! each leaf a Newton step per class over every class's gradients.

use rayon::prelude::*;

use super::bins::Binned;
use super::{Gbdt, GbdtParams, Node, Tree};

/// One round's gradients, as the tree reads them.
pub(super) struct Grads<'a> {
    /// Softmax gradients of every row, n x c.
    pub grad: &'a [f32],
    /// Diagonal softmax Hessians of every row, n x c.
    pub hess: &'a [f32],
    /// The sketched gradients, n x d: what the split search reads.
    pub sk: &'a [f32],
    pub d: usize,
}

impl Gbdt {
    /// Grows one tree on `rows`, adding its leaf vectors to `self.leaves`
    /// and its split gains to `self.importance`.
    pub(super) fn grow(&mut self, b: &Binned, g: &Grads, rows: Vec<u32>, p: &GbdtParams) -> Tree {
        let mut nodes: Vec<Node> = vec![Node::Leaf { values: 0 }];
        // (node index, rows, depth, its histograms when already known)
        let mut frontier = vec![(0usize, rows, 0usize, None)];
        while let Some((node, rows, depth, hist)) = frontier.pop() {
            let can_split = depth < p.max_depth && rows.len() >= 2 * p.min_rows_leaf;
            let hist = match hist {
                Some(h) if can_split => Some(h),
                None if can_split => Some(histograms(b, g.sk, g.d, &rows)),
                _ => None,
            };
            let split = hist
                .as_ref()
                .and_then(|h| best_split(h, g.d, rows.len(), p));
            match split {
                Some((f, bin, gain)) => {
                    self.importance[f] += gain;
                    let col = &b.cols[f];
                    let (l, r): (Vec<u32>, Vec<u32>) =
                        rows.iter().partition(|&&i| col[i as usize] <= bin);
                    let (lh, rh) = if depth + 1 < p.max_depth {
                        let parent = hist.expect("split from a histogram");
                        child_histograms(b, g, parent, &l, &r)
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
                    let values = self.leaf_values(g, &rows, p);
                    nodes[node] = Node::Leaf { values };
                }
            }
        }
        Tree { nodes }
    }

    /// Appends the leaf vector of `rows` to `self.leaves` and returns its
    /// index: a Newton step per class with the diagonal Hessian, capped
    /// at `max_delta_step`, times the learning rate.
    fn leaf_values(&mut self, g: &Grads, rows: &[u32], p: &GbdtParams) -> u32 {
        let c = self.n_classes;
        let (gs, hs) = leaf_sums(g, rows, c);
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
        at
    }
}

/// Gradient and Hessian sums per class over a leaf's rows (c-wide each),
/// in parallel.
fn leaf_sums(g: &Grads, rows: &[u32], c: usize) -> (Vec<f64>, Vec<f64>) {
    let (grad, hess) = (g.grad, g.hess);
    rows.par_chunks(2048)
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
        )
}

/// Histograms of a split's children `l` and `r` by histogram subtraction:
/// build the smaller child's, the larger one is the parent's minus it
/// (half the passes).
fn child_histograms(
    b: &Binned,
    g: &Grads,
    parent: Hist,
    l: &[u32],
    r: &[u32],
) -> (Option<Hist>, Option<Hist>) {
    let (small, small_is_left) = if l.len() <= r.len() {
        (l, true)
    } else {
        (r, false)
    };
    let sh = histograms(b, g.sk, g.d, small);
    let big = subtract(parent, &sh);
    if small_is_left {
        (Some(sh), Some(big))
    } else {
        (Some(big), Some(sh))
    }
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
