//! The boosting loop: base scores from the class prior, then per round the
//! softmax gradients of every row, a row sample, the gradient sketch the
//! split search reads ("top outputs"), one tree grown on them, every
//! row's raw scores moved by it, and the validation loss that stops the
//! fit early and picks the rounds kept.

use rand::seq::index::sample;
use rand::SeedableRng;
use rayon::prelude::*;

use super::bins::{bin_features, Binned};
use super::predict::{leaf, leaf_raw};
use super::tree::Grads;
use super::{Gbdt, GbdtError, GbdtParams, Target, Tree};

impl Gbdt {
    /// Fits on `rows` (n x features) with soft `targets`; `valid` is used for
    /// early stopping and the reported loss curve.
    pub fn fit(
        rows: &[Vec<f32>],
        targets: &[Target],
        n_classes: usize,
        valid: (&[Vec<f32>], &[Target]),
        p: &GbdtParams,
    ) -> Result<Gbdt, GbdtError> {
        check_inputs(rows, targets, n_classes)?;
        let (n, c) = (rows.len(), n_classes);
        let binned = bin_features(rows, p.max_bins.clamp(2, 255));
        let base = base_scores(targets, c);
        let mut model = Gbdt {
            base: base.clone(),
            ..Gbdt::constant(rows[0].len(), c)
        };
        let mut raw = tiled(&base, n);
        let mut vraw = tiled(&base, valid.0.len());
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(p.seed);
        let (mut best, mut best_round) = (f64::MAX, 0usize);
        let mut grad = vec![0f32; n * c];
        let mut hess = vec![0f32; n * c];
        for round in 0..p.rounds {
            gradients(&mut grad, &mut hess, &raw, targets, c);
            let sample_rows = subsample(&mut rng, n, p.subsample);
            let sketch = top_outputs(&grad, c, &sample_rows, p.sketch_dim);
            let sk = gather(&grad, c, &sketch, n);
            let g = Grads {
                grad: &grad,
                hess: &hess,
                sk: &sk,
                d: sketch.len(),
            };
            let tree = model.grow(&binned, &g, sample_rows, p);
            model.add_tree(&tree, &binned, &mut raw, valid.0, &mut vraw);
            model.trees.push(tree);
            let vloss = valid_loss(&vraw, valid, c);
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

    /// Adds tree `t`'s leaf values to the raw scores of every training row
    /// (found by its bins) and every validation row.
    fn add_tree(
        &self,
        t: &Tree,
        binned: &Binned,
        raw: &mut [f32],
        valid: &[Vec<f32>],
        vraw: &mut [f32],
    ) {
        let c = self.n_classes;
        let leaves = &self.leaves;
        raw.par_chunks_mut(c).enumerate().for_each(|(i, r)| {
            let v = leaf_binned(t, binned, i, leaves, c);
            for k in 0..c {
                r[k] += v[k];
            }
        });
        vraw.par_chunks_mut(c)
            .zip(valid.par_iter())
            .for_each(|(r, x)| {
                let v = leaf_raw(t, x, leaves, c);
                for k in 0..c {
                    r[k] += v[k];
                }
            });
    }
}

/// Rows and targets of equal, positive length, rows of one width, and
/// target classes below `n_classes`.
fn check_inputs(rows: &[Vec<f32>], targets: &[Target], n_classes: usize) -> Result<(), GbdtError> {
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
    Ok(())
}

/// Base score: log of the class prior.
fn base_scores(targets: &[Target], c: usize) -> Vec<f32> {
    let mut prior = vec![1e-3f64; c];
    for t in targets {
        for &(k, w) in t {
            prior[k as usize] += w as f64;
        }
    }
    let total: f64 = prior.iter().sum();
    prior.iter().map(|x| (x / total).ln() as f32).collect()
}

/// `base` repeated for each of `rows` rows: their starting raw scores.
fn tiled(base: &[f32], rows: usize) -> Vec<f32> {
    base.iter()
        .copied()
        .cycle()
        .take(rows * base.len())
        .collect()
}

/// Softmax gradients and Hessians of every row.
fn gradients(grad: &mut [f32], hess: &mut [f32], raw: &[f32], targets: &[Target], c: usize) {
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
}

/// The rows a round sees, ascending: all of them, or a `fraction` drawn
/// without replacement.
fn subsample(rng: &mut rand_chacha::ChaCha8Rng, n: usize, fraction: f64) -> Vec<u32> {
    if fraction < 1.0 {
        let m = ((n as f64 * fraction) as usize).max(1);
        let mut v: Vec<u32> = sample(rng, n, m).into_iter().map(|i| i as u32).collect();
        v.sort_unstable();
        v
    } else {
        (0..n as u32).collect()
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

/// The sketched gradients gathered into n x d once per round: the split
/// search then reads d contiguous floats per row instead of d scattered
/// ones from a c-wide row for every feature and level (at 100k rows x 255
/// classes those cache misses were 90% of the fit).
fn gather(grad: &[f32], c: usize, sketch: &[usize], n: usize) -> Vec<f32> {
    let d = sketch.len();
    let mut sk = vec![0f32; n * d];
    sk.par_chunks_mut(d)
        .zip(grad.par_chunks(c))
        .for_each(|(s, g)| {
            for (sv, &k) in s.iter_mut().zip(sketch) {
                *sv = g[k];
            }
        });
    sk
}

/// Mean cross-entropy of the validation rows (0 without any).
fn valid_loss(vraw: &[f32], valid: (&[Vec<f32>], &[Target]), c: usize) -> f64 {
    if valid.0.is_empty() {
        0.0
    } else {
        vraw.par_chunks(c)
            .zip(valid.1.par_iter())
            .map_init(|| vec![0f32; c], |s, (r, t)| soft_ce(r, t, s))
            .sum::<f64>()
            / valid.0.len() as f64
    }
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

/// Leaf of a training row, from its bins: left holds the bins whose upper
/// edge is <= threshold.
fn leaf_binned<'a>(t: &Tree, b: &Binned, row: usize, leaves: &'a [f32], c: usize) -> &'a [f32] {
    leaf(t, leaves, c, |f, threshold| {
        let bin = b.cols[f][row] as usize;
        b.edges[f].get(bin).is_some_and(|e| *e <= threshold)
    })
}
