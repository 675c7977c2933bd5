//! `y = x W^T` for a dense weight `W` of shape `[n, k]` (f32, f16 or bf16) and f32
//! activations `x` of shape `[rows, k]`.
//!
//! - One or a few rows (decode): a dot product per output, parallel over output rows.
//! - Many rows (prefill, evaluation): the output is cut into tiles of
//!   (token rows x weight rows); each tile converts its weight rows to f32 once (amortised
//!   over all the tile's tokens) and multiplies with the `gemm` crate. Tiles run in
//!   parallel on the rayon pool.

use rayon::prelude::*;

use super::dot::{Row, dot};
use crate::tensor::{DType, Tensor};

/// Below this many rows a product is done as independent dot products.
const MATVEC_MAX_ROWS: usize = 3;
/// Weight rows per GEMM tile (bounds the f32 conversion buffer and the re-packing of x).
const TILE_N: usize = 256;
/// Smallest number of token rows in a tile.
const MIN_TILE_M: usize = 64;

/// Borrows row `j` of the weight.
#[inline]
pub fn weight_row(w: &Tensor, j: usize, k: usize) -> Row<'_> {
    let r = j * k..(j + 1) * k;
    match w.dtype {
        DType::F32 => Row::F32(&w.f32s().unwrap()[r]),
        DType::F16 => Row::F16(&w.halves().unwrap()[r]),
        DType::BF16 => Row::BF16(&w.halves().unwrap()[r]),
    }
}

/// Computes `out[rows, n] = x[rows, k] W^T`. `w.shape` must be `[n, k]`.
pub fn linear(x: &[f32], rows: usize, w: &Tensor, out: &mut [f32]) {
    let (n, k) = (w.shape[0], w.shape[1]);
    assert_eq!(
        x.len(),
        rows * k,
        "linear: x has {} values, expected {rows}x{k}",
        x.len()
    );
    assert_eq!(
        out.len(),
        rows * n,
        "linear: out has {} values, expected {rows}x{n}",
        out.len()
    );
    if rows == 0 || n == 0 {
        return;
    }
    if rows <= MATVEC_MAX_ROWS {
        for (xr, orow) in x.chunks_exact(k).zip(out.chunks_exact_mut(n)) {
            matvec(xr, w, k, orow);
        }
    } else {
        matmul_tiled(x, rows, w, n, k, out);
    }
}

fn matvec(x: &[f32], w: &Tensor, k: usize, out: &mut [f32]) {
    // About 16 chunks per thread keeps the pool busy without much scheduling cost.
    let chunk = (out.len() / (16 * rayon::current_num_threads())).clamp(16, 1024);
    out.par_chunks_mut(chunk).enumerate().for_each(|(c, o)| {
        let base = c * chunk;
        for (j, y) in o.iter_mut().enumerate() {
            *y = dot(weight_row(w, base + j, k), x);
        }
    });
}

/// A raw output pointer that tiles share; each tile writes a disjoint rectangle.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: tiles write disjoint rectangles of the output buffer (see matmul_tiled), so
// sending the pointer to other threads cannot cause a data race.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

fn matmul_tiled(x: &[f32], rows: usize, w: &Tensor, n: usize, k: usize, out: &mut [f32]) {
    let threads = rayon::current_num_threads();
    let tn = TILE_N.min(n);
    let n_tiles = n.div_ceil(tn);
    // Split the token rows too when there are too few weight tiles to feed every thread.
    let want_m_tiles = (2 * threads).div_ceil(n_tiles).max(1);
    let tm = rows.div_ceil(want_m_tiles).max(MIN_TILE_M).min(rows);
    let m_tiles = rows.div_ceil(tm);
    let dst = OutPtr(out.as_mut_ptr());
    (0..n_tiles * m_tiles)
        .into_par_iter()
        .for_each_init(Vec::<f32>::new, |scratch, t| {
            let (jt, it) = (t / m_tiles, t % m_tiles);
            let (j0, j1) = (jt * tn, ((jt + 1) * tn).min(n));
            let (i0, i1) = (it * tm, ((it + 1) * tm).min(rows));
            let nb = j1 - j0;
            // The weight rows j0..j1 as f32, contiguous [nb, k].
            let wf: &[f32] = match w.dtype {
                DType::F32 => &w.f32s().unwrap()[j0 * k..j1 * k],
                _ => {
                    scratch.resize(nb * k, 0.0);
                    w.read_f32(j0 * k, scratch);
                    scratch
                }
            };
            let xs = &x[i0 * k..i1 * k];
            let d = dst;
            // SAFETY: dst points to `out` of rows*n f32; this tile writes rows i0..i1, columns
            // j0..j1 only (row stride n), which no other tile touches. lhs is xs [(i1-i0) x k]
            // row-major; rhs(kk, j) = wf[j*k + kk] i.e. column stride k, row stride 1.
            unsafe {
                gemm::gemm(
                    i1 - i0,
                    nb,
                    k,
                    d.0.add(i0 * n + j0),
                    1,
                    n as isize,
                    false,
                    xs.as_ptr(),
                    1,
                    k as isize,
                    wf.as_ptr(),
                    k as isize,
                    1,
                    0.0f32,
                    1.0f32,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(x: &[f32], rows: usize, w: &[f32], n: usize, k: usize) -> Vec<f32> {
        let mut o = vec![0.0; rows * n];
        for i in 0..rows {
            for j in 0..n {
                o[i * n + j] = (0..k)
                    .map(|t| x[i * k + t] as f64 * w[j * k + t] as f64)
                    .sum::<f64>() as f32;
            }
        }
        o
    }

    #[test]
    fn matches_reference_for_all_types_and_shapes() {
        for &(rows, n, k) in &[
            (1, 5, 7),
            (2, 300, 64),
            (5, 17, 33),
            (70, 600, 96),
            (130, 64, 176),
        ] {
            let x: Vec<f32> = (0..rows * k)
                .map(|i| ((i * 31 % 67) as f32 - 33.0) / 40.0)
                .collect();
            let wv: Vec<f32> = (0..n * k).map(|i| ((i * 17 % 89) as f32 - 44.0) / 50.0).collect();
            let w32 = Tensor::from_f32(vec![n, k], wv).unwrap();
            for dt in [DType::F32, DType::F16, DType::BF16] {
                let w = w32.convert(dt).unwrap();
                let want = reference(&x, rows, &w.to_f32_vec(), n, k);
                let mut got = vec![f32::NAN; rows * n];
                linear(&x, rows, &w, &mut got);
                for (a, b) in got.iter().zip(&want) {
                    assert!(
                        (a - b).abs() < 1e-4 * (1.0 + b.abs()),
                        "{rows}x{n}x{k} {dt}: {a} vs {b}"
                    );
                }
            }
        }
    }
}
