//! Logits -> token. The only home of randomness, and it is keyed
//! (docs/design.md, "Sampling"): the token at absolute position `pos` of stream
//! (prompt, choice) of a request with seed `seed` is the Gumbel-max sample
//! `argmax_t (l_t + g_t)`, with `l` the processed log-probabilities
//! (temperature, top_p, penalties) and `g_t` standard Gumbel noise that
//! depends on (seed, stream, pos, t) alone ([`Noise`]). Speculative decoding
//! draws the same sample at each position as plain decoding and accepts a
//! draft iff it equals it, so both produce the same tokens for the same
//! seed at any temperature; and a drafter can read the same noise to draft
//! the sample itself (`drafter::Drafter::propose_path`).

/// Token id that [`Noise`] keys the drafter's "none of my candidates"
/// outcome with: no vocabulary reaches it, so its noise is independent of
/// every real token's.
pub const OTHER_TOKEN: u32 = u32::MAX;

/// Temperatures below this are greedy, as in vLLM (`_SAMPLING_EPS`):
/// `logit / T` overflows f32 for T near 0 (1e-39 turns every logit into
/// an infinity and the sample into token 0).
pub const MIN_SAMPLING_TEMPERATURE: f32 = 1e-5;

#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 (or anything below [`MIN_SAMPLING_TEMPERATURE`]) = greedy.
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
    /// Greedy at temperature 0 and at any temperature too small to divide
    /// logits by (see [`MIN_SAMPLING_TEMPERATURE`]).
    pub fn is_greedy(&self) -> bool {
        self.temperature.is_nan() || self.temperature < MIN_SAMPLING_TEMPERATURE
    }
}

/// The Gumbel noise of one (seed, stream, position): a counter-based
/// generator, so the noise of any token is computed on its own, in any
/// order, by the sampler and by a drafter alike. Each token's noise is two
/// rounds of MurmurHash3's 32-bit finalizer over (key, token), the key a
/// 64-bit mix of (seed, stream, pos); 24 bits of the hash make a uniform u
/// in (0, 1) and g = -ln(-ln u). Hand-written rather than a crate's stream
/// RNG: the sampler needs a token's noise without generating the others
/// (a ChaCha stream per position cost a vocabulary's worth of draws), and
/// the sampler's loop vectorises. The statistical
/// tests below check the draws' distribution and independence.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Noise {
    lo: u32,
    hi: u32,
}

impl Noise {
    pub fn at(seed: u64, stream: u64, pos: usize) -> Self {
        let k = splitmix64(
            splitmix64(seed ^ 0x5851_F42D_4C95_7F2D)
                ^ splitmix64(stream.wrapping_add(0x1405_7B7E_F767_814F))
                ^ (pos as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
        );
        Noise {
            lo: k as u32,
            hi: (k >> 32) as u32,
        }
    }

    /// Standard Gumbel noise of `token` at this position.
    #[inline(always)]
    pub fn gumbel(self, token: u32) -> f32 {
        gumbel_of(self.uniform(token))
    }

    /// The uniform in (0, 1) that `token`'s noise is made of: 24 bits of
    /// its hash, so within [2^-25, 1 - 2^-25].
    #[inline(always)]
    fn uniform(self, token: u32) -> f32 {
        let h = fmix32(fmix32(self.lo.wrapping_add(token)) ^ self.hi);
        ((h >> 8) as f32 + 0.5) * (1.0 / 16_777_216.0)
    }
}

/// Gumbel noise from its uniform: `-ln(-ln u)`, increasing in `u`.
#[inline(always)]
fn gumbel_of(u: f32) -> f32 {
    -ln_positive(-ln_positive(u))
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[inline(always)]
fn fmix32(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85EB_CA6B);
    h ^= h >> 13;
    h = h.wrapping_mul(0xC2B2_AE35);
    h ^ (h >> 16)
}

/// Natural log of a positive normal f32 (Cephes' logf polynomial, within
/// 2 ulp of `f32::ln`), written branch-free so the sampler's loop
/// vectorises; libm's `ln` is a call per element.
#[inline(always)]
fn ln_positive(x: f32) -> f32 {
    const SQRT_HALF: f32 = std::f32::consts::FRAC_1_SQRT_2;
    let bits = x.to_bits();
    // x = m * 2^e with m in [0.5, 1).
    let mut e = ((bits >> 23) & 0xff) as i32 - 126;
    let m = f32::from_bits((bits & 0x007f_ffff) | 0x3f00_0000);
    let low = m < SQRT_HALF;
    e -= i32::from(low);
    let f = if low { m + m - 1.0 } else { m - 1.0 };
    let e = e as f32;
    let z = f * f;
    let poly = 3.333_333e-1
        + f * (-2.499_999_4e-1
            + f * (2.000_071_4e-1
                + f * (-1.666_805_8e-1
                    + f * (1.424_932_3e-1
                        + f * (-1.242_014_1e-1
                            + f * (1.167_699_9e-1 + f * (-1.151_461e-1 + f * 7.037_683_6e-2)))))));
    let y = f * z * poly - 2.121_944_4e-4 * e - 0.5 * z;
    f + y + 0.693_359_4 * e
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

/// The token at absolute position `pos` of `stream`, from already-penalized
/// `logits`: the argmax when greedy, else the Gumbel-max sample.
pub fn choose(logits: &[f32], p: &SamplingParams, stream: u64, pos: usize) -> u32 {
    if p.is_greedy() {
        return argmax(logits);
    }
    let noise = Noise::at(p.seed, stream, pos);
    let inv_t = 1.0 / p.temperature;
    match nucleus(logits, p) {
        None => gumbel_argmax_all(logits, inv_t, noise),
        Some(ids) => {
            let score = |t: u32| logits[t as usize] * inv_t + noise.gumbel(t);
            let mut best = (f32::NEG_INFINITY, ids[0]);
            for t in ids {
                let s = score(t);
                if s > best.0 {
                    best = (s, t);
                }
            }
            best.1
        }
    }
}

/// Defines `$name(logits, inv_t, noise)`: `$scan` compiled for the widest
/// vectors the CPU has (AVX-512F, else AVX2, else the baseline build),
/// through the entry points `$avx512` and `$avx2`: the noise loops
/// vectorise only so.
macro_rules! widest_vectors {
    ($(#[$doc:meta])* fn $name:ident -> $ret:ty = $scan:ident via $avx512:ident, $avx2:ident) => {
        $(#[$doc])*
        fn $name(logits: &[f32], inv_t: f32, noise: Noise) -> $ret {
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx512f") {
                // SAFETY: the CPU has AVX-512F (checked just above).
                return unsafe { $avx512(logits, inv_t, noise) };
            }
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx2") {
                // SAFETY: the CPU has AVX2 (checked just above).
                return unsafe { $avx2(logits, inv_t, noise) };
            }
            $scan(logits, inv_t, noise)
        }

        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx512f")]
        unsafe fn $avx512(logits: &[f32], inv_t: f32, noise: Noise) -> $ret {
            $scan(logits, inv_t, noise)
        }

        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2")]
        unsafe fn $avx2(logits: &[f32], inv_t: f32, noise: Noise) -> $ret {
            $scan(logits, inv_t, noise)
        }
    };
}

widest_vectors! {
    /// `argmax_t (logits[t] / T + g_t)` over the whole vocabulary, the token
    /// of the full scan ([`gumbel_argmax_lanes`]) bit for bit, with most
    /// tokens' noise left unfinished ([`gumbel_argmax_pruned`]).
    fn gumbel_argmax_all -> u32 = gumbel_argmax_pruned via gumbel_argmax_avx512, gumbel_argmax_avx2
}

/// Scaled logits within this of the top one are scored in full first by
/// [`gumbel_argmax_pruned`]. Any value gives the same token; set by hand
/// so that few tokens are near the top and the bound they give leaves ~1%
/// of the rest to score.
const NEAR_TOP: f32 = 4.0;

/// Slack on [`gumbel_argmax_pruned`]'s noise bound: far above the error of
/// `ln_positive` (2 ulp); the rounding of the scores' sums, which grows
/// with their magnitude, is added to it.
const BOUND_SLACK: f64 = 1e-3;

/// The full scan's token without finishing most tokens' noise. The
/// logits share a spread of well under the noise's range (~20), so no
/// token can be ruled out by its logit alone; but once the tokens within
/// [`NEAR_TOP`] of the top have been scored (best score `s`), a token
/// below them wins only if its noise exceeds `s - near`, that is only if
/// its uniform exceeds `exp(-exp(-(s - near)))`. A token's uniform is a
/// hash (integer work); the two logarithms that make it Gumbel noise are
/// the cost, and only the tokens near the top or past that bound pay it.
/// Each is scored once, and the winner is the highest score at the lowest
/// index, as in the full scan: every token left out scores below `s`.
#[inline(always)]
fn gumbel_argmax_pruned(logits: &[f32], inv_t: f32, noise: Noise) -> u32 {
    const CHUNK: usize = 16;
    let top = max_of(logits) * inv_t;
    let near = top - NEAR_TOP;
    if !near.is_finite() {
        return gumbel_argmax_lanes(logits, inv_t, noise);
    }
    let is_near = |l: f32| l * inv_t >= near;
    // A flat row (hundreds of tokens near the top) costs more scored one
    // by one than the full scan's vectorised lanes.
    if logits.iter().filter(|&&l| is_near(l)).count() > logits.len() / 32 {
        return gumbel_argmax_lanes(logits, inv_t, noise);
    }
    // The best near token: the full scan's strict `>` in index order.
    let mut best = (f32::NEG_INFINITY, 0u32);
    for (c, chunk) in logits.chunks(CHUNK).enumerate() {
        if chunk.iter().fold(false, |a, &l| a | is_near(l)) {
            for (j, &l) in chunk.iter().enumerate() {
                let t = (c * CHUNK + j) as u32;
                if is_near(l) {
                    let score = l * inv_t + noise.gumbel(t);
                    if score > best.0 {
                        best = (score, t);
                    }
                }
            }
        }
    }
    let s = best.0;
    let rounding = 8.0 * f64::from(f32::EPSILON) * f64::from(top.abs().max(s.abs()));
    let need = f64::from(s - near) - BOUND_SLACK - rounding;
    // The other tokens past the bound; a tie goes to the lower index, as
    // in the full scan.
    past_bound(logits, noise, need, is_near, |t, l, g| {
        let score = l * inv_t + g;
        if score > best.0 || (score == best.0 && t < best.1) {
            best = (score, t);
        }
    });
    best.1
}

/// Calls `f(token, logit, noise)` for every token not near the top
/// (`is_near`) whose noise may exceed `need`: its uniform is at least the
/// one whose noise is `need`, rounded down (two ulps below the f32 nearest
/// it: near 1 an ulp of u moves the noise by up to ~0.01, more than the
/// slack). The uniforms are hashed a chunk at a time (integer work that
/// vectorises), and only a chunk holding such a token pays the logarithms.
#[inline(always)]
fn past_bound(
    logits: &[f32],
    noise: Noise,
    need: f64,
    is_near: impl Fn(f32) -> bool,
    mut f: impl FnMut(u32, f32, f32),
) {
    const CHUNK: usize = 16;
    let u_min = f32::from_bits(((-(-need).exp()).exp() as f32).to_bits().saturating_sub(2));
    let mut us = [0f32; CHUNK];
    for (c, chunk) in logits.chunks(CHUNK).enumerate() {
        let base = (c * CHUNK) as u32;
        let mut any = false;
        for (j, (u, &l)) in us.iter_mut().zip(chunk).enumerate() {
            *u = noise.uniform(base + j as u32);
            any |= *u >= u_min && !is_near(l);
        }
        if !any {
            continue;
        }
        for (j, (&u, &l)) in us.iter().zip(chunk).enumerate() {
            if u >= u_min && !is_near(l) {
                f(base + j as u32, l, gumbel_of(u));
            }
        }
    }
}

/// The largest of `xs` (NaN ignored, as `f32::max` does; -inf when
/// empty), in 16 lanes: a fold of `f32::max` is one long dependency chain.
#[inline(always)]
fn max_of(xs: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 16];
    let mut chunks = xs.chunks_exact(16);
    for c in &mut chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a = if x > *a { x } else { *a };
        }
    }
    let tail = chunks.remainder().iter().copied();
    acc.into_iter()
        .chain(tail)
        .fold(f32::NEG_INFINITY, f32::max)
}

/// The full scan that [`choose`] draws the token of, without the pruning:
/// the reference that tests and `examples/sampler_bench.rs` compare with.
pub fn gumbel_argmax_reference(logits: &[f32], inv_t: f32, noise: Noise) -> u32 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2 (checked just above).
        return unsafe { gumbel_argmax_lanes_avx2(logits, inv_t, noise) };
    }
    gumbel_argmax_lanes(logits, inv_t, noise)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn gumbel_argmax_lanes_avx2(logits: &[f32], inv_t: f32, noise: Noise) -> u32 {
    gumbel_argmax_lanes(logits, inv_t, noise)
}

/// The scores go through a small buffer so that the noise loop vectorises
/// (8 lanes of 32-bit multiplies under AVX2): 4.6 ns a token (19 us for
/// 4,096 tokens; the inverse-CDF draw before it took 35 us), twice that
/// without.
#[inline(always)]
fn gumbel_argmax_lanes(logits: &[f32], inv_t: f32, noise: Noise) -> u32 {
    const CHUNK: usize = 64;
    let mut best = (f32::NEG_INFINITY, 0u32);
    let mut scores = [0f32; CHUNK];
    for (c, chunk) in logits.chunks(CHUNK).enumerate() {
        let base = (c * CHUNK) as u32;
        for (j, (s, l)) in scores.iter_mut().zip(chunk).enumerate() {
            *s = l * inv_t + noise.gumbel(base + j as u32);
        }
        for (j, &s) in scores[..chunk.len()].iter().enumerate() {
            if s > best.0 {
                best = (s, base + j as u32);
            }
        }
    }
    best.1
}

/// The nucleus of top_p < 1: the smallest set of most likely tokens whose
/// mass reaches top_p (ties by token id), None without top_p. Only tokens
/// with probability at least (1 - top_p) / V are sorted: the rest hold at
/// most 1 - top_p of the mass, so the nucleus lies among the sorted ones.
fn nucleus(logits: &[f32], p: &SamplingParams) -> Option<Vec<u32>> {
    if p.top_p >= 1.0 {
        return None;
    }
    let m = logits.iter().copied().fold(f32::MIN, f32::max);
    // A NaN logit weighs nothing (it would make the total NaN and the
    // nucleus empty).
    let w: Vec<f64> = logits
        .iter()
        .map(|l| (((l - m) / p.temperature) as f64).exp())
        .map(|x| if x.is_nan() { 0.0 } else { x })
        .collect();
    let total: f64 = w.iter().sum();
    let floor = (1.0 - p.top_p as f64) / w.len() as f64 * total;
    let mut kept: Vec<(u32, f64)> = w
        .iter()
        .enumerate()
        .filter(|(_, &x)| x >= floor)
        .map(|(i, &x)| (i as u32, x))
        .collect();
    kept.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut acc = 0.0;
    let mut n = kept.len();
    for (i, x) in kept.iter().enumerate() {
        acc += x.1 / total;
        if acc >= p.top_p as f64 {
            n = i + 1;
            break;
        }
    }
    Some(kept[..n].iter().map(|x| x.0).collect())
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
        let e = crate::model::kernels::exp_neg(d) as f64;
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

/// Margins above this are reported as this by [`choose_with_margin`]:
/// past it a head draft is accepted ~90% of the time either way
/// (docs/benchmarks.md, "Calibrated head drafts"), and the cap keeps the
/// scan pruned.
pub const MARGIN_CAP: f32 = 4.0;

/// [`choose`]'s token and its margin: how far the token's score (scaled
/// logit plus the keyed noise) lies above the runner-up's, at most
/// [`MARGIN_CAP`]; for greedy, the gap between the top two logits. Under
/// the same noise, a distribution close to these logits draws the same
/// token the more surely the wider the margin: what the draft head's
/// calibration reads (`model::draft_head::Calibration`).
pub fn choose_with_margin(
    logits: &[f32],
    p: &SamplingParams,
    stream: u64,
    pos: usize,
) -> (u32, f32) {
    if p.is_greedy() {
        return (argmax(logits), top2_gap(logits).min(MARGIN_CAP));
    }
    let noise = Noise::at(p.seed, stream, pos);
    let inv_t = 1.0 / p.temperature;
    let mut top = Top2::default();
    match nucleus(logits, p) {
        Some(ids) => {
            for t in ids {
                top.push(logits[t as usize] * inv_t + noise.gumbel(t), t);
            }
        }
        None => top = top2_all(logits, inv_t, noise),
    }
    (top.best.1, (top.best.0 - top.second).min(MARGIN_CAP))
}

widest_vectors! {
    /// [`top2_pruned`] for the widest vectors the CPU has: 3x faster than
    /// the baseline build's.
    fn top2_all -> Top2 = top2_pruned via top2_avx512, top2_avx2
}

/// The best score (at the lowest index among ties) and the runner-up's.
struct Top2 {
    best: (f32, u32),
    second: f32,
}

impl Default for Top2 {
    fn default() -> Self {
        Top2 {
            best: (f32::NEG_INFINITY, 0),
            second: f32::NEG_INFINITY,
        }
    }
}

impl Top2 {
    #[inline(always)]
    fn push(&mut self, s: f32, t: u32) {
        if s > self.best.0 || (s == self.best.0 && t < self.best.1) {
            self.second = self.best.0;
            self.best = (s, t);
        } else if s > self.second {
            self.second = s;
        }
    }
}

/// [`gumbel_argmax_pruned`]'s scan kept to the top two: after the tokens
/// near the top, a token is scored only if its noise could lift it above
/// both the runner-up and the best score less [`MARGIN_CAP`].
#[inline(always)]
fn top2_pruned(logits: &[f32], inv_t: f32, noise: Noise) -> Top2 {
    let mut top = Top2::default();
    let hi = max_of(logits) * inv_t;
    let near = hi - NEAR_TOP;
    let is_near = |l: f32| l * inv_t >= near;
    if !near.is_finite() || logits.iter().filter(|&&l| is_near(l)).count() > logits.len() / 32 {
        return top2_lanes(logits, inv_t, noise);
    }
    for (t, &l) in logits.iter().enumerate() {
        if is_near(l) {
            top.push(l * inv_t + noise.gumbel(t as u32), t as u32);
        }
    }
    let floor = top.second.max(top.best.0 - MARGIN_CAP);
    let rounding = 8.0 * f64::from(f32::EPSILON) * f64::from(hi.abs().max(floor.abs()));
    let need = f64::from(floor - near) - BOUND_SLACK - rounding;
    past_bound(logits, noise, need, is_near, |t, l, g| {
        top.push(l * inv_t + g, t)
    });
    top
}

/// Every token scored, through a buffer so the noise loop vectorises (as
/// [`gumbel_argmax_lanes`]).
#[inline(always)]
fn top2_lanes(logits: &[f32], inv_t: f32, noise: Noise) -> Top2 {
    const CHUNK: usize = 64;
    let mut top = Top2::default();
    let mut scores = [0f32; CHUNK];
    for (c, chunk) in logits.chunks(CHUNK).enumerate() {
        let base = (c * CHUNK) as u32;
        for (j, (s, l)) in scores.iter_mut().zip(chunk).enumerate() {
            *s = l * inv_t + noise.gumbel(base + j as u32);
        }
        // Most chunks hold nothing above the runner-up: one vector max
        // rules them out.
        if max_of(&scores[..chunk.len()]) < top.second {
            continue;
        }
        for (j, &s) in scores[..chunk.len()].iter().enumerate() {
            top.push(s, base + j as u32);
        }
    }
    top
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
    fn a_temperature_too_small_to_divide_by_is_greedy() {
        // Logits whose argmax is neither token 0 nor the largest in
        // magnitude: an overflowing 1/T made every score inf or -inf.
        let logits = [-3.0, 2.0, 2.5, -4.0, 1.0];
        for (t, top_p) in [
            (1e-39, 1.0),
            (1e-39, 0.9),
            (1e-6, 1.0),
            (f32::MIN_POSITIVE, 0.5),
        ] {
            let p = SamplingParams {
                temperature: t,
                top_p,
                seed: 7,
                ..Default::default()
            };
            assert!(p.is_greedy(), "{t}");
            for pos in 0..20 {
                assert_eq!(choose(&logits, &p, 0, pos), 2, "T = {t}, top_p = {top_p}");
            }
        }
        let warm = SamplingParams {
            temperature: MIN_SAMPLING_TEMPERATURE,
            ..Default::default()
        };
        assert!(!warm.is_greedy());
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

    /// Pearson's statistic of `counts` against probabilities `p`.
    fn chi_square(counts: &[usize], p: &[f64]) -> f64 {
        let n: usize = counts.iter().sum();
        counts
            .iter()
            .zip(p)
            .map(|(&c, &p)| (c as f64 - n as f64 * p).powi(2) / (n as f64 * p))
            .sum()
    }

    /// Pearson's statistic of independence of a contingency table.
    fn chi_square_independence(table: &[Vec<usize>]) -> f64 {
        let n: usize = table.iter().flatten().sum();
        let rows: Vec<usize> = table.iter().map(|r| r.iter().sum()).collect();
        let cols: Vec<usize> = (0..table[0].len())
            .map(|j| table.iter().map(|r| r[j]).sum())
            .collect();
        let mut x = 0.0;
        for (i, r) in table.iter().enumerate() {
            for (j, &c) in r.iter().enumerate() {
                let e = (rows[i] * cols[j]) as f64 / n as f64;
                x += (c as f64 - e).powi(2) / e;
            }
        }
        x
    }

    const TOY_LOGITS: [f32; 5] = [0.0, 0.5, 1.0, -0.5, 1.5];

    /// softmax(logits / t).
    fn processed(logits: &[f32], t: f32) -> Vec<f64> {
        let w: Vec<f64> = logits.iter().map(|l| ((l / t) as f64).exp()).collect();
        let s: f64 = w.iter().sum();
        w.iter().map(|x| x / s).collect()
    }

    fn toy_params(temperature: f32, seed: u64) -> SamplingParams {
        SamplingParams {
            temperature,
            seed,
            ..Default::default()
        }
    }

    #[test]
    fn sampled_tokens_follow_the_processed_distribution() {
        // 5 classes, 4 degrees of freedom: the 0.1% critical value is 18.47.
        // Fixed seeds make the test deterministic; a wrong temperature (1.0
        // instead of 0.7) gives a statistic in the hundreds.
        for (seed, t) in [(1u64, 0.7f32), (2, 1.0), (3, 1.6)] {
            let p = toy_params(t, seed);
            let mut counts = [0usize; 5];
            for pos in 0..40_000 {
                counts[choose(&TOY_LOGITS, &p, 0, pos) as usize] += 1;
            }
            let x = chi_square(&counts, &processed(&TOY_LOGITS, t));
            assert!(x < 18.47, "t={t}: chi-square {x:.1}, counts {counts:?}");
            let wrong = chi_square(&counts, &processed(&TOY_LOGITS, t * 1.3));
            assert!(
                wrong > 50.0,
                "t={t}: the test cannot tell 1.3 t ({wrong:.1})"
            );
        }
    }

    #[test]
    fn draws_are_independent_across_positions_prompts_and_choices() {
        // Pairs of draws that share all of the key but one part: the next
        // position, the next prompt, the next choice, the next seed. 5 x 5
        // table, 16 degrees of freedom: the 0.1% critical value is 39.25.
        let (p, q) = (toy_params(1.0, 11), toy_params(1.0, 12));
        let stream = |prompt: u64, choice: u64| (prompt << 32) | choice;
        let draw = |p: &SamplingParams, s: u64, pos: usize| choose(&TOY_LOGITS, p, s, pos);
        let pair = |part: &str, i: usize| match part {
            "position" => (draw(&p, 0, 2 * i), draw(&p, 0, 2 * i + 1)),
            "prompt" => (draw(&p, stream(0, 0), i), draw(&p, stream(1, 0), i)),
            "choice" => (draw(&p, stream(0, 0), i), draw(&p, stream(0, 1), i)),
            _ => (draw(&p, 0, i), draw(&q, 0, i)),
        };
        for part in ["position", "prompt", "choice", "seed"] {
            let mut table = vec![vec![0usize; 5]; 5];
            let mut same = 0;
            for i in 0..30_000 {
                let (a, b) = pair(part, i);
                table[a as usize][b as usize] += 1;
                same += usize::from(a == b);
            }
            let x = chi_square_independence(&table);
            assert!(x < 39.25, "{part}: chi-square {x:.1}");
            // Noise that ignored this part would repeat the first draw.
            assert!(same < 12_000, "{part}: {same} of 30000 pairs equal");
        }
    }

    #[test]
    fn gumbel_noise_has_the_standard_mean_and_variance() {
        // Mean: Euler's gamma; variance pi^2 / 6.
        let n = 200_000;
        let g: Vec<f64> = (0..n)
            .map(|i| f64::from(Noise::at(5, 0, i / 1000).gumbel((i % 1000) as u32)))
            .collect();
        let mean = g.iter().sum::<f64>() / n as f64;
        let var = g.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
        assert!((mean - 0.577_215_7).abs() < 0.01, "mean {mean}");
        let want = std::f64::consts::PI.powi(2) / 6.0;
        assert!((var - want).abs() < 0.03, "variance {var}");
    }

    #[test]
    fn the_fast_log_is_within_two_ulp_of_libm() {
        for i in 0..100_000u32 {
            let x = f32::from_bits(0x3380_0000 + i * 9_973); // 6e-8 .. ~20
            let (got, want) = (ln_positive(x), x.ln());
            let ulp = (want.abs() * f32::EPSILON).max(f32::MIN_POSITIVE);
            assert!(
                (got - want).abs() <= 2.0 * ulp,
                "ln({x}) = {got}, libm {want}"
            );
        }
    }

    /// Logit rows of several shapes: spreads from flat to far wider than
    /// the noise's range, ties, masked (-inf) and NaN entries, a vocabulary
    /// that is not a multiple of the scan's chunk, one and two tokens.
    fn logit_rows() -> Vec<Vec<f32>> {
        let mut x = 11u64;
        let mut normal = || {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let u1 = ((x >> 40) as f32 + 0.5) / 16_777_216.0;
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let u2 = ((x >> 40) as f32 + 0.5) / 16_777_216.0;
            (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
        };
        let mut rows = vec![];
        for (n, spread) in [
            (4096, 0.3),
            (4096, 2.0),
            (4096, 5.0),
            (1000, 12.0),
            (4099, 40.0),
        ] {
            rows.push((0..n).map(|_| spread * normal()).collect::<Vec<f32>>());
        }
        let mut peaked = vec![0f32; 4096];
        peaked[4000] = 30.0;
        rows.push(peaked);
        rows.push(
            (0..1000)
                .map(|i| ((i * 7919) % 1000) as f32 / 200.0)
                .collect(),
        );
        rows.push((0..130).map(|i| (i % 3) as f32).collect()); // ties
        let mut masked: Vec<f32> = (0..300).map(|i| (i % 17) as f32 * 0.3).collect();
        masked
            .iter_mut()
            .step_by(2)
            .for_each(|l| *l = f32::NEG_INFINITY);
        rows.push(masked);
        // Scores in the millions, where an ulp is a quarter.
        rows.push((0..2048).map(|_| 5e4 + 3.0 * normal()).collect());
        let mut nan = rows[1].clone();
        nan[7] = f32::NAN;
        rows.push(nan);
        rows.push(vec![f32::NEG_INFINITY; 70]);
        rows.push(vec![1.5]);
        rows.push(vec![0.2, 0.1]);
        rows
    }

    #[test]
    fn the_pruned_sampler_draws_the_full_scans_token_on_every_path() {
        for (r, logits) in logit_rows().iter().enumerate() {
            for inv_t in [0.5f32, 1.0, 1.25, 4.0, 60.0] {
                for pos in 0..300 {
                    let noise = Noise::at(r as u64, 3, pos);
                    let want = gumbel_argmax_lanes(logits, inv_t, noise);
                    let at = format!("row {r}, 1/T {inv_t}, pos {pos}");
                    assert_eq!(gumbel_argmax_all(logits, inv_t, noise), want, "{at}");
                    assert_eq!(gumbel_argmax_pruned(logits, inv_t, noise), want, "{at}");
                    #[cfg(target_arch = "x86_64")]
                    if std::arch::is_x86_feature_detected!("avx2") {
                        // SAFETY: the CPU has AVX2.
                        let avx2 = unsafe { gumbel_argmax_avx2(logits, inv_t, noise) };
                        assert_eq!(avx2, want, "{at}, AVX2");
                    }
                }
            }
        }
    }

    #[test]
    fn the_margin_draw_takes_the_samplers_token_and_the_full_scans_margin() {
        for (r, logits) in logit_rows().iter().enumerate() {
            for t in [0.25f32, 0.8, 1.0, 2.0] {
                for top_p in [1.0, 0.9] {
                    let p = SamplingParams {
                        temperature: t,
                        top_p,
                        seed: r as u64,
                        ..Default::default()
                    };
                    for pos in 0..200 {
                        let at = format!("row {r}, T {t}, top_p {top_p}, pos {pos}");
                        let (tok, margin) = choose_with_margin(logits, &p, 3, pos);
                        assert_eq!(tok, choose(logits, &p, 3, pos), "{at}");
                        let noise = Noise::at(p.seed, 3, pos);
                        let ids: Vec<u32> = match nucleus(logits, &p) {
                            Some(ids) => ids,
                            None => (0..logits.len() as u32).collect(),
                        };
                        let mut scores: Vec<f32> = ids
                            .iter()
                            .map(|&i| logits[i as usize] * (1.0 / t) + noise.gumbel(i))
                            .filter(|s| !s.is_nan())
                            .collect();
                        scores.sort_by(|a, b| b.total_cmp(a));
                        let want = match scores.len() {
                            0 | 1 => MARGIN_CAP,
                            _ => (scores[0] - scores[1]).min(MARGIN_CAP),
                        };
                        let close = (margin - want).abs() <= 1e-4 * want.abs().max(1.0);
                        assert!(close || margin == want, "{at}: {margin} vs {want}");
                    }
                }
            }
        }
    }

    #[test]
    fn the_nucleus_is_the_smallest_prefix_reaching_top_p() {
        let p = SamplingParams {
            temperature: 1.0,
            top_p: 0.7,
            ..Default::default()
        };
        // Probabilities ~ 0.47, 0.29, 0.17, 0.06, 0.01.
        let l = [2.0, 1.5, 0.97, 0.0, -1.7];
        assert_eq!(nucleus(&l, &p), Some(vec![0, 1]));
        let p = SamplingParams { top_p: 0.8, ..p };
        assert_eq!(nucleus(&l, &p), Some(vec![0, 1, 2]));
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
