//! Layer-wise Unified Compression (LUC): measure how sensitive each decoder layer is to
//! quantization and pruning, choose a per-layer policy under a budget, and compress.
//!
//! - [`candidate`]: one compression choice for a layer (bits, group, scheme, sparsity, pattern).
//! - [`sensitivity`]: the profile file `edgec profile` writes and `edgec policy` reads.
//! - [`budget`], [`search`], [`policy`]: budgets, the policy search (uniform, edge-llm,
//!   optimal knapsack) and the `policy.toml` file; [`refine`]: the measured refinement of an
//!   `optimal` policy (whole compressed models measured on held-out text).

pub mod budget;
pub mod calib;
pub mod candidate;
pub mod compress;
pub mod heatmap;
pub mod measure;
pub mod policy;
pub mod profile;
pub mod prune;
pub mod quantize;
pub mod refine;
pub mod search;
pub mod sensitivity;
