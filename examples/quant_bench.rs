//! Quantized vs f32 matmul at GPT-2's MLP shape (k = 768, n = 3072, or
//! the shape given) for
//! decoding (m = 1) and verification batches (m = 2, 4, 8, 16):
//! `Matrix<f32>::forward`
//! against `QMatrix::forward_with` for Q8_0 and Q4_0 on every int8 kernel
//! this CPU has but the (slow, reference) portable one. Variants run
//! interleaved, each round timing a few calls after one untimed call (so
//! no variant pays for the previous one's weights evicting its own);
//! the median round is printed with its ratio to f32 from the same run.
//!
//! `cargo run --release --example quant_bench [K N]` (another shape, e.g.
//! the shipped model's MLP: `384 1536`)

use std::time::Instant;

use gpt_serve::model::kernels::Matrix;
use gpt_serve::model::quant::{KernelPath, QMatrix, QuantKind};

const ROUNDS: usize = 21;
/// A variant's name and one call of it, writing `y`.
type Variant<'a> = (String, Box<dyn Fn(&mut [f32]) + 'a>);
const CALLS: usize = 20;

fn data(len: usize, seed: u32) -> Vec<f32> {
    (0..len)
        .map(|i| {
            let h = (i as u32).wrapping_mul(2654435761).wrapping_add(seed);
            (h % 1000) as f32 / 500.0 - 1.0
        })
        .collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse())
        .collect::<Result<_, _>>()?;
    let (k, n) = match args[..] {
        [] => (768, 3072),
        [k, n] if k % 32 == 0 && k > 0 && n > 0 => (k, n),
        _ => return Err(format!("want K N (K a multiple of 32) or nothing, got {args:?}").into()),
    };
    let w = data(n * k, 1);
    let bias = Some(data(n, 2));
    let f32s = Matrix::<f32>::from_out_in(&w, n, k, bias.clone());
    let q8 = QMatrix::from_out_in("bench.w", QuantKind::Q8_0, &w, (n, k), bias.clone())?;
    let q4 = QMatrix::from_out_in("bench.w", QuantKind::Q4_0, &w, (n, k), bias)?;
    let paths: Vec<KernelPath> = KernelPath::available()
        .into_iter()
        .filter(|p| *p != KernelPath::Portable)
        .collect();
    println!(
        "k = {k}, n = {n}, {} threads; kernels here: {paths:?}",
        rayon::current_num_threads()
    );
    println!("| m | variant | median us/call | vs f32 |");
    println!("|---|---|---|---|");
    for m in [1, 2, 4, 8, 16] {
        let x = data(m * k, 3);
        let mut y = vec![0f32; m * n];
        let mut variants: Vec<Variant> = Vec::new();
        variants.push(("f32 Matrix".into(), Box::new(|y| f32s.forward(&x, m, y))));
        for (name, q) in [("q8_0", &q8), ("q4_0", &q4)] {
            for &p in &paths {
                let x = &x;
                variants.push((
                    format!("{name} {}", p.name()),
                    Box::new(move |y| q.forward_with(p, x, m, y)),
                ));
            }
        }
        let mut times = vec![Vec::new(); variants.len()];
        for _ in 0..ROUNDS {
            for (i, (_, f)) in variants.iter().enumerate() {
                f(&mut y);
                let t = Instant::now();
                for _ in 0..CALLS {
                    f(&mut y);
                }
                times[i].push(t.elapsed().as_secs_f64() * 1e6 / CALLS as f64);
            }
        }
        let medians: Vec<f64> = times.into_iter().map(median).collect();
        for ((name, _), t) in variants.iter().zip(&medians) {
            println!("| {m} | {name} | {t:.1} | {:.2}x |", medians[0] / t);
        }
    }
    Ok(())
}
