//! The generator: one sequence's decoding, prefill then verify steps.
//! A step reads as draft -> verify -> accept: the proposer drafts
//! ([`Generator::next_rows`]), one forward verifies `[pending, drafts..]`
//! (alone, [`Generator::forward_alone`], or batched by the engine), and
//! [`Generator::commit`] accepts by [`accept`], commits the new tokens and
//! rolls the KV cache back to them. The exit cascade and LayerSkip
//! drafting step in `cascade`.

use std::collections::HashMap;

use candle_core::Result;

use super::proposer::plain::Recorder;
use super::proposer::{DraftRequest, Drafts, Proposer, RowPrice, Verdict};
use super::rows::{accept, Drafted, RowKind, Rows};
use super::{Finish, GenParams, SpecStats, TokenOut};
use crate::drafter::features::Verified;
use crate::drafter::DraftRule;
use crate::model::cpu::CpuGpt;
use crate::model::forward::{Forward, Logits, Segment, Tree};
use crate::sampling;

/// One sequence being decoded: prefill (its prompt goes into the cache,
/// chunk by chunk), then decode (one verify step per forward), then done.
/// Invariant once prefilled: `cache` holds `tokens[..len-1]`; the last
/// token is pending.
pub struct Generator<'m, M: Forward = CpuGpt> {
    pub(super) model: &'m M,
    /// Where the drafts come from; it keeps its own state.
    pub(super) proposer: Box<dyn Proposer + 'm>,
    pub params: GenParams,
    pub(super) cache: M::Cache,
    pub(super) tokens: Vec<u32>,
    prompt_len: usize,
    /// Prompt tokens in the cache (prefill is done at `prompt_len - 1`).
    prefilled: usize,
    /// Top logprobs per prompt token, when echo logprobs are asked, and
    /// those computed so far (None for the first token).
    echo_top: Option<usize>,
    echo: Vec<Option<TokenOut>>,
    counts: HashMap<u32, u32>,
    pub stats: SpecStats,
    pub finished: Option<Finish>,
    pub(super) eot: u32,
    /// When the verify step now being committed began, when the sequence
    /// steps alone ([`Self::step`]): its time goes to the proposer.
    step_started: Option<std::time::Instant>,
}

impl<'m, M: Forward> Generator<'m, M> {
    /// Prefills `prompt` (at least one token) in one forward. With
    /// `echo_logprobs`, returns each prompt token's logprob and top
    /// alternatives (None for the first).
    pub fn new(
        model: &'m M,
        proposer: Box<dyn Proposer + 'm>,
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
        proposer: Box<dyn Proposer + 'm>,
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
            stats: SpecStats::default(),
            finished: None,
            eot,
            step_started: None,
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

    pub(super) fn remaining(&self) -> usize {
        self.params
            .max_tokens
            .saturating_sub(self.tokens.len() - self.prompt_len)
    }

    /// The rows for the next forward: up to `max_rows` prompt tokens while
    /// in prefill, else `[pending, drafts..]` with as many drafts as the
    /// proposer and the draft-length rule give (the caller may drop some
    /// with [`Rows::keep_rows`]). None when the sequence is done.
    pub fn next_rows(&mut self, max_rows: usize) -> Option<Rows> {
        self.next_rows_in_batch(max_rows, RowPrice::ALONE)
    }

    /// As [`Self::next_rows`], drafting only while a draft's expected gain
    /// (the drafter's path probability) is at least `price.min_gain`: what
    /// a row must bring to pay for its marginal cost in the batch being
    /// built.
    pub fn next_rows_in_batch(&mut self, max_rows: usize, price: RowPrice) -> Option<Rows> {
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
        let drafts = self.propose(max_rows - 1, price, true);
        let pending = *self.tokens.last().expect("non-empty");
        Some(Rows {
            tokens: [&[pending][..], &drafts.tokens].concat(),
            pos: self.tokens.len() - 1,
            kind: RowKind::Verify {
                probs: drafts.probs,
                shadow: drafts.shadow,
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
    /// finished). The exit cascade and LayerSkip drafting, when on, run in
    /// their own step (`cascade`); otherwise the step is [`Self::next_rows`],
    /// a forward of this sequence alone, and [`Self::commit`].
    pub fn step(&mut self) -> Result<Vec<TokenOut>> {
        self.prefill_alone()?;
        if self.params.cascade || self.params.self_draft.is_some() {
            return self.step_with_exits();
        }
        // Draft: `[pending, drafts..]`.
        let Some(rows) = self.next_rows(usize::MAX) else {
            return Ok(vec![]);
        };
        // Verify: the final head's logits of every row.
        self.step_started = Some(std::time::Instant::now());
        let logits = self.forward_alone(&rows)?;
        // Accept, commit, roll the cache back.
        Ok(self.commit(rows, &logits))
    }

    /// Drafts for the next step, clamped so the step cannot pass max_tokens,
    /// the window or `cap`, and stopped where the path probability falls
    /// below `min_gain` (a tree when `branch` and the drafter can); and,
    /// as [`Drafts::shadow`], the first draft held back when drafting did
    /// not pay. No drafts unless `params.speculate`.
    pub(super) fn propose(&mut self, cap: usize, price: RowPrice, branch: bool) -> Drafts {
        let t = std::time::Instant::now();
        let out = self.propose_untimed(cap, price, branch);
        self.stats.draft_secs += t.elapsed().as_secs_f64();
        out
    }

    fn propose_untimed(&mut self, cap: usize, price: RowPrice, branch: bool) -> Drafts {
        // No path probability exceeds 1: above it, no draft could pay.
        if !self.params.speculate || price.min_gain > 1.0 {
            return Drafts::none();
        }
        let cfg = self.model.config();
        let room = (self.remaining() - 1)
            .min(cfg.block_size - self.tokens.len())
            .min(cap);
        let rule = self.draft_rule();
        let trees = match rule {
            DraftRule::Best => self.params.draft_tree,
            DraftRule::Sample { .. } => self.params.sampled_trees,
        };
        let req = DraftRequest {
            tokens: &self.tokens,
            prompt_len: self.prompt_len,
            room,
            min_gain: price.min_gain,
            time_value: price.time_value,
            branch: branch && trees && self.model.supports_trees(),
            rule,
        };
        self.proposer.propose(&req)
    }

    /// How the drafter drafts for this sequence's sampling.
    fn draft_rule(&self) -> DraftRule {
        let sp = &self.params.sampling;
        match sp.is_greedy() || !self.params.draft_with_noise {
            true => DraftRule::Best,
            false => DraftRule::Sample {
                seed: sp.seed,
                stream: self.params.stream(),
                temperature: sp.temperature,
                top_p: sp.top_p,
            },
        }
    }

    /// Walks the verified rows `rows` (`[pending, drafts..]`, shaped by
    /// `tree`, their final logits in `logits`) by [`accept`], commits the
    /// tokens, keeps the walked rows' cache slots and drops the rest,
    /// updates the proposer's state and the counters (`drafted` drafts were
    /// made, verified or not).
    pub(super) fn accept_rows(
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
        let accepted = out.len() - 1;
        let could_draft = !self.proposer.is_plain() && self.params.speculate;
        let st = &mut self.stats;
        let deepest = match drafted {
            Drafted::ByExit(n) => {
                st.record_exit_drafts(n, accepted);
                0
            }
            Drafted::Chain(n) => st.record((1..=n).collect(), accepted, false, could_draft),
            Drafted::Tree => {
                let depths = (1..tree.len()).map(|r| tree.depth(r)).collect();
                let later_child = path
                    .iter()
                    .any(|&r| r > 0 && tree.children(tree.parent(r)).next() != Some(r));
                st.record(depths, accepted, later_child, could_draft)
            }
        };
        let secs = self.step_started.take().map(|t| t.elapsed().as_secs_f64());
        if let Some(s) = secs {
            self.stats.time_step(rows.len(), s);
        }
        // The drafter's state: its features read the model's stats where
        // it last committed.
        self.proposer.observe(&Verdict {
            deepest,
            accepted,
            first: out[0].id,
            shadow,
            logits: &logits[*path.last().expect("the root")],
            features: logits.features(*path.last().expect("the root")),
            rows: rows.len(),
            secs,
        });
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

    /// Runs to the end; returns the generated tokens.
    pub fn run(&mut self) -> Result<Vec<TokenOut>> {
        let mut all = Vec::new();
        while self.finished.is_none() {
            all.extend(self.step()?);
        }
        Ok(all)
    }

    /// The KV-cache invariant (docs/design.md): every layer holds exactly the
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
    let mut stats = Vec::new();
    let recorder = Box::new(Recorder { out: &mut stats });
    let (mut g, _) = Generator::new(model, recorder, prompt, params, eot, None)?;
    while g.finished.is_none() {
        if g.step()?.is_empty() {
            break;
        }
    }
    let tokens = std::mem::take(&mut g.tokens);
    drop(g);
    Ok((tokens, stats))
}
