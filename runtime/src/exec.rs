//! The executor: interprets an IR graph, one step (a batch of new tokens of one sequence)
//! at a time, with a KV cache per session.

use std::ops::Range;
use std::sync::Arc;

use crate::error::{Result, RuntimeError};
use crate::ir::{Graph, Op, ValueId};
use crate::ops::activation::{add, swiglu};
use crate::ops::attention::{AttnShape, KvSlot, attention};
use crate::ops::norm::rms_norm;
use crate::ops::rope::RopeTable;

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

/// Runs a verified graph.
pub struct Executor {
    graph: Arc<Graph>,
    /// For each value, the index of the last node that reads it (to free it early).
    last_use: Vec<usize>,
    /// JIT kernels for compressed weights (`Op::Linear` uses them when present).
    kernels: Option<Arc<crate::jit::KernelSet>>,
    /// Streamed weights to release after each node (empty: everything stays resident).
    release: Vec<Vec<crate::ir::WeightId>>,
}

impl Executor {
    pub fn new(graph: Arc<Graph>) -> Result<Self> {
        graph.verify()?;
        let mut last_use = vec![0; graph.values.len()];
        for (i, n) in graph.nodes.iter().enumerate() {
            for v in &n.inputs {
                last_use[v.0] = i;
            }
        }

        Ok(Executor {
            graph,
            last_use,
            kernels: None,
            release: vec![],
        })
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
    /// [`run_span`](Self::run_span). Returns the `keep` values in order.
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
        let mut vals: Vec<Option<Vec<f32>>> = vec![None; g.values.len()];
        let mut nrows = vec![n; g.values.len()];
        for (v, data) in seeds {
            vals[v.0] = Some(data);
        }
        let mut kept: Vec<Option<Vec<f32>>> = vec![None; keep.len()];
        for (slot, k) in kept.iter_mut().zip(keep) {
            if let Some(v) = &vals[k.0] {
                *slot = Some(v.clone());
            }
        }

        for idx in span {
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
            let get = |i: usize| vals[node.inputs[i].0].as_deref().expect("checked above");
            let (out, r_out) = match &node.op {
                Op::Embedding { table } => {
                    if tokens.len() != n {
                        return Err(RuntimeError::Invalid(format!(
                            "node `{}` needs token ids; a span cannot start at an embedding",
                            node.name
                        )));
                    }
                    let t = &g.weight(*table).data;
                    let mut o = vec![0.0; n * width];
                    for (row, &tok) in o.chunks_exact_mut(width).zip(tokens) {
                        t.read_row_f32(tok as usize, row);
                    }
                    (o, n)
                }
                Op::RmsNorm { weight, eps } => {
                    let mut o = vec![0.0; r_in * width];
                    let w = g
                        .weight(*weight)
                        .tensor()
                        .expect("verified: norm weights are dense");
                    rms_norm(get(0), w, *eps, &mut o);
                    (o, r_in)
                }
                Op::Linear { weight } => {
                    let mut o = vec![0.0; r_in * width];
                    let w = g.weight(*weight);
                    crate::jit::linear(self.kernels.as_deref(), &w.name, get(0), r_in, &w.data, &mut o)?;
                    (o, r_in)
                }
                Op::Rope {
                    heads,
                    head_dim,
                    theta,
                } => {
                    let mut o = get(0).to_vec();
                    let table = s
                        .rope
                        .iter()
                        .find(|r| r.theta == *theta && r.head_dim == *head_dim)
                        .expect("session has a table for every Rope op");
                    table.apply(&mut o, *heads, start);
                    (o, r_in)
                }
                Op::Attention {
                    heads,
                    kv_heads,
                    head_dim,
                    layer,
                } => {
                    let mut o = vec![0.0; r_in * width];
                    let shape = AttnShape {
                        heads: *heads,
                        kv_heads: *kv_heads,
                        head_dim: *head_dim,
                    };
                    attention(shape, get(0), get(1), get(2), &mut s.kv[*layer], start, &mut o);
                    (o, r_in)
                }
                Op::SwiGlu => {
                    let mut o = vec![0.0; r_in * width];
                    swiglu(get(0), get(1), &mut o);
                    (o, r_in)
                }
                Op::Add => {
                    let mut o = vec![0.0; r_in * width];
                    add(get(0), get(1), &mut o);
                    (o, r_in)
                }
                Op::OutputRows => {
                    let x = get(0);
                    (
                        x[out_rows.start * width..out_rows.end * width].to_vec(),
                        out_rows.len(),
                    )
                }
            };
            nrows[node.output.0] = r_out;
            // A kept value no later node reads (the logits) moves to the caller: no copy.
            let unread = self.last_use[node.output.0] <= idx;
            let wanted = keep.iter().filter(|k| **k == node.output).count();
            let mut out = Some(out);
            for (slot, k) in kept.iter_mut().zip(keep) {
                if *k == node.output {
                    *slot = if unread && wanted == 1 {
                        out.take()
                    } else {
                        out.clone()
                    };
                }
            }
            vals[node.output.0] = out;
            if let Some(ws) = self.release.get(idx) {
                for w in ws {
                    crate::exec_stream::release_weight(&g.weight(*w).data);
                }
            }
            for v in &node.inputs {
                if self.last_use[v.0] == idx {
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
}
