//! The drafter's fit on labelled rows, the choice of its draft threshold
//! by replayed speedup, the offline replay against prompt lookup and an
//! oracle, the `--drafter-ablation` fits, and the report that records them.

use std::time::Instant;

use super::{Continuation, DrafterOptions, Rows};
use crate::drafter::features::FAMILIES;
use crate::drafter::gbdt::{Gbdt, GbdtParams};
use crate::drafter::{self, Drafter, Replay};

/// Fit: the trees on the fit rows, early-stopped on the validation rows.
/// Returns the seconds it took.
pub(super) fn fit(d: &mut Drafter, rows: &Rows, o: &DrafterOptions) -> anyhow::Result<f64> {
    let t0 = Instant::now();
    let params = GbdtParams {
        rounds: o.drafter_rounds,
        max_depth: o.drafter_depth,
        ..Default::default()
    };
    let (tr, va) = (&rows.train, &rows.valid);
    d.gbdt = Gbdt::fit(&tr.0, &tr.1, d.n_classes(), (&va.0, &va.1), &params)?;
    Ok(t0.elapsed().as_secs_f64())
}

/// The draft thresholds tried.
const THRESHOLDS: [f32; 8] = [0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9];

/// Threshold: sets the one with the best replayed speedup on the held-out
/// continuations (0.5 when none beats 0.0); returns the replay of each.
pub(super) fn choose_threshold(
    d: &mut Drafter,
    tune: &[Continuation],
    cost: &dyn Fn(usize) -> f64,
) -> Vec<serde_json::Value> {
    let mut curve = Vec::new();
    let mut best = (0.0f64, 0.5f32);
    for th in THRESHOLDS {
        let r = replay_tree(d, tune, th, cost);
        curve.push(serde_json::json!({"threshold": th, "precision": r.precision(), "drafts_per_step": r.drafted as f64 / r.steps.max(1) as f64, "tokens_per_step": r.tokens_per_step(), "speedup": r.speedup()}));
        if r.speedup() > best.0 {
            best = (r.speedup(), th);
        }
    }
    d.threshold = best.1;
    curve
}

/// Report: what labelling, the fit and the threshold choice measured, and
/// the val-split replay; `secs` is (labelling, fit).
pub(super) fn report(
    d: &Drafter,
    rows: &Rows,
    secs: (f64, f64),
    costs: &[f64],
    curve: Vec<serde_json::Value>,
    val_replay: serde_json::Value,
) -> serde_json::Value {
    serde_json::json!({
        "rows": rows.len(), "rows_from_continuations": rows.from_continuations,
        "label_secs": secs.0, "fit_secs": secs.1,
        "trees": d.gbdt.n_trees(), "valid_loss": d.gbdt.valid_loss, "threshold": d.threshold,
        "verify_cost": costs, "threshold_curve_tune": curve, "val_replay": val_replay,
        "feature_importance": feature_importance(&d.gbdt),
    })
}

/// Each feature's share of the trees' split gain, largest first.
fn feature_importance(g: &Gbdt) -> Vec<(String, f64)> {
    let total: f64 = g.importance.iter().sum::<f64>().max(1e-12);
    let mut v: Vec<(String, f64)> = crate::drafter::features::FEATURE_NAMES
        .iter()
        .zip(&g.importance)
        .map(|(n, g)| (n.to_string(), g / total))
        .collect();
    v.sort_by(|a, b| b.1.total_cmp(&a.1));
    v
}

/// Replays the tree drafter at `threshold` over continuations.
pub fn replay_tree(
    d: &Drafter,
    conts: &[Continuation],
    threshold: f32,
    cost: &dyn Fn(usize) -> f64,
) -> Replay {
    let mut total = Replay::default();
    for c in conts {
        let gen_start = c.prompt - 1;
        let r = drafter::replay(
            &c.tokens,
            c.prompt,
            |ctx, vi| {
                let v = c
                    .verified
                    .get(vi.saturating_sub(gen_start + 1))
                    .copied()
                    .unwrap_or_default();
                d.propose_with(ctx, d.k_max, v, threshold)
                    .into_iter()
                    .map(|x| x.token)
                    .collect()
            },
            cost,
        );
        total.add(&r);
    }
    total
}

/// Tree vs prompt lookup vs oracle on the same continuations.
pub fn replay_report(
    d: &Drafter,
    conts: &[Continuation],
    cost: &dyn Fn(usize) -> f64,
) -> serde_json::Value {
    let tree = replay_tree(d, conts, d.threshold, cost);
    let mut lookup = Replay::default();
    let mut oracle = Replay::default();
    for c in conts {
        lookup.add(&drafter::replay(
            &c.tokens,
            c.prompt,
            |ctx, _| drafter::prompt_lookup(ctx, d.k_max, 2),
            cost,
        ));
        let seq = &c.tokens;
        oracle.add(&drafter::replay(
            seq,
            c.prompt,
            |ctx, _| seq[ctx.len()..(ctx.len() + d.k_max).min(seq.len())].to_vec(),
            cost,
        ));
    }
    let row = |r: &Replay| serde_json::json!({"tokens_per_step": r.tokens_per_step(), "speedup": r.speedup(), "precision": r.precision(), "drafted": r.drafted, "accepted": r.accepted, "tokens": r.tokens});
    serde_json::json!({"tree": row(&tree), "prompt_lookup": row(&lookup), "oracle": row(&oracle), "tree_share_of_oracle": (tree.speedup() - 1.0) / (oracle.speedup() - 1.0).max(1e-9)})
}

/// `--drafter-ablation`: for each feature family in turn, a drafter fitted
/// on the same rows without it, its threshold chosen on the tune
/// continuations, replayed on the val ones (greedy, tree drafter as a
/// chain), next to the full drafter's figures.
pub(super) fn ablation(
    d: &Drafter,
    rows: &Rows,
    tune: &[Continuation],
    vconts: &[Continuation],
    cost: &dyn Fn(usize) -> f64,
    o: &DrafterOptions,
) -> anyhow::Result<serde_json::Value> {
    let figures = |x: &Drafter| {
        let r = replay_tree(x, vconts, x.threshold, cost);
        serde_json::json!({"tokens_per_step": r.tokens_per_step(), "speedup": r.speedup(),
            "precision": r.precision(), "threshold": x.threshold,
            "valid_loss": x.gbdt.valid_loss.last()})
    };
    let mut out = vec![serde_json::json!({"without": "nothing", "replay": figures(d)})];
    for (name, cols) in FAMILIES {
        if o.drafter_without.iter().any(|f| f == name) {
            continue;
        }
        let mut x = d.clone();
        let mut r = rows.clone();
        r.hold_at_zero(cols);
        fit(&mut x, &r, o)?;
        choose_threshold(&mut x, tune, cost);
        let row = serde_json::json!({"without": name, "replay": figures(&x)});
        eprintln!("drafter ablation: {row}");
        out.push(row);
    }
    Ok(serde_json::Value::Array(out))
}
