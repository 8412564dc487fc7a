//! Logits -> token. The only home of randomness, and it is keyed: the
//! sample at absolute position `pos` of choice `choice` of a request with
//! seed `seed` uses an RNG seeded by (seed, choice, pos) alone. Speculative
//! decoding draws the same sample at each position as plain decoding and
//! accepts a draft iff it equals it ("sample then compare", DESIGN.md), so
//! both produce the same tokens for the same seed at any temperature.

use rand::{Rng, SeedableRng};

#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 = greedy.
    pub temperature: f32,
    pub top_p: f32,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_p: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: 0,
        }
    }
}

impl SamplingParams {
    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0
    }
}

/// The uniform draw for (seed, choice, position).
pub fn keyed_uniform(seed: u64, stream: u64, pos: usize) -> f64 {
    let key = seed
        .wrapping_mul(0x9E3779B97F4A7C15)
        .wrapping_add(stream.wrapping_mul(0xC2B2AE3D27D4EB4F))
        .wrapping_add((pos as u64).wrapping_mul(0x165667B19E3779F9));
    rand_chacha::ChaCha8Rng::seed_from_u64(key).random::<f64>()
}

pub fn argmax(xs: &[f32]) -> u32 {
    let mut best = 0;
    for (i, x) in xs.iter().enumerate() {
        if *x > xs[best] {
            best = i;
        }
    }
    best as u32
}

/// Applies presence/frequency penalties (OpenAI's rule: over the tokens
/// generated before this position, `counts[t]` times token t appeared).
pub fn penalize(
    logits: &mut [f32],
    p: &SamplingParams,
    counts: &std::collections::HashMap<u32, u32>,
) {
    if p.presence_penalty == 0.0 && p.frequency_penalty == 0.0 {
        return;
    }
    for (&t, &c) in counts {
        if let Some(l) = logits.get_mut(t as usize) {
            *l -= p.presence_penalty * f32::from(c > 0) + p.frequency_penalty * c as f32;
        }
    }
}

/// The token at absolute position `pos`, from already-penalized `logits`.
pub fn choose(logits: &[f32], p: &SamplingParams, stream: u64, pos: usize) -> u32 {
    if p.is_greedy() {
        return argmax(logits);
    }
    let m = logits.iter().copied().fold(f32::MIN, f32::max);
    let mut probs: Vec<(u32, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, l)| (i as u32, (((l - m) / p.temperature) as f64).exp()))
        .collect();
    let total: f64 = probs.iter().map(|x| x.1).sum();
    // Nucleus: the smallest prefix, by probability, with mass >= top_p.
    // Without top_p no order is needed (the sort cost 7% of a decode step).
    let mut keep = probs.len();
    if p.top_p < 1.0 {
        probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let mut acc = 0.0;
        for (i, x) in probs.iter().enumerate() {
            acc += x.1 / total;
            if acc >= p.top_p as f64 {
                keep = i + 1;
                break;
            }
        }
    }
    let kept = &probs[..keep];
    let mass: f64 = kept.iter().map(|x| x.1).sum();
    let mut u = keyed_uniform(p.seed, stream, pos) * mass;
    for x in kept {
        u -= x.1;
        if u < 0.0 {
            return x.0;
        }
    }
    kept[kept.len() - 1].0
}

/// The largest logit and log-sum-exp of raw logits.
fn max_and_logsumexp(logits: &[f32]) -> (f32, f32) {
    let m = logits.iter().copied().fold(f32::MIN, f32::max);
    let lse = logits
        .iter()
        .map(|l| ((l - m) as f64).exp())
        .sum::<f64>()
        .ln() as f32
        + m;
    (m, lse)
}

/// log-softmax of raw logits.
pub fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let (_, lse) = max_and_logsumexp(logits);
    logits.iter().map(|l| l - lse).collect()
}

/// Top-1 probability of the distribution of `logits` (as
/// [`top1_and_entropy`]'s, without the allocation and the entropy pass).
pub fn top1_prob(logits: &[f32]) -> f32 {
    let (m, lse) = max_and_logsumexp(logits);
    (m - lse).exp()
}

/// Top-1 probability and entropy (nats) of the distribution of `logits`.
pub fn top1_and_entropy(logits: &[f32]) -> (f32, f32) {
    // One pass after the max, no allocation: with e_i = exp(l_i - m) and
    // s = sum e_i, the top-1 probability is 1 / s and the entropy is
    // ln s - sum e_i (l_i - m) / s (a decode step called libm's exp twice
    // per vocabulary entry here: 8% of a batched forward).
    let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !m.is_finite() {
        return (0.0, 0.0);
    }
    let (mut s, mut el) = (0f64, 0f64);
    for &l in logits {
        let d = l - m;
        let e = crate::kernels::exp_neg(d) as f64;
        s += e;
        el += e * d as f64;
    }
    ((1.0 / s) as f32, (s.ln() - el / s) as f32)
}

/// The `n` most likely tokens with their logprobs.
pub fn top_logprobs(logprobs: &[f32], n: usize) -> Vec<(u32, f32)> {
    let mut idx: Vec<(u32, f32)> = logprobs
        .iter()
        .enumerate()
        .map(|(i, l)| (i as u32, *l))
        .collect();
    let n = n.min(idx.len());
    if n == 0 {
        return vec![];
    }
    idx.select_nth_unstable_by(n - 1, |a, b| b.1.total_cmp(&a.1));
    idx.truncate(n);
    idx.sort_by(|a, b| b.1.total_cmp(&a.1));
    idx
}

/// Gap between the two largest logits (near-ties can flip between a k-row
/// verify and a 1-row step).
pub fn top2_gap(logits: &[f32]) -> f32 {
    let (mut a, mut b) = (f32::MIN, f32::MIN);
    for &l in logits {
        if l > a {
            b = a;
            a = l;
        } else if l > b {
            b = l;
        }
    }
    a - b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_argmax() {
        assert_eq!(
            choose(&[0.1, 3.0, 2.0], &SamplingParams::default(), 0, 5),
            1
        );
    }

    #[test]
    fn the_same_key_draws_the_same_token() {
        let p = SamplingParams {
            temperature: 1.0,
            seed: 42,
            ..Default::default()
        };
        let l = [1.0, 1.1, 0.9, 1.05];
        let a: Vec<u32> = (0..50).map(|pos| choose(&l, &p, 0, pos)).collect();
        let b: Vec<u32> = (0..50).map(|pos| choose(&l, &p, 0, pos)).collect();
        assert_eq!(a, b);
        let c: Vec<u32> = (0..50).map(|pos| choose(&l, &p, 1, pos)).collect();
        assert_ne!(a, c, "another choice draws other samples");
    }

    #[test]
    fn sampling_follows_the_distribution() {
        let p = SamplingParams {
            temperature: 1.0,
            seed: 7,
            ..Default::default()
        };
        let l = [0.0f32, (3.0f32).ln()]; // p = 0.25, 0.75
        let ones = (0..20_000)
            .filter(|&pos| choose(&l, &p, 0, pos) == 1)
            .count();
        assert!((ones as f64 / 20_000.0 - 0.75).abs() < 0.015, "{ones}");
    }

    #[test]
    fn top_p_drops_the_tail() {
        let p = SamplingParams {
            temperature: 1.0,
            top_p: 0.5,
            seed: 3,
            ..Default::default()
        };
        let l = [5.0, 0.0, 0.0, 0.0];
        assert!((0..1000).all(|pos| choose(&l, &p, 0, pos) == 0));
    }

    #[test]
    fn penalties_lower_repeated_tokens() {
        let p = SamplingParams {
            presence_penalty: 1.0,
            frequency_penalty: 0.5,
            ..Default::default()
        };
        let mut l = vec![2.0, 1.0];
        penalize(&mut l, &p, &[(0u32, 2u32)].into_iter().collect());
        assert_eq!(l, vec![0.0, 1.0]);
    }

    #[test]
    fn top_logprobs_are_sorted() {
        let lp = log_softmax(&[1.0, 3.0, 2.0]);
        let t = top_logprobs(&lp, 2);
        assert_eq!(t.iter().map(|x| x.0).collect::<Vec<_>>(), vec![1, 2]);
    }
}
