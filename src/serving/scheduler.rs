//! Builds each engine iteration's row batch from every active sequence
//! (docs/design.md, "The engine: one forward, many rows").
//!
//! A forward has a budget of rows, shared in this order:
//! 1. every decoding sequence's pending row (one token each; when there are
//!    more decoding sequences than rows, a rotating start decides who waits
//!    one iteration, so nobody waits two in a row);
//! 2. prompt chunks, in arrival order, from what is left (a quarter of the
//!    budget is kept for them when decoding sequences would fill it all),
//!    so a long prompt never stalls the others for more than one forward;
//! 3. drafts, by expected gain across all sequences: a draft row is added
//!    while it raises the batch's expected tokens per unit of forward time,
//!    judged by the marginal cost of one more row in *this* batch, read
//!    off the forward's measured cost curve (see [`allocate`], [`Budget`]).
//!
//! Drafting itself costs time whether or not the batch buys its rows, so a
//! sequence whose drafts the batch keeps declining is asked less often
//! ([`DraftBackoff`]).
//!
//! Pure logic over plain numbers: no tensors, no channels.

/// What one active sequence wants from the next forward.
#[derive(Clone, Debug, PartialEq)]
pub enum Want {
    /// `remaining` prompt tokens are not in the cache yet.
    Prefill { remaining: usize },
    /// A verify step: the pending row, then drafts whose expected gains
    /// (probability that the draft and all before it are accepted) are
    /// `gains`, non-increasing.
    Decode { gains: Vec<f32> },
    /// Nothing this iteration (finished, or runs on its own).
    Idle,
}

/// The row budget and cost model of one forward.
#[derive(Clone, Debug)]
pub struct Budget {
    /// Rows per forward at most.
    pub max_rows: usize,
    /// `cost[n]`: the time of a forward of n rows relative to one row
    /// (non-decreasing; index 0..=max_rows).
    cost: Vec<f64>,
    /// One draft of the draft head relative to one row (0 without a head;
    /// the engine measures it at start).
    pub head_draft: f64,
}

impl Budget {
    /// A forward costing `1 + row_cost * (rows - 1)`.
    pub fn linear(max_rows: usize, row_cost: f64) -> Self {
        let cost = (0..=max_rows.max(1))
            .map(|n| 1.0 + row_cost * n.saturating_sub(1) as f64)
            .collect();
        Self {
            max_rows: max_rows.max(1),
            cost,
            head_draft: 0.0,
        }
    }

    /// From measured `(rows, seconds)` points (rows ascending, the first at
    /// 1 row), linearly interpolated and extrapolated, normalised to one
    /// row, and made non-decreasing (a noisy point never makes a row free).
    pub fn measured(max_rows: usize, points: &[(usize, f64)]) -> Self {
        let max_rows = max_rows.max(1);
        let base = points.first().map_or(1.0, |p| p.1).max(1e-12);
        let at = |n: usize| -> f64 {
            let i = points.iter().rposition(|p| p.0 <= n).unwrap_or(0);
            let j = (i + 1).min(points.len() - 1);
            let (i, j) = if i == j && i > 0 { (i - 1, i) } else { (i, j) };
            let ((n0, t0), (n1, t1)) = (points[i], points[j]);
            let slope = if n1 > n0 {
                (t1 - t0) / (n1 - n0) as f64
            } else {
                0.0
            };
            (t0 + slope * (n as f64 - n0 as f64)) / base
        };
        let mut cost = vec![1.0; max_rows + 1];
        for n in 2..=max_rows {
            cost[n] = if points.is_empty() { n as f64 } else { at(n) }.max(cost[n - 1]);
        }
        Self {
            max_rows,
            cost,
            head_draft: 0.0,
        }
    }

    /// Relative cost of a forward of `rows` rows.
    pub fn cost(&self, rows: usize) -> f64 {
        self.cost[rows.clamp(1, self.max_rows)]
    }

    /// The cost of verifying k = 0..=`k_max` drafts (k + 1 rows) relative
    /// to a plain step: the curve a sequence sizes its drafts by.
    pub fn verify_costs(&self, k_max: usize) -> Vec<f64> {
        (0..=k_max).map(|k| self.cost(k + 1)).collect()
    }

    /// What one more row adds to a forward of `rows` rows.
    pub fn marginal(&self, rows: usize) -> f64 {
        self.cost(rows + 1) - self.cost(rows)
    }
}

/// Rows given to each sequence this iteration (index-aligned with `wants`):
/// 0 for none; for a decoding sequence 1 + its drafts; for a prefilling one
/// the chunk length. `turn` rotates who goes first among decoding sequences.
pub fn allocate(wants: &[Want], budget: &Budget, turn: usize) -> Vec<usize> {
    let max_rows = budget.max_rows.max(1);
    let mut rows = vec![0; wants.len()];
    let decoding: Vec<usize> = (0..wants.len())
        .filter(|&i| matches!(wants[i], Want::Decode { .. }))
        .collect();
    let prefill_waiting = wants
        .iter()
        .any(|w| matches!(w, Want::Prefill { remaining } if *remaining > 0));
    // 1. Pending rows, rotating when they do not all fit.
    let reserve = if prefill_waiting { max_rows / 4 } else { 0 };
    let n_dec = decoding.len().min(max_rows - reserve.min(max_rows - 1));
    // Consecutive turns take consecutive windows of the decoding sequences.
    let start = if decoding.is_empty() {
        0
    } else {
        turn.wrapping_mul(n_dec) % decoding.len()
    };
    let chosen: Vec<usize> = (0..n_dec)
        .map(|j| decoding[(start + j) % decoding.len()])
        .collect();
    for &i in &chosen {
        rows[i] = 1;
    }
    let mut left = max_rows - n_dec;
    // 2. Prompt chunks, in arrival order.
    for (i, w) in wants.iter().enumerate() {
        if let Want::Prefill { remaining } = w {
            rows[i] = (*remaining).min(left);
            left -= rows[i];
        }
    }
    // 3. Drafts while they raise expected tokens per unit of time.
    let mut expected = n_dec as f64;
    let mut drafts: Vec<(f32, usize, usize)> = chosen
        .iter()
        .flat_map(|&i| match &wants[i] {
            Want::Decode { gains } => gains.iter().enumerate().map(|(j, g)| (*g, j, i)).collect(),
            _ => vec![],
        })
        .collect();
    // Highest gain first; within a sequence, earlier drafts first.
    drafts.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    for (used, (gain, j, i)) in (max_rows - left..).zip(drafts) {
        let gain = f64::from(gain);
        // With c the marginal cost: (E + g) / (T + c) > E / T  <=>  g T > c E.
        let paid = gain * budget.cost(used) > budget.marginal(used) * expected;
        if left == 0 || !paid || rows[i] != j + 1 {
            break;
        }
        rows[i] += 1;
        left -= 1;
        expected += gain;
    }
    rows
}

/// Iterations a sequence's proposer is skipped at most after its drafts
/// were declined (set by hand: a batch that fills up stops paying for
/// drafting within a few iterations, and one that empties finds drafts
/// again within 16).
pub const MAX_DRAFT_BACKOFF: u32 = 16;

/// When to ask one sequence's proposer for drafts: after an iteration
/// where the batch took none of its drafts (or it offered none), it is
/// skipped for 1, 2, 4, .. up to [`MAX_DRAFT_BACKOFF`] iterations; a draft
/// taken resets it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DraftBackoff {
    skip: u32,
    next: u32,
}

impl DraftBackoff {
    /// Whether to ask the proposer this iteration (counts a skipped one).
    pub fn ask(&mut self) -> bool {
        if self.skip == 0 {
            return true;
        }
        self.skip -= 1;
        false
    }

    /// After an iteration that asked: `taken` draft rows went into the batch.
    pub fn taken(&mut self, taken: usize) {
        if taken > 0 {
            *self = DraftBackoff::default();
        } else {
            self.skip = self.next;
            self.next = (self.next * 2).clamp(1, MAX_DRAFT_BACKOFF);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(gains: &[f32]) -> Want {
        Want::Decode {
            gains: gains.to_vec(),
        }
    }

    fn cheap() -> Budget {
        Budget::linear(64, 0.02)
    }

    #[test]
    fn every_decoding_sequence_gets_its_pending_row_and_drafts_fill_the_rest() {
        let wants = vec![decode(&[0.9, 0.8]), decode(&[]), decode(&[0.5])];
        assert_eq!(allocate(&wants, &cheap(), 0), vec![3, 1, 2]);
    }

    #[test]
    fn a_full_batch_rotates_so_no_sequence_waits_two_iterations_in_a_row() {
        let wants = vec![decode(&[]); 5];
        let b = Budget::linear(3, 0.02);
        let mut waited = [0usize; 5];
        for turn in 0..20 {
            let rows = allocate(&wants, &b, turn);
            assert_eq!(rows.iter().sum::<usize>(), 3);
            for (i, r) in rows.iter().enumerate() {
                waited[i] = if *r == 0 { waited[i] + 1 } else { 0 };
                assert!(
                    waited[i] <= 1,
                    "sequence {i} waited {} iterations",
                    waited[i]
                );
            }
        }
    }

    #[test]
    fn a_long_prompt_is_chunked_and_never_takes_the_decoders_rows() {
        let mut wants = vec![decode(&[0.9, 0.9]); 8];
        wants.push(Want::Prefill { remaining: 1000 });
        let b = Budget::linear(32, 0.02);
        let rows = allocate(&wants, &b, 0);
        assert!(rows[..8].iter().all(|r| *r >= 1), "{rows:?}");
        assert_eq!(rows[8], 24, "the prompt takes what the pending rows leave");
        assert_eq!(rows.iter().sum::<usize>(), 32);
    }

    #[test]
    fn prompts_still_progress_when_decoders_could_fill_the_budget() {
        let mut wants = vec![decode(&[]); 40];
        wants.push(Want::Prefill { remaining: 100 });
        let b = Budget::linear(32, 0.02);
        let rows = allocate(&wants, &b, 7);
        assert_eq!(rows[40], 8, "a quarter of the budget is kept for prompts");
        assert_eq!(rows.iter().sum::<usize>(), 32);
    }

    #[test]
    fn a_draft_row_must_pay_for_its_marginal_cost() {
        // One sequence with a 1% draft on a machine where a row costs 5% of
        // a forward: not worth it. At 0.5% per row it is.
        let wants = vec![decode(&[0.01])];
        let dear = Budget::linear(64, 0.05);
        assert_eq!(allocate(&wants, &dear, 0), vec![1]);
        let cheap = Budget::linear(64, 0.005);
        assert_eq!(allocate(&wants, &cheap, 0), vec![2]);
    }

    #[test]
    fn drafts_compete_across_sequences_by_gain_and_stay_prefixes() {
        let wants = vec![decode(&[0.9, 0.2, 0.1]), decode(&[0.7, 0.6])];
        let b = Budget::linear(5, 0.01);
        // Two pending rows, then the three best drafts: 0.9, 0.7, 0.6.
        assert_eq!(allocate(&wants, &b, 0), vec![2, 3]);
    }

    #[test]
    fn a_measured_curve_is_interpolated_normalised_and_never_decreasing() {
        // 1 row 1 ms, 2 rows 1 ms (free), 8 rows 2.5 ms, a noisy 16 at 2 ms.
        let b = Budget::measured(32, &[(1, 1e-3), (2, 1e-3), (8, 2.5e-3), (16, 2e-3)]);
        assert_eq!(b.cost(1), 1.0);
        assert!((b.cost(2) - 1.0).abs() < 1e-9);
        assert!((b.cost(5) - 1.75).abs() < 1e-9);
        assert!(b.cost(16) >= b.cost(8) && b.cost(32) >= b.cost(16));
        assert!(b.marginal(1) < 1e-9, "a second row was measured free");
    }

    #[test]
    fn k_drafts_cost_what_a_forward_of_k_plus_one_rows_costs() {
        let b = Budget::measured(4, &[(1, 1e-3), (2, 1.5e-3), (4, 3e-3)]);
        assert_eq!(b.verify_costs(5), vec![1.0, 1.5, 2.25, 3.0, 3.0, 3.0]);
    }

    #[test]
    fn a_draft_that_is_free_on_the_curve_is_always_taken() {
        let b = Budget::measured(64, &[(1, 1e-3), (2, 1e-3), (4, 2e-3)]);
        assert_eq!(allocate(&[decode(&[0.05])], &b, 0), vec![2]);
    }

    #[test]
    fn idle_sequences_get_nothing() {
        let wants = vec![Want::Idle, decode(&[]), Want::Prefill { remaining: 0 }];
        assert_eq!(allocate(&wants, &cheap(), 0), vec![0, 1, 0]);
    }

    #[test]
    fn declined_drafts_back_off_exponentially_and_a_taken_draft_resets_it() {
        let mut b = DraftBackoff::default();
        let mut asked = vec![];
        for _ in 0..40 {
            let ask = b.ask();
            asked.push(ask);
            if ask {
                b.taken(0);
            }
        }
        // Asked at iterations 0, 1, then after gaps of 1, 2, 4, 8, 16, 16.
        let at: Vec<usize> = (0..40).filter(|&i| asked[i]).collect();
        assert_eq!(at, vec![0, 1, 3, 6, 11, 20, 37]);
        b.taken(2);
        assert!(
            b.ask() && b.ask(),
            "a taken draft asks every iteration again"
        );
    }
}
