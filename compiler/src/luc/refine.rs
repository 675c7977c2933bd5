//! Measured refinement of an `optimal` policy.
//!
//! The knapsack minimizes a *predicted* error that adds up per-layer measurements, each
//! taken with only that layer compressed. Compressing every layer at once is not additive:
//! an early layer's error is carried through every layer above it, and those layers are
//! then quantized and pruned on the damaged activations (sequential GPTQ / SparseGPT). On
//! SmolLM2 at `bits=3,sparsity=0.5` keeping layer 0 dense is worth about four times its
//! single-layer delta, and a policy that spreads sparsity evenly (the paper's heuristic)
//! beats the knapsack optimum by a wide margin. No per-layer profile sees that; a measured
//! loss of the whole compressed model does.
//!
//! So `optimal` can refine its knapsack solution by measurement:
//!
//! 1. **Starts.** Measure the knapsack optimum and every other start given (the command
//!    passes the `uniform` and `edge-llm` policies for the same budget): compress the whole
//!    model by each exactly as `edgec compress` does and take its mean next-token loss on
//!    held-out text. The lowest loss is the current policy.
//! 2. **Moves**, in decreasing order of the profile's layer-output NMSE at the current
//!    candidate (the layers whose output the policy damages most), one measurement each:
//!    - from the knapsack optimum, *pin*: protect layer `l` (the densest candidate of its
//!      bit-width; when already dense, the next higher bit-width) and re-solve the knapsack
//!      with every pin so far, so the other layers pay for the protection in the way the
//!      predicted error says is cheapest;
//!    - from any other start, *trade*: move layer `l` one step up the grid (the next lower
//!      sparsity of its bit-width; when dense, the next higher bit-width) and, when that
//!      breaks the budget, move the one other layer whose layer-output NMSE grows least to a
//!      candidate that restores it (never a layer a kept trade protected, nor the payer of a
//!      trade measured worse). The rest of the policy stays as measured.
//! 3. Keep a move when the measured loss went down, otherwise drop it. Stop after the given
//!    number of measurements after the starts'.
//!
//! Every policy tried meets the budget, and the policy kept is the one with the lowest
//! measured loss, never worse on the measurement text than any start.

use super::budget::Budget;
use super::search::{self, Method, Options, Problem, Solution};

/// How a measured policy was reached.
#[derive(Debug, Clone, PartialEq)]
pub enum Origin {
    /// A starting policy, by the name of the method that made it.
    Start(String),
    /// The knapsack re-solved with these `(layer, candidate)` pins.
    Pins(Vec<(usize, usize)>),
    /// `up` moved one step up the grid, `down` (if any) paying for it; `(layer, candidate)`.
    Trade {
        up: (usize, usize),
        down: Option<(usize, usize)>,
    },
}

/// One measured policy of the search.
#[derive(Debug, Clone)]
pub struct Trial {
    /// Candidate per layer.
    pub choice: Vec<usize>,
    pub origin: Origin,
    /// Predicted error of the objective.
    pub predicted: f64,
    /// Measured loss.
    pub loss: f64,
    /// Whether the search kept it (it beat every policy measured before it).
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
    dense_step_up(problem, c)
}

fn dense_step_up(problem: &Problem, c: usize) -> Option<usize> {
    let cands = &problem.profile.candidates;
    let cur = cands[c];
    (0..cands.len())
        .filter(|&k| {
            cands[k].group == cur.group
                && cands[k].scheme == cur.scheme
                && cands[k].bits > cur.bits
                && cands[k].sparsity == 0.0
        })
        .min_by_key(|&k| cands[k].bits)
}

/// One step up the grid from candidate `c`: the same bit-width, group and scheme at the next
/// lower sparsity (the same sparsity pattern, or dense); when `c` is dense, [`protect`].
pub fn step_up(problem: &Problem, c: usize) -> Option<usize> {
    let cands = &problem.profile.candidates;
    let cur = cands[c];
    if cur.sparsity == 0.0 {
        return dense_step_up(problem, c);
    }
    (0..cands.len())
        .filter(|&k| {
            let k_ = cands[k];
            k_.group == cur.group
                && k_.scheme == cur.scheme
                && k_.bits == cur.bits
                && k_.sparsity < cur.sparsity
                && (k_.sparsity == 0.0 || k_.pattern == cur.pattern)
        })
        .max_by(|&a, &b| cands[a].sparsity.total_cmp(&cands[b].sparsity))
}

/// Measures `sol`, logs the trial (kept when it beats `running`, the best loss so far) and
/// returns its loss and whether it was kept.
fn run_trial(
    sol: &Solution,
    origin: Origin,
    running: f64,
    measure: &mut impl FnMut(&[usize]) -> anyhow::Result<f64>,
    on_trial: &mut impl FnMut(&Trial),
    log: &mut Vec<Trial>,
) -> anyhow::Result<(f64, bool)> {
    let loss = measure(&sol.choice)?;
    let accepted = loss < running;
    let trial = Trial {
        choice: sol.choice.clone(),
        origin,
        predicted: sol.error,
        loss,
        accepted,
    };
    on_trial(&trial);
    log.push(trial);
    Ok((loss, accepted))
}

/// The trade that moves layer `up` of `current` one step up the grid: the traded policy and
/// its origin (an [`Origin::Trade`]), or `None` when there is no step up, or no single other
/// layer can pay for it within the budget.
/// The payer is the layer (not `up`, not in `exclude`) and candidate (same group and scheme
/// as its current one) whose layer-output NMSE in the profile grows least — the measure that
/// orders the moves, so a layer is protected and charged by the same yardstick.
pub fn trade(
    problem: &Problem,
    budget: &Budget,
    current: &[usize],
    up: usize,
    exclude: &[usize],
) -> Option<(Vec<usize>, Origin)> {
    let cu = step_up(problem, current[up])?;
    let mut moved = current.to_vec();
    moved[up] = cu;
    if budget.admits(&problem.evaluate(&moved).1) {
        let origin = Origin::Trade {
            up: (up, cu),
            down: None,
        };
        return Some((moved, origin));
    }
    let cands = &problem.profile.candidates;
    let mut best: Option<(f64, usize, usize)> = None;
    let nmse = |l: usize, c: usize| problem.profile.layers[l].nmse[c];
    for d in (0..problem.layers()).filter(|&d| d != up && !exclude.contains(&d)) {
        let cd = current[d];
        for c in 0..problem.candidates() {
            if c == cd || cands[c].group != cands[cd].group || cands[c].scheme != cands[cd].scheme {
                continue;
            }
            let growth = nmse(d, c) - nmse(d, cd);
            if best.is_some_and(|b| growth >= b.0) {
                continue;
            }
            moved[d] = c;
            if budget.admits(&problem.evaluate(&moved).1) {
                best = Some((growth, d, c));
            }
            moved[d] = cd;
        }
    }
    let (_, d, c) = best?;
    moved[d] = c;
    let origin = Origin::Trade {
        up: (up, cu),
        down: Some((d, c)),
    };
    Some((moved, origin))
}

/// Refines the best of `starts` (named solutions for `budget`, the knapsack optimum first
/// and named `optimal`) with at most `trials` measurements after the starts' own;
/// `measure(choice)` compresses the model by a policy and returns its loss. `on_trial`
/// sees each trial as it completes. Returns the kept solution (method `optimal`) and every
/// trial, the starts first.
pub fn refine(
    problem: &Problem,
    budget: &Budget,
    opts: &Options,
    starts: Vec<(String, Solution)>,
    trials: usize,
    mut measure: impl FnMut(&[usize]) -> anyhow::Result<f64>,
    mut on_trial: impl FnMut(&Trial),
) -> anyhow::Result<(Solution, Vec<Trial>)> {
    anyhow::ensure!(!starts.is_empty(), "refinement needs a starting policy");
    let mut log: Vec<Trial> = Vec::new();
    let mut best: Option<(Solution, String, f64)> = None;
    for (name, sol) in starts {
        if log.iter().any(|t| t.choice == sol.choice) {
            continue;
        }
        let running = best.as_ref().map_or(f64::INFINITY, |b| b.2);
        let (loss, accepted) = run_trial(
            &sol,
            Origin::Start(name.clone()),
            running,
            &mut measure,
            &mut on_trial,
            &mut log,
        )?;
        if accepted {
            best = Some((sol, name, loss));
        }
    }
    let (mut best, start_name, mut best_loss) = best.expect("at least one start measured");
    let starts_measured = log.len();
    let from_knapsack = start_name == Method::Optimal.name();
    let mut pins: Vec<(usize, usize)> = vec![];
    // Trades: layers not asked to pay again (moved up by a kept trade, or the payer of a
    // trade measured worse).
    let mut tabu: Vec<usize> = vec![];
    let layer_nmse = |l: usize, c: usize| problem.profile.layers[l].nmse[c];
    let mut order: Vec<usize> = (0..problem.layers()).collect();
    order.sort_by(|&a, &b| layer_nmse(b, best.choice[b]).total_cmp(&layer_nmse(a, best.choice[a])));
    let mut measured = 0;
    for l in order {
        if measured >= trials {
            break;
        }
        let (sol, origin) = if from_knapsack {
            let Some(c) = protect(problem, best.choice[l]) else {
                continue;
            };
            let mut tried = pins.clone();
            tried.push((l, c));
            let Ok(sol) = search::optimal_pinned(problem, budget, opts, &tried) else {
                continue;
            };
            (sol, Origin::Pins(tried))
        } else {
            let Some((choice, origin)) = trade(problem, budget, &best.choice, l, &tabu) else {
                continue;
            };
            (search::solution(problem, Method::Optimal, choice), origin)
        };
        if log.iter().any(|t| t.choice == sol.choice) {
            continue;
        }
        let (loss, accepted) = run_trial(
            &sol,
            origin.clone(),
            best_loss,
            &mut measure,
            &mut on_trial,
            &mut log,
        )?;
        measured += 1;
        match &origin {
            Origin::Trade { up, .. } if accepted => tabu.push(up.0),
            Origin::Trade { down: Some(down), .. } => tabu.push(down.0),
            _ => {}
        }
        if accepted {
            best = sol;
            best_loss = loss;
            if let Origin::Pins(p) = origin {
                pins = p;
            }
        }
    }
    let kept_moves = log[starts_measured..].iter().filter(|t| t.accepted).count();
    let starts_desc: Vec<String> = log[..starts_measured]
        .iter()
        .map(|t| match &t.origin {
            Origin::Start(n) => format!("{n} {:.5}", t.loss),
            _ => unreachable!("starts come first"),
        })
        .collect();
    best.method = Method::Optimal;
    best.edge_llm = None;
    best.notes.push(format!(
        "optimal: refined by measurement ({} policies compressed and measured): starts {}; best start {start_name}, \
         then {} {} move(s) kept of {measured}: loss {best_loss:.5}",
        log.len(),
        starts_desc.join(", "),
        kept_moves,
        if from_knapsack { "pin" } else { "trade" },
    ));
    if from_knapsack && !pins.is_empty() {
        best.notes.push(format!("optimal: pins {pins:?}"));
    }
    Ok((best, log))
}
