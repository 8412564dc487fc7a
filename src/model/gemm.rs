//! The f32 GEMM of the CPU training ops: `C (+)= A B` for row-major slices,
//! either operand read transposed in place (no copies).
//!
//! Why the `gemm` crate and not our own kernel: at the training shapes of
//! the `small` preset (M = 1024 rows; K, N in 384..8192) it runs at
//! 110-167 GFLOP/s on this 2-core AVX2 machine, 0.79-1.40x `torch.matmul`
//! on 2 threads in the same rounds, for the forward and both transposed
//! backward products (`scripts/train-speed.sh`, bench/train-speed/).
//! Candle calls the same crate, but through its graph: transposed
//! gradients, a copy for each non-contiguous operand and an allocation per
//! product. Inference keeps `kernels::Matrix`, which reads prepacked
//! weights once for few rows.

/// Which operand layout a product reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// As stored: (rows, cols) row-major.
    N,
    /// Transposed: the slice holds (cols, rows) row-major.
    T,
}

/// A row-major matrix operand of a product, possibly read transposed.
#[derive(Clone, Copy)]
pub struct Operand<'a> {
    pub data: &'a [f32],
    /// Rows and columns of the operand as the product reads it.
    pub rows: usize,
    pub cols: usize,
    pub op: Op,
    /// Distance between consecutive stored rows (the stored row length
    /// unless built with [`Operand::stride`]).
    pub ld: usize,
}

impl<'a> Operand<'a> {
    /// `data` holds a (rows, cols) matrix read as is.
    pub fn n(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self {
            data,
            rows,
            cols,
            op: Op::N,
            ld: cols,
        }
    }

    /// `data` holds a (cols, rows) matrix read transposed, as (rows, cols).
    pub fn t(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self {
            data,
            rows,
            cols,
            op: Op::T,
            ld: rows,
        }
    }

    /// The same operand with stored rows `ld` floats apart (a column block
    /// of a wider matrix).
    pub fn stride(self, ld: usize) -> Self {
        Self { ld, ..self }
    }

    /// (stored rows, stored row length) of the operand.
    fn stored(&self) -> (usize, usize) {
        match self.op {
            Op::N => (self.rows, self.cols),
            Op::T => (self.cols, self.rows),
        }
    }

    /// The slice reaches every stored element (and the stride fits an isize).
    fn fits(&self) -> bool {
        let (r, c) = self.stored();
        c <= self.ld && reaches(self.data.len(), r, c, self.ld)
    }

    /// (row stride, column stride) of the operand as read.
    fn strides(&self) -> (isize, isize) {
        match self.op {
            Op::N => (self.ld as isize, 1),
            Op::T => (1, self.ld as isize),
        }
    }
}

/// Whether `len` floats hold `rows` rows of `cols` floats, `ld` apart, with
/// no overflow in the offsets and `ld` representable as a stride.
fn reaches(len: usize, rows: usize, cols: usize, ld: usize) -> bool {
    if rows == 0 || cols == 0 {
        return true;
    }
    let last = (rows - 1).checked_mul(ld).and_then(|x| x.checked_add(cols));
    isize::try_from(ld).is_ok() && last.is_some_and(|last| last <= len)
}

/// `c (m, n) = a (m, k) b (k, n)`, or `c += a b` when `accumulate`.
///
/// # Panics
/// When the shapes disagree or a slice is shorter than its shape: a caller
/// bug, never input-dependent (ops check their inputs' shapes first).
pub fn matmul(c: &mut [f32], a: Operand, b: Operand, accumulate: bool) {
    let n = b.cols;
    matmul_into(c, n, a, b, accumulate)
}

/// As [`matmul`], with the output's rows `ldc` floats apart in `c`.
pub fn matmul_into(c: &mut [f32], ldc: usize, a: Operand, b: Operand, accumulate: bool) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(b.rows, k, "gemm: inner dimensions {k} and {}", b.rows);
    assert!(
        a.fits(),
        "gemm: lhs of {} floats for {m} x {k}, ld {}",
        a.data.len(),
        a.ld
    );
    assert!(
        b.fits(),
        "gemm: rhs of {} floats for {k} x {n}, ld {}",
        b.data.len(),
        b.ld
    );
    let fits = n <= ldc && reaches(c.len(), m, n, ldc);
    assert!(
        fits,
        "gemm: output of {} floats for {m} x {n}, ld {ldc}",
        c.len()
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            c.chunks_mut(ldc).take(m).for_each(|r| r[..n].fill(0.0));
        }
        return;
    }
    let (a_rs, a_cs) = a.strides();
    let (b_rs, b_cs) = b.strides();
    let threads = if 2 * m * n * k < 1 << 18 {
        gemm::Parallelism::None
    } else {
        gemm::Parallelism::Rayon(rayon::current_num_threads())
    };
    // SAFETY: the asserts above bound every index the strides reach: each
    // operand's last stored element, and c's (m - 1) * ldc + n - 1.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            ldc as isize,
            accumulate,
            a.data.as_ptr(),
            a_cs,
            a_rs,
            b.data.as_ptr(),
            b_cs,
            b_rs,
            1.0,
            1.0,
            false,
            false,
            false,
            threads,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(len: usize, seed: u32) -> Vec<f32> {
        (0..len)
            .map(|i| {
                ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) % 997) as f32 / 500.0 - 1.0
            })
            .collect()
    }

    /// Largest |c - scale * want|.
    fn max_err(c: &[f32], want: &[f32], scale: f32) -> f32 {
        c.iter()
            .zip(want)
            .map(|(p, q)| (p - scale * q).abs())
            .fold(0.0, f32::max)
    }

    fn naive(a: &Operand, b: &Operand) -> Vec<f32> {
        let at = |o: &Operand, i: usize, j: usize| match o.op {
            Op::N => o.data[i * o.ld + j],
            Op::T => o.data[j * o.ld + i],
        };
        let mut c = vec![0f32; a.rows * b.cols];
        for i in 0..a.rows {
            for j in 0..b.cols {
                c[i * b.cols + j] = (0..a.cols).map(|p| at(a, i, p) * at(b, p, j)).sum();
            }
        }
        c
    }

    #[test]
    fn every_transpose_combination_matches_the_naive_product() {
        let (m, k, n) = (37, 70, 29);
        let (x, y) = (data(m * k, 1), data(k * n, 2));
        for (a, b) in [
            (Operand::n(&x, m, k), Operand::n(&y, k, n)),
            (Operand::t(&x, m, k), Operand::n(&y, k, n)),
            (Operand::n(&x, m, k), Operand::t(&y, k, n)),
            (Operand::t(&x, m, k), Operand::t(&y, k, n)),
        ] {
            let want = naive(&a, &b);
            let mut c = vec![0.5f32; m * n];
            matmul(&mut c, a, b, false);
            let err = max_err(&c, &want, 1.0);
            assert!(err < 1e-4, "{:?} x {:?}: max error {err}", a.op, b.op);
            matmul(&mut c, a, b, true);
            let err = max_err(&c, &want, 2.0);
            assert!(
                err < 1e-4,
                "accumulating {:?} x {:?}: max error {err}",
                a.op,
                b.op
            );
        }
    }

    #[test]
    fn strided_operands_and_output_read_and_write_only_their_blocks() {
        // Columns 3..8 of a (6, 11) matrix times the transpose of columns
        // 2..7 of a (4, 9) one, into columns 1..5 of a (6, 7) output.
        let (x, y) = (data(6 * 11, 3), data(4 * 9, 4));
        let a = Operand::n(&x[3..], 6, 5).stride(11);
        let b = Operand::t(&y[2..], 5, 4).stride(9);
        let want = naive(&a, &b);
        let mut c = [9.0f32; 6 * 7];
        matmul_into(&mut c[1..], 7, a, b, false);
        for i in 0..6 {
            for j in 0..7 {
                let got = c[i * 7 + j];
                if (1..5).contains(&j) {
                    assert!((got - want[i * 4 + j - 1]).abs() < 1e-4, "({i}, {j})");
                } else {
                    assert_eq!(got, 9.0, "({i}, {j}) outside the block was written");
                }
            }
        }
    }

    #[test]
    fn a_stride_whose_offsets_overflow_is_refused() {
        let x = [0f32; 8];
        let a = Operand::n(&x, 3, 2).stride(usize::MAX / 2);
        let caught = std::panic::catch_unwind(|| {
            let mut c = [0f32; 6];
            matmul(&mut c, a, Operand::n(&x, 2, 2), false)
        });
        assert!(
            caught.is_err(),
            "an overflowing stride must not reach the kernel"
        );
    }

    #[test]
    fn a_product_big_enough_for_threads_matches_the_naive_one() {
        // Above the single-thread threshold, with strided operands.
        let (m, k, n) = (70, 90, 50);
        let (x, y) = (data(m * 100, 5), data(n * 95, 6));
        let (a, b) = (
            Operand::n(&x[1..], m, k).stride(100),
            Operand::t(&y[2..], k, n).stride(95),
        );
        assert!(2 * m * n * k >= 1 << 18);
        let want = naive(&a, &b);
        let mut c = vec![0f32; m * n];
        matmul(&mut c, a, b, false);
        let err = max_err(&c, &want, 1.0);
        assert!(err < 1e-3, "max error {err}");
    }

    #[test]
    fn an_empty_inner_dimension_gives_zeros_or_leaves_the_sum() {
        let mut c = vec![3.0f32; 6];
        matmul(&mut c, Operand::n(&[], 2, 0), Operand::n(&[], 0, 3), true);
        assert_eq!(c, vec![3.0; 6]);
        matmul(&mut c, Operand::n(&[], 2, 0), Operand::n(&[], 0, 3), false);
        assert_eq!(c, vec![0.0; 6]);
    }
}
