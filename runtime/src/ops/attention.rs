//! Causal grouped-query attention over a KV cache.

use rayon::prelude::*;

use crate::kernels::dot::{Row, dot};

/// The keys and values of one layer for positions `0..len`, `[capacity, kv_heads * head_dim]`.
#[derive(Debug, Clone)]
pub struct KvSlot {
    pub k: Vec<f32>,
    pub v: Vec<f32>,
}

impl KvSlot {
    pub fn new(capacity: usize, kv_width: usize) -> Self {
        KvSlot {
            k: vec![0.0; capacity * kv_width],
            v: vec![0.0; capacity * kv_width],
        }
    }
}

/// Shapes of an attention op.
#[derive(Debug, Clone, Copy)]
pub struct AttnShape {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// Appends `k`, `v` (`rows` new positions starting at `start`) to the cache and computes
/// causal attention of the new queries `q` over positions `0..start + rows`.
/// `out` is `[rows, heads * head_dim]`. Heads run in parallel on the rayon pool.
pub fn attention(
    shape: AttnShape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    cache: &mut KvSlot,
    start: usize,
    out: &mut [f32],
) {
    attention_threads(shape, q, k, v, cache, start, out, None)
}

/// [`attention`] with the heads spread over at most `threads` parallel tasks (a
/// schedule's thread split; `None`: one task a head). Each head computes the same values
/// however the heads are grouped.
#[allow(clippy::too_many_arguments)]
pub fn attention_threads(
    shape: AttnShape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    cache: &mut KvSlot,
    start: usize,
    out: &mut [f32],
    threads: Option<usize>,
) {
    let AttnShape {
        heads,
        kv_heads,
        head_dim: hd,
    } = shape;
    let (qw, kvw) = (heads * hd, kv_heads * hd);
    let rows = q.len() / qw;
    cache.k[start * kvw..(start + rows) * kvw].copy_from_slice(k);
    cache.v[start * kvw..(start + rows) * kvw].copy_from_slice(v);
    let total = start + rows;
    let (kc, vc) = (&cache.k[..total * kvw], &cache.v[..total * kvw]);
    let group = heads / kv_heads;
    let scale = 1.0 / (hd as f32).sqrt();
    let min_len = threads.map_or(1, |t| heads.div_ceil(t.max(1)).max(1));

    if rows == 1 {
        // Decode: one query row; heads in parallel.
        let per_head: Vec<Vec<f32>> = (0..heads)
            .into_par_iter()
            .with_min_len(min_len)
            .map(|h| {
                let g = h / group;
                let qh = &q[h * hd..(h + 1) * hd];
                let mut s: Vec<f32> = (0..total)
                    .map(|t| dot(Row::F32(&kc[t * kvw + g * hd..t * kvw + (g + 1) * hd]), qh) * scale)
                    .collect();
                softmax(&mut s);
                let mut o = vec![0.0f32; hd];
                for (t, &p) in s.iter().enumerate() {
                    let vr = &vc[t * kvw + g * hd..t * kvw + (g + 1) * hd];
                    for (a, &b) in o.iter_mut().zip(vr) {
                        *a += p * b;
                    }
                }
                o
            })
            .collect();
        for (h, o) in per_head.into_iter().enumerate() {
            out[h * hd..(h + 1) * hd].copy_from_slice(&o);
        }
        return;
    }

    // Prefill: per head, scores = Q K^T (gemm), causal softmax, then P V (gemm).
    let per_head: Vec<Vec<f32>> = (0..heads)
        .into_par_iter()
        .with_min_len(min_len)
        .map(|h| {
            let g = h / group;
            let mut s = vec![0.0f32; rows * total];
            // SAFETY: lhs = q rows x hd at column offset h*hd, row stride qw (in bounds:
            // q has rows*qw values); rhs(d, t) = kc[t*kvw + g*hd + d], column stride kvw,
            // row stride 1, t < total; dst = s, rows x total, row-major.
            unsafe {
                gemm::gemm(
                    rows,
                    total,
                    hd,
                    s.as_mut_ptr(),
                    1,
                    total as isize,
                    false,
                    q.as_ptr().add(h * hd),
                    1,
                    qw as isize,
                    kc.as_ptr().add(g * hd),
                    kvw as isize,
                    1,
                    0.0f32,
                    scale,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
            for (r, srow) in s.chunks_exact_mut(total).enumerate() {
                let visible = start + r + 1;
                softmax(&mut srow[..visible]);
                srow[visible..].fill(0.0);
            }
            let mut o = vec![0.0f32; rows * hd];
            // SAFETY: lhs = s (rows x total, row-major); rhs(t, d) = vc[t*kvw + g*hd + d],
            // row stride kvw, column stride 1; dst = o (rows x hd, row-major).
            unsafe {
                gemm::gemm(
                    rows,
                    hd,
                    total,
                    o.as_mut_ptr(),
                    1,
                    hd as isize,
                    false,
                    s.as_ptr(),
                    1,
                    total as isize,
                    vc.as_ptr().add(g * hd),
                    1,
                    kvw as isize,
                    0.0f32,
                    1.0f32,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
            o
        })
        .collect();
    for (h, o) in per_head.iter().enumerate() {
        for r in 0..rows {
            out[r * qw + h * hd..r * qw + (h + 1) * hd].copy_from_slice(&o[r * hd..(r + 1) * hd]);
        }
    }
}

/// In-place numerically stable softmax.
pub fn softmax(x: &mut [f32]) {
    let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let inv = 1.0 / crate::kernels::exp::exp_shifted(x, m);
    for v in x.iter_mut() {
        *v *= inv;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Prefill of n rows at once equals n single-row decode steps.
    #[test]
    fn prefill_equals_incremental_decode() {
        let shape = AttnShape {
            heads: 4,
            kv_heads: 2,
            head_dim: 8,
        };
        let (qw, kvw, n) = (32, 16, 6);
        let f = |i: usize, m: usize| ((i * m % 53) as f32 - 26.0) / 13.0;
        let q: Vec<f32> = (0..n * qw).map(|i| f(i, 7)).collect();
        let k: Vec<f32> = (0..n * kvw).map(|i| f(i, 11)).collect();
        let v: Vec<f32> = (0..n * kvw).map(|i| f(i, 5)).collect();
        let mut c1 = KvSlot::new(n, kvw);
        let mut full = vec![0.0; n * qw];
        attention(shape, &q, &k, &v, &mut c1, 0, &mut full);
        let mut c2 = KvSlot::new(n, kvw);
        for r in 0..n {
            let mut o = vec![0.0; qw];
            attention(
                shape,
                &q[r * qw..(r + 1) * qw],
                &k[r * kvw..(r + 1) * kvw],
                &v[r * kvw..(r + 1) * kvw],
                &mut c2,
                r,
                &mut o,
            );
            for (a, b) in o.iter().zip(&full[r * qw..(r + 1) * qw]) {
                assert!((a - b).abs() < 1e-5, "row {r}: {a} vs {b}");
            }
        }
    }

    /// Any thread split gives the same bits, for prefill and decode.
    #[test]
    fn thread_split_changes_no_value() {
        let shape = AttnShape {
            heads: 6,
            kv_heads: 2,
            head_dim: 8,
        };
        let (qw, kvw) = (48, 16);
        let f = |i: usize, m: usize| ((i * m % 61) as f32 - 30.0) / 17.0;
        for (start, n) in [(0, 5), (5, 1)] {
            let run = |threads: Option<usize>| {
                let mut c = KvSlot::new(8, kvw);
                let pre: Vec<f32> = (0..start * kvw).map(|i| f(i, 3)).collect();
                c.k[..pre.len()].copy_from_slice(&pre);
                c.v[..pre.len()].copy_from_slice(&pre);
                let q: Vec<f32> = (0..n * qw).map(|i| f(i, 7)).collect();
                let k: Vec<f32> = (0..n * kvw).map(|i| f(i, 11)).collect();
                let mut o = vec![f32::NAN; n * qw];
                attention_threads(shape, &q, &k, &k, &mut c, start, &mut o, threads);
                o
            };
            let want = run(None);
            for t in [1, 2, 4, 6, 9] {
                let got = run(Some(t));
                assert!(
                    got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{t} threads, {n} rows after {start}"
                );
            }
        }
    }
}
