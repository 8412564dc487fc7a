//! Learning-rate schedules.
//!
//! - `cosine`: linear warmup to `peak`, cosine decay to `min_ratio * peak`.
//! - `wsd`: warmup, stable at `peak`, linear decay to `min_ratio * peak` over
//!   the last `decay_frac` of the steps.
//! - `hyper`: the differentiable scheduler. Linear warmup to `peak`; after it
//!   the learning rate follows its own hypergradient (Baydin et al., arXiv
//!   1703.04782). For Adam, dL/dlr = -g_t . u_{t-1}, so gradient descent on
//!   lr raises it while successive steps agree. We use the scale-free
//!   multiplicative form:
//!
//!   `lr_{t+1} = clamp(lr_t * exp(beta * w_t * cos(g_t, u_{t-1})), peak / 20, 4 * peak)`
//!
//!   with `w_t = 1`.
//! - `hyper-speed`: the same rule with `w_t = c_ref / c_t`, where `c_t` is the
//!   step's cost (FLOPs by the model's cost model, so a resumed run replays it
//!   exactly) and `c_ref` the cost of the cheapest step kind: a step that
//!   costs twice as much must show twice the agreement to move the learning
//!   rate as far, i.e. the scheduler follows loss decrease per unit of compute
//!   rather than per step. Costs vary when exit losses run on a fraction of
//!   steps (`--exit-every`) or positions (`--exit-frac`).

use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum ScheduleKind {
    Cosine,
    Wsd,
    Hyper,
    HyperSpeed,
}

#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct Schedule {
    pub kind: ScheduleKind,
    pub peak: f64,
    pub warmup: u64,
    pub total: u64,
    pub min_ratio: f64,
    pub decay_frac: f64,
    pub hyper_beta: f64,
    /// The current learning rate of the hypergradient schedules.
    pub hyper_lr: f64,
}

impl Schedule {
    pub fn new(kind: ScheduleKind, peak: f64, warmup: u64, total: u64) -> Self {
        Self {
            kind,
            peak,
            warmup,
            total,
            min_ratio: 0.1,
            decay_frac: 0.2,
            hyper_beta: 0.02,
            hyper_lr: peak,
        }
    }

    /// Learning rate for step `step` (0-based).
    pub fn lr(&self, step: u64) -> f64 {
        if step < self.warmup {
            return self.peak * (step + 1) as f64 / self.warmup as f64;
        }
        let min = self.min_ratio * self.peak;
        let total = self.total.max(self.warmup + 1);
        match self.kind {
            ScheduleKind::Cosine => {
                let p = ((step - self.warmup) as f64 / (total - self.warmup) as f64).min(1.0);
                min + 0.5 * (self.peak - min) * (1.0 + (std::f64::consts::PI * p).cos())
            }
            ScheduleKind::Wsd => {
                let decay_start = total as f64 * (1.0 - self.decay_frac);
                if (step as f64) < decay_start {
                    self.peak
                } else {
                    let p = ((step as f64 - decay_start) / (total as f64 - decay_start)).min(1.0);
                    self.peak + (min - self.peak) * p
                }
            }
            ScheduleKind::Hyper | ScheduleKind::HyperSpeed => self.hyper_lr,
        }
    }

    /// Feeds the hypergradient cosine of step `step` and its cost relative
    /// to the cheapest step kind (`rel_cost >= 1`).
    pub fn observe(&mut self, step: u64, hyper_cos: f64, rel_cost: f64) {
        let w = match self.kind {
            ScheduleKind::Hyper => 1.0,
            ScheduleKind::HyperSpeed => 1.0 / rel_cost.max(1e-9),
            _ => return,
        };
        if step + 1 < self.warmup {
            return;
        }
        let lr = self.hyper_lr * (self.hyper_beta * w * hyper_cos).exp();
        self.hyper_lr = lr.clamp(self.peak / 20.0, 4.0 * self.peak);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cosine_warms_up_then_decays_to_the_floor() {
        let s = Schedule::new(ScheduleKind::Cosine, 1e-3, 10, 110);
        assert!((s.lr(9) - 1e-3).abs() < 1e-12);
        assert!(s.lr(0) < s.lr(5));
        assert!((s.lr(110) - 1e-4).abs() < 1e-9);
        assert!(s.lr(60) < s.lr(20));
    }

    #[test]
    fn wsd_is_flat_then_decays() {
        let s = Schedule::new(ScheduleKind::Wsd, 1e-3, 10, 100);
        assert_eq!(s.lr(50), 1e-3);
        assert!(s.lr(90) < 1e-3);
        assert!((s.lr(100) - 1e-4).abs() < 1e-9);
    }

    #[test]
    fn hypergradient_raises_lr_when_steps_agree_and_stays_bounded() {
        let mut s = Schedule::new(ScheduleKind::Hyper, 1e-3, 0, 100);
        for t in 0..10_000 {
            s.observe(t, 0.5, 1.0);
        }
        assert!((s.lr(5) - 4e-3).abs() < 1e-12);
        for t in 0..100_000 {
            s.observe(t, -0.5, 1.0);
        }
        assert!((s.lr(5) - 5e-5).abs() < 1e-12);
    }

    #[test]
    fn speed_aware_rule_discounts_expensive_steps() {
        let mut cheap = Schedule::new(ScheduleKind::HyperSpeed, 1e-3, 0, 100);
        let mut dear = cheap.clone();
        cheap.observe(0, 0.5, 1.0);
        dear.observe(0, 0.5, 2.0);
        assert!(cheap.lr(1) > dear.lr(1) && dear.lr(1) > 1e-3);
    }
}
