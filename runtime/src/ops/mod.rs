//! Native operations on activations (f32, row-major `[rows, width]`).

pub mod activation;
pub mod attention;
pub mod norm;
pub mod rope;
