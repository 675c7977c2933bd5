//! `edgec`: the Edge-LLM model compiler.
//!
//! Frontends read HF safetensors, GGUF and ONNX models into the IR (`edge_runtime::ir`);
//! `eval` scores a model's perplexity with the runtime's executor.

pub mod build_stream;
pub mod client;
pub mod codegen;
pub mod eval;
pub mod frontend;
pub mod luc;
pub mod schedule;
pub mod target;
