//! Perplexity evaluation: the runtime's module ([`edge_runtime::eval`]), so that `edgec eval`
//! of a model and `edge-runtime eval` of its bundle run the same code (llama.cpp's chunk
//! protocol, and transformers' loss over token sequences).

pub use edge_runtime::eval::{
    Perplexity, chunk_count, chunked_perplexity, nll, parse_token_file, sequence_loss,
};
