//! `edge-runtime`: the Edge-LLM device runtime.
//!
//! It interprets the IR ([`ir`]) with native kernels ([`kernels`]) and ops ([`ops`]),
//! keeps a KV cache per session ([`exec`]), tokenizes ([`tokenizer`]) and samples
//! ([`sampling`]). It never depends on the compiler.

pub mod bundle;
pub mod error;
pub mod eval;
pub mod exec;
pub mod exec_stream;
pub mod format;
pub mod ir;
pub mod jit;
pub mod kernels;
pub mod memory;
pub mod ops;
pub mod packed;
pub mod plan;
pub mod sampling;
pub mod service;
pub mod tensor;
pub mod tokenizer;
pub mod train;

pub use error::{Result, RuntimeError};
pub use exec::{Executor, Rows, Session, StepOutput};
pub use tensor::{DType, Tensor};
