//! Counters of speculative decoding: per-stage [`SpecStats`] of a sequence
//! (summed over sequences by the engine's metrics and the benchmarks), and
//! the histogram of the margins the exit cascade gave the drafts.

/// Per-stage counters of speculative decoding.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct SpecStats {
    pub steps: u64,
    pub drafted: u64,
    pub accepted: u64,
    /// Draft tokens dropped by each non-final exit.
    pub truncated_by_exit: Vec<u64>,
    /// Per non-final exit, the margins it gave the drafts the final head
    /// then judged (cascade only).
    pub exit_margins: Vec<MarginHist>,
    /// Accepted counts by draft position (index 0 = first draft).
    pub accepted_by_pos: Vec<u64>,
    pub drafted_by_pos: Vec<u64>,
    /// Verify steps whose drafts branched (a tree, not a chain).
    pub tree_steps: u64,
    /// Verify steps that accepted a draft other than its parent's first child.
    pub accepted_later_child: u64,
    /// Steps where the drafter proposed nothing (`__MODEL__` or low confidence).
    pub no_draft_steps: u64,
    /// Steps that drafted with an early exit (LayerSkip), their drafts and
    /// how many of those the final head accepted.
    pub exit_draft_steps: u64,
    pub exit_drafted: u64,
    pub exit_accepted: u64,
    /// Seconds spent drafting (features, the drafter's trees, tree growth).
    pub draft_secs: f64,
    /// Verify steps taken alone, by rows (index r - 1), and their seconds
    /// (forward and commit): what a row costs in the decode loop.
    pub timed_steps_by_rows: Vec<u64>,
    pub step_secs_by_rows: Vec<f64>,
}

impl SpecStats {
    pub fn add(&mut self, o: &SpecStats) {
        self.steps += o.steps;
        self.drafted += o.drafted;
        self.accepted += o.accepted;
        self.no_draft_steps += o.no_draft_steps;
        self.tree_steps += o.tree_steps;
        self.accepted_later_child += o.accepted_later_child;
        self.exit_draft_steps += o.exit_draft_steps;
        self.exit_drafted += o.exit_drafted;
        self.exit_accepted += o.exit_accepted;
        self.draft_secs += o.draft_secs;
        add_vec(&mut self.truncated_by_exit, &o.truncated_by_exit);
        if self.exit_margins.len() < o.exit_margins.len() {
            self.exit_margins
                .resize(o.exit_margins.len(), MarginHist::default());
        }
        for (a, b) in self.exit_margins.iter_mut().zip(&o.exit_margins) {
            add_vec(&mut a.accepted, &b.accepted);
            add_vec(&mut a.first_rejected, &b.first_rejected);
        }
        add_vec(&mut self.accepted_by_pos, &o.accepted_by_pos);
        add_vec(&mut self.drafted_by_pos, &o.drafted_by_pos);
        add_vec(&mut self.timed_steps_by_rows, &o.timed_steps_by_rows);
        if self.step_secs_by_rows.len() < o.step_secs_by_rows.len() {
            self.step_secs_by_rows
                .resize(o.step_secs_by_rows.len(), 0.0);
        }
        for (a, b) in self.step_secs_by_rows.iter_mut().zip(&o.step_secs_by_rows) {
            *a += b;
        }
    }

    /// Counts a verify step of `rows` rows taken alone in `secs`.
    pub(super) fn time_step(&mut self, rows: usize, secs: f64) {
        if rows == 0 {
            return;
        }
        if self.timed_steps_by_rows.len() < rows {
            self.timed_steps_by_rows.resize(rows, 0);
            self.step_secs_by_rows.resize(rows, 0.0);
        }
        self.timed_steps_by_rows[rows - 1] += 1;
        self.step_secs_by_rows[rows - 1] += secs;
    }

    /// The mean time of a verify step of r = 1.. rows taken alone relative
    /// to a one-row step's (None where no such step was timed).
    pub fn realized_verify_costs(&self) -> Vec<Option<f64>> {
        let mean = |r: usize| {
            let n = *self.timed_steps_by_rows.get(r)?;
            (n > 0).then(|| self.step_secs_by_rows[r] / n as f64)
        };
        let Some(one) = mean(0) else {
            return vec![];
        };
        (0..self.timed_steps_by_rows.len())
            .map(|r| mean(r).map(|m| m / one))
            .collect()
    }

    /// Counts a verify step whose drafts sat at `depths` (1 = right after
    /// the pending token), of which `accepted` were accepted, one of them
    /// not its parent's first child when `later_child`; a step without
    /// drafts counts as a no-draft step when `could_draft`. Returns the
    /// deepest draft's depth (0: none).
    pub(super) fn record(
        &mut self,
        depths: Vec<usize>,
        accepted: usize,
        later_child: bool,
        could_draft: bool,
    ) -> usize {
        self.steps += 1;
        self.drafted += depths.len() as u64;
        self.accepted += accepted as u64;
        if depths.is_empty() && could_draft {
            self.no_draft_steps += 1;
        }
        let deepest = depths.iter().copied().max().unwrap_or(0);
        if self.drafted_by_pos.len() < deepest {
            self.drafted_by_pos.resize(deepest, 0);
            self.accepted_by_pos.resize(deepest, 0);
        }
        for &d in &depths {
            self.drafted_by_pos[d - 1] += 1;
        }
        for d in 0..accepted {
            self.accepted_by_pos[d] += 1;
        }
        if depths.iter().enumerate().any(|(i, &d)| d != i + 1) {
            self.tree_steps += 1;
        }
        self.accepted_later_child += u64::from(later_child);
        deepest
    }

    /// Counts a verify step of `drafted` drafts by an early exit
    /// (LayerSkip), `accepted` of them accepted.
    pub(super) fn record_exit_drafts(&mut self, drafted: usize, accepted: usize) {
        self.steps += 1;
        self.exit_draft_steps += 1;
        self.exit_drafted += drafted as u64;
        self.exit_accepted += accepted as u64;
    }
}

/// Margins ([`exit_margin`]) an exit gave the drafts that reached it, by
/// what the final head then did with each: accepted it (a cut there would
/// have lost tokens) or rejected it first (a cut there saves the rows
/// after). Drafts after the first rejected one are not counted: a cut
/// there changes nothing. Bin i holds margins in
/// `MARGIN_BIN_LO + i * MARGIN_BIN .. + MARGIN_BIN` (the ends open).
///
/// [`exit_margin`]: super::exit_margin
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct MarginHist {
    pub accepted: Vec<u64>,
    pub first_rejected: Vec<u64>,
}

/// Width of a [`MarginHist`] bin, in logits (scripts/exit_margins.py
/// repeats it and [`MARGIN_BIN_LO`]).
pub const MARGIN_BIN: f32 = 0.5;
/// Where the first bin starts; margins below it count in the first bin.
pub const MARGIN_BIN_LO: f32 = -8.0;
const MARGIN_BINS: usize = 32;

impl MarginHist {
    fn bin(margin: f32) -> usize {
        let i = ((margin - MARGIN_BIN_LO) / MARGIN_BIN).floor();
        i.clamp(0.0, (MARGIN_BINS - 1) as f32) as usize
    }

    /// Counts `margins` (row i's for draft i) of a step that accepted
    /// `accepted` drafts.
    pub(super) fn record(&mut self, margins: &[f32], accepted: usize) {
        self.accepted.resize(MARGIN_BINS, 0);
        self.first_rejected.resize(MARGIN_BINS, 0);
        for (i, m) in margins.iter().enumerate().take(accepted + 1) {
            match i < accepted {
                true => self.accepted[Self::bin(*m)] += 1,
                false => self.first_rejected[Self::bin(*m)] += 1,
            }
        }
    }
}

fn add_vec(a: &mut Vec<u64>, b: &[u64]) {
    if a.len() < b.len() {
        a.resize(b.len(), 0);
    }
    for (x, y) in a.iter_mut().zip(b) {
        *x += y;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn margins_count_accepted_drafts_and_the_first_rejected_only() {
        let mut h = MarginHist::default();
        h.record(&[-3.0, 0.2, 1.1, 5.0], 2);
        let at = |v: &[u64], m: f32| v[MarginHist::bin(m)];
        assert_eq!(at(&h.accepted, -3.0), 1);
        assert_eq!(at(&h.accepted, 0.2), 1);
        assert_eq!(at(&h.first_rejected, 1.1), 1);
        assert_eq!(h.accepted.iter().sum::<u64>(), 2);
        assert_eq!(
            h.first_rejected.iter().sum::<u64>(),
            1,
            "5.0 came after the first rejection"
        );
        // Out-of-range margins land in the end bins.
        h.record(&[-100.0, 100.0], 1);
        assert_eq!(h.accepted[0], 1);
        assert_eq!(*h.first_rejected.last().unwrap(), 1);
    }
}
