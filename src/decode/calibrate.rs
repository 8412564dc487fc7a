//! Fits the draft head's calibration (`model::draft_head::Calibration`):
//! decodes prompts with a proposer that drafts two head tokens at every
//! step, records each draft's margin (`sampling::choose_with_margin`) and
//! whether the model accepted it, and fits the chance of acceptance as
//! logistic in the margin, one fit for first drafts and one for second
//! drafts whose parent was accepted. Decoding is plain decoding's own
//! (the acceptance rule commits the model's tokens), so what is recorded
//! is what the head drafter will see when serving.

use std::sync::{Arc, Mutex};

use anyhow::Context;
use serde_json::json;

use super::proposer::{DraftRequest, Drafts, Proposer, Verdict};
use super::{GenParams, Generator};
use crate::drafter::DraftRule;
use crate::model::draft_head::{Calibration, DraftHead};
use crate::model::forward::Forward;
use crate::sampling::SamplingParams;

/// One verified draft: its depth (1 or 2), its margin, and whether the
/// model drew it.
#[derive(Clone, Copy, Debug)]
pub struct Sample {
    pub depth: usize,
    pub margin: f32,
    pub accepted: bool,
}

/// Drafts two head tokens at every step it can and records them.
struct Recorder<'m> {
    head: &'m DraftHead,
    features: Vec<f32>,
    /// The margins of the last step's drafts.
    pending: Vec<f32>,
    out: Arc<Mutex<Vec<Sample>>>,
}

impl Proposer for Recorder<'_> {
    fn propose(&mut self, req: &DraftRequest) -> Drafts {
        self.pending.clear();
        let DraftRule::Sample {
            seed,
            stream,
            temperature,
            top_p,
        } = req.rule
        else {
            return Drafts::none();
        };
        if self.features.len() != self.head.n_embd() {
            return Drafts::none();
        }
        let sp = SamplingParams {
            temperature,
            top_p,
            seed,
            ..SamplingParams::default()
        };
        let (mut f, mut logits) = (self.features.clone(), vec![0f32; self.head.vocab()]);
        let mut tokens = vec![];
        let mut x = *req.tokens.last().expect("a pending token");
        for depth in 1..=req.room.min(2) {
            let pos = req.tokens.len() + depth - 1;
            let Some((t, margin, next)) = self.head.draw(&f, x, &sp, stream, pos, &mut logits)
            else {
                break;
            };
            f = next;
            tokens.push(t);
            self.pending.push(margin);
            x = t;
        }
        Drafts::chain(tokens, 0.5)
    }

    fn observe(&mut self, v: &Verdict) {
        self.features.clear();
        self.features.extend_from_slice(v.features);
        let mut out = self.out.lock().expect("not poisoned");
        // A second draft tells something only when its parent was accepted.
        for (i, &margin) in self.pending.iter().enumerate().take(v.accepted + 1) {
            out.push(Sample {
                depth: i + 1,
                margin,
                accepted: v.accepted > i,
            });
        }
    }
}

/// The drafts of decoding every prompt at every temperature (seeds fixed
/// by the prompt's index), `new_tokens` each.
pub fn record<M: Forward>(
    model: &M,
    head: &DraftHead,
    prompts: &[Vec<u32>],
    temperatures: &[f32],
    new_tokens: usize,
) -> anyhow::Result<Vec<Sample>> {
    let out = Arc::new(Mutex::new(Vec::new()));
    for &temperature in temperatures {
        anyhow::ensure!(
            temperature > 0.0,
            "calibration temperatures must be above 0, got {temperature}"
        );
        for (i, prompt) in prompts.iter().enumerate() {
            let params = GenParams {
                max_tokens: new_tokens,
                sampling: SamplingParams {
                    temperature,
                    seed: 9000 + i as u64,
                    ..SamplingParams::default()
                },
                speculate: true,
                stop_at_eot: false,
                ..GenParams::default()
            };
            let rec = Recorder {
                head,
                features: vec![],
                pending: vec![],
                out: out.clone(),
            };
            let (mut g, _) = Generator::new(model, Box::new(rec), prompt, params, u32::MAX, None)
                .with_context(|| format!("calibration prompt {i}"))?;
            g.run()?;
        }
    }
    let samples = out.lock().expect("not poisoned").clone();
    Ok(samples)
}

/// Logistic regression of acceptance on the margin (Newton's method on
/// two coefficients); `[intercept, slope]`. None without both outcomes.
pub fn fit_logistic(samples: &[Sample]) -> Option<[f64; 2]> {
    let hits = samples.iter().filter(|s| s.accepted).count();
    if hits == 0 || hits == samples.len() {
        return None;
    }
    let mut w = [0f64; 2];
    for _ in 0..50 {
        let (mut g, mut h) = ([0f64; 2], [[0f64; 2]; 2]);
        for s in samples {
            let x = [1.0, f64::from(s.margin)];
            let p = 1.0 / (1.0 + (-(w[0] + w[1] * x[1])).exp());
            let y = f64::from(u8::from(s.accepted));
            for a in 0..2 {
                g[a] += (y - p) * x[a];
                for b in 0..2 {
                    h[a][b] += p * (1.0 - p) * x[a] * x[b];
                }
            }
        }
        let det = h[0][0] * h[1][1] - h[0][1] * h[1][0];
        if det.abs() < 1e-12 {
            break;
        }
        let step = [
            (h[1][1] * g[0] - h[0][1] * g[1]) / det,
            (h[0][0] * g[1] - h[1][0] * g[0]) / det,
        ];
        w = [w[0] + step[0], w[1] + step[1]];
        if step[0].abs().max(step[1].abs()) < 1e-9 {
            break;
        }
    }
    Some(w)
}

/// Expected calibration error over ten equal-count bins of predicted
/// chance: the count-weighted mean gap between predicted and observed
/// acceptance.
pub fn calibration_error(cal: &Calibration, samples: &[Sample]) -> f64 {
    let mut pairs: Vec<(f64, f64)> = samples
        .iter()
        .map(|s| {
            let y = f64::from(u8::from(s.accepted));
            (cal.accept(s.depth, s.margin), y)
        })
        .collect();
    if pairs.is_empty() {
        return 0.0;
    }
    pairs.sort_by(|a, b| a.0.total_cmp(&b.0));
    let n = pairs.len();
    (0..10)
        .map(|b| &pairs[b * n / 10..(b + 1) * n / 10])
        .filter(|bin| !bin.is_empty())
        .map(|bin| {
            let k = bin.len() as f64;
            let (p, y) = bin.iter().fold((0.0, 0.0), |a, x| (a.0 + x.0, a.1 + x.1));
            (p - y).abs() / k * (k / n as f64)
        })
        .sum()
}

/// Reliability of `cal` on the first drafts of `samples`, by margin
/// decile: each decile's largest margin, its drafts' acceptance and the
/// chance `cal` gave them on average.
pub fn by_margin_decile(cal: &Calibration, samples: &[Sample]) -> Vec<[f64; 3]> {
    let mut first: Vec<&Sample> = samples.iter().filter(|s| s.depth == 1).collect();
    first.sort_by(|a, b| a.margin.total_cmp(&b.margin));
    let n = first.len();
    (0..10)
        .map(|d| &first[d * n / 10..(d + 1) * n / 10])
        .filter(|bin| !bin.is_empty())
        .map(|bin| {
            let k = bin.len() as f64;
            let hit = bin.iter().filter(|s| s.accepted).count() as f64 / k;
            let p = bin.iter().map(|s| cal.accept(1, s.margin)).sum::<f64>() / k;
            [f64::from(bin[bin.len() - 1].margin), hit, p]
        })
        .collect()
}

/// The calibration of `samples`, with its fit figures (counts, acceptance,
/// calibration error on the samples themselves).
pub fn fit(samples: &[Sample]) -> anyhow::Result<Calibration> {
    let at =
        |d: usize| -> Vec<Sample> { samples.iter().filter(|s| s.depth == d).copied().collect() };
    let (first, later) = (at(1), at(2));
    let need = |v: &[Sample], name: &str| {
        fit_logistic(v).with_context(|| {
            format!(
                "{name} drafts: {} recorded, which must include both accepted and rejected ones",
                v.len()
            )
        })
    };
    let mut cal = Calibration {
        first: need(&first, "first")?,
        later: need(&later, "second")?,
        fit: serde_json::Value::Null,
    };
    let rate = |v: &[Sample]| v.iter().filter(|s| s.accepted).count() as f64 / v.len() as f64;
    cal.fit = json!({
        "first_drafts": first.len(),
        "second_drafts": later.len(),
        "first_acceptance": rate(&first),
        "second_acceptance": rate(&later),
        "calibration_error": calibration_error(&cal, samples),
        "first_by_margin_decile": by_margin_decile(&cal, samples),
    });
    Ok(cal)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Samples whose acceptance follows a known logistic curve exactly in
    /// expectation (margins on a grid, outcomes split by the curve).
    fn from_curve(w: [f64; 2], depth: usize) -> Vec<Sample> {
        let mut out = vec![];
        for m in 0..40 {
            let margin = m as f32 * 0.1;
            let p = 1.0 / (1.0 + (-(w[0] + w[1] * f64::from(margin))).exp());
            let hits = (p * 1000.0).round() as usize;
            for i in 0..1000 {
                out.push(Sample {
                    depth,
                    margin,
                    accepted: i < hits,
                });
            }
        }
        out
    }

    #[test]
    fn the_logistic_fit_recovers_the_curve_the_samples_follow() {
        let w = fit_logistic(&from_curve([-0.8, 1.1], 1)).unwrap();
        assert!(
            (w[0] + 0.8).abs() < 0.01 && (w[1] - 1.1).abs() < 0.01,
            "{w:?}"
        );
        let mut all = from_curve([-0.8, 1.1], 1);
        all.extend(from_curve([-1.2, 0.7], 2));
        let cal = fit(&all).unwrap();
        assert!((cal.later[0] + 1.2).abs() < 0.01 && (cal.later[1] - 0.7).abs() < 0.01);
        assert!(calibration_error(&cal, &all) < 0.01);
        // A calibration that ignores the margin is off on the same samples.
        let flat = Calibration {
            first: [0.0, 0.0],
            later: [0.0, 0.0],
            fit: serde_json::Value::Null,
        };
        assert!(calibration_error(&flat, &all) > 0.1);
    }

    #[test]
    fn samples_with_one_outcome_only_cannot_be_fitted_and_say_so() {
        let all: Vec<Sample> = (0..10)
            .map(|i| Sample {
                depth: 1 + i % 2,
                margin: i as f32,
                accepted: true,
            })
            .collect();
        assert!(fit_logistic(&all).is_none());
        let e = fit(&all).unwrap_err().to_string();
        assert!(e.contains("first drafts: 5 recorded"), "{e}");
    }
}
