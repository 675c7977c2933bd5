//! The static memory plan: every activation value gets an offset in one arena, and values
//! whose lifetimes do not overlap share bytes.
//!
//! A value lives from the node that defines it to the last node that reads it (the logits
//! and the values a step returns live to the end). Offsets are chosen greedily, largest
//! value first, each at the lowest 64-byte-aligned offset that does not overlap a value
//! already placed whose lifetime overlaps its own (the usual first-fit heuristic for
//! offline buffer sharing). [`Arena::verify`] checks the result independently.

use serde::{Deserialize, Serialize};

/// Alignment of every buffer (a cache line; also what AVX-512 loads like).
pub const ALIGN: u64 = 64;

/// One value's place in the arena.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Buffer {
    /// Index of the value in the graph.
    pub value: usize,
    pub offset: u64,
    pub size: u64,
    /// First and last node index (inclusive) during which the bytes are in use.
    pub first: usize,
    pub last: usize,
}

/// The arena of a graph for one workload.
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

    /// Bytes in use while node `idx` runs.
    pub fn live_at(&self, idx: usize) -> u64 {
        self.buffers
            .iter()
            .filter(|b| b.first <= idx && idx <= b.last)
            .map(|b| b.size)
            .sum()
    }

    /// Checks alignment, bounds and that no two buffers live at the same time share bytes.
    pub fn verify(&self) -> Result<(), String> {
        for (i, a) in self.buffers.iter().enumerate() {
            if a.offset % ALIGN != 0 {
                return Err(format!(
                    "buffer of value {} at offset {} is not aligned",
                    a.value, a.offset
                ));
            }
            if a.offset + a.size > self.size || a.first > a.last {
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
