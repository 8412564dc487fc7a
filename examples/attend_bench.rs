//! Attention of one batched decode step at 32 clients on the shipped
//! model's shape (6 layers, 6 heads of 64, 32 sequences each holding 120
//! positions in its own preallocated 256-position cache, f32 and f16 K/V):
//! every (sequence, head) of a layer through `kernels::attend_head` on
//! rayon's threads, as `model/cpu/blocks.rs` runs it, with a 2 MiB read
//! between layers standing in for that layer's weights. The caches (70 MiB
//! in f32, 35 MiB in f16) exceed this machine's 32 MiB L3, so every step
//! reads them from memory, as the server does. Variants run interleaved;
//! the median round is printed with the bytes of K/V read per second.
//!
//! `cargo run --release --example attend_bench`

use std::time::Instant;

use gpt_serve::model::kernels::{self, KeyRows, WeightElem};
use half::f16;
use rayon::prelude::*;

const LAYERS: usize = 6;
const HEADS: usize = 6;
const HS: usize = 64;
const CAP: usize = 256;
const SEQS: usize = 32;
const HELD: usize = 120;
const ROUNDS: usize = 15;
const STEPS: usize = 10;

/// Keys or values of every (sequence, layer): (HEADS, CAP, HS) each.
fn caches<W: Copy + Send>(conv: impl Fn(f32) -> W + Sync) -> Vec<Vec<W>> {
    (0..SEQS * LAYERS)
        .into_par_iter()
        .map(|s| {
            (0..HEADS * CAP * HS)
                .map(|i| conv(((i * 7 + s * 13) % 101) as f32 / 50.0 - 1.0))
                .collect()
        })
        .collect()
}

/// One decode step's attention over `k`, `v`; returns a checksum.
fn step<W: WeightElem + Sync>(k: &[Vec<W>], v: &[Vec<W>], q: &[f32], weights: &[u32]) -> f32 {
    let scale = 1.0 / (HS as f32).sqrt();
    let mut sum = 0f32;
    for layer in 0..LAYERS {
        let mut y = vec![0f32; SEQS * HEADS * HS];
        y.par_chunks_mut(HS).enumerate().for_each(|(i, out)| {
            let (s, h) = (i / HEADS, i % HEADS);
            let c = s * LAYERS + layer;
            let span = h * CAP * HS..(h * CAP + HELD) * HS;
            let mut att = [0f32; HELD];
            let q = &q[i * HS..(i + 1) * HS];
            let (k, v) = (&k[c][span.clone()], &v[c][span]);
            kernels::attend_head(q, k, v, KeyRows::ALL, scale, &mut att, out);
        });
        let w = &weights[layer << 19..(layer + 1) << 19];
        sum += y[layer] + w.iter().fold(0u32, |a, b| a.wrapping_add(*b)) as f32;
    }
    sum
}

/// Only reads the spans `step` attends over (as u32 words, summed): the
/// machine's read bandwidth for this access pattern.
fn read_only(k: &[Vec<f32>], v: &[Vec<f32>]) -> f32 {
    let words = |b: &[f32], h: usize| {
        b[h * CAP * HS..(h * CAP + HELD) * HS]
            .iter()
            .fold(0u32, |a, x| a.wrapping_add(x.to_bits()))
    };
    let mut sum = 0u32;
    for layer in 0..LAYERS {
        sum = sum.wrapping_add(
            (0..SEQS * HEADS)
                .into_par_iter()
                .map(|i| {
                    let (c, h) = ((i / HEADS) * LAYERS + layer, i % HEADS);
                    words(&k[c], h).wrapping_add(words(&v[c], h))
                })
                .reduce(|| 0, u32::wrapping_add),
        );
    }
    sum as f32
}

fn main() {
    let (k32, v32) = (caches(|x| x), caches(|x| x * 0.5));
    let (k16, v16) = (caches(f16::from_f32), caches(|x| f16::from_f32(x * 0.5)));
    let q: Vec<f32> = (0..SEQS * HEADS * HS)
        .map(|i| (i % 17) as f32 / 17.0)
        .collect();
    let weights = vec![1u32; LAYERS << 19];
    let bytes = |b: usize| (2 * SEQS * LAYERS * HEADS * HELD * HS * b * STEPS) as f64;
    let variants: [(&str, f64, &dyn Fn() -> f32); 3] = [
        ("f32 read only", bytes(4), &|| read_only(&k32, &v32)),
        ("f32", bytes(4), &|| step(&k32, &v32, &q, &weights)),
        ("f16", bytes(2), &|| step(&k16, &v16, &q, &weights)),
    ];
    let mut times = vec![Vec::new(); variants.len()];
    let mut check = 0f32;
    for _ in 0..ROUNDS {
        for (t, (_, _, f)) in times.iter_mut().zip(&variants) {
            check += f();
            let t0 = Instant::now();
            for _ in 0..STEPS {
                check += f();
            }
            t.push(t0.elapsed().as_secs_f64());
        }
    }
    for (t, (name, b, _)) in times.iter_mut().zip(&variants) {
        t.sort_by(f64::total_cmp);
        let med = t[t.len() / 2];
        println!(
            "{name}: {:.3} ms per step, {:.1} GB/s of K/V",
            1e3 * med / STEPS as f64,
            b / med / 1e9
        );
    }
    println!("checksum {check}");
}
