//! What a caller asks of one sequence's decoding ([`GenParams`], with
//! LayerSkip's [`SelfDraft`]) and what it gets back ([`TokenOut`],
//! [`Finish`]).

use super::cascade::DEFAULT_EXIT_MARGIN;
use crate::sampling::SamplingParams;

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
    /// At temperature > 0 (with `draft_with_noise`), let the tree drafter
    /// draft a sampled tree: Gumbel-top-k children with the sampler's keyed
    /// noise, sized by their calibrated chances and the verify cost curve
    /// (`drafter::sampled_tree`); false (the default): a chain. On the
    /// default model they add 4-7% tokens per verify step but no speed on
    /// the 2-core EPYC (docs/benchmarks.md, issue #31).
    pub sampled_trees: bool,
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
    ///
    /// [`exit_margin`]: super::exit_margin
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
    /// (docs/design.md); prompt 0 keeps the single-prompt keys of before.
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
            sampled_trees: false,
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Finish {
    Length,
    Eot,
}
