//! Where draft tokens come from: the [`Proposer`] trait and one file per
//! drafter (plain decoding, the tree drafter, prompt lookup, the oracle,
//! the cross-request continuation cache in front of another drafter).
//!
//! A proposer is per sequence and owns whatever state it learns from
//! (the tree drafter's acceptance estimate and the final head's
//! statistics where it last committed): the generator asks it for drafts
//! before each verify step ([`Proposer::propose`]) and tells it what the
//! final head made of them after ([`Proposer::observe`]). It never sees the
//! model or the cache, so the acceptance rule alone decides what is
//! committed, and any proposer yields the tokens plain decoding yields.
//!
//! To add a drafter: a new file here with a struct that implements
//! [`Proposer`], and its `pub mod` line below (docs/design.md, "Recipe: add a drafter").

pub mod head;
pub mod lookup;
pub mod oracle;
pub mod plain;
pub mod suffix;
pub mod tree;

use std::sync::{Arc, Mutex, MutexGuard};

use crate::decode::suffix_cache::SuffixCache;
use crate::drafter::{DraftRule, Drafter};
use crate::model::draft_head::DraftHead;
use crate::model::forward::Tree;

pub use head::{measure_draft_cost, HeadDrafter};
pub use lookup::Lookup;
pub use oracle::Oracle;
pub use plain::Plain;
pub use suffix::CacheOrFallback;
pub use tree::TreeDrafter;

/// The tree drafter when there is one (a checkpoint's), else plain
/// decoding: what the server and `sample` decode with. It sizes drafts by
/// `verify_costs` (k = 0.. drafts, relative to a plain step) when given,
/// else by the curve stored with the drafter.
pub fn tree_or_plain(
    drafter: Option<&Drafter>,
    verify_costs: Option<Vec<f64>>,
) -> Box<dyn Proposer + '_> {
    match (drafter, verify_costs) {
        (Some(d), Some(c)) => Box::new(TreeDrafter::with_costs(d, c)),
        (Some(d), None) => Box::new(TreeDrafter::new(d)),
        (None, _) => Box::new(Plain),
    }
}

/// What drafting costs on the machine that decodes, relative to a plain
/// one-row step.
#[derive(Clone, Debug, PartialEq)]
pub struct Costs {
    /// Verifying k = 0.. drafts.
    pub verify: Vec<f64>,
    /// One draft of the draft head (0 without one).
    pub head_draft: f64,
}

/// What a server drafts with: the checkpoint's tree drafter and its draft
/// head, either of which may be absent.
#[derive(Default)]
pub struct Drafters {
    pub tree: Option<Drafter>,
    pub head: Option<DraftHead>,
}

impl From<Option<Drafter>> for Drafters {
    fn from(tree: Option<Drafter>) -> Self {
        Drafters { tree, head: None }
    }
}

impl Drafters {
    /// The longest draft either drafts (the tree drafter's `k_max`, else
    /// [`HEAD_K_MAX`]); 0 without drafters.
    pub fn k_max(&self) -> usize {
        match (&self.tree, &self.head) {
            (Some(d), _) => d.k_max,
            (None, Some(_)) => HEAD_K_MAX,
            (None, None) => 0,
        }
    }
}

/// The longest chain the draft head drafts when there is no tree drafter
/// to set it: as long as the shipped drafter's `k_max`.
pub const HEAD_K_MAX: usize = 8;

/// What the server decodes with: the draft head when sampling (wrapping
/// [`tree_or_plain`] for greedy requests), both sized by the engine's
/// measured `verify_costs`, the head by its engine's `clock` once that has
/// measured the loop, behind the shared continuation cache when
/// there is one with a budget.
pub fn serving<'m>(
    drafters: &'m Drafters,
    costs: Costs,
    clock: &SharedClock,
    cache: Option<&Arc<SuffixCache>>,
) -> Box<dyn Proposer + 'm> {
    let base = tree_or_plain(drafters.tree.as_ref(), Some(costs.verify.clone()));
    let base: Box<dyn Proposer + 'm> = match &drafters.head {
        Some(h) => Box::new(HeadDrafter::new(h, costs, base).with_clock(clock.clone())),
        None => base,
    };
    match cache {
        Some(c) if c.budget() > 0 => Box::new(CacheOrFallback::new(c.clone(), base)),
        _ => base,
    }
}

/// A source of draft tokens for one sequence.
pub trait Proposer: Send {
    /// Drafts for the next verify step: at most `req.room` tokens after
    /// `req.tokens` (its last token is the pending one). Drafts that are
    /// wrong cost only speed.
    fn propose(&mut self, req: &DraftRequest) -> Drafts;

    /// What the final head made of the last verify step (called once per
    /// verify step, drafts or not); by default nothing is learnt.
    fn observe(&mut self, _verdict: &Verdict) {}

    /// Tokens the exit cascade scores as rivals of the drafts, besides the
    /// other drafts (the tree drafter's classes); by default none.
    fn rivals(&self) -> &[u32] {
        &[]
    }

    /// True for a proposer that never drafts (plain decoding): its steps
    /// are not counted as steps where drafting gave nothing.
    fn is_plain(&self) -> bool {
        false
    }
}

/// What the generator knows when it asks for drafts.
pub struct DraftRequest<'a> {
    /// Every token so far: the prompt, then the committed tokens; the last
    /// is pending (not yet in the cache).
    pub tokens: &'a [u32],
    pub prompt_len: usize,
    /// Drafts the step can take at most (max_tokens, the context window,
    /// the batch's rows).
    pub room: usize,
    /// Stop where a draft's expected gain (its path probability) falls
    /// below this: a draft row must pay for its cost in the batch.
    pub min_gain: f32,
    /// What one one-row step of time is worth in tokens in this batch
    /// ([`RowPrice::time_value`]): a proposer whose drafting takes time
    /// prices it with this.
    pub time_value: f32,
    /// The drafts may branch (asked for, for this rule: `draft_tree` when
    /// greedy, `sampled_trees` when sampling; and the backend takes trees).
    pub branch: bool,
    /// How to draft for this sequence's sampling: its most likely token
    /// (greedy), or the sample of its own estimate with the sampler's
    /// keyed noise.
    pub rule: DraftRule,
}

/// The least weight of the newest measurement in [`StepClock`]'s
/// averages: each is the plain mean of its first 32 measurements, then a
/// running average that still follows a machine whose load changes. Set
/// by hand: one step slowed by the shared machine moves a figure by at
/// most a thirty-second once measured, where an average weighted 0.2 from
/// the first step priced a q8_0 second row anywhere from 0.2 to 0.8 of a
/// step within one 128-token sequence (`gpt-serve bench`, AVX2).
const CLOCK_MIN_WEIGHT: f64 = 1.0 / 32.0;

/// A running mean: plain for its first samples, then weighted
/// [`CLOCK_MIN_WEIGHT`].
#[derive(Clone, Copy, Debug, Default)]
struct Mean {
    n: u32,
    value: f64,
}

impl Mean {
    fn add(&mut self, x: f64) {
        self.add_weighted(x, CLOCK_MIN_WEIGHT);
    }

    /// Plain for the first `1 / least` samples, then weighted `least`.
    fn add_weighted(&mut self, x: f64, least: f64) {
        self.n = self.n.saturating_add(1);
        let w = (1.0 / f64::from(self.n)).max(least);
        self.value += w * (x - self.value);
    }

    fn get(&self) -> Option<f64> {
        (self.n > 0).then_some(self.value)
    }
}

/// What drafting costs where it happens: the decode loop's own verify
/// steps timed by their rows, and its drafts, as sequences decode alone.
/// The engine's start-up figures ([`Costs`]: one forward at a fixed
/// context, best of a few rounds, weights warm) came out low in the loop,
/// where the head's and the model's weights take turns in the caches: with
/// q8_0 weights a second row cost 0.45 of a step there against 0.36
/// measured at start on AVX-512, 0.66-0.83 against 0.36 on AVX2; a head
/// draft 0.19 against 0.14 (docs/benchmarks.md, "Calibrated head drafts",
/// "One step clock per engine"). Each figure is the start-up one until
/// the loop has measured it; one clock serves every sequence of an engine
/// ([`SharedClock`]), so a request of 16 tokens is priced by what the
/// requests before it measured.
#[derive(Clone, Debug, Default)]
pub struct StepClock {
    /// Seconds of a verify step of r rows at index r - 1.
    steps: Vec<Mean>,
    /// Seconds of one draft.
    draft: Mean,
}

impl StepClock {
    /// A verify step of `rows` rows took `secs`.
    pub fn step(&mut self, rows: usize, secs: f64) {
        if rows == 0 || !secs.is_finite() {
            return;
        }
        if self.steps.len() < rows {
            self.steps.resize(rows, Mean::default());
        }
        self.steps[rows - 1].add(secs);
    }

    /// `drafts` drafts took `secs` in all.
    pub fn drafted(&mut self, drafts: usize, secs: f64) {
        if drafts > 0 && secs.is_finite() {
            self.draft.add(secs / drafts as f64);
        }
    }

    fn one_row(&self) -> Option<f64> {
        self.steps.first().and_then(Mean::get).filter(|&s| s > 0.0)
    }

    /// The cost of verifying `k` drafts relative to a plain step (None
    /// past `prior`'s curve). Measured where the loop has timed both
    /// steps; an unmeasured size takes `prior`'s extra cost over one row,
    /// scaled as the largest measured smaller size was to its prior; never
    /// below a smaller size's (a noisy reading must not make a row free).
    pub fn verify(&self, k: usize, prior: &Costs) -> Option<f64> {
        let curve = prior.verify.get(..=k)?;
        let Some(one) = self.one_row() else {
            return Some(curve[k]);
        };
        let (mut cost, mut scale) = (1.0f64, 1.0);
        for (j, &p) in curve.iter().enumerate().skip(1) {
            let measured = self.steps.get(j).and_then(Mean::get).map(|s| s / one);
            let c = match measured {
                Some(m) => {
                    if p > 1.0 {
                        scale = ((m - 1.0) / (p - 1.0)).max(0.0);
                    }
                    m
                }
                None => 1.0 + (p - 1.0) * scale,
            };
            cost = cost.max(c);
        }
        Some(cost)
    }

    /// One draft relative to a plain step: measured, else `prior`'s.
    pub fn draft(&self, prior: &Costs) -> f64 {
        match (self.draft.get(), self.one_row()) {
            (Some(d), Some(one)) => d / one,
            _ => prior.head_draft,
        }
    }
}

/// Lone steps in one epoch of [`Gate`].
pub const GATE_EPOCH: u32 = 32;
/// One [`Gate`] epoch in this many goes to the mode that has been slower,
/// to find out whether it still is.
pub const GATE_EXPLORE_EVERY: u64 = 8;
/// Epochs of each mode before [`Gate`] prefers one: with two, f16 runs
/// settled on plain steps in 3 of 16 bench suites where drafting had paid
/// 1.14-1.18x (docs/benchmarks.md, "One step clock per engine").
const GATE_WARMUP: u32 = 4;
/// How much faster plain epochs must be for [`Gate`] to prefer them: a
/// drafting epoch drafts only what its prices say pays, so where the two
/// measure alike it is the drafts' own rule that should decide. With none,
/// f16 bench suites where drafting paid 1.13-1.17x settled on plain steps
/// (0.99x) in 1 of 4 (docs/benchmarks.md, "One step clock per engine").
const GATE_MARGIN: f64 = 0.03;
/// The least weight of an epoch's rate in [`Gate`]'s averages: a machine
/// whose load changes is followed within a few dozen epochs.
const GATE_MIN_WEIGHT: f64 = 1.0 / 16.0;

/// Whether an engine's head drafts at all, decided by what drafting has
/// realized: lone steps come in epochs of [`GATE_EPOCH`], drafting or not,
/// and each epoch's tokens per second (drafting time included) goes to
/// its mode's average. Once each mode has [`GATE_WARMUP`] epochs, the faster one gets
/// the next epoch (drafting unless plain is faster by [`GATE_MARGIN`]),
/// but one in [`GATE_EXPLORE_EVERY`] goes to the slower.
/// The per-draft prices decide which drafts pay from figures that the
/// loop perturbs (the head's weights slow the model's next steps, and
/// timings are noisy on a shared machine); the gate checks the outcome,
/// so speculation that loses costs at most its exploring epochs
/// (docs/benchmarks.md, "One step clock per engine").
#[derive(Clone, Debug)]
pub struct Gate {
    on: bool,
    steps: u32,
    epochs: u64,
    /// Epochs that drafted.
    drafting: u64,
    tokens: f64,
    secs: f64,
    /// Tokens per second of drafting epochs (`[1]`) and plain ones.
    rate: [Mean; 2],
}

impl Default for Gate {
    fn default() -> Self {
        Gate {
            on: true,
            steps: 0,
            epochs: 0,
            drafting: 0,
            tokens: 0.0,
            secs: 0.0,
            rate: [Mean::default(); 2],
        }
    }
}

impl Gate {
    /// Whether this epoch drafts.
    pub fn allows(&self) -> bool {
        self.on
    }

    /// A lone step committed `tokens` in `secs`, drafting included.
    pub fn record(&mut self, tokens: usize, secs: f64) {
        if !secs.is_finite() || secs <= 0.0 {
            return;
        }
        self.tokens += tokens as f64;
        self.secs += secs;
        self.steps += 1;
        if self.steps < GATE_EPOCH {
            return;
        }
        let rate = self.tokens / self.secs;
        self.rate[usize::from(self.on)].add_weighted(rate, GATE_MIN_WEIGHT);
        (self.steps, self.tokens, self.secs) = (0, 0.0, 0.0);
        self.epochs += 1;
        self.drafting += u64::from(self.on);
        self.on = self.next_mode();
    }

    fn next_mode(&self) -> bool {
        let [off, on] = &self.rate;
        if off.n < GATE_WARMUP || on.n < GATE_WARMUP {
            return !self.on;
        }
        let faster = on.value >= off.value * (1.0 - GATE_MARGIN);
        match self.epochs.is_multiple_of(GATE_EXPLORE_EVERY) {
            true => !faster,
            false => faster,
        }
    }

    /// Tokens per second of drafting epochs and of plain ones, once
    /// measured.
    pub fn rates(&self) -> (Option<f64>, Option<f64>) {
        (self.rate[1].get(), self.rate[0].get())
    }

    /// Epochs ended, and how many of them drafted.
    pub fn epochs(&self) -> (u64, u64) {
        (self.epochs, self.drafting)
    }
}

/// What an engine's sequences learn together: one [`StepClock`] (each
/// adds its lone steps and its drafts, and each is priced by all of them)
/// and one [`Gate`]. Cloning shares it.
#[derive(Clone, Debug, Default)]
pub struct SharedClock(Arc<Mutex<(StepClock, Gate)>>);

impl SharedClock {
    /// The clock, whatever a panicking holder left (a half-made average
    /// only misprices drafts).
    pub fn lock(&self) -> MutexGuard<'_, (StepClock, Gate)> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What a draft must be worth in the batch it joins.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RowPrice {
    /// The least expected gain (path probability) a draft row must have.
    pub min_gain: f32,
    /// Tokens that one one-row step of time is worth: the sequences
    /// decoding over the batch's cost in one-row steps (1 alone).
    pub time_value: f32,
}

impl RowPrice {
    /// A sequence decoding alone: every draft row is priced by the verify
    /// cost curve only.
    pub const ALONE: RowPrice = RowPrice {
        min_gain: 0.0,
        time_value: 1.0,
    };

    /// No draft pays (the sequence is not asked for drafts this step).
    pub const NEVER: RowPrice = RowPrice {
        min_gain: f32::INFINITY,
        time_value: 1.0,
    };
}

/// A step's drafts: tokens, the proposer's probability of each given its
/// parent, and the tree over `[pending, drafts..]` (a chain unless the
/// drafts branch).
pub struct Drafts {
    pub tokens: Vec<u32>,
    pub probs: Vec<f32>,
    pub tree: Tree,
    /// The first draft the proposer held back because drafting did not
    /// pay: [`Verdict::shadow`] gives it back with the committed token, so
    /// the proposer can keep its acceptance estimate current.
    pub shadow: Option<u32>,
}

impl Drafts {
    /// No drafts: a plain step.
    pub fn none() -> Drafts {
        Drafts::chain(vec![], 1.0)
    }

    /// A chain of drafts, each with probability `p`.
    pub fn chain(tokens: Vec<u32>, p: f32) -> Drafts {
        Drafts {
            probs: vec![p; tokens.len()],
            tree: Tree::chain(tokens.len() + 1),
            tokens,
            shadow: None,
        }
    }
}

/// The chain length with the most expected tokens per unit of time: with
/// per-draft acceptance `a`, k drafts yield (1 - a^(k+1)) / (1 - a) tokens
/// for the verify cost `costs[k]` (k = 0.. drafts, relative to a plain
/// step) plus `k * draft_cost` of drafting (same unit); 0 means a plain step.
pub fn best_chain_len(a: f64, costs: &[f64], draft_cost: f64) -> usize {
    let a = a.clamp(0.01, 0.99);
    let mut best = (0, 0.0f64);
    for (k, c) in costs.iter().enumerate() {
        let time = c + k as f64 * draft_cost;
        let gain = (1.0 - a.powi(k as i32 + 1)) / (1.0 - a) / time.max(1e-9);
        if gain > best.1 {
            best = (k, gain);
        }
    }
    best.0
}

/// The expected tokens each draft adds: its probability given its parent
/// times its parent's (draft i sits at row i + 1 of `tree`; the pending
/// row's gain is 1).
pub fn path_gains(probs: &[f32], tree: &Tree) -> Vec<f32> {
    let mut gain = vec![1f32; probs.len() + 1];
    for (i, p) in probs.iter().enumerate() {
        gain[i + 1] = gain[tree.parent(i + 1)] * p.clamp(0.0, 1.0);
    }
    gain.remove(0);
    gain
}

/// What the final head made of a verify step.
pub struct Verdict<'a> {
    /// Depth of the deepest of the proposer's drafts that were verified;
    /// 0 when it drafted none (or an early exit drafted this step).
    pub deepest: usize,
    /// Drafts accepted.
    pub accepted: usize,
    /// The first token committed: the model's token after the pending one.
    pub first: u32,
    /// The draft held back this step ([`Drafts::shadow`]).
    pub shadow: Option<u32>,
    /// The final head's logits at the last row walked: the model's view
    /// where the next step's drafts start.
    pub logits: &'a [f32],
    /// The final LayerNorm's output at that row (empty when the backend
    /// gives none): what the draft head drafts from.
    pub features: &'a [f32],
    /// Rows the step verified, and its seconds (forward and commit) when
    /// the sequence stepped alone (None in a batch, where the scheduler
    /// prices rows).
    pub rows: usize,
    pub secs: Option<f64>,
}

impl Verdict<'_> {
    /// This verdict as a proposer that drafted nothing this step sees it:
    /// the model's view, without the drafts' count (for a wrapped proposer
    /// whose acceptance estimate must not count drafts it did not make).
    pub fn without_drafts(&self) -> Verdict<'_> {
        Verdict {
            deepest: 0,
            accepted: 0,
            shadow: None,
            ..*self
        }
    }
}

/// The per-draft acceptance rate assumed before a sequence has verified any
/// draft: the start of [`AcceptRate`], which sets the tree's first draft
/// length (`best_k`) and prices prompt-lookup drafts in a batch. Set by
/// hand, not derived; it sits near the share of drafts the shipped tree has
/// accepted greedily (61-68%, docs/benchmarks.md); at temperature 0.8
/// (22-23%) the running estimate moves off it, its weight falling as 0.8^n
/// over n updates.
const ACCEPT_PRIOR: f64 = 0.6;

/// While no chain pays, one step in this many drafts a shadow: the first
/// draft, verified for free to keep the acceptance rate current, but paid
/// for in drafting time (a head draft is 0.17-0.19 of a step with q8_0
/// weights, a sampled tree draft ~0.2: `docs/benchmarks.md`). The rate, an
/// average over ~5 observations, then follows over ~40 steps instead of ~5.
pub const SHADOW_EVERY: usize = 8;

/// Counts the steps since a drafter's last shadow draft.
#[derive(Default)]
pub struct ShadowClock(usize);

impl ShadowClock {
    /// Whether this step, one where no chain pays, drafts a shadow.
    pub fn due(&mut self) -> bool {
        self.due_every(SHADOW_EVERY)
    }

    /// As [`Self::due`], one step in `every`.
    pub fn due_every(&mut self, every: usize) -> bool {
        self.0 += 1;
        if self.0 < every {
            return false;
        }
        self.0 = 0;
        true
    }
}

/// Weight of the newest verify step in [`AcceptRate`] (an exponential
/// moving average over about the last 1 / 0.2 = 5 steps: quick enough to
/// follow a change of text, smooth enough that one unlucky step does not
/// cut the draft length). Set by hand.
pub(super) const ACCEPT_EMA_WEIGHT: f64 = 0.2;

/// Running estimate of the per-draft acceptance rate of one sequence.
#[derive(Clone, Copy, Debug)]
pub struct AcceptRate(f64);

impl Default for AcceptRate {
    fn default() -> Self {
        AcceptRate(ACCEPT_PRIOR)
    }
}

impl AcceptRate {
    pub fn get(self) -> f64 {
        self.0
    }

    /// After one more verify step that accepted `rate` of its drafts.
    pub fn update(&mut self, rate: f64) {
        self.0 = (1.0 - ACCEPT_EMA_WEIGHT) * self.0 + ACCEPT_EMA_WEIGHT * rate;
    }

    /// Learns from a verify step of the proposer's drafts: the share
    /// accepted of the deepest draft's depth (none drafted: nothing).
    pub fn observe(&mut self, v: &Verdict) {
        if v.deepest > 0 {
            self.update(v.accepted as f64 / v.deepest as f64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chain_pays_for_its_drafting_time_too() {
        // Half the drafts accepted: one draft yields 1.5 tokens.
        assert_eq!(best_chain_len(0.5, &[1.0, 1.3], 0.0), 1, "1.15x");
        assert_eq!(best_chain_len(0.5, &[1.0, 1.3], 0.25), 0, "0.97x");
    }

    #[test]
    fn the_chain_length_follows_the_acceptance_rate_and_the_cost_curve() {
        let costs = [1.0, 1.05, 1.1, 1.15, 1.2, 2.5];
        assert_eq!(
            best_chain_len(0.9, &costs, 0.0),
            4,
            "cheap rows, long chains"
        );
        assert_eq!(best_chain_len(0.2, &costs, 0.0), 1);
        assert_eq!(best_chain_len(0.05, &costs, 0.0), 0);
    }

    /// The engine's start-up figures in the clock's tests.
    fn start_up() -> Costs {
        Costs {
            verify: vec![1.0, 1.3, 1.6],
            head_draft: 0.1,
        }
    }

    #[test]
    fn the_step_clock_gives_the_start_up_costs_until_the_loop_has_measured_its_own() {
        let prior = start_up();
        let mut c = StepClock::default();
        assert_eq!(c.verify(1, &prior), Some(1.3));
        assert_eq!(c.verify(3, &prior), None, "past the curve");
        assert_eq!(c.draft(&prior), 0.1);
        c.step(2, 0.002);
        assert_eq!(c.verify(1, &prior), Some(1.3), "no one-row step yet");
        c.step(1, 0.001);
        c.drafted(2, 0.0006);
        assert_eq!(c.verify(1, &prior), Some(2.0));
        assert!((c.draft(&prior) - 0.3).abs() < 1e-12);
        // Three rows not measured: the prior's extra cost, scaled as two
        // rows' was (0.3 measured 1.0).
        assert!((c.verify(2, &prior).unwrap() - (1.0 + 0.6 / 0.3)).abs() < 1e-9);
        // A plain mean of the first steps.
        c.step(1, 0.002);
        assert!((c.verify(1, &prior).unwrap() - 0.002 / 0.0015).abs() < 1e-9);
    }

    #[test]
    fn a_noisy_reading_never_makes_a_bigger_step_cheaper_than_a_smaller_one() {
        let prior = start_up();
        let mut c = StepClock::default();
        c.step(1, 0.001);
        c.step(2, 0.0017);
        c.step(3, 0.0012);
        assert_eq!(c.verify(2, &prior), c.verify(1, &prior));
    }

    #[test]
    fn after_its_first_measurements_one_slow_step_moves_the_clock_by_a_thirty_second() {
        let mut c = StepClock::default();
        let prior = start_up();
        for _ in 0..100 {
            c.step(1, 0.001);
            c.step(2, 0.0015);
        }
        c.step(2, 0.0015 + 0.032);
        let moved = c.verify(1, &prior).unwrap() - 1.5;
        assert!((moved - 1.0).abs() < 1e-6, "moved {moved}");
    }

    #[test]
    fn sequences_that_share_a_clock_price_by_each_others_steps() {
        let prior = start_up();
        let (a, b) = (SharedClock::default(), SharedClock::default());
        let a2 = a.clone();
        a.lock().0.step(1, 0.001);
        a.lock().0.step(2, 0.002);
        assert_eq!(a2.lock().0.verify(1, &prior), Some(2.0));
        assert_eq!(b.lock().0.verify(1, &prior), Some(1.3), "another engine's");
    }

    /// Runs `epochs` gate epochs where a step commits 1 token in 1 ms
    /// plainly and `on_tokens` tokens drafting; how many epochs drafted.
    fn drafting_epochs(gate: &mut Gate, epochs: u32, on_tokens: usize) -> u32 {
        let mut drafted = 0;
        for _ in 0..epochs {
            drafted += u32::from(gate.allows());
            for _ in 0..GATE_EPOCH {
                let tokens = if gate.allows() { on_tokens } else { 1 };
                gate.record(tokens, 0.001);
            }
        }
        drafted
    }

    #[test]
    fn the_gate_keeps_drafting_where_it_pays_and_stops_where_it_loses() {
        let mut pays = Gate::default();
        drafting_epochs(&mut pays, 2 * GATE_WARMUP, 2);
        let on = drafting_epochs(&mut pays, 64, 2);
        assert!(
            on >= 64 - 64 / GATE_EXPLORE_EVERY as u32,
            "drafted {on} of 64"
        );
        let mut loses = Gate::default();
        drafting_epochs(&mut loses, 2 * GATE_WARMUP, 0);
        let on = drafting_epochs(&mut loses, 64, 0);
        assert!(on <= 64 / GATE_EXPLORE_EVERY as u32, "drafted {on} of 64");
        assert!(on > 0, "the slower mode is still explored");
        let (on_rate, off_rate) = loses.rates();
        assert!(on_rate.unwrap() < off_rate.unwrap());
        let (epochs, drafting) = loses.epochs();
        assert_eq!(epochs, u64::from(2 * GATE_WARMUP + 64));
        assert_eq!(drafting, u64::from(GATE_WARMUP + on));
    }

    #[test]
    fn the_gate_keeps_drafting_where_plain_steps_are_faster_only_within_its_margin() {
        let run = |on_secs: f64| {
            let mut g = Gate::default();
            for _ in 0..64 * GATE_EPOCH {
                g.record(1, if g.allows() { on_secs } else { 0.001 });
            }
            g.epochs().1
        };
        let within = 0.001 / (1.0 - GATE_MARGIN / 2.0);
        let beyond = 0.001 / (1.0 - 2.0 * GATE_MARGIN);
        assert!(run(within) >= 50, "drafted {} of 64", run(within));
        assert!(run(beyond) <= 12, "drafted {} of 64", run(beyond));
    }

    #[test]
    fn the_gate_follows_a_mode_that_becomes_faster() {
        let mut g = Gate::default();
        drafting_epochs(&mut g, 64, 0);
        drafting_epochs(&mut g, 128, 3);
        let on = drafting_epochs(&mut g, 64, 3);
        assert!(
            on >= 64 - 64 / GATE_EXPLORE_EVERY as u32,
            "drafted {on} of 64"
        );
    }
}
