//! The thread split: how many of the target's cores each op runs on.
//!
//! An op is split only when each thread gets enough work to pay for the fork and join
//! (`MIN_FLOPS_PER_THREAD` or `MIN_BYTES_PER_THREAD`), and never into more parts than it
//! has tiles (weight-row blocks for a linear op, heads for attention).

use edge_runtime::ir::{Graph, Node, Op};

use super::cost::OpCost;
use super::tiling::Tile;

/// Work that pays for one more thread.
const MIN_FLOPS_PER_THREAD: f64 = 2e5;
const MIN_BYTES_PER_THREAD: u64 = 64 << 10;

/// Threads for `node` with `cost` and `tile` on `cores` cores.
pub fn threads(g: &Graph, node: &Node, cost: &OpCost, tile: Option<&Tile>, cores: usize) -> usize {
    let parts = match (&node.op, tile) {
        (Op::Linear { weight }, Some(t)) => g.weight(*weight).shape()[0].div_ceil(t.weight_rows.max(1)),
        (Op::Attention { heads, .. }, _) => *heads,
        // Elementwise ops and norms run on one thread in the runtime.
        _ => 1,
    };
    let by_flops = (cost.flops / MIN_FLOPS_PER_THREAD) as usize;
    let by_bytes = ((cost.weight_bytes + cost.kv_bytes) / MIN_BYTES_PER_THREAD) as usize;
    by_flops.max(by_bytes).clamp(1, cores.max(1)).min(parts.max(1))
}
