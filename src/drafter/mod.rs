//! The tree drafter: a gradient-boosted classifier that proposes the next
//! tokens where the model is predictable and says `__MODEL__` elsewhere.
//!
//! Classes: the K tokens the model most often predicts, then pointer classes
//! (COPY_TRIGRAM, COPY_BIGRAM, COPY_SUFFIX, COPY_CONTEXT: "the candidate of
//! that source", which lets drafts leave the K tokens), then `__MODEL__`.
//! A row's target is every class that yields the model's top-1 token (soft
//! target), or `__MODEL__` when none does. At draft time class probabilities
//! are summed per token they resolve to; the best token is drafted when its
//! probability reaches `threshold`, and drafting continues on the extended
//! context up to `k_max` tokens.
//!
//! This module never touches candle: it sees token ids and plain rows.
//! Labelling with the model lives in `train::label`.
//!
//! - `draft`: the estimate of the next token, chains and trees of drafts;
//! - `file`: the drafter file (save, load and its checks);
//! - `replay`: offline replay of drafting and the prompt-lookup baseline;
//! - `sampled_tree`: draft trees at temperature > 0 (Gumbel-top-k children
//!   sized by the cost curve), and `calibration`: their children's chances;
//! - `ngram`: bigram and trigram continuation tables over the whole
//!   vocabulary, which widen sampled drafts' candidates.

pub mod calibration;
mod draft;
pub mod features;
mod file;
pub mod gbdt;
pub mod ngram;
mod replay;
mod sampled_tree;

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use features::{Candidates, FeatureInput, Tables, Verified};
use gbdt::Gbdt;

pub use draft::{Draft, DraftRule, Estimate, TreeDraft, MAX_CHILDREN};
pub use file::DrafterError;
pub use replay::{prompt_lookup, replay, Replay};
pub use sampled_tree::{Ranked, SampleKey, Sizing};

use calibration::Calibration;
use ngram::Ngrams;

/// 2: 14 features (six that did not pay dropped).
pub const FORMAT_VERSION: u32 = 2;
/// Pointer classes after the K token classes, then `__MODEL__`.
pub const N_POINTERS: usize = 4;
pub const MODEL_CLASS_NAME: &str = "__MODEL__";

/// Cost model of a verify step for a drafter whose report holds no measured
/// curve (one built in a test or by hand; `train-drafter` always stores
/// one, `train::label::verify_costs`): k drafts cost `1 + 0.15 k` one-row
/// steps. 0.15 is not derived: it was set in commit 957291a, when the
/// shipped model measured 1.8-2.2x for 8 drafts (1 + 0.15 x 8 = 2.2); the
/// current one measures 1.64x (`models/default/drafter.json`). The server
/// and the bench size drafts by the curve they measure on the machine that
/// decodes (`scheduler::Budget::verify_costs`, `cli::bench::row_costs`);
/// the stored curve sizes them in `sample`.
pub const GUESSED_COST_PER_DRAFT: f64 = 0.15;

#[derive(Serialize, Deserialize, Clone)]
pub struct Drafter {
    pub version: u32,
    pub vocab_size: usize,
    /// The K token classes.
    pub classes: Vec<u32>,
    pub tables: Tables,
    pub gbdt: Gbdt,
    /// Draft a token when its probability reaches this.
    pub threshold: f32,
    /// Longest chain drafted per verify step.
    pub k_max: usize,
    /// At temperature T, sampled drafts come from the estimate raised to
    /// `sample_sharpness / T` ([`DraftRule::Sample`]); tuned on the train
    /// split (docs/benchmarks.md).
    #[serde(default = "default_sample_sharpness")]
    pub sample_sharpness: f32,
    /// A sibling joins a draft tree when the drafter gives it at least
    /// this probability (a node's first child follows the chain's rule,
    /// `threshold`); tuned on the train split (docs/benchmarks.md).
    #[serde(default = "default_sibling_floor")]
    pub sibling_floor: f32,
    /// Chances that a sampled tree's child is the model's sample, per
    /// sampling setting (`gpt-serve calibrate-drafter`); absent in older
    /// files: uncalibrated.
    #[serde(default)]
    pub calibration: Calibration,
    /// The n-gram table file beside this one (`gpt-serve count-ngrams`);
    /// absent in older files: the trees' candidates only.
    #[serde(default)]
    pub ngram_file: Option<String>,
    /// Share of the mass outside the trees' candidates that sampled drafts
    /// spread over the n-gram tables' successors ([`Drafter::estimate_wide`]).
    #[serde(default = "default_ngram_weight")]
    pub ngram_weight: f32,
    /// Whether each token starts a word (from the tokenizer).
    pub word_start: Vec<bool>,
    /// Training report: feature importances, replay figures.
    #[serde(default)]
    pub report: serde_json::Value,
    #[serde(skip)]
    class_index: Vec<u32>,
    /// The tables `ngram_file` names, once loaded.
    #[serde(skip)]
    pub ngrams: Option<Arc<Ngrams>>,
}

fn default_ngram_weight() -> f32 {
    1.0
}

fn default_sample_sharpness() -> f32 {
    1.0
}

fn default_sibling_floor() -> f32 {
    0.05
}

impl Drafter {
    pub fn new(
        vocab_size: usize,
        classes: Vec<u32>,
        tables: Tables,
        gbdt: Gbdt,
        word_start: Vec<bool>,
        threshold: f32,
        k_max: usize,
    ) -> Self {
        let mut d = Drafter {
            version: FORMAT_VERSION,
            vocab_size,
            classes,
            tables,
            gbdt,
            threshold,
            k_max,
            sample_sharpness: default_sample_sharpness(),
            sibling_floor: default_sibling_floor(),
            calibration: Calibration::default(),
            ngram_file: None,
            ngram_weight: default_ngram_weight(),
            word_start,
            report: serde_json::Value::Null,
            class_index: vec![],
            ngrams: None,
        };
        d.index();
        d
    }

    fn index(&mut self) {
        let k = self.classes.len() as u32;
        self.class_index = vec![k; self.vocab_size];
        for (i, &t) in self.classes.iter().enumerate() {
            if let Some(slot) = self.class_index.get_mut(t as usize) {
                *slot = i as u32;
            }
        }
    }

    pub fn n_classes(&self) -> usize {
        self.classes.len() + N_POINTERS + 1
    }

    pub fn model_class(&self) -> usize {
        self.classes.len() + N_POINTERS
    }

    /// Class index of a token (K when it is not one of the K classes).
    pub fn class_of(&self, t: u32) -> usize {
        self.class_index
            .get(t as usize)
            .copied()
            .unwrap_or(self.classes.len() as u32) as usize
    }

    /// Measured cost of verifying k drafts relative to a plain step (index
    /// k = 0..=k_max), from training; [`GUESSED_COST_PER_DRAFT`] per draft
    /// when absent.
    pub fn verify_costs(&self) -> Vec<f64> {
        let measured: Vec<f64> = self.report["verify_cost"]
            .as_array()
            .map_or(vec![], |v| v.iter().filter_map(|x| x.as_f64()).collect());
        if measured.len() > self.k_max {
            let mut c = measured;
            c[0] = 1.0;
            c
        } else {
            (0..=self.k_max)
                .map(|k| 1.0 + GUESSED_COST_PER_DRAFT * k as f64)
                .collect()
        }
    }

    /// Feature row and candidates for predicting the token after `ctx`.
    pub fn features(&self, ctx: &[u32], verified: Verified) -> (Vec<f32>, Candidates) {
        let class_of = |t: u32| self.class_of(t);
        features::features(&FeatureInput {
            ctx,
            verified,
            tables: &self.tables,
            class_of: &class_of,
            word_start: &self.word_start,
        })
    }

    /// The classes (soft target) that yield `next` given the candidates.
    pub fn target(&self, next: u32, cand: &Candidates) -> gbdt::Target {
        let k = self.classes.len() as u32;
        let mut hits: Vec<u32> = Vec::new();
        if (self.class_of(next) as u32) < k {
            hits.push(self.class_of(next) as u32);
        }
        for (i, c) in [cand.trigram, cand.bigram, cand.suffix, cand.context]
            .iter()
            .enumerate()
        {
            if *c == Some(next) {
                hits.push(k + i as u32);
            }
        }
        if hits.is_empty() {
            return vec![(self.model_class() as u32, 1.0)];
        }
        let w = 1.0 / hits.len() as f32;
        hits.into_iter().map(|c| (c, w)).collect()
    }
}
