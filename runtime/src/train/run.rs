//! Runs a [`TrainGraph`]: the prefix alone (to cache a window's input), or a whole step
//! (window forward, loss, backward) accumulating parameter gradients. Values are freed
//! after their last reader, so a step holds only what the backward still needs.

use std::collections::HashMap;

use super::grad;
use super::graph::{TNode, TOp, TVal, TrainGraph, WeightRef};
use super::lora::{ParamId, Params};
use crate::error::{Result, RuntimeError};
use crate::ir::Graph;
use crate::ops::attention::{AttnShape, KvSlot, attention};
use crate::ops::norm::rms_norm;
use crate::ops::rope::RopeTable;
use crate::tensor::Tensor;

/// Gradients of the parameters a step updates.
#[derive(Debug, Clone, Default)]
pub struct Grads {
    pub tensors: HashMap<ParamId, Vec<f32>>,
}

impl Grads {
    /// Zeroed gradients for `ids`.
    pub fn zeros(params: &Params, ids: &[ParamId]) -> Grads {
        Grads {
            tensors: ids
                .iter()
                .map(|&i| (i, vec![0.0; params.get(i).data.len()]))
                .collect(),
        }
    }
    pub fn zero(&mut self) {
        for g in self.tensors.values_mut() {
            g.fill(0.0);
        }
    }
    /// The global L2 norm.
    pub fn norm(&self) -> f64 {
        self.tensors
            .values()
            .flatten()
            .map(|&g| (g as f64) * (g as f64))
            .sum::<f64>()
            .sqrt()
    }
}

static OP_TIMES: std::sync::Mutex<Vec<(&'static str, f64, usize)>> = std::sync::Mutex::new(Vec::new());

/// Whether per-op timing is on (`EDGE_TRAIN_PROFILE=1`).
pub fn op_profile_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("EDGE_TRAIN_PROFILE").is_some_and(|v| v != "0"))
}

fn record_op_time(op: &'static str, secs: f64) {
    let mut t = OP_TIMES.lock().unwrap_or_else(|e| e.into_inner());
    match t.iter_mut().find(|e| e.0 == op) {
        Some(e) => {
            e.1 += secs;
            e.2 += 1;
        }
        None => t.push((op, secs, 1)),
    }
}

/// Seconds spent per op kind (and calls) since the start, when profiling is on.
pub fn op_times() -> Vec<(&'static str, f64, usize)> {
    let mut t = OP_TIMES.lock().unwrap_or_else(|e| e.into_inner()).clone();
    t.sort_by(|a, b| b.1.total_cmp(&a.1));
    t
}

/// What the loss of a step came to.
#[derive(Debug, Clone, Copy, Default)]
pub struct LossStats {
    /// The weighted loss (the value differentiated).
    pub loss: f64,
    /// Sum of the unweighted token losses (nats) and how many tokens were scored.
    pub nll_sum: f64,
    pub count: usize,
}

/// The shifted next-token targets of one sequence: row `t` predicts `tokens[t + 1]`.
pub fn shifted_targets(tokens: &[u32]) -> Vec<Option<u32>> {
    let mut t: Vec<Option<u32>> = tokens[1..].iter().map(|&x| Some(x)).collect();
    t.push(None);
    t
}

/// The gradient buffer of `id` when it trains, else a zeroed scratch buffer (a frozen
/// adapter's gradient is computed on the way to its input's and dropped).
fn grad_or_scratch<'g>(
    grads: Option<&'g mut Grads>,
    id: ParamId,
    len: usize,
    scratch: &'g mut Vec<f32>,
) -> &'g mut [f32] {
    match grads.and_then(|gr| gr.tensors.get_mut(&id)) {
        Some(d) => d.as_mut_slice(),
        None => {
            scratch.resize(len, 0.0);
            scratch.as_mut_slice()
        }
    }
}

/// Buffers of freed values, kept for the next values of the step: a step allocates a few
/// hundred `rows x width` temporaries, and fresh large allocations cost page faults and
/// zero-filling by the kernel (about 12% of a full-depth step before this pool). Only
/// freed buffers are kept, at most [`POOL_BYTES`], for one pass: the step's peak memory
/// grows by that at most.
#[derive(Default)]
struct BufPool {
    free: Vec<Vec<f32>>,
    bytes: usize,
}

/// What the pool may hold: a few `rows x intermediate` temporaries at seq 256 (e.g. the
/// LoRA term of a projection, freed as soon as it is added to the base output).
const POOL_BYTES: usize = 4 << 20;

impl BufPool {
    /// A buffer of `len` numbers whose contents are unspecified (stale values of an
    /// earlier buffer, or zeros): for outputs the op writes entirely.
    fn any(&mut self, len: usize) -> Vec<f32> {
        // Best fit, and never more than twice the size asked (no large buffer wasted on a
        // small value).
        let best = self
            .free
            .iter()
            .enumerate()
            .filter(|(_, b)| b.capacity() >= len && b.capacity() <= 2 * len.max(1024))
            .min_by_key(|(_, b)| b.capacity())
            .map(|(i, _)| i);
        match best {
            Some(i) => {
                let mut b = self.free.swap_remove(i);
                self.bytes -= b.capacity() * 4;
                b.resize(len, 0.0);
                b
            }
            None => vec![0.0; len],
        }
    }

    fn give(&mut self, b: Vec<f32>) {
        let bytes = b.capacity() * 4;
        if b.capacity() >= 1024 && self.bytes + bytes <= POOL_BYTES {
            self.bytes += bytes;
            self.free.push(b);
        }
    }
}

fn missing(tg: &TrainGraph, node: &TNode, i: usize) -> RuntimeError {
    RuntimeError::InvalidGraph(format!(
        "training node `{}` reads `{}`, which was not computed",
        node.name, tg.values[node.inputs[i].0].name
    ))
}

/// The buffer of input `i` of `node` to overwrite: taken when `consumable` (this node is
/// its last reader), else a pooled copy.
fn take_or_copy(
    vals: &mut [Option<Vec<f32>>],
    pool: &mut BufPool,
    tg: &TrainGraph,
    node: &TNode,
    i: usize,
    consumable: bool,
) -> Result<Vec<f32>> {
    let v = node.inputs[i];
    let src = vals[v.0].as_deref().ok_or_else(|| missing(tg, node, i))?;
    if consumable {
        return Ok(vals[v.0].take().expect("checked above"));
    }
    let mut o = pool.any(src.len());
    o.copy_from_slice(src);
    Ok(o)
}

/// Interprets training graphs of one base graph and parameter set.
pub struct TrainRunner<'a> {
    pub graph: &'a Graph,
    pub params: &'a Params,
    /// JIT kernels for the compressed weights (frozen linears forward and `dy W` backward);
    /// weights without one run the reference kernels.
    pub kernels: Option<&'a crate::jit::KernelSet>,
}

struct Ctx<'a> {
    tokens: &'a [u32],
    targets: &'a [Option<u32>],
    weight: f32,
    grads: Option<&'a mut Grads>,
    stats: LossStats,
}

impl<'a> TrainRunner<'a> {
    pub fn new(graph: &'a Graph, params: &'a Params) -> Self {
        TrainRunner {
            graph,
            params,
            kernels: None,
        }
    }

    /// Runs the compressed weights' products through `kernels` (see [`crate::jit`]).
    pub fn with_kernels(mut self, kernels: Option<&'a crate::jit::KernelSet>) -> Self {
        self.kernels = kernels;
        self
    }

    /// The window input (the prefix's output) for `tokens`.
    pub fn prefix(&self, tg: &TrainGraph, tokens: &[u32]) -> Result<Vec<f32>> {
        self.check_tokens(tokens)?;
        if tg.prefix.is_empty() {
            return Err(RuntimeError::Invalid("the training graph has no prefix".into()));
        }
        let mut ctx = Ctx {
            tokens,
            targets: &[],
            weight: 0.0,
            grads: None,
            stats: LossStats::default(),
        };
        let mut vals = self.exec(tg, tg.prefix.clone(), vec![], &mut ctx, &[tg.window_input])?;
        Ok(vals.remove(0))
    }

    /// One forward + backward of `tokens` with loss terms weighted by `weight` (e.g. one
    /// over the scored tokens of the whole batch); gradients are added into `grads`.
    /// `window_input`: the cached prefix output, or `None` to run the prefix.
    pub fn step(
        &self,
        tg: &TrainGraph,
        tokens: &[u32],
        window_input: Option<Vec<f32>>,
        weight: f32,
        grads: &mut Grads,
    ) -> Result<LossStats> {
        self.check_tokens(tokens)?;
        if tokens.len() < 2 {
            return Err(RuntimeError::Invalid(
                "a training sequence needs at least 2 tokens".into(),
            ));
        }
        let targets = shifted_targets(tokens);
        let mut ctx = Ctx {
            tokens,
            targets: &targets,
            weight,
            grads: Some(grads),
            stats: LossStats::default(),
        };
        let (range, seeds) = match window_input {
            Some(x) => {
                let w = tg.values[tg.window_input.0].width;
                if x.len() != tokens.len() * w {
                    return Err(RuntimeError::Invalid(format!(
                        "cached window input has {} numbers, expected {} x {w}",
                        x.len(),
                        tokens.len()
                    )));
                }
                (tg.forward.start..tg.backward.end, vec![(tg.window_input, x)])
            }
            None => (0..tg.backward.end, vec![]),
        };
        self.exec(tg, range, seeds, &mut ctx, &[])?;
        Ok(ctx.stats)
    }

    fn check_tokens(&self, tokens: &[u32]) -> Result<()> {
        let vocab = self.graph.config.vocab_size;
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(RuntimeError::BadToken { id: bad, vocab });
        }
        if tokens.is_empty() {
            return Err(RuntimeError::Invalid("no tokens".into()));
        }
        Ok(())
    }

    fn norm_weight(&self, w: WeightRef) -> Result<Vec<f32>> {
        Ok(match w {
            WeightRef::Frozen(id) => self.graph.weight(id).data.to_f32_vec(),
            WeightRef::Param(p) => self.params.get(p).data.clone(),
        })
    }

    fn exec(
        &self,
        tg: &TrainGraph,
        range: std::ops::Range<usize>,
        seeds: Vec<(TVal, Vec<f32>)>,
        ctx: &mut Ctx<'_>,
        keep: &[TVal],
    ) -> Result<Vec<Vec<f32>>> {
        let g = self.graph;
        let p = self.params;
        let rows = ctx.tokens.len();
        let mut pool = BufPool::default();
        let mut vals: Vec<Option<Vec<f32>>> = vec![None; tg.values.len()];
        for (v, x) in seeds {
            vals[v.0] = Some(x);
        }
        let mut ropes: Vec<RopeTable> = vec![];
        let mut rope = |theta: f32, hd: usize| -> RopeTable {
            if let Some(r) = ropes.iter().find(|r| r.theta == theta && r.head_dim == hd) {
                return r.clone();
            }
            let r = RopeTable::new(theta, hd, rows);
            ropes.push(r.clone());
            r
        };
        let mut kept: Vec<Option<Vec<f32>>> = vec![None; keep.len()];
        let end = range.end;
        let profile = op_profile_enabled();
        for idx in range {
            let node = &tg.nodes[idx];
            let t0 = profile.then(std::time::Instant::now);
            let get = |i: usize| -> Result<&[f32]> {
                vals[node.inputs[i].0]
                    .as_deref()
                    .ok_or_else(|| missing(tg, node, i))
            };
            let width = |v: TVal| tg.values[v.0].width;
            // Input `i` may be overwritten in place: this node is its last reader, nobody
            // keeps it, and it is not also another input of the node.
            let consumable = |i: usize| {
                let v = node.inputs[i];
                tg.last_use[v.0] == idx
                    && !keep.contains(&v)
                    && node.inputs.iter().filter(|&&u| u == v).count() == 1
            };
            let mut outs: Vec<Vec<f32>> = match &node.op {
                TOp::Embedding { table } => {
                    let t = &g.weight(*table).data;
                    let w = width(node.outputs[0]);
                    let mut o = pool.any(rows * w);
                    for (row, &tok) in o.chunks_exact_mut(w).zip(ctx.tokens) {
                        t.read_row_f32(tok as usize, row);
                    }
                    vec![o]
                }
                TOp::RmsNorm { weight, eps } => {
                    let w = Tensor::from_f32(vec![width(node.outputs[0])], self.norm_weight(*weight)?)?;
                    let mut o = pool.any(rows * width(node.outputs[0]));
                    rms_norm(get(0)?, &w, *eps, &mut o);
                    vec![o]
                }
                TOp::Linear { weight } => {
                    let mut o = pool.any(rows * width(node.outputs[0]));
                    let w = g.weight(*weight);
                    crate::jit::linear(self.kernels, &w.name, get(0)?, rows, &w.data, &mut o)?;
                    vec![o]
                }
                TOp::LoraDown { a, rank } => vec![grad::lora_down(get(0)?, rows, &p.get(*a).data, *rank)],
                TOp::LoraUp { b, rank, scale } => {
                    let mut o = pool.any(rows * width(node.outputs[0]));
                    grad::lora_up(get(0)?, rows, &p.get(*b).data, *rank, *scale, &mut o, false);
                    vec![o]
                }
                TOp::Rope {
                    heads,
                    head_dim,
                    theta,
                } => {
                    let mut o = take_or_copy(&mut vals, &mut pool, tg, node, 0, consumable(0))?;
                    rope(*theta, *head_dim).apply(&mut o, *heads, 0);
                    vec![o]
                }
                TOp::Attention {
                    heads,
                    kv_heads,
                    head_dim,
                } => {
                    let shape = AttnShape {
                        heads: *heads,
                        kv_heads: *kv_heads,
                        head_dim: *head_dim,
                    };
                    let mut o = pool.any(rows * heads * head_dim);
                    let mut kv = KvSlot::new(rows, kv_heads * head_dim);
                    attention(shape, get(0)?, get(1)?, get(2)?, &mut kv, 0, &mut o);
                    vec![o]
                }
                TOp::SwiGlu => {
                    let mut o = pool.any(get(0)?.len());
                    grad::swiglu_par(get(0)?, get(1)?, &mut o);
                    vec![o]
                }
                TOp::Add | TOp::GradSum => {
                    // In place into an input this node reads last (e.g. the base
                    // projection's output, the LoRA term added to it).
                    let (acc, other) = if consumable(0) { (0, 1) } else { (1, 0) };
                    let mut o = take_or_copy(&mut vals, &mut pool, tg, node, acc, consumable(acc))?;
                    let b = vals[node.inputs[other].0]
                        .as_deref()
                        .ok_or_else(|| missing(tg, node, other))?;
                    grad::add_assign_par(&mut o, b);
                    vec![o]
                }
                TOp::ExitLoss { head } => {
                    let (hw, dw) = match head {
                        WeightRef::Frozen(id) => (grad::Head::Weight(&g.weight(*id).data), None),
                        WeightRef::Param(pid) => {
                            let prm = p.get(*pid);
                            let dw = ctx.grads.as_deref_mut().and_then(|gr| gr.tensors.get_mut(pid));
                            let head = grad::Head::Trained {
                                data: &prm.data,
                                vocab: prm.shape[0],
                            };
                            (head, dw.map(|v| v.as_mut_slice()))
                        }
                    };
                    let x = get(0)?;
                    let mut dx = pool.any(x.len());
                    let mut logits = pool.any(grad::head_scratch_len(rows, &hw, dw.is_some()));
                    let (loss, raw, count) =
                        grad::head_loss(x, hw, ctx.targets, ctx.weight, dw, &mut dx, &mut logits);
                    pool.give(logits);
                    ctx.stats.loss += loss;
                    ctx.stats.nll_sum += raw;
                    ctx.stats.count += count;
                    vec![vec![loss as f32], dx]
                }
                TOp::RmsNormBack { weight, eps, need_dx } => {
                    let w = self.norm_weight(*weight)?;
                    let dw = match weight {
                        WeightRef::Param(pid) => {
                            ctx.grads.as_deref_mut().and_then(|gr| gr.tensors.get_mut(pid))
                        }
                        WeightRef::Frozen(_) => None,
                    };
                    let x = get(0)?;
                    let mut dx = need_dx.then(|| pool.any(x.len()));
                    grad::rms_norm_back(
                        x,
                        &w,
                        *eps,
                        get(1)?,
                        dx.as_deref_mut(),
                        dw.map(|v| v.as_mut_slice()),
                    );
                    dx.into_iter().collect()
                }
                TOp::LinearBack { weight } => {
                    let w = g.weight(*weight);
                    let mut dx = pool.any(rows * w.data.shape()[1]);
                    crate::jit::linear_transposed(self.kernels, &w.name, get(0)?, rows, &w.data, &mut dx)?;
                    vec![dx]
                }
                TOp::LoraUpBack { b, rank, scale } => {
                    let bp = &p.get(*b).data;
                    let mut scratch = vec![];
                    let db = grad_or_scratch(ctx.grads.as_deref_mut(), *b, bp.len(), &mut scratch);
                    vec![grad::lora_up_back(get(0)?, rows, bp, *rank, *scale, get(1)?, db)]
                }
                TOp::LoraDownBack { a, rank, need_dx } => {
                    let ap = &p.get(*a).data;
                    let mut scratch = vec![];
                    let da = grad_or_scratch(ctx.grads.as_deref_mut(), *a, ap.len(), &mut scratch);
                    let x = get(0)?;
                    let mut dx = need_dx.then(|| pool.any(x.len()));
                    grad::lora_down_back(x, rows, ap, *rank, get(1)?, da, dx.as_deref_mut());
                    dx.into_iter().collect()
                }
                TOp::RopeBack {
                    heads,
                    head_dim,
                    theta,
                } => {
                    let mut dx = take_or_copy(&mut vals, &mut pool, tg, node, 0, consumable(0))?;
                    grad::rope_back(&rope(*theta, *head_dim), &mut dx, *heads);
                    vec![dx]
                }
                TOp::AttentionBack {
                    heads,
                    kv_heads,
                    head_dim,
                } => {
                    let shape = AttnShape {
                        heads: *heads,
                        kv_heads: *kv_heads,
                        head_dim: *head_dim,
                    };
                    let (dq, dk, dv) = grad::attention_back(shape, get(0)?, get(1)?, get(2)?, get(3)?);
                    vec![dq, dk, dv]
                }
                TOp::SwiGluBack => {
                    let n = get(0)?.len();
                    let (mut dg, mut du) = (pool.any(n), pool.any(n));
                    grad::swiglu_back(get(0)?, get(1)?, get(2)?, &mut dg, &mut du);
                    vec![dg, du]
                }
            };
            if let Some(t0) = t0 {
                record_op_time(node.op.name(), t0.elapsed().as_secs_f64());
            }
            if outs.len() != node.outputs.len() {
                return Err(RuntimeError::InvalidGraph(format!(
                    "training node `{}` produced {} values, the graph names {}",
                    node.name,
                    outs.len(),
                    node.outputs.len()
                )));
            }
            for (o, v) in outs.drain(..).zip(&node.outputs) {
                if let Some(k) = keep.iter().position(|k| k == v) {
                    kept[k] = Some(o.clone());
                }
                vals[v.0] = Some(o);
            }
            for v in &node.inputs {
                if tg.last_use[v.0] == idx
                    && let Some(b) = vals[v.0].take()
                {
                    pool.give(b);
                }
            }
            // Values nobody reads later (e.g. the loss scalar, a gradient of a frozen input).
            for v in &node.outputs {
                if tg.last_use[v.0] <= idx
                    && !keep.contains(v)
                    && let Some(b) = vals[v.0].take()
                {
                    pool.give(b);
                }
            }
        }
        let _ = end;
        kept.into_iter()
            .zip(keep)
            .map(|(k, v)| {
                k.ok_or_else(|| {
                    RuntimeError::InvalidGraph(format!("value `{}` was not computed", tg.values[v.0].name))
                })
            })
            .collect()
    }
}
