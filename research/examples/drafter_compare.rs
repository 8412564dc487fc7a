//! Drafter classifiers side by side on the same labelled rows, written by
//! `gpt-serve train-drafter --model DIR --drafter-rows-out rows.json`: our
//! GBDT (soft targets, as trained for serving, and hard targets, as the
//! others see them), linfa-trees' DecisionTree, smartcore's RandomForest and,
//! with `--features lightgbm`, LightGBM with the same rounds, depth, leaves,
//! learning rate, L2 and bins.
//!
//! Accuracy: the predicted class is one that yields the model's top-1 token
//! (any class of the row's soft target). Precision/coverage: among the rows
//! where the argmax is not `__MODEL__` and its probability reaches the
//! threshold (coverage), the share predicted right (precision).
//! Prediction: one row at a time, as the drafter calls it, averaged over
//! the test rows.
//!
//! `scripts/drafter-compare.sh` builds and runs it; or
//! `cargo run --release -p gpt-serve-research --features compare --example drafter_compare -- rows.json [out.md]`

#[cfg(feature = "compare")]
fn main() -> anyhow::Result<()> {
    compare::main()
}

#[cfg(not(feature = "compare"))]
fn main() {
    eprintln!(
        "drafter_compare needs the baseline crates: \
         cargo run --release -p gpt-serve-research --features compare --example drafter_compare -- ROWS.json \
         (or scripts/drafter-compare.sh)"
    );
    std::process::exit(2);
}

#[cfg(feature = "compare")]
mod compare {
    use std::time::Instant;

    use gpt_serve::drafter::gbdt::{Gbdt, GbdtParams, Target};
    use gpt_serve::train::label::RowsDump;

    const ROUNDS: usize = 50;
    const DEPTH: usize = 6;
    const THRESHOLDS: [f32; 9] = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9];

    struct Row {
        name: String,
        fit_s: f64,
        predict_us: f64,
        accuracy: f64,
        /// (threshold, coverage, precision); one-hot for classifiers without
        /// probabilities (the same point at every threshold).
        curve: Vec<(f32, f64, f64)>,
    }

    /// The class with the largest weight (ties: the first, a token class before
    /// a pointer class).
    fn hard(t: &Target) -> u32 {
        t.iter()
            .fold(
                (u32::MAX, f32::MIN),
                |b, &(c, w)| if w > b.1 { (c, w) } else { b },
            )
            .0
    }

    fn hit(t: &Target, c: u32) -> bool {
        t.iter().any(|x| x.0 == c)
    }

    fn argmax(p: &[f32]) -> (u32, f32) {
        p.iter().enumerate().fold(
            (0u32, f32::MIN),
            |b, (i, &v)| if v > b.1 { (i as u32, v) } else { b },
        )
    }

    /// The token class `c` stands for in a row (None for `__MODEL__` or an
    /// absent candidate).
    fn token_of(d: &RowsDump, cands: &[u32; 4], c: usize) -> Option<u32> {
        let k = d.classes.len();
        let t = if c < k {
            d.classes[c]
        } else if c < k + 4 {
            cands[c - k]
        } else {
            return None;
        };
        (t != u32::MAX).then_some(t)
    }

    /// Accuracy (argmax class yields the top-1) and the precision/coverage
    /// curve of the drafter's own decision: class probabilities summed per
    /// token they resolve to, the best token drafted when it beats
    /// `__MODEL__` and reaches the threshold.
    fn score(d: &RowsDump, probs: &[Vec<f32>]) -> (f64, Vec<(f32, f64, f64)>) {
        let (_, test, cands) = &d.valid;
        let n = test.len() as f64;
        let acc = probs
            .iter()
            .zip(test)
            .filter(|(p, t)| hit(t, argmax(p).0))
            .count() as f64
            / n;
        // Per row: (best token's mass, whether that token is the top-1) when
        // the best token beats __MODEL__.
        let best: Vec<Option<(f32, bool)>> = probs
            .iter()
            .zip(test)
            .zip(cands)
            .map(|((p, t), c)| {
                let mut mass: Vec<(u32, f32)> = Vec::new();
                for (i, &q) in p.iter().enumerate() {
                    if let Some(tok) = token_of(d, c, i) {
                        match mass.iter_mut().find(|m| m.0 == tok) {
                            Some(m) => m.1 += q,
                            None => mass.push((tok, q)),
                        }
                    }
                }
                let (tok, q) = mass
                    .into_iter()
                    .fold((0, f32::MIN), |b, m| if m.1 > b.1 { m } else { b });
                let top1 = t.iter().find_map(|&(cl, _)| token_of(d, c, cl as usize));
                (q > p[d.model_class]).then_some((q, top1 == Some(tok)))
            })
            .collect();
        let curve = THRESHOLDS
            .iter()
            .map(|&th| {
                let drafted: Vec<bool> = best
                    .iter()
                    .flatten()
                    .filter(|b| b.0 >= th)
                    .map(|b| b.1)
                    .collect();
                let right = drafted.iter().filter(|x| **x).count() as f64;
                (
                    th,
                    drafted.len() as f64 / n,
                    right / drafted.len().max(1) as f64,
                )
            })
            .collect();
        (acc, curve)
    }

    fn one_hot(c: u32, n: usize) -> Vec<f32> {
        let mut v = vec![0.0; n];
        v[c as usize] = 1.0;
        v
    }

    fn timed<T>(f: impl FnOnce() -> T) -> (T, f64) {
        let t = Instant::now();
        let v = f();
        (v, t.elapsed().as_secs_f64())
    }

    /// Mean seconds per call of `f` over the test rows (at least 2,000 calls).
    fn per_row<T>(x: &[Vec<f32>], mut f: impl FnMut(&[f32]) -> T) -> f64 {
        let reps = 2000usize.max(x.len());
        let t = Instant::now();
        for i in 0..reps {
            std::hint::black_box(f(&x[i % x.len()]));
        }
        t.elapsed().as_secs_f64() / reps as f64
    }

    fn ours(d: &RowsDump, soft: bool) -> anyhow::Result<Row> {
        ours_masked(d, soft, &[])
    }

    /// Our GBDT without the `n` features of least split gain (their columns set
    /// to 0, so no tree can split on them): do they pay?
    fn ours_without_weakest(d: &RowsDump, n: usize) -> anyhow::Result<Row> {
        let p = GbdtParams {
            rounds: ROUNDS,
            max_depth: DEPTH,
            early_stopping: usize::MAX / 2,
            ..Default::default()
        };
        let g = Gbdt::fit(&d.train.0, &d.train.1, d.n_classes, (&[], &[]), &p)?;
        let mut order: Vec<usize> = (0..g.importance.len()).collect();
        order.sort_by(|a, b| g.importance[*a].total_cmp(&g.importance[*b]));
        let total: f64 = g.importance.iter().sum();
        let weakest = &order[..n];
        let share: f64 = weakest.iter().map(|f| g.importance[*f]).sum::<f64>() / total;
        let names: Vec<&str> = weakest
            .iter()
            .map(|f| d.feature_names[*f].as_str())
            .collect();
        let mut r = ours_masked(d, true, weakest)?;
        r.name = format!(
            "gpt-serve GBDT (soft) without its {n} weakest features ({}: {:.1}% of split gain)",
            names.join(", "),
            share * 100.0
        );
        Ok(r)
    }

    fn ours_masked(d: &RowsDump, soft: bool, drop: &[usize]) -> anyhow::Result<Row> {
        let mask = |rows: &[Vec<f32>]| -> Vec<Vec<f32>> {
            rows.iter()
                .map(|r| {
                    let mut r = r.clone();
                    for f in drop {
                        r[*f] = 0.0;
                    }
                    r
                })
                .collect()
        };
        let x = &mask(&d.train.0);
        let t = &d.train.1;
        let targets: Vec<Target> = if soft {
            t.clone()
        } else {
            t.iter().map(|t| vec![(hard(t), 1.0)]).collect()
        };
        let p = GbdtParams {
            rounds: ROUNDS,
            max_depth: DEPTH,
            early_stopping: usize::MAX / 2,
            ..Default::default()
        };
        let (g, fit_s) = timed(|| Gbdt::fit(x, &targets, d.n_classes, (&[], &[]), &p));
        let g = g?;
        let vx = &mask(&d.valid.0);
        let probs: Vec<Vec<f32>> = vx.iter().map(|r| g.predict_proba(r)).collect();
        let (accuracy, curve) = score(d, &probs);
        let mut out = vec![0f32; d.n_classes];
        let predict_us = per_row(vx, |r| g.predict_proba_into(r, &mut out)) * 1e6;
        Ok(Row {
            name: format!(
                "gpt-serve GBDT ({} targets, {ROUNDS} rounds, depth {DEPTH}, vector leaves)",
                if soft { "soft" } else { "hard" }
            ),
            fit_s,
            predict_us,
            accuracy,
            curve,
        })
    }

    fn linfa_tree(d: &RowsDump, depth: Option<usize>) -> anyhow::Result<Row> {
        use linfa::prelude::*;
        use linfa_trees::DecisionTree;
        use ndarray::{Array1, Array2};
        let (x, t, _) = &d.train;
        let nf = x[0].len();
        let xa = Array2::from_shape_vec((x.len(), nf), x.concat())?;
        let ya: Array1<usize> = t.iter().map(|t| hard(t) as usize).collect();
        let data = Dataset::new(xa, ya);
        let (tree, fit_s) = timed(|| DecisionTree::params().max_depth(depth).fit(&data));
        let tree = tree?;
        let vx = &d.valid.0;
        let va = Array2::from_shape_vec((vx.len(), nf), vx.concat())?;
        let probs: Vec<Vec<f32>> = tree
            .predict(&va)
            .iter()
            .map(|c| one_hot(*c as u32, d.n_classes))
            .collect();
        let (accuracy, curve) = score(d, &probs);
        let predict_us = per_row(vx, |r| {
            let one = Array2::from_shape_vec((1, nf), r.to_vec()).expect("one row");
            tree.predict(&one)
        }) * 1e6;
        Ok(Row {
            name: format!(
                "linfa-trees DecisionTree (depth {})",
                depth.map_or("unlimited".into(), |d| d.to_string())
            ),
            fit_s,
            predict_us,
            accuracy,
            curve,
        })
    }

    fn smartcore_forest(d: &RowsDump) -> anyhow::Result<Row> {
        use smartcore::ensemble::random_forest_classifier::{
            RandomForestClassifier, RandomForestClassifierParameters,
        };
        use smartcore::linalg::basic::matrix::DenseMatrix;
        let (x, t, _) = &d.train;
        let xm = DenseMatrix::from_2d_vec(x).map_err(|e| anyhow::anyhow!("{e}"))?;
        let y: Vec<u32> = t.iter().map(hard).collect();
        let params = RandomForestClassifierParameters::default()
            .with_n_trees(ROUNDS as u16)
            .with_max_depth(DEPTH as u16)
            .with_seed(1);
        let (forest, fit_s) = timed(|| RandomForestClassifier::fit(&xm, &y, params));
        let forest = forest.map_err(|e| anyhow::anyhow!("{e}"))?;
        let vx = &d.valid.0;
        let vm = DenseMatrix::from_2d_vec(vx).map_err(|e| anyhow::anyhow!("{e}"))?;
        let classes: Vec<u32> = forest.predict(&vm).map_err(|e| anyhow::anyhow!("{e}"))?;
        let probs: Vec<Vec<f32>> = classes.iter().map(|c| one_hot(*c, d.n_classes)).collect();
        let (accuracy, curve) = score(d, &probs);
        let predict_us = per_row(vx, |r| {
            let one = DenseMatrix::from_2d_vec(&vec![r.to_vec()]).expect("one row");
            forest.predict(&one)
        }) * 1e6;
        Ok(Row {
            name: format!("smartcore RandomForest ({ROUNDS} trees, depth {DEPTH})"),
            fit_s,
            predict_us,
            accuracy,
            curve,
        })
    }

    #[cfg(feature = "lightgbm")]
    fn lightgbm(d: &RowsDump) -> anyhow::Result<Row> {
        use lightgbm3::{Booster, Dataset};
        let (x, t, _) = &d.train;
        let nf = x[0].len();
        let y: Vec<f32> = t.iter().map(|t| hard(t) as f32).collect();
        let data = Dataset::from_slice(&x.concat(), &y, nf as i32, true)?;
        // The same shape of model as ours: rounds, depth, 2^depth leaves,
        // learning rate, L2, min rows per leaf, bins.
        let params = serde_json::json!({
            "objective": "multiclass", "num_class": d.n_classes, "num_iterations": ROUNDS,
            "learning_rate": 0.3, "max_depth": DEPTH, "num_leaves": 1 << DEPTH,
            "min_data_in_leaf": 20, "lambda_l2": 1.0, "max_bin": 64, "verbose": -1,
        });
        let (bst, fit_s) = timed(|| Booster::train(data, &params));
        let mut bst = bst?;
        let vx = &d.valid.0;
        let flat = bst.predict_with_params(&vx.concat(), nf as i32, true, "num_threads=1")?;
        let probs: Vec<Vec<f32>> = flat
            .chunks(d.n_classes)
            .map(|p| p.iter().map(|v| *v as f32).collect())
            .collect();
        let (accuracy, curve) = score(d, &probs);
        // Single rows through LightGBM's two C entry points (the prepared
        // "fast" config and the plain one); the faster counts. Batch prediction
        // (all test rows in one call) is printed for scale.
        let batch_us =
            timed(|| bst.predict_with_params(&vx.concat(), nf as i32, true, "num_threads=1")).1
                / vx.len() as f64
                * 1e6;
        let plain_us = per_row(&vx[..200.min(vx.len())], |r| {
            bst.predict_with_params(r, nf as i32, true, "num_threads=1")
                .expect("predict")
        }) * 1e6;
        bst.single_row_fast_init::<f32>(Some(&serde_json::json!({"num_threads": 1})))?;
        let fast_us = per_row(&vx[..200.min(vx.len())], |r| {
            bst.predict_single_row_fast(r).expect("predict")
        }) * 1e6;
        eprintln!("lightgbm: single row {plain_us:.1} us (plain), {fast_us:.1} us (fast config); batch {batch_us:.1} us/row");
        let predict_us = plain_us.min(fast_us);
        Ok(Row {
            name: format!(
                "LightGBM via lightgbm3 ({ROUNDS} rounds x {} trees, depth {DEPTH}, {} leaves)",
                d.n_classes,
                1 << DEPTH
            ),
            fit_s,
            predict_us,
            accuracy,
            curve,
        })
    }

    pub fn main() -> anyhow::Result<()> {
        let args: Vec<String> = std::env::args().collect();
        let path = args
            .get(1)
            .ok_or_else(|| anyhow::anyhow!("usage: drafter_compare ROWS.json [OUT.md]"))?;
        let bytes = std::fs::read(path).map_err(|e| anyhow::anyhow!("reading {path}: {e}"))?;
        let d: RowsDump =
            serde_json::from_slice(&bytes).map_err(|e| anyhow::anyhow!("parsing {path}: {e}"))?;
        eprintln!(
            "{} train rows, {} test rows, {} features, {} classes",
            d.train.0.len(),
            d.valid.0.len(),
            d.feature_names.len(),
            d.n_classes
        );
        let mut rows = Vec::new();
        // ONLY=substring runs the matching classifiers only.
        let only = std::env::var("ONLY").unwrap_or_default();
        let mut run =
            |name: &str, f: &dyn Fn() -> anyhow::Result<Row>| match name.contains(&only).then(f) {
                None => {}
                Some(Ok(r)) => {
                    eprintln!(
                        "{name}: fit {:.1}s, acc {:.4}, {:.2} us/row",
                        r.fit_s, r.accuracy, r.predict_us
                    );
                    rows.push(r)
                }
                Some(Err(e)) => eprintln!("{name}: failed: {e}"),
            };
        run("ours soft", &|| ours(&d, true));
        run("ours hard", &|| ours(&d, false));
        run("ours without weakest", &|| ours_without_weakest(&d, 6));
        #[cfg(feature = "lightgbm")]
        run("lightgbm", &|| lightgbm(&d));
        run("linfa depth 6", &|| linfa_tree(&d, Some(DEPTH)));
        run("linfa unlimited", &|| linfa_tree(&d, None));
        run("smartcore forest", &|| smartcore_forest(&d));

        let mut md = format!(
            "Drafter classifiers on the same rows ({} train, {} test, {} features, {} classes \
             incl. pointer classes and `__MODEL__`); accuracy = predicted class yields the model's \
             top-1; prediction = one row per call, single thread.\n\n\
             | classifier | fit s | predict us/row | accuracy |\n|---|---|---|---|\n",
            d.train.0.len(),
            d.valid.0.len(),
            d.feature_names.len(),
            d.n_classes
        );
        for r in &rows {
            md += &format!(
                "| {} | {:.1} | {:.2} | {:.4} |\n",
                r.name, r.fit_s, r.predict_us, r.accuracy
            );
        }
        md += "\nCoverage / precision over the draft threshold, deciding as the drafter \
               does (class probabilities summed per token they stand for; the best token is \
               drafted when it beats `__MODEL__` and reaches the threshold; coverage = share of \
               rows drafted, precision = share of drafts equal to the model's top-1):\n\n| threshold |";
        let curved: Vec<&Row> = rows.iter().collect();
        for r in &curved {
            md += &format!(" {} coverage / precision |", r.name);
        }
        md += "\n|---|";
        md += &"---|".repeat(curved.len());
        md += "\n";
        for (i, th) in THRESHOLDS.iter().enumerate() {
            md += &format!("| {th} |");
            for r in &curved {
                md += &format!(" {:.3} / {:.3} |", r.curve[i].1, r.curve[i].2);
            }
            md += "\n";
        }
        println!("{md}");
        if let Some(out) = args.get(2) {
            std::fs::write(out, &md)?;
        }
        Ok(())
    }
}
