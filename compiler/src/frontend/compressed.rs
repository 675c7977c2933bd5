//! Compressed model directories written by `edgec compress`: `edge-model.json` (config,
//! tokenizer conventions, policy), `model.safetensors` with packed linear weights (layout in
//! `docs/formats.md`) and `tokenizer.json`. Packed buffers stay memory-mapped.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use edge_runtime::ir::WeightData;
use edge_runtime::packed::io::read_packed_safetensors;
use edge_runtime::tokenizer::Tokenizer;

use super::error::{FrontendError, Result};
use super::{LoadedModel, SourceFormat, SourceTensor, llama};
use crate::luc::compress::{CompressedModelInfo, MODEL_FILE};

/// True when `dir` holds a compressed model.
pub fn is_compressed_dir(dir: &Path) -> bool {
    dir.join(MODEL_FILE).is_file()
}

pub fn load_dir(dir: &Path) -> Result<LoadedModel> {
    let info_path = dir.join(MODEL_FILE);
    let p = info_path.display().to_string();
    let text = std::fs::read_to_string(&info_path).map_err(|source| FrontendError::Io {
        path: p.clone(),
        source,
    })?;
    let info: CompressedModelInfo = serde_json::from_str(&text).map_err(|e| FrontendError::Corrupt {
        path: p.clone(),
        msg: format!("not an Edge-LLM compressed model description: {e}"),
    })?;
    let st = dir.join("model.safetensors");
    let file = read_packed_safetensors(&st).map_err(|e| FrontendError::Corrupt {
        path: st.display().to_string(),
        msg: e.to_string(),
    })?;
    let mut listing = vec![];
    let mut weights = HashMap::new();
    for (name, t) in file.dense {
        listing.push(SourceTensor {
            name: name.clone(),
            shape: t.shape.clone(),
            dtype: t.dtype.name().into(),
            bytes: t.nbytes() as u64,
        });
        weights.insert(name, WeightData::Dense(t));
    }
    for (name, w) in file.packed {
        listing.push(SourceTensor {
            name: name.clone(),
            shape: w.shape().to_vec(),
            dtype: format!("{:?}", w.format()),
            bytes: w.storage_bytes() as u64,
        });
        weights.insert(name, WeightData::Packed(Arc::new(w)));
    }
    listing.sort_by(|a, b| a.name.cmp(&b.name));
    let graph = llama::build_with(info.config.clone(), weights, &dir.display().to_string())?;
    let tj = dir.join("tokenizer.json");
    let tokenizer = if tj.exists() {
        Some(
            Tokenizer::from_json_file(&tj, info.add_bos, info.bos, info.eos.clone()).map_err(|e| {
                FrontendError::Tokenizer {
                    path: tj.display().to_string(),
                    msg: e.to_string(),
                }
            })?,
        )
    } else {
        None
    };
    Ok(LoadedModel {
        graph,
        tokenizer,
        format: SourceFormat::Compressed,
        source_tensors: listing,
        metadata: vec![
            ("source".into(), info.source),
            ("linear_bytes".into(), info.linear_bytes.to_string()),
            ("linear_params".into(), info.linear_params.to_string()),
        ],
    })
}
