//! Plain and speculative cascade decoding of one sequence (DESIGN.md).
//!
//! One step feeds `[pending, d1..dk]` (k = 0 is a plain step):
//! 1. the tree drafter proposes d1..dk (clamped by max_tokens and the
//!    context window); when it proposes nothing the step is plain, or, with
//!    [`SelfDraft`], an early exit drafts and the rows arrive at its block
//!    (LayerSkip; off by default: slower than a plain step on the shipped
//!    model, see the README);
//! 2. with the exit cascade (off by default: no faster on the shipped
//!    model), blocks run up to each early exit, whose head scores only the
//!    candidates (the drafts and the drafter's classes: a few dot products,
//!    not the vocabulary); at the first row i where a rival outscores
//!    d(i+1) by `exit_margin`, rows i+1.. are dropped, and the next blocks
//!    run on fewer rows (exits only truncate, never accept);
//! 3. the final head gives f0..fm; with the keyed sample f(i) at each
//!    absolute position, d1..da are accepted while d(i) == f(i-1), and fa is
//!    the new token: every step yields at least one token, the same tokens
//!    plain decoding yields;
//! 4. every KV-cache layer is rolled back to the committed length and fa
//!    becomes the pending token.
//!
//! Stop strings are text, so the caller cuts at them (see `stop`); this
//! module stops at end-of-text and `max_tokens`.

use std::collections::HashMap;

use candle_core::Result;

use crate::drafter::features::Verified;
use crate::drafter::{DraftRule, Drafter};
use crate::model::cpu::CpuGpt;
use crate::model::forward::{Forward, Logits, Segment, Tree};
use crate::sampling::{self, Noise, SamplingParams};

/// The drafter's statistics of the last verified position before the
/// first verify step (the prefill does not read them off its last row): a
/// middling top-1 probability of 0.5 and entropy of 2 nats, set by hand,
/// not measured. Labelling never yields this value: the first rows of a
/// continuation take the first step's statistics (`train::label`).
const VERIFIED_BEFORE_ANY_STEP: Verified = Verified {
    top1_prob: 0.5,
    entropy: 2.0,
};

/// The per-draft acceptance rate assumed before a sequence has verified any
/// draft: the start of `ema_accept`, which sets the tree's first draft
/// length (`best_k`) and prices prompt-lookup drafts in a batch. Set by
/// hand, not derived; it sits near the share of drafts the shipped tree has
/// accepted greedily (61-68%, docs/benchmarks.md); at temperature 0.8
/// (22-23%) the running estimate moves off it, its weight falling as 0.8^n
/// over n updates.
const ACCEPT_PRIOR: f64 = 0.6;

/// Weight of the newest verify step in `ema_accept` (an exponential moving
/// average over about the last 1 / 0.2 = 5 steps: quick enough to follow a
/// change of text, smooth enough that one unlucky step does not cut the
/// draft length). Set by hand.
const ACCEPT_EMA_WEIGHT: f64 = 0.2;

/// `ema_accept` after one more verify step that accepted `rate` of its drafts.
fn update_accept(ema: f64, rate: f64) -> f64 {
    (1.0 - ACCEPT_EMA_WEIGHT) * ema + ACCEPT_EMA_WEIGHT * rate
}

/// Where draft tokens come from.
#[derive(Clone, Copy)]
pub enum Proposer<'m> {
    /// Plain decoding.
    None,
    /// The tree drafter.
    Tree(&'m Drafter),
    /// Prompt lookup: copy what followed the last match of the suffix.
    Lookup { k: usize },
    /// The model's own continuation, known in advance (benchmark ceiling).
    Oracle { continuation: &'m [u32], k: usize },
}

#[derive(Clone, Debug)]
pub struct GenParams {
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Index of this choice (n > 1), part of the sampling key.
    pub choice: u32,
    /// Index of this prompt in a request with several, part of the
    /// sampling key (equal prompts in one request sample apart).
    pub prompt: u32,
    /// Top logprobs to return per token (None: no logprobs).
    pub logprobs: Option<usize>,
    pub speculate: bool,
    /// Let the tree drafter branch (a draft tree; greedy decoding on a
    /// backend that takes trees); false (the default): a chain. On the
    /// default model trees add 4% tokens per verify step but no speed
    /// (docs/benchmarks.md).
    pub draft_tree: bool,
    /// At temperature > 0, the tree drafter drafts the sample of its own
    /// estimate with the sampler's keyed noise (`DraftRule::Sample`);
    /// false: its most likely token (the rule before; kept for benchmarks).
    pub draft_with_noise: bool,
    /// Let early exits truncate drafts before the final blocks.
    pub cascade: bool,
    /// An exit truncates at a draft when a rival candidate outscores it by
    /// at least this ([`exit_margin`]); infinite: exits only measure. The
    /// rivals are the tree drafter's classes and the other drafts, so
    /// behind prompt lookup or the oracle the cascade cuts only where the
    /// chain holds a rival token.
    pub exit_margin: f32,
    /// When the proposer drafts nothing, draft with an early exit instead
    /// (LayerSkip); None: a plain step.
    pub self_draft: Option<SelfDraft>,
    pub stop_at_eot: bool,
}

/// Self-speculative drafting with an early exit (LayerSkip, arXiv
/// 2404.16710): tokens go one at a time through the blocks up to the exit,
/// whose head proposes the next token (the keyed sample at its position,
/// so sampled drafts match the final head's wherever the two agree);
/// drafting stops at `k_max` drafts or when the exit's top-1 probability
/// falls below `min_confidence`. Verification then runs only the blocks
/// after the exit, on the drafts' states, whose keys and values the lower
/// blocks already cached.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SelfDraft {
    /// Index into `Config::exits` (not the last).
    pub exit: usize,
    pub k_max: usize,
    pub min_confidence: f32,
}

impl GenParams {
    /// The sampling stream of this (prompt, choice): the key's middle part
    /// (DESIGN.md); prompt 0 keeps the single-prompt keys of before.
    pub fn stream(&self) -> u64 {
        (u64::from(self.prompt) << 32) | u64::from(self.choice)
    }
}

impl Default for GenParams {
    fn default() -> Self {
        Self {
            max_tokens: 16,
            sampling: SamplingParams::default(),
            choice: 0,
            prompt: 0,
            logprobs: None,
            speculate: true,
            draft_tree: false,
            draft_with_noise: true,
            cascade: false,
            exit_margin: DEFAULT_EXIT_MARGIN,
            self_draft: None,
            stop_at_eot: true,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct TokenOut {
    pub id: u32,
    /// Logprob of `id` under the model (raw logits), when asked.
    pub logprob: Option<f32>,
    pub top: Vec<(u32, f32)>,
    /// Top-2 logit gap where the token was chosen (near-tie diagnostics).
    pub gap: f32,
}

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
    }
}

/// Margins ([`exit_margin`]) an exit gave the drafts that reached it, by
/// what the final head then did with each: accepted it (a cut there would
/// have lost tokens) or rejected it first (a cut there saves the rows
/// after). Drafts after the first rejected one are not counted: a cut
/// there changes nothing. Bin i holds margins in
/// `MARGIN_BIN_LO + i * MARGIN_BIN .. + MARGIN_BIN` (the ends open).
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
    fn record(&mut self, margins: &[f32], accepted: usize) {
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

/// Logit margin at which an exit's candidate scores reject a draft
/// (`--exit-margin`), set from the margins the exits gave train-split
/// drafts (docs/benchmarks.md, "Exit cascade").
pub const DEFAULT_EXIT_MARGIN: f32 = 1.0;

/// How far the best rival outscores `draft` among an exit's logits `z` for
/// the candidate tokens `ids` (the draft among them); positive: the exit
/// prefers a rival. With `noise` (sampling at temperature T) each score is
/// `z / T` plus that token's keyed noise, as the final head's sample is
/// drawn; penalties and top_p are left out (a cut only costs speed).
pub fn exit_margin(z: &[f32], ids: &[u32], draft: u32, noise: Option<(f32, Noise)>) -> f32 {
    // As `sampling::choose` scores, operation for operation.
    let score = |z: f32, t: u32| match noise {
        Some((temp, g)) => z * (1.0 / temp) + g.gumbel(t),
        None => z,
    };
    let mut own = f32::NEG_INFINITY;
    let mut rival = f32::NEG_INFINITY;
    for (&zi, &t) in z.iter().zip(ids) {
        let v = score(zi, t);
        match t == draft {
            true => own = v,
            false => rival = rival.max(v),
        }
    }
    rival - own
}

fn add_vec(a: &mut Vec<u64>, b: &[u64]) {
    if a.len() < b.len() {
        a.resize(b.len(), 0);
    }
    for (x, y) in a.iter_mut().zip(b) {
        *x += y;
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Finish {
    Length,
    Eot,
}

/// The rows one sequence puts into the next forward: the next chunk of its
/// prompt (prefill), or `[pending, d1..dk]` (a verify step; k = 0 is a
/// plain step). Built by [`Generator::next_rows`], consumed by
/// [`Generator::commit`] with the final head's logits of [`Rows::logits`].
#[derive(Clone, Debug)]
pub struct Rows {
    tokens: Vec<u32>,
    pos: usize,
    kind: RowKind,
}

#[derive(Clone, Debug)]
enum RowKind {
    /// A prompt chunk; logits of every row when echo logprobs are asked.
    Prefill { echo: bool },
    /// `[pending, drafts..]` as a draft tree (a chain unless the drafter
    /// branched): the drafter's probability of each draft given its
    /// parent, and its first token when drafting did not pay (to keep its
    /// estimate).
    Verify {
        probs: Vec<f32>,
        shadow: Option<u32>,
        tree: Tree,
    },
}

impl Rows {
    /// The tokens to embed.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Absolute position of the first row.
    pub fn pos(&self) -> usize {
        self.pos
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    pub fn is_prefill(&self) -> bool {
        matches!(self.kind, RowKind::Prefill { .. })
    }

    /// The rows whose final-head logits [`Generator::commit`] needs.
    pub fn logits(&self) -> std::ops::Range<usize> {
        match self.kind {
            RowKind::Prefill { echo: false } => 0..0,
            _ => 0..self.tokens.len(),
        }
    }

    /// The draft tree, when the drafts branch (None for a chain).
    pub fn tree(&self) -> Option<&Tree> {
        match &self.kind {
            RowKind::Verify { tree, .. } if !tree.is_chain() => Some(tree),
            _ => None,
        }
    }

    /// The drafts (empty for a prefill chunk or a plain step).
    pub fn drafts(&self) -> &[u32] {
        match self.kind {
            RowKind::Prefill { .. } => &[],
            RowKind::Verify { .. } => &self.tokens[1..],
        }
    }

    /// The expected number of tokens each draft adds: the drafter's
    /// probability that it and every draft before it are accepted.
    pub fn draft_gains(&self) -> Vec<f32> {
        let RowKind::Verify { probs, tree, .. } = &self.kind else {
            return vec![];
        };
        // Row i + 1 holds draft i; row 0's gain is 1.
        let mut gain = vec![1f32; probs.len() + 1];
        for (i, p) in probs.iter().enumerate() {
            gain[i + 1] = gain[tree.parent(i + 1)] * p.clamp(0.0, 1.0);
        }
        gain.remove(0);
        gain
    }

    /// Keeps the first `n` rows (at least one): a shorter prompt chunk, or
    /// fewer drafts (the batch had no room for the rest).
    pub fn keep_rows(&mut self, n: usize) {
        let n = n.max(1);
        if let RowKind::Verify { probs, tree, .. } = &mut self.kind {
            probs.truncate(n - 1);
            tree.truncate(n);
        }
        self.tokens.truncate(n);
    }
}

/// A step's drafts: tokens, the drafter's probability of each given its
/// parent, and the tree over `[pending, drafts..]`.
struct Drafts {
    tokens: Vec<u32>,
    probs: Vec<f32>,
    tree: Tree,
}

impl Drafts {
    /// A chain of drafts, each with probability `p`.
    fn chain(tokens: Vec<u32>, p: f32) -> Drafts {
        Drafts {
            probs: vec![p; tokens.len()],
            tree: Tree::chain(tokens.len() + 1),
            tokens,
        }
    }

    fn tree(nodes: Vec<crate::drafter::TreeDraft>) -> Drafts {
        let parents = std::iter::once(0).chain(nodes.iter().map(|n| n.parent));
        Drafts {
            tokens: nodes.iter().map(|n| n.token).collect(),
            probs: nodes.iter().map(|n| n.prob).collect(),
            tree: Tree::from_parents(parents.collect()).expect("the drafter puts parents first"),
        }
    }
}

/// What a verify step drafted, for the counters.
#[derive(Clone, Copy)]
enum Drafted {
    /// A chain of n drafts (some may have been dropped by the exits).
    Chain(usize),
    /// The tree of the rows.
    Tree,
    /// n drafts by an early exit (LayerSkip).
    ByExit(usize),
}

/// One sequence being decoded: prefill (its prompt goes into the cache,
/// chunk by chunk), then decode (one verify step per forward), then done.
/// Invariant once prefilled: `cache` holds `tokens[..len-1]`; the last
/// token is pending.
pub struct Generator<'m, M: Forward = CpuGpt> {
    model: &'m M,
    proposer: Proposer<'m>,
    pub params: GenParams,
    cache: M::Cache,
    tokens: Vec<u32>,
    prompt_len: usize,
    /// Prompt tokens in the cache (prefill is done at `prompt_len - 1`).
    prefilled: usize,
    /// Top logprobs per prompt token, when echo logprobs are asked, and
    /// those computed so far (None for the first token).
    echo_top: Option<usize>,
    echo: Vec<Option<TokenOut>>,
    counts: HashMap<u32, u32>,
    verified: Verified,
    /// Keep `verified` current (the tree drafter and its labelling read it).
    track_verified: bool,
    /// Running estimate of the per-draft acceptance rate (tree drafter).
    ema_accept: f64,
    /// Verify cost of k drafts relative to a plain step (tree drafter).
    verify_costs: Vec<f64>,
    pub stats: SpecStats,
    pub finished: Option<Finish>,
    eot: u32,
}

impl<'m, M: Forward> Generator<'m, M> {
    /// Prefills `prompt` (at least one token) in one forward. With
    /// `echo_logprobs`, returns each prompt token's logprob and top
    /// alternatives (None for the first).
    pub fn new(
        model: &'m M,
        proposer: Proposer<'m>,
        prompt: &[u32],
        params: GenParams,
        eot: u32,
        echo_logprobs: Option<usize>,
    ) -> Result<(Self, Vec<Option<TokenOut>>)> {
        let mut g = Self::start(model, proposer, prompt, params, eot, echo_logprobs)?;
        g.prefill_alone()?;
        let echo = g.take_echo();
        Ok((g, echo))
    }

    /// Checks `prompt` and `params` and sets up an empty cache; the prompt
    /// goes in through [`Self::next_rows`] chunks (or [`Self::new`]).
    pub fn start(
        model: &'m M,
        proposer: Proposer<'m>,
        prompt: &[u32],
        params: GenParams,
        eot: u32,
        echo_logprobs: Option<usize>,
    ) -> Result<Self> {
        let cfg = model.config();
        if prompt.is_empty() {
            candle_core::bail!("prompt must have at least one token");
        }
        if prompt.len() + params.max_tokens > cfg.block_size {
            candle_core::bail!(
                "prompt ({}) + max_tokens ({}) exceed the context window of {} tokens",
                prompt.len(),
                params.max_tokens,
                cfg.block_size
            );
        }
        if let Some(bad) = prompt.iter().find(|t| **t as usize >= cfg.vocab_size) {
            candle_core::bail!(
                "token id {bad} is outside the vocabulary (size {})",
                cfg.vocab_size
            );
        }
        Ok(Generator {
            model,
            proposer,
            params,
            cache: model.new_cache()?,
            tokens: prompt.to_vec(),
            prompt_len: prompt.len(),
            prefilled: 0,
            echo_top: echo_logprobs,
            echo: vec![None],
            counts: HashMap::new(),
            track_verified: matches!(proposer, Proposer::Tree(_)),
            verified: VERIFIED_BEFORE_ANY_STEP,
            ema_accept: ACCEPT_PRIOR,
            verify_costs: match proposer {
                Proposer::Tree(d) => d.verify_costs(),
                _ => vec![],
            },
            stats: SpecStats::default(),
            finished: None,
            eot,
        })
    }

    pub fn generated(&self) -> &[u32] {
        &self.tokens[self.prompt_len..]
    }

    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// True while prompt tokens remain to go into the cache.
    pub fn in_prefill(&self) -> bool {
        self.prefilled + 1 < self.prompt_len
    }

    /// Echo logprobs of the prompt (once prefilled; empty after the first call).
    pub fn take_echo(&mut self) -> Vec<Option<TokenOut>> {
        std::mem::take(&mut self.echo)
    }

    /// The cache, for a forward over several sequences.
    pub fn cache_mut(&mut self) -> &mut M::Cache {
        &mut self.cache
    }

    fn remaining(&self) -> usize {
        self.params
            .max_tokens
            .saturating_sub(self.tokens.len() - self.prompt_len)
    }

    /// The rows for the next forward: up to `max_rows` prompt tokens while
    /// in prefill, else `[pending, drafts..]` with as many drafts as the
    /// proposer and the draft-length rule give (the caller may drop some
    /// with [`Rows::keep_rows`]). None when the sequence is done.
    pub fn next_rows(&mut self, max_rows: usize) -> Option<Rows> {
        self.next_rows_in_batch(max_rows, 0.0)
    }

    /// As [`Self::next_rows`], drafting only while a draft's expected gain
    /// (the drafter's path probability) is at least `min_gain`: what a row
    /// must bring to pay for its marginal cost in the batch being built.
    pub fn next_rows_in_batch(&mut self, max_rows: usize, min_gain: f32) -> Option<Rows> {
        if self.finished.is_some() || max_rows == 0 {
            return None;
        }
        if self.in_prefill() {
            let n = (self.prompt_len - 1 - self.prefilled).min(max_rows);
            return Some(Rows {
                tokens: self.tokens[self.prefilled..self.prefilled + n].to_vec(),
                pos: self.prefilled,
                kind: RowKind::Prefill {
                    echo: self.echo_top.is_some(),
                },
            });
        }
        if self.remaining() == 0 {
            self.finished = Some(Finish::Length);
            return None;
        }
        let (drafts, shadow) = self.propose(max_rows - 1, min_gain, true);
        let pending = *self.tokens.last().expect("non-empty");
        Some(Rows {
            tokens: [&[pending][..], &drafts.tokens].concat(),
            pos: self.tokens.len() - 1,
            kind: RowKind::Verify {
                probs: drafts.probs,
                shadow,
                tree: drafts.tree,
            },
        })
    }

    /// Puts the rest of the prompt into the cache in one forward.
    fn prefill_alone(&mut self) -> Result<()> {
        while self.in_prefill() {
            let Some(rows) = self.next_rows(usize::MAX) else {
                break;
            };
            let logits = self.forward_alone(&rows)?;
            self.commit(rows, &logits);
        }
        Ok(())
    }

    /// One forward of this sequence alone over `rows`.
    pub fn forward_alone(&mut self, rows: &Rows) -> Result<Logits> {
        let mut seg = [Segment {
            tokens: &rows.tokens,
            pos: rows.pos,
            cache: &mut self.cache,
            logits: rows.logits(),
            tree: rows.tree(),
        }];
        let mut out = self.model.forward_batch(&mut seg)?;
        Ok(out.pop().expect("one segment"))
    }

    /// Takes the forward's result for `rows` (the final head's logits of
    /// `rows.logits()`): records a prefill chunk, or accepts drafts, commits
    /// the new tokens and rolls the cache back. Returns the new tokens.
    pub fn commit(&mut self, rows: Rows, logits: &Logits) -> Vec<TokenOut> {
        match rows.kind {
            RowKind::Prefill { .. } => {
                self.record_echo(rows.pos, logits);
                self.prefilled += rows.tokens.len();
                vec![]
            }
            RowKind::Verify { shadow, tree, .. } => {
                let drafted = Drafted::Tree;
                self.accept_rows(&rows.tokens, &tree, logits, shadow, drafted)
            }
        }
    }

    /// Echo logprobs: row i of a chunk at `pos` predicts prompt[pos + i + 1].
    fn record_echo(&mut self, pos: usize, logits: &Logits) {
        let Some(top_n) = self.echo_top else {
            return;
        };
        for (i, row) in logits.iter().enumerate() {
            let lp = sampling::log_softmax(row);
            let id = self.tokens[pos + i + 1];
            self.echo.push(Some(TokenOut {
                id,
                logprob: Some(lp[id as usize]),
                top: sampling::top_logprobs(&lp, top_n),
                gap: sampling::top2_gap(row),
            }));
        }
    }

    /// One verify step alone: returns the new tokens (at least one unless
    /// finished). The exit cascade and LayerSkip drafting, when on, run
    /// here; otherwise the step is [`Self::next_rows`], a forward of this
    /// sequence alone, and [`Self::commit`].
    pub fn step(&mut self) -> Result<Vec<TokenOut>> {
        self.prefill_alone()?;
        if self.params.cascade || self.params.self_draft.is_some() {
            return self.step_with_exits();
        }
        let Some(rows) = self.next_rows(usize::MAX) else {
            return Ok(vec![]);
        };
        let logits = self.forward_alone(&rows)?;
        Ok(self.commit(rows, &logits))
    }

    /// Drafts for the next step, clamped so the step cannot pass max_tokens,
    /// the window or `cap`, and stopped where the path probability falls
    /// below `min_gain` (tree drafter; a tree when `branch` and greedy and
    /// the backend takes trees); and the tree's first token when drafting
    /// did not pay.
    fn propose(&mut self, cap: usize, min_gain: f32, branch: bool) -> (Drafts, Option<u32>) {
        let t = std::time::Instant::now();
        let out = self.propose_untimed(cap, min_gain, branch);
        self.stats.draft_secs += t.elapsed().as_secs_f64();
        out
    }

    fn propose_untimed(
        &mut self,
        cap: usize,
        min_gain: f32,
        branch: bool,
    ) -> (Drafts, Option<u32>) {
        let cfg = self.model.config();
        let room = (self.remaining() - 1)
            .min(cfg.block_size - self.tokens.len())
            .min(cap);
        let k = match self.proposer {
            Proposer::None => 0,
            Proposer::Tree(_) => self.best_k(),
            Proposer::Lookup { k } | Proposer::Oracle { k, .. } => k,
        }
        .min(room);
        // When drafting does not pay, still ask the tree for its first token
        // (microseconds) to keep the acceptance estimate current.
        let shadow = match self.proposer {
            Proposer::Tree(d) if k == 0 && self.params.speculate => d
                .draft(&self.tokens, self.verified, self.draft_rule())
                .map(|d| d.token),
            _ => None,
        };
        let fixed = |drafts: Vec<u32>, p: f64| Drafts::chain(drafts, p as f32);
        let drafts = match self.proposer {
            _ if !self.params.speculate || k == 0 => Drafts::chain(vec![], 1.0),
            Proposer::None => Drafts::chain(vec![], 1.0),
            Proposer::Tree(d) => {
                let rule = self.draft_rule();
                let tree = branch
                    && self.params.draft_tree
                    && rule == DraftRule::Best
                    && self.model.supports_trees();
                match tree {
                    true => Drafts::tree(d.propose_tree(
                        &self.tokens,
                        k,
                        self.verified,
                        d.threshold,
                        min_gain,
                    )),
                    false => {
                        let ds = d.propose_path(
                            &self.tokens,
                            k,
                            self.verified,
                            d.threshold,
                            min_gain,
                            rule,
                        );
                        let probs = ds.iter().map(|d| d.prob).collect();
                        let tokens: Vec<u32> = ds.into_iter().map(|d| d.token).collect();
                        Drafts {
                            tree: Tree::chain(tokens.len() + 1),
                            tokens,
                            probs,
                        }
                    }
                }
            }
            Proposer::Lookup { .. } => fixed(
                crate::drafter::prompt_lookup(&self.tokens, k, 2),
                self.ema_accept,
            ),
            Proposer::Oracle { continuation, .. } => {
                let at = self.tokens.len() - self.prompt_len;
                let c = continuation
                    .get(at..)
                    .map_or(vec![], |c| c.iter().take(k).copied().collect());
                fixed(c, 1.0)
            }
        };
        (drafts, shadow)
    }

    /// How the tree drafter drafts for this sequence's sampling.
    fn draft_rule(&self) -> DraftRule {
        let sp = &self.params.sampling;
        match sp.is_greedy() || !self.params.draft_with_noise {
            true => DraftRule::Best,
            false => DraftRule::Sample {
                seed: sp.seed,
                stream: self.params.stream(),
                temperature: sp.temperature,
            },
        }
    }

    /// A step with the exit cascade or LayerSkip drafting (see the module
    /// doc): the rows go through the blocks in parts, so this sequence runs
    /// alone.
    fn step_with_exits(&mut self) -> Result<Vec<TokenOut>> {
        if self.finished.is_some() {
            return Ok(vec![]);
        }
        if self.remaining() == 0 {
            self.finished = Some(Finish::Length);
            return Ok(vec![]);
        }
        let cfg = self.model.config();
        let room = (self.remaining() - 1).min(cfg.block_size - self.tokens.len());
        let (drafts, shadow) = self.propose(usize::MAX, 0.0, false);
        let drafts = drafts.tokens;
        let pos = self.tokens.len() - 1;
        let n_exits = cfg.exits.len();
        // Self-drafting when the proposer gave nothing: the rows arrive
        // already at the exit's block, their lower blocks cached.
        let self_draft = match self.params.self_draft {
            Some(sd) if drafts.is_empty() && self.params.speculate && room > 0 => {
                (sd.exit + 1 < n_exits && sd.k_max > 0).then_some(sd)
            }
            _ => None,
        };
        let (drafts, mut s) = match self_draft {
            Some(sd) => self.draft_with_exit(sd, room)?,
            None => {
                let pending = *self.tokens.last().expect("non-empty");
                let s = self.model.embed(&[&[pending][..], &drafts].concat(), pos)?;
                (drafts, s)
            }
        };
        let mut kept = drafts.len() + 1;
        let mut margins = vec![];
        if self.params.cascade && kept > 1 && self_draft.is_none() {
            margins = self.exit_cascade(&mut s, &drafts, &mut kept)?;
        }
        self.model
            .run_blocks(&mut s, cfg.n_layer, &mut self.cache)?;
        let logits = self.model.exit_logits(&s, n_exits - 1, 0..kept)?;
        let pending = *self.tokens.last().expect("non-empty");
        let rows = [&[pending][..], &drafts[..kept - 1]].concat();
        let chain = Tree::chain(kept);
        let drafted = match self_draft {
            Some(_) => Drafted::ByExit(drafts.len()),
            None => Drafted::Chain(drafts.len()),
        };
        let out = self.accept_rows(&rows, &chain, &logits, shadow, drafted);
        // Only the drafts the final head judged, and not when a stop cut
        // the walk short.
        if self.finished.is_none() {
            let accepted = out.len().saturating_sub(1);
            for (e, m) in margins.iter().enumerate() {
                let judged = &m[..m.len().min(kept - 1)];
                self.stats.exit_margins[e].record(judged, accepted);
            }
        }
        Ok(out)
    }

    /// Runs the rows `[pending, drafts..]` in `s` through the blocks up to
    /// each non-final exit; each exit scores the candidates (the drafts
    /// and the tree drafter's classes) and cuts the chain at the first
    /// draft a rival outscores by `exit_margin`, leaving `kept` rows.
    /// Returns each exit's margins for the drafts it saw.
    fn exit_cascade(
        &mut self,
        s: &mut M::Stream,
        drafts: &[u32],
        kept: &mut usize,
    ) -> Result<Vec<Vec<f32>>> {
        let cfg = self.model.config();
        let n_exits = cfg.exits.len();
        let mut ids: Vec<u32> = match self.proposer {
            Proposer::Tree(d) => d.classes.clone(),
            _ => vec![],
        };
        ids.extend_from_slice(drafts);
        ids.sort_unstable();
        ids.dedup();
        if self.stats.truncated_by_exit.len() < n_exits - 1 {
            self.stats.truncated_by_exit.resize(n_exits - 1, 0);
        }
        if self.stats.exit_margins.len() < n_exits - 1 {
            self.stats
                .exit_margins
                .resize(n_exits - 1, MarginHist::default());
        }
        // Row i judges drafts[i], the token at `first + i`: the position
        // `commit_one` samples it at.
        let first = self.tokens.len();
        let mut all = vec![];
        for e in 0..n_exits - 1 {
            self.model
                .run_blocks(s, cfg.exits[e].block, &mut self.cache)?;
            let z = self.model.exit_scores(s, e, 0..*kept - 1, &ids)?;
            let margins: Vec<f32> = z
                .chunks_exact(ids.len())
                .enumerate()
                .map(|(i, z)| exit_margin(z, &ids, drafts[i], self.noise_at(first + i)))
                .collect();
            if let Some(i) = margins.iter().position(|m| *m >= self.params.exit_margin) {
                self.stats.truncated_by_exit[e] += (*kept - 1 - i) as u64;
                *kept = i + 1;
                self.model.keep_rows(s, *kept)?;
            }
            all.push(margins);
            if *kept == 1 {
                break;
            }
        }
        Ok(all)
    }

    /// The temperature and the sampler's keyed noise at absolute position
    /// `pos` (None when greedy).
    fn noise_at(&self, pos: usize) -> Option<(f32, Noise)> {
        let sp = &self.params.sampling;
        (!sp.is_greedy()).then(|| {
            (
                sp.temperature,
                Noise::at(sp.seed, self.params.stream(), pos),
            )
        })
    }

    /// Walks the verified rows `rows` (`[pending, drafts..]`, shaped by
    /// `tree`, their final logits in `logits`) by [`accept`], commits the
    /// tokens, keeps the walked rows' cache slots and drops the rest,
    /// updates the drafter's state and the counters (`drafted` drafts were
    /// made, verified or not).
    fn accept_rows(
        &mut self,
        rows: &[u32],
        tree: &Tree,
        logits: &Logits,
        shadow: Option<u32>,
        drafted: Drafted,
    ) -> Vec<TokenOut> {
        let from = self.tokens.len() - 1;
        let mut out = Vec::new();
        let (path, _) = accept(tree, rows, |i| {
            let (t, stop) = self.commit_one(&logits[i]);
            out.push(t);
            (out.last().expect("pushed").id, stop)
        });
        let last_row = *path.last().expect("the root");
        // The drafter's features read the model's stats where it last committed.
        if self.track_verified {
            let (p1, ent) = sampling::top1_and_entropy(&logits[last_row]);
            self.verified = Verified {
                top1_prob: p1,
                entropy: ent,
            };
        }
        let accepted = out.len() - 1;
        if let Some(t) = shadow {
            self.ema_accept = update_accept(self.ema_accept, f64::from(u8::from(t == out[0].id)));
        }
        match drafted {
            Drafted::ByExit(n) => {
                self.stats.steps += 1;
                self.stats.exit_draft_steps += 1;
                self.stats.exit_drafted += n as u64;
                self.stats.exit_accepted += accepted as u64;
            }
            Drafted::Chain(n) => self.record((1..=n).collect(), accepted, false),
            Drafted::Tree => {
                let depths = (1..tree.len()).map(|r| tree.depth(r)).collect();
                let later_child = path
                    .iter()
                    .any(|&r| r > 0 && tree.children(tree.parent(r)).next() != Some(r));
                self.record(depths, accepted, later_child);
            }
        }
        // The walked rows' slots move to the committed positions; the cache
        // then holds every committed token but the pending one.
        let kept = self.model.compact_cache(&mut self.cache, from, &path);
        debug_assert!(kept.is_ok(), "{kept:?}");
        self.model
            .truncate_cache(&mut self.cache, self.tokens.len() - 1);
        out
    }

    /// Commits the model's token for the position after a row with final
    /// logits `row` (penalties, then the keyed sample or the argmax); says
    /// whether generation must stop there.
    fn commit_one(&mut self, row: &[f32]) -> (TokenOut, bool) {
        let sp = &self.params.sampling;
        let pos = self.tokens.len();
        let f = if sp.presence_penalty != 0.0 || sp.frequency_penalty != 0.0 {
            let mut l = row.to_vec();
            sampling::penalize(&mut l, sp, &self.counts);
            sampling::choose(&l, sp, self.params.stream(), pos)
        } else {
            sampling::choose(row, sp, self.params.stream(), pos)
        };
        let lp = self.params.logprobs.map(|n| {
            let lp = sampling::log_softmax(row);
            (lp[f as usize], sampling::top_logprobs(&lp, n))
        });
        let t = TokenOut {
            id: f,
            logprob: lp.as_ref().map(|x| x.0),
            top: lp.map(|x| x.1).unwrap_or_default(),
            gap: sampling::top2_gap(row),
        };
        self.tokens.push(f);
        *self.counts.entry(f).or_default() += 1;
        if self.params.stop_at_eot && f == self.eot {
            self.finished = Some(Finish::Eot);
        } else if self.remaining() == 0 {
            self.finished = Some(Finish::Length);
        }
        (t, self.finished.is_some())
    }

    /// LayerSkip drafting (see [`SelfDraft`]): returns the drafts and the
    /// rows `[pending, d1..dk]` at the exit's block.
    fn draft_with_exit(&mut self, sd: SelfDraft, room: usize) -> Result<(Vec<u32>, M::Stream)> {
        let block = self.model.config().exits[sd.exit].block;
        let pos = self.tokens.len() - 1;
        let pending = *self.tokens.last().expect("non-empty");
        let mut s = self.model.embed(&[pending], pos)?;
        self.model.run_blocks(&mut s, block, &mut self.cache)?;
        let mut drafts = Vec::new();
        while drafts.len() < sd.k_max.min(room) {
            let last = self.model.rows(&s) - 1;
            let logits = self.model.exit_logits(&s, sd.exit, last..last + 1)?;
            if sampling::top1_prob(&logits[0]) < sd.min_confidence {
                break;
            }
            // The token at absolute position pos + 1 + last, keyed as the
            // final head's sample there will be.
            let d = sampling::choose(
                &logits[0],
                &self.params.sampling,
                self.params.stream(),
                pos + 1 + last,
            );
            drafts.push(d);
            let mut next = self.model.embed(&[d], pos + 1 + last)?;
            self.model.run_blocks(&mut next, block, &mut self.cache)?;
            self.model.append_rows(&mut s, next)?;
            if self.params.stop_at_eot && d == self.eot {
                break;
            }
        }
        Ok((drafts, s))
    }

    /// Counts a verify step whose drafts sat at `depths` (1 = right after
    /// the pending token), of which `accepted` were accepted, one of them
    /// not its parent's first child when `later_child`.
    fn record(&mut self, depths: Vec<usize>, accepted: usize, later_child: bool) {
        let st = &mut self.stats;
        st.steps += 1;
        st.drafted += depths.len() as u64;
        st.accepted += accepted as u64;
        if depths.is_empty() && !matches!(self.proposer, Proposer::None) && self.params.speculate {
            st.no_draft_steps += 1;
        }
        let deepest = depths.iter().copied().max().unwrap_or(0);
        if st.drafted_by_pos.len() < deepest {
            st.drafted_by_pos.resize(deepest, 0);
            st.accepted_by_pos.resize(deepest, 0);
        }
        for &d in &depths {
            st.drafted_by_pos[d - 1] += 1;
        }
        for d in 0..accepted {
            st.accepted_by_pos[d] += 1;
        }
        if depths.iter().enumerate().any(|(i, &d)| d != i + 1) {
            st.tree_steps += 1;
        }
        st.accepted_later_child += u64::from(later_child);
        if !depths.is_empty() {
            self.ema_accept = update_accept(self.ema_accept, accepted as f64 / deepest as f64);
        }
    }

    /// The draft length with the most expected tokens per unit of verify
    /// cost: with per-draft acceptance a, k drafts yield (1 - a^(k+1)) / (1 - a)
    /// tokens for cost c(k) (measured at training); 0 means a plain step.
    fn best_k(&self) -> usize {
        let a = self.ema_accept.clamp(0.01, 0.99);
        let mut best = (0, 0.0f64);
        for (k, c) in self.verify_costs.iter().enumerate() {
            let gain = (1.0 - a.powi(k as i32 + 1)) / (1.0 - a) / c.max(1e-9);
            if gain > best.1 {
                best = (k, gain);
            }
        }
        best.0
    }

    /// Runs to the end; returns the generated tokens.
    pub fn run(&mut self) -> Result<Vec<TokenOut>> {
        let mut all = Vec::new();
        while self.finished.is_none() {
            all.extend(self.step()?);
        }
        Ok(all)
    }

    /// The KV-cache invariant (DESIGN.md): every layer holds exactly the
    /// prompt tokens put in so far while in prefill, then every committed
    /// token but the pending one. An error names both lengths.
    pub fn check_cache(&self) -> Result<()> {
        let want = match self.in_prefill() {
            true => self.prefilled,
            false => self.tokens.len() - 1,
        };
        let got = self.model.cache_len(&self.cache);
        let top = self.model.cache_max_len(&self.cache);
        if got != want || top != want {
            candle_core::bail!(
                "kv cache invariant broken: layers hold {got}..={top} rows, expected {want}"
            );
        }
        Ok(())
    }

    /// Cache length (for tests of the invariant).
    pub fn cache_len(&self) -> usize {
        self.model.cache_len(&self.cache)
    }
}

/// The acceptance rule over a draft tree (a chain is a tree). Rows are
/// `[pending, drafts..]`, shaped by `tree`; `choose(row)` commits the
/// model's token for the position after `row` and says whether generation
/// must stop there. From the root, the walk descends into the child that
/// carries the model's token; where none does, that token ends the walk in
/// the child's place. Returns the rows walked (the root first) and the
/// committed tokens, one per row walked: at least one.
pub fn accept(
    tree: &Tree,
    rows: &[u32],
    mut choose: impl FnMut(usize) -> (u32, bool),
) -> (Vec<usize>, Vec<u32>) {
    let (mut path, mut out) = (Vec::new(), Vec::new());
    let mut row = 0;
    loop {
        let (f, stop) = choose(row);
        path.push(row);
        out.push(f);
        if stop {
            break;
        }
        match tree.children(row).find(|&c| rows.get(c) == Some(&f)) {
            Some(c) => row = c,
            None => break,
        }
    }
    (path, out)
}

/// Greedy continuation with the final head's top-1 probability and entropy
/// at every generated position (the drafter's training data).
pub fn greedy_with_stats<M: Forward>(
    model: &M,
    prompt: &[u32],
    max_tokens: usize,
    eot: u32,
) -> Result<(Vec<u32>, Vec<Verified>)> {
    let params = GenParams {
        max_tokens,
        speculate: false,
        stop_at_eot: false,
        ..Default::default()
    };
    let (mut g, _) = Generator::new(model, Proposer::None, prompt, params, eot, None)?;
    g.track_verified = true;
    let mut stats = Vec::new();
    while g.finished.is_none() {
        let out = g.step()?;
        if out.is_empty() {
            break;
        }
        stats.push(g.verified);
    }
    Ok((g.tokens, stats))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// A toy model over 3 tokens: p(next | last).
    fn toy(last: u32) -> [f32; 3] {
        match last {
            0 => [0.5, 0.3, 0.2],
            1 => [0.1, 0.6, 0.3],
            _ => [0.3, 0.3, 0.4],
        }
    }

    fn logits(last: u32) -> Vec<f32> {
        toy(last).iter().map(|p| p.ln()).collect()
    }

    /// Decodes 3 tokens after token 2 with drafts [0, 0] at every step,
    /// using `rule` to accept drafts.
    fn spec_decode(seed: u64, rule: &dyn Fn(u32, u32, &[f32]) -> bool) -> Vec<u32> {
        let p = SamplingParams {
            temperature: 1.0,
            seed,
            ..Default::default()
        };
        let mut seq = vec![2u32];
        while seq.len() < 4 {
            let kept = (4 - seq.len()).min(3);
            let rows = [*seq.last().unwrap(), 0, 0];
            let mut ctx = seq.clone();
            let (_, got) = accept(&Tree::chain(kept), &rows[..kept], |i| {
                let l = logits(*ctx.last().unwrap());
                let sample = sampling::choose(&l, &p, 0, ctx.len());
                let d = rows[..kept].get(i + 1).copied().unwrap_or(u32::MAX);
                let f = if rule(d, sample, &l) { d } else { sample };
                ctx.push(f);
                (f, ctx.len() >= 4)
            });
            seq.extend(got);
        }
        seq[1..4].to_vec()
    }

    fn exact() -> HashMap<Vec<u32>, f64> {
        let mut m = HashMap::new();
        for a in 0..3u32 {
            for b in 0..3u32 {
                for c in 0..3u32 {
                    let pr = toy(2)[a as usize] as f64
                        * toy(a)[b as usize] as f64
                        * toy(b)[c as usize] as f64;
                    m.insert(vec![a, b, c], pr);
                }
            }
        }
        m
    }

    fn max_deviation(rule: &dyn Fn(u32, u32, &[f32]) -> bool) -> f64 {
        let n = 30_000;
        let mut counts: HashMap<Vec<u32>, usize> = HashMap::new();
        for seed in 0..n {
            *counts.entry(spec_decode(seed, rule)).or_default() += 1;
        }
        exact()
            .iter()
            .map(|(k, p)| (counts.get(k).copied().unwrap_or(0) as f64 / n as f64 - p).abs())
            .fold(0.0, f64::max)
    }

    #[test]
    fn sample_then_compare_matches_plain_sampling_by_enumeration() {
        // Accept a draft iff it equals the keyed sample at its position.
        let dev = max_deviation(&|d, s, _| d == s);
        assert!(dev < 0.012, "max deviation {dev}");
    }

    #[test]
    fn a_broken_acceptance_rule_is_caught() {
        // Accepting any draft the model gives at least 20% is not sampling.
        let dev = max_deviation(&|d, s, l| d == s || (d < 3 && l[d as usize].exp() >= 0.2));
        assert!(dev > 0.03, "max deviation {dev}");
    }

    #[test]
    fn accept_yields_at_least_one_token_and_stops_at_the_first_mismatch() {
        let tokens = |r: (Vec<usize>, Vec<u32>)| r.1;
        assert_eq!(
            tokens(accept(&Tree::chain(1), &[3], |_| (7, false))),
            vec![7]
        );
        let picks = [5u32, 6, 9, 1];
        let rows = [3, 5, 6, 8];
        let chain = Tree::chain(4);
        assert_eq!(
            tokens(accept(&chain, &rows, |i| (picks[i], false))),
            vec![5, 6, 9]
        );
        let two = Tree::chain(2);
        assert_eq!(
            tokens(accept(&two, &rows[..2], |i| (picks[i], false))),
            vec![5, 6]
        );
        assert_eq!(
            tokens(accept(&chain, &rows, |i| (picks[i], i == 0))),
            vec![5]
        );
    }

    #[test]
    fn accept_descends_into_the_child_that_carries_the_models_token() {
        // Root 3 with children 5 (row 1) and 7 (row 2); 7 has child 9 (row
        // 3), 5 has child 9 (row 4). The model says 7, then 9, then 4.
        let tree = Tree::from_parents(vec![0, 0, 0, 2, 1]).unwrap();
        let rows = [3, 5, 7, 9, 9];
        let picks = |r: usize| match r {
            0 => 7,
            2 => 9,
            _ => 4,
        };
        let (path, out) = accept(&tree, &rows, |r| (picks(r), false));
        assert_eq!(path, vec![0, 2, 3]);
        assert_eq!(out, vec![7, 9, 4]);
    }

    #[test]
    fn an_exit_margin_is_how_far_the_best_rival_outscores_the_draft() {
        let ids = [3, 9, 20];
        let z = [1.0, 4.0, 2.5];
        assert_eq!(exit_margin(&z, &ids, 9, None), -1.5);
        assert_eq!(exit_margin(&z, &ids, 20, None), 1.5);
        assert_eq!(exit_margin(&z, &ids, 3, None), 3.0);
        // Sampling: each score is z / T plus the token's keyed noise, as
        // the final head draws its sample.
        let g = Noise::at(7, 0, 12);
        let s = |i: usize| z[i] / 0.5 + g.gumbel(ids[i]);
        let want = s(0).max(s(2)) - s(1);
        assert!((exit_margin(&z, &ids, 9, Some((0.5, g))) - want).abs() < 1e-6);
    }

    #[test]
    fn over_the_whole_vocabulary_a_draft_beats_its_rivals_exactly_when_the_sampler_draws_it() {
        let z: Vec<f32> = (0..50).map(|i| (i * 37 % 11) as f32 * 0.3).collect();
        let ids: Vec<u32> = (0..50).collect();
        let (seed, stream, temp) = (3, 5, 0.8);
        let sp = SamplingParams {
            temperature: temp,
            seed,
            ..Default::default()
        };
        for pos in 0..40 {
            let drawn = sampling::choose(&z, &sp, stream, pos);
            let noise = Some((temp, Noise::at(seed, stream, pos)));
            for d in 0..50 {
                let m = exit_margin(&z, &ids, d, noise);
                assert_eq!(m < 0.0, d == drawn, "position {pos}, draft {d}: margin {m}");
            }
        }
    }

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
