//! Policy search: one candidate per decoder layer under a [`Budget`].
//!
//! The predicted error of a policy is `Σ_l w_l · nmse[l][c_l]`, the profile's normalized
//! layer-output MSE of each layer's chosen candidate, summed over layers. With
//! [`Objective::Nmse`] (the default) every `w_l = 1`. With [`Objective::LossWeighted`]
//! `w_l` converts layer `l`'s NMSE into calibration-loss units, fitted by least squares
//! through the origin on the profile's end-to-end deltas of that layer,
//! `w_l = Σ Δloss·nmse / Σ nmse²` over its measured pairs; a layer without pairs gets the
//! mean of the fitted weights, and every weight is floored at 1% of that mean (a negative or
//! zero fit is measurement noise, not a free layer). The predicted error is then a predicted
//! loss increase. [`Objective::LinearNmse`] replaces the layer-output NMSE by the linears'
//! own output NMSE, and [`Objective::LossFit`] scales that by a loss gain fitted per layer.
//!
//! Methods ([`Method`]):
//!
//! - `uniform`: the same candidate for every layer: the single candidate of the grid with the
//!   lowest predicted error among those that meet the budget when applied everywhere. A
//!   budget that falls between grid points (`bits=3.5` on a {2,3,4,8} grid) is met by the
//!   next candidate below it, since uniform does not mix.
//! - `edge-llm`: the paper's heuristic (arXiv 2406.15758, LUC; the project's `PAPER.md` §1):
//!   - pruning: `m_i` = mean NMSE of layer `i` over the sparse candidates (sparsity > 0) at
//!     the highest bit-width that has sparse candidates (the profile closest to pruning
//!     alone); `ŝ_i = (m_i − min m)/(max m − min m)` (0 when all equal); target sparsity
//!     `s_i = L·P·(1 − ŝ_i)/Σ_j(1 − ŝ_j)`, no clamping, as in the official code;
//!   - quantization: `q_i` = mean NMSE of layer `i` over the dense candidates (sparsity 0;
//!     all candidates when there are none); layers with `q_i` above the mean of `q` get the
//!     high bit-width, the others the base bit-width;
//!   - snapping: each layer gets the candidate with exactly its bit-width whose sparsity is
//!     nearest `s_i` (ties: the lower NMSE of that layer);
//!   - knobs: `P` starts at the budget's sparsity (0 without one) and is raised in steps of
//!     0.01 until the snapped policy meets the budget (snapping can round sparsity down);
//!     (base, high) runs over every pair of grid bit-widths with base ≤ high, each with its
//!     smallest feasible `P`; the pair whose policy has the lowest predicted error is kept.
//!     So with a bits budget the pair is the one that meets it with the least predicted
//!     error, and with a bytes budget the heuristic's two knobs are tuned to fit the bytes.
//! - `optimal`: the multiple-choice knapsack `min Σ_l w_l·nmse[l][c_l]` subject to every
//!   constraint of the budget, solved by dynamic programming over the resources ([`knapsack`]).
//!   The result is exactly optimal whenever the resources fit the state limit at their
//!   natural resolution; otherwise it is feasible and comes with a proven lower bound on the
//!   optimum (see [`knapsack`] for the discretization and the bound).

use std::fmt;

use super::budget::{Budget, Usage};
use super::sensitivity::Sensitivity;

/// How the policy is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Uniform,
    EdgeLlm,
    Optimal,
}

impl Method {
    pub const ALL: [Method; 3] = [Method::Uniform, Method::EdgeLlm, Method::Optimal];

    pub fn name(&self) -> &'static str {
        match self {
            Method::Uniform => "uniform",
            Method::EdgeLlm => "edge-llm",
            Method::Optimal => "optimal",
        }
    }

    pub fn parse(s: &str) -> Result<Method, String> {
        Method::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| format!("unknown method `{s}` (expected optimal, edge-llm or uniform)"))
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What the predicted error sums.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Objective {
    /// `Σ_l nmse[l][c_l]`.
    #[default]
    Nmse,
    /// `Σ_l w_l · nmse[l][c_l]` with `w_l` fitted on the end-to-end loss deltas.
    LossWeighted,
    /// `Σ_l Σ_k (p_k / p_l) · nmse_k[c_l]`: each layer's seven linears' own output NMSE
    /// (measured on all calibration samples), averaged with their parameter counts as
    /// weights. Unlike the layer-output NMSE it is not shrunk by the residual stream, whose
    /// norm varies by orders of magnitude between layers.
    LinearNmse,
    /// `Σ_l g_l · linear_nmse[l][c_l]`: the linear-output NMSE of [`Objective::LinearNmse`]
    /// turned into a predicted calibration-loss increase by a gain `g_l` fitted per layer on
    /// the profile's end-to-end deltas (least squares through the origin over the layer's
    /// measured pairs). A layer without measured pairs takes the gain interpolated linearly
    /// between its nearest measured neighbours (the nearest one at either end); every gain is
    /// floored at 1% of the mean gain (a negative fit is noise, not a free layer). Profile with
    /// `--e2e-layers all` so that every layer's gain is measured.
    LossFit,
    /// The measured end-to-end loss change `Δloss[l][c]` of every (layer, candidate) pair the
    /// profile measured (mean over repeats, floored at 0), and the [`Objective::LossFit`]
    /// prediction for the pairs it did not. Profile the candidates the budget will draw on
    /// with `--e2e-layers all --e2e-candidates ...` (or merge the measurements of another
    /// profile run with [`Sensitivity::merge_end_to_end`]).
    LossMeasured,
}

/// Search options.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    pub objective: Objective,
    /// Largest dynamic-programming table `optimal` may use (states per layer). The default,
    /// 2²², costs about 8 bytes a state plus 2 bytes a state per layer (~300 MB for 30 layers)
    /// and solves SmolLM2-sized grids exactly even with all three constraints.
    pub max_states: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            objective: Objective::Nmse,
            max_states: 1 << 22,
        }
    }
}

/// A checked profile with each (layer, candidate)'s error and resource usage.
#[derive(Debug, Clone)]
pub struct Problem<'a> {
    pub profile: &'a Sensitivity,
    /// Per-layer error weight `w_l`.
    pub weights: Vec<f64>,
    /// [`Objective::LossFit`]: the fitted loss gain `g_l` of each layer (else empty).
    pub gains: Vec<f64>,
    /// `linear_err[l][c]` for [`Objective::LinearNmse`] (else empty).
    pub linear_err: Vec<Vec<f64>>,
    /// `usage[l][c]`.
    pub usage: Vec<Vec<Usage>>,
}

impl<'a> Problem<'a> {
    /// Checks the profile for what the search needs (layers, finite non-negative NMSE,
    /// linear shapes agreeing with `params`, end-to-end entries in range) and tabulates usage.
    pub fn new(profile: &'a Sensitivity, objective: Objective) -> Result<Problem<'a>, String> {
        let nc = profile.candidates.len();
        if profile.layers.is_empty() {
            return Err("the profile has no layers".into());
        }
        if nc == 0 {
            return Err("the profile has no candidates".into());
        }
        if nc > u16::MAX as usize {
            return Err(format!("the profile has {nc} candidates (at most 65535)"));
        }
        let mut usage = Vec::with_capacity(profile.layers.len());
        for (i, l) in profile.layers.iter().enumerate() {
            if l.layer != i {
                return Err(format!("layers out of order: entry {i} is layer {}", l.layer));
            }
            if l.params == 0 {
                return Err(format!("layer {i}: params is 0"));
            }
            if l.nmse.len() != nc {
                return Err(format!(
                    "layer {i}: {} nmse values for {nc} candidates",
                    l.nmse.len()
                ));
            }
            for (c, v) in l.nmse.iter().enumerate() {
                if !v.is_finite() || *v < 0.0 {
                    return Err(format!(
                        "layer {i}: nmse of candidate {c} ({}) is {v} (must be finite and >= 0)",
                        profile.candidates[c].label()
                    ));
                }
            }
            if !l.linears.is_empty() {
                let total: usize = l.linears.iter().map(|x| x.rows * x.cols).sum();
                if total != l.params {
                    return Err(format!(
                        "layer {i}: its linears hold {total} weights but params says {}",
                        l.params
                    ));
                }
            }
            usage.push(
                profile
                    .candidates
                    .iter()
                    .map(|c| {
                        let bytes = (!l.linears.is_empty()).then(|| {
                            l.linears
                                .iter()
                                .map(|x| c.estimated_bytes(x.rows, x.cols) as u64)
                                .sum()
                        });
                        Usage::layer(l.params as u64, c.bits, c.sparsity, bytes)
                    })
                    .collect(),
            );
        }
        for e in &profile.end_to_end {
            if e.layer >= profile.layers.len() || e.candidate >= nc || !e.loss_delta.is_finite() {
                return Err(format!(
                    "end_to_end entry (layer {}, candidate {}, delta {}) is out of range",
                    e.layer, e.candidate, e.loss_delta
                ));
            }
        }
        let weights = match objective {
            Objective::Nmse | Objective::LinearNmse | Objective::LossFit | Objective::LossMeasured => {
                vec![1.0; profile.layers.len()]
            }
            Objective::LossWeighted => loss_weights(profile)?,
        };
        let mut linear_err = match objective {
            Objective::LinearNmse | Objective::LossFit | Objective::LossMeasured => profile
                .layers
                .iter()
                .map(|l| {
                    if l.linears.is_empty() {
                        return Err(format!(
                            "layer {}: the linear-nmse objective needs per-linear nmse",
                            l.layer
                        ));
                    }
                    let total: f64 = l.linears.iter().map(|k| (k.rows * k.cols) as f64).sum();
                    Ok((0..nc)
                        .map(|c| {
                            l.linears
                                .iter()
                                .map(|k| (k.rows * k.cols) as f64 / total * k.nmse[c])
                                .sum()
                        })
                        .collect())
                })
                .collect::<Result<Vec<Vec<f64>>, String>>()?,
            _ => vec![],
        };
        let mut gains = vec![];
        if matches!(objective, Objective::LossFit | Objective::LossMeasured) {
            gains = loss_gains(profile, &linear_err)?;
            for (row, g) in linear_err.iter_mut().zip(&gains) {
                row.iter_mut().for_each(|e| *e *= g);
            }
        }
        if objective == Objective::LossMeasured {
            let mut sum = vec![vec![(0.0, 0usize); nc]; profile.layers.len()];
            for e in &profile.end_to_end {
                let cell = &mut sum[e.layer][e.candidate];
                cell.0 += e.loss_delta;
                cell.1 += 1;
            }
            for (row, measured) in linear_err.iter_mut().zip(&sum) {
                for (err, &(total, n)) in row.iter_mut().zip(measured) {
                    if n > 0 {
                        *err = (total / n as f64).max(0.0);
                    }
                }
            }
        }
        Ok(Problem {
            gains,
            profile,
            weights,
            linear_err,
            usage,
        })
    }

    pub fn layers(&self) -> usize {
        self.profile.layers.len()
    }

    pub fn candidates(&self) -> usize {
        self.profile.candidates.len()
    }

    /// The weighted error of candidate `c` at layer `l`.
    pub fn error(&self, l: usize, c: usize) -> f64 {
        if !self.linear_err.is_empty() {
            return self.linear_err[l][c];
        }
        self.weights[l] * self.profile.layers[l].nmse[c]
    }

    /// Predicted error and usage of a policy (`choice[l]` = candidate of layer `l`).
    pub fn evaluate(&self, choice: &[usize]) -> (f64, Usage) {
        let err = choice.iter().enumerate().map(|(l, &c)| self.error(l, c)).sum();
        let usage = choice.iter().enumerate().map(|(l, &c)| self.usage[l][c]).sum();
        (err, usage)
    }

    /// Whether every layer's linear shapes are known (needed for a bytes budget).
    pub fn has_bytes(&self) -> bool {
        self.profile.layers.iter().all(|l| !l.linears.is_empty())
    }

    /// `Err` naming the constraint and the best achievable value when the budget cannot be
    /// met by any policy on this grid; `Ok` when some policy may meet it (the constraints
    /// each alone are achievable).
    pub fn check_each_achievable(&self, budget: &Budget) -> Result<(), String> {
        if budget.bytes.is_some()
            && let Some(l) = self.profile.layers.iter().find(|l| l.linears.is_empty())
        {
            return Err(format!(
                "a bytes budget needs each layer's linear shapes, but layer {} of the profile has no `linears`",
                l.layer
            ));
        }
        let best = |key: &dyn Fn(&Usage) -> u64| -> Usage {
            (0..self.layers())
                .map(|l| *self.usage[l].iter().min_by_key(|u| key(u)).expect("candidates"))
                .sum()
        };
        if let Some(b) = budget.bits {
            let u = best(&|u| u.bit_params);
            if !(Budget {
                bits: Some(b),
                ..Default::default()
            })
            .admits(&u)
            {
                return Err(format!(
                    "budget `{budget}` cannot be met: the lowest average bit-width this grid allows is {:.4}",
                    u.bits()
                ));
            }
        }
        if let Some(s) = budget.sparsity {
            let u = best(&|u| u.kept_micro);
            if !(Budget {
                sparsity: Some(s),
                ..Default::default()
            })
            .admits(&u)
            {
                return Err(format!(
                    "budget `{budget}` cannot be met: the highest overall sparsity this grid allows is {:.4}",
                    u.sparsity()
                ));
            }
        }
        if let Some(n) = budget.bytes {
            let u = best(&|u| u.bytes.unwrap_or(u64::MAX));
            if !(Budget {
                bytes: Some(n),
                ..Default::default()
            })
            .admits(&u)
            {
                return Err(format!(
                    "budget `{budget}` cannot be met: the smallest policy on this grid takes {} bytes ({:.2} MiB)",
                    u.bytes.unwrap_or(0),
                    u.bytes.unwrap_or(0) as f64 / (1u64 << 20) as f64
                ));
            }
        }
        Ok(())
    }
}

/// Per layer, the least-squares slope through the origin of the profile's end-to-end loss
/// deltas against `x(layer, candidate)`, `Σ Δloss·x / Σ x²` over the layer's measured pairs
/// (`None` for a layer without pairs of non-zero `x`).
fn fit_through_origin(p: &Sensitivity, x: impl Fn(usize, usize) -> f64) -> Vec<Option<f64>> {
    let n = p.layers.len();
    let (mut num, mut den) = (vec![0.0; n], vec![0.0; n]);
    for e in &p.end_to_end {
        let v = x(e.layer, e.candidate);
        num[e.layer] += e.loss_delta * v;
        den[e.layer] += v * v;
    }
    (0..n).map(|l| (den[l] > 0.0).then(|| num[l] / den[l])).collect()
}

/// Per-layer weights for [`Objective::LossWeighted`] (see the module docs).
fn loss_weights(p: &Sensitivity) -> Result<Vec<f64>, String> {
    let fitted = fit_through_origin(p, |l, c| p.layers[l].nmse[c]);
    let known: Vec<f64> = fitted.iter().flatten().copied().collect();
    if known.is_empty() {
        return Err(
            "--objective loss-weighted needs end_to_end loss deltas with non-zero nmse in the profile".into(),
        );
    }
    let mean = known.iter().sum::<f64>() / known.len() as f64;
    if mean <= 0.0 {
        return Err(format!(
            "the end-to-end loss deltas fit a mean weight of {mean:.3e} (<= 0): they do not predict loss"
        ));
    }
    Ok(fitted
        .iter()
        .map(|w| w.unwrap_or(mean).max(0.01 * mean))
        .collect())
}

/// Per-layer gains for [`Objective::LossFit`] (see its docs): `err[l][c]` is the unscaled
/// predicted error of candidate `c` at layer `l`.
fn loss_gains(p: &Sensitivity, err: &[Vec<f64>]) -> Result<Vec<f64>, String> {
    let n = err.len();
    let known: Vec<(usize, f64)> = fit_through_origin(p, |l, c| err[l][c])
        .into_iter()
        .enumerate()
        .filter_map(|(l, g)| g.map(|g| (l, g)))
        .collect();
    if known.is_empty() {
        return Err(
            "--objective loss-fit needs end-to-end loss deltas of candidates with a non-zero \
                    linear nmse in the profile (profile with --e2e-layers all)"
                .into(),
        );
    }
    let mean = known.iter().map(|k| k.1).sum::<f64>() / known.len() as f64;
    if mean <= 0.0 {
        return Err(format!(
            "the end-to-end loss deltas fit a mean gain of {mean:.3e} (<= 0): they do not predict loss"
        ));
    }
    let at = |l: usize| -> f64 {
        let after = known.iter().position(|k| k.0 >= l);
        match after {
            Some(i) if known[i].0 == l => known[i].1,
            Some(0) => known[0].1,
            None => known[known.len() - 1].1,
            Some(i) => {
                let (l0, g0) = known[i - 1];
                let (l1, g1) = known[i];
                g0 + (g1 - g0) * (l - l0) as f64 / (l1 - l0) as f64
            }
        }
    };
    Ok((0..n).map(|l| at(l).max(0.01 * mean)).collect())
}

/// The details of an `edge-llm` policy (see the module docs for the formulas).
#[derive(Debug, Clone)]
pub struct EdgeLlm {
    /// `m_i`: mean pruning NMSE (empty when no sparse candidate exists).
    pub pruning_mse: Vec<f64>,
    /// `ŝ_i`.
    pub scaled: Vec<f64>,
    /// The overall sparsity `P` handed out.
    pub p: f64,
    /// `s_i = L·P·(1 − ŝ_i)/Σ(1 − ŝ_j)` before snapping.
    pub target_sparsity: Vec<f64>,
    /// `q_i`: mean quantization NMSE.
    pub quant_sensitivity: Vec<f64>,
    /// Layers with `q_i` above the mean.
    pub high: Vec<bool>,
    pub base_bits: u8,
    pub high_bits: u8,
}

/// A chosen policy.
#[derive(Debug, Clone)]
pub struct Solution {
    pub method: Method,
    /// `choice[l]`: index into the profile's candidates for layer `l`.
    pub choice: Vec<usize>,
    /// Predicted error `Σ_l w_l · nmse[l][choice[l]]`.
    pub error: f64,
    pub usage: Usage,
    /// `optimal`: a proven lower bound on the optimum (equal to `error` when exact).
    pub lower_bound: Option<f64>,
    /// How the method got there (snapping, discretization), for the report.
    pub notes: Vec<String>,
    pub edge_llm: Option<EdgeLlm>,
}

/// Chooses a policy. Errors name the budget and what is achievable when no policy (or, for
/// `uniform` and `edge-llm`, none this method can produce) meets it.
pub fn search(
    problem: &Problem,
    budget: &Budget,
    method: Method,
    opts: &Options,
) -> Result<Solution, String> {
    problem.check_each_achievable(budget)?;
    match method {
        Method::Uniform => uniform(problem, budget),
        Method::EdgeLlm => edge_llm(problem, budget),
        Method::Optimal => optimal(problem, budget, opts),
    }
}

/// The solution of a choice: its predicted error and usage.
pub(crate) fn solution(problem: &Problem, method: Method, choice: Vec<usize>) -> Solution {
    let (error, usage) = problem.evaluate(&choice);
    Solution {
        method,
        choice,
        error,
        usage,
        lower_bound: None,
        notes: Vec::new(),
        edge_llm: None,
    }
}

fn uniform(problem: &Problem, budget: &Budget) -> Result<Solution, String> {
    let mut best: Option<Solution> = None;
    for c in 0..problem.candidates() {
        let s = solution(problem, Method::Uniform, vec![c; problem.layers()]);
        if budget.admits(&s.usage) && best.as_ref().is_none_or(|b| s.error < b.error) {
            best = Some(s);
        }
    }
    let mut s = best.ok_or_else(|| {
        format!("no single candidate of the grid meets budget `{budget}` on every layer (method uniform); `optimal` mixes candidates")
    })?;
    s.notes.push(format!(
        "uniform: {} on every layer, the lowest-error single candidate within the budget (uniform does not mix candidates)",
        problem.profile.candidates[s.choice[0]].label()
    ));
    Ok(s)
}

/// The edge-llm allocation for given knobs (before checking the budget).
fn edge_llm_policy(
    problem: &Problem,
    pruning_mse: &[f64],
    quant: &[f64],
    p: f64,
    base: u8,
    high_bits: u8,
) -> (Vec<usize>, EdgeLlm) {
    let prof = problem.profile;
    let n = problem.layers();
    let scaled: Vec<f64> = if pruning_mse.is_empty() {
        vec![0.0; n]
    } else {
        let lo = pruning_mse.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = pruning_mse.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        pruning_mse
            .iter()
            .map(|&m| if hi > lo { (m - lo) / (hi - lo) } else { 0.0 })
            .collect()
    };
    let denom: f64 = scaled.iter().map(|s| 1.0 - s).sum();
    let target: Vec<f64> = scaled.iter().map(|s| n as f64 * p * (1.0 - s) / denom).collect();
    let mean_q = quant.iter().sum::<f64>() / n as f64;
    let high: Vec<bool> = quant.iter().map(|&q| q > mean_q).collect();
    let choice = (0..n)
        .map(|l| {
            let bits = if high[l] { high_bits } else { base };
            let mut best: Option<(f64, f64, usize)> = None;
            for (c, cand) in prof.candidates.iter().enumerate() {
                if cand.bits != bits {
                    continue;
                }
                let key = ((cand.sparsity - target[l]).abs(), prof.layers[l].nmse[c], c);
                let better =
                    best.is_none_or(|b| key.0 < b.0 - 1e-12 || ((key.0 - b.0).abs() <= 1e-12 && key.1 < b.1));
                if better {
                    best = Some(key);
                }
            }
            best.expect("bit-width from the grid").2
        })
        .collect();
    let details = EdgeLlm {
        pruning_mse: pruning_mse.to_vec(),
        scaled,
        p,
        target_sparsity: target,
        quant_sensitivity: quant.to_vec(),
        high,
        base_bits: base,
        high_bits,
    };
    (choice, details)
}

fn edge_llm(problem: &Problem, budget: &Budget) -> Result<Solution, String> {
    let prof = problem.profile;
    let cands = &prof.candidates;
    let n = problem.layers();
    // Pruning sensitivity: sparse candidates at the highest bit-width that has any.
    let prune_bits = cands.iter().filter(|c| c.sparsity > 0.0).map(|c| c.bits).max();
    let pruning_mse: Vec<f64> = match prune_bits {
        None => Vec::new(),
        Some(b) => {
            let set: Vec<usize> = (0..cands.len())
                .filter(|&c| cands[c].sparsity > 0.0 && cands[c].bits == b)
                .collect();
            (0..n)
                .map(|l| set.iter().map(|&c| prof.layers[l].nmse[c]).sum::<f64>() / set.len() as f64)
                .collect()
        }
    };
    let dense: Vec<usize> = (0..cands.len()).filter(|&c| cands[c].sparsity == 0.0).collect();
    let qset: Vec<usize> = if dense.is_empty() {
        (0..cands.len()).collect()
    } else {
        dense
    };
    let quant: Vec<f64> = (0..n)
        .map(|l| qset.iter().map(|&c| prof.layers[l].nmse[c]).sum::<f64>() / qset.len() as f64)
        .collect();
    let mut bit_widths: Vec<u8> = cands.iter().map(|c| c.bits).collect();
    bit_widths.sort_unstable();
    bit_widths.dedup();
    let max_sparsity = cands.iter().map(|c| c.sparsity).fold(0.0, f64::max);
    let p0 = budget.sparsity.unwrap_or(0.0);
    let mut best: Option<Solution> = None;
    for (i, &base) in bit_widths.iter().enumerate() {
        for &high in &bit_widths[i..] {
            // The smallest P >= the budget's sparsity whose snapped policy meets the budget.
            let mut k = 0;
            loop {
                let p = p0 + 0.01 * k as f64;
                if k > 0 && (pruning_mse.is_empty() || p > max_sparsity + 1e-9) {
                    break;
                }
                let (choice, details) = edge_llm_policy(problem, &pruning_mse, &quant, p, base, high);
                let mut s = solution(problem, Method::EdgeLlm, choice);
                if budget.admits(&s.usage) {
                    if best.as_ref().is_none_or(|b| s.error < b.error) {
                        s.edge_llm = Some(details);
                        best = Some(s);
                    }
                    break;
                }
                k += 1;
            }
        }
    }
    let mut s = best.ok_or_else(|| {
        format!("the edge-llm heuristic finds no (base, high) bit-widths and P that meet budget `{budget}` after snapping to the grid; `optimal` may")
    })?;
    let d = s.edge_llm.as_ref().expect("set with best");
    s.notes.push(format!(
        "edge-llm: bits base {} / high {} ({} of {n} layers above the mean quantization sensitivity get the high bit-width)",
        d.base_bits,
        d.high_bits,
        d.high.iter().filter(|h| **h).count()
    ));
    s.notes.push(format!(
        "edge-llm: sparsity P = {:.2}{} handed out as L*P*(1-s_i)/sum(1-s_j); each layer snapped to the candidate of its bit-width with the nearest sparsity (ties: lower nmse of the layer)",
        d.p,
        if d.p > p0 + 1e-12 {
            format!(" (raised from {p0:.2} so the snapped policy meets the budget)")
        } else {
            String::new()
        }
    ));
    Ok(s)
}

fn optimal(problem: &Problem, budget: &Budget, opts: &Options) -> Result<Solution, String> {
    optimal_pinned(problem, budget, opts, &[])
}

/// `optimal` with some layers pinned: `pins` holds `(layer, candidate)` pairs, and each pinned
/// layer may only take its candidate (the knapsack chooses the other layers around it).
pub fn optimal_pinned(
    problem: &Problem,
    budget: &Budget,
    opts: &Options,
    pins: &[(usize, usize)],
) -> Result<Solution, String> {
    let n = problem.layers();
    for &(l, c) in pins {
        if l >= n || c >= problem.candidates() {
            return Err(format!("pin (layer {l}, candidate {c}) is out of range"));
        }
    }
    // The candidates each layer may take (indices into the profile's grid).
    let allowed: Vec<Vec<usize>> = (0..n)
        .map(|l| match pins.iter().rev().find(|p| p.0 == l) {
            Some(&(_, c)) => vec![c],
            None => (0..problem.candidates()).collect(),
        })
        .collect();
    let params: u64 = problem.profile.layers.iter().map(|l| l.params as u64).sum();
    let limits = budget.limits(params);
    let mut caps = Vec::new();
    let mut pick: Vec<fn(&Usage) -> u64> = Vec::new();
    if let Some(c) = limits.bit_params {
        caps.push(c);
        pick.push(|u| u.bit_params);
    }
    if let Some(c) = limits.kept_micro {
        caps.push(c);
        pick.push(|u| u.kept_micro);
    }
    if let Some(c) = limits.bytes {
        caps.push(c);
        pick.push(|u| u.bytes.expect("checked by check_each_achievable"));
    }
    let error: Vec<Vec<f64>> = (0..n)
        .map(|l| allowed[l].iter().map(|&c| problem.error(l, c)).collect())
        .collect();
    let cost: Vec<Vec<Vec<u64>>> = (0..n)
        .map(|l| {
            allowed[l]
                .iter()
                .map(|&c| pick.iter().map(|f| f(&problem.usage[l][c])).collect())
                .collect()
        })
        .collect();
    let k = knapsack(&error, &cost, &caps, opts.max_states)?.ok_or_else(|| {
        if pins.is_empty() {
            format!("no policy meets budget `{budget}`: each constraint alone is achievable, but not all of them at once")
        } else {
            format!("no policy meets budget `{budget}` with layers {pins:?} pinned")
        }
    })?;
    let choice = k.choice.iter().enumerate().map(|(l, &i)| allowed[l][i]).collect();
    let mut s = solution(problem, Method::Optimal, choice);
    s.lower_bound = Some(k.lower_bound);
    s.notes.push(if k.exact {
        format!(
            "optimal: exact multiple-choice knapsack (dynamic programming over {} states, resources at their natural resolution)",
            k.states
        )
    } else {
        format!(
            "optimal: knapsack over {} states with the resources discretized; the optimum lies in [{:.6e}, {:.6e}] (gap {:.3e})",
            k.states,
            k.lower_bound,
            s.error,
            s.error - k.lower_bound
        )
    });
    Ok(s)
}

/// The result of [`knapsack`].
#[derive(Debug, Clone)]
pub struct Knapsack {
    /// Candidate per layer; always feasible for the true (undiscretized) constraints.
    pub choice: Vec<usize>,
    /// Its error.
    pub error: f64,
    /// A lower bound on the true optimum (`== error` when `exact`).
    pub lower_bound: f64,
    /// Whether the discretization was lossless, making `choice` optimal.
    pub exact: bool,
    /// States of the dynamic-programming table.
    pub states: usize,
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// Multiple-choice knapsack: choose one item `c` per group `l` minimizing `Σ error[l][c]`
/// subject to `Σ_l cost[l][c_l][r] ≤ cap[r]` for every resource `r`.
///
/// `Ok(None)`: proven infeasible. `Err`: feasible in the relaxation but the discretization
/// was too coarse to find a feasible choice (raise `max_states`).
///
/// **Method.** Each group's cheapest cost per resource is taken out (`rel = cost − min_l`,
/// slack `S_r = cap_r − Σ_l min_l`); a resource whose largest possible total fits its slack
/// never binds and is dropped; an item whose `rel` exceeds the slack is never usable. Each
/// remaining resource gets a unit `u_r`:
/// - exact: `u_r = gcd` of all its `rel` values, used when the table `Π (⌊S_r/u_r⌋ + 1)`
///   has at most `max_states` entries. Then every cost is a whole number of units and the
///   dynamic program (the minimum error for every reachable usage vector, layer by layer)
///   is exactly the original problem: the result is optimal.
/// - otherwise each resource gets `K_r` levels (the state budget shared among resources,
///   `K_r ≤ ⌊S_r/gcd⌋ + 1`) and `u_r = S_r/(K_r − 1)`. Two tables are solved: costs rounded
///   **up** (`⌈rel/u⌉`), whose every solution satisfies `Σ rel ≤ Σ⌈rel/u⌉·u ≤ (K−1)·u = S`,
///   so the returned choice is truly feasible; and costs rounded **down** (`⌊rel/u⌋`), a
///   relaxation (every truly feasible choice has `Σ⌊rel/u⌋ ≤ ⌊Σ rel/u⌋ ≤ K − 1`), whose
///   optimum is a lower bound on the true optimum. So `lower_bound ≤ OPT ≤ error`, and the
///   choice is also at least as good as the true optimum under the budget tightened by
///   `L·u_r` per resource (rounding up adds less than one unit per layer).
pub fn knapsack(
    error: &[Vec<f64>],
    cost: &[Vec<Vec<u64>>],
    cap: &[u64],
    max_states: usize,
) -> Result<Option<Knapsack>, String> {
    let n = error.len();
    let nr = cap.len();
    assert_eq!(cost.len(), n);
    // Per group minimum per resource, slack.
    let mins: Vec<Vec<u64>> = cost
        .iter()
        .map(|g| {
            (0..nr)
                .map(|r| g.iter().map(|c| c[r]).min().expect("non-empty group"))
                .collect()
        })
        .collect();
    let mut slack = Vec::with_capacity(nr);
    for r in 0..nr {
        let base: u64 = mins.iter().map(|m| m[r]).sum();
        if base > cap[r] {
            return Ok(None);
        }
        slack.push(cap[r] - base);
    }
    let rel = |l: usize, c: usize, r: usize| cost[l][c][r] - mins[l][r];
    let usable = |l: usize, c: usize| (0..nr).all(|r| rel(l, c, r) <= slack[r]);
    // Binding resources and their exact units.
    let mut dims: Vec<usize> = Vec::new();
    let mut g = vec![0u64; nr];
    for r in 0..nr {
        let most: u64 = (0..n)
            .map(|l| {
                (0..cost[l].len())
                    .filter(|&c| usable(l, c))
                    .map(|c| rel(l, c, r))
                    .max()
                    .unwrap_or(0)
            })
            .sum();
        if most > slack[r] {
            dims.push(r);
            for (l, group) in cost.iter().enumerate() {
                for c in 0..group.len() {
                    g[r] = gcd(g[r], rel(l, c, r));
                }
            }
        }
    }
    let exact_levels: Vec<u64> = dims.iter().map(|&r| slack[r] / g[r] + 1).collect();
    let product = exact_levels
        .iter()
        .try_fold(1u64, |a, &k| a.checked_mul(k))
        .unwrap_or(u64::MAX);
    let exact = product <= max_states as u64;
    // (numerator, denominator) of the unit scaling per dimension, and its level count.
    let mut scale: Vec<(u64, u64)> = Vec::new();
    let mut levels: Vec<usize> = Vec::new();
    if exact {
        for (i, &r) in dims.iter().enumerate() {
            scale.push((1, g[r]));
            levels.push(exact_levels[i] as usize);
        }
    } else {
        // Share the state budget: smallest dimensions first, each at most its exact count.
        let mut order: Vec<usize> = (0..dims.len()).collect();
        order.sort_by_key(|&i| exact_levels[i]);
        let mut k = vec![0u64; dims.len()];
        let mut room = max_states.max(2usize.pow(dims.len() as u32)) as f64;
        for (j, &i) in order.iter().enumerate() {
            let left = (dims.len() - j) as f64;
            let share = room.powf(1.0 / left).floor().max(2.0) as u64;
            k[i] = share.min(exact_levels[i]);
            room /= k[i] as f64;
        }
        for (i, &r) in dims.iter().enumerate() {
            if k[i] == exact_levels[i] {
                scale.push((1, g[r]));
            } else {
                scale.push((k[i] - 1, slack[r]));
            }
            levels.push(k[i] as usize);
        }
    }
    let units = |l: usize, c: usize, up: bool| -> Vec<usize> {
        dims.iter()
            .zip(&scale)
            .map(|(&r, &(num, den))| {
                let x = rel(l, c, r) as u128 * num as u128;
                let d = den as u128;
                (if up { x.div_ceil(d) } else { x / d }) as usize
            })
            .collect()
    };
    let run = |up: bool| {
        dp(
            n,
            &levels,
            |l| cost[l].len(),
            |l, c| usable(l, c).then(|| units(l, c, up)),
            error,
        )
    };
    let states: usize = levels.iter().product();
    let upper = run(true);
    if exact {
        return Ok(upper.map(|(choice, err)| Knapsack {
            choice,
            error: err,
            lower_bound: err,
            exact: true,
            states,
        }));
    }
    let lower = run(false);
    match (upper, lower) {
        (_, None) => Ok(None),
        (None, Some(_)) => Err(format!(
            "the budget is feasible in the relaxation but no feasible policy was found at this resolution ({states} states); raise --max-states"
        )),
        (Some((choice, err)), Some((_, lb))) => Ok(Some(Knapsack {
            choice,
            error: err,
            lower_bound: lb.min(err),
            exact: false,
            states,
        })),
    }
}

/// The dynamic program over usage vectors: `table[s]` = least error reaching usage `s`
/// (mixed radix `levels`); returns the best final choice and its error.
fn dp(
    n: usize,
    levels: &[usize],
    count: impl Fn(usize) -> usize,
    units: impl Fn(usize, usize) -> Option<Vec<usize>>,
    error: &[Vec<f64>],
) -> Option<(Vec<usize>, f64)> {
    let states: usize = levels.iter().product();
    let mut stride = vec![1usize; levels.len()];
    for d in 1..levels.len() {
        stride[d] = stride[d - 1] * levels[d - 1];
    }
    let mut table = vec![f64::INFINITY; states];
    table[0] = 0.0;
    let mut choices: Vec<Vec<u16>> = Vec::with_capacity(n);
    let mut coords = vec![0usize; levels.len()];
    for (l, layer_error) in error.iter().enumerate() {
        let items: Vec<(usize, Vec<usize>, usize)> = (0..count(l))
            .filter_map(|c| {
                units(l, c).and_then(|u| {
                    let fits = u.iter().zip(levels).all(|(x, k)| x < k);
                    fits.then(|| {
                        let off = u.iter().zip(&stride).map(|(x, s)| x * s).sum();
                        (c, u, off)
                    })
                })
            })
            .collect();
        let mut next = vec![f64::INFINITY; states];
        let mut pick = vec![u16::MAX; states];
        coords.iter_mut().for_each(|x| *x = 0);
        for (s, &base) in table.iter().enumerate() {
            if s > 0 {
                // Advance the mixed-radix coordinates of s.
                for d in 0..levels.len() {
                    coords[d] += 1;
                    if coords[d] < levels[d] {
                        break;
                    }
                    coords[d] = 0;
                }
            }
            if base == f64::INFINITY {
                continue;
            }
            for (c, u, off) in &items {
                if u.iter().zip(&coords).zip(levels).all(|((x, y), k)| x + y < *k) {
                    let t = s + off;
                    let e = base + layer_error[*c];
                    if e < next[t] {
                        next[t] = e;
                        pick[t] = *c as u16;
                    }
                }
            }
        }
        table = next;
        choices.push(pick);
    }
    let (mut s, &best) = table
        .iter()
        .enumerate()
        .filter(|(_, e)| e.is_finite())
        .min_by(|a, b| a.1.total_cmp(b.1))?;
    let mut choice = vec![0usize; n];
    for l in (0..n).rev() {
        let c = choices[l][s] as usize;
        choice[l] = c;
        let u = units(l, c).expect("usable item");
        s -= u.iter().zip(&stride).map(|(x, st)| x * st).sum::<usize>();
    }
    debug_assert_eq!(s, 0);
    Some((choice, best))
}
