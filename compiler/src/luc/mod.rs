//! Layer-wise Unified Compression (LUC): measure how sensitive each decoder layer is to
//! quantization and pruning, choose a per-layer policy under a budget, and compress.
//!
//! - [`candidate`]: one compression choice for a layer (bits, group, scheme, sparsity, pattern).
//! - [`sensitivity`]: the profile file `edgec profile` writes and `edgec policy` reads.

pub mod candidate;
pub mod sensitivity;
