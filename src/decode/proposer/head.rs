//! The draft head's proposer (`model::draft_head`): when sampling, a chain
//! drafted from the model's own features at the last verified row, each
//! draft the sampler's keyed draw (`sampling::choose`, same seed, stream
//! and position) from the head's logits, so it is the model's sample
//! whenever the head's distribution is close enough to the model's. The
//! chain is as long as the sequence's acceptance rate and the verify cost
//! curve say pays. Greedy requests go to the proposer it wraps (the tree
//! drafter, better than the head at the argmax on the shipped model:
//! docs/benchmarks.md).

use super::{best_chain_len, AcceptRate, DraftRequest, Drafts, Proposer, Verdict};
use crate::drafter::DraftRule;
use crate::model::draft_head::DraftHead;
use crate::sampling::{self, SamplingParams};

pub struct HeadDrafter<'m> {
    head: &'m DraftHead,
    /// The final features of the last verified row (empty before the
    /// first verify step).
    features: Vec<f32>,
    accept: AcceptRate,
    /// Verify cost of k drafts relative to a plain step.
    verify_costs: Vec<f64>,
    /// Drafts greedy requests.
    greedy: Box<dyn Proposer + 'm>,
    /// Whether the last drafts (or shadow) were the head's.
    ours: bool,
}

impl<'m> HeadDrafter<'m> {
    pub fn new(
        head: &'m DraftHead,
        verify_costs: Vec<f64>,
        greedy: Box<dyn Proposer + 'm>,
    ) -> HeadDrafter<'m> {
        HeadDrafter {
            head,
            features: vec![],
            accept: AcceptRate::default(),
            verify_costs,
            greedy,
            ours: false,
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
            return self.greedy.propose(req);
        };
        self.ours = true;
        if self.features.len() != self.head.n_embd() {
            return Drafts::none();
        }
        let a = self.accept.get().clamp(0.01, 0.99);
        // Each draft's path gain is a^i: stop where it no longer pays a row.
        let worth = (1..=req.room).take_while(|&i| a.powi(i as i32) >= f64::from(req.min_gain));
        let worth = worth.count();
        if worth == 0 {
            // No row pays in this batch: no draft, and no shadow either (a
            // head draft reads ~2.6 MB of weights, ~0.1 ms here).
            return Drafts::none();
        }
        let k = best_chain_len(a, &self.verify_costs).min(worth);
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
            return self.greedy.observe(v);
        }
        if let Some(t) = v.shadow {
            self.accept.update(f64::from(u8::from(t == v.first)));
        }
        self.accept.observe(v);
        // The wrapped proposer keeps the model's view, not our drafts' count.
        self.greedy.observe(&Verdict {
            deepest: 0,
            accepted: 0,
            shadow: None,
            ..*v
        });
    }

    fn rivals(&self) -> &[u32] {
        self.greedy.rivals()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::proposer::{Lookup, Plain};
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

    #[test]
    fn sampled_drafts_are_the_keyed_draws_of_the_heads_logits() {
        let h = head();
        let costs = vec![1.0, 1.1, 1.2, 1.3];
        let mut p = HeadDrafter::new(&h, costs, Box::new(Plain));
        let ctx = [1u32, 2, 3];
        assert!(
            p.propose(&req(&ctx, SAMPLE)).tokens.is_empty(),
            "no features yet"
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
    fn greedy_requests_go_to_the_wrapped_proposer() {
        let h = head();
        let mut p = HeadDrafter::new(&h, vec![1.0, 1.1], Box::new(Lookup::new(4)));
        p.observe(&verdict(&[0.5; 32]));
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
