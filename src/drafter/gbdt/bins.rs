//! Features binned once per fit: at most 255 quantile bins per feature
//! (edges from every (n / 20,000)-th row), stored column-major as
//! bytes, so the split search reads one byte per row and feature.

use rayon::prelude::*;

/// Column-major binned features.
pub(super) struct Binned {
    pub edges: Vec<Vec<f32>>,
    pub cols: Vec<Vec<u8>>,
}

pub(super) fn bin_features(rows: &[Vec<f32>], max_bins: usize) -> Binned {
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
