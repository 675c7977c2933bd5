//! Tiling: how each op's work is cut so that a tile's working set fits a memory level.
//!
//! A linear op is cut along its weight rows (and, for several token rows, along the tokens):
//! a tile holds `weight_rows` rows of the weight (decoded to f32 for a GEMM tile, packed for
//! a matvec) and `token_rows` rows of activations, sized to half of the fastest level that
//! can hold it (the other half for the activations streaming through). Attention is cut
//! into blocks of cached positions per head.

use edge_runtime::ir::{Graph, Node, Op};

use crate::target::{MemoryKind, Target};

/// One op's tile (defined in the runtime, which follows it).
pub use edge_runtime::plan::Tile;

/// Smallest tile along the weight rows (one SIMD-friendly block).
const MIN_ROWS: usize = 4;

/// On-chip levels fastest first with the bytes one core may use of each.
fn levels(t: &Target) -> Vec<(String, u64)> {
    t.memory
        .iter()
        .filter(|l| matches!(l.kind, MemoryKind::Sram | MemoryKind::Cache))
        .map(|l| {
            let share = if l.per_core {
                l.size_bytes
            } else {
                l.size_bytes / t.cores.max(1) as u64
            };
            (l.name.clone(), share / 2)
        })
        .collect()
}

/// The largest tile of `unit_bytes` per row (plus `fixed` bytes) that fits a level, up to
/// `total` rows; the fastest level that holds `MIN_ROWS` rows.
fn fit(t: &Target, total: usize, unit_bytes: u64, fixed: u64, token_rows: usize) -> Tile {
    for (name, cap) in levels(t) {
        if cap < fixed + unit_bytes * MIN_ROWS.min(total) as u64 {
            continue;
        }
        let rows = (((cap - fixed) / unit_bytes.max(1)) as usize).clamp(MIN_ROWS.min(total), total);
        // Round down to a multiple of MIN_ROWS unless it is the whole op.
        let rows = if rows < total {
            rows / MIN_ROWS * MIN_ROWS
        } else {
            rows
        };
        return Tile {
            weight_rows: rows,
            token_rows,
            bytes: fixed + unit_bytes * rows as u64,
            level: name,
        };
    }
    Tile {
        weight_rows: MIN_ROWS.min(total),
        token_rows,
        bytes: fixed + unit_bytes * MIN_ROWS.min(total) as u64,
        level: t.dram().name.clone(),
    }
}

/// The tile of `node` on `rows` token rows, if the op is tiled (linear, attention).
pub fn tile(t: &Target, g: &Graph, node: &Node, rows: usize, past: usize) -> Option<Tile> {
    match &node.op {
        Op::Linear { weight } => {
            let w = &g.weight(*weight).data;
            let (out, inp) = (w.shape()[0], w.shape()[1]);
            if rows <= 3 {
                // Matvec: packed weight rows stream through; x stays.
                let row_bytes = (w.storage_bytes() / out.max(1)) as u64;
                Some(fit(t, out, row_bytes, 4 * inp as u64 * rows as u64, rows))
            } else {
                // GEMM: a block of tokens against weight rows decoded to f32.
                let token_rows = rows.min(64);
                let fixed = 4 * (token_rows * inp) as u64;
                Some(fit(t, out, 4 * (inp + token_rows) as u64, fixed, token_rows))
            }
        }
        Op::Attention {
            kv_heads, head_dim, ..
        } => {
            // Per head: a block of cached positions (k and v rows) against the query rows.
            let _ = kv_heads;
            let positions = past + rows;
            let token_rows = rows.min(64);
            let fixed = 4 * (token_rows * head_dim) as u64 * 2;
            Some(fit(
                t,
                positions,
                8 * *head_dim as u64 + 4 * token_rows as u64,
                fixed,
                token_rows,
            ))
        }
        _ => None,
    }
}
