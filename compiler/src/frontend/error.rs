//! Errors of the model frontends. Each names the file and the offending object.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum FrontendError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a model this tool reads: {msg}")]
    UnknownFormat { path: String, msg: String },
    #[error("{path}: unsupported model: {msg}")]
    Unsupported { path: String, msg: String },
    #[error("{path}: corrupt or truncated file: {msg}")]
    Corrupt { path: String, msg: String },
    #[error("{path}: missing tensor `{name}`")]
    MissingTensor { path: String, name: String },
    #[error("{path}: tensor `{name}`: {msg}")]
    BadTensor { path: String, name: String, msg: String },
    #[error("{path}: invalid config: {msg}")]
    Config { path: String, msg: String },
    #[error("{path}: ONNX node `{node}` ({op_type}): {msg}")]
    OnnxNode {
        path: String,
        node: String,
        op_type: String,
        msg: String,
    },
    #[error("{path}: tokenizer: {msg}")]
    Tokenizer { path: String, msg: String },
    #[error(transparent)]
    Runtime(#[from] edge_runtime::RuntimeError),
}

pub type Result<T, E = FrontendError> = std::result::Result<T, E>;
