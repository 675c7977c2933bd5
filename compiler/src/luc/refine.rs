//! Measured refinement of an `optimal` policy.
//!
//! The knapsack minimizes a *predicted* error that adds up per-layer measurements, each
//! taken with only that layer compressed. Compressing every layer at once is not additive:
//! an early layer's error is carried through every layer above it, and those layers are
//! then quantized and pruned on the damaged activations (sequential GPTQ / SparseGPT). On
//! SmolLM2 at `bits=3,sparsity=0.5` keeping layer 0 dense is worth about four times its
//! single-layer delta. No per-layer profile sees that; a measured loss of the whole
//! compressed model does.
//!
//! So `optimal` can refine its knapsack solution by measurement, a greedy local search in
//! which every point is itself a knapsack optimum:
//!
//! 1. Measure the starting policy: compress the whole model by it exactly as
//!    `edgec compress` does, and take its mean next-token loss on held-out text.
//! 2. Visit the layers in decreasing order of the profile's layer-output NMSE at their
//!    current candidate (the layers whose output the policy damages most). For layer `l`,
//!    *protect* it: pin it to the densest candidate of its bit-width (sparsity 0; when it is
//!    already dense, the next higher bit-width), and re-solve the knapsack with every pin so
//!    far, so the other layers pay for the protection in the way the predicted error says is
//!    cheapest. Measure the result.
//! 3. Keep the move (and its pin) when the measured loss went down, otherwise drop it.
//!    Stop after the given number of measurements.
//!
//! Every policy tried meets the budget (it is a knapsack solution), and the policy kept is
//! the one with the lowest measured loss, never worse than the starting knapsack optimum on
//! the measurement text.

use super::budget::Budget;
use super::search::{self, Options, Problem, Solution};

/// One measured policy of the search.
#[derive(Debug, Clone)]
pub struct Trial {
    /// Candidate per layer.
    pub choice: Vec<usize>,
    /// The pins that produced it (`(layer, candidate)`), empty for the start.
    pub pins: Vec<(usize, usize)>,
    /// Predicted error of the objective.
    pub predicted: f64,
    /// Measured loss.
    pub loss: f64,
    /// Whether the search kept it.
    pub accepted: bool,
}

/// The candidate that protects layer `l` currently at candidate `c`: the same bit-width,
/// group and scheme without sparsity; when `c` is dense, the lowest higher bit-width with
/// the same group and scheme, dense. `None` when there is none in the grid.
pub fn protect(problem: &Problem, c: usize) -> Option<usize> {
    let cands = &problem.profile.candidates;
    let cur = cands[c];
    let same = |k: usize| cands[k].group == cur.group && cands[k].scheme == cur.scheme;
    if cur.sparsity > 0.0 {
        return (0..cands.len()).find(|&k| same(k) && cands[k].bits == cur.bits && cands[k].sparsity == 0.0);
    }
    (0..cands.len())
        .filter(|&k| same(k) && cands[k].bits > cur.bits && cands[k].sparsity == 0.0)
        .min_by_key(|&k| cands[k].bits)
}

/// Refines `start` (an `optimal` solution for `budget`) with at most `trials` measurements
/// after the start's own; `measure(choice)` compresses the model by a policy and returns its
/// loss. `on_trial` sees each trial as it completes. Returns the kept solution and every
/// trial, the start first.
pub fn refine(
    problem: &Problem,
    budget: &Budget,
    opts: &Options,
    start: Solution,
    trials: usize,
    mut measure: impl FnMut(&[usize]) -> anyhow::Result<f64>,
    mut on_trial: impl FnMut(&Trial),
) -> anyhow::Result<(Solution, Vec<Trial>)> {
    let mut best = start;
    let mut best_loss = measure(&best.choice)?;
    let first = Trial {
        choice: best.choice.clone(),
        pins: vec![],
        predicted: best.error,
        loss: best_loss,
        accepted: true,
    };
    on_trial(&first);
    let mut log = vec![first];
    let mut pins: Vec<(usize, usize)> = vec![];
    let layer_nmse = |l: usize, c: usize| problem.profile.layers[l].nmse[c];
    let mut order: Vec<usize> = (0..problem.layers()).collect();
    order.sort_by(|&a, &b| layer_nmse(b, best.choice[b]).total_cmp(&layer_nmse(a, best.choice[a])));
    let mut measured = 0;
    for l in order {
        if measured >= trials {
            break;
        }
        let Some(c) = protect(problem, best.choice[l]) else {
            continue;
        };
        let mut tried = pins.clone();
        tried.push((l, c));
        let Ok(sol) = search::optimal_pinned(problem, budget, opts, &tried) else {
            continue;
        };
        if log.iter().any(|t| t.choice == sol.choice) {
            continue;
        }
        let loss = measure(&sol.choice)?;
        measured += 1;
        let accepted = loss < best_loss;
        let trial = Trial {
            choice: sol.choice.clone(),
            pins: tried.clone(),
            predicted: sol.error,
            loss,
            accepted,
        };
        on_trial(&trial);
        log.push(trial);
        if accepted {
            best = sol;
            best_loss = loss;
            pins = tried;
        }
    }
    let start_loss = log[0].loss;
    best.notes.push(format!(
        "optimal: refined by measurement ({} policies compressed and measured): loss {start_loss:.5} -> {best_loss:.5}, pins {pins:?}",
        log.len(),
    ));
    Ok((best, log))
}
