//! `edgec policy`: choose a per-layer compression policy from a sensitivity profile.

use std::path::PathBuf;

use anyhow::anyhow;
use clap::{Args, ValueEnum};
use edgec::luc::budget::Budget;
use edgec::luc::measure::PolicyMeter;
use edgec::luc::policy::{LayerPolicy, Policy};
use edgec::luc::search::{self, Method, Objective, Options, Problem, Solution};
use edgec::luc::sensitivity::Sensitivity;
use edgec::luc::{calib, refine};

#[derive(Clone, Copy, ValueEnum)]
enum MethodArg {
    Optimal,
    EdgeLlm,
    Uniform,
}

#[derive(Clone, Copy, ValueEnum)]
enum ObjectiveArg {
    Nmse,
    LossWeighted,
    LinearNmse,
    LossFit,
    LossMeasured,
}

impl ObjectiveArg {
    fn name(self) -> &'static str {
        match self {
            ObjectiveArg::Nmse => "nmse",
            ObjectiveArg::LossWeighted => "loss-weighted",
            ObjectiveArg::LinearNmse => "linear-nmse",
            ObjectiveArg::LossFit => "loss-fit",
            ObjectiveArg::LossMeasured => "loss-measured",
        }
    }
}

#[derive(Args)]
#[command(
    after_help = "BUDGETS (--budget key=value[,key=value...]; every constraint given must hold)\n  \
bits=B       average quantization bit-width of the linear weights, weighted by each layer's parameter \
count, at most B (codes only: scales, minima and sparse indices count in bytes)\n  \
sparsity=S   overall fraction of pruned linear weights, weighted by parameters, at least S\n  \
bytes=N      total exact storage bytes of the compressed linear weights (codes, f16 scales/minima, \
masks or N:M indices, group padding; Candidate::estimated_bytes per linear with the profile's shapes), \
at most N; units B, KB/MB/GB (1000^k), KiB/MiB/GiB (1024^k)\n  \
e.g. --budget bits=4.5   --budget bits=4,sparsity=0.3   --budget bytes=60MB\n\n\
METHODS\n  \
optimal   multiple-choice knapsack minimizing the predicted error (sum over layers of the chosen \
candidate's nmse) under all constraints; dynamic programming, exact when the resources fit \
--max-states at their natural resolution, otherwise feasible with a proven lower bound (printed)\n  \
edge-llm  the paper's heuristic: sparsity L*P*(1-s_i)/sum(1-s_j) from min-max-scaled mean pruning nmse; \
layers above the mean quantization nmse get the high bit-width, the rest the base; (base, high) and P \
chosen so the budget holds after snapping each layer to the nearest grid candidate of its bit-width\n  \
uniform   the single grid candidate with the lowest predicted error that meets the budget on every \
layer (no mixing: bits=3.5 on a {2,3,4,8} grid gives 3 bits)\n\n\
REFINEMENT (optimal --refine N --refine-text HELD_OUT.txt)\n  \
The knapsack's predicted error adds up single-layer measurements; compressing all layers at once is not \
additive (an early layer's error reaches every layer above, which is then compressed on damaged inputs). \
--refine measures instead. Starts: it compresses the whole model by the knapsack policy and by the uniform \
and edge-llm policies for the same budget (GPTQ/SparseGPT on --samples x --seq tokens of --calib, as \
`edgec compress`) and takes each one's loss on --refine-samples x --seq tokens of --refine-text; the lowest \
is kept. Moves, for the layers in decreasing order of their layer-output nmse: from the knapsack start it \
pins the layer to its dense candidate (or, when dense, the next bit-width) and re-solves the knapsack around \
the pins; from a heuristic's start it trades: the layer one step up the grid (next lower sparsity, or next \
bit-width), the one other layer whose predicted error grows least paying for it within the budget. Each \
move is measured and kept when the loss went down. Every policy tried meets the budget. Cost: up to N+3 \
compressions."
)]
pub struct PolicyArgs {
    /// Sensitivity profile written by `edgec profile`.
    #[arg(long)]
    profile: PathBuf,
    /// Budget, e.g. bits=4.5 | bits=4,sparsity=0.3 | bytes=60MB (see below).
    #[arg(long, value_parser = Budget::parse)]
    budget: Budget,
    /// How to choose the per-layer candidates.
    #[arg(long, value_enum, default_value = "optimal")]
    method: MethodArg,
    /// Predicted error: `nmse` the sum of layer nmse; `loss-weighted` each layer's nmse
    /// weighted by a per-layer factor fitted on the profile's end-to-end loss deltas;
    /// `linear-nmse` the sum over layers of the parameter-weighted mean of the linears' own
    /// output nmse; `loss-fit` that linear nmse times a per-layer loss gain fitted on the
    /// end-to-end deltas (a predicted loss increase; profile with `--e2e-layers all`);
    /// `loss-measured` the measured end-to-end delta where the profile has one, else the
    /// `loss-fit` prediction.
    #[arg(long, value_enum, default_value = "linear-nmse")]
    objective: ObjectiveArg,
    /// Another profile of the same model and calibration whose end-to-end measurements are
    /// added to this one's (candidates matched by label); repeatable.
    #[arg(long, value_name = "PROFILE")]
    extra_e2e: Vec<PathBuf>,
    /// Refine `optimal` by measurement: after the knapsack, try up to N more policies, each
    /// the knapsack optimum with one more layer protected (kept dense, or given more bits),
    /// compress the whole model by each exactly as `edgec compress` does, and keep the one
    /// with the lowest loss on --refine-text (see REFINEMENT below). 0: no refinement.
    #[arg(long, default_value_t = 0, value_name = "N")]
    refine: usize,
    /// Refinement: the model to compress (default: the profile's `model`).
    #[arg(long, short = 'm')]
    model: Option<PathBuf>,
    /// Refinement: calibration text for GPTQ / SparseGPT (default: the profile's calibration file).
    #[arg(long)]
    calib: Option<PathBuf>,
    /// Refinement: calibration samples per compression.
    #[arg(long, default_value_t = 8)]
    samples: usize,
    /// Refinement: tokens per calibration and measurement sample.
    #[arg(long, default_value_t = 512)]
    seq: usize,
    /// Refinement: held-out text the loss is measured on (never the text you report on).
    #[arg(long, value_name = "FILE")]
    refine_text: Option<PathBuf>,
    /// Refinement: measurement samples (of --seq tokens, spread over --refine-text).
    #[arg(long, default_value_t = 16)]
    refine_samples: usize,
    /// Refinement: keep the calibration and held-out hidden states of the best policy so
    /// far at every N-th layer boundary, so that a policy departing from it at layer l is
    /// compressed and measured from the checkpoint at or below l only (same result). Each
    /// boundary holds (--samples + --refine-samples) x --seq x hidden f32 values, twice at
    /// most; a larger N saves memory and reuses less.
    #[arg(long, default_value_t = 1, value_name = "N")]
    refine_checkpoint_every: usize,
    /// Refinement: --calib and --refine-text hold token ids (whitespace-separated integers,
    /// as `edgec profile --calib-tokens` reads) instead of text.
    #[arg(long)]
    token_ids: bool,
    /// Refinement: write every measured policy as a JSON line to this file.
    #[arg(long, value_name = "FILE")]
    trials_out: Option<PathBuf>,
    /// Largest dynamic-programming table for `optimal` (states).
    #[arg(long, default_value_t = 1 << 22)]
    max_states: usize,
    /// Where to write policy.toml.
    #[arg(long, short = 'o')]
    output: PathBuf,
    /// Print a JSON object instead of the table.
    #[arg(long)]
    json: bool,
}

pub fn run(a: PolicyArgs) -> anyhow::Result<()> {
    let text = super::read_text(&a.profile)?;
    let mut profile = Sensitivity::from_json(&text).map_err(|e| anyhow!("{}: {e}", a.profile.display()))?;
    for extra in &a.extra_e2e {
        let other = Sensitivity::from_json(&super::read_text(extra)?)
            .map_err(|e| anyhow!("{}: {e}", extra.display()))?;
        let n = profile
            .merge_end_to_end(&other)
            .map_err(|e| anyhow!("--extra-e2e {}: {e}", extra.display()))?;
        tracing::info!("{}: {n} end-to-end measurements merged", extra.display());
    }
    let objective = match a.objective {
        ObjectiveArg::Nmse => Objective::Nmse,
        ObjectiveArg::LossWeighted => Objective::LossWeighted,
        ObjectiveArg::LinearNmse => Objective::LinearNmse,
        ObjectiveArg::LossFit => Objective::LossFit,
        ObjectiveArg::LossMeasured => Objective::LossMeasured,
    };
    let method = match a.method {
        MethodArg::Optimal => Method::Optimal,
        MethodArg::EdgeLlm => Method::EdgeLlm,
        MethodArg::Uniform => Method::Uniform,
    };
    if a.max_states < 2 {
        anyhow::bail!("--max-states must be at least 2");
    }
    let problem = Problem::new(&profile, objective).map_err(|e| anyhow!("{}: {e}", a.profile.display()))?;
    let opts = Options {
        objective,
        max_states: a.max_states,
    };
    let mut sol = search::search(&problem, &a.budget, method, &opts).map_err(|e| anyhow!(e))?;
    if a.refine > 0 {
        anyhow::ensure!(
            method == Method::Optimal,
            "--refine refines the `optimal` method's policy (method is {method})"
        );
        sol = refine_by_measurement(&a, &profile, &problem, &opts, sol)?;
    }
    let policy = to_policy(&profile, &a.budget, &sol);
    policy.save(&a.output).map_err(|e| anyhow!(e))?;
    if a.json {
        println!(
            "{}",
            serde_json::to_string(&report_json(&problem, &a.budget, &sol, a.objective.name()))?
        );
    } else {
        print_report(&problem, &a.budget, &sol, a.objective.name());
        println!("wrote {}", a.output.display());
    }
    Ok(())
}

/// Measured refinement (`--refine N`): see `edgec::luc::refine`.
fn refine_by_measurement(
    a: &PolicyArgs,
    profile: &Sensitivity,
    problem: &Problem,
    opts: &Options,
    start: Solution,
) -> anyhow::Result<Solution> {
    let text_path = a
        .refine_text
        .as_ref()
        .ok_or_else(|| anyhow!("--refine needs --refine-text FILE (held-out text to measure the loss on)"))?;
    let model_path = a.model.clone().unwrap_or_else(|| PathBuf::from(&profile.model));
    let calib_path = a
        .calib
        .clone()
        .unwrap_or_else(|| PathBuf::from(&profile.calibration.file));
    let model = super::load_model(&model_path, &Default::default())?;
    anyhow::ensure!(
        model.graph.config.num_layers == profile.layers.len(),
        "{} has {} decoder layers, the profile {}",
        model_path.display(),
        model.graph.config.num_layers,
        profile.layers.len()
    );
    let tok = if a.token_ids {
        None
    } else {
        Some(super::tokenizer(&model, &model_path)?)
    };
    let vocab = model.graph.config.vocab_size;
    let samples = |path: &PathBuf, n: usize| -> anyhow::Result<Vec<Vec<u32>>> {
        calib::file_samples(&super::read_text(path)?, tok.as_ref(), vocab, n, a.seq)
            .map_err(|e| anyhow!("{}: {e}", path.display()))
    };
    let calib_samples = samples(&calib_path, a.samples)?;
    let eval_samples = samples(text_path, a.refine_samples)?;
    let layers = profile.layers.len() as u64;
    let pb = super::progress_bar(
        (a.refine as u64 + 3) * layers,
        "refining: compressing and measuring",
    );
    let mut meter = PolicyMeter::new(&model.graph, calib_samples, eval_samples, a.seq)?
        .with_checkpoint_every(a.refine_checkpoint_every);
    let mut done = 0u64;
    let measure = |choice: &[usize]| -> anyhow::Result<f64> {
        let policy = choice_policy(profile, &a.budget, "optimal", choice, vec![]);
        let m = meter.measure(&policy, |i| pb.set_position(done + i as u64 + 1))?;
        done += layers;
        if m.resumed_at > 0 {
            tracing::info!(
                "refine: layers below {} reused from the best policy so far",
                m.resumed_at
            );
        }
        Ok(m.loss)
    };
    // The knapsack optimum first, then the heuristics' policies for the same budget.
    let mut starts = vec![(Method::Optimal.name().to_string(), start)];
    for m in [Method::Uniform, Method::EdgeLlm] {
        match search::search(problem, &a.budget, m, opts) {
            Ok(s) => starts.push((m.name().to_string(), s)),
            Err(e) => tracing::info!("refine: no {m} start: {e}"),
        }
    }
    let (sol, trials) = refine::refine(problem, &a.budget, opts, starts, a.refine, measure, |t| {
        let what = match &t.origin {
            refine::Origin::Start(name) => format!("start {name}"),
            refine::Origin::Pins(p) => format!("pins {p:?}"),
            refine::Origin::Trade { up, down } => format!("trade up {up:?} down {down:?}"),
        };
        let verdict = if t.accepted { "kept  " } else { "undone" };
        pb.suspend(|| {
            eprintln!(
                "refine: {verdict} loss {:.5}  predicted {:.4e}  {what}",
                t.loss, t.predicted
            )
        });
    })?;
    pb.finish_and_clear();
    if let Some(path) = &a.trials_out {
        let text: String = trials
            .iter()
            .map(|t| {
                let line = serde_json::json!({
                    "budget": a.budget.to_string(),
                    "origin": match &t.origin {
                        refine::Origin::Start(name) => serde_json::json!({"start": name}),
                        refine::Origin::Pins(p) => serde_json::json!({"pins": p}),
                        refine::Origin::Trade { up, down } => serde_json::json!({"trade": {"up": up, "down": down}}),
                    },
                    "loss": t.loss,
                    "predicted": t.predicted,
                    "accepted": t.accepted,
                    "choice": t.choice.iter().map(|&c| profile.candidates[c].label()).collect::<Vec<_>>(),
                });
                format!("{line}\n")
            })
            .collect();
        std::fs::write(path, text).map_err(|e| anyhow!("writing {}: {e}", path.display()))?;
    }
    Ok(sol)
}

/// The policy file of a choice of candidates (one per layer).
fn choice_policy(
    profile: &Sensitivity,
    budget: &Budget,
    method: &str,
    choice: &[usize],
    notes: Vec<String>,
) -> Policy {
    let name = |s: &str| (!s.is_empty()).then(|| s.to_string());
    Policy {
        model: profile.model.clone(),
        method: method.to_string(),
        budget: *budget,
        layers: choice
            .iter()
            .enumerate()
            .map(|(l, &c)| {
                let candidate = profile.candidates[c];
                LayerPolicy {
                    index: l,
                    candidate,
                    quantizer: name(&profile.quantizer),
                    pruner: if candidate.sparsity > 0.0 {
                        name(&profile.pruner)
                    } else {
                        None
                    },
                }
            })
            .collect(),
        notes,
    }
}

fn to_policy(profile: &Sensitivity, budget: &Budget, sol: &Solution) -> Policy {
    let mut notes = vec![
        format!(
            "profile: {} quantizer, {} pruner",
            profile.quantizer, profile.pruner
        ),
        format!("predicted error {:.6e} ({})", sol.error, objective_note(sol)),
        format!(
            "average bits {:.4}, sparsity {:.4}, bytes {}",
            sol.usage.bits(),
            sol.usage.sparsity(),
            sol.usage.bytes.map_or("unknown".into(), |b| b.to_string())
        ),
    ];
    notes.extend(sol.notes.iter().cloned());
    choice_policy(profile, budget, sol.method.name(), &sol.choice, notes)
}

fn objective_note(sol: &Solution) -> &'static str {
    match sol.lower_bound {
        Some(lb) if lb < sol.error => "optimal within the printed lower bound",
        Some(_) => "optimal",
        None => "not optimized",
    }
}

fn print_report(problem: &Problem, budget: &Budget, sol: &Solution, objective: &str) {
    let prof = problem.profile;
    println!("{:>5}  {:<22} {:>12}", "layer", "candidate", "nmse");
    for (l, &c) in sol.choice.iter().enumerate() {
        println!(
            "{:>5}  {:<22} {:>12.4e}",
            l,
            prof.candidates[c].label(),
            prof.layers[l].nmse[c]
        );
    }
    println!();
    println!("method {}, budget {budget}", sol.method);
    let lb = match sol.lower_bound {
        Some(lb) if lb < sol.error => format!(" (optimum >= {lb:.6e})"),
        Some(_) => " (optimal)".into(),
        None => String::new(),
    };
    let unit = if objective == "nmse" {
        "sum of layer nmse"
    } else if objective == "linear-nmse" {
        "sum over layers of the mean linear-output nmse"
    } else if objective == "loss-fit" || objective == "loss-measured" {
        "sum over layers of the mean linear-output nmse times the layer's fitted loss gain: predicted loss increase"
    } else {
        "sum of loss-weighted layer nmse: predicted loss increase"
    };
    println!("predicted error {:.6e}{lb} [{unit}]", sol.error);
    let bytes = sol
        .usage
        .bytes
        .map_or("unknown (profile has no linear shapes)".into(), |b| {
            format!("{b} ({:.2} MiB)", b as f64 / (1u64 << 20) as f64)
        });
    println!(
        "average bits {:.4}, sparsity {:.4}, bytes {bytes}",
        sol.usage.bits(),
        sol.usage.sparsity()
    );
    for n in &sol.notes {
        println!("{n}");
    }
}

fn report_json(problem: &Problem, budget: &Budget, sol: &Solution, objective: &str) -> serde_json::Value {
    let prof = problem.profile;
    let layers: Vec<serde_json::Value> = sol
        .choice
        .iter()
        .enumerate()
        .map(|(l, &c)| {
            serde_json::json!({
                "layer": l,
                "candidate": c,
                "label": prof.candidates[c].label(),
                "nmse": prof.layers[l].nmse[c],
                "bits": prof.candidates[c].bits,
                "sparsity": prof.candidates[c].sparsity,
            })
        })
        .collect();
    serde_json::json!({
        "method": sol.method.name(),
        "objective": objective,
        "budget": budget.to_string(),
        "predicted_error": sol.error,
        "lower_bound": sol.lower_bound,
        "bits": sol.usage.bits(),
        "sparsity": sol.usage.sparsity(),
        "bytes": sol.usage.bytes,
        "notes": sol.notes,
        "loss_gains": problem.gains,
        "layers": layers,
    })
}
