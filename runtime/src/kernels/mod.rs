//! Kernels: the inner loops that touch weights. Dense products go through the `gemm`
//! crate; vector dot products of a weight row with an activation are explicit SIMD
//! (x86-64 AVX2/FMA/F16C) with a portable fallback; the exponential of a softmax row is
//! eight lanes at a time through the `wide` crate. All `unsafe` of the numeric code lives
//! in this module.

pub mod dot;
pub mod exp;
pub mod linear;
pub mod matmul;

pub use linear::{Split, linear, linear_split, linear_transposed};

/// Rows each thread of the pool takes when `rows` rows are cut into one band a thread
/// (at least 1).
pub(crate) fn rows_per_thread(rows: usize) -> usize {
    rows.div_ceil(rayon::current_num_threads()).max(1)
}
