//! The draft head's proposer (`model::draft_head`): when sampling, a chain
//! drafted from the model's own features at the last verified row, each
//! draft the sampler's keyed draw (`sampling::choose`, same seed, stream
//! and position) from the head's logits, so it is the model's sample
//! whenever the head's distribution is close enough to the model's. The
//! chain is as long as the sequence's acceptance rate, the verify cost
//! curve and the head's own drafting time say pays, in the batch's prices.
//! Greedy requests go to the proposer it wraps (the tree drafter, better
//! than the head at the argmax on the shipped model: docs/benchmarks.md),
//! and so do sampled ones until the model has given features (the first
//! step after the prompt; candle's backend gives none).

use super::{
    best_chain_len, AcceptRate, Costs, DraftRequest, Drafts, Proposer, ShadowClock, Verdict,
};
use crate::drafter::DraftRule;
use crate::model::draft_head::DraftHead;
use crate::model::forward::{Forward, Segment};
use crate::sampling::{self, SamplingParams};

pub struct HeadDrafter<'m> {
    head: &'m DraftHead,
    /// The final features of the last verified row (empty before the
    /// first verify step).
    features: Vec<f32>,
    accept: AcceptRate,
    /// Verify cost of k drafts, and of one head draft, relative to a
    /// plain step.
    costs: Costs,
    /// Drafts greedy requests, and sampled ones until the model has given
    /// features.
    fallback: Box<dyn Proposer + 'm>,
    /// Whether the last drafts (or shadow) were the head's.
    ours: bool,
    /// When the next shadow draft is due, while no chain pays.
    shadows: ShadowClock,
}

impl<'m> HeadDrafter<'m> {
    pub fn new(
        head: &'m DraftHead,
        costs: Costs,
        fallback: Box<dyn Proposer + 'm>,
    ) -> HeadDrafter<'m> {
        HeadDrafter {
            head,
            features: vec![],
            accept: AcceptRate::default(),
            costs,
            fallback,
            ours: false,
            shadows: ShadowClock::default(),
        }
    }

    /// `k` drafts after `tokens` (its last token pending), each the keyed
    /// draw of `sp` at its position from the head's logits.
    fn chain(&self, tokens: &[u32], k: usize, sp: &SamplingParams, stream: u64) -> Vec<u32> {
        let mut logits = vec![0f32; self.head.vocab()];
        let mut f = self.features.clone();
        let mut out = Vec::with_capacity(k);
        let Some(&pending) = tokens.last() else {
            return out;
        };
        let mut x = pending;
        for i in 0..k {
            let Some(next) = self.head.next_features(&f, x) else {
                break;
            };
            f = next;
            self.head.logits(&f, &mut logits);
            x = sampling::choose(&logits, sp, stream, tokens.len() + i);
            out.push(x);
        }
        out
    }
}

impl Proposer for HeadDrafter<'_> {
    fn propose(&mut self, req: &DraftRequest) -> Drafts {
        let DraftRule::Sample {
            seed,
            stream,
            temperature,
            top_p,
        } = req.rule
        else {
            self.ours = false;
            return self.fallback.propose(req);
        };
        // The first step after the prompt, or a backend that gives no
        // features (candle's): the wrapped proposer drafts.
        self.ours = self.features.len() == self.head.n_embd();
        if !self.ours {
            return self.fallback.propose(req);
        }
        let a = self.accept.get().clamp(0.01, 0.99);
        // Draft i's path gain is a^i: it must pay for its row in the batch
        // and for the time drafting it takes, in the batch's tokens.
        let price = f64::from(req.min_gain) + self.costs.head_draft * f64::from(req.time_value);
        let worth = (1..=req.room)
            .take_while(|&i| a.powi(i as i32) >= price)
            .count();
        if worth == 0 {
            // No draft pays in this batch: none, and no shadow either (a
            // head draft reads ~2.6 MB of weights).
            return Drafts::none();
        }
        let k = best_chain_len(a, &self.costs.verify, self.costs.head_draft).min(worth);
        if k == 0 && !self.shadows.due() {
            return Drafts::none();
        }
        let sp = SamplingParams {
            temperature,
            top_p,
            seed,
            ..SamplingParams::default()
        };
        let drafts = self.chain(req.tokens, k.max(1), &sp, stream);
        match k {
            0 => Drafts {
                shadow: drafts.first().copied(),
                ..Drafts::none()
            },
            _ => Drafts::chain(drafts, a as f32),
        }
    }

    fn observe(&mut self, v: &Verdict) {
        self.features.clear();
        self.features.extend_from_slice(v.features);
        if !self.ours {
            return self.fallback.observe(v);
        }
        if let Some(t) = v.shadow {
            self.accept.update(f64::from(u8::from(t == v.first)));
        }
        self.accept.observe(v);
        self.fallback.observe(&v.without_drafts());
    }

    fn rivals(&self) -> &[u32] {
        self.fallback.rivals()
    }
}

/// Rounds of [`measure_draft_cost`]; each side keeps its best time. With
/// 8, separate bench runs on the shared 2-core machine measured 0.09-0.13
/// of a step (and priced chains by it); a round is ~1 ms, so 32 cost ~30 ms
/// at engine start.
const COST_ROUNDS: usize = 32;

/// One head draft's time relative to a plain one-row step of `model` at
/// a context of 64 tokens, best of a few rounds each, interleaved (load on
/// a shared machine hits both alike).
pub fn measure_draft_cost<M: Forward>(model: &M, head: &DraftHead) -> candle_core::Result<f64> {
    let cfg = model.config();
    let ctx = 64.min(cfg.block_size - 1);
    let prompt: Vec<u32> = (0..ctx as u32).map(|i| i % cfg.vocab_size as u32).collect();
    let mut cache = model.new_cache()?;
    let run = |tokens: &[u32], pos: usize, cache: &mut M::Cache| {
        let logits = 0..1;
        let mut seg = [Segment {
            tokens,
            pos,
            cache,
            logits,
            tree: None,
        }];
        model.forward_batch(&mut seg).map(|mut l| l.pop())
    };
    let first = run(&prompt, 0, &mut cache)?;
    let mut f = first.map(|l| l.features(0).to_vec()).unwrap_or_default();
    f.resize(head.n_embd(), 0.0);
    let mut logits = vec![0f32; head.vocab()];
    let sp = SamplingParams {
        temperature: 1.0,
        ..SamplingParams::default()
    };
    let (mut step, mut draft) = (f64::MAX, f64::MAX);
    for round in 0..COST_ROUNDS {
        let t = std::time::Instant::now();
        run(&[1], ctx, &mut cache)?;
        step = step.min(t.elapsed().as_secs_f64());
        model.truncate_cache(&mut cache, ctx);
        let t = std::time::Instant::now();
        if let Some(next) = head.next_features(&f, round as u32 % head.vocab() as u32) {
            head.logits(&next, &mut logits);
            std::hint::black_box(sampling::choose(&logits, &sp, 0, ctx));
        }
        draft = draft.min(t.elapsed().as_secs_f64());
    }
    Ok(draft / step.max(1e-9))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::proposer::{Lookup, Plain, SHADOW_EVERY};
    use crate::model::draft_head::random_parts;

    fn head() -> DraftHead {
        let (cfg, t, wte) = random_parts(32, 32, 40);
        DraftHead::from_tensors(&cfg, &t, &wte).unwrap()
    }

    fn req(tokens: &[u32], rule: DraftRule) -> DraftRequest<'_> {
        DraftRequest {
            tokens,
            prompt_len: 1,
            room: 8,
            min_gain: 0.0,
            time_value: 1.0,
            branch: false,
            rule,
        }
    }

    const SAMPLE: DraftRule = DraftRule::Sample {
        seed: 3,
        stream: 0,
        temperature: 0.8,
        top_p: 1.0,
    };

    fn verdict(features: &[f32]) -> Verdict<'_> {
        Verdict {
            deepest: 0,
            accepted: 0,
            first: 0,
            shadow: None,
            logits: &[],
            features,
        }
    }

    /// A head drafter over `h` priced by `verify` and `head_draft`, its
    /// first features already seen.
    fn primed<'h>(
        h: &'h DraftHead,
        verify: &[f64],
        head_draft: f64,
        fallback: Box<dyn Proposer + 'h>,
    ) -> HeadDrafter<'h> {
        let costs = Costs {
            verify: verify.to_vec(),
            head_draft,
        };
        let mut p = HeadDrafter::new(h, costs, fallback);
        p.observe(&verdict(&[0.5; 32]));
        p
    }

    #[test]
    fn sampled_drafts_are_the_keyed_draws_of_the_heads_logits() {
        let h = head();
        let costs = Costs {
            verify: vec![1.0, 1.1, 1.2, 1.3],
            head_draft: 0.05,
        };
        let mut p = HeadDrafter::new(&h, costs, Box::new(Plain));
        let ctx = [1u32, 2, 3];
        assert!(
            p.propose(&req(&ctx, SAMPLE)).tokens.is_empty(),
            "no features yet: the wrapped proposer (plain) drafts"
        );
        let f: Vec<f32> = (0..32).map(|i| (i as f32).cos()).collect();
        p.observe(&verdict(&f));
        let d = p.propose(&req(&ctx, SAMPLE));
        assert!(!d.tokens.is_empty(), "a chain once features are known");
        let sp = SamplingParams {
            temperature: 0.8,
            seed: 3,
            ..Default::default()
        };
        let (mut feats, mut x, mut logits) = (f.clone(), 3u32, vec![0f32; 40]);
        for (i, &t) in d.tokens.iter().enumerate() {
            feats = h.next_features(&feats, x).unwrap();
            h.logits(&feats, &mut logits);
            x = sampling::choose(&logits, &sp, 0, ctx.len() + i);
            assert_eq!(t, x, "draft {i}");
        }
    }

    #[test]
    fn a_batch_whose_time_is_worth_more_than_a_draft_gets_none_and_no_shadow() {
        let h = head();
        let mut p = primed(&h, &[1.0, 1.05, 1.1], 0.2, Box::new(Plain));
        let ctx = [1u32, 2, 3];
        // Alone (time worth 1 token a step): a draft at the prior's 0.6
        // pays for 0.2 of a step.
        assert!(!p.propose(&req(&ctx, SAMPLE)).tokens.is_empty());
        // A full batch (a step's time worth 4 tokens): 0.6 < 0.2 x 4.
        let busy = DraftRequest {
            time_value: 4.0,
            ..req(&ctx, SAMPLE)
        };
        let d = p.propose(&busy);
        assert!(d.tokens.is_empty() && d.shadow.is_none());
    }

    #[test]
    fn while_no_chain_pays_one_step_in_eight_drafts_a_shadow_and_the_rest_none() {
        let h = head();
        // One draft at the prior's 0.6 yields 1.6 tokens for 1.95 steps.
        let mut p = primed(&h, &[1.0, 1.9], 0.05, Box::new(Plain));
        let ctx = [1u32, 2, 3];
        let shadows: Vec<bool> = (0..2 * SHADOW_EVERY)
            .map(|_| {
                let d = p.propose(&req(&ctx, SAMPLE));
                assert!(d.tokens.is_empty(), "no chain");
                d.shadow.is_some()
            })
            .collect();
        let at: Vec<usize> = (0..shadows.len()).filter(|&i| shadows[i]).collect();
        assert_eq!(at, [SHADOW_EVERY - 1, 2 * SHADOW_EVERY - 1]);
    }

    #[test]
    fn greedy_requests_go_to_the_wrapped_proposer() {
        let h = head();
        let mut p = primed(&h, &[1.0, 1.1], 0.05, Box::new(Lookup::new(4)));
        // Prompt lookup drafts what followed the last token's earlier match.
        let ctx = [5u32, 6, 7, 8, 5, 6];
        let d = p.propose(&req(&ctx, DraftRule::Best));
        assert_eq!(
            d.tokens,
            Lookup::new(4).propose(&req(&ctx, DraftRule::Best)).tokens
        );
        assert!(!d.tokens.is_empty());
    }
}
