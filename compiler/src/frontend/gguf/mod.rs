//! GGUF files (v2/v3) of `llama` architecture: the container ([`reader`]), ggml's block
//! formats ([`dequant`]) and the embedded tokenizer ([`tokenizer`]).
//!
//! f32, f16 and bf16 tensors stay memory-mapped; q8_0, q4_0, q4_1, q5_0, q5_1, q4_k, q5_k
//! and q6_k are dequantized to f32 at load, in parallel across tensors. Names are mapped
//! to Hugging Face's (`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`),
//! dims reversed to HF order, and the rows of `attn_q` / `attn_k` un-permuted: llama.cpp's
//! converter interleaves each head's two RoPE halves for its RoPE kernel, while the IR
//! rotates halves as HF does.

pub mod dequant;
pub mod reader;
pub mod tokenizer;

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use edge_runtime::ir::ModelConfig;
use edge_runtime::tensor::{Bytes, DType, Tensor};
use rayon::prelude::*;

use super::error::{FrontendError, Result};
use super::{LoadedModel, SourceFormat, SourceTensor, llama};
pub use reader::{Array, GgmlType, GgufFile, TensorInfo, Value, ValueType};

/// Loads a GGUF model file.
pub fn load(path: &Path) -> Result<LoadedModel> {
    let f = GgufFile::open(path)?;
    load_file(&f)
}

/// Builds the model of an opened GGUF file.
pub fn load_file(f: &GgufFile) -> Result<LoadedModel> {
    let t0 = Instant::now();
    let mut config = read_config(f)?;

    let ids = tokenizer::SpecialIds {
        bos: config.bos_token_id,
        eos: config.eos_token_ids.clone(),
        add_bos: f.get("tokenizer.ggml.add_bos_token").and_then(Value::as_bool),
    };
    let tok = tokenizer::build(f, &ids)?;
    if let Some(t) = &tok {
        config.add_bos_token = t.add_bos;
        if t.vocab_size() != config.vocab_size {
            tracing::warn!(
                "{}: the tokenizer has {} tokens, the model {}",
                f.path,
                t.vocab_size(),
                config.vocab_size
            );
        }
    }

    // Pick the tensors the graph uses, failing early on anything we cannot represent.
    let mut wanted: Vec<(String, &TensorInfo, Option<usize>)> = Vec::new();
    for info in &f.tensors {
        let Some(hf) = hf_name(&info.name) else {
            if info.name == "rope_freqs.weight" {
                return Err(FrontendError::Unsupported {
                    path: f.path.clone(),
                    msg: "`rope_freqs.weight` (LLaMA-3 style RoPE frequency scaling) is not supported".into(),
                });
            }
            if info.name.starts_with("blk.") && info.name.ends_with(".bias") {
                return Err(FrontendError::Unsupported {
                    path: f.path.clone(),
                    msg: format!(
                        "bias tensor `{}`: linear layers with biases are not supported",
                        info.name
                    ),
                });
            }
            tracing::debug!("{}: ignoring tensor `{}`", f.path, info.name);
            continue;
        };
        if !dequant::supported(info.ggml_type) {
            return Err(unsupported_type(f, info));
        }
        let permute = if info.name.ends_with(".attn_q.weight") {
            Some(config.num_heads)
        } else if info.name.ends_with(".attn_k.weight") {
            Some(config.num_kv_heads)
        } else {
            None
        };
        wanted.push((hf, info, permute));
    }

    let head_dim = config.head_dim;
    let loaded: Vec<(String, Tensor)> = wanted
        .par_iter()
        .map(|(hf, info, permute)| {
            let t = tensor(f, info)?;
            let t = match permute {
                Some(heads) => {
                    unpermute_qk(&t, *heads, head_dim).map_err(|msg| FrontendError::BadTensor {
                        path: f.path.clone(),
                        name: info.name.clone(),
                        msg,
                    })?
                }
                None => t,
            };
            Ok((hf.clone(), t))
        })
        .collect::<Result<_>>()?;
    let weights: HashMap<String, Tensor> = loaded.into_iter().collect();
    let n_dequant = wanted
        .iter()
        .filter(|(_, i, _)| !matches!(i.ggml_type, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16))
        .count();

    let graph = llama::build(config, weights, &f.path)?;
    let source_tensors = f
        .tensors
        .iter()
        .map(|t| SourceTensor {
            name: t.name.clone(),
            shape: t.shape(),
            dtype: t.ggml_type.name().to_string(),
            bytes: t.size,
        })
        .collect();
    let mut metadata = vec![
        ("gguf.version".to_string(), f.version.to_string()),
        ("gguf.alignment".to_string(), f.alignment.to_string()),
        ("gguf.tensor_count".to_string(), f.tensors.len().to_string()),
    ];
    metadata.extend(f.metadata.iter().map(|(k, v)| (k.clone(), v.summary())));
    tracing::info!(
        "{}: GGUF v{} loaded in {:.2?} ({} tensors, {n_dequant} dequantized to f32)",
        f.path,
        f.version,
        t0.elapsed(),
        wanted.len()
    );
    Ok(LoadedModel {
        graph,
        tokenizer: tok,
        format: SourceFormat::Gguf,
        source_tensors,
        metadata,
    })
}

fn unsupported_type(f: &GgufFile, info: &TensorInfo) -> FrontendError {
    let supported: Vec<&str> = [GgmlType::F32, GgmlType::F16, GgmlType::BF16]
        .iter()
        .chain(dequant::QUANTIZED.iter())
        .map(|t| t.name())
        .collect();
    FrontendError::Unsupported {
        path: f.path.clone(),
        msg: format!(
            "tensor `{}` has type {} (id {}), which this reader cannot load (supported: {})",
            info.name,
            info.ggml_type,
            info.ggml_type.id(),
            supported.join(", ")
        ),
    }
}

/// The Hugging Face name of a GGUF tensor of a LLaMA model, if the graph uses it.
pub fn hf_name(gguf: &str) -> Option<String> {
    match gguf {
        "token_embd.weight" => return Some(llama::EMBED.into()),
        "output_norm.weight" => return Some(llama::FINAL_NORM.into()),
        "output.weight" => return Some(llama::LM_HEAD.into()),
        _ => {}
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, part) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let hf = match part {
        "attn_norm.weight" => "input_layernorm",
        "attn_q.weight" => "self_attn.q_proj",
        "attn_k.weight" => "self_attn.k_proj",
        "attn_v.weight" => "self_attn.v_proj",
        "attn_output.weight" => "self_attn.o_proj",
        "ffn_norm.weight" => "post_attention_layernorm",
        "ffn_gate.weight" => "mlp.gate_proj",
        "ffn_up.weight" => "mlp.up_proj",
        "ffn_down.weight" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.weight"))
}

/// One tensor in HF dim order: f32/f16/bf16 mapped from the file (no copy), block formats
/// dequantized to owned f32. Errors for types [`dequant`] does not handle.
pub fn tensor(f: &GgufFile, info: &TensorInfo) -> Result<Tensor> {
    let bad = |msg: String| FrontendError::BadTensor {
        path: f.path.clone(),
        name: info.name.clone(),
        msg,
    };
    let shape = info.shape();
    let dtype = match info.ggml_type {
        GgmlType::F32 => Some(DType::F32),
        GgmlType::F16 => Some(DType::F16),
        GgmlType::BF16 => Some(DType::BF16),
        _ => None,
    };
    match dtype {
        Some(dtype) => {
            let bytes = Bytes::Mapped {
                map: f.map.clone(),
                offset: f.tensor_file_offset(info),
                len: info.size as usize,
            };
            Tensor::new(dtype, shape, bytes).map_err(|e| bad(e.to_string()))
        }
        None => {
            if !dequant::supported(info.ggml_type) {
                return Err(unsupported_type(f, info));
            }
            let data = dequant::to_f32(info.ggml_type, f.tensor_bytes(info), info.numel()).map_err(bad)?;
            Tensor::from_f32(shape, data).map_err(|e| bad(e.to_string()))
        }
    }
}

/// Undoes llama.cpp's RoPE row permutation of a q or k projection (`[heads * head_dim, in]`):
/// GGUF row `h*hd + 2*i + j` holds HF row `h*hd + j*(hd/2) + i` (`j` in {0, 1}, `i < hd/2`).
/// The result is an owned tensor of the same type.
pub fn unpermute_qk(t: &Tensor, heads: usize, head_dim: usize) -> std::result::Result<Tensor, String> {
    let (rows, cols) = match t.shape[..] {
        [r, c] => (r, c),
        _ => return Err(format!("expected a matrix, got shape {:?}", t.shape)),
    };
    if rows != heads * head_dim || !head_dim.is_multiple_of(2) {
        return Err(format!(
            "{rows} rows are not {heads} heads of (even) head_dim {head_dim}"
        ));
    }
    let shape = t.shape.clone();
    let out = match t.dtype {
        DType::F32 => Tensor::from_f32(shape, permute_rows(t.f32s().expect("f32"), heads, head_dim, cols)),
        dt => Tensor::from_half(
            dt,
            shape,
            permute_rows(t.halves().expect("16-bit"), heads, head_dim, cols),
        ),
    };
    out.map_err(|e| e.to_string())
}

fn permute_rows<T: Copy>(src: &[T], heads: usize, hd: usize, cols: usize) -> Vec<T> {
    let half = hd / 2;
    let mut out = Vec::with_capacity(src.len());
    for h in 0..heads {
        for j in 0..2 {
            for i in 0..half {
                let g = h * hd + 2 * i + j; // row in the GGUF, for HF row h*hd + j*half + i
                out.extend_from_slice(&src[g * cols..(g + 1) * cols]);
            }
        }
    }
    out
}

/// The LLaMA hyper-parameters from `llama.*` and `tokenizer.ggml.*` metadata.
pub fn read_config(f: &GgufFile) -> Result<ModelConfig> {
    let cfg_err = |msg: String| FrontendError::Config {
        path: f.path.clone(),
        msg,
    };
    let arch = match f.get("general.architecture") {
        None => return Err(cfg_err("no `general.architecture` key".into())),
        Some(v) => v.as_str().ok_or_else(|| {
            cfg_err(format!(
                "`general.architecture` is a {}, not a string",
                v.value_type()
            ))
        })?,
    };
    if arch != "llama" {
        return Err(FrontendError::Unsupported {
            path: f.path.clone(),
            msg: format!("architecture `{arch}` is not supported (only `llama`)"),
        });
    }
    let uint = |key: &str| -> Result<Option<usize>> {
        match f.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|x| usize::try_from(x).ok())
                .map(Some)
                .ok_or_else(|| {
                    cfg_err(format!(
                        "`{key}` is {} ({}), not a non-negative integer",
                        v.summary(),
                        v.value_type()
                    ))
                }),
        }
    };
    let need =
        |key: &str| -> Result<usize> { uint(key)?.ok_or_else(|| cfg_err(format!("`{key}` is missing"))) };
    let float = |key: &str| -> Result<Option<f64>> {
        match f.get(key) {
            None => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| {
                cfg_err(format!(
                    "`{key}` is {} ({}), not a number",
                    v.summary(),
                    v.value_type()
                ))
            }),
        }
    };

    let hidden = need("llama.embedding_length")?;
    let heads = need("llama.attention.head_count")?;
    let kv_heads = uint("llama.attention.head_count_kv")?.unwrap_or(heads);
    let head_dim = match uint("llama.attention.key_length")? {
        Some(k) => k,
        None => {
            if heads == 0 || hidden % heads != 0 {
                return Err(cfg_err(format!(
                    "embedding_length {hidden} is not divisible by head_count {heads}"
                )));
            }
            hidden / heads
        }
    };
    if let Some(v) = uint("llama.attention.value_length")?
        && v != head_dim
    {
        return Err(FrontendError::Unsupported {
            path: f.path.clone(),
            msg: format!("attention.value_length {v} differs from key_length {head_dim}"),
        });
    }
    if let Some(r) = uint("llama.rope.dimension_count")?
        && r != head_dim
    {
        return Err(FrontendError::Unsupported {
            path: f.path.clone(),
            msg: format!("partial RoPE (rope.dimension_count {r} of head_dim {head_dim}) is not supported"),
        });
    }
    if let Some(v) = f.get("llama.rope.scaling.type")
        && v.as_str() != Some("none")
    {
        return Err(FrontendError::Unsupported {
            path: f.path.clone(),
            msg: format!(
                "RoPE scaling `{}` (llama.rope.scaling.type) is not supported",
                v.summary()
            ),
        });
    }
    if let Some(e) = uint("llama.expert_count")?
        && e > 0
    {
        return Err(FrontendError::Unsupported {
            path: f.path.clone(),
            msg: format!("mixture-of-experts LLaMA ({e} experts) is not supported"),
        });
    }
    let vocab_size = match f.get("tokenizer.ggml.tokens").and_then(Value::as_array) {
        Some(a) => a.len(),
        None => match uint("llama.vocab_size")? {
            Some(v) => v,
            None => f
                .tensor_info("token_embd.weight")
                .and_then(|t| t.ne.get(1).copied())
                .ok_or_else(|| cfg_err("no token list, `llama.vocab_size` or `token_embd.weight`".into()))?
                as usize,
        },
    };
    let token = |key: &str| -> Result<Option<u32>> {
        match uint(key)? {
            None => Ok(None),
            Some(id) if id < vocab_size => Ok(Some(id as u32)),
            Some(id) => Err(cfg_err(format!(
                "`{key}` {id} is outside the vocabulary of {vocab_size}"
            ))),
        }
    };
    let mut eos_token_ids = vec![];
    for key in [
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.eot_token_id",
        "tokenizer.ggml.eom_token_id",
    ] {
        if let Some(id) = token(key)?
            && !eos_token_ids.contains(&id)
        {
            eos_token_ids.push(id);
        }
    }
    let config = ModelConfig {
        vocab_size,
        hidden_size: hidden,
        intermediate_size: need("llama.feed_forward_length")?,
        num_layers: need("llama.block_count")?,
        num_heads: heads,
        num_kv_heads: kv_heads,
        head_dim,
        rms_norm_eps: float("llama.attention.layer_norm_rms_epsilon")?
            .ok_or_else(|| cfg_err("`llama.attention.layer_norm_rms_epsilon` is missing".into()))?
            as f32,
        rope_theta: float("llama.rope.freq_base")?.unwrap_or(10000.0) as f32,
        max_position_embeddings: uint("llama.context_length")?.unwrap_or(2048),
        tie_word_embeddings: f.tensor_info("output.weight").is_none(),
        bos_token_id: token("tokenizer.ggml.bos_token_id")?,
        eos_token_ids,
        add_bos_token: f
            .get("tokenizer.ggml.add_bos_token")
            .and_then(Value::as_bool)
            .unwrap_or(false),
    };
    config.validate().map_err(|e| cfg_err(e.to_string()))?;
    // Bounds that keep every size derived from the config (heads x head_dim x hidden, ...)
    // far from overflowing; real models are orders of magnitude below them.
    const MAX_DIM: usize = 1 << 20;
    const MAX_VOCAB: usize = 1 << 24;
    for (key, v, max) in [
        ("llama.embedding_length", config.hidden_size, MAX_DIM),
        ("llama.feed_forward_length", config.intermediate_size, MAX_DIM),
        ("llama.block_count", config.num_layers, MAX_DIM),
        ("llama.attention.head_count", config.num_heads, MAX_DIM),
        ("llama.attention.head_count_kv", config.num_kv_heads, MAX_DIM),
        ("head_dim", config.head_dim, MAX_DIM),
        ("vocabulary size", config.vocab_size, MAX_VOCAB),
        ("llama.context_length", config.max_position_embeddings, 1 << 28),
    ] {
        if v > max {
            return Err(cfg_err(format!("{key} = {v} is implausibly large (limit {max})")));
        }
    }
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_names() {
        assert_eq!(hf_name("token_embd.weight").unwrap(), "model.embed_tokens.weight");
        assert_eq!(hf_name("output.weight").unwrap(), "lm_head.weight");
        assert_eq!(hf_name("output_norm.weight").unwrap(), "model.norm.weight");
        assert_eq!(
            hf_name("blk.12.attn_output.weight").unwrap(),
            "model.layers.12.self_attn.o_proj.weight"
        );
        assert_eq!(
            hf_name("blk.0.ffn_norm.weight").unwrap(),
            "model.layers.0.post_attention_layernorm.weight"
        );
        assert!(hf_name("blk.x.attn_q.weight").is_none());
        assert!(hf_name("rope_freqs.weight").is_none());
    }

    #[test]
    fn unpermutes_rows_as_llama_cpp_permuted_them() {
        // llama.cpp: reshape(heads, 2, hd/2, cols).swapaxes(1, 2): GGUF row h*hd + 2i + j
        // = HF row h*hd + j*hd/2 + i. Encode each HF row's index in its values.
        let (heads, hd, cols) = (2, 6, 3);
        let hf: Vec<f32> = (0..heads * hd * cols).map(|x| (x / cols) as f32).collect();
        let mut gguf = vec![0f32; hf.len()];
        for h in 0..heads {
            for i in 0..hd / 2 {
                for j in 0..2 {
                    let (g, r) = (h * hd + 2 * i + j, h * hd + j * hd / 2 + i);
                    gguf[g * cols..(g + 1) * cols].copy_from_slice(&hf[r * cols..(r + 1) * cols]);
                }
            }
        }
        let t = Tensor::from_f32(vec![heads * hd, cols], gguf).unwrap();
        let back = unpermute_qk(&t, heads, hd).unwrap();
        assert_eq!(back.f32s().unwrap(), &hf[..]);
        let half = t.convert(DType::F16).unwrap();
        let back = unpermute_qk(&half, heads, hd).unwrap();
        assert_eq!(back.to_f32_vec(), hf);
        assert!(unpermute_qk(&t, 3, hd).unwrap_err().contains("not 3 heads"));
    }
}
