//! Hugging Face safetensors directories: `config.json` plus `model.safetensors` or the
//! shards listed in `model.safetensors.index.json`. Tensors are memory-mapped, not copied.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::Arc;

use edge_runtime::tensor::{Bytes, DType, Tensor};
use edge_runtime::tokenizer::Tokenizer;
use memmap2::Mmap;
use safetensors::SafeTensors;

use super::error::{FrontendError, Result};
use super::{LoadedModel, SourceFormat, SourceTensor, config, llama};

/// Memory-maps a file. The map is read-only and the file is not expected to change while
/// the model is loaded (as every memory-mapped model loader assumes).
pub fn map_file(path: &Path) -> Result<Arc<Mmap>> {
    let p = path.display().to_string();
    let file = std::fs::File::open(path).map_err(|source| FrontendError::Io {
        path: p.clone(),
        source,
    })?;
    // SAFETY: the mapping is read-only; the file is opened read-only and we never create
    // a mutable view of it. Truncation of the file by another process while mapped is the
    // caller's environment's responsibility (as with every mmap-based loader).
    let map = unsafe { Mmap::map(&file) }.map_err(|source| FrontendError::Io { path: p, source })?;
    Ok(Arc::new(map))
}

/// Reads every tensor of one safetensors file as mapped tensors (f32, f16, bf16).
pub fn read_file(path: &Path) -> Result<(HashMap<String, Tensor>, Vec<SourceTensor>)> {
    let p = path.display().to_string();
    let map = map_file(path)?;
    let st = SafeTensors::deserialize(&map).map_err(|e| FrontendError::Corrupt {
        path: p.clone(),
        msg: e.to_string(),
    })?;
    let base = map.as_ptr() as usize;
    let mut tensors = HashMap::new();
    let mut listing = Vec::new();
    for (name, view) in st.tensors() {
        let dtype = match view.dtype() {
            safetensors::Dtype::F32 => DType::F32,
            safetensors::Dtype::F16 => DType::F16,
            safetensors::Dtype::BF16 => DType::BF16,
            other => {
                listing.push(SourceTensor {
                    name: name.clone(),
                    shape: view.shape().to_vec(),
                    dtype: format!("{other:?}").to_lowercase(),
                    bytes: view.data().len() as u64,
                });
                continue; // not a weight type we use (e.g. int64 buffers); the builder reports if needed
            }
        };
        let data = view.data();
        let offset = data.as_ptr() as usize - base;
        listing.push(SourceTensor {
            name: name.clone(),
            shape: view.shape().to_vec(),
            dtype: dtype.name().into(),
            bytes: data.len() as u64,
        });
        let bytes = Bytes::Mapped {
            map: map.clone(),
            offset,
            len: data.len(),
        };
        let t = Tensor::new(dtype, view.shape().to_vec(), bytes).map_err(|e| FrontendError::BadTensor {
            path: p.clone(),
            name: name.clone(),
            msg: e.to_string(),
        })?;
        tensors.insert(name, t);
    }
    listing.sort_by(|a, b| a.name.cmp(&b.name));
    Ok((tensors, listing))
}

/// Loads a model directory.
pub fn load_dir(dir: &Path) -> Result<LoadedModel> {
    let cfg_path = dir.join("config.json");
    let config = config::read_hf_config(&cfg_path)?;
    let index = dir.join("model.safetensors.index.json");
    let files: Vec<std::path::PathBuf> = if index.exists() {
        let p = index.display().to_string();
        let text = std::fs::read_to_string(&index).map_err(|source| FrontendError::Io {
            path: p.clone(),
            source,
        })?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| FrontendError::Corrupt {
            path: p.clone(),
            msg: format!("not JSON: {e}"),
        })?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| FrontendError::Corrupt {
                path: p.clone(),
                msg: "no `weight_map` object".into(),
            })?;
        let shards: BTreeSet<&str> = map.values().filter_map(|s| s.as_str()).collect();
        for s in &shards {
            if s.contains('/') || s.contains("..") {
                return Err(FrontendError::Corrupt {
                    path: p.clone(),
                    msg: format!("shard name `{s}` leaves the model directory"),
                });
            }
        }
        shards.into_iter().map(|s| dir.join(s)).collect()
    } else {
        vec![dir.join("model.safetensors")]
    };
    let mut tensors = HashMap::new();
    let mut listing = Vec::new();
    for f in &files {
        let (t, l) = read_file(f)?;
        tensors.extend(t);
        listing.extend(l);
    }
    listing.sort_by(|a, b| a.name.cmp(&b.name));
    let path = dir.display().to_string();
    let tokenizer = read_tokenizer(dir, &config)?;
    let mut config = config;
    if let Some(t) = &tokenizer {
        config.add_bos_token = t.add_bos;
    }
    let graph = llama::build(config, tensors, &path)?;
    Ok(LoadedModel {
        graph,
        tokenizer,
        format: SourceFormat::Safetensors,
        source_tensors: listing,
        metadata: vec![("files".into(), files.len().to_string())],
    })
}

/// Reads `tokenizer.json` (and `tokenizer_config.json` for the BOS convention) if present.
pub(crate) fn read_tokenizer(
    dir: &Path,
    config: &edge_runtime::ir::ModelConfig,
) -> Result<Option<Tokenizer>> {
    let tj = dir.join("tokenizer.json");
    if !tj.exists() {
        return Ok(None);
    }
    let add_bos = std::fs::read_to_string(dir.join("tokenizer_config.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v.get("add_bos_token").and_then(|b| b.as_bool()))
        .unwrap_or(false);
    let t = Tokenizer::from_json_file(&tj, add_bos, config.bos_token_id, config.eos_token_ids.clone())
        .map_err(|e| FrontendError::Tokenizer {
            path: tj.display().to_string(),
            msg: e.to_string(),
        })?;
    Ok(Some(t))
}
