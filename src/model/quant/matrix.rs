//! `QMatrix`: a linear layer with Q8_0 or Q4_0 weights, `y = x W^T + b`
//! for 1..64 (or more) rows. Each activation row is quantized to Q8_0 once,
//! then groups of 16 outputs (`packed`'s layout) are computed against every
//! row while their weights sit in L1 (each weight is read from memory once
//! per call: decoding is memory-bound). The groups are split over rayon's
//! threads when the product is large, as `kernels::Matrix::forward` does.
//!
//! Per (output, row) the sum runs over blocks in order with the same f32
//! operations in every kernel, so a row's output is bitwise the same alone
//! or batched, and on every kernel path.

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use rayon::prelude::*;

use super::block::{BlockQ8_0, Blocks, QK};
use super::dispatch::KernelPath;
use super::packed::{Packed, GROUP};
use super::{QuantError, QuantKind};
use crate::model::team::Team;
/// Below this many multiply-adds a matmul runs on the calling thread
/// (kernels' default for the f32 matmul).
const PAR_MIN_MACS: usize = 1 << 16;
/// From this many activation values on, quantizing them is split over
/// rayon's threads: 8,192 values take ~20 us on one core of the 2-core
/// EPYC, a fork/join a few.
const PAR_MIN_QUANT: usize = 1 << 13;
/// Rows whose sums a work chunk keeps on the stack (more go to the heap).
const STACK_ROWS: usize = 4;
/// Work chunks per thread, so a late-waking thread's share is stolen.
const CHUNKS_PER_THREAD: usize = 4;

/// A linear layer's weights in GGUF blocks (held in `packed`'s grouped
/// layout; `to_bytes` gives GGUF's), with an f32 bias (zeros when the
/// layer has none).
#[derive(Debug, Clone, PartialEq)]
pub struct QMatrix {
    packed: Packed,
    bias: Vec<f32>,
    /// Outputs (nn.Linear's `out_features`).
    pub n: usize,
    /// Inputs (`in_features`), a multiple of 32.
    pub k: usize,
}

/// Activation rows quantized to Q8_0: the quants of all rows (m, k), and
/// per (row, block) the scale as f32 and the sum of the quants (for the
/// kernels that multiply offset weights and subtract `offset * sum`).
pub(super) struct Activations {
    pub qs: Vec<i8>,
    pub d: Vec<f32>,
    pub sum: Vec<i32>,
    /// Blocks per row (k / 32).
    pub nb: usize,
}

impl Activations {
    /// Block by block, so a row's quants never depend on the other rows;
    /// split over rayon's threads from `PAR_MIN_QUANT` values on (at 32
    /// rows this ran on one thread while the other waited: 7.6% of the
    /// server's time, `perf`, docs/benchmarks.md).
    pub fn quantize(x: &[f32], k: usize, path: KernelPath) -> Self {
        let blocks = x.len() / QK;
        let mut qs = vec![0i8; blocks * QK];
        let (mut d, mut sum) = (vec![0f32; blocks], vec![0i32; blocks]);
        let one = |((x, qs), (d, sum))| quantize_block(path, x, qs, d, sum);
        if x.len() < PAR_MIN_QUANT || rayon::current_num_threads() == 1 {
            x.chunks_exact(QK)
                .zip(qs.chunks_exact_mut(QK))
                .zip(d.iter_mut().zip(&mut sum))
                .for_each(one);
        } else {
            x.par_chunks_exact(QK)
                .zip(qs.par_chunks_exact_mut(QK))
                .zip(d.par_iter_mut().zip(&mut sum))
                .with_min_len(PAR_MIN_QUANT / QK / 2)
                .for_each(one);
        }
        Self {
            qs,
            d,
            sum,
            nb: k / QK,
        }
    }
}

/// One block of 32 activations: its quants, f32 scale and quant sum; the
/// same bits on every path (the AVX2 loop is `BlockQ8_0::quantize`'s).
fn quantize_block(path: KernelPath, x: &[f32], qs: &mut [i8], d: &mut f32, sum: &mut i32) {
    let x: &[f32; QK] = x.try_into().expect("QK values");
    let qs: &mut [i8; QK] = qs.try_into().expect("QK quants");
    #[cfg(target_arch = "x86_64")]
    if path != KernelPath::Portable {
        // SAFETY: every path but the portable one needs AVX2, and
        // `forward_split` runs only a path this CPU has.
        if let Some((scale, s)) = unsafe { super::x86::quantize_q8_avx2(x, qs) } {
            *d = half::f16::from_f32(scale).to_f32();
            *sum = s;
            return;
        }
    }
    let _ = path;
    let b = BlockQ8_0::quantize(x);
    *qs = b.qs;
    *d = b.d.to_f32();
    *sum = b.qs.iter().map(|q| *q as i32).sum();
}

fn check_finite(name: &str, what: &'static str, v: &[f32]) -> Result<(), QuantError> {
    match v.iter().position(|x| !x.is_finite()) {
        Some(index) => Err(QuantError::NotFinite {
            name: name.to_string(),
            what,
            index,
            value: v[index],
        }),
        None => Ok(()),
    }
}

/// `n * k`, or an error naming the tensor when the product overflows.
fn element_count(name: &str, (n, k): (usize, usize)) -> Result<usize, QuantError> {
    n.checked_mul(k).ok_or_else(|| QuantError::TooLarge {
        name: name.to_string(),
        n,
        k,
    })
}

impl QMatrix {
    /// Quantizes nn.Linear's `w` (out = n, in = k), row-major; `name`
    /// (the checkpoint's tensor name) is what errors cite.
    pub fn from_out_in(
        name: &str,
        kind: QuantKind,
        w: &[f32],
        (n, k): (usize, usize),
        bias: Option<Vec<f32>>,
    ) -> Result<Self, QuantError> {
        let values = element_count(name, (n, k))?;
        check_shape(name, "weight", w.len(), (n, k), values)?;
        check_finite(name, "weight", w)?;
        let rows = w.as_chunks::<QK>().0;
        let blocks = match kind {
            QuantKind::Q8_0 => Blocks::Q8_0(rows.par_iter().map(BlockQ8_0::quantize).collect()),
            QuantKind::Q4_0 => {
                Blocks::Q4_0(rows.par_iter().map(super::BlockQ4_0::quantize).collect())
            }
        };
        Self::new(name, blocks, (n, k), bias)
    }

    /// From GGUF's bytes for the tensor (`n * k / 32` blocks, little-endian);
    /// a length that is not exactly that, or a non-finite block scale, is
    /// an error naming the tensor.
    pub fn from_bytes(
        name: &str,
        kind: QuantKind,
        bytes: &[u8],
        (n, k): (usize, usize),
        bias: Option<Vec<f32>>,
    ) -> Result<Self, QuantError> {
        let values = element_count(name, (n, k))?;
        check_shape(name, "weight", values, (n, k), values)?;
        let blocks = values / QK;
        let block_bytes = kind.block_bytes();
        if bytes.len() != blocks * block_bytes {
            return Err(QuantError::ByteLength {
                name: name.to_string(),
                kind: kind.name(),
                got: bytes.len(),
                blocks,
                block_bytes,
                expected: blocks * block_bytes,
                n,
                k,
            });
        }
        let blocks = Blocks::from_bytes(kind, bytes);
        let scales: Vec<f32> = (0..blocks.len())
            .map(|i| blocks.scale(i).to_f32())
            .collect();
        check_finite(name, "block scale", &scales)?;
        Self::new(name, blocks, (n, k), bias)
    }

    fn new(
        name: &str,
        blocks: Blocks,
        (n, k): (usize, usize),
        bias: Option<Vec<f32>>,
    ) -> Result<Self, QuantError> {
        let bias = bias.unwrap_or_else(|| vec![0.0; n]);
        check_shape(name, "bias", bias.len(), (n, k), n)?;
        check_finite(name, "bias", &bias)?;
        let packed = Packed::pack(&blocks, n, k / QK);
        Ok(Self { packed, bias, n, k })
    }

    pub fn kind(&self) -> QuantKind {
        self.packed.kind()
    }

    pub fn bias(&self) -> &[f32] {
        &self.bias
    }

    /// The weights as GGUF stores them (the bias is a separate f32 tensor).
    pub fn to_bytes(&self) -> Vec<u8> {
        self.packed.unpack().to_bytes()
    }

    /// The weights back in f32, nn.Linear's (out, in) layout.
    pub fn dequantize(&self) -> Vec<f32> {
        match &self.packed.unpack() {
            Blocks::Q8_0(b) => super::dequantize_row_q8_0(b),
            Blocks::Q4_0(b) => super::dequantize_row_q4_0(b),
        }
    }

    /// Output `o`'s weights dequantized (k values, as `dequantize` gives
    /// them) and its bias.
    ///
    /// # Panics
    /// When `o >= n`: a caller's bug.
    pub fn output(&self, o: usize) -> (Vec<f32>, f32) {
        assert!(o < self.n, "output {o} of a {} x {} matrix", self.n, self.k);
        (self.packed.dequantize_row(o), self.bias[o])
    }

    /// `y (m, n) = x (m, k) W^T + b` with the kernel `KernelPath::selected`.
    ///
    /// # Panics
    /// When `x` is not `m * k` or `y` not `m * n` values: a caller's bug
    /// (shapes come from the model's config), never data.
    pub fn forward(&self, x: &[f32], m: usize, y: &mut [f32]) {
        self.forward_with(KernelPath::selected(), x, m, y);
    }

    /// `forward` with a given kernel; one this CPU lacks runs the best
    /// available instead. Split over threads as `Split::for_product` says.
    pub fn forward_with(&self, path: KernelPath, x: &[f32], m: usize, y: &mut [f32]) {
        let split = Split::for_product(m, self.k, self.n);
        self.forward_split(path, split, x, m, y);
    }

    /// `forward_with` split over threads as `split` says (the same bits
    /// whatever the split: each output's sum runs on one thread).
    pub fn forward_split(
        &self,
        path: KernelPath,
        split: Split,
        x: &[f32],
        m: usize,
        y: &mut [f32],
    ) {
        let (n, k) = (self.n, self.k);
        assert_eq!(x.len(), m * k, "quantized matmul input: {m} rows of {k}");
        assert_eq!(y.len(), m * n, "quantized matmul output: {m} rows of {n}");
        let path = if path.is_available() {
            path
        } else {
            KernelPath::best()
        };
        let act = Activations::quantize(x, k, path);
        let groups = n.div_ceil(GROUP);
        let out = SendPtr(y.as_mut_ptr());
        let work = |g0: usize, g1: usize| {
            // On the stack for decode and short verify steps: a chunk's
            // `Vec` and `Scratch` were ~3% of a one-row step's samples
            // under glibc's malloc, less under mimalloc (`perf`).
            let mut stack = [[0f32; GROUP]; STACK_ROWS];
            let mut heap = Vec::new();
            let acc = if m <= stack.len() {
                &mut stack[..m]
            } else {
                heap.resize(m, [0f32; GROUP]);
                &mut heap[..]
            };
            let mut scratch = None;
            for g in g0..g1 {
                let o0 = g * GROUP;
                let width = (n - o0).min(GROUP);
                self.group(path, g, &act, acc, &mut scratch);
                // SAFETY: y has m * n values; `work`'s callers give every
                // task a disjoint range of groups, and group g writes only
                // columns o0..o0 + width of each row.
                unsafe { out.write_group(acc, &self.bias[o0..o0 + width], n, o0) };
            }
        };
        match split {
            Split::Serial => work(0, groups),
            Split::Team(team) => {
                // Chunks claimed in order from a shared counter, so a
                // thread that starts late takes fewer.
                let chunks = (team.threads() * CHUNKS_PER_THREAD).min(groups);
                let next = AtomicUsize::new(0);
                team.run(&|_| loop {
                    let c = next.fetch_add(1, Relaxed);
                    if c >= chunks {
                        break;
                    }
                    work(c * groups / chunks, (c + 1) * groups / chunks);
                });
            }
            Split::Rayon => {
                let threads = rayon::current_num_threads();
                let chunks = (threads * CHUNKS_PER_THREAD).min(groups);
                let per = groups.div_ceil(chunks);
                (0..chunks)
                    .into_par_iter()
                    .for_each(|c| work(c * per, ((c + 1) * per).min(groups)));
            }
        }
    }

    /// Sums (no bias) of group `g`'s 16 outputs for every row into `acc`.
    fn group(
        &self,
        path: KernelPath,
        g: usize,
        act: &Activations,
        acc: &mut [[f32; GROUP]],
        scratch: &mut Option<Scratch>,
    ) {
        #[cfg(target_arch = "x86_64")]
        if path != KernelPath::Portable {
            let lines = self.packed.group(g);
            // SAFETY: `forward_with` picked an available path, so the CPU
            // has its instructions; the kernels check the slice lengths.
            unsafe {
                match (self.kind(), path) {
                    (QuantKind::Q8_0, KernelPath::Vnni) => super::x86::q8_vnni(lines, act, acc),
                    (QuantKind::Q8_0, _) => super::x86::q8_avx2(lines, act, acc),
                    (QuantKind::Q4_0, KernelPath::Vnni) => super::x86::q4_vnni(lines, act, acc),
                    (QuantKind::Q4_0, _) => super::x86::q4_avx2(lines, act, acc),
                }
            }
            return;
        }
        let _ = path;
        self.group_portable(g, act, acc, scratch.get_or_insert_with(Scratch::default));
    }

    /// The reference kernel: group `g`'s outputs for every row into `acc`.
    fn group_portable(
        &self,
        g: usize,
        act: &Activations,
        acc: &mut [[f32; GROUP]],
        scratch: &mut Scratch,
    ) {
        let (nb, k) = (act.nb, self.k);
        let (w, dw) = (&mut scratch.values, &mut scratch.scales);
        self.packed.group_values(g, w, dw);
        for (r, a) in acc.iter_mut().enumerate() {
            let x = &act.qs[r * k..(r + 1) * k];
            for (lane, out) in a.iter_mut().enumerate() {
                let mut sum = 0f32;
                for b in 0..nb {
                    let dot: i32 = w[lane][b * QK..(b + 1) * QK]
                        .iter()
                        .zip(&x[b * QK..(b + 1) * QK])
                        .map(|(w, x)| *w as i32 * *x as i32)
                        .sum();
                    sum += (dw[lane][b] * act.d[r * nb + b]) * dot as f32;
                }
                *out = sum;
            }
        }
    }
}

/// The portable kernel's unpacked weights of one group.
#[derive(Default)]
struct Scratch {
    values: [Vec<i8>; GROUP],
    scales: [Vec<f32>; GROUP],
}

fn check_shape(
    name: &str,
    what: &'static str,
    got: usize,
    (n, k): (usize, usize),
    expected: usize,
) -> Result<(), QuantError> {
    if k % QK != 0 {
        return Err(QuantError::RowLength {
            name: name.to_string(),
            k,
        });
    }
    if got != expected {
        return Err(QuantError::Shape {
            name: name.to_string(),
            what,
            got,
            expected,
            n,
            k,
        });
    }
    Ok(())
}

/// How a matmul's groups of outputs are split over threads.
#[derive(Clone, Copy)]
pub enum Split<'t> {
    /// All on the calling thread.
    Serial,
    /// In equal contiguous shares over a [`Team`]'s threads.
    Team(&'t Team),
    /// In `CHUNKS_PER_THREAD` chunks per thread over rayon's pool.
    Rayon,
}

impl Split<'static> {
    /// Serial below `PAR_MIN_MACS`; the global team up to
    /// `team::MAX_ROWS` rows; rayon above.
    pub fn for_product(m: usize, k: usize, n: usize) -> Self {
        let threads = rayon::current_num_threads();
        if m * k * n < PAR_MIN_MACS || threads == 1 || n <= GROUP {
            Split::Serial
        } else if let Some(team) = Team::for_rows(m) {
            Split::Team(team)
        } else {
            Split::Rayon
        }
    }
}

struct SendPtr(*mut f32);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// Writes `acc + bias` (a group's sums for every row, `bias.len()`
    /// outputs from `o0`) into columns `o0..` of the (rows, n) output.
    ///
    /// # Safety
    /// The output holds `acc.len() * n` values, `o0 + bias.len() <= n`,
    /// and no other thread writes these columns meanwhile.
    unsafe fn write_group(&self, acc: &[[f32; GROUP]], bias: &[f32], n: usize, o0: usize) {
        for (r, a) in acc.iter().enumerate() {
            let dst = self.0.add(r * n + o0);
            for (j, (v, b)) in a.iter().zip(bias).enumerate() {
                *dst.add(j) = v + b;
            }
        }
    }
}
