//! The cost model: bytes moved and flops of each op, for its weight's storage format, and
//! the time they take against a target's bandwidths and peak compute.
//!
//! An op's time is `overhead + max(compute, memory)`: compute is its flops over the f32
//! peak of the threads it gets (scaled by the target's measured compute efficiency), memory
//! is the weight bytes over the bandwidth of the level the weight is read from (DRAM when
//! resident, storage when streamed) plus the activation and KV-cache bytes over the level
//! they fit in. Every figure comes from the target description (`docs/targets.md`).

use edge_runtime::format::{SparsePattern, ValueFormat, WeightFormat};
use edge_runtime::ir::{Graph, Node, Op};
use serde::{Deserialize, Serialize};

use crate::target::{MemoryKind, MemoryLevel, Target};

/// The step a plan is made for (defined in the runtime, which checks a plan against it).
pub use edge_runtime::plan::Workload;

/// What one op does: arithmetic and traffic.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct OpCost {
    /// Floating-point (or integer) operations, weight decoding included.
    pub flops: f64,
    /// Bytes of weight storage read (its packed size).
    pub weight_bytes: u64,
    /// Bytes of activations read and written.
    pub act_bytes: u64,
    /// Of those, the bytes written to the op's fresh output buffer.
    pub out_bytes: u64,
    /// Fraction of the SIMD peak the runtime's kernel for this op reaches (1 for the
    /// vectorised, threaded linear kernels; 1/16 for scalar loops).
    pub kernel_efficiency: f64,
    /// Bytes of KV cache read and written.
    pub kv_bytes: u64,
}

/// Operations to decode one stored weight value to f32, per format (unpack, scale, add
/// minimum; sparse formats also walk the index).
pub fn decode_ops(f: &WeightFormat) -> f64 {
    match f {
        WeightFormat::Dense { .. } => 0.0,
        WeightFormat::Quant(_) => 2.0,
        WeightFormat::Sparse { pattern, values } => {
            let idx = match pattern {
                SparsePattern::Unstructured => 2.0,
                SparsePattern::NofM { .. } => 1.0,
            };
            idx + match values {
                ValueFormat::F16 => 1.0,
                ValueFormat::Quant(_) => 2.0,
            }
        }
    }
}

/// Token rows of every value in a step (defined in the runtime).
pub use edge_runtime::plan::value_rows;

/// Fraction of the SIMD peak the runtime's kernel for `op` reaches on `rows` rows: the
/// linear kernels are vectorised and threaded; prefill attention runs through gemm
/// between scalar softmax passes; decode attention, norms, SwiGLU (exp) and RoPE are
/// scalar loops (one element a cycle of sixteen SIMD lanes); adds vectorise.
pub fn kernel_efficiency(op: &Op, rows: usize) -> f64 {
    match op {
        Op::Linear { .. } => 1.0,
        Op::Attention { .. } if rows > 3 => 0.25,
        Op::Add | Op::OutputRows | Op::Rope { .. } => 0.25,
        _ => 1.0 / 16.0,
    }
}

/// The cost of `node` in the workload, `rows` being its input rows.
pub fn op_cost(g: &Graph, node: &Node, rows: usize, w: &Workload) -> OpCost {
    let mut c = op_cost_inner(g, node, rows, w);
    let out_rows = match node.op {
        Op::OutputRows => w.out_rows.min(rows),
        _ => rows,
    };
    c.out_bytes = 4 * (out_rows * g.values[node.output.0].width) as u64;
    c.kernel_efficiency = kernel_efficiency(&node.op, rows);
    c
}

fn op_cost_inner(g: &Graph, node: &Node, rows: usize, w: &Workload) -> OpCost {
    let width = g.values[node.output.0].width as u64;
    let r = rows as u64;
    let in_w: u64 = node.inputs.iter().map(|v| g.values[v.0].width as u64).sum();
    let act = 4 * r * (in_w + width);
    match &node.op {
        Op::Embedding { table } => {
            let t = &g.weight(*table).data;
            // Only the step's rows of the table are read.
            let row_bytes = t.storage_bytes() as u64 / t.shape()[0].max(1) as u64;
            OpCost {
                flops: (r * width) as f64 * (1.0 + decode_ops(&t.format())),
                weight_bytes: r * row_bytes,
                act_bytes: 4 * r * width,
                kv_bytes: 0,
                ..Default::default()
            }
        }
        Op::RmsNorm { weight, .. } => OpCost {
            flops: 2.0 * (r * width) as f64,
            weight_bytes: g.weight(*weight).data.storage_bytes() as u64,
            act_bytes: act,
            kv_bytes: 0,
            ..Default::default()
        },
        Op::Linear { weight } => {
            let wd = &g.weight(*weight).data;
            let (out, inp) = (wd.shape()[0] as f64, wd.shape()[1] as f64);
            // Matvec (<= 3 rows) decodes inside each row's dot; GEMM tiles decode once.
            let decode = decode_ops(&wd.format()) * out * inp * if rows <= 3 { r as f64 } else { 1.0 };
            OpCost {
                flops: 2.0 * r as f64 * out * inp + decode,
                weight_bytes: wd.storage_bytes() as u64,
                act_bytes: act,
                kv_bytes: 0,
                ..Default::default()
            }
        }
        Op::Rope { .. } => OpCost {
            flops: 3.0 * (r * width) as f64,
            weight_bytes: 0,
            act_bytes: act,
            kv_bytes: 0,
            ..Default::default()
        },
        Op::Attention {
            heads,
            kv_heads,
            head_dim,
            ..
        } => {
            // Causal: row i attends to past + i + 1 positions.
            let attended = r * w.past as u64 + r * (r + 1) / 2;
            let (h, kvh, hd) = (*heads as u64, *kv_heads as u64, *head_dim as u64);
            // QK^T and PV (2 flops a multiply-add each), softmax (~5 a score).
            let flops = (4 * hd + 5) * h * attended;
            // The cache is read once per step for decode (every row reads all of it for a
            // prefill, but from cache: counted once) and the new rows are written.
            let kv_read = 2 * 4 * kvh * hd * (w.past as u64 + r);
            let kv_write = 2 * 4 * kvh * hd * r;
            OpCost {
                flops: flops as f64,
                weight_bytes: 0,
                act_bytes: act,
                kv_bytes: kv_read + kv_write,
                ..Default::default()
            }
        }
        Op::SwiGlu => OpCost {
            flops: 6.0 * (r * width) as f64,
            weight_bytes: 0,
            act_bytes: act,
            kv_bytes: 0,
            ..Default::default()
        },
        Op::Add => OpCost {
            flops: (r * width) as f64,
            weight_bytes: 0,
            act_bytes: act,
            kv_bytes: 0,
            ..Default::default()
        },
        Op::OutputRows => OpCost {
            flops: 0.0,
            weight_bytes: 0,
            act_bytes: 8 * w.out_rows.min(rows) as u64 * width,
            kv_bytes: 0,
            ..Default::default()
        },
    }
}

/// The figures of a target the model reads, efficiencies applied.
#[derive(Debug, Clone)]
pub struct Machine {
    /// f32 operations a second of all cores.
    pub flops_per_s: f64,
    pub cores: usize,
    /// Bytes a second from DRAM and from the storage level (DRAM when none).
    pub dram_bw: f64,
    pub storage_bw: f64,
    /// On-chip levels fastest first: (size of one instance, bandwidth B/s, per core).
    pub onchip: Vec<(u64, f64, bool)>,
    /// Fixed cost of dispatching one op, seconds.
    pub op_overhead_s: f64,
    /// Extra fixed cost of an op that runs on more than one thread, seconds.
    pub parallel_overhead_s: f64,
}

impl Machine {
    pub fn of(t: &Target) -> Machine {
        let e = &t.efficiency;
        let bw = |l: &MemoryLevel| l.bandwidth_gb_s * 1e9 * e.bandwidth;
        let dram = t.dram();
        let storage = t.memory.iter().find(|l| l.kind == MemoryKind::Storage);
        Machine {
            flops_per_s: t.peak_gflops.f32 * 1e9 * e.compute,
            cores: t.cores.max(1),
            dram_bw: bw(dram),
            storage_bw: storage.map_or(bw(dram), bw),
            onchip: t
                .memory
                .iter()
                .filter(|l| matches!(l.kind, MemoryKind::Sram | MemoryKind::Cache))
                .map(|l| (l.size_bytes, bw(l), l.per_core))
                .collect(),
            op_overhead_s: e.op_overhead_us * 1e-6,
            parallel_overhead_s: e.parallel_overhead_us * 1e-6,
        }
    }

    /// The bandwidth for a working set of `bytes` read by `threads` threads: the fastest
    /// level that holds it, else DRAM.
    pub fn bandwidth_for(&self, bytes: u64, threads: usize) -> f64 {
        for &(size, bw, per_core) in &self.onchip {
            let cap = if per_core { size * threads as u64 } else { size };
            if bytes <= cap {
                return bw;
            }
        }
        self.dram_bw
    }

    /// Seconds `cost` takes on `threads` threads with its weight read at `weight_bw`.
    pub fn time(&self, cost: &OpCost, threads: usize, weight_bw: f64) -> f64 {
        let threads = threads.clamp(1, self.cores);
        let peak = self.flops_per_s * threads as f64 / self.cores as f64 * cost.kernel_efficiency.max(1e-3);
        let compute = cost.flops / peak;
        // Inputs and the KV cache come from the level that holds them; the output goes to a
        // freshly allocated buffer (first-touch pages): DRAM bandwidth.
        let read = cost.act_bytes.saturating_sub(cost.out_bytes) + cost.kv_bytes;
        let memory = cost.weight_bytes as f64 / weight_bw
            + read as f64 / self.bandwidth_for(read, threads)
            + cost.out_bytes as f64 / self.dram_bw;
        let fixed = self.op_overhead_s
            + if threads > 1 {
                self.parallel_overhead_s
            } else {
                0.0
            };
        fixed + compute.max(memory)
    }
}
