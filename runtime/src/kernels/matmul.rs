//! Products of activation matrices (the training GEMMs: attention scores, LoRA factors,
//! weight gradients), on strided views so that transposes and per-head slices cost
//! nothing. The arithmetic is the `gemm` crate's; this module checks every view against
//! its buffer before handing raw pointers over.

/// A read-only strided matrix view: element `(i, j)` is `data[offset + i*rs + j*cs]`.
#[derive(Clone, Copy)]
pub struct View<'a> {
    data: &'a [f32],
    offset: usize,
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl<'a> View<'a> {
    /// A row-major `rows x cols` matrix stored contiguously.
    pub fn new(data: &'a [f32], rows: usize, cols: usize) -> Self {
        View {
            data,
            offset: 0,
            rows,
            cols,
            rs: cols,
            cs: 1,
        }
    }

    /// Columns `c0..c0 + cols` of a row-major matrix of width `width` (e.g. one head of
    /// a `[rows, heads * head_dim]` activation).
    pub fn columns(data: &'a [f32], rows: usize, width: usize, c0: usize, cols: usize) -> Self {
        View {
            data,
            offset: c0,
            rows,
            cols,
            rs: width,
            cs: 1,
        }
    }

    /// The transposed view.
    pub fn t(self) -> Self {
        View {
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn cols(&self) -> usize {
        self.cols
    }

    fn check(&self, what: &str) {
        if self.rows > 0 && self.cols > 0 {
            let last = self.offset + (self.rows - 1) * self.rs + (self.cols - 1) * self.cs;
            assert!(
                last < self.data.len(),
                "matmul: {what} view {}x{} (offset {}, strides {}/{}) exceeds its buffer of {}",
                self.rows,
                self.cols,
                self.offset,
                self.rs,
                self.cs,
                self.data.len()
            );
        }
    }
}

/// A mutable strided matrix view (see [`View`]).
pub struct ViewMut<'a> {
    data: &'a mut [f32],
    offset: usize,
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl<'a> ViewMut<'a> {
    pub fn new(data: &'a mut [f32], rows: usize, cols: usize) -> Self {
        ViewMut {
            data,
            offset: 0,
            rows,
            cols,
            rs: cols,
            cs: 1,
        }
    }

    pub fn columns(data: &'a mut [f32], rows: usize, width: usize, c0: usize, cols: usize) -> Self {
        ViewMut {
            data,
            offset: c0,
            rows,
            cols,
            rs: width,
            cs: 1,
        }
    }
}

/// `dst = beta * a · b + (if accumulate { dst } else { 0 })`, on the thread pool when the
/// product is large enough to gain from it.
///
/// Panics when the shapes disagree or a view exceeds its buffer (a programming error of
/// the caller, never a property of user input).
pub fn matmul(dst: ViewMut<'_>, a: View<'_>, b: View<'_>, beta: f32, accumulate: bool) {
    product(dst, a, b, beta, accumulate, true);
}

/// [`matmul`] on the calling thread only: for callers that are themselves one task of a
/// parallel loop (e.g. one attention head), whose siblings already keep the pool busy.
pub fn matmul_serial(dst: ViewMut<'_>, a: View<'_>, b: View<'_>, beta: f32, accumulate: bool) {
    product(dst, a, b, beta, accumulate, false);
}

fn product(dst: ViewMut<'_>, a: View<'_>, b: View<'_>, beta: f32, accumulate: bool, pool: bool) {
    assert_eq!(
        a.cols, b.rows,
        "matmul: inner dimensions {} and {}",
        a.cols, b.rows
    );
    assert_eq!(
        (dst.rows, dst.cols),
        (a.rows, b.cols),
        "matmul: destination shape"
    );
    a.check("lhs");
    b.check("rhs");
    if dst.rows > 0 && dst.cols > 0 {
        let last = dst.offset + (dst.rows - 1) * dst.rs + (dst.cols - 1) * dst.cs;
        assert!(
            last < dst.data.len(),
            "matmul: destination view exceeds its buffer"
        );
    }
    if dst.rows == 0 || dst.cols == 0 {
        return;
    }
    if a.cols == 0 {
        if !accumulate {
            for i in 0..dst.rows {
                for j in 0..dst.cols {
                    dst.data[dst.offset + i * dst.rs + j * dst.cs] = 0.0;
                }
            }
        }
        return;
    }
    let work = dst.rows * dst.cols * a.cols;
    let par = if pool && work >= 1 << 18 {
        gemm::Parallelism::Rayon(rayon::current_num_threads())
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: every view was checked above to lie inside its buffer for all (i, j) it
    // addresses; dst is borrowed mutably and distinct from a and b (Rust borrows), so
    // gemm reads a and b and writes only dst. With `read_dst = accumulate`, alpha is the
    // factor on the old dst (ignored when read_dst is false).
    unsafe {
        gemm::gemm(
            dst.rows,
            dst.cols,
            a.cols,
            dst.data.as_mut_ptr().add(dst.offset),
            dst.cs as isize,
            dst.rs as isize,
            accumulate,
            a.data.as_ptr().add(a.offset),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr().add(b.offset),
            b.cs as isize,
            b.rs as isize,
            1.0f32,
            beta,
            false,
            false,
            false,
            par,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum();
            }
        }
        c
    }

    #[test]
    fn transposed_and_column_views_match_naive_products() {
        let (m, k, n) = (5, 7, 3);
        let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.11).cos()).collect();
        let want = naive(&a, &b, m, k, n);
        let mut c = vec![0.0; m * n];
        matmul(
            ViewMut::new(&mut c, m, n),
            View::new(&a, m, k),
            View::new(&b, k, n),
            1.0,
            false,
        );
        for (x, y) in c.iter().zip(&want) {
            assert!((x - y).abs() < 1e-5);
        }
        // (B^T A^T)^T = A B, computed through transposed views into a transposed dst.
        let mut ct = vec![0.0; n * m];
        matmul(
            ViewMut::new(&mut ct, n, m),
            View::new(&b, k, n).t(),
            View::new(&a, m, k).t(),
            2.0,
            false,
        );
        for i in 0..m {
            for j in 0..n {
                assert!((ct[j * m + i] - 2.0 * want[i * n + j]).abs() < 1e-5);
            }
        }
        // Column slices: the second "head" of width 3 in a width-7 matrix.
        let mut wide = vec![1.0; m * 7];
        matmul(
            ViewMut::columns(&mut wide, m, 7, 3, n),
            View::new(&a, m, k),
            View::new(&b, k, n),
            1.0,
            true,
        );
        for i in 0..m {
            for j in 0..7 {
                let want_ij = if (3..6).contains(&j) {
                    1.0 + want[i * n + j - 3]
                } else {
                    1.0
                };
                assert!((wide[i * 7 + j] - want_ij).abs() < 1e-5);
            }
        }
    }
}
