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
//!
//! - `bins`: features binned into quantile bins, once per fit;
//! - `fit`: the boosting loop (base scores, softmax gradients, the row
//!   sample and gradient sketch of a round, score updates, early stopping);
//! - `tree`: one tree grown on a round's gradients (histograms, split
//!   search, Newton leaf values);
//! - `predict`: the packed f16 prediction layout and the walks over trees.

mod bins;
mod fit;
mod predict;
mod tree;

use std::sync::OnceLock;

use serde::{Deserialize, Serialize};

use predict::Packed;

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

#[derive(Debug, thiserror::Error)]
pub enum GbdtError {
    #[error("gbdt: {0}")]
    Invalid(String),
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

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

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
