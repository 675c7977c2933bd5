//! `y = x W^T` for a weight `W` of shape `[n, k]` (dense f32, f16 or bf16, or packed
//! quantized / sparse) and f32 activations `x` of shape `[rows, k]`; and the product with
//! the transposed weight, `dx = dy W` (for backward passes).
//!
//! - One or a few rows (decode): a dot product per output, parallel over output rows.
//!   A quantized row is a fused per-group dot (`scale * sum(q x) + min * sum(x)`, the group
//!   sums of `x` computed once); a sparse row gathers `x` at its kept columns and dots
//!   that with its decoded kept values.
//! - Many rows (prefill, evaluation): the output is cut into tiles of
//!   (token rows x weight rows); each tile converts (or decodes) its weight rows to f32 once
//!   (amortised over all the tile's tokens) and multiplies with the `gemm` crate. Tiles run
//!   in parallel on the rayon pool.
//!
//! [`linear_split`] cuts the work as a schedule planned it ([`Split`]: weight rows and
//! token rows a tile, threads); [`linear`] uses the defaults below. Every output value is
//! the same dot product either way, so a matvec gives the same bits whatever the split;
//! a GEMM tile's sums may round differently when the tile's shape changes gemm's blocking.

use rayon::prelude::*;

use super::dot::{Row, dot};
use crate::ir::WeightData;
use crate::tensor::{DType, Tensor};

/// Below this many rows a product is done as independent dot products.
const MATVEC_MAX_ROWS: usize = 3;
/// Weight rows per GEMM tile (bounds the f32 conversion buffer and the re-packing of x).
const TILE_N: usize = 256;
/// Weight rows per tile of [`linear`]'s default forward at most: the tiles of a weight
/// are as many as a multiple of the threads, each about this wide or less.
const TILE_N_MAX: usize = 320;
/// Weight rows converted together into a forward tile's transposed buffer (a cache line
/// of f32 per column).
const TRANSPOSE_ROWS: usize = 16;
/// From this inner dimension on, a forward tile hands gemm its weight rows transposed
/// (measured on SmolLM2's shapes: k = 1536 gains a third, k = 576 loses a little).
const TRANSPOSE_MIN_K: usize = 1024;
/// Smallest number of token rows in a tile.
const MIN_TILE_M: usize = 64;

/// How a product is cut (a schedule's tile and thread split, `edge_runtime::plan::Tile`):
/// output blocks of `weight_rows` weight rows (matvec) or `token_rows x weight_rows` tiles
/// (GEMM), spread over at most `threads` parallel tasks of the rayon pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Split {
    pub weight_rows: usize,
    pub token_rows: usize,
    pub threads: usize,
}

impl Split {
    /// Items a parallel task takes at least so that `items` make at most `threads` tasks.
    pub fn min_len(threads: usize, items: usize) -> usize {
        items.div_ceil(threads.max(1)).max(1)
    }
}

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

/// `[n, k]` of a matrix weight.
fn dims(w: &WeightData) -> (usize, usize) {
    let s = w.shape();
    assert_eq!(s.len(), 2, "linear: weight of shape {s:?} is not a matrix");
    (s[0], s[1])
}

/// Weight rows `j0..j1` of an f32 weight, borrowed; `None` for other storage.
fn rows_borrowed(w: &WeightData, j0: usize, j1: usize, k: usize) -> Option<&[f32]> {
    match w {
        WeightData::Dense(t) if t.dtype == DType::F32 => Some(&t.f32s().unwrap()[j0 * k..j1 * k]),
        _ => None,
    }
}

/// Converts (or decodes) weight rows `r0..r0 + out.len() / k` into `out` as f32.
fn convert_rows(w: &WeightData, r0: usize, k: usize, out: &mut [f32]) {
    match w {
        WeightData::Dense(t) => t.read_f32(r0 * k, out),
        WeightData::Packed(p) => {
            for (j, o) in (r0..).zip(out.chunks_exact_mut(k)) {
                p.decode_row_unchecked(j, o);
            }
        }
    }
}

/// Weight rows `j0..j1` as contiguous f32 `[j1 - j0, k]`: borrowed for f32 weights,
/// converted or decoded into `scratch` otherwise.
fn rows_f32<'a>(w: &'a WeightData, j0: usize, j1: usize, k: usize, scratch: &'a mut Vec<f32>) -> &'a [f32] {
    if let Some(rows) = rows_borrowed(w, j0, j1, k) {
        return rows;
    }
    scratch.resize((j1 - j0) * k, 0.0);
    convert_rows(w, j0, k, scratch);
    scratch
}

/// [`rows_f32`] with the conversion cut into bands of rows on the pool (a tile's decode
/// otherwise runs on one thread while the others wait for its product).
fn rows_f32_par<'a>(
    w: &'a WeightData,
    j0: usize,
    j1: usize,
    k: usize,
    scratch: &'a mut Vec<f32>,
) -> &'a [f32] {
    if let Some(rows) = rows_borrowed(w, j0, j1, k) {
        return rows;
    }
    let band = super::rows_per_thread(j1 - j0);
    scratch.resize((j1 - j0) * k, 0.0);
    scratch
        .par_chunks_mut(band * k)
        .enumerate()
        .for_each(|(b, o)| convert_rows(w, j0 + b * band, k, o));
    scratch
}

/// Weight rows `j0..j1` as f32, transposed: `[k, j1 - j0]` in `out` (the rhs of a
/// forward GEMM tile in the layout gemm packs fastest: with `W` read column-major, a
/// single thread's product with k = 1536 ran at 60-80 GFLOP/s against 108 row-major).
/// Rows are converted [`TRANSPOSE_ROWS`] at a time into `rows` and written out a column
/// segment each.
fn rows_f32_transposed(
    w: &WeightData,
    j0: usize,
    j1: usize,
    k: usize,
    rows: &mut Vec<f32>,
    out: &mut Vec<f32>,
) {
    let nb = j1 - j0;
    out.resize(k * nb, 0.0);
    for b0 in (j0..j1).step_by(TRANSPOSE_ROWS) {
        let b1 = (b0 + TRANSPOSE_ROWS).min(j1);
        let src = rows_f32(w, b0, b1, k, rows);
        let c0 = b0 - j0;
        for (c, r) in src.chunks_exact(k).enumerate() {
            for (kk, &v) in r.iter().enumerate() {
                out[kk * nb + c0 + c] = v;
            }
        }
    }
}

/// Computes `out[rows, n] = x[rows, k] W^T`. `w` must be a matrix `[n, k]`.
pub fn linear(x: &[f32], rows: usize, w: &WeightData, out: &mut [f32]) {
    linear_split(x, rows, w, out, None)
}

/// [`linear`] cut as `split` says (`None`: the default tiles on the whole pool).
pub fn linear_split(x: &[f32], rows: usize, w: &WeightData, out: &mut [f32], split: Option<Split>) {
    let (n, k) = dims(w);
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
            matvec(xr, w, k, orow, split);
        }
    } else {
        matmul_tiled(x, rows, w, n, k, out, split);
    }
}

fn matvec(x: &[f32], w: &WeightData, k: usize, out: &mut [f32], split: Option<Split>) {
    // By default about 16 chunks per thread keeps the pool busy without much scheduling
    // cost; a split gives the block of rows and the tasks.
    let (chunk, min_len) = match split {
        Some(s) => {
            let chunk = s.weight_rows.clamp(1, out.len().max(1));
            (chunk, Split::min_len(s.threads, out.len().div_ceil(chunk)))
        }
        None => (
            (out.len() / (16 * rayon::current_num_threads())).clamp(16, 1024),
            1,
        ),
    };
    match w {
        WeightData::Dense(t) => out
            .par_chunks_mut(chunk)
            .with_min_len(min_len)
            .enumerate()
            .for_each(|(c, o)| {
                let base = c * chunk;
                for (j, y) in o.iter_mut().enumerate() {
                    *y = dot(weight_row(t, base + j, k), x);
                }
            }),
        WeightData::Packed(p) => match p.group_sums(x) {
            // Quantized rows: a fused per-group dot, no decoded row.
            Some(xsums) => out
                .par_chunks_mut(chunk)
                .with_min_len(min_len)
                .enumerate()
                .for_each(|(c, o)| {
                    for (j, y) in o.iter_mut().enumerate() {
                        *y = p.dot_quant_row(c * chunk + j, x, &xsums);
                    }
                }),
            // Sparse rows: x gathered at the kept columns, dotted with the kept values.
            None => out
                .par_chunks_mut(chunk)
                .with_min_len(min_len)
                .enumerate()
                .for_each_init(Vec::<f32>::new, |scratch, (c, o)| {
                    for (j, y) in o.iter_mut().enumerate() {
                        *y = p.dot_sparse_row(c * chunk + j, x, scratch);
                    }
                }),
        },
    }
}

/// Computes `dx[rows, k] = dy[rows, n] W` for a matrix weight `W` of shape `[n, k]`: the
/// product with the transposed weight (the input gradient of `y = x W^T`).
pub fn linear_transposed(dy: &[f32], rows: usize, w: &WeightData, dx: &mut [f32]) {
    let (n, k) = dims(w);
    assert_eq!(
        dy.len(),
        rows * n,
        "linear_transposed: dy has {} values, expected {rows}x{n}",
        dy.len()
    );
    assert_eq!(
        dx.len(),
        rows * k,
        "linear_transposed: dx has {} values, expected {rows}x{k}",
        dx.len()
    );
    if rows == 0 || n == 0 || k == 0 {
        dx.fill(0.0);
        return;
    }
    let par = if rows * k * TILE_N >= 1 << 16 {
        gemm::Parallelism::Rayon(rayon::current_num_threads())
    } else {
        gemm::Parallelism::None
    };
    let mut scratch = Vec::new();
    // Weight rows are consumed `tile` at a time, each tile decoded once (a dense f32 weight
    // is one tile: a single product); gemm parallelises every tile's product, the first
    // writing dx and the others accumulating into it.
    let tile = match w {
        WeightData::Dense(t) if t.dtype == DType::F32 => n,
        _ => TILE_N,
    };
    for j0 in (0..n).step_by(tile) {
        let j1 = (j0 + tile).min(n);
        let wf = rows_f32_par(w, j0, j1, k, &mut scratch);
        // SAFETY: dx is rows x k (row stride k, column stride 1), written only here;
        // lhs(i, j) = dy[i*n + j0 + j] for i < rows, j < j1 - j0 (in bounds: j0 + j < n);
        // rhs(j, c) = wf[j*k + c] for j < j1 - j0, c < k (wf holds (j1 - j0) * k values).
        // dst = alpha * dst + beta * lhs * rhs with alpha = 1 (accumulate) from the second
        // tile on; the first tile does not read dst (its old contents never matter).
        unsafe {
            gemm::gemm(
                rows,
                k,
                j1 - j0,
                dx.as_mut_ptr(),
                1,
                k as isize,
                j0 > 0,
                dy.as_ptr().add(j0),
                1,
                n as isize,
                wf.as_ptr(),
                1,
                k as isize,
                1.0f32,
                1.0f32,
                false,
                false,
                false,
                par,
            );
        }
    }
}

/// A raw output pointer that tiles share; each tile writes a disjoint rectangle.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: tiles write disjoint rectangles of the output buffer (see matmul_tiled), so
// sending the pointer to other threads cannot cause a data race.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

fn matmul_tiled(
    x: &[f32],
    rows: usize,
    w: &WeightData,
    n: usize,
    k: usize,
    out: &mut [f32],
    split: Option<Split>,
) {
    let (tn, tm) = match split {
        Some(s) => (s.weight_rows.clamp(1, n), s.token_rows.clamp(1, rows)),
        None => {
            // Weight tiles of equal width, as many as a multiple of the threads (a
            // [576, k] weight on two threads: two tiles of 288 rows, not 256 + 256 + 64
            // with one thread idle for the last); the token rows are split only when a
            // weight has too few rows to give every thread a tile.
            let threads = rayon::current_num_threads().max(1);
            let n_tiles = (threads * n.div_ceil(TILE_N_MAX * threads)).min(n.div_ceil(16));
            let tn = n.div_ceil(n_tiles.max(1));
            let want_m_tiles = threads.div_ceil(n.div_ceil(tn)).max(1);
            (tn, rows.div_ceil(want_m_tiles).max(MIN_TILE_M).min(rows))
        }
    };
    let n_tiles = n.div_ceil(tn);
    let m_tiles = rows.div_ceil(tm);
    let min_len = split.map_or(1, |s| Split::min_len(s.threads, n_tiles * m_tiles));
    let dst = OutPtr(out.as_mut_ptr());
    (0..n_tiles * m_tiles)
        .into_par_iter()
        .with_min_len(min_len)
        .for_each_init(<(Vec<f32>, Vec<f32>)>::default, |(rows_buf, wt), t| {
            let (jt, it) = (t / m_tiles, t % m_tiles);
            let (j0, j1) = (jt * tn, ((jt + 1) * tn).min(n));
            let (i0, i1) = (it * tm, ((it + 1) * tm).min(rows));
            let nb = j1 - j0;
            // The weight rows j0..j1 as f32: contiguous [nb, k], or transposed ([k, nb])
            // when k is long enough for gemm's packing of the rows to cost more than the
            // transposition.
            let (wf, cs, rs) = if k >= TRANSPOSE_MIN_K {
                rows_f32_transposed(w, j0, j1, k, rows_buf, wt);
                (&wt[..], 1, nb as isize)
            } else {
                (rows_f32(w, j0, j1, k, rows_buf), k as isize, 1)
            };
            let xs = &x[i0 * k..i1 * k];
            let d = dst;
            // SAFETY: dst points to `out` of rows*n f32; this tile writes rows i0..i1, columns
            // j0..j1 only (row stride n), which no other tile touches. lhs is xs [(i1-i0) x k]
            // row-major; rhs(kk, j) = wf[kk*cs + j*rs]: wf[j*k + kk] ([nb, k], cs = k,
            // rs = 1) or wf[kk*nb + j] ([k, nb], cs = 1, rs = nb), inside the k * nb values
            // wf holds.
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
                    cs,
                    rs,
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
    use std::sync::Arc;

    use super::*;
    use crate::format::{QuantScheme, QuantSpec, SparsePattern, ValueFormat};
    use crate::packed::PackedWeight;

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
                linear(&x, rows, &WeightData::Dense(w), &mut got);
                for (a, b) in got.iter().zip(&want) {
                    assert!(
                        (a - b).abs() < 1e-4 * (1.0 + b.abs()),
                        "{rows}x{n}x{k} {dt}: {a} vs {b}"
                    );
                }
            }
        }
    }

    fn values(len: usize, seed: usize) -> Vec<f32> {
        (0..len)
            .map(|i| {
                let h = (i * 2654435761 + seed * 40503) % 1000003;
                (h % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    /// The packed formats the executor runs, one of each kind: every sparsity pattern
    /// with f16 and quantized values, and quantization alone at every bit-width.
    fn packed_weights(n: usize, k: usize) -> Vec<PackedWeight> {
        let w = values(n * k, 7);
        let specs = [
            (2, 32, QuantScheme::Asym),
            (3, 64, QuantScheme::Sym),
            (4, 128, QuantScheme::Asym),
            (8, 32, QuantScheme::Sym),
        ]
        .map(|(bits, group, scheme)| QuantSpec { bits, group, scheme });
        let mut out: Vec<PackedWeight> = specs
            .iter()
            .map(|q| PackedWeight::pack_quant(n, k, &w, *q).unwrap())
            .collect();
        let unstructured: Vec<bool> = (0..n * k).map(|i| (i * 7919) % 10 < 4).collect();
        // n:m masks keeping the first n of every block, shifted per block.
        let nm = |nn: usize, m: usize| -> Vec<bool> {
            (0..n * k)
                .map(|i| ((i % m) + i / m) % m < nn)
                .collect::<Vec<bool>>()
        };
        for (pattern, mask) in [
            (SparsePattern::Unstructured, unstructured),
            (SparsePattern::NofM { n: 2, m: 4 }, nm(2, 4)),
            (SparsePattern::NofM { n: 4, m: 8 }, nm(4, 8)),
        ] {
            for vf in [
                ValueFormat::F16,
                ValueFormat::Quant(specs[0]),
                ValueFormat::Quant(specs[1]),
            ] {
                out.push(PackedWeight::pack_sparse(n, k, &w, &mask, pattern, vf).unwrap());
            }
        }
        out
    }

    /// `|a - b| <= 1e-5 * sum_t |x_t w_t|`: relative to the magnitude of the products summed.
    fn assert_close(got: &[f32], want: &[f32], scale: &[f32], what: &str) {
        for (i, ((a, b), s)) in got.iter().zip(want).zip(scale).enumerate() {
            assert!(
                (a - b).abs() <= 1e-5 * s.max(1e-6),
                "{what} [{i}]: {a} vs {b} (scale {s})"
            );
        }
    }

    #[test]
    fn packed_matvec_and_gemm_equal_dequantize_then_dense() {
        for &(rows, n, k) in &[(1, 37, 40), (3, 261, 200), (5, 19, 264), (70, 300, 136)] {
            let x = values(rows * k, 3);
            for p in packed_weights(n, k) {
                let what = format!("{} {rows}x{n}x{k}", p.format());
                let dq = p.to_f32_vec();
                let absx: Vec<f32> = x.iter().map(|v| v.abs()).collect();
                let absw: Vec<f32> = dq.iter().map(|v| v.abs()).collect();
                let scale = reference(&absx, rows, &absw, n, k);
                let want = reference(&x, rows, &dq, n, k);
                let mut dense = vec![f32::NAN; rows * n];
                linear(
                    &x,
                    rows,
                    &WeightData::Dense(Tensor::from_f32(vec![n, k], dq).unwrap()),
                    &mut dense,
                );
                let mut got = vec![f32::NAN; rows * n];
                linear(&x, rows, &WeightData::Packed(Arc::new(p)), &mut got);
                assert_close(&got, &want, &scale, &what);
                assert_close(&got, &dense, &scale, &what);
            }
        }
    }

    #[test]
    fn transposed_product_for_dense_and_packed() {
        for &(rows, n, k) in &[(1, 37, 40), (4, 300, 72), (9, 600, 200)] {
            let dy = values(rows * n, 5);
            let mut weights: Vec<WeightData> = packed_weights(n, k)
                .into_iter()
                .map(|p| WeightData::Packed(Arc::new(p)))
                .collect();
            let t = Tensor::from_f32(vec![n, k], values(n * k, 9)).unwrap();
            weights.push(WeightData::Dense(t.convert(DType::F16).unwrap()));
            weights.push(WeightData::Dense(t));
            for w in weights {
                let wf = w.to_f32_vec();
                // dy W = dy (W^T)^T: the reference with the transposed weight [k, n].
                let mut wt = vec![0.0; n * k];
                for j in 0..n {
                    for c in 0..k {
                        wt[c * n + j] = wf[j * k + c];
                    }
                }
                let want = reference(&dy, rows, &wt, k, n);
                let absdy: Vec<f32> = dy.iter().map(|v| v.abs()).collect();
                let abswt: Vec<f32> = wt.iter().map(|v| v.abs()).collect();
                let scale = reference(&absdy, rows, &abswt, k, n);
                let mut got = vec![f32::NAN; rows * k];
                linear_transposed(&dy, rows, &w, &mut got);
                assert_close(&got, &want, &scale, &format!("{} {rows}x{n}x{k}", w.format()));
            }
        }
    }

    /// A planned split computes the same products: a matvec the same bits for any block
    /// and thread count, a GEMM within rounding of the default tiles, for dense and packed
    /// weights.
    #[test]
    fn any_split_gives_the_same_products() {
        let splits = [
            (1, 1, 1),
            (4, 64, 1),
            (7, 5, 2),
            (44, 64, 2),
            (300, 200, 3),
            (12, 16, 8),
        ];
        for &(rows, n, k) in &[(1, 61, 40), (3, 130, 72), (9, 61, 40), (70, 130, 72)] {
            let x = values(rows * k, 11);
            let mut weights: Vec<WeightData> = packed_weights(n, k)
                .into_iter()
                .map(|p| WeightData::Packed(Arc::new(p)))
                .collect();
            let t = Tensor::from_f32(vec![n, k], values(n * k, 13)).unwrap();
            weights.push(WeightData::Dense(t.convert(DType::F16).unwrap()));
            weights.push(WeightData::Dense(t));
            for w in &weights {
                let mut want = vec![f32::NAN; rows * n];
                linear(&x, rows, w, &mut want);
                for &(weight_rows, token_rows, threads) in &splits {
                    let split = Split {
                        weight_rows,
                        token_rows,
                        threads,
                    };
                    let mut got = vec![f32::NAN; rows * n];
                    linear_split(&x, rows, w, &mut got, Some(split));
                    let what = format!("{} {rows}x{n}x{k} {split:?}", w.format());
                    if rows <= MATVEC_MAX_ROWS {
                        assert!(
                            got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()),
                            "{what}"
                        );
                    } else {
                        for (a, b) in got.iter().zip(&want) {
                            assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "{what}: {a} vs {b}");
                        }
                    }
                }
            }
        }
    }
}
