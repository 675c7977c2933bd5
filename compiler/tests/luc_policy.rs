//! Policy search (`edgec::luc::search`) and `edgec policy`: the knapsack against brute force,
//! the edge-llm formula, optimal vs the other methods, infeasible budgets, the CLI.

use std::process::{Command, Output};

use edge_runtime::format::{QuantScheme, SparsePattern};
use edgec::luc::budget::Budget;
use edgec::luc::candidate::Candidate;
use edgec::luc::policy::Policy;
use edgec::luc::search::{self, Method, Objective, Options, Problem, knapsack};
use edgec::luc::sensitivity::{Calibration, EndToEnd, LayerSensitivity, LinearSensitivity, Sensitivity};

/// splitmix64: a small deterministic generator for random instances.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn cand(bits: u8, sparsity: f64) -> Candidate {
    Candidate {
        bits,
        group: 32,
        scheme: QuantScheme::Asym,
        sparsity,
        pattern: SparsePattern::Unstructured,
    }
}

fn nm(bits: u8, n: u8, m: u8) -> Candidate {
    Candidate {
        bits,
        group: 32,
        scheme: QuantScheme::Sym,
        sparsity: 1.0 - n as f64 / m as f64,
        pattern: SparsePattern::NofM { n, m },
    }
}

/// A profile with layer `l` made of the linears `shapes[l]` and the given nmse table.
fn profile(candidates: Vec<Candidate>, shapes: &[Vec<(usize, usize)>], nmse: &[Vec<f64>]) -> Sensitivity {
    Sensitivity {
        model: "hand-made".into(),
        calibration: Calibration {
            file: "train.txt".into(),
            samples: 4,
            seq: 16,
        },
        quantizer: "rtn".into(),
        pruner: "magnitude".into(),
        candidates,
        layers: shapes
            .iter()
            .zip(nmse)
            .enumerate()
            .map(|(i, (sh, n))| LayerSensitivity {
                layer: i,
                params: sh.iter().map(|(r, c)| r * c).sum(),
                nmse: n.clone(),
                linears: sh
                    .iter()
                    .enumerate()
                    .map(|(j, &(rows, cols))| LinearSensitivity {
                        name: format!("lin{j}"),
                        rows,
                        cols,
                        nmse: n.clone(),
                    })
                    .collect(),
            })
            .collect(),
        base_loss: 3.0,
        end_to_end: vec![],
        context: None,
    }
}

/// Brute force over every policy: the least error among those the budget admits.
fn brute_force(problem: &Problem, budget: &Budget) -> Option<(f64, Vec<usize>)> {
    brute_force_pinned(problem, budget, &[])
}

/// Brute force over the policies that give each pinned layer its pinned candidate.
fn brute_force_pinned(
    problem: &Problem,
    budget: &Budget,
    pins: &[(usize, usize)],
) -> Option<(f64, Vec<usize>)> {
    let (nl, nc) = (problem.layers(), problem.candidates());
    let mut best: Option<(f64, Vec<usize>)> = None;
    for code in 0..nc.pow(nl as u32) {
        let choice: Vec<usize> = (0..nl).map(|l| code / nc.pow(l as u32) % nc).collect();
        if pins.iter().any(|&(l, c)| choice[l] != c) {
            continue;
        }
        let (err, usage) = problem.evaluate(&choice);
        if budget.admits(&usage) && best.as_ref().is_none_or(|b| err < b.0) {
            best = Some((err, choice));
        }
    }
    best
}

const POOL: [(u8, f64); 10] = [
    (2, 0.0),
    (3, 0.0),
    (4, 0.0),
    (8, 0.0),
    (2, 0.3),
    (3, 0.1),
    (4, 0.5),
    (8, 0.7),
    (4, 0.2),
    (3, 0.5),
];

fn random_instance(rng: &mut Rng, layers: usize, cands: usize) -> Sensitivity {
    let mut candidates: Vec<Candidate> = Vec::new();
    while candidates.len() < cands {
        let c = if rng.below(6) == 0 {
            nm([2, 3, 4, 8][rng.below(4) as usize], 2, 4)
        } else {
            let (b, s) = POOL[rng.below(POOL.len() as u64) as usize];
            cand(b, s)
        };
        if !candidates.contains(&c) {
            candidates.push(c);
        }
    }
    let shapes: Vec<Vec<(usize, usize)>> = (0..layers)
        .map(|_| {
            (0..2)
                .map(|_| {
                    (
                        [8, 16, 24][rng.below(3) as usize],
                        [32, 64, 96][rng.below(3) as usize],
                    )
                })
                .collect()
        })
        .collect();
    let nmse: Vec<Vec<f64>> = (0..layers)
        .map(|_| (0..cands).map(|_| rng.unit()).collect())
        .collect();
    profile(candidates, &shapes, &nmse)
}

/// Budgets around a random policy's usage (so most are feasible and bind), single and combined.
fn random_budgets(rng: &mut Rng, problem: &Problem) -> Vec<Budget> {
    let choice: Vec<usize> = (0..problem.layers())
        .map(|_| rng.below(problem.candidates() as u64) as usize)
        .collect();
    let (_, u) = problem.evaluate(&choice);
    let bits = (u.bits() * 100.0).round() / 100.0 + 0.01 * (rng.below(30) as f64 - 10.0);
    let sparsity = ((u.sparsity() * 100.0).round() / 100.0 - 0.01 * rng.below(10) as f64).clamp(0.0, 0.9);
    let bytes = (u.bytes.unwrap() as f64 * (0.9 + 0.2 * rng.unit())) as u64;
    let b = |bits: Option<f64>, sparsity: Option<f64>, bytes: Option<u64>| Budget {
        bits,
        sparsity,
        bytes,
    };
    vec![
        b(Some(bits.max(0.5)), None, None),
        b(None, Some(sparsity), None),
        b(None, None, Some(bytes)),
        b(Some(bits.max(0.5)), Some(sparsity), None),
        b(Some(bits.max(0.5)), None, Some(bytes)),
        b(Some(bits.max(0.5)), Some(sparsity), Some(bytes)),
    ]
}

#[test]
fn knapsack_returns_the_brute_force_optimum() {
    let mut rng = Rng(7);
    let (mut feasible, mut infeasible, mut inexact) = (0, 0, 0);
    for _ in 0..60 {
        let prof = random_instance(&mut rng, 5, 4);
        let problem = Problem::new(&prof, Objective::Nmse).unwrap();
        for budget in random_budgets(&mut rng, &problem) {
            let brute = brute_force(&problem, &budget);
            let got = search::search(&problem, &budget, Method::Optimal, &Options::default());
            match (brute, got) {
                (None, Err(_)) => infeasible += 1,
                (None, Ok(s)) => panic!("budget {budget}: brute force finds nothing, search found {s:?}"),
                (Some((e, c)), Err(msg)) => {
                    panic!("budget {budget}: search failed ({msg}) but {c:?} has error {e}")
                }
                (Some((e, c)), Ok(s)) => {
                    feasible += 1;
                    assert!(budget.admits(&s.usage), "budget {budget}: {s:?} is over budget");
                    assert!(
                        (s.error - e).abs() <= 1e-12,
                        "budget {budget}: optimal {} ({:?}) vs brute force {e} ({c:?})",
                        s.error,
                        s.choice
                    );
                    let lb = s.lower_bound.unwrap();
                    if lb < s.error {
                        inexact += 1;
                    }
                    assert!(lb <= e + 1e-12);
                }
            }
        }
    }
    // The instances exercise both outcomes, and small instances are solved exactly.
    assert!(
        feasible > 200 && infeasible >= 5,
        "feasible {feasible}, infeasible {infeasible}"
    );
    assert_eq!(inexact, 0);
}

#[test]
fn coarse_knapsack_is_feasible_and_brackets_the_optimum() {
    let mut rng = Rng(11);
    let mut gaps = 0;
    for _ in 0..40 {
        let prof = random_instance(&mut rng, 5, 4);
        let problem = Problem::new(&prof, Objective::Nmse).unwrap();
        for budget in random_budgets(&mut rng, &problem) {
            let Some((opt, _)) = brute_force(&problem, &budget) else {
                continue;
            };
            let opts = Options {
                max_states: 16,
                ..Options::default()
            };
            match search::search(&problem, &budget, Method::Optimal, &opts) {
                Ok(s) => {
                    assert!(budget.admits(&s.usage), "budget {budget}: over budget");
                    let lb = s.lower_bound.unwrap();
                    assert!(
                        lb <= opt + 1e-12 && opt <= s.error + 1e-12,
                        "{lb} <= {opt} <= {}",
                        s.error
                    );
                    if lb < s.error {
                        gaps += 1;
                        assert!(s.notes.iter().any(|n| n.contains("gap")), "{:?}", s.notes);
                    }
                }
                // Too coarse to find a feasible policy: allowed, and it must say so.
                Err(e) => assert!(e.contains("--max-states"), "{e}"),
            }
        }
    }
    assert!(gaps > 0, "the coarse table should be inexact somewhere");
}

#[test]
fn optimal_is_never_worse_than_uniform_or_edge_llm() {
    let mut rng = Rng(3);
    let mut compared = 0;
    for _ in 0..40 {
        let prof = random_instance(&mut rng, 5, 4);
        let problem = Problem::new(&prof, Objective::Nmse).unwrap();
        for budget in random_budgets(&mut rng, &problem) {
            let run = |m| search::search(&problem, &budget, m, &Options::default());
            let (opt, uni, edge) = (run(Method::Optimal), run(Method::Uniform), run(Method::EdgeLlm));
            for other in [&uni, &edge].into_iter().flatten() {
                let o = opt
                    .as_ref()
                    .expect("optimal finds a policy whenever another method does");
                assert!(
                    budget.admits(&other.usage),
                    "{} over budget {budget}",
                    other.method
                );
                assert!(
                    o.error <= other.error + 1e-12,
                    "{budget}: optimal {} > {} {}",
                    o.error,
                    other.method,
                    other.error
                );
                compared += 1;
            }
            // Uniform is the best single candidate that fits.
            if let Ok(u) = &uni {
                let best = (0..problem.candidates())
                    .map(|c| problem.evaluate(&vec![c; problem.layers()]))
                    .filter(|(_, us)| budget.admits(us))
                    .map(|(e, _)| e)
                    .fold(f64::INFINITY, f64::min);
                assert_eq!(u.error, best);
                assert!(u.choice.iter().all(|&c| c == u.choice[0]));
            }
        }
    }
    assert!(compared > 150, "{compared}");
}

/// Four equal layers; candidates 8b and 4b at sparsity 0, .2, .4, .6.
fn edge_profile() -> Sensitivity {
    let candidates = vec![
        cand(8, 0.0),
        cand(8, 0.2),
        cand(8, 0.4),
        cand(8, 0.6),
        cand(4, 0.0),
        cand(4, 0.2),
        cand(4, 0.4),
        cand(4, 0.6),
    ];
    let nmse = vec![
        vec![0.001, 0.05, 0.1, 0.15, 0.010, 0.06, 0.11, 0.16],
        vec![0.003, 0.15, 0.3, 0.45, 0.030, 0.18, 0.33, 0.48],
        vec![0.001, 0.25, 0.5, 0.75, 0.010, 0.26, 0.51, 0.76],
        vec![0.003, 0.45, 0.9, 1.35, 0.030, 0.48, 0.93, 1.38],
    ];
    profile(candidates, &vec![vec![(32, 64)]; 4], &nmse)
}

#[test]
fn edge_llm_reproduces_the_published_formula() {
    let prof = edge_profile();
    let problem = Problem::new(&prof, Objective::Nmse).unwrap();
    let budget = Budget::parse("bits=6,sparsity=0.3").unwrap();
    let s = search::search(&problem, &budget, Method::EdgeLlm, &Options::default()).unwrap();
    let d = s.edge_llm.as_ref().unwrap();
    // m_i: mean nmse of the 8-bit sparse candidates (1, 2, 3); min-max scaled.
    let m: Vec<f64> = prof
        .layers
        .iter()
        .map(|l| (l.nmse[1] + l.nmse[2] + l.nmse[3]) / 3.0)
        .collect();
    for (a, b) in d.pruning_mse.iter().zip(&m) {
        assert!((a - b).abs() < 1e-12);
    }
    let (lo, hi) = (0.1, 0.9);
    let scaled: Vec<f64> = m.iter().map(|x| (x - lo) / (hi - lo)).collect();
    let denom: f64 = scaled.iter().map(|s| 1.0 - s).sum();
    assert!((d.p - 0.3).abs() < 1e-12);
    for (i, t) in d.target_sparsity.iter().enumerate() {
        let want = 4.0 * 0.3 * (1.0 - scaled[i]) / denom;
        assert!((t - want).abs() < 1e-12, "layer {i}: {t} vs {want}");
    }
    // [0.533, 0.4, 0.267, 0]: mean exactly P.
    assert!((d.target_sparsity.iter().sum::<f64>() / 4.0 - 0.3).abs() < 1e-12);
    // Quantization: layers 1 and 3 have dense nmse above the mean -> high bits (8), others base 4.
    assert_eq!(d.high, vec![false, true, false, true]);
    assert_eq!((d.base_bits, d.high_bits), (4, 8));
    // Snapped: 4b s0.6, 8b s0.4, 4b s0.2, 8b dense.
    assert_eq!(s.choice, vec![7, 2, 5, 0]);
    assert!((s.usage.bits() - 6.0).abs() < 1e-12 && (s.usage.sparsity() - 0.3).abs() < 1e-9);
    assert!(s.notes.iter().any(|n| n.contains("snapped")), "{:?}", s.notes);

    // Sparsity 0.32: snapping at P = 0.32 and 0.33 gives 0.3, so P is raised to 0.34.
    let budget = Budget::parse("bits=6,sparsity=0.32").unwrap();
    let s = search::search(&problem, &budget, Method::EdgeLlm, &Options::default()).unwrap();
    let d = s.edge_llm.as_ref().unwrap();
    assert!((d.p - 0.34).abs() < 1e-9, "P = {}", d.p);
    assert_eq!(s.choice, vec![7, 2, 6, 0]);
    assert!(
        s.notes.iter().any(|n| n.contains("raised from 0.32")),
        "{:?}",
        s.notes
    );

    // Optimal does at least as well on both budgets.
    for spec in [
        "bits=6,sparsity=0.3",
        "bits=6,sparsity=0.32",
        "bits=5",
        "sparsity=0.4",
    ] {
        let b = Budget::parse(spec).unwrap();
        let run = |m| {
            search::search(&problem, &b, m, &Options::default())
                .unwrap()
                .error
        };
        assert!(run(Method::Optimal) <= run(Method::EdgeLlm) + 1e-12, "{spec}");
        assert!(run(Method::Optimal) <= run(Method::Uniform) + 1e-12, "{spec}");
    }
}

#[test]
fn infeasible_budgets_say_what_is_achievable() {
    let prof = edge_profile();
    let problem = Problem::new(&prof, Objective::Nmse).unwrap();
    let err = |spec: &str, m| {
        search::search(&problem, &Budget::parse(spec).unwrap(), m, &Options::default()).unwrap_err()
    };
    for m in [Method::Optimal, Method::EdgeLlm, Method::Uniform] {
        let e = err("bits=3.5", m);
        assert!(
            e.contains("lowest average bit-width this grid allows is 4.0000"),
            "{e}"
        );
        let e = err("sparsity=0.7", m);
        assert!(
            e.contains("highest overall sparsity this grid allows is 0.6000"),
            "{e}"
        );
        let e = err("bytes=100", m);
        assert!(e.contains("smallest policy on this grid takes"), "{e}");
    }
    // Fewer bytes than the smallest policy allows.
    let min_bytes_4b_dense: u64 = 4 * cand(4, 0.0).estimated_bytes(32, 64) as u64;
    let spec = format!("bits=4,bytes={}", min_bytes_4b_dense / 2);
    let e = err(&spec, Method::Optimal);
    assert!(e.contains("cannot be met"), "{e}");
    // Joint infeasibility that each constraint alone would allow.
    let joint = profile(
        vec![cand(2, 0.0), cand(8, 0.5)],
        &[vec![(8, 32)], vec![(8, 32)]],
        &[vec![0.5, 0.1], vec![0.5, 0.1]],
    );
    let p = Problem::new(&joint, Objective::Nmse).unwrap();
    let e = search::search(
        &p,
        &Budget::parse("bits=2,sparsity=0.5").unwrap(),
        Method::Optimal,
        &Options::default(),
    )
    .unwrap_err();
    assert!(e.contains("not all of them at once"), "{e}");
    // A budget only mixing can meet (one layer each): uniform says so, optimal meets it.
    let b = Budget::parse("bits=5,sparsity=0.25").unwrap();
    let e = search::search(&p, &b, Method::Uniform, &Options::default()).unwrap_err();
    assert!(e.contains("no single candidate"), "{e}");
    let s = search::search(&p, &b, Method::Optimal, &Options::default()).unwrap();
    assert!(s.choice == vec![0, 1] || s.choice == vec![1, 0], "{:?}", s.choice);
}

#[test]
fn inconsistent_profiles_are_rejected() {
    let mut p = edge_profile();
    p.layers[2].params += 1;
    assert!(
        Problem::new(&p, Objective::Nmse)
            .unwrap_err()
            .contains("layer 2: its linears hold 2048 weights")
    );
    let mut p = edge_profile();
    p.layers[1].nmse[3] = f64::NAN;
    assert!(
        Problem::new(&p, Objective::Nmse)
            .unwrap_err()
            .contains("layer 1: nmse of candidate 3")
    );
    let mut p = edge_profile();
    p.layers[3].linears.clear();
    let problem = Problem::new(&p, Objective::Nmse).unwrap();
    let e = search::search(
        &problem,
        &Budget::parse("bytes=1MB").unwrap(),
        Method::Optimal,
        &Options::default(),
    )
    .unwrap_err();
    assert!(e.contains("layer 3 of the profile has no `linears`"), "{e}");
    let mut p = edge_profile();
    p.end_to_end.push(EndToEnd {
        layer: 9,
        candidate: 0,
        loss_delta: 0.1,
    });
    assert!(
        Problem::new(&p, Objective::Nmse)
            .unwrap_err()
            .contains("end_to_end entry (layer 9")
    );
}

/// [`edge_profile`] with end-to-end deltas at candidates 3 and 7 of layers 0 and 2: 10x and
/// 1x the linear nmse.
fn profile_with_gains() -> Sensitivity {
    let mut p = edge_profile();
    for (layer, g) in [(0, 10.0), (2, 1.0)] {
        for c in [3, 7] {
            let n = p.layers[layer].linears[0].nmse[c];
            p.end_to_end.push(EndToEnd {
                layer,
                candidate: c,
                loss_delta: g * n,
            });
        }
    }
    p
}

#[test]
fn loss_fit_objective_scales_linear_nmse_by_fitted_gains() {
    // Layer 0's linear nmse costs 10x in loss, layer 2's 1x; layers 1 and 3 are not measured.
    let p = profile_with_gains();
    assert_eq!(p.layers.len(), 4);
    let problem = Problem::new(&p, Objective::LossFit).unwrap();
    // Layer 1 is interpolated between its neighbours, layer 3 takes the last measured gain.
    let want = [10.0, 5.5, 1.0, 1.0];
    for (g, x) in problem.gains.iter().zip(want) {
        assert!((g - x).abs() < 1e-9, "{:?}", problem.gains);
    }
    let linear = Problem::new(&p, Objective::LinearNmse).unwrap();
    for (l, g) in want.iter().enumerate() {
        for c in 0..p.candidates.len() {
            let (a, b) = (problem.error(l, c), g * linear.error(l, c));
            assert!(
                (a - b).abs() <= 1e-12 * b.abs().max(1e-30),
                "layer {l} candidate {c}: {a} vs {b}"
            );
        }
    }
    // Without deltas it is refused, naming the profile option that provides them.
    let err = Problem::new(&edge_profile(), Objective::LossFit).unwrap_err();
    assert!(err.contains("--e2e-layers all"), "{err}");
    // With its gain of 10, layer 0 is pruned less than when every layer counts alike.
    assert_layer0_pruned_less(&p, &problem, &linear);
}

#[test]
fn loss_measured_objective_uses_measurements_where_it_has_them() {
    let mut p = profile_with_gains();
    // Another run on the same samples measured layer 1 at candidate 5 (twice) and a
    // candidate this grid does not have.
    let mut other = edge_profile();
    other.candidates.push(cand(2, 0.0));
    for layer in &mut other.layers {
        layer.nmse.push(1.0);
        layer.linears.iter_mut().for_each(|k| k.nmse.push(1.0));
    }
    for delta in [0.02, 0.04] {
        other.end_to_end.push(EndToEnd {
            layer: 1,
            candidate: 5,
            loss_delta: delta,
        });
    }
    other.end_to_end.push(EndToEnd {
        layer: 1,
        candidate: 8,
        loss_delta: 9.0,
    });
    assert_eq!(p.merge_end_to_end(&other).unwrap(), 2);
    let measured = Problem::new(&p, Objective::LossMeasured).unwrap();
    let fitted = Problem::new(&p, Objective::LossFit).unwrap();
    assert!(
        (measured.error(1, 5) - 0.03).abs() < 1e-12,
        "{}",
        measured.error(1, 5)
    );
    assert!((measured.error(0, 3) - 10.0 * p.layers[0].linears[0].nmse[3]).abs() < 1e-12);
    assert_eq!(measured.error(3, 6), fitted.error(3, 6));
    assert_ne!(measured.error(1, 5), fitted.error(1, 5));
    // A profile of other samples is refused.
    let mut stranger = edge_profile();
    stranger.base_loss += 0.5;
    let err = p.merge_end_to_end(&stranger).unwrap_err();
    assert!(err.contains("other calibration samples"), "{err}");
}

#[test]
fn loss_weighted_objective_fits_per_layer_weights() {
    let mut p = edge_profile();
    // Layer 0's nmse costs 10x in loss, layers 1..3 cost 1x; layer 3 has no measurement.
    for (layer, w) in [(0, 10.0), (1, 1.0), (2, 1.0)] {
        for c in [3, 7] {
            let n = p.layers[layer].nmse[c];
            p.end_to_end.push(EndToEnd {
                layer,
                candidate: c,
                loss_delta: w * n,
            });
        }
    }
    let problem = Problem::new(&p, Objective::LossWeighted).unwrap();
    let want = [10.0, 1.0, 1.0, 4.0];
    for (w, x) in problem.weights.iter().zip(want) {
        assert!((w - x).abs() < 1e-9, "{:?}", problem.weights);
    }
    // Without deltas the objective is refused.
    assert!(Problem::new(&edge_profile(), Objective::LossWeighted).is_err());
    // Weighted, layer 0 is protected: it is pruned less than unweighted.
    let plain = Problem::new(&p, Objective::Nmse).unwrap();
    assert_layer0_pruned_less(&p, &problem, &plain);
}

/// At `sparsity=0.3`, `optimal` under `weighted` prunes layer 0 less than under `plain`.
fn assert_layer0_pruned_less(p: &Sensitivity, weighted: &Problem, plain: &Problem) {
    let b = Budget::parse("sparsity=0.3").unwrap();
    let s = search::search(weighted, &b, Method::Optimal, &Options::default()).unwrap();
    let u = search::search(plain, &b, Method::Optimal, &Options::default()).unwrap();
    assert!(
        p.candidates[s.choice[0]].sparsity < p.candidates[u.choice[0]].sparsity,
        "{:?} vs {:?}",
        s.choice,
        u.choice
    );
}

#[test]
fn knapsack_edge_cases() {
    // No binding resource: each group's least-error item.
    let error = vec![vec![3.0, 1.0], vec![0.5, 2.0]];
    let cost = vec![vec![vec![1], vec![2]], vec![vec![1], vec![2]]];
    let k = knapsack(&error, &cost, &[10], 1 << 10).unwrap().unwrap();
    assert_eq!((k.choice, k.error, k.exact), (vec![1, 0], 1.5, true));
    // Cheapest choices exceed the cap: infeasible.
    assert!(knapsack(&error, &cost, &[1], 1 << 10).unwrap().is_none());
    // Exactly at the cap.
    let k = knapsack(&error, &cost, &[3], 1 << 10).unwrap().unwrap();
    assert_eq!(k.choice, vec![1, 0]);
}

// ---- the CLI ----

fn edgec(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_edgec"))
        .args(args)
        .output()
        .expect("run edgec")
}

fn write_profile(dir: &std::path::Path, p: &Sensitivity) -> String {
    let path = dir.join("sensitivity.json");
    std::fs::write(&path, serde_json::to_string_pretty(p).unwrap()).unwrap();
    path.to_str().unwrap().to_string()
}

#[test]
fn cli_writes_a_policy_and_reports_it() {
    let dir = tempfile::tempdir().unwrap();
    let prof = write_profile(dir.path(), &edge_profile());
    let out = dir.path().join("policy.toml");
    let o = edgec(&[
        "policy",
        "--profile",
        &prof,
        "--budget",
        "bits=6,sparsity=0.3",
        "--method",
        "edge-llm",
        "-o",
        out.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for want in [
        "layer",
        "4b-g32-asym-s0.60",
        "8b-g32-asym-s0.40",
        "predicted error 7.230000e-1",
        "average bits 6.0000, sparsity 0.3000",
        "bytes ",
    ] {
        assert!(stdout.contains(want), "stdout lacks `{want}`:\n{stdout}");
    }
    let policy = Policy::load(&out, Some(4)).unwrap();
    assert_eq!(policy.method, "edge-llm");
    assert_eq!(policy.budget, Budget::parse("bits=6,sparsity=0.3").unwrap());
    let bits: Vec<u8> = policy.layers.iter().map(|l| l.candidate.bits).collect();
    assert_eq!(bits, vec![4, 8, 4, 8]);
    assert_eq!(policy.layers[0].pruner.as_deref(), Some("magnitude"));
    assert_eq!(policy.layers[3].pruner, None);

    // --json, optimal.
    let o = edgec(&[
        "policy",
        "--profile",
        &prof,
        "--budget",
        "bits=6,sparsity=0.3",
        "--objective",
        "nmse",
        "-o",
        out.to_str().unwrap(),
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["method"], "optimal");
    assert_eq!(v["objective"], "nmse");
    assert_eq!(v["layers"].as_array().unwrap().len(), 4);
    assert!(v["predicted_error"].as_f64().unwrap() <= 0.723 + 1e-12);
    assert_eq!(v["predicted_error"], v["lower_bound"]);
    assert!(v["bits"].as_f64().unwrap() <= 6.0 && v["sparsity"].as_f64().unwrap() >= 0.3 - 1e-12);
    assert!(v["bytes"].as_u64().unwrap() > 0);
    assert_eq!(Policy::load(&out, Some(4)).unwrap().method, "optimal");
}

fn assert_fails(o: &Output, code: i32, want: &[&str]) {
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(code), "stderr: {e}");
    assert!(!e.contains("panicked"), "{e}");
    for w in want {
        assert!(e.contains(w), "stderr lacks `{w}`: {e}");
    }
}

#[test]
fn cli_bad_input_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let prof = write_profile(dir.path(), &edge_profile());
    let out = dir.path().join("p.toml");
    let out = out.to_str().unwrap();
    let run =
        |profile: &str, budget: &str| edgec(&["policy", "--profile", profile, "--budget", budget, "-o", out]);
    assert_fails(
        &run(&prof, "bits=3"),
        1,
        &[
            "cannot be met",
            "lowest average bit-width this grid allows is 4.0000",
        ],
    );
    assert_fails(
        &run(&prof, "bits=4,sparsity=0.9"),
        1,
        &["highest overall sparsity this grid allows is 0.6000"],
    );
    assert_fails(&run(&prof, "bitz=4"), 2, &["unknown key `bitz`"]);
    assert_fails(&run(&prof, "bytes=60QB"), 2, &["unknown byte unit `QB`"]);
    let missing = dir.path().join("nope.json");
    assert_fails(
        &run(missing.to_str().unwrap(), "bits=4"),
        1,
        &["reading", "nope.json"],
    );
    let bad = dir.path().join("bad.json");
    let mut p = edge_profile();
    p.layers[1].nmse.pop();
    std::fs::write(&bad, serde_json::to_string(&p).unwrap()).unwrap();
    assert_fails(
        &run(bad.to_str().unwrap(), "bits=4"),
        1,
        &["bad.json", "layer 1: 7 nmse values for 8 candidates"],
    );
    let mut p = edge_profile();
    p.layers[0].params = 5;
    std::fs::write(&bad, serde_json::to_string(&p).unwrap()).unwrap();
    assert_fails(
        &run(bad.to_str().unwrap(), "bits=4"),
        1,
        &["layer 0: its linears hold 2048 weights but params says 5"],
    );
    std::fs::write(&bad, "{\"model\": 1}").unwrap();
    assert_fails(
        &run(bad.to_str().unwrap(), "bits=4"),
        1,
        &["not a sensitivity profile"],
    );
    let o = edgec(&[
        "policy",
        "--profile",
        &prof,
        "--budget",
        "bits=4",
        "--objective",
        "loss-weighted",
        "-o",
        out,
    ]);
    assert_fails(&o, 1, &["loss-weighted needs end_to_end loss deltas"]);
    assert!(
        !std::path::Path::new(out).exists(),
        "no policy is written on failure"
    );
}

/// The default objective weighs each layer's linears' own output error (parameter-weighted
/// mean), not the layer-output error that the residual stream shrinks.
#[test]
fn linear_nmse_objective_averages_the_linears() {
    use edgec::luc::search::{Objective, Problem};
    use edgec::luc::sensitivity::{LinearSensitivity, Sensitivity};
    let text = r#"{"model":"m","calibration":{"file":"f","samples":1,"seq":2},"quantizer":"rtn","pruner":"magnitude",
      "candidates":[{"bits":4,"group":32,"scheme":"asym","sparsity":0.0,"pattern":{"kind":"unstructured"}},
                    {"bits":2,"group":32,"scheme":"asym","sparsity":0.0,"pattern":{"kind":"unstructured"}}],
      "layers":[{"layer":0,"params":96,"nmse":[0.001,0.002],"linears":[]}],"base_loss":1.0,"end_to_end":[]}"#;
    let mut p = Sensitivity::from_json(text).unwrap();
    p.layers[0].linears = vec![
        LinearSensitivity {
            name: "q_proj".into(),
            rows: 2,
            cols: 32,
            nmse: vec![0.1, 0.4],
        },
        LinearSensitivity {
            name: "down_proj".into(),
            rows: 1,
            cols: 32,
            nmse: vec![0.4, 1.0],
        },
    ];
    let prob = Problem::new(&p, Objective::LinearNmse).unwrap();
    assert!((prob.error(0, 0) - (2.0 / 3.0 * 0.1 + 1.0 / 3.0 * 0.4)).abs() < 1e-12);
    assert!((prob.error(0, 1) - (2.0 / 3.0 * 0.4 + 1.0 / 3.0 * 1.0)).abs() < 1e-12);
    let nmse = Problem::new(&p, Objective::Nmse).unwrap();
    assert_eq!(nmse.error(0, 1), 0.002);
}

#[test]
fn pinned_knapsack_is_the_brute_force_optimum_around_its_pins() {
    let mut rng = Rng(11);
    let mut checked = 0;
    for _ in 0..40 {
        let p = random_instance(&mut rng, 4, 4);
        let problem = Problem::new(&p, Objective::Nmse).unwrap();
        for budget in random_budgets(&mut rng, &problem) {
            let pins = vec![(rng.below(4) as usize, rng.below(4) as usize)];
            let want = brute_force_pinned(&problem, &budget, &pins).map(|b| b.0);
            match search::optimal_pinned(&problem, &budget, &Options::default(), &pins) {
                Ok(s) => {
                    assert!(budget.admits(&s.usage), "pinned optimum breaks {budget}");
                    assert_eq!(s.choice[pins[0].0], pins[0].1, "the pin is not kept");
                    let want = want.expect("brute force finds a policy too");
                    if s.lower_bound == Some(s.error) {
                        assert!(
                            (s.error - want).abs() <= 1e-9 * want.max(1.0),
                            "{} vs {want}",
                            s.error
                        );
                        checked += 1;
                    }
                }
                Err(_) => assert!(want.is_none(), "knapsack finds nothing, brute force {want:?}"),
            }
        }
    }
    assert!(checked > 50, "only {checked} exact pinned instances");
}

/// A true loss the per-layer prediction does not see: the predicted error plus a large
/// penalty whenever layer 0 is pruned (its damage compounds in the layers above).
fn compounding_loss(p: &Sensitivity, choice: &[usize]) -> f64 {
    let predicted: f64 = choice.iter().enumerate().map(|(l, &c)| p.layers[l].nmse[c]).sum();
    predicted
        + if p.candidates[choice[0]].sparsity > 0.0 {
            10.0
        } else {
            0.0
        }
}

#[test]
fn measured_refinement_finds_what_the_prediction_misses_and_keeps_only_gains() {
    use edgec::luc::refine;
    let cands = vec![cand(3, 0.0), cand(3, 0.5), cand(4, 0.0), cand(4, 0.5)];
    let shapes = vec![vec![(16, 32)]; 5];
    // Layer 0 is the cheapest to prune by the profile, so the knapsack prunes it.
    let nmse: Vec<Vec<f64>> = (0..5)
        .map(|l| {
            let k = if l == 0 { 0.1 } else { 1.0 + l as f64 * 0.1 };
            vec![0.2 * k, 1.0 * k, 0.1 * k, 0.8 * k]
        })
        .collect();
    // Layer-output nmse ranks layer 0 first (it is what the refinement visits first).
    let mut p = profile(cands, &shapes, &nmse);
    p.layers[0].nmse = vec![5.0, 9.0, 4.0, 8.0];
    for l in &mut p.layers[1..] {
        l.linears[0].nmse = l.nmse.clone();
    }
    let problem = Problem::new(&p, Objective::LinearNmse).unwrap();
    let budget = Budget::parse("bits=3.4,sparsity=0.2").unwrap();
    let opts = Options::default();
    let start = search::search(&problem, &budget, Method::Optimal, &opts).unwrap();
    assert!(
        p.candidates[start.choice[0]].sparsity > 0.0,
        "the knapsack alone prunes layer 0"
    );
    let start_loss = compounding_loss(&p, &start.choice);
    let mut seen = vec![];
    let (kept, trials) = refine::refine(
        &problem,
        &budget,
        &opts,
        vec![("optimal".into(), start)],
        3,
        |choice| Ok(compounding_loss(&p, choice)),
        |t| seen.push(t.loss),
    )
    .unwrap();
    assert_eq!(seen.len(), trials.len());
    assert!(
        trials.len() >= 2 && trials.len() <= 4,
        "{} trials for 3 moves",
        trials.len()
    );
    assert_eq!(
        p.candidates[kept.choice[0]].sparsity, 0.0,
        "refinement keeps layer 0 dense"
    );
    assert!(budget.admits(&kept.usage));
    let kept_loss = compounding_loss(&p, &kept.choice);
    assert!(kept_loss < start_loss - 5.0, "{kept_loss} vs {start_loss}");
    // The kept policy is the best measured one, and every trial meets the budget.
    let best = trials.iter().map(|t| t.loss).fold(f64::INFINITY, f64::min);
    assert_eq!(kept_loss, best);
    let mut running = f64::INFINITY;
    for t in &trials {
        assert!(budget.admits(&problem.evaluate(&t.choice).1));
        assert_eq!(
            t.accepted,
            t.loss < running,
            "a trial is kept exactly when it beats the best so far"
        );
        running = running.min(t.loss);
    }
    // A failing measurement is an error, not a silently kept policy.
    let start = search::search(&problem, &budget, Method::Optimal, &opts).unwrap();
    let err = refine::refine(
        &problem,
        &budget,
        &opts,
        vec![("optimal".into(), start)],
        2,
        |_| anyhow::bail!("disk full"),
        |_| {},
    )
    .unwrap_err();
    assert!(err.to_string().contains("disk full"));
}

#[test]
fn refinement_starts_from_the_best_measured_start_and_trades_within_the_budget() {
    use edgec::luc::refine::{self, Origin};
    let cands = vec![
        cand(3, 0.0),
        cand(3, 0.3),
        cand(3, 0.5),
        cand(3, 0.7),
        cand(4, 0.0),
    ];
    let shapes = vec![vec![(16, 32)]; 5];
    let nmse: Vec<Vec<f64>> = (0..5)
        .map(|l| {
            let k = 1.0 + l as f64 * 0.1;
            vec![0.2 * k, 0.5 * k, 1.0 * k, 1.2 * k, 0.1 * k]
        })
        .collect();
    let mut p = profile(cands, &shapes, &nmse);
    // Layer 0's output is damaged most, so the moves visit it first.
    p.layers[0].nmse = vec![5.0, 6.0, 9.0, 12.0, 4.0];
    for l in &mut p.layers[1..] {
        l.linears[0].nmse = l.nmse.clone();
    }
    let problem = Problem::new(&p, Objective::LinearNmse).unwrap();
    let budget = Budget::parse("bits=3,sparsity=0.5").unwrap();
    let opts = Options::default();
    let knapsack = search::search(&problem, &budget, Method::Optimal, &opts).unwrap();
    let uniform = search::search(&problem, &budget, Method::Uniform, &opts).unwrap();
    assert!(
        uniform.choice.iter().all(|&c| c == 2),
        "uniform 3-bit at 0.5 sparsity"
    );
    // The true loss punishes uneven sparsity (the knapsack's way) and pruning layer 0 hard.
    let true_loss = |choice: &[usize]| -> f64 {
        let s: Vec<f64> = choice.iter().map(|&c| p.candidates[c].sparsity).collect();
        let mean = s.iter().sum::<f64>() / s.len() as f64;
        let spread: f64 = s.iter().map(|x| (x - mean).powi(2)).sum();
        choice
            .iter()
            .enumerate()
            .map(|(l, &c)| p.layers[l].nmse[c])
            .sum::<f64>()
            * 0.1
            + 100.0 * spread.max(0.0)
            + 60.0 * s[0]
    };
    let (kept, trials) = refine::refine(
        &problem,
        &budget,
        &opts,
        vec![
            ("optimal".into(), knapsack.clone()),
            ("uniform".into(), uniform.clone()),
        ],
        4,
        |c| Ok(true_loss(c)),
        |_| {},
    )
    .unwrap();
    // Both starts measured first, in order; the knapsack's start is not the best here.
    assert_eq!(trials[0].origin, Origin::Start("optimal".into()));
    assert_eq!(trials[1].origin, Origin::Start("uniform".into()));
    assert!(
        trials[1].loss < trials[0].loss,
        "{} vs {}",
        trials[1].loss,
        trials[0].loss
    );
    // From uniform the first move trades layer 0 up (0.5 -> 0.3) against another layer's
    // step down (0.5 -> 0.7), the cheapest payer by the predicted error: the last layer is
    // not it (its nmse grows most), layer 1 is.
    assert_eq!(
        trials[2].origin,
        Origin::Trade {
            up: (0, 1),
            down: Some((1, 3))
        }
    );
    assert!(trials[2].accepted, "pruning layer 0 less pays here");
    let mut running = f64::INFINITY;
    let mut current = uniform.choice.clone();
    for t in &trials {
        assert!(
            budget.admits(&problem.evaluate(&t.choice).1),
            "trial breaks the budget"
        );
        assert_eq!(t.accepted, t.loss < running);
        running = running.min(t.loss);
        if let Origin::Trade { .. } = t.origin {
            // A trade changes at most two layers of the policy kept before it.
            let changed = t.choice.iter().zip(&current).filter(|(a, b)| a != b).count();
            assert!((1..=2).contains(&changed), "{changed} layers changed");
            if t.accepted {
                current = t.choice.clone();
            }
        }
    }
    assert_eq!(
        true_loss(&kept.choice),
        running,
        "the kept policy is the best measured"
    );
    assert_eq!(kept.method, Method::Optimal);
    assert!(running <= trials[1].loss, "never worse than the best start");
}
