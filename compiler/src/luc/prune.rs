//! Pruning: magnitude, Wanda (Sun et al. 2023: `|W_ij| * ||X_j||_2`, compared within each
//! output row) and SparseGPT (Frantar & Alistarh 2023: the OBS update through the upper
//! Cholesky factor of `H^-1`, mask chosen per 128-column block from `w^2 / U_jj^2`, kept
//! weights quantized in the same sweep). Masks are unstructured or N:M (n kept in every
//! m consecutive columns). And [`compress`], which applies a [`Candidate`] with a method.

use edge_runtime::format::SparsePattern;

use super::candidate::Candidate;
use super::quantize::{BLOCK, Compressed, MaskMode, Prepared, Sweep, sweep};

/// How kept weights are quantized.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quantizer {
    Rtn,
    Gptq,
}

/// How weights to prune are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pruner {
    Magnitude,
    Wanda,
    SparseGpt,
}

impl Quantizer {
    pub fn name(self) -> &'static str {
        match self {
            Quantizer::Rtn => "rtn",
            Quantizer::Gptq => "gptq",
        }
    }
}

impl Pruner {
    pub fn name(self) -> &'static str {
        match self {
            Pruner::Magnitude => "magnitude",
            Pruner::Wanda => "wanda",
            Pruner::SparseGpt => "sparsegpt",
        }
    }
}

/// A quantizer and a pruner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Method {
    pub quantizer: Quantizer,
    pub pruner: Pruner,
}

/// A mask `[rows, cols]` (true = kept) pruning the lowest `score`s of every row:
/// unstructured, `round(sparsity * cols)` per row; N:M, `m - n` of every `m` columns.
pub fn mask_from_scores(
    scores: &[f32],
    rows: usize,
    cols: usize,
    sparsity: f64,
    pattern: SparsePattern,
) -> Vec<bool> {
    let mut mask = vec![true; rows * cols];
    let prune_lowest = |s: &[f32], m: &mut [bool], k: usize| {
        let mut idx: Vec<usize> = (0..s.len()).collect();
        idx.sort_by(|&a, &b| s[a].total_cmp(&s[b]).then(a.cmp(&b)));
        for &j in &idx[..k.min(s.len())] {
            m[j] = false;
        }
    };
    for (s, m) in scores.chunks_exact(cols).zip(mask.chunks_exact_mut(cols)) {
        match pattern {
            SparsePattern::Unstructured => {
                prune_lowest(s, m, (sparsity * cols as f64).round() as usize);
            }
            SparsePattern::NofM { n, m: nm } => {
                for (sb, mb) in s.chunks(nm as usize).zip(m.chunks_mut(nm as usize)) {
                    prune_lowest(sb, mb, sb.len().saturating_sub(n as usize));
                }
            }
        }
    }
    mask
}

/// Magnitude scores `|W|`.
pub fn magnitude_scores(w: &[f32]) -> Vec<f32> {
    w.iter().map(|v| v.abs()).collect()
}

/// Wanda scores `|W_ij| * ||X_j||_2` from the input's column norms squared.
pub fn wanda_scores(w: &[f32], cols: usize, col_norm2: &[f64]) -> Vec<f32> {
    let norms: Vec<f32> = col_norm2.iter().map(|v| v.max(0.0).sqrt() as f32).collect();
    w.chunks_exact(cols)
        .flat_map(|r| r.iter().zip(&norms).map(|(a, n)| a.abs() * n))
        .collect()
}

/// Checks that every block of `m` columns of `mask` keeps exactly `n`.
pub fn is_n_of_m(mask: &[bool], cols: usize, n: usize, m: usize) -> bool {
    cols.is_multiple_of(m)
        && mask
            .chunks_exact(m)
            .all(|b| b.iter().filter(|&&k| k).count() == n)
}

/// The values every row of a `cols`-column weight keeps when [`compress`] applies `cand`
/// with `pruner`: the same for each row and known before any weight is read (magnitude and
/// Wanda prune `round(sparsity * cols)` of the row, or `m - n` of every `m` columns;
/// SparseGPT does the same within each 128-column block); `cols` without pruning. The
/// streamed build sizes a sparse weight by it before compressing.
pub fn kept_per_row(cols: usize, cand: &Candidate, pruner: Pruner) -> usize {
    if cand.sparsity <= 0.0 {
        return cols;
    }
    let kept_in = |len: usize| match cand.pattern {
        SparsePattern::Unstructured => len - ((cand.sparsity * len as f64).round() as usize).min(len),
        SparsePattern::NofM { n, m } => (0..len)
            .step_by(m as usize)
            .map(|s| (len - s).min(m as usize).min(n as usize))
            .sum(),
    };
    match pruner {
        Pruner::SparseGpt => (0..cols)
            .step_by(BLOCK)
            .map(|s| kept_in((cols - s).min(BLOCK)))
            .sum(),
        Pruner::Magnitude | Pruner::Wanda => kept_in(cols),
    }
}

/// Compresses `w` (`[rows, cols]`) with `cand` and `method`. `quant = false` prunes only (values stay
/// f32; tests and ablations). GPTQ, Wanda and SparseGPT need the input statistics `h`.
///
/// - dense: `quantizer` (RTN or GPTQ);
/// - magnitude / Wanda: the mask is fixed first, then the kept weights are quantized by
///   `quantizer` (GPTQ's sweep then also compensates the pruned weights' error);
/// - SparseGPT: one sweep with the OBS update choosing the mask block by block and
///   quantizing the kept weights as they are reached (so with compensation, whatever
///   `quantizer` says).
pub fn compress(
    w: &[f32],
    rows: usize,
    cols: usize,
    cand: &Candidate,
    method: Method,
    h: Option<&Prepared>,
    quant: bool,
) -> Compressed {
    let Method { quantizer, pruner } = method;
    let need_h = quantizer == Quantizer::Gptq || (cand.sparsity > 0.0 && pruner != Pruner::Magnitude);
    assert!(
        !need_h || h.is_some(),
        "{}/{} need calibration statistics",
        quantizer.name(),
        pruner.name()
    );
    let w = match h {
        Some(h) => h.zero_dead(w, rows, cols),
        None => w.to_vec(),
    };
    let spec = quant.then(|| cand.quant());
    let gptq_u = h.filter(|_| quantizer == Quantizer::Gptq).map(|h| &h.u[..]);
    if cand.sparsity <= 0.0 {
        return sweep(
            &w,
            rows,
            cols,
            &Sweep {
                quant: spec,
                mask: MaskMode::Dense,
                u: gptq_u,
            },
        );
    }
    let pattern = cand.pattern;
    match pruner {
        Pruner::SparseGpt => sweep(
            &w,
            rows,
            cols,
            &Sweep {
                quant: spec,
                mask: MaskMode::SparseGpt {
                    sparsity: cand.sparsity,
                    pattern,
                },
                u: Some(&h.expect("checked").u),
            },
        ),
        Pruner::Magnitude | Pruner::Wanda => {
            let scores = if pruner == Pruner::Wanda {
                wanda_scores(&w, cols, &h.expect("checked").col_norm2)
            } else {
                magnitude_scores(&w)
            };
            let mask = mask_from_scores(&scores, rows, cols, cand.sparsity, pattern);
            sweep(
                &w,
                rows,
                cols,
                &Sweep {
                    quant: spec,
                    mask: MaskMode::Given(&mask),
                    u: gptq_u,
                },
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::luc::quantize::Hessian;
    use edge_runtime::format::{QuantScheme, QuantSpec};

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 33) as f32 / (1u64 << 31) as f32) - 0.5
    }

    fn cand(bits: u8, sparsity: f64, pattern: SparsePattern) -> Candidate {
        Candidate {
            bits,
            group: 32,
            scheme: QuantScheme::Asym,
            sparsity,
            pattern,
        }
    }

    #[test]
    fn n_of_m_masks_are_exact() {
        let (rows, cols) = (16, 256);
        let mut s = 5;
        let w: Vec<f32> = (0..rows * cols).map(|_| lcg(&mut s)).collect();
        let x: Vec<f32> = (0..300 * cols).map(|_| lcg(&mut s)).collect();
        let mut h = Hessian::new(cols);
        h.add(&x);
        let p = h.prepare();
        for (n, m) in [(2u8, 4u8), (4, 8)] {
            let pattern = SparsePattern::NofM { n, m };
            for pruner in [Pruner::Magnitude, Pruner::Wanda, Pruner::SparseGpt] {
                let c = compress(
                    &w,
                    rows,
                    cols,
                    &cand(4, 1.0 - n as f64 / m as f64, pattern),
                    Method {
                        quantizer: Quantizer::Gptq,
                        pruner,
                    },
                    Some(&p),
                    true,
                );
                let mask = c.mask.as_ref().unwrap();
                assert!(
                    is_n_of_m(mask, cols, n as usize, m as usize),
                    "{n}:{m} {pruner:?}"
                );
                // Pruned weights are exact zeros; codes and groups reproduce the values.
                for (v, k) in c.values.iter().zip(mask) {
                    assert!(*k || *v == 0.0);
                }
                assert_eq!(c.decode(), c.values);
                assert_eq!(c.codes.len(), rows * cols * n as usize / m as usize);
                let want = kept_per_row(cols, &cand(4, 1.0 - n as f64 / m as f64, pattern), pruner);
                assert!(c.kept_per_row().iter().all(|&k| k == want), "{n}:{m} {pruner:?}");
            }
        }
    }

    #[test]
    fn unstructured_sparsity_is_as_asked() {
        let (rows, cols) = (8, 576);
        let mut s = 9;
        let w: Vec<f32> = (0..rows * cols).map(|_| lcg(&mut s)).collect();
        let x: Vec<f32> = (0..700 * cols).map(|_| lcg(&mut s)).collect();
        let mut h = Hessian::new(cols);
        h.add(&x);
        let p = h.prepare();
        for pruner in [Pruner::Magnitude, Pruner::Wanda, Pruner::SparseGpt] {
            let c = compress(
                &w,
                rows,
                cols,
                &cand(3, 0.3, SparsePattern::Unstructured),
                Method {
                    quantizer: Quantizer::Gptq,
                    pruner,
                },
                Some(&p),
                true,
            );
            // Every row keeps what the streamed build sizes it for (576 columns: a partial
            // SparseGPT block).
            let want = kept_per_row(cols, &cand(3, 0.3, SparsePattern::Unstructured), pruner);
            assert!(c.kept_per_row().iter().all(|&k| k == want), "{pruner:?}");
            let kept: usize = c.kept_per_row().iter().sum();
            let frac = 1.0 - kept as f64 / (rows * cols) as f64;
            assert!((frac - 0.3).abs() < 0.01, "{pruner:?}: {frac}");
            assert_eq!(c.decode(), c.values);
            let spec = QuantSpec {
                bits: 3,
                group: 32,
                scheme: QuantScheme::Asym,
            };
            let groups: usize = c.kept_per_row().iter().map(|k| k.div_ceil(32)).sum();
            assert_eq!(c.params.len(), groups, "{spec:?}");
        }
    }
}
