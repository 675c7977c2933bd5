//! The part of a bundle's schedule the runtime follows (`docs/schedule.md`).
//!
//! The scheduling pass lives in the compiler (`edgec::schedule`) and writes its whole plan
//! into the bundle as JSON. The runtime never depends on the compiler, so the types both
//! sides read are defined here and the compiler re-exports them: the step a plan is made
//! for ([`Workload`]) and how many rows each value has in it ([`value_rows`]), an op's
//! tile ([`Tile`]), the static memory plan ([`Arena`], [`Buffer`], [`lifetimes`]), and
//! [`ExecPlan`], the view of the serialised plan the executor follows: the node order, the
//! arena, each node's tile and threads, and the tuning window's keep-vs-recompute decision.
//! [`ExecPlan::check`] verifies it against the graph it is to run.

use serde::{Deserialize, Serialize};

use crate::error::{Result, RuntimeError};
use crate::ir::{Graph, Op};

/// Alignment of every arena buffer (a cache line; also what AVX-512 loads like).
pub const ALIGN: u64 = 64;

/// The step a plan is made for: `rows` new tokens of one sequence after `past` cached
/// positions; the ops after `OutputRows` run on `out_rows` rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Workload {
    pub rows: usize,
    pub past: usize,
    pub out_rows: usize,
}

impl Workload {
    /// One generated token after `past` positions.
    pub fn decode(past: usize) -> Workload {
        Workload {
            rows: 1,
            past,
            out_rows: 1,
        }
    }
    /// A prefill of `rows` tokens from an empty cache, logits of the last row.
    pub fn prefill(rows: usize) -> Workload {
        Workload {
            rows,
            past: 0,
            out_rows: 1,
        }
    }
    /// Positions the KV cache holds after the step.
    pub fn context(&self) -> usize {
        self.past + self.rows
    }
}

/// Token rows of every value in a step of workload `w` (the values after `OutputRows`
/// have `out_rows`).
pub fn value_rows(g: &Graph, w: &Workload) -> Vec<usize> {
    let mut rows = vec![w.rows; g.values.len()];
    for n in &g.nodes {
        rows[n.output.0] = match n.op {
            Op::Embedding { .. } => w.rows,
            Op::OutputRows => w.out_rows.min(w.rows),
            _ => n.inputs.first().map_or(w.rows, |v| rows[v.0]),
        };
    }
    rows
}

/// One op's tile.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tile {
    /// Weight rows (output features) a tile covers; for attention, cached positions.
    pub weight_rows: usize,
    /// Token rows a tile covers.
    pub token_rows: usize,
    /// Bytes of the tile's working set.
    pub bytes: u64,
    /// The memory level (its name in the target) the working set fits in; `DRAM` when no
    /// on-chip level holds even the smallest tile.
    pub level: String,
}

/// One value's place in the arena.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Buffer {
    /// Index of the value in the graph.
    pub value: usize,
    pub offset: u64,
    pub size: u64,
    /// First and last step position (inclusive) during which the bytes are in use.
    pub first: usize,
    pub last: usize,
}

/// The static memory plan of a graph for one workload: every activation value an offset
/// in one arena, values whose lifetimes do not overlap sharing bytes.
///
/// A value lives from the position of the node that defines it to the position of the
/// last node that reads it (the logits to the end). Offsets are chosen greedily, largest
/// value first, each at the lowest 64-byte-aligned offset that does not overlap a value
/// already placed whose lifetime overlaps its own (the usual first-fit heuristic for
/// offline buffer sharing). [`Arena::verify`] checks the result independently.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Arena {
    /// Bytes of the whole arena.
    pub size: u64,
    /// What a plan without sharing would need (the sum of all values).
    pub unshared: u64,
    pub buffers: Vec<Buffer>,
}

fn overlaps(a: (usize, usize), b: (usize, usize)) -> bool {
    a.0 <= b.1 && b.0 <= a.1
}

impl Arena {
    /// Plans buffers of `(value, size, first, last)`.
    pub fn plan(values: &[(usize, u64, usize, usize)]) -> Arena {
        let mut order: Vec<usize> = (0..values.len()).collect();
        order.sort_by_key(|&i| (std::cmp::Reverse(values[i].1), values[i].2));
        let mut placed: Vec<Buffer> = Vec::with_capacity(values.len());
        for i in order {
            let (value, size, first, last) = values[i];
            let size_al = size.div_ceil(ALIGN) * ALIGN;
            let mut busy: Vec<(u64, u64)> = placed
                .iter()
                .filter(|b| overlaps((b.first, b.last), (first, last)))
                .map(|b| (b.offset, b.offset + b.size.div_ceil(ALIGN) * ALIGN))
                .collect();
            busy.sort();
            let mut offset = 0;
            for (s, e) in busy {
                if offset + size_al <= s {
                    break;
                }
                offset = offset.max(e);
            }
            placed.push(Buffer {
                value,
                offset,
                size,
                first,
                last,
            });
        }
        placed.sort_by_key(|b| (b.first, b.value));
        Arena {
            size: placed.iter().map(|b| b.offset + b.size).max().unwrap_or(0),
            unshared: values.iter().map(|v| v.1).sum(),
            buffers: placed,
        }
    }

    /// The arena of `g` for workload `w` when its nodes run in `order`.
    pub fn for_graph(g: &Graph, w: &Workload, order: &[usize]) -> Arena {
        let rows = value_rows(g, w);
        let values: Vec<(usize, u64, usize, usize)> = lifetimes(g, order)
            .into_iter()
            .enumerate()
            .filter_map(|(v, life)| {
                life.map(|(first, last)| (v, 4 * (rows[v] * g.values[v].width) as u64, first, last))
            })
            .collect();
        Arena::plan(&values)
    }

    /// Bytes in use while the node at position `pos` runs.
    pub fn live_at(&self, pos: usize) -> u64 {
        self.buffers
            .iter()
            .filter(|b| b.first <= pos && pos <= b.last)
            .map(|b| b.size)
            .sum()
    }

    /// Checks alignment, bounds and that no two buffers live at the same time share bytes.
    pub fn verify(&self) -> std::result::Result<(), String> {
        for (i, a) in self.buffers.iter().enumerate() {
            if a.offset % ALIGN != 0 {
                return Err(format!(
                    "buffer of value {} at offset {} is not aligned",
                    a.value, a.offset
                ));
            }
            if a.offset.checked_add(a.size).is_none_or(|end| end > self.size) || a.first > a.last {
                return Err(format!("buffer of value {} lies outside the arena", a.value));
            }
            for b in &self.buffers[i + 1..] {
                if overlaps((a.first, a.last), (b.first, b.last))
                    && a.offset < b.offset + b.size
                    && b.offset < a.offset + a.size
                {
                    return Err(format!(
                        "values {} and {} are live together and share bytes [{}, {})",
                        a.value,
                        b.value,
                        a.offset.max(b.offset),
                        (a.offset + a.size).min(b.offset + b.size)
                    ));
                }
            }
        }
        Ok(())
    }
}

/// The lifetime of every value when the nodes run in `order` (node indices): the position
/// of its defining node and of its last reader (the logits live to the end); `None` for a
/// value no node of `order` defines.
pub fn lifetimes(g: &Graph, order: &[usize]) -> Vec<Option<(usize, usize)>> {
    let mut life: Vec<Option<(usize, usize)>> = vec![None; g.values.len()];
    for (pos, &i) in order.iter().enumerate() {
        let node = &g.nodes[i];
        life[node.output.0] = Some((pos, pos));
        for v in &node.inputs {
            if let Some((_, last)) = &mut life[v.0] {
                *last = (*last).max(pos);
            }
        }
    }
    if let Some((_, last)) = &mut life[g.logits.0] {
        *last = order.len().saturating_sub(1);
    }
    life
}

/// What the runtime follows of one node's plan (the compiler's `OpPlan` holds it
/// flattened, beside the predicted costs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodePlan {
    /// Index of the node in the graph.
    pub node: usize,
    pub name: String,
    /// The tile and threads of the planned workload (a prefill: GEMM tiles).
    pub tile: Option<Tile>,
    pub threads: usize,
    /// The tile and threads of a decode step (one row: matvec row blocks); plans written
    /// before they were recorded have none.
    #[serde(default)]
    pub decode_tile: Option<Tile>,
    #[serde(default)]
    pub decode_threads: Option<usize>,
}

/// The keep-vs-recompute decision for a tuning window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct TuningDecision {
    /// Window layers `first..=exit`.
    pub first: usize,
    pub exit: usize,
    /// Tokens a tuning sample holds.
    pub seq: usize,
    pub recompute: bool,
}

/// The schedule as the runtime follows it: the subset of `edgec::schedule::Schedule`'s
/// JSON the executor uses (other fields are ignored).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ExecPlan {
    pub target: String,
    pub workload: Workload,
    pub context: usize,
    pub cores: usize,
    /// One plan per node, in the order the nodes run.
    pub ops: Vec<NodePlan>,
    pub arena: Arena,
    #[serde(default)]
    pub recompute: Option<TuningDecision>,
}

fn invalid(msg: String) -> RuntimeError {
    RuntimeError::Invalid(format!("schedule: {msg}"))
}

impl ExecPlan {
    /// Parses the plan (`Schedule.plan_json` of a bundle).
    pub fn from_json(json: &str) -> Result<ExecPlan> {
        serde_json::from_str(json).map_err(|e| invalid(format!("the plan does not parse: {e}")))
    }

    /// Node indices in the order the plan runs them.
    pub fn order(&self) -> Vec<usize> {
        self.ops.iter().map(|p| p.node).collect()
    }

    /// Verifies the plan against the graph it is to run: one plan per node, an order in
    /// which every value is defined before it is read, every arena buffer the size of its
    /// value in the planned workload and live exactly from its definition to its last
    /// reader in that order, no two buffers live together sharing bytes, and sane tiles and
    /// threads. Errors name the node.
    pub fn check(&self, g: &Graph) -> Result<()> {
        let n = g.nodes.len();
        if self.ops.len() != n {
            return Err(invalid(format!(
                "the plan has {} node plans, the graph has {n} nodes",
                self.ops.len()
            )));
        }
        let w = &self.workload;
        if w.rows == 0 || w.out_rows == 0 || w.out_rows > w.rows || w.context() > self.context {
            return Err(invalid(format!(
                "the planned step ({} rows after {}, {} output rows) does not fit its context {}",
                w.rows, w.past, w.out_rows, self.context
            )));
        }
        let mut seen = vec![false; n];
        let mut defined = vec![false; g.values.len()];
        for (pos, p) in self.ops.iter().enumerate() {
            let node = g.nodes.get(p.node).ok_or_else(|| {
                invalid(format!(
                    "step {pos} runs node {} (`{}`), the graph has {n} nodes",
                    p.node, p.name
                ))
            })?;
            if p.name != node.name {
                return Err(invalid(format!(
                    "step {pos} is planned for node `{}`, node {} of the graph is `{}`",
                    p.name, p.node, node.name
                )));
            }
            if std::mem::replace(&mut seen[p.node], true) {
                return Err(invalid(format!("node `{}` is planned twice", node.name)));
            }
            if let Some(v) = node.inputs.iter().find(|v| !defined[v.0]) {
                return Err(invalid(format!(
                    "node `{}` is planned before `{}`, which it reads, is computed",
                    node.name, g.values[v.0].name
                )));
            }
            defined[node.output.0] = true;
            let threads = [Some(p.threads), p.decode_threads];
            if threads.iter().flatten().any(|&t| t == 0) {
                return Err(invalid(format!("node `{}` is planned on 0 threads", node.name)));
            }
            for t in [&p.tile, &p.decode_tile].into_iter().flatten() {
                if t.weight_rows == 0 || t.token_rows == 0 {
                    return Err(invalid(format!(
                        "node `{}` has an empty tile ({} x {})",
                        node.name, t.weight_rows, t.token_rows
                    )));
                }
            }
        }
        self.arena.verify().map_err(|e| invalid(format!("arena: {e}")))?;
        let rows = value_rows(g, w);
        let life = lifetimes(g, &self.order());
        let mut definer = vec![usize::MAX; g.values.len()];
        for (i, node) in g.nodes.iter().enumerate() {
            definer[node.output.0] = i;
        }
        let mut covered = vec![false; g.values.len()];
        for b in &self.arena.buffers {
            let Some(&node) = definer.get(b.value).filter(|&&d| d != usize::MAX) else {
                return Err(invalid(format!(
                    "the arena places value {}, which no node computes",
                    b.value
                )));
            };
            let name = &g.nodes[node].name;
            if std::mem::replace(&mut covered[b.value], true) {
                return Err(invalid(format!(
                    "node `{name}`: its output is placed in the arena twice"
                )));
            }
            let width = g.values[b.value].width;
            let need = 4 * (rows[b.value] * width) as u64;
            if b.size != need {
                return Err(invalid(format!(
                    "node `{name}`: its output `{}` is planned {} bytes, the graph needs {need} ({} rows x {width} f32)",
                    g.values[b.value].name, b.size, rows[b.value]
                )));
            }
            if life[b.value] != Some((b.first, b.last)) {
                let (f, l) = life[b.value].expect("defined values have a lifetime");
                return Err(invalid(format!(
                    "node `{name}`: its output `{}` is planned live over steps {}..={}, it is used over {f}..={l}",
                    g.values[b.value].name, b.first, b.last
                )));
            }
        }
        Ok(())
    }

    /// Values some node computes that the arena does not place (the executor allocates
    /// them); none in the plans `edgec` writes.
    pub fn uncovered(&self, g: &Graph) -> Vec<usize> {
        let mut covered = vec![false; g.values.len()];
        for b in &self.arena.buffers {
            if let Some(c) = covered.get_mut(b.value) {
                *c = true;
            }
        }
        g.nodes
            .iter()
            .map(|n| n.output.0)
            .filter(|&v| !covered[v])
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disjoint_lifetimes_share_and_overlapping_ones_do_not() {
        // a [0,1], b [1,2], c [2,3]: a and c may share; b overlaps both.
        let a = Arena::plan(&[(0, 100, 0, 1), (1, 100, 1, 2), (2, 100, 2, 3)]);
        a.verify().unwrap();
        assert_eq!(a.unshared, 300);
        assert_eq!(a.size, 128 + 100);
        let mut bad = a.clone();
        bad.buffers[1].offset = 0;
        assert!(bad.verify().is_err());
    }
}
