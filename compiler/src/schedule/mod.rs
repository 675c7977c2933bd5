//! The scheduling pass: plans a graph for a target device (`docs/schedule.md`).
//!
//! [`schedule`] is a `Graph -> Graph` pass: it returns the graph (node order kept: the
//! executor's order is already a topological order that frees each value at its last use)
//! together with a [`Schedule`], the data the runtime follows and `edgec inspect
//! --schedule` prints. One concept a module:
//!
//! - [`cost`]: bytes moved and flops of each op for its weight format, and predicted time
//!   against the target's bandwidths and peaks;
//! - [`tiling`]: each op's tile and the memory level it fits;
//! - [`residency`]: which weights stay resident and which are streamed under the budget;
//! - [`recompute`]: keep versus recompute of the tuning graph's activations;
//! - [`arena`]: the static memory plan (offsets, buffers shared by lifetime);
//! - [`threads`]: the thread split;
//! - [`measure`]: the same ops timed on this machine, to check the cost model.
//!
//! [`Schedule::verify`] is the pass's verifier.

pub mod arena;
pub mod cost;
pub mod measure;
pub mod recompute;
pub mod residency;
pub mod threads;
pub mod tiling;

use std::fmt;
use std::ops::RangeInclusive;

use edge_runtime::ir::{Graph, Op};
use serde::{Deserialize, Serialize};

use crate::target::Target;
use arena::Arena;
use cost::{Machine, OpCost, Workload, op_cost, value_rows};
use edge_runtime::plan::NodePlan;
use recompute::RecomputePlan;
use residency::Residency;

/// Bytes the runtime itself holds besides the plan's buffers (code, tokenizer, manifest,
/// allocator slack): `edge-runtime eval`'s peak RSS on SmolLM2-135M (49k-token vocabulary)
/// minus the plan's other terms, measured 49-53 MiB on the host, with a margin (`docs/schedule.md`). A plan's total
/// counts it so that a budget bounds the process's RSS. `--runtime-memory` overrides it.
pub const DEFAULT_RUNTIME_BYTES: u64 = 56 << 20;

/// What to plan for.
#[derive(Debug, Clone)]
pub struct Options {
    /// Bytes the model may use; the target's `budget.model_memory` when `None`.
    pub budget: Option<u64>,
    /// The step the per-op times and the arena are planned for.
    pub workload: Workload,
    /// Positions the runtime's KV cache holds (a session's capacity).
    pub context: usize,
    /// Bytes of the runtime besides the plan (see [`DEFAULT_RUNTIME_BYTES`]).
    pub runtime_bytes: u64,
    /// A tuning window `first..=exit` and its sample length, to plan keep vs recompute.
    pub train: Option<(RangeInclusive<usize>, usize)>,
    /// Keep vs recompute: decided by the budget (auto) or forced.
    pub recompute: recompute::Mode,
}

impl Options {
    /// A plan for steps of up to `context` positions: the arena sized for the largest step
    /// a runtime command takes, a prefill of the whole context with logits for its second
    /// half (`edge-runtime eval`'s chunks); times for one decoded token at its end.
    pub fn for_context(context: usize) -> Options {
        let context = context.max(1);
        Options {
            budget: None,
            workload: Workload {
                rows: context,
                past: 0,
                out_rows: context.div_ceil(2),
            },
            context,
            runtime_bytes: DEFAULT_RUNTIME_BYTES,
            train: None,
            recompute: recompute::Mode::Auto,
        }
    }
}

/// The scheduling pass failed.
#[derive(Debug, thiserror::Error)]
pub enum ScheduleError {
    #[error(
        "target `{target}`: the plan needs at least {need} bytes ({}) but the memory budget is {budget} bytes ({}): over by {} bytes ({}), even streaming every weight{}",
        mib(*need), mib(*budget), need - budget, mib(need - budget), detail
    )]
    OverBudget {
        target: String,
        need: u64,
        budget: u64,
        detail: String,
    },
    #[error("scheduling: {0}")]
    Invalid(String),
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

/// Where an op's weight is read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Residence {
    /// No weight, or one that stays in memory.
    Resident,
    /// Read when the op runs and released after it.
    Streamed,
}

/// The plan of one node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OpPlan {
    /// The node, its tile and threads (planned step and decode step): what the runtime
    /// follows (`edge_runtime::plan::NodePlan`).
    #[serde(flatten)]
    pub exec: NodePlan,
    pub op: String,
    /// The weight's storage format, for ops with a weight.
    pub format: Option<String>,
    /// Token rows the op runs on.
    pub rows: usize,
    pub cost: OpCost,
    pub weight: Residence,
    /// Streamed weights (ids) the runtime releases after this node.
    pub release: Vec<usize>,
    /// Predicted seconds of the op in the decode step and in the planned workload.
    pub decode_seconds: f64,
    pub seconds: f64,
    /// Whether compute or memory bounds the op in the planned workload.
    pub compute_bound: bool,
    /// Bytes live while the op runs: arena buffers, its streamed weight, resident weights,
    /// KV cache and runtime.
    pub memory_bytes: u64,
}

/// Where the budget goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryPlan {
    pub budget: u64,
    pub weights_resident: u64,
    pub stream_window: u64,
    pub kv_cache: u64,
    pub arena: u64,
    /// Per-thread tile buffers (decoded GEMM tiles, attention scores).
    pub scratch: u64,
    pub runtime: u64,
}

impl MemoryPlan {
    /// Everything but the weights.
    pub fn fixed(&self) -> u64 {
        self.kv_cache + self.arena + self.scratch + self.runtime
    }
    pub fn total(&self) -> u64 {
        self.weights_resident + self.stream_window + self.fixed()
    }
}

/// The plan of a graph for a target.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    pub target: String,
    pub workload: Workload,
    pub context: usize,
    pub cores: usize,
    pub ops: Vec<OpPlan>,
    pub residency: Residency,
    pub arena: Arena,
    pub memory: MemoryPlan,
    pub recompute: Option<RecomputePlan>,
    /// Predicted seconds of one decode step (one token after `context - 1` positions) and
    /// of the planned workload.
    pub decode_seconds: f64,
    pub workload_seconds: f64,
}

/// Bytes of the KV cache of `context` positions.
pub fn kv_bytes(g: &Graph, context: usize) -> u64 {
    let c = &g.config;
    2 * 4 * (c.num_layers * context * c.num_kv_heads * c.head_dim) as u64
}

/// The weight a node reads, if any.
pub fn node_weight(op: &Op) -> Option<usize> {
    match op {
        Op::Embedding { table } => Some(table.0),
        Op::RmsNorm { weight, .. } | Op::Linear { weight } => Some(weight.0),
        _ => None,
    }
}

/// Per-thread scratch of the runtime's kernels for the workload: decoded GEMM tiles
/// (256 weight rows as f32) and attention score rows.
fn scratch_bytes(g: &Graph, w: &Workload, cores: usize) -> u64 {
    let c = &g.config;
    let mut per_thread = 0u64;
    if w.rows > 3 {
        let widest = c.hidden_size.max(c.intermediate_size) as u64;
        per_thread = 256 * widest * 4;
    }
    let scores = 4 * (w.rows * w.context()) as u64;
    per_thread.max(scores) * cores as u64
}

/// The arena of the graph for a workload, its nodes in graph order (the order the pass
/// keeps and the runtime follows).
pub fn plan_arena(g: &Graph, w: &Workload) -> Arena {
    let order: Vec<usize> = (0..g.nodes.len()).collect();
    Arena::for_graph(g, w, &order)
}

/// The scheduling pass: plans `graph` for `target` and returns it with its schedule.
pub fn schedule(graph: Graph, target: &Target, o: &Options) -> Result<(Graph, Schedule), ScheduleError> {
    graph
        .verify()
        .map_err(|e| ScheduleError::Invalid(format!("input graph: {e}")))?;
    let g = &graph;
    let m = Machine::of(target);
    let w = o.workload;
    if w.context() > o.context {
        return Err(ScheduleError::Invalid(format!(
            "the workload reaches position {} beyond the context {}",
            w.context(),
            o.context
        )));
    }
    let budget = o.budget.unwrap_or(target.budget_bytes);
    let arena = plan_arena(g, &w);
    let mut memory = MemoryPlan {
        budget,
        weights_resident: 0,
        stream_window: 0,
        kv_cache: kv_bytes(g, o.context),
        arena: arena.size,
        scratch: scratch_bytes(g, &w, m.cores),
        runtime: o.runtime_bytes,
    };
    let sizes: Vec<u64> = g.weights.iter().map(|x| x.data.storage_bytes() as u64).collect();
    let residency = residency::plan(&sizes, memory.fixed(), budget).map_err(|e| ScheduleError::OverBudget {
        target: target.name.clone(),
        need: e.need,
        budget: e.budget,
        detail: format!(
            " (KV cache {} for {} positions, activations {}, kernel scratch {}, runtime {}, largest weight {})",
            mib(memory.kv_cache),
            o.context,
            mib(memory.arena),
            mib(memory.scratch),
            mib(memory.runtime),
            mib(sizes.iter().copied().max().unwrap_or(0))
        ),
    })?;
    memory.weights_resident = residency.resident_bytes;
    memory.stream_window = residency.window_bytes;
    let recompute = match &o.train {
        Some((layers, seq)) => {
            let available =
                budget.saturating_sub(memory.weights_resident + memory.stream_window + memory.runtime);
            match recompute::plan_with(g, layers.clone(), *seq, available, &m, o.recompute)? {
                Ok(p) => Some(p),
                Err(e) => {
                    let what = match o.recompute {
                        recompute::Mode::Keep => "keeping",
                        _ => "even recomputing",
                    };
                    return Err(ScheduleError::OverBudget {
                        target: target.name.clone(),
                        need: e.need + budget - available,
                        budget,
                        detail: format!(
                            ", {what} the tuning window {}..={}'s activations ({} of them on {} tokens)",
                            layers.start(),
                            layers.end(),
                            mib(e.need),
                            seq
                        ),
                    });
                }
            }
        }
        None => None,
    };
    let streamed = |id: usize| residency.streamed.binary_search(&id).is_ok();
    let rows = value_rows(g, &w);
    let decode = Workload::decode(o.context - 1);
    let decode_rows = value_rows(g, &decode);
    let mut ops = Vec::with_capacity(g.nodes.len());
    for (i, node) in g.nodes.iter().enumerate() {
        let r = node.inputs.first().map_or(w.rows, |v| rows[v.0]);
        let cost = op_cost(g, node, r, &w);
        let tile = tiling::tile(target, g, node, r, w.past);
        let nthreads = threads::threads(g, node, &cost, tile.as_ref(), m.cores);
        let wid = node_weight(&node.op);
        let is_streamed = wid.is_some_and(streamed);
        let weight_bw = if is_streamed { m.storage_bw } else { m.dram_bw };
        let seconds = m.time(&cost, nthreads, weight_bw);
        let compute_bound = cost.flops / m.flops_per_s * m.cores as f64 / nthreads as f64
            > cost.weight_bytes as f64 / weight_bw;
        let dr = node.inputs.first().map_or(1, |v| decode_rows[v.0]);
        let dcost = op_cost(g, node, dr, &decode);
        let dtile = tiling::tile(target, g, node, dr, decode.past);
        let dthreads = threads::threads(g, node, &dcost, dtile.as_ref(), m.cores);
        let decode_seconds = m.time(&dcost, dthreads, weight_bw);
        let window = if is_streamed {
            sizes[wid.expect("streamed")]
        } else {
            0
        };
        ops.push(OpPlan {
            exec: NodePlan {
                node: i,
                name: node.name.clone(),
                tile,
                threads: nthreads,
                decode_tile: dtile,
                decode_threads: Some(dthreads),
            },
            op: node.op.name().to_string(),
            format: wid.map(|id| g.weights[id].data.format().to_string()),
            rows: r,
            cost,
            weight: if is_streamed {
                Residence::Streamed
            } else {
                Residence::Resident
            },
            release: wid.filter(|&id| streamed(id)).into_iter().collect(),
            decode_seconds,
            seconds,
            compute_bound,
            memory_bytes: arena.live_at(i)
                + window
                + memory.weights_resident
                + memory.kv_cache
                + memory.scratch
                + memory.runtime,
        });
    }
    let s = Schedule {
        target: target.name.clone(),
        workload: w,
        context: o.context,
        cores: m.cores,
        decode_seconds: ops.iter().map(|p| p.decode_seconds).sum(),
        workload_seconds: ops.iter().map(|p| p.seconds).sum(),
        ops,
        residency,
        arena,
        memory,
        recompute,
    };
    s.verify(&graph).map_err(ScheduleError::Invalid)?;
    Ok((graph, s))
}

impl Schedule {
    /// The pass's verifier: the plan covers the graph node for node, its arena is sound,
    /// every streamed weight is released after each use and only there, and the memory
    /// fits the budget.
    pub fn verify(&self, g: &Graph) -> Result<(), String> {
        if self.ops.len() != g.nodes.len() {
            return Err(format!("{} op plans for {} nodes", self.ops.len(), g.nodes.len()));
        }
        for (i, (op, n)) in self.ops.iter().zip(&g.nodes).enumerate() {
            let p = &op.exec;
            if p.node != i || p.name != n.name {
                return Err(format!(
                    "op plan {i} is for `{}`, the node is `{}`",
                    p.name, n.name
                ));
            }
            if [Some(p.threads), p.decode_threads]
                .into_iter()
                .flatten()
                .any(|t| t == 0 || t > self.cores)
            {
                return Err(format!(
                    "node `{}`: {} threads on {} cores",
                    n.name, p.threads, self.cores
                ));
            }
            let wid = node_weight(&n.op);
            let streamed = wid.is_some_and(|id| self.residency.streamed.contains(&id));
            let expect: Vec<usize> = wid.filter(|_| streamed).into_iter().collect();
            if op.release != expect || (op.weight == Residence::Streamed) != streamed {
                return Err(format!(
                    "node `{}`: its weight's residency and release disagree",
                    n.name
                ));
            }
        }
        for &id in &self.residency.streamed {
            if id >= g.weights.len() {
                return Err(format!("streamed weight {id} does not exist"));
            }
        }
        self.arena.verify()?;
        let resident: u64 = (0..g.weights.len())
            .filter(|id| !self.residency.streamed.contains(id))
            .map(|id| g.weights[id].data.storage_bytes() as u64)
            .sum();
        if resident != self.memory.weights_resident {
            return Err(format!(
                "resident weights are {resident} bytes, the plan says {}",
                self.memory.weights_resident
            ));
        }
        if self.memory.total() > self.memory.budget {
            return Err(format!(
                "the plan needs {} bytes, over its budget of {}",
                self.memory.total(),
                self.memory.budget
            ));
        }
        Ok(())
    }

    /// Weight ids the runtime streams.
    pub fn streamed_weights(&self) -> &[usize] {
        &self.residency.streamed
    }

    /// Peak bytes over the ops.
    pub fn peak_bytes(&self) -> u64 {
        self.ops.iter().map(|p| p.memory_bytes).max().unwrap_or(0)
    }
}

/// Bytes in MiB with two decimals (what the plan's messages print).
pub fn mib(b: u64) -> String {
    format!("{:.2} MiB", b as f64 / (1u64 << 20) as f64)
}

impl fmt::Display for Schedule {
    /// The plan as `edgec inspect --schedule` prints it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let w = &self.workload;
        let m = &self.memory;
        writeln!(
            f,
            "schedule for target `{}` ({} cores): context {} positions; planned step {} rows after {} (logits of {}), decode step 1 row after {}",
            self.target,
            self.cores,
            self.context,
            w.rows,
            w.past,
            w.out_rows,
            self.context - 1
        )?;
        writeln!(
            f,
            "predicted: {:.3} ms a decode step ({:.1} tokens/s), {:.3} ms the planned step",
            self.decode_seconds * 1e3,
            1.0 / self.decode_seconds,
            self.workload_seconds * 1e3
        )?;
        writeln!(
            f,
            "memory: {} of budget {}: resident weights {} + stream window {} + KV cache {} + arena {} (unshared {}) + scratch {} + runtime {}",
            mib(m.total()),
            mib(m.budget),
            mib(m.weights_resident),
            mib(m.stream_window),
            mib(m.kv_cache),
            mib(m.arena),
            mib(self.arena.unshared),
            mib(m.scratch),
            mib(m.runtime)
        )?;
        writeln!(
            f,
            "residency: {} weights streamed ({}), the rest resident",
            self.residency.streamed.len(),
            mib(self.residency.streamed_bytes)
        )?;
        if let Some(r) = &self.recompute {
            writeln!(
                f,
                "tuning window {}..={} on {} tokens: {} (keep: {} in {} values; recompute: {} in {} values, +{:.1} ms a step; {} available)",
                r.first,
                r.exit,
                r.seq,
                if r.recompute { "RECOMPUTE" } else { "keep" },
                mib(r.keep_peak_bytes),
                r.kept_values,
                mib(r.recompute_peak_bytes),
                r.kept_values_recompute,
                r.recompute_seconds * 1e3,
                mib(r.available_bytes)
            )?;
        }
        writeln!(
            f,
            "{:>4} {:<24} {:<10} {:<16} {:>5} {:>9} {:>10} {:<8} {:<22} {:>3} {:>10} {:>10} {:>10}",
            "#",
            "node",
            "op",
            "format",
            "rows",
            "MFLOP",
            "weight KiB",
            "weight",
            "tile (rows x tok @lvl)",
            "thr",
            "decode us",
            "step us",
            "mem MiB"
        )?;
        for p in &self.ops {
            let tile = p
                .exec
                .tile
                .as_ref()
                .map(|t| format!("{}x{} @{}", t.weight_rows, t.token_rows, t.level))
                .unwrap_or_default();
            writeln!(
                f,
                "{:>4} {:<24} {:<10} {:<16} {:>5} {:>9.3} {:>10.1} {:<8} {:<22} {:>3} {:>10.1} {:>10.1} {:>10.2}",
                p.exec.node,
                p.exec.name,
                p.op,
                p.format.as_deref().unwrap_or(""),
                p.rows,
                p.cost.flops / 1e6,
                p.cost.weight_bytes as f64 / 1024.0,
                match p.weight {
                    Residence::Streamed => "streamed",
                    Residence::Resident => "",
                },
                tile,
                p.exec.threads,
                p.decode_seconds * 1e6,
                p.seconds * 1e6,
                p.memory_bytes as f64 / (1u64 << 20) as f64
            )?;
        }
        Ok(())
    }
}
