//! Weight quantization: round-to-nearest and GPTQ (Frantar et al. 2022), and the shared
//! column sweep that SparseGPT ([`super::prune`]) also runs.
//!
//! A weight is `W [rows = out, cols = in]`, f32, row-major. Quantization is group-wise along
//! each row, as `edge_runtime::format` stores it: every `group` consecutive *kept* values of
//! a row share an f16 scale (and, asymmetric, an f16 min); the last group of a row may be
//! short. Decoding, in f32 exactly as written (no fused multiply-add):
//! - asymmetric: `w = scale * q + min`, `q` in `0 ..= 2^b - 1`;
//! - symmetric: `w = scale * (q - 2^(b-1))`, `q` in `0 ..= 2^b - 1` (the scale may be
//!   negative: the group's value of largest magnitude maps to code 0, as llama.cpp's Q4_0).
//!
//! GPTQ processes columns left to right in blocks of 128. Each column is quantized, and its
//! error, divided by the diagonal of the upper Cholesky factor `U` of `H^-1`, is spread over
//! the remaining columns of the block along `U`'s row; the block's errors are applied to the
//! columns after the block at once (lazy batch update). Rows are independent given `U`, so
//! tiles of rows run in parallel. `H = 2 X^T X / n` with `X` the layer input's tokens, damped
//! by 1% of its mean diagonal; dead inputs (zero diagonal) get weight 0.

use edge_runtime::format::{QuantScheme, QuantSpec, SparsePattern};
use half::f16;
use rayon::prelude::*;

/// Columns per GPTQ / SparseGPT block.
pub const BLOCK: usize = 128;
/// Rows per parallel tile of the sweep.
pub const TILE: usize = 32;

/// The f16 scale and min of one group (min is 0 for symmetric groups).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct GroupParams {
    pub scale: f16,
    pub min: f16,
}

impl GroupParams {
    /// Min-max parameters for `vals` (asymmetric: `[min, max]` onto `0..=2^b-1`;
    /// symmetric: the value of largest magnitude onto code 0).
    pub fn find(vals: impl Iterator<Item = f32>, spec: &QuantSpec) -> Self {
        let maxq = ((1u32 << spec.bits) - 1) as f32;
        match spec.scheme {
            QuantScheme::Asym => {
                let (mut lo, mut hi) = (f32::INFINITY, f32::NEG_INFINITY);
                for v in vals {
                    lo = lo.min(v);
                    hi = hi.max(v);
                }
                if lo > hi {
                    return GroupParams::default();
                }
                GroupParams {
                    scale: f16::from_f32((hi - lo) / maxq),
                    min: f16::from_f32(lo),
                }
            }
            QuantScheme::Sym => {
                let half = (1u32 << (spec.bits - 1)) as f32;
                let mut m = 0.0f32;
                for v in vals {
                    if v.abs() > m.abs() {
                        m = v;
                    }
                }
                GroupParams {
                    scale: f16::from_f32(m / -half),
                    min: f16::ZERO,
                }
            }
        }
    }

    /// The nearest code of `w`.
    #[inline]
    pub fn code(&self, w: f32, spec: &QuantSpec) -> u8 {
        let maxq = ((1u32 << spec.bits) - 1) as f32;
        let s = self.scale.to_f32();
        match spec.scheme {
            QuantScheme::Asym => {
                if s == 0.0 {
                    0
                } else {
                    ((w - self.min.to_f32()) / s).round().clamp(0.0, maxq) as u8
                }
            }
            QuantScheme::Sym => {
                let half = (1u32 << (spec.bits - 1)) as f32;
                if s == 0.0 {
                    half as u8
                } else {
                    ((w / s).round() + half).clamp(0.0, maxq) as u8
                }
            }
        }
    }

    /// The value code `q` decodes to.
    #[inline]
    pub fn decode(&self, q: u8, spec: &QuantSpec) -> f32 {
        let s = self.scale.to_f32();
        match spec.scheme {
            QuantScheme::Asym => s * q as f32 + self.min.to_f32(),
            QuantScheme::Sym => s * (q as f32 - (1u32 << (spec.bits - 1)) as f32),
        }
    }
}

/// A compressed weight: the values it decodes to and everything needed to pack it exactly.
#[derive(Debug, Clone)]
pub struct Compressed {
    pub rows: usize,
    pub cols: usize,
    /// `None`: values kept as f32 (pruning only, used by tests and ablations).
    pub spec: Option<QuantSpec>,
    /// The decoded weight `[rows, cols]` (exact zeros where pruned).
    pub values: Vec<f32>,
    /// Kept positions `[rows, cols]`; `None` when dense.
    pub mask: Option<Vec<bool>>,
    /// Codes of the kept values, row by row, in column order.
    pub codes: Vec<u8>,
    /// `codes[row_codes[r] .. row_codes[r + 1]]` are row `r`'s codes.
    pub row_codes: Vec<usize>,
    /// Group parameters, row by row (groups run over a row's kept values).
    pub params: Vec<GroupParams>,
    /// `params[row_groups[r] .. row_groups[r + 1]]` are row `r`'s groups.
    pub row_groups: Vec<usize>,
}

impl Compressed {
    /// Rebuilds the weight from codes, group parameters and mask (must equal `values`).
    pub fn decode(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.rows * self.cols];
        for r in 0..self.rows {
            let codes = &self.codes[self.row_codes[r]..self.row_codes[r + 1]];
            let params = &self.params[self.row_groups[r]..self.row_groups[r + 1]];
            let mut k = 0;
            for c in 0..self.cols {
                let kept = self.mask.as_ref().is_none_or(|m| m[r * self.cols + c]);
                if !kept {
                    continue;
                }
                out[r * self.cols + c] = match &self.spec {
                    Some(spec) => params[k / spec.group as usize].decode(codes[k], spec),
                    None => self.values[r * self.cols + c],
                };
                k += 1;
            }
        }
        out
    }

    /// Kept values per row.
    pub fn kept_per_row(&self) -> Vec<usize> {
        match &self.mask {
            None => vec![self.cols; self.rows],
            Some(m) => m
                .chunks_exact(self.cols)
                .map(|r| r.iter().filter(|&&k| k).count())
                .collect(),
        }
    }
}

/// How the sweep decides which weights to prune.
#[derive(Debug, Clone, Copy)]
pub enum MaskMode<'a> {
    Dense,
    /// A fixed mask `[rows, cols]` (true = kept), e.g. from magnitude or Wanda.
    Given(&'a [bool]),
    /// SparseGPT: chosen during the sweep from `w^2 / U_jj^2` of the updated weights,
    /// per row: unstructured, `round(sparsity * block)` per 128-column block; N:M, the
    /// `m - n` smallest of every `m` columns.
    SparseGpt {
        sparsity: f64,
        pattern: SparsePattern,
    },
}

/// What one sweep does.
#[derive(Debug, Clone, Copy)]
pub struct Sweep<'a> {
    pub quant: Option<QuantSpec>,
    pub mask: MaskMode<'a>,
    /// Upper Cholesky factor of `H^-1`, `[cols, cols]`; `None`: no error compensation
    /// (round-to-nearest, plain pruning).
    pub u: Option<&'a [f32]>,
}

struct RowOut {
    codes: Vec<u8>,
    params: Vec<GroupParams>,
}

/// Runs the column sweep on `w` (`[rows, cols]`); see the module docs.
pub fn sweep(w: &[f32], rows: usize, cols: usize, cfg: &Sweep<'_>) -> Compressed {
    assert_eq!(w.len(), rows * cols);
    if let Some(u) = cfg.u {
        assert_eq!(u.len(), cols * cols);
    }
    if matches!(cfg.mask, MaskMode::SparseGpt { .. }) {
        assert!(cfg.u.is_some(), "SparseGPT needs the inverse Hessian");
    }
    let sparse = !matches!(cfg.mask, MaskMode::Dense);
    let mut values = w.to_vec();
    let mut mask = vec![true; if sparse { rows * cols } else { 0 }];
    if let MaskMode::Given(m) = cfg.mask {
        assert_eq!(m.len(), rows * cols);
        mask.copy_from_slice(m);
    }
    let outs: Vec<Vec<RowOut>> = if sparse {
        values
            .par_chunks_mut(TILE * cols)
            .zip(mask.par_chunks_mut(TILE * cols))
            .map(|(wt, mt)| sweep_tile(wt, Some(mt), cols, cfg))
            .collect()
    } else {
        values
            .par_chunks_mut(TILE * cols)
            .map(|wt| sweep_tile(wt, None, cols, cfg))
            .collect()
    };
    let mut outs: Vec<RowOut> = outs.into_iter().flatten().collect();
    // Guard against a diverging error compensation (seen on rows fed by one huge input
    // channel: the compensated weights grow, their groups' ranges with them): a row whose
    // largest value exceeds 4x the original's is redone without compensation, keeping its mask.
    if cfg.u.is_some() {
        for r in 0..rows {
            let orig = &w[r * cols..(r + 1) * cols];
            let lim = 4.0 * orig.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let row = &mut values[r * cols..(r + 1) * cols];
            if row.iter().all(|v| v.abs() <= lim) {
                continue;
            }
            row.copy_from_slice(orig);
            let plain = Sweep {
                quant: cfg.quant,
                mask: if sparse {
                    MaskMode::Given(&[])
                } else {
                    MaskMode::Dense
                },
                u: None,
            };
            let mrow = sparse.then(|| &mut mask[r * cols..(r + 1) * cols]);
            outs[r] = sweep_tile(row, mrow, cols, &plain).pop().expect("one row");
        }
    }
    let mut c = Compressed {
        rows,
        cols,
        spec: cfg.quant,
        values,
        mask: sparse.then_some(mask),
        codes: vec![],
        row_codes: vec![0],
        params: vec![],
        row_groups: vec![0],
    };
    for r in outs {
        c.codes.extend_from_slice(&r.codes);
        c.params.extend_from_slice(&r.params);
        c.row_codes.push(c.codes.len());
        c.row_groups.push(c.params.len());
    }
    c
}

/// Indices of the `k` smallest of `scores` (ties broken by position).
fn smallest(scores: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    if k == 0 {
        return vec![];
    }
    if k < idx.len() {
        idx.select_nth_unstable_by(k - 1, |&a, &b| scores[a].total_cmp(&scores[b]).then(a.cmp(&b)));
    }
    idx.truncate(k);
    idx
}

fn sweep_tile(w: &mut [f32], mut mask: Option<&mut [bool]>, cols: usize, cfg: &Sweep<'_>) -> Vec<RowOut> {
    let t = w.len() / cols;
    let mut outs: Vec<RowOut> = (0..t)
        .map(|_| RowOut {
            codes: Vec::with_capacity(cols),
            params: vec![],
        })
        .collect();
    let mut kept_count = vec![0usize; t];
    let mut cur = vec![GroupParams::default(); t];
    let mut err = vec![0f32; t * BLOCK];
    let diag = |j: usize| cfg.u.map_or(1.0, |u| u[j * cols + j]);
    for i1 in (0..cols).step_by(BLOCK) {
        let i2 = (i1 + BLOCK).min(cols);
        if let (
            MaskMode::SparseGpt {
                sparsity,
                pattern: SparsePattern::Unstructured,
            },
            Some(m),
        ) = (cfg.mask, mask.as_deref_mut())
        {
            let k = (sparsity * (i2 - i1) as f64).round() as usize;
            for r in 0..t {
                let scores: Vec<f32> = (i1..i2)
                    .map(|j| {
                        let d = diag(j);
                        w[r * cols + j] * w[r * cols + j] / (d * d)
                    })
                    .collect();
                for j in smallest(&scores, k) {
                    m[r * cols + i1 + j] = false;
                }
            }
        }
        for i in i1..i2 {
            if let (
                MaskMode::SparseGpt {
                    pattern: SparsePattern::NofM { n, m: nm },
                    ..
                },
                Some(m),
            ) = (cfg.mask, mask.as_deref_mut())
                && (i - i1).is_multiple_of(nm as usize)
            {
                let end = (i + nm as usize).min(i2);
                let prune = (end - i).saturating_sub(n as usize);
                for r in 0..t {
                    let scores: Vec<f32> = (i..end)
                        .map(|j| {
                            let d = diag(j);
                            w[r * cols + j] * w[r * cols + j] / (d * d)
                        })
                        .collect();
                    for j in smallest(&scores, prune) {
                        m[r * cols + i + j] = false;
                    }
                }
            }
            let d = diag(i);
            // The values of a group starting here: the next `group` kept values of the row.
            // With SparseGPT the mask past this block is not chosen yet, so past the block
            // every column counts (values there have not had this block's update yet).
            let mask_known_to = if matches!(cfg.mask, MaskMode::SparseGpt { .. }) {
                i2
            } else {
                cols
            };
            for r in 0..t {
                let row = &mut w[r * cols..(r + 1) * cols];
                let mrow = mask.as_deref().map(|m| &m[r * cols..(r + 1) * cols]);
                let kept = mrow.is_none_or(|m| m[i]);
                let x = row[i];
                let q = if !kept {
                    0.0
                } else if let Some(spec) = &cfg.quant {
                    let g = spec.group as usize;
                    if kept_count[r].is_multiple_of(g) {
                        let vals = (i..cols)
                            .filter(|&j| j >= mask_known_to || mrow.is_none_or(|m| m[j]))
                            .take(g)
                            .map(|j| row[j]);
                        cur[r] = GroupParams::find(vals, spec);
                        outs[r].params.push(cur[r]);
                    }
                    kept_count[r] += 1;
                    let c = cur[r].code(x, spec);
                    outs[r].codes.push(c);
                    cur[r].decode(c, spec)
                } else {
                    x
                };
                row[i] = q;
                if let Some(u) = cfg.u {
                    let e = (x - q) / d;
                    err[r * BLOCK + i - i1] = e;
                    if e != 0.0 {
                        axpy_neg(&mut row[i + 1..i2], e, &u[i * cols + i + 1..i * cols + i2]);
                    }
                }
            }
        }
        if let Some(u) = cfg.u
            && i2 < cols
        {
            // Lazy batch update: W[:, i2..] -= Err[:, block] * U[block, i2..].
            // SAFETY: dst is the tile's rows at columns i2.. (t x (cols - i2), row stride
            // cols), lhs the block errors (t x bl, row stride BLOCK), rhs U's block rows at
            // columns i2.. (bl x (cols - i2), row stride cols); all in bounds.
            unsafe {
                gemm::gemm(
                    t,
                    cols - i2,
                    i2 - i1,
                    w.as_mut_ptr().add(i2),
                    1,
                    cols as isize,
                    true,
                    err.as_ptr(),
                    1,
                    BLOCK as isize,
                    u.as_ptr().add(i1 * cols + i2),
                    1,
                    cols as isize,
                    1.0f32,
                    -1.0f32,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
        }
    }
    outs
}

/// `dst -= e * src`, with FMA when the CPU has it.
#[inline]
fn axpy_neg(dst: &mut [f32], e: f32, src: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
        // SAFETY: the features were just detected.
        unsafe { axpy_neg_fma(dst, e, src) };
        return;
    }
    for (d, s) in dst.iter_mut().zip(src) {
        *d -= e * s;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn axpy_neg_fma(dst: &mut [f32], e: f32, src: &[f32]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = s.mul_add(-e, *d);
    }
}

/// Round-to-nearest quantization of a dense weight.
pub fn rtn(w: &[f32], rows: usize, cols: usize, spec: QuantSpec) -> Compressed {
    sweep(
        w,
        rows,
        cols,
        &Sweep {
            quant: Some(spec),
            mask: MaskMode::Dense,
            u: None,
        },
    )
}

/// GPTQ quantization of a dense weight with the prepared Hessian of its input.
pub fn gptq(w: &[f32], rows: usize, cols: usize, spec: QuantSpec, h: &Prepared) -> Compressed {
    let w = h.zero_dead(w, rows, cols);
    sweep(
        &w,
        rows,
        cols,
        &Sweep {
            quant: Some(spec),
            mask: MaskMode::Dense,
            u: Some(&h.u),
        },
    )
}

// ---------------------------------------------------------------------------------------
// The layer input's second moment and its inverse.

/// `X^T X` of a linear's input, accumulated over token rows.
#[derive(Debug, Clone)]
pub struct Hessian {
    pub n: usize,
    /// `[n, n]`, f32 accumulation through gemm (per sample) summed in f64.
    pub sum: Vec<f64>,
    /// Token rows accumulated.
    pub count: usize,
    buf: Vec<f32>,
}

impl Hessian {
    pub fn new(n: usize) -> Self {
        Hessian {
            n,
            sum: vec![0.0; n * n],
            count: 0,
            buf: vec![0.0; n * n],
        }
    }

    /// Adds `x^T x` for `x` of `[rows, n]`.
    pub fn add(&mut self, x: &[f32]) {
        let n = self.n;
        let rows = x.len() / n;
        assert_eq!(rows * n, x.len());
        if rows == 0 {
            return;
        }
        // SAFETY: dst is n x n (row-major), lhs = x^T (n x rows: column stride n, row
        // stride 1 over x), rhs = x (rows x n, row-major); all in bounds.
        unsafe {
            gemm::gemm(
                n,
                n,
                rows,
                self.buf.as_mut_ptr(),
                1,
                n as isize,
                false,
                x.as_ptr(),
                n as isize,
                1,
                x.as_ptr(),
                1,
                n as isize,
                0.0f32,
                1.0f32,
                false,
                false,
                false,
                gemm::Parallelism::Rayon(0),
            );
        }
        for (s, b) in self.sum.iter_mut().zip(&self.buf) {
            *s += *b as f64;
        }
        self.count += rows;
    }

    /// Damped inverse factor and statistics for GPTQ / SparseGPT / Wanda.
    pub fn prepare(&self) -> Prepared {
        let n = self.n;
        let scale = 2.0 / self.count.max(1) as f64;
        let mut h: Vec<f64> = self.sum.iter().map(|v| v * scale).collect();
        let mut dead = vec![false; n];
        for i in 0..n {
            if h[i * n + i] <= 0.0 {
                dead[i] = true;
                h[i * n + i] = 1.0;
            }
        }
        let mean_diag = (0..n).map(|i| h[i * n + i]).sum::<f64>() / n as f64;
        let mut damp = 0.01 * mean_diag;
        let u = loop {
            // Reverse the order: the lower Cholesky factor L' of P H P gives H^-1 = U^T U
            // with U = P L'^-1 P upper triangular.
            let mut a = vec![0.0f64; n * n];
            for i in 0..n {
                for j in 0..n {
                    a[(n - 1 - i) * n + (n - 1 - j)] = h[i * n + j] + if i == j { damp } else { 0.0 };
                }
            }
            if cholesky(&mut a, n).is_ok() {
                let li = lower_inverse(&a, n);
                let mut u = vec![0.0f32; n * n];
                for i in 0..n {
                    for j in i..n {
                        u[i * n + j] = li[(n - 1 - i) * n + (n - 1 - j)] as f32;
                    }
                }
                break u;
            }
            damp = if damp > 0.0 { damp * 10.0 } else { 1e-6 };
        };
        let hn: Vec<f32> = self
            .sum
            .iter()
            .map(|v| (v / self.count.max(1) as f64) as f32)
            .collect();
        Prepared {
            n,
            u,
            h: hn,
            col_norm2: (0..n).map(|i| self.sum[i * n + i]).collect(),
            dead,
        }
    }
}

/// What the compression methods need from a linear's input statistics.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub n: usize,
    /// Upper Cholesky factor of the damped `H^-1`, `[n, n]` (zeros below the diagonal).
    pub u: Vec<f32>,
    /// `X^T X / tokens`, `[n, n]` (for output errors).
    pub h: Vec<f32>,
    /// `||X_j||^2` per input column (Wanda).
    pub col_norm2: Vec<f64>,
    /// Input columns that are always zero.
    pub dead: Vec<bool>,
}

impl Prepared {
    /// `w` with the columns of dead inputs zeroed (they never affect the output).
    pub fn zero_dead(&self, w: &[f32], rows: usize, cols: usize) -> Vec<f32> {
        let mut w = w.to_vec();
        if self.dead.iter().any(|&d| d) {
            for r in 0..rows {
                for c in 0..cols {
                    if self.dead[c] {
                        w[r * cols + c] = 0.0;
                    }
                }
            }
        }
        w
    }

    /// `sum_r d_r^T H d_r` for `d` of `[rows, n]`: the squared output error per token of
    /// a weight difference `d` (or the squared output of a weight).
    pub fn quad(&self, d: &[f32]) -> f64 {
        let n = self.n;
        let rows = d.len() / n;
        let mut dh = vec![0.0f32; rows * n];
        // SAFETY: dh = d (rows x n) * h (n x n, symmetric), row-major, in bounds.
        unsafe {
            gemm::gemm(
                rows,
                n,
                n,
                dh.as_mut_ptr(),
                1,
                n as isize,
                false,
                d.as_ptr(),
                1,
                n as isize,
                self.h.as_ptr(),
                1,
                n as isize,
                0.0f32,
                1.0f32,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
        d.par_chunks(4096)
            .zip(dh.par_chunks(4096))
            .map(|(a, b)| a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum::<f64>())
            .sum()
    }

    /// Normalized output error `|X (W' - W)^T|^2 / |X W^T|^2` from the statistics.
    pub fn output_nmse(&self, w: &[f32], w2: &[f32], base: f64) -> f64 {
        let d: Vec<f32> = w.iter().zip(w2).map(|(a, b)| b - a).collect();
        self.quad(&d) / base.max(f64::MIN_POSITIVE)
    }
}

#[inline]
fn dot64(a: &[f64], b: &[f64]) -> f64 {
    let mut acc = [0.0f64; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for k in 0..8 {
            acc[k] += x[k] * y[k];
        }
    }
    let mut s: f64 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// In-place lower Cholesky factor of a symmetric positive-definite `[n, n]` (row-major;
/// the upper triangle is left as it was). Errors with the failing pivot.
pub fn cholesky(a: &mut [f64], n: usize) -> Result<(), usize> {
    for j in 0..n {
        let (head, tail) = a.split_at_mut((j + 1) * n);
        let rowj = &mut head[j * n..];
        let s = rowj[j] - dot64(&rowj[..j], &rowj[..j]);
        if s.is_nan() || s <= 0.0 {
            return Err(j);
        }
        let ljj = s.sqrt();
        rowj[j] = ljj;
        let rowj = &rowj[..j];
        let f = |ri: &mut [f64]| ri[j] = (ri[j] - dot64(&ri[..j], rowj)) / ljj;
        if (n - j) * j > 1 << 16 {
            tail.par_chunks_mut(n).for_each(f);
        } else {
            tail.chunks_mut(n).for_each(f);
        }
    }
    Ok(())
}

/// Inverse of a lower-triangular `[n, n]` (only the lower triangle of `l` is read).
pub fn lower_inverse(l: &[f64], n: usize) -> Vec<f64> {
    let cols: Vec<Vec<f64>> = (0..n)
        .into_par_iter()
        .map(|j| {
            // Column j of L^-1: x_i = (delta_ij - sum_{j<=k<i} L_ik x_k) / L_ii, x_i = 0 for i < j.
            let mut x = vec![0.0f64; n - j];
            x[0] = 1.0 / l[j * n + j];
            for i in j + 1..n {
                x[i - j] = -dot64(&l[i * n + j..i * n + i], &x[..i - j]) / l[i * n + i];
            }
            x
        })
        .collect();
    let mut out = vec![0.0; n * n];
    for (j, c) in cols.into_iter().enumerate() {
        for (k, v) in c.into_iter().enumerate() {
            out[(j + k) * n + j] = v;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 33) as f32 / (1u64 << 31) as f32) - 0.5
    }

    #[test]
    fn inverse_factor_is_exact() {
        let n = 37;
        let mut s = 7;
        let x: Vec<f32> = (0..200 * n).map(|_| lcg(&mut s)).collect();
        let mut h = Hessian::new(n);
        h.add(&x);
        let p = h.prepare();
        // U^T U must invert the damped 2 X^T X / rows.
        let scale = 2.0 / 200.0;
        let mean = (0..n).map(|i| h.sum[i * n + i] * scale).sum::<f64>() / n as f64;
        for i in 0..n {
            for j in 0..n {
                let mut v = 0.0f64;
                for k in 0..n {
                    let hd = h.sum[i * n + k] * scale + if i == k { 0.01 * mean } else { 0.0 };
                    let mut uu = 0.0f64;
                    for m in 0..n {
                        uu += p.u[m * n + k] as f64 * p.u[m * n + j] as f64;
                    }
                    v += hd * uu;
                }
                let want = if i == j { 1.0 } else { 0.0 };
                assert!((v - want).abs() < 1e-4, "({i},{j}) {v}");
            }
        }
    }

    #[test]
    fn rtn_codes_reproduce_values_exactly() {
        let (rows, cols) = (5, 96);
        let mut s = 3;
        let w: Vec<f32> = (0..rows * cols).map(|_| lcg(&mut s)).collect();
        for bits in [2u8, 3, 4, 8] {
            for scheme in [QuantScheme::Asym, QuantScheme::Sym] {
                let spec = QuantSpec {
                    bits,
                    group: 32,
                    scheme,
                };
                let c = rtn(&w, rows, cols, spec);
                assert_eq!(c.decode(), c.values, "{bits} {scheme:?}");
                assert_eq!(c.codes.len(), rows * cols);
                assert_eq!(c.params.len(), rows * 3);
                assert!(c.codes.iter().all(|&q| (q as u32) < 1 << bits));
                // Every value is the nearest grid point of its group, up to f16 rounding of
                // the parameters: error at most half a step (+ a little); symmetric groups
                // clamp the far end of the range by up to one step.
                for (a, b) in w.iter().zip(&c.values) {
                    let bound = match scheme {
                        QuantScheme::Asym => 0.51 / ((1u32 << bits) - 1) as f32,
                        QuantScheme::Sym => 0.5 / (1u32 << (bits - 1)) as f32,
                    };
                    assert!((a - b).abs() <= bound + 1e-3, "{bits} {scheme:?}: {a} vs {b}");
                }
            }
        }
    }

    #[test]
    fn asym_rtn_reproduces_a_q4_1_grid() {
        // Values already on a 4-bit grid with f16 scale and min come back unchanged.
        let spec = QuantSpec {
            bits: 4,
            group: 32,
            scheme: QuantScheme::Asym,
        };
        let mut s = 11;
        let mut w = vec![];
        for _ in 0..4 {
            let p = GroupParams {
                scale: f16::from_f32(0.013 + lcg(&mut s).abs() * 0.01),
                min: f16::from_f32(-0.1 + lcg(&mut s) * 0.01),
            };
            let mut codes: Vec<u8> = (0..32).map(|_| ((lcg(&mut s) + 0.5) * 15.99) as u8).collect();
            codes[0] = 0;
            codes[1] = 15;
            w.extend(codes.iter().map(|&q| p.decode(q, &spec)));
        }
        let c = rtn(&w, 1, 128, spec);
        assert_eq!(c.values, w);
    }
}
