//! Keep versus recompute for the activations of the tuning graph.
//!
//! A tuning step (`edge_runtime::train::TrainGraph`) keeps the window's forward activations
//! for its backward. With `recompute`, only each window layer's input is kept and the
//! layer's forward is re-run just before its backward: activation memory of about one
//! layer instead of the whole window, for one more forward of the window. The plan keeps
//! when the kept activations fit what the budget leaves after the weights, and recomputes
//! otherwise; it fails when neither fits. [`Mode`] forces either choice (`edgec build
//! --recompute keep|recompute`), failing when the forced one does not fit.

use std::ops::RangeInclusive;

use edge_runtime::ir::Graph;
use edge_runtime::train::{LoraConfig, Module, Params, TrainGraph, WindowSpec};
use serde::{Deserialize, Serialize};

use super::cost::{Machine, Workload, op_cost, value_rows};
use super::residency::OverBudget;

/// How the decision is made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Keep when the kept activations fit, else recompute.
    #[default]
    Auto,
    Keep,
    Recompute,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Mode, String> {
        match s {
            "auto" => Ok(Mode::Auto),
            "keep" => Ok(Mode::Keep),
            "recompute" => Ok(Mode::Recompute),
            _ => Err(format!("`{s}` is not one of auto, keep, recompute")),
        }
    }
}

/// The decision for one tuning window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecomputePlan {
    /// Window layers `first..=exit`.
    pub first: usize,
    pub exit: usize,
    /// Tokens a tuning sample holds.
    pub seq: usize,
    pub recompute: bool,
    /// Peak bytes of live activations of a step, keeping and recomputing.
    pub keep_peak_bytes: u64,
    pub recompute_peak_bytes: u64,
    /// Activations the backward reads from the forward in each mode.
    pub kept_values: usize,
    pub kept_values_recompute: usize,
    /// Predicted seconds the extra forward of the window costs a step.
    pub recompute_seconds: f64,
    /// Bytes the plan allowed the activations.
    pub available_bytes: u64,
}

/// Peak bytes of live values of a training graph on `seq` token rows.
fn peak_live(tg: &TrainGraph, seq: usize) -> u64 {
    let size = |v: usize| 4 * tg.values[v].width as u64 * seq as u64;
    let mut live = 0u64;
    let mut peak = 0u64;
    let mut alive = vec![false; tg.values.len()];
    for (i, n) in tg.nodes.iter().enumerate() {
        for o in &n.outputs {
            if !alive[o.0] {
                alive[o.0] = true;
                live += size(o.0);
            }
        }
        peak = peak.max(live);
        for v in n.inputs.iter().chain(&n.outputs) {
            if alive[v.0] && tg.last_use[v.0] <= i {
                alive[v.0] = false;
                live -= size(v.0);
            }
        }
    }
    peak
}

/// [`plan_with`] in [`Mode::Auto`].
pub fn plan(
    g: &Graph,
    layers: RangeInclusive<usize>,
    seq: usize,
    available: u64,
    m: &Machine,
) -> anyhow::Result<Result<RecomputePlan, OverBudget>> {
    plan_with(g, layers, seq, available, m, Mode::Auto)
}

/// Plans the window `layers` (loss at its last layer) on samples of `seq` tokens with
/// `available` bytes for activations, in `mode`. LoRA rank 8 on every projection, as
/// `edgec tune`'s default, shapes the graph (the rank does not change the activations
/// much). The error says what the chosen (or, in auto, the smaller) mode needs.
pub fn plan_with(
    g: &Graph,
    layers: RangeInclusive<usize>,
    seq: usize,
    available: u64,
    m: &Machine,
    mode: Mode,
) -> anyhow::Result<Result<RecomputePlan, OverBudget>> {
    let c = &g.config;
    let (first, exit) = (*layers.start(), *layers.end());
    let lora = LoraConfig {
        rank: 8,
        alpha: 16.0,
        targets: Module::ALL.to_vec(),
    };
    let params = Params::new(g, lora, &[exit], exit + 1 < c.num_layers, false, 0)?;
    let spec = WindowSpec::new(layers.clone(), exit, c.num_layers)?;
    let keep = TrainGraph::build(g, &params, spec.clone())?;
    let rec = TrainGraph::build(g, &params, spec.with_recompute(true))?;
    let (keep_peak, rec_peak) = (peak_live(&keep, seq), peak_live(&rec, seq));
    let w = Workload::prefill(seq);
    let rows = value_rows(g, &w);
    let mut seconds = 0.0;
    for l in layers {
        let span = g
            .layer_span(l)
            .ok_or_else(|| anyhow::anyhow!("layer {l} has no nodes"))?;
        for n in &g.nodes[span] {
            let r = n.inputs.first().map_or(w.rows, |v| rows[v.0]);
            seconds += m.time(&op_cost(g, n, r, &w), m.cores, m.dram_bw);
        }
    }
    let plan = RecomputePlan {
        first,
        exit,
        seq,
        recompute: match mode {
            Mode::Auto => keep_peak > available,
            Mode::Keep => false,
            Mode::Recompute => true,
        },
        keep_peak_bytes: keep_peak,
        recompute_peak_bytes: rec_peak,
        kept_values: keep.saved_values().len(),
        kept_values_recompute: rec.saved_values().len(),
        recompute_seconds: seconds,
        available_bytes: available,
    };
    let need = if plan.recompute { rec_peak } else { keep_peak };
    if need > available {
        return Ok(Err(OverBudget {
            need,
            budget: available,
        }));
    }
    Ok(Ok(plan))
}
