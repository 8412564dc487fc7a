//! Calibration of sampled drafts: the chance that a child of a sampled
//! draft tree is the model's keyed sample, given the child's rank among the
//! Gumbel scores of the drafter's estimate and its tempered probability.
//!
//! The tree sizes itself by these chances (a row is drafted where its
//! expected tokens pay for its cost), so they must be honest: a table per
//! sampling setting, fitted on the train split (`gpt-serve
//! calibrate-drafter`), and the calibration error measured on held-out
//! text. Without a table the tempered probability itself stands in.

use serde::{Deserialize, Serialize};

/// Ranks a table tells apart (the outside mass takes a rank too); a child
/// ranked lower is not drafted.
pub const RANKS: usize = 4;
/// Equal-width bins of the tempered probability.
pub const BINS: usize = 10;
/// Pseudo-count pulling a sparse cell toward its bin's tempered
/// probability (set by hand: a cell needs a few dozen samples to move far).
const PRIOR_WEIGHT: f64 = 4.0;

/// One sampled child as the fit sees it: its rank, its tempered
/// probability, and whether it was the model's token.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Observation {
    pub rank: usize,
    pub tempered: f32,
    pub hit: bool,
}

/// Hit rates of one sampling setting: `hit[rank][bin]`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct CalibrationTable {
    pub temperature: f32,
    pub top_p: f32,
    pub hit: Vec<Vec<f32>>,
    /// Observations behind each cell.
    pub count: Vec<Vec<u32>>,
}

/// The tables of every fitted setting; empty (an older drafter file):
/// uncalibrated.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct Calibration {
    pub tables: Vec<CalibrationTable>,
}

fn bin(tempered: f32) -> usize {
    ((tempered.clamp(0.0, 1.0) * BINS as f32) as usize).min(BINS - 1)
}

impl CalibrationTable {
    /// Hit rates per (rank, bin) from `obs`, each cell pulled toward its
    /// bin's mean tempered probability by [`PRIOR_WEIGHT`] pseudo-counts.
    pub fn fit(obs: &[Observation], temperature: f32, top_p: f32) -> CalibrationTable {
        let mut hits = [[0f64; BINS]; RANKS];
        let mut n = [[0u32; BINS]; RANKS];
        for o in obs.iter().filter(|o| o.rank < RANKS) {
            let b = bin(o.tempered);
            hits[o.rank][b] += f64::from(u8::from(o.hit));
            n[o.rank][b] += 1;
        }
        let hit = (0..RANKS)
            .map(|r| {
                (0..BINS)
                    .map(|b| {
                        let prior = (b as f64 + 0.5) / BINS as f64;
                        let k = f64::from(n[r][b]);
                        ((hits[r][b] + PRIOR_WEIGHT * prior) / (k + PRIOR_WEIGHT)) as f32
                    })
                    .collect()
            })
            .collect();
        CalibrationTable {
            temperature,
            top_p,
            hit,
            count: n.iter().map(|r| r.to_vec()).collect(),
        }
    }

    fn lookup(&self, rank: usize, tempered: f32) -> Option<f32> {
        self.hit.get(rank)?.get(bin(tempered)).copied()
    }
}

impl Calibration {
    /// The chance that a child of `rank` with tempered probability
    /// `tempered` is the model's sample at `temperature` and `top_p`: the
    /// nearest fitted setting's cell, else `tempered` itself. None past the
    /// ranks a table tells apart.
    pub fn hit_prob(
        &self,
        temperature: f32,
        top_p: f32,
        rank: usize,
        tempered: f32,
    ) -> Option<f32> {
        if rank >= RANKS {
            return None;
        }
        let distance =
            |t: &CalibrationTable| (t.temperature - temperature).abs() + (t.top_p - top_p).abs();
        let nearest = self
            .tables
            .iter()
            .min_by(|a, b| distance(a).total_cmp(&distance(b)));
        match nearest {
            Some(t) => t.lookup(rank, tempered),
            None => Some(tempered.clamp(0.0, 1.0)),
        }
    }

    /// Checks every table: cells are probabilities, shapes are RANKS x BINS.
    pub fn check(&self) -> Result<(), String> {
        for t in &self.tables {
            let shape_ok = t.hit.len() == RANKS && t.hit.iter().all(|r| r.len() == BINS);
            if !shape_ok {
                return Err(format!(
                    "calibration table at temperature {} must be {RANKS} ranks x {BINS} bins",
                    t.temperature
                ));
            }
            if t.hit.iter().flatten().any(|p| !(0.0..=1.0).contains(p)) {
                return Err(format!(
                    "calibration table at temperature {} holds a hit rate outside [0, 1]",
                    t.temperature
                ));
            }
        }
        Ok(())
    }
}

/// One row of a reliability table: predictions in `[lo, hi)`, how many,
/// their mean, and the share that hit.
#[derive(Serialize, Clone, Debug, PartialEq)]
pub struct Reliability {
    pub lo: f32,
    pub hi: f32,
    pub n: usize,
    pub predicted: f64,
    pub observed: f64,
}

/// Expected calibration error of `(predicted, hit)` pairs over [`BINS`]
/// equal-width bins (the bins' |mean predicted - share hit| weighted by
/// their counts), and the reliability table.
pub fn expected_calibration_error(pairs: &[(f32, bool)]) -> (f64, Vec<Reliability>) {
    let mut rows: Vec<Reliability> = (0..BINS)
        .map(|b| Reliability {
            lo: b as f32 / BINS as f32,
            hi: (b + 1) as f32 / BINS as f32,
            n: 0,
            predicted: 0.0,
            observed: 0.0,
        })
        .collect();
    for &(p, hit) in pairs {
        let r = &mut rows[bin(p)];
        r.n += 1;
        r.predicted += f64::from(p);
        r.observed += f64::from(u8::from(hit));
    }
    let mut ece = 0.0;
    for r in rows.iter_mut().filter(|r| r.n > 0) {
        r.predicted /= r.n as f64;
        r.observed /= r.n as f64;
        ece += r.n as f64 * (r.predicted - r.observed).abs();
    }
    (ece / pairs.len().max(1) as f64, rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obs(rank: usize, tempered: f32, hit: bool) -> Observation {
        Observation {
            rank,
            tempered,
            hit,
        }
    }

    #[test]
    fn a_fitted_table_moves_a_well_sampled_cell_to_its_hit_rate() {
        // Rank 0 at tempered 0.35 hits 90 of 100 times; rank 1 never hits.
        let mut o: Vec<Observation> = (0..100).map(|i| obs(0, 0.35, i < 90)).collect();
        o.extend((0..100).map(|_| obs(1, 0.35, false)));
        let cal = Calibration {
            tables: vec![CalibrationTable::fit(&o, 0.8, 0.95)],
        };
        let p0 = cal.hit_prob(0.8, 0.95, 0, 0.31).unwrap();
        let p1 = cal.hit_prob(0.8, 0.95, 1, 0.31).unwrap();
        assert!((0.85..0.9).contains(&p0), "{p0}");
        assert!(p1 < 0.05, "{p1}");
        // An empty cell keeps its bin's tempered probability.
        assert_eq!(cal.hit_prob(0.8, 0.95, 2, 0.72), Some(0.75));
        assert_eq!(cal.hit_prob(0.8, 0.95, RANKS, 0.5), None);
    }

    #[test]
    fn without_tables_the_tempered_probability_stands_in() {
        assert_eq!(Calibration::default().hit_prob(1.0, 1.0, 0, 0.4), Some(0.4));
    }

    #[test]
    fn the_nearest_setting_answers() {
        let hot = CalibrationTable::fit(&[obs(0, 0.5, true); 50], 1.0, 1.0);
        let warm = CalibrationTable::fit(&[obs(0, 0.5, false); 50], 0.8, 0.95);
        let cal = Calibration {
            tables: vec![hot, warm],
        };
        assert!(cal.hit_prob(0.7, 0.95, 0, 0.5).unwrap() < 0.1);
        assert!(cal.hit_prob(1.1, 1.0, 0, 0.5).unwrap() > 0.9);
    }

    #[test]
    fn calibration_error_is_zero_when_predictions_match_hit_rates_and_large_when_not() {
        let good: Vec<(f32, bool)> = (0..100).map(|i| (0.25, i % 4 == 0)).collect();
        assert!(expected_calibration_error(&good).0 < 1e-6);
        let bad: Vec<(f32, bool)> = (0..100).map(|_| (0.9, false)).collect();
        let (ece, rows) = expected_calibration_error(&bad);
        assert!((ece - 0.9).abs() < 1e-6, "{ece}");
        assert_eq!(rows[9].n, 100);
    }

    #[test]
    fn a_table_of_the_wrong_shape_is_refused_by_name() {
        let mut t = CalibrationTable::fit(&[], 0.8, 0.95);
        t.hit.pop();
        let e = Calibration { tables: vec![t] }.check().unwrap_err();
        assert!(
            e.contains("temperature 0.8") && e.contains("4 ranks"),
            "{e}"
        );
    }
}
