//! The draft head's proposer (`model::draft_head`): when sampling, a chain
//! drafted from the model's own features at the last verified row, each
//! draft the sampler's keyed draw (`sampling::choose`, same seed, stream
//! and position) from the head's logits, so it is the model's sample
//! whenever the head's distribution is close enough to the model's. How
//! close is read per draft from its margin over the runner-up, through the
//! head's calibration (fitted on the train split): a draft keeps its row
//! while its path's chance pays for the row in the batch's prices, and
//! drafting starts only where first drafts have paid for the head's own
//! drafting time. Greedy requests go to the proposer it wraps (the tree
//! drafter, better than the head at the argmax on the shipped model:
//! docs/benchmarks.md), and so do sampled ones until the model has given
//! features (the first step after the prompt; candle's backend gives none).

use super::{
    AcceptRate, Costs, DraftRequest, Drafts, Proposer, ShadowClock, SharedClock, Verdict,
    ACCEPT_EMA_WEIGHT, SHADOW_EVERY,
};
use crate::drafter::DraftRule;
use crate::model::draft_head::DraftHead;
use crate::model::forward::{Forward, Segment, Tree};
use crate::sampling::{self, SamplingParams};

pub struct HeadDrafter<'m> {
    head: &'m DraftHead,
    /// The final features of the last verified row (empty before the
    /// first verify step).
    features: Vec<f32>,
    /// The share of its verified drafts the model accepted, running: a
    /// draft's chance without a calibration, and what a deeper draft is
    /// expected to bring before it is drafted.
    accept: AcceptRate,
    /// What a first draft has been worth, running: its chance less its
    /// row's price, when positive (the row is not verified otherwise).
    /// None before the first draft.
    first_value: Option<f64>,
    /// Verify cost of k drafts, and of one head draft, relative to a
    /// plain step.
    costs: Costs,
    /// Drafts greedy requests, and sampled ones until the model has given
    /// features.
    fallback: Box<dyn Proposer + 'm>,
    /// Whether the last drafts (or shadow) were the head's.
    ours: bool,
    /// When the next shadow draft is due, while drafting does not pay.
    shadows: ShadowClock,
    /// What lone steps and drafts have cost as measured (the start-up
    /// `costs` until then), unless the costs are fixed: its own, or its
    /// engine's ([`HeadDrafter::with_clock`]).
    clock: Option<SharedClock>,
    /// The time of the head drafts made for the step being verified.
    draft_secs: f64,
}

/// While first drafts do not pay, one step in this many drafts a shadow
/// (the trees: [`SHADOW_EVERY`]): each costs a head draft, and its weights
/// push the model's out of the caches. One in 8 measured 0.93-0.99x plain
/// with q8_0 weights against 0.91-1.00x for one in 32 (3 runs,
/// docs/benchmarks.md, "Calibrated head drafts").
pub const HEAD_SHADOW_EVERY: usize = 4 * SHADOW_EVERY;

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
            first_value: None,
            costs,
            fallback,
            ours: false,
            shadows: ShadowClock::default(),
            clock: Some(SharedClock::default()),
            draft_secs: 0.0,
        }
    }

    /// This drafter priced by the costs it was given only, never by what
    /// it measures (for tests whose drafts must not depend on timing).
    pub fn with_fixed_costs(mut self) -> Self {
        self.clock = None;
        self
    }

    /// This drafter timing its steps and drafts on `clock`, and priced by
    /// what every drafter on it measured.
    pub fn with_clock(mut self, clock: SharedClock) -> Self {
        self.clock = Some(clock);
        self
    }

    /// One head draft's time relative to a plain step.
    fn draft_cost(&self) -> f64 {
        match &self.clock {
            Some(c) => c.lock().0.draft(&self.costs),
            None => self.costs.head_draft,
        }
    }

    /// The chance that the draft at `depth` with margin `margin` is
    /// accepted, its parent accepted: the head's calibration, else the
    /// running acceptance.
    fn chance(&self, depth: usize, margin: f32) -> f64 {
        match self.head.calibration() {
            Some(c) => c.accept(depth, margin),
            None => self.accept.get(),
        }
    }

    /// What the row of draft `depth` costs in the batch's tokens: the
    /// batch's floor, or its share of the verify cost curve (infinite past
    /// the curve).
    fn row_price(&self, req: &DraftRequest, depth: usize) -> f64 {
        let clock = self.clock.as_ref().map(SharedClock::lock);
        let verify = |k: usize| match &clock {
            Some(c) => c.0.verify(k, &self.costs),
            None => self.costs.verify.get(k).copied(),
        };
        match (verify(depth), verify(depth - 1)) {
            (Some(c), Some(b)) => {
                ((c - b) * f64::from(req.time_value)).max(f64::from(req.min_gain))
            }
            _ => f64::INFINITY,
        }
    }

    /// The chain of [`Proposer::propose`] once drafting is due: the drafts
    /// (or the first as the shadow) and how many were drafted.
    fn chain(
        &mut self,
        req: &DraftRequest,
        sp: &SamplingParams,
        stream: u64,
        drafting: f64,
    ) -> (Drafts, usize) {
        let mut logits = vec![0f32; self.head.vocab()];
        let mut f = self.features.clone();
        let (mut tokens, mut probs, mut shadow) = (vec![], vec![], None);
        let mut x = *req.tokens.last().expect("a pending token");
        let (mut path, mut drafted) = (1.0, 0);
        for depth in 1..=req.room {
            let pos = req.tokens.len() + depth - 1;
            let Some((t, margin, next)) = self.head.draw(&f, x, sp, stream, pos, &mut logits)
            else {
                break;
            };
            drafted += 1;
            f = next;
            let p = self.chance(depth, margin);
            if depth == 1 {
                let w = (p - self.row_price(req, 1)).max(0.0);
                let keep = 1.0 - ACCEPT_EMA_WEIGHT;
                self.first_value =
                    Some(self.first_value.map_or(w, |v| keep * v + (1.0 - keep) * w));
            }
            if path * p < self.row_price(req, depth) {
                shadow = (depth == 1).then_some(t);
                break;
            }
            path *= p;
            tokens.push(t);
            probs.push(p as f32);
            x = t;
            let next_pays = path * self.accept.get() >= self.row_price(req, depth + 1) + drafting;
            if !next_pays {
                break;
            }
        }
        let drafts = Drafts {
            tree: Tree::chain(tokens.len() + 1),
            tokens,
            probs,
            shadow,
        };
        (drafts, drafted)
    }
}

impl Proposer for HeadDrafter<'_> {
    /// Drafts one token at a time, each the keyed draw of the head's
    /// logits, and keeps it while its path's chance pays for its row; a
    /// first draft that does not is held back as the shadow. Drafting
    /// starts only when a first draft has been worth its drafting time
    /// (or one step in [`HEAD_SHADOW_EVERY`], to find out), and goes
    /// deeper only while a typical next draft would pay for both.
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
        if self.clock.as_ref().is_some_and(|c| !c.lock().1.allows()) {
            // Sampled drafting has lost to plain steps in this engine
            // lately: neither the head nor the wrapped proposer drafts.
            return Drafts::none();
        }
        if !self.ours {
            return self.fallback.propose(req);
        }
        let drafting = self.draft_cost() * f64::from(req.time_value);
        let first_row = self.row_price(req, 1);
        if req.room == 0 || 1.0 - first_row < drafting {
            // Not even a sure draft pays in this batch: none, and no
            // shadow either (a head draft reads ~1.4 MB of weights).
            return Drafts::none();
        }
        let value = self
            .first_value
            .unwrap_or((self.accept.get() - first_row).max(0.0));
        if value < drafting && !self.shadows.due_every(HEAD_SHADOW_EVERY) {
            return Drafts::none();
        }
        let sp = SamplingParams {
            temperature,
            top_p,
            seed,
            ..SamplingParams::default()
        };
        let t0 = std::time::Instant::now();
        let (drafts, drafted) = self.chain(req, &sp, stream, drafting);
        self.draft_secs = t0.elapsed().as_secs_f64();
        if let Some(c) = &self.clock {
            c.lock().0.drafted(drafted, self.draft_secs);
        }
        drafts
    }

    fn observe(&mut self, v: &Verdict) {
        if let (Some(c), Some(secs)) = (&self.clock, v.secs) {
            let (clock, gate) = &mut *c.lock();
            clock.step(v.rows, secs);
            if self.ours {
                gate.record(v.accepted + 1, secs + self.draft_secs);
            }
        }
        self.draft_secs = 0.0;
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
            std::hint::black_box(sampling::choose_with_margin(&logits, &sp, 0, ctx));
        }
        draft = draft.min(t.elapsed().as_secs_f64());
    }
    Ok(draft / step.max(1e-9))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::proposer::{Lookup, Plain};
    use crate::model::draft_head::{random_parts, Calibration};

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
            rows: 1,
            secs: None,
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
        // A full batch (a step's time worth 5 tokens): even a sure draft
        // brings less than its row (0.25) and its drafting (1.0) cost.
        let busy = DraftRequest {
            time_value: 5.0,
            ..req(&ctx, SAMPLE)
        };
        for _ in 0..2 * HEAD_SHADOW_EVERY {
            let d = p.propose(&busy);
            assert!(d.tokens.is_empty() && d.shadow.is_none());
        }
    }

    #[test]
    fn a_calibrated_draft_keeps_its_row_only_where_its_margin_says_it_pays() {
        // Accepted almost surely past a margin of 2, almost never below.
        let cal = Calibration {
            first: [-40.0, 20.0],
            later: [-40.0, 20.0],
            fit: serde_json::Value::Null,
        };
        let h = head().with_calibration(Some(cal));
        let (mut kept, mut held) = (0, 0);
        for seed in 0..200 {
            let rule = DraftRule::Sample {
                seed,
                stream: 0,
                temperature: 1.0,
                top_p: 1.0,
            };
            // A row costs 0.3 of a step; drafting next to nothing.
            let mut p = primed(&h, &[1.0, 1.3, 1.6], 0.001, Box::new(Plain));
            let ctx = [1u32, 2, 3];
            let d = p.propose(&req(&ctx, rule));
            let f = h.next_features(&[0.5; 32], 3).unwrap();
            let mut logits = vec![0f32; 40];
            h.logits(&f, &mut logits);
            let sp = SamplingParams {
                temperature: 1.0,
                seed,
                ..Default::default()
            };
            let (t, margin) = sampling::choose_with_margin(&logits, &sp, 0, ctx.len());
            if margin > 2.1 {
                assert_eq!(d.tokens.first(), Some(&t), "seed {seed}, margin {margin}");
                kept += 1;
            } else if margin < 1.9 {
                assert!(d.tokens.is_empty(), "seed {seed}, margin {margin}");
                assert_eq!(d.shadow, Some(t), "held back as the shadow");
                held += 1;
            }
        }
        assert!(
            kept > 10 && held > 10,
            "both kinds seen: {kept} kept, {held} held"
        );
    }

    #[test]
    fn while_first_drafts_do_not_pay_a_shadow_comes_once_a_head_shadow_period() {
        let h = head();
        // One draft at the prior's 0.6 yields 1.6 tokens for 1.95 steps.
        let mut p = primed(&h, &[1.0, 1.9], 0.05, Box::new(Plain));
        let ctx = [1u32, 2, 3];
        let shadows: Vec<bool> = (0..2 * HEAD_SHADOW_EVERY)
            .map(|_| {
                let d = p.propose(&req(&ctx, SAMPLE));
                assert!(d.tokens.is_empty(), "no chain");
                d.shadow.is_some()
            })
            .collect();
        let at: Vec<usize> = (0..shadows.len()).filter(|&i| shadows[i]).collect();
        assert_eq!(at, [HEAD_SHADOW_EVERY - 1, 2 * HEAD_SHADOW_EVERY - 1]);
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

    /// A clock whose gate found drafting epochs half as fast as plain ones.
    fn shut_gate() -> SharedClock {
        let clock = SharedClock::default();
        {
            let (_, gate) = &mut *clock.lock();
            while gate.allows() || gate.epochs().0 < 16 {
                gate.record(1, if gate.allows() { 0.002 } else { 0.001 });
            }
        }
        clock
    }

    #[test]
    fn where_the_engines_gate_is_shut_sampled_requests_get_no_drafts_and_greedy_ones_still_do() {
        let h = head();
        let ctx = [5u32, 6, 7, 8, 5, 6];
        let costs = Costs {
            verify: vec![1.0, 1.05, 1.1],
            head_draft: 0.01,
        };
        let fresh = |clock: SharedClock| {
            HeadDrafter::new(&h, costs.clone(), Box::new(Lookup::new(4))).with_clock(clock)
        };
        // Before any features the wrapped proposer drafts, sampled or not.
        let mut open = fresh(SharedClock::default());
        assert!(!open.propose(&req(&ctx, SAMPLE)).tokens.is_empty());
        let mut shut = fresh(shut_gate());
        assert!(shut.propose(&req(&ctx, SAMPLE)).tokens.is_empty());
        assert!(!shut.propose(&req(&ctx, DraftRule::Best)).tokens.is_empty());
        // Nor does the head draft, or shadow, once it has features.
        let mut p = primed(&h, &[1.0, 1.05, 1.1], 0.01, Box::new(Plain)).with_clock(shut_gate());
        for _ in 0..2 * HEAD_SHADOW_EVERY {
            let d = p.propose(&req(&ctx, SAMPLE));
            assert!(d.tokens.is_empty() && d.shadow.is_none());
        }
    }

    #[test]
    fn a_head_that_measured_its_second_row_at_a_whole_step_stops_drafting() {
        let h = head();
        // Start-up figures: a second row at 0.05 of a step.
        let mut p = primed(&h, &[1.0, 1.05, 1.1], 0.01, Box::new(Plain));
        let ctx = [1u32, 2, 3];
        assert!(!p.propose(&req(&ctx, SAMPLE)).tokens.is_empty());
        let step = |rows: usize, secs: f64| Verdict {
            rows,
            secs: Some(secs),
            ..verdict(&[0.5; 32])
        };
        // The loop's own steps: one row 1 ms, two rows 2 ms.
        p.observe(&step(2, 0.002));
        p.observe(&step(1, 0.001));
        for _ in 0..2 * HEAD_SHADOW_EVERY {
            let d = p.propose(&req(&ctx, SAMPLE));
            assert!(
                d.tokens.is_empty() && d.shadow.is_none(),
                "no draft can pay"
            );
        }
        // Fixed costs ignore what the loop measured.
        let mut fixed = primed(&h, &[1.0, 1.05, 1.1], 0.01, Box::new(Plain)).with_fixed_costs();
        fixed.observe(&step(2, 0.002));
        fixed.observe(&step(1, 0.001));
        assert!(!fixed.propose(&req(&ctx, SAMPLE)).tokens.is_empty());
    }
}
