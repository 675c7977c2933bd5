//! Vector-Jacobian products of the IR's ops: given an op's saved inputs and the gradient
//! of the loss with respect to its output, the gradients with respect to its inputs (and
//! its trainable weights). Each function is the exact derivative of the forward op in
//! [`crate::ops`], checked against PyTorch's autograd in the tests of `edgec grad`.

use rayon::prelude::*;

use crate::ir::WeightData;
use crate::kernels::exp::exp_shifted;
use crate::kernels::linear::{linear, linear_transposed};
use crate::kernels::matmul::{View, ViewMut, matmul, matmul_serial};
use crate::ops::attention::{AttnShape, softmax};
use crate::ops::rope::RopeTable;

/// RMSNorm backward. Forward: `y = x * r * w`, `r = 1/sqrt(mean(x^2) + eps)` per row.
/// Writes `dx` into `dx_out` (if given; every element is written) and adds `dw` into
/// `dw_acc` (if given).
pub fn rms_norm_back(
    x: &[f32],
    w: &[f32],
    eps: f32,
    dy: &[f32],
    mut dx_out: Option<&mut [f32]>,
    mut dw_acc: Option<&mut [f32]>,
) {
    let d = w.len();
    for (r, (xr, gr)) in x.chunks_exact(d).zip(dy.chunks_exact(d)).enumerate() {
        let ss: f32 = xr.iter().map(|v| v * v).sum::<f32>() / d as f32;
        let inv = 1.0 / (ss + eps).sqrt();
        if let Some(dw) = dw_acc.as_deref_mut() {
            for ((a, &xv), &g) in dw.iter_mut().zip(xr).zip(gr) {
                *a += g * xv * inv;
            }
        }
        if let Some(dx) = dx_out.as_deref_mut() {
            // dx = r (w∘g) - x r^3 / d * Σ (w∘g∘x)
            let dot: f32 = xr.iter().zip(gr).zip(w).map(|((xv, g), wv)| xv * g * wv).sum();
            let c = inv * inv * inv * dot / d as f32;
            let o = &mut dx[r * d..(r + 1) * d];
            for (((o, &xv), &g), &wv) in o.iter_mut().zip(xr).zip(gr).zip(w) {
                *o = inv * wv * g - xv * c;
            }
        }
    }
}

/// RoPE backward: the rotation is orthogonal, so the gradient is rotated back.
/// Turns `dy` into `dx` in place.
pub fn rope_back(table: &RopeTable, dy: &mut [f32], heads: usize) {
    table.apply_inverse(dy, heads, 0);
}

/// SwiGLU backward. Forward: `y = silu(g) * u`. Writes every element of `dg` and `du`.
pub fn swiglu_back(gate: &[f32], up: &[f32], dy: &[f32], dg: &mut [f32], du: &mut [f32]) {
    dg.par_chunks_mut(4096)
        .zip(du.par_chunks_mut(4096))
        .enumerate()
        .for_each(|(c, (dg, du))| {
            let o = c * 4096;
            for i in 0..dg.len() {
                let (g, u, d) = (gate[o + i], up[o + i], dy[o + i]);
                let s = 1.0 / (1.0 + (-g).exp());
                du[i] = d * g * s;
                dg[i] = d * u * s * (1.0 + g * (1.0 - s));
            }
        });
}

/// `acc += b`, elementwise, in parallel chunks.
pub fn add_assign_par(acc: &mut [f32], b: &[f32]) {
    acc.par_chunks_mut(8192)
        .zip(b.par_chunks(8192))
        .for_each(|(o, b)| {
            for (x, y) in o.iter_mut().zip(b) {
                *x += y;
            }
        });
}

/// `o = silu(gate) * up`, elementwise, in parallel chunks (as
/// [`crate::ops::activation::swiglu`]).
pub fn swiglu_par(gate: &[f32], up: &[f32], o: &mut [f32]) {
    o.par_chunks_mut(8192)
        .zip(gate.par_chunks(8192).zip(up.par_chunks(8192)))
        .for_each(|(o, (g, u))| crate::ops::activation::swiglu(g, u, o));
}

/// Linear backward with respect to the input: `dx = dy W` (the product with the
/// transposed weight, in the weight's own storage format; every element of `dx` written).
pub fn linear_back(w: &WeightData, dy: &[f32], rows: usize, dx: &mut [f32]) {
    linear_transposed(dy, rows, w, dx);
}

/// LoRA down projection `h = x A^T` (`A`: `[r, in]`).
pub fn lora_down(x: &[f32], rows: usize, a: &[f32], r: usize) -> Vec<f32> {
    let k = a.len() / r;
    let mut h = vec![0.0; rows * r];
    matmul(
        ViewMut::new(&mut h, rows, r),
        View::new(x, rows, k),
        View::new(a, r, k).t(),
        1.0,
        false,
    );
    h
}

/// LoRA up projection `t = scale * h B^T` (`B`: `[out, r]`), or `t += scale * h B^T`
/// with `accumulate` (the adapter's term added straight into the base projection).
pub fn lora_up(h: &[f32], rows: usize, b: &[f32], r: usize, scale: f32, t: &mut [f32], accumulate: bool) {
    let n = b.len() / r;
    matmul(
        ViewMut::new(t, rows, n),
        View::new(h, rows, r),
        View::new(b, n, r).t(),
        scale,
        accumulate,
    );
}

/// Backward of [`lora_up`]: adds `dB = scale dt^T h` into `db`, returns `dh = scale dt B`.
pub fn lora_up_back(
    h: &[f32],
    rows: usize,
    b: &[f32],
    r: usize,
    scale: f32,
    dt: &[f32],
    db: &mut [f32],
) -> Vec<f32> {
    let n = b.len() / r;
    matmul(
        ViewMut::new(db, n, r),
        View::new(dt, rows, n).t(),
        View::new(h, rows, r),
        scale,
        true,
    );
    let mut dh = vec![0.0; rows * r];
    matmul(
        ViewMut::new(&mut dh, rows, r),
        View::new(dt, rows, n),
        View::new(b, n, r),
        scale,
        false,
    );
    dh
}

/// Backward of [`lora_down`]: adds `dA = dh^T x` into `da`, writes `dx = dh A` into
/// `dx_out` if given.
pub fn lora_down_back(
    x: &[f32],
    rows: usize,
    a: &[f32],
    r: usize,
    dh: &[f32],
    da: &mut [f32],
    dx_out: Option<&mut [f32]>,
) {
    let k = a.len() / r;
    matmul(
        ViewMut::new(da, r, k),
        View::new(dh, rows, r).t(),
        View::new(x, rows, k),
        1.0,
        true,
    );
    if let Some(dx) = dx_out {
        matmul(
            ViewMut::new(dx, rows, k),
            View::new(dh, rows, r),
            View::new(a, r, k),
            1.0,
            false,
        );
    }
}

/// Causal GQA attention backward for a whole sequence starting at position 0. The
/// probabilities are recomputed from `q` and `k` (nothing of size `rows^2` is saved by
/// the forward). Returns `(dq, dk, dv)`.
pub fn attention_back(
    shape: AttnShape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    dout: &[f32],
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let AttnShape {
        heads,
        kv_heads,
        head_dim: hd,
    } = shape;
    let (qw, kvw) = (heads * hd, kv_heads * hd);
    let rows = q.len() / qw;
    let group = heads / kv_heads;
    let scale = 1.0 / (hd as f32).sqrt();
    // One task per query head (more tasks than KV heads keeps both cores busy); each
    // returns its dq columns and its contribution to its KV head's dk, dv.
    let per_head: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = (0..heads)
        .into_par_iter()
        .map(|h| {
            let g = h / group;
            let mut dq = vec![0.0; rows * hd];
            let mut dk = vec![0.0; rows * hd];
            let mut dv = vec![0.0; rows * hd];
            let mut p = vec![0.0; rows * rows];
            let mut dp = vec![0.0; rows * rows];
            let kg = View::columns(k, rows, kvw, g * hd, hd);
            let vg = View::columns(v, rows, kvw, g * hd, hd);
            let qh = View::columns(q, rows, qw, h * hd, hd);
            let doh = View::columns(dout, rows, qw, h * hd, hd);
            matmul_serial(ViewMut::new(&mut p, rows, rows), qh, kg.t(), scale, false);
            for (r, row) in p.chunks_exact_mut(rows).enumerate() {
                softmax(&mut row[..=r]);
                row[r + 1..].fill(0.0);
            }
            // dV = P^T dO
            matmul_serial(
                ViewMut::new(&mut dv, rows, hd),
                View::new(&p, rows, rows).t(),
                doh,
                1.0,
                false,
            );
            // dP = dO V^T ; dS = P ∘ (dP - rowsum(dP ∘ P))
            matmul_serial(ViewMut::new(&mut dp, rows, rows), doh, vg.t(), 1.0, false);
            for (r, (pr, dr)) in p.chunks_exact(rows).zip(dp.chunks_exact_mut(rows)).enumerate() {
                let s: f32 = pr[..=r].iter().zip(&dr[..=r]).map(|(a, b)| a * b).sum();
                for c in 0..=r {
                    dr[c] = pr[c] * (dr[c] - s);
                }
                dr[r + 1..].fill(0.0);
            }
            // dQ = scale dS K ; dK = scale dS^T Q
            let dsv = View::new(&dp, rows, rows);
            matmul_serial(ViewMut::new(&mut dq, rows, hd), dsv, kg, scale, false);
            matmul_serial(ViewMut::new(&mut dk, rows, hd), dsv.t(), qh, scale, false);
            (dq, dk, dv)
        })
        .collect();
    let mut dq = vec![0.0; rows * qw];
    let mut dk = vec![0.0; rows * kvw];
    let mut dv = vec![0.0; rows * kvw];
    for (h, (dqh, dkh, dvh)) in per_head.iter().enumerate() {
        let g = h / group;
        for r in 0..rows {
            dq[r * qw + h * hd..r * qw + (h + 1) * hd].copy_from_slice(&dqh[r * hd..(r + 1) * hd]);
            let (kd, vd) = (
                &mut dk[r * kvw + g * hd..r * kvw + (g + 1) * hd],
                &mut dv[r * kvw + g * hd..r * kvw + (g + 1) * hd],
            );
            for ((a, b), (c, d)) in kd
                .iter_mut()
                .zip(&dkh[r * hd..(r + 1) * hd])
                .zip(vd.iter_mut().zip(&dvh[r * hd..(r + 1) * hd]))
            {
                *a += b;
                *c += d;
            }
        }
    }
    (dq, dk, dv)
}

/// The LM head of an exit: a frozen weight of the graph (any format), or a trained f32
/// copy (`[vocab, d]` row-major), used in place.
#[derive(Clone, Copy)]
pub enum Head<'a> {
    Weight(&'a WeightData),
    Trained { data: &'a [f32], vocab: usize },
}

impl Head<'_> {
    /// `(vocab, d)`.
    pub fn shape(&self) -> (usize, usize) {
        match self {
            Head::Weight(w) => (w.shape()[0], w.shape()[1]),
            Head::Trained { data, vocab } => (*vocab, data.len() / vocab),
        }
    }
}

/// Rows of logits computed at once by the chunked form of [`head_loss`] (a trained or
/// packed head); bounds its memory to `HEAD_CHUNK x vocab` whatever the sequence length.
pub const HEAD_CHUNK: usize = 64;

/// Rows the streamed form of [`head_loss`] (a frozen dense head) takes at once: all of a
/// step's rows at seq 256, batch 1, so the head's weight is read once a step.
pub const HEAD_ROWS: usize = 256;

/// Vocabulary entries whose logits the streamed form holds at once: a 1024-row slice of
/// a 576-wide head (2.4 MB) stays in cache between its two products (512 to 8192 measure
/// alike on SmolLM2's head; the smallest scratch among the fastest).
pub const HEAD_VOCAB_BLOCK: usize = 1024;

/// The weight of a head that [`head_loss`] streams over the vocabulary: a frozen head
/// stored as dense f32.
fn streamed_head<'a>(head: &Head<'a>, trains: bool) -> Option<&'a [f32]> {
    match head {
        Head::Weight(w) if !trains => w.dense().and_then(|t| t.f32s()),
        _ => None,
    }
}

/// The scratch [`head_loss`] needs for `rows` rows, in f32 elements.
pub fn head_scratch_len(rows: usize, head: &Head<'_>, trains: bool) -> usize {
    let (vocab, d) = head.shape();
    if streamed_head(head, trains).is_some() {
        let n = HEAD_ROWS.min(rows);
        n * HEAD_VOCAB_BLOCK.min(vocab) + 2 * n * d
    } else {
        HEAD_CHUNK.min(rows) * vocab
    }
}

/// The loss at an exit and its gradient, fused: `logits = x W^T` (W the head,
/// `[vocab, d]`), shifted next-token cross-entropy of row `t` against `targets[t]`
/// (`None`: not scored), each term weighted by `weight` (e.g. 1 / number of scored
/// tokens in the batch). Returns `(sum of weighted terms, unweighted sum, scored count)`
/// and writes `dx = d loss / d x` (every element); `dw_acc` receives `d loss / d W` when
/// the head trains. `scratch` is grown to
/// [`head_scratch_len`].
///
/// A frozen dense head takes the streamed form: the softmax is accumulated online over
/// blocks of [`HEAD_VOCAB_BLOCK`] words (running maximum and sum per row, as in
/// flash attention), so each slice of the head is read once for both products and the
/// logits of the whole vocabulary are never held. Other heads take the chunked form:
/// [`HEAD_CHUNK`] rows of logits over the whole vocabulary at a time.
#[allow(clippy::too_many_arguments)]
pub fn head_loss(
    x: &[f32],
    head: Head<'_>,
    targets: &[Option<u32>],
    weight: f32,
    dw_acc: Option<&mut [f32]>,
    dx: &mut [f32],
    scratch: &mut Vec<f32>,
) -> (f64, f64, usize) {
    let (vocab, d) = head.shape();
    let rows = targets.len();
    assert_eq!(dx.len(), rows * d, "head_loss: dx has the wrong size");
    match streamed_head(&head, dw_acc.is_some()) {
        Some(w) => head_loss_streamed(x, w, vocab, targets, weight, dx, scratch),
        None => head_loss_chunked(x, head, targets, weight, dw_acc, dx, scratch),
    }
}

/// Running state of one row of the streamed loss.
#[derive(Clone, Copy)]
struct OnlineRow {
    /// Largest logit so far.
    max: f32,
    /// Sum of `exp(z - max)` so far.
    sum: f64,
    /// The target's logit, once its block has been seen.
    target_logit: f32,
}

/// [`head_loss`] for a frozen dense head `w` (`[vocab, d]`), streamed over vocabulary
/// blocks. Per block `B`: `z = x W_B^T`; each row's running max `m` and sum `s` are
/// updated (the old sum and the row's accumulator rescaled by `exp(m_old - m_new)`);
/// `acc += exp(z - m) W_B`. At the end `dx = weight (acc / s - W[target])` and the loss
/// term is `m + ln s - z[target]`.
fn head_loss_streamed(
    x: &[f32],
    w: &[f32],
    vocab: usize,
    targets: &[Option<u32>],
    weight: f32,
    dx: &mut [f32],
    scratch: &mut Vec<f32>,
) -> (f64, f64, usize) {
    let d = w.len() / vocab;
    let scored: Vec<(usize, u32)> = targets
        .iter()
        .enumerate()
        .filter_map(|(r, t)| t.map(|t| (r, t)))
        .collect();
    dx.fill(0.0);
    if scored.is_empty() {
        return (0.0, 0.0, 0);
    }
    let (mut loss, mut raw) = (0.0f64, 0.0f64);
    let n_max = HEAD_ROWS.min(scored.len());
    let vb_max = HEAD_VOCAB_BLOCK.min(vocab);
    scratch.resize(n_max * vb_max + 2 * n_max * d, 0.0);
    let (logits, rest) = scratch.split_at_mut(n_max * vb_max);
    let (xs, acc) = rest.split_at_mut(n_max * d);
    for chunk in scored.chunks(HEAD_ROWS) {
        let n = chunk.len();
        let xs = &mut xs[..n * d];
        let acc = &mut acc[..n * d];
        for (dst, &(r, _)) in xs.chunks_exact_mut(d).zip(chunk) {
            dst.copy_from_slice(&x[r * d..(r + 1) * d]);
        }
        acc.fill(0.0);
        let mut state = vec![
            OnlineRow {
                max: f32::NEG_INFINITY,
                sum: 0.0,
                target_logit: 0.0,
            };
            n
        ];
        for v0 in (0..vocab).step_by(vb_max) {
            let vb = vb_max.min(vocab - v0);
            let lg = &mut logits[..n * vb];
            let wb = &w[v0 * d..(v0 + vb) * d];
            matmul(
                ViewMut::new(lg, n, vb),
                View::new(xs, n, d),
                View::new(wb, vb, d).t(),
                1.0,
                false,
            );
            lg.par_chunks_exact_mut(vb)
                .zip(acc.par_chunks_exact_mut(d))
                .zip(state.par_iter_mut())
                .zip(chunk.par_iter())
                .for_each(|(((row, acc_row), st), &(_, t))| {
                    let t = t as usize;
                    if (v0..v0 + vb).contains(&t) {
                        st.target_logit = row[t - v0];
                    }
                    let block_max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let m = st.max.max(block_max);
                    if m > st.max && st.sum > 0.0 {
                        let scale = (st.max - m).exp();
                        st.sum *= scale as f64;
                        acc_row.iter_mut().for_each(|a| *a *= scale);
                    }
                    st.max = m;
                    st.sum += exp_shifted(row, m) as f64;
                });
            matmul(
                ViewMut::new(acc, n, d),
                View::new(lg, n, vb),
                View::new(wb, vb, d),
                1.0,
                true,
            );
        }
        for ((&(r, t), st), acc_row) in chunk.iter().zip(&state).zip(acc.chunks_exact(d)) {
            let term = st.max as f64 + st.sum.ln() - st.target_logit as f64;
            raw += term;
            loss += term * weight as f64;
            let s = (weight as f64 / st.sum) as f32;
            let wt = &w[t as usize * d..(t as usize + 1) * d];
            for ((o, &a), &wv) in dx[r * d..(r + 1) * d].iter_mut().zip(acc_row).zip(wt) {
                *o = a * s - weight * wv;
            }
        }
    }
    (loss, raw, scored.len())
}

/// [`head_loss`] over [`HEAD_CHUNK`] rows of logits over the whole vocabulary at a time.
fn head_loss_chunked(
    x: &[f32],
    head: Head<'_>,
    targets: &[Option<u32>],
    weight: f32,
    mut dw_acc: Option<&mut [f32]>,
    dx: &mut [f32],
    logits: &mut Vec<f32>,
) -> (f64, f64, usize) {
    let (vocab, d) = head.shape();
    let rows = targets.len();
    let (mut loss, mut raw, mut count) = (0.0f64, 0.0f64, 0usize);
    logits.resize(HEAD_CHUNK.min(rows) * vocab, 0.0);
    let dense = match head {
        Head::Weight(w) => w.dense().and_then(|t| t.f32s()),
        Head::Trained { data, .. } => Some(data),
    };
    // A head stored in another format (f16, packed) goes through the weight kernels; a
    // trained head is always dense f32.
    let stored = match head {
        Head::Weight(w) => Some(w),
        Head::Trained { .. } => None,
    };
    for r0 in (0..rows).step_by(HEAD_CHUNK) {
        let r1 = (r0 + HEAD_CHUNK).min(rows);
        let n = r1 - r0;
        if targets[r0..r1].iter().all(Option::is_none) {
            dx[r0 * d..r1 * d].fill(0.0);
            continue;
        }
        let lg = &mut logits[..n * vocab];
        let xs = &x[r0 * d..r1 * d];
        match dense {
            // One GEMM over the whole vocabulary (the head is the largest product of a step).
            Some(w) => matmul(
                ViewMut::new(lg, n, vocab),
                View::new(xs, n, d),
                View::new(w, vocab, d).t(),
                1.0,
                false,
            ),
            None => linear(xs, n, stored.expect("only stored heads are not dense f32"), lg),
        }
        // Rows in parallel: each turns its logits into `weight * (softmax - onehot)` and
        // returns its loss term.
        let terms: Vec<Option<f64>> = lg
            .par_chunks_exact_mut(vocab)
            .zip(&targets[r0..r1])
            .map(|(row, t)| match t {
                None => {
                    row.fill(0.0);
                    None
                }
                Some(t) => {
                    let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let zt = row[*t as usize];
                    let mut sum = 0.0f64;
                    for z in row.iter_mut() {
                        *z = (*z - m).exp();
                        sum += *z as f64;
                    }
                    let s = (weight as f64 / sum) as f32;
                    for z in row.iter_mut() {
                        *z *= s;
                    }
                    row[*t as usize] -= weight;
                    Some(m as f64 + sum.ln() - zt as f64)
                }
            })
            .collect();
        for term in terms.into_iter().flatten() {
            raw += term;
            loss += term * weight as f64;
            count += 1;
        }
        match dense {
            Some(w) => matmul(
                ViewMut::new(&mut dx[r0 * d..r1 * d], n, d),
                View::new(lg, n, vocab),
                View::new(w, vocab, d),
                1.0,
                false,
            ),
            None => linear_transposed(
                lg,
                n,
                stored.expect("only stored heads are not dense f32"),
                &mut dx[r0 * d..r1 * d],
            ),
        }
        if let Some(dw) = dw_acc.as_deref_mut() {
            matmul(
                ViewMut::new(dw, vocab, d),
                View::new(lg, n, vocab).t(),
                View::new(&x[r0 * d..r1 * d], n, d),
                1.0,
                true,
            );
        }
    }
    (loss, raw, count)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::attention::KvSlot;
    use crate::ops::attention::attention;

    fn rnd(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed) % 1000) as f32 / 500.0 - 1.0)
            .collect()
    }

    /// Central finite differences of a scalar function of `x` along `dir`.
    fn fd(f: &dyn Fn(&[f32]) -> f64, x: &[f32], dir: &[f32]) -> f64 {
        let eps = 1e-3f32;
        let plus: Vec<f32> = x.iter().zip(dir).map(|(a, b)| a + eps * b).collect();
        let minus: Vec<f32> = x.iter().zip(dir).map(|(a, b)| a - eps * b).collect();
        (f(&plus) - f(&minus)) / (2.0 * eps as f64)
    }

    fn dotf(a: &[f32], b: &[f32]) -> f64 {
        a.iter().zip(b).map(|(x, y)| (*x as f64) * (*y as f64)).sum()
    }

    #[test]
    fn attention_backward_matches_finite_differences() {
        let shape = AttnShape {
            heads: 4,
            kv_heads: 2,
            head_dim: 8,
        };
        let rows = 6;
        let (q, k, v) = (rnd(rows * 32, 1), rnd(rows * 16, 2), rnd(rows * 16, 3));
        let probe = rnd(rows * 32, 4);
        let fwd = |q: &[f32], k: &[f32], v: &[f32]| {
            let mut out = vec![0.0; rows * 32];
            attention(shape, q, k, v, &mut KvSlot::new(rows, 16), 0, &mut out);
            dotf(&out, &probe)
        };
        let (dq, dk, dv) = attention_back(shape, &q, &k, &v, &probe);
        let dir_q = rnd(q.len(), 5);
        let dir_k = rnd(k.len(), 6);
        let num_q = fd(&|x| fwd(x, &k, &v), &q, &dir_q);
        let num_k = fd(&|x| fwd(&q, x, &v), &k, &dir_k);
        let num_v = fd(&|x| fwd(&q, &k, x), &v, &dir_k);
        assert!(
            (num_q - dotf(&dq, &dir_q)).abs() < 2e-3,
            "{num_q} vs {}",
            dotf(&dq, &dir_q)
        );
        assert!(
            (num_k - dotf(&dk, &dir_k)).abs() < 2e-3,
            "{num_k} vs {}",
            dotf(&dk, &dir_k)
        );
        assert!(
            (num_v - dotf(&dv, &dir_k)).abs() < 2e-3,
            "{num_v} vs {}",
            dotf(&dv, &dir_k)
        );
    }

    /// Loss and `dx` of the exit head in f64, straight from the definition.
    fn head_loss_reference(
        x: &[f32],
        w: &[f32],
        vocab: usize,
        targets: &[Option<u32>],
        weight: f64,
    ) -> (f64, Vec<f64>) {
        let d = w.len() / vocab;
        let mut loss = 0.0;
        let mut dx = vec![0.0; x.len()];
        for (r, t) in targets.iter().enumerate() {
            let Some(t) = t else { continue };
            let xr = &x[r * d..(r + 1) * d];
            let z: Vec<f64> = w.chunks_exact(d).map(|wv| dotf(xr, wv)).collect();
            let m = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let s: f64 = z.iter().map(|v| (v - m).exp()).sum();
            loss += weight * (m + s.ln() - z[*t as usize]);
            for (v, wv) in w.chunks_exact(d).enumerate() {
                let p = (z[v] - m).exp() / s - if v == *t as usize { 1.0 } else { 0.0 };
                for (o, &wk) in dx[r * d..(r + 1) * d].iter_mut().zip(wv) {
                    *o += weight * p * wk as f64;
                }
            }
        }
        (loss, dx)
    }

    #[test]
    fn exit_head_loss_streamed_and_chunked_match_the_definition() {
        // Rows over two row chunks, a vocabulary over three blocks (the last partial),
        // unscored rows, targets in every block; the head's rows grow with the word
        // index so that each block raises the running maximum (the rescaling path).
        let (d, rows) = (16, HEAD_ROWS + 5);
        let vocab = 2 * HEAD_VOCAB_BLOCK + 37;
        let w: Vec<f32> = rnd(vocab * d, 21)
            .iter()
            .enumerate()
            .map(|(i, v)| v * (0.5 + 2.0 * (i / d) as f32 / vocab as f32))
            .collect();
        let x = rnd(rows * d, 22);
        let targets: Vec<Option<u32>> = (0..rows)
            .map(|r| (r % 7 != 3).then_some(((r * 389) % vocab) as u32))
            .collect();
        let weight = 1.0 / rows as f32;
        let (ref_loss, ref_dx) = head_loss_reference(&x, &w, vocab, &targets, weight as f64);
        let dense = WeightData::Dense(crate::tensor::Tensor::from_f32(vec![vocab, d], w.clone()).unwrap());
        let max_ref = ref_dx.iter().fold(0.0f64, |a, v| a.max(v.abs()));
        for head in [Head::Weight(&dense), Head::Trained { data: &w, vocab }] {
            let mut dx = vec![f32::NAN; rows * d];
            let mut scratch = Vec::new();
            let (loss, raw, count) = head_loss(&x, head, &targets, weight, None, &mut dx, &mut scratch);
            assert_eq!(count, targets.iter().flatten().count());
            assert!((loss - ref_loss).abs() < 1e-5 * ref_loss, "{loss} vs {ref_loss}");
            assert!((raw * weight as f64 - ref_loss).abs() < 1e-5 * ref_loss);
            let err = dx
                .iter()
                .zip(&ref_dx)
                .fold(0.0f64, |a, (v, r)| a.max((*v as f64 - r).abs()));
            assert!(err < 1e-5 * max_ref, "dx error {err} against max {max_ref}");
            for (r, t) in targets.iter().enumerate() {
                if t.is_none() {
                    assert!(dx[r * d..(r + 1) * d].iter().all(|v| *v == 0.0));
                }
            }
        }
        // Nothing scored: no loss, a zero gradient.
        let none = vec![None; rows];
        let mut dx = vec![f32::NAN; rows * d];
        let got = head_loss(
            &x,
            Head::Weight(&dense),
            &none,
            weight,
            None,
            &mut dx,
            &mut Vec::new(),
        );
        assert_eq!(got, (0.0, 0.0, 0));
        assert!(dx.iter().all(|v| *v == 0.0));
    }

    #[test]
    fn norm_and_swiglu_backward_match_finite_differences() {
        let (rows, d) = (3, 16);
        let x = rnd(rows * d, 7);
        let w: Vec<f32> = rnd(d, 8).iter().map(|v| 1.0 + 0.3 * v).collect();
        let probe = rnd(rows * d, 9);
        let wt = crate::tensor::Tensor::from_f32(vec![d], w.clone()).unwrap();
        let f = |x: &[f32]| {
            let mut o = vec![0.0; x.len()];
            crate::ops::norm::rms_norm(x, &wt, 1e-5, &mut o);
            dotf(&o, &probe)
        };
        let mut dw = vec![0.0; d];
        let mut dx = vec![0.0; x.len()];
        rms_norm_back(&x, &w, 1e-5, &probe, Some(&mut dx), Some(&mut dw));
        let dir = rnd(x.len(), 10);
        assert!((fd(&f, &x, &dir) - dotf(&dx, &dir)).abs() < 2e-3);
        let fw = |w: &[f32]| {
            let wt = crate::tensor::Tensor::from_f32(vec![d], w.to_vec()).unwrap();
            let mut o = vec![0.0; x.len()];
            crate::ops::norm::rms_norm(&x, &wt, 1e-5, &mut o);
            dotf(&o, &probe)
        };
        let dirw = rnd(d, 11);
        assert!((fd(&fw, &w, &dirw) - dotf(&dw, &dirw)).abs() < 2e-3);

        let (g, u) = (rnd(40, 12), rnd(40, 13));
        let p = rnd(40, 14);
        let (mut dg, mut du) = (vec![0.0; 40], vec![0.0; 40]);
        swiglu_back(&g, &u, &p, &mut dg, &mut du);
        let fs = |g: &[f32], u: &[f32]| {
            let mut o = vec![0.0; 40];
            crate::ops::activation::swiglu(g, u, &mut o);
            dotf(&o, &p)
        };
        let dir = rnd(40, 15);
        assert!((fd(&|x| fs(x, &u), &g, &dir) - dotf(&dg, &dir)).abs() < 2e-3);
        assert!((fd(&|x| fs(&g, x), &u, &dir) - dotf(&du, &dir)).abs() < 2e-3);
    }
}
