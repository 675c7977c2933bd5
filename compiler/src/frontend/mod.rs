//! Model frontends: HF safetensors directories, GGUF files and ONNX files, each producing
//! the same IR graph (see `edge_runtime::ir`) plus the model's tokenizer.

pub mod compressed;
pub mod config;
pub mod error;
pub mod gguf;
pub mod llama;
pub mod onnx;
pub mod safetensors;

use std::path::Path;

use edge_runtime::ir::{Graph, WeightData};
use edge_runtime::tokenizer::Tokenizer;
use serde::Serialize;

pub use error::{FrontendError, Result};

/// Which kind of file a model came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceFormat {
    Safetensors,
    Gguf,
    Onnx,
    /// A directory written by `edgec compress`.
    Compressed,
}

/// One tensor as stored in the source file (for `edgec inspect`).
#[derive(Debug, Clone, Serialize)]
pub struct SourceTensor {
    pub name: String,
    pub shape: Vec<usize>,
    /// The storage type in the file (`f32`, `bf16`, `q4_1`, ...).
    pub dtype: String,
    pub bytes: u64,
}

/// A loaded model: its IR graph, its tokenizer (if the files carry one), and what the
/// source file held.
pub struct LoadedModel {
    pub graph: Graph,
    pub tokenizer: Option<Tokenizer>,
    pub format: SourceFormat,
    pub source_tensors: Vec<SourceTensor>,
    /// Extra key/value facts about the source (GGUF metadata, ONNX producer, ...).
    pub metadata: Vec<(String, String)>,
}

/// Options for loading.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Convert every dense weight to this type after loading (`None`: keep the file's
    /// f32/f16/bf16 as is, mapped; packed GGUF types are dequantized to f32).
    pub dtype: Option<edge_runtime::DType>,
}

/// Loads a model from a safetensors directory (or its `config.json` / `.safetensors`
/// file), a `.gguf` file or a `.onnx` file, deciding by what the path holds.
pub fn load(path: &Path, opts: &LoadOptions) -> Result<LoadedModel> {
    let p = path.display().to_string();
    let meta = std::fs::metadata(path).map_err(|source| FrontendError::Io {
        path: p.clone(),
        source,
    })?;
    let mut model = if meta.is_dir() && compressed::is_compressed_dir(path) {
        compressed::load_dir(path)?
    } else if meta.is_dir() {
        safetensors::load_dir(path)?
    } else {
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .unwrap_or("")
            .to_ascii_lowercase();
        match ext.as_str() {
            "gguf" => gguf::load(path)?,
            "onnx" => onnx::load(path)?,
            "safetensors" | "json" => safetensors::load_dir(path.parent().unwrap_or(Path::new(".")))?,
            _ => {
                // Sniff the magic for files with another name.
                let mut head = [0u8; 4];
                use std::io::Read;
                let n = std::fs::File::open(path)
                    .and_then(|mut f| f.read(&mut head))
                    .map_err(|source| FrontendError::Io {
                        path: p.clone(),
                        source,
                    })?;
                if n == 4 && &head == b"GGUF" {
                    gguf::load(path)?
                } else {
                    return Err(FrontendError::UnknownFormat {
                        path: p,
                        msg: "expected a directory with config.json and safetensors, a .gguf file or a .onnx file".into(),
                    });
                }
            }
        }
    };
    if let Some(dt) = opts.dtype {
        for w in &mut model.graph.weights {
            if let WeightData::Dense(t) = &mut w.data
                && t.dtype != dt
            {
                *t = t.convert(dt)?;
            }
        }
    }
    model.graph.verify()?;
    Ok(model)
}
