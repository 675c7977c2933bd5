//! Errors of the runtime library.

use thiserror::Error;

/// Everything the runtime library can fail with. Each variant names the offending object.
#[derive(Debug, Error)]
pub enum RuntimeError {
    #[error("invalid graph: {0}")]
    InvalidGraph(String),
    #[error("weight `{name}`: {msg}")]
    Weight { name: String, msg: String },
    #[error("token id {id} is outside the vocabulary (size {vocab})")]
    BadToken { id: u32, vocab: usize },
    #[error("context overflow: {needed} positions needed, the session holds {capacity}")]
    ContextOverflow { needed: usize, capacity: usize },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

pub type Result<T, E = RuntimeError> = std::result::Result<T, E>;
