//! `edge-runtime`: the Edge-LLM device runtime.
//!
//! It interprets the IR ([`ir`]) with native kernels ([`kernels`]) and ops ([`ops`]),
//! keeps a KV cache per session ([`exec`]), tokenizes ([`tokenizer`]) and samples
//! ([`sampling`]). It never depends on the compiler.

pub mod error;
pub mod ir;
pub mod tensor;
pub mod tokenizer;

pub use error::{Result, RuntimeError};
pub use tensor::{DType, Tensor};
