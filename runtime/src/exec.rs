//! The executor: interprets an IR graph, one step (a batch of new tokens of one sequence)
//! at a time, with a KV cache per session.

use std::ops::Range;
use std::sync::{Arc, Mutex};

use crate::error::{Result, RuntimeError};
use crate::ir::{Graph, Op, ValueId};
use crate::kernels::Split;
use crate::ops::activation::{add, swiglu};
use crate::ops::attention::{AttnShape, KvSlot, attention_threads};
use crate::ops::norm::rms_norm;
use crate::ops::rope::RopeTable;
use crate::plan::{ALIGN, ExecPlan};

/// Which rows (token positions of the step) the outputs after `OutputRows` keep.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rows {
    All,
    /// Only the last token (generation).
    Last,
    /// Rows `range` of the step (e.g. the scored half of a perplexity chunk).
    Range(Range<usize>),
}

/// The state of one sequence: its KV cache and position.
pub struct Session {
    kv: Vec<KvSlot>,
    rope: Vec<RopeTable>,
    pos: usize,
    capacity: usize,
}

impl Session {
    /// Number of tokens already in the cache.
    pub fn position(&self) -> usize {
        self.pos
    }
    pub fn capacity(&self) -> usize {
        self.capacity
    }
    /// Forgets the sequence (keeps the buffers).
    pub fn reset(&mut self) {
        self.pos = 0;
    }
    /// Drops cached positions from `pos` on (e.g. to re-run a suffix).
    pub fn truncate(&mut self, pos: usize) {
        self.pos = self.pos.min(pos);
    }
}

/// The result of one step.
#[derive(Debug, Clone)]
pub struct StepOutput {
    /// Logits of the requested rows, `[rows.len(), vocab]`.
    pub logits: Vec<f32>,
    /// Which rows of the step the logits belong to.
    pub rows: Range<usize>,
    /// The requested values, in request order (`[rows, width]` each).
    pub taps: Vec<Vec<f32>>,
}

/// Which parts of a schedule an executor follows ([`Executor::with_plan`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Follow {
    /// The plan's node order and its arena: every value the arena places lives at its
    /// planned offset of one preallocated buffer instead of its own allocation.
    pub memory: bool,
    /// The plan's tiles and thread split in the linear and attention kernels.
    pub kernels: bool,
}

impl Follow {
    pub const ALL: Follow = Follow {
        memory: true,
        kernels: true,
    };
}

/// Runs a verified graph.
pub struct Executor {
    graph: Arc<Graph>,
    /// Node indices in the order they run (the plan's, else the graph's).
    order: Vec<usize>,
    /// For each value, the position in `order` of the last node that reads it (to free it
    /// early).
    last_pos: Vec<usize>,
    /// The static memory plan, when following one.
    arena: Option<ArenaPlan>,
    /// Per node, the planned split of its kernel for steps of more than 3 rows and for
    /// decode steps (empty: the kernels' defaults).
    splits: Vec<[Option<Split>; 2]>,
    /// JIT kernels for compressed weights (`Op::Linear` uses them when present).
    kernels: Option<Arc<crate::jit::KernelSet>>,
    /// Streamed weights to release after each node (empty: everything stays resident).
    release: Vec<Vec<crate::ir::WeightId>>,
}

impl Executor {
    /// The JIT kernels this executor runs compressed weights with, if any (the tuning code
    /// runs the same ones).
    pub fn kernels(&self) -> Option<&Arc<crate::jit::KernelSet>> {
        self.kernels.as_ref()
    }

    pub fn new(graph: Arc<Graph>) -> Result<Self> {
        graph.verify()?;
        let order: Vec<usize> = (0..graph.nodes.len()).collect();
        Ok(Executor {
            last_pos: last_positions(&graph, &order),
            order,
            graph,
            arena: None,
            splits: vec![],
            kernels: None,
            release: vec![],
        })
    }

    /// Follows a schedule (a bundle's, see `Bundle::plan`), after checking it against the
    /// graph ([`ExecPlan::check`]: a mismatch is an error naming the node). With
    /// `follow.memory` the nodes run in the plan's order and every value the plan's arena
    /// places lives at its offset of one arena buffer allocated here (sized by the plan);
    /// values it does not place, values larger than their planned buffer (a step longer
    /// than the planned one), seeds of [`run_span`](Self::run_span) and the values a
    /// step returns to its caller (the logits) are allocated. With `follow.kernels` the
    /// kernels use the plan's tiles and threads.
    pub fn with_plan(mut self, plan: &ExecPlan, follow: Follow) -> Result<Self> {
        plan.check(&self.graph)?;
        if follow.memory {
            self.order = plan.order();
            self.last_pos = last_positions(&self.graph, &self.order);
            self.arena = Some(ArenaPlan::new(plan, self.graph.values.len()));
        }
        if follow.kernels {
            self.splits = vec![[None; 2]; self.graph.nodes.len()];
            for p in &plan.ops {
                let split = |tile: &Option<crate::plan::Tile>, threads: usize| {
                    tile.as_ref().map(|t| Split {
                        weight_rows: t.weight_rows,
                        token_rows: t.token_rows,
                        threads,
                    })
                };
                self.splits[p.node] = [
                    split(&p.tile, p.threads),
                    split(&p.decode_tile, p.decode_threads.unwrap_or(p.threads)),
                ];
            }
        }
        Ok(self)
    }

    /// Bytes of the arena this executor places values in (0 without a plan).
    pub fn arena_bytes(&self) -> usize {
        self.arena.as_ref().map_or(0, |a| 4 * a.floats)
    }

    /// Where each value of a step lives: `Some((byte offset, capacity))` in the arena, or
    /// `None` for an allocated value.
    pub fn arena_slots(&self) -> Vec<Option<(usize, usize)>> {
        match &self.arena {
            Some(a) => a.slots.iter().map(|s| s.map(|(o, c)| (4 * o, 4 * c))).collect(),
            None => vec![None; self.graph.values.len()],
        }
    }

    /// Follows a schedule's residency: the pages of each weight of `streamed` are released
    /// after every node that reads it (`exec_stream`), so only the running op's streamed
    /// weight is held. Weight ids out of range are an error.
    pub fn with_streamed_weights(mut self, streamed: &[crate::ir::WeightId]) -> Result<Self> {
        let g = &*self.graph;
        if let Some(bad) = streamed.iter().find(|w| w.0 >= g.weights.len()) {
            return Err(RuntimeError::Invalid(format!(
                "streamed weight {} does not exist ({} weights)",
                bad.0,
                g.weights.len()
            )));
        }
        self.release = g
            .nodes
            .iter()
            .map(|n| {
                let w = match &n.op {
                    Op::Embedding { table } => Some(*table),
                    Op::RmsNorm { weight, .. } | Op::Linear { weight } => Some(*weight),
                    _ => None,
                };
                w.filter(|w| streamed.contains(w)).into_iter().collect()
            })
            .collect();
        Ok(self)
    }

    /// An executor whose linear ops on compressed weights run the JIT kernels of
    /// `kernels` (weights without kernels run the reference kernels).
    pub fn with_kernels(graph: Arc<Graph>, kernels: Arc<crate::jit::KernelSet>) -> Result<Self> {
        Ok(Executor {
            kernels: Some(kernels),
            ..Executor::new(graph)?
        })
    }

    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    /// A new empty session holding up to `capacity` positions.
    pub fn session(&self, capacity: usize) -> Session {
        let c = &self.graph.config;
        let kvw = c.num_kv_heads * c.head_dim;
        let mut rope: Vec<RopeTable> = vec![];
        for n in &self.graph.nodes {
            if let Op::Rope { theta, head_dim, .. } = n.op
                && !rope.iter().any(|r| r.theta == theta && r.head_dim == head_dim)
            {
                rope.push(RopeTable::new(theta, head_dim, capacity));
            }
        }
        Session {
            kv: (0..c.num_layers).map(|_| KvSlot::new(capacity, kvw)).collect(),
            rope,
            pos: 0,
            capacity,
        }
    }

    /// Feeds `tokens` (the next positions of the session's sequence) through the graph.
    /// Returns the logits of `rows` and the values named in `taps`.
    pub fn forward(
        &self,
        s: &mut Session,
        tokens: &[u32],
        rows: Rows,
        taps: &[ValueId],
    ) -> Result<StepOutput> {
        let g = &*self.graph;
        let c = &g.config;
        let n = tokens.len();
        if n == 0 {
            return Err(RuntimeError::Invalid("forward: no tokens".into()));
        }
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= c.vocab_size) {
            return Err(RuntimeError::BadToken {
                id: bad,
                vocab: c.vocab_size,
            });
        }
        let out_rows = match rows {
            Rows::All => 0..n,
            Rows::Last => n - 1..n,
            Rows::Range(r) => {
                if r.start >= r.end || r.end > n {
                    return Err(RuntimeError::Invalid(format!(
                        "output rows {r:?} outside the step's {n} tokens"
                    )));
                }
                r
            }
        };
        let mut keep = taps.to_vec();
        keep.push(g.logits);
        let mut kept = self.execute(s, tokens, n, vec![], 0..g.nodes.len(), out_rows.clone(), &keep)?;
        let logits = kept.pop().expect("logits kept");
        Ok(StepOutput {
            logits,
            rows: out_rows,
            taps: kept,
        })
    }

    /// Runs only the nodes `span` (e.g. one decoder layer, see [`Graph::layer_span`]) on
    /// `rows` new positions of the session, with `seeds` giving the values the span reads
    /// from outside it (e.g. the residual stream entering the layer). Returns the values
    /// named in `outputs`. The span may not contain an `Embedding` (it needs token ids).
    pub fn run_span(
        &self,
        s: &mut Session,
        rows: usize,
        seeds: Vec<(ValueId, Vec<f32>)>,
        span: Range<usize>,
        outputs: &[ValueId],
    ) -> Result<Vec<Vec<f32>>> {
        let g = &*self.graph;
        if span.end > g.nodes.len() || span.start >= span.end {
            return Err(RuntimeError::Invalid(format!(
                "node span {span:?} is empty or out of range"
            )));
        }
        if rows == 0 {
            return Err(RuntimeError::Invalid("run_span: no rows".into()));
        }
        for (v, data) in &seeds {
            let w = g.values.get(v.0).map(|i| i.width).unwrap_or(0);
            if w == 0 || data.len() != rows * w {
                return Err(RuntimeError::Invalid(format!(
                    "seed value {} has {} numbers, expected {rows} x {w}",
                    v.0,
                    data.len()
                )));
            }
        }
        self.execute(s, &[], rows, seeds, span, 0..rows, outputs)
    }

    /// The interpreter loop shared by [`forward`](Self::forward) and
    /// [`run_span`](Self::run_span): the span's nodes in the executor's order (the plan's,
    /// or the graph's). Returns the `keep` values in order.
    #[allow(clippy::too_many_arguments)]
    fn execute(
        &self,
        s: &mut Session,
        tokens: &[u32],
        n: usize,
        seeds: Vec<(ValueId, Vec<f32>)>,
        span: Range<usize>,
        out_rows: Range<usize>,
        keep: &[ValueId],
    ) -> Result<Vec<Vec<f32>>> {
        let g = &*self.graph;
        if s.pos + n > s.capacity {
            return Err(RuntimeError::ContextOverflow {
                needed: s.pos + n,
                capacity: s.capacity,
            });
        }
        for t in keep {
            if t.0 >= g.values.len() {
                return Err(RuntimeError::Invalid(format!(
                    "requested value {} does not exist",
                    t.0
                )));
            }
        }
        let start = s.pos;
        let mut vals: Vec<Option<Val>> = (0..g.values.len()).map(|_| None).collect();
        let mut nrows = vec![n; g.values.len()];
        for (v, data) in seeds {
            vals[v.0] = Some(Val::Heap(data));
        }
        let mut kept: Vec<Option<Vec<f32>>> = vec![None; keep.len()];
        for (slot, k) in kept.iter_mut().zip(keep) {
            if let Some(Val::Heap(v)) = &vals[k.0] {
                *slot = Some(v.clone());
            }
        }
        let mut lease = self.arena.as_ref().map(|a| a.lease());
        let mut no_arena: [f32; 0] = [];
        let arena: &mut [f32] = match &mut lease {
            Some(l) => l.floats(),
            None => &mut no_arena,
        };

        for (pos, &idx) in self.order.iter().enumerate() {
            if !span.contains(&idx) {
                continue;
            }
            let node = &g.nodes[idx];
            let width = g.values[node.output.0].width;
            for v in &node.inputs {
                if vals[v.0].is_none() {
                    return Err(RuntimeError::Invalid(format!(
                        "node `{}` reads `{}`, which is neither computed in the span nor seeded",
                        node.name, g.values[v.0].name
                    )));
                }
            }
            let r_in = node.inputs.first().map(|v| nrows[v.0]).unwrap_or(n);
            let r_out = match node.op {
                Op::Embedding { .. } => n,
                Op::OutputRows => out_rows.len(),
                _ => r_in,
            };
            let len = r_out * width;
            // A kept value no later node reads (the logits) moves to the caller: it is
            // allocated, not placed in the arena, so that it outlives the step uncopied.
            let unread = self.last_pos[node.output.0] <= pos;
            let wanted = keep.iter().filter(|k| **k == node.output).count();
            let to_caller = unread && wanted == 1;
            let place = match self.arena.as_ref().and_then(|a| a.slots[node.output.0]) {
                Some((at, cap)) if len <= cap && !to_caller => Some(at..at + len),
                _ => None,
            };
            let mut heap = Vec::new();
            {
                let (ins, placed) = node_io(arena, &vals, &node.inputs, place.clone(), &node.name)?;
                let out: &mut [f32] = match placed {
                    Some(o) => {
                        // A kernel that read its output before writing it would see stale
                        // values of an earlier buffer; debug builds make that visible.
                        #[cfg(debug_assertions)]
                        o.fill(f32::NAN);
                        o
                    }
                    None => {
                        heap = vec![0.0; len];
                        &mut heap
                    }
                };
                self.run_node(s, idx, tokens, n, start, &out_rows, &ins, r_in, out)?;
            }
            nrows[node.output.0] = r_out;
            let mut out = Some(match place {
                Some(r) => Val::Arena(r),
                None => Val::Heap(heap),
            });
            for (slot, k) in kept.iter_mut().zip(keep) {
                if *k == node.output {
                    *slot = Some(match out.take_if(|_| to_caller) {
                        Some(Val::Heap(v)) => v,
                        _ => out.as_ref().expect("not moved").data(arena).to_vec(),
                    });
                }
            }
            vals[node.output.0] = out;
            if let Some(ws) = self.release.get(idx) {
                for w in ws {
                    crate::exec_stream::release_weight(&g.weight(*w).data);
                }
            }
            for v in &node.inputs {
                if self.last_pos[v.0] == pos {
                    vals[v.0] = None;
                }
            }
        }
        s.pos += n;
        kept.into_iter()
            .zip(keep)
            .map(|(k, id)| {
                k.ok_or_else(|| {
                    RuntimeError::Invalid(format!(
                        "value `{}` is not computed by the run",
                        g.values[id.0].name
                    ))
                })
            })
            .collect()
    }

    /// Runs node `idx` on its inputs `ins`, writing its output `out`.
    #[allow(clippy::too_many_arguments)]
    fn run_node(
        &self,
        s: &mut Session,
        idx: usize,
        tokens: &[u32],
        n: usize,
        start: usize,
        out_rows: &Range<usize>,
        ins: &[&[f32]],
        r_in: usize,
        out: &mut [f32],
    ) -> Result<()> {
        let g = &*self.graph;
        let node = &g.nodes[idx];
        let width = g.values[node.output.0].width;
        // The plan's split for this step: the decode one (matvec blocks) for up to 3 rows.
        let split = self
            .splits
            .get(idx)
            .and_then(|s| s[usize::from(r_in <= MATVEC_ROWS)]);
        match &node.op {
            Op::Embedding { table } => {
                if tokens.len() != n {
                    return Err(RuntimeError::Invalid(format!(
                        "node `{}` needs token ids; a span cannot start at an embedding",
                        node.name
                    )));
                }
                let t = &g.weight(*table).data;
                for (row, &tok) in out.chunks_exact_mut(width).zip(tokens) {
                    t.read_row_f32(tok as usize, row);
                }
            }
            Op::RmsNorm { weight, eps } => {
                let w = g
                    .weight(*weight)
                    .tensor()
                    .expect("verified: norm weights are dense");
                rms_norm(ins[0], w, *eps, out);
            }
            Op::Linear { weight } => {
                let w = g.weight(*weight);
                match self.kernels.as_deref().and_then(|k| k.get(&w.name)) {
                    // The generated kernels cut the work their own way.
                    Some(k) => k.linear(ins[0], r_in, &w.data, out)?,
                    None => crate::kernels::linear_split(ins[0], r_in, &w.data, out, split),
                }
            }
            Op::Rope {
                heads,
                head_dim,
                theta,
            } => {
                out.copy_from_slice(ins[0]);
                let table = s
                    .rope
                    .iter()
                    .find(|r| r.theta == *theta && r.head_dim == *head_dim)
                    .expect("session has a table for every Rope op");
                table.apply(out, *heads, start);
            }
            Op::Attention {
                heads,
                kv_heads,
                head_dim,
                layer,
            } => {
                let shape = AttnShape {
                    heads: *heads,
                    kv_heads: *kv_heads,
                    head_dim: *head_dim,
                };
                let threads = split.map(|s| s.threads);
                attention_threads(
                    shape,
                    ins[0],
                    ins[1],
                    ins[2],
                    &mut s.kv[*layer],
                    start,
                    out,
                    threads,
                );
            }
            Op::SwiGlu => swiglu(ins[0], ins[1], out),
            Op::Add => add(ins[0], ins[1], out),
            Op::OutputRows => {
                out.copy_from_slice(&ins[0][out_rows.start * width..out_rows.end * width]);
            }
        }
        Ok(())
    }
}

/// Steps of up to this many rows run the linear kernels as matvecs (`kernels::linear`).
const MATVEC_ROWS: usize = 3;

/// For each value, the last position in `order` of a node that reads it (0: none).
fn last_positions(g: &Graph, order: &[usize]) -> Vec<usize> {
    let mut last = vec![0; g.values.len()];
    for (pos, &i) in order.iter().enumerate() {
        for v in &g.nodes[i].inputs {
            last[v.0] = pos;
        }
    }
    last
}

/// Where a value of a step lives.
enum Val {
    /// Allocated: seeds, values the plan does not place, values returned to the caller,
    /// and every value of an executor without a plan.
    Heap(Vec<f32>),
    /// f32s of the arena buffer.
    Arena(Range<usize>),
}

impl Val {
    fn data<'a>(&'a self, arena: &'a [f32]) -> &'a [f32] {
        match self {
            Val::Heap(v) => v,
            Val::Arena(r) => &arena[r.clone()],
        }
    }
}

/// A node's input slices and, when its output is in the arena, the output's slice.
type NodeIo<'a> = (Vec<&'a [f32]>, Option<&'a mut [f32]>);

/// The inputs of a node and, when its output is `place`d in the arena, the output's
/// slice. The arena plan guarantees that a node's output never shares bytes with its
/// inputs (they are live together); a plan that broke this is an error, not aliasing.
fn node_io<'a>(
    arena: &'a mut [f32],
    vals: &'a [Option<Val>],
    inputs: &[ValueId],
    place: Option<Range<usize>>,
    node: &str,
) -> Result<NodeIo<'a>> {
    let (lo, out, hi, at) = match place {
        Some(r) => {
            let (lo, rest) = arena.split_at_mut(r.start);
            let (out, hi) = rest.split_at_mut(r.len());
            (&*lo, Some(out), &*hi, r)
        }
        None => (&*arena, None, &[][..], usize::MAX..usize::MAX),
    };
    let ins = inputs
        .iter()
        .map(|v| match vals[v.0].as_ref().expect("inputs checked") {
            Val::Heap(h) => Ok(h.as_slice()),
            Val::Arena(r) if r.end <= at.start => Ok(&lo[r.clone()]),
            Val::Arena(r) if r.start >= at.end => Ok(&hi[r.start - at.end..r.end - at.end]),
            Val::Arena(_) => Err(RuntimeError::Invalid(format!(
                "arena: the output of node `{node}` overlaps its input value {}",
                v.0
            ))),
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((ins, out))
}

/// The arena of an executor that follows a plan: where each value goes, and the buffers.
struct ArenaPlan {
    /// Per value: its f32 offset and capacity in the arena (`None`: allocated).
    slots: Vec<Option<(usize, usize)>>,
    floats: usize,
    /// Arena buffers no step is using. One is allocated with the executor (its pages are
    /// touched only as values use them); steps running at the same time take more.
    pool: Mutex<Vec<Vec<f32>>>,
}

/// f32s of headroom so that the arena can start on an [`ALIGN`]-byte boundary.
const ALIGN_FLOATS: usize = ALIGN as usize / 4;

impl ArenaPlan {
    fn new(plan: &ExecPlan, values: usize) -> ArenaPlan {
        let mut slots = vec![None; values];
        for b in &plan.arena.buffers {
            slots[b.value] = Some((b.offset as usize / 4, b.size as usize / 4));
        }
        let floats = (plan.arena.size as usize).div_ceil(4);
        let a = ArenaPlan {
            slots,
            floats,
            pool: Mutex::new(vec![]),
        };
        let first = a.allocate();
        a.pool.lock().expect("arena pool").push(first);
        a
    }

    fn allocate(&self) -> Vec<f32> {
        vec![0.0; self.floats + ALIGN_FLOATS]
    }

    fn lease(&self) -> Lease<'_> {
        let buf = self.pool.lock().map(|mut p| p.pop()).unwrap_or(None);
        let buf = buf.unwrap_or_else(|| self.allocate());
        let base = buf.as_ptr().align_offset(ALIGN as usize);
        Lease {
            arena: self,
            buf,
            base: if base < ALIGN_FLOATS { base } else { 0 },
        }
    }
}

/// An arena buffer in use by one step; back to the pool when the step ends.
struct Lease<'a> {
    arena: &'a ArenaPlan,
    buf: Vec<f32>,
    base: usize,
}

impl Lease<'_> {
    fn floats(&mut self) -> &mut [f32] {
        let n = self.arena.floats;
        &mut self.buf[self.base..self.base + n]
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        if let Ok(mut p) = self.arena.pool.lock() {
            p.push(std::mem::take(&mut self.buf));
        }
    }
}
