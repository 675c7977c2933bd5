//! ONNX files exported by torch.onnx (TorchScript exporter) from transformers'
//! `LlamaForCausalLM`.
//!
//! The file is decoded with prost (schema `edge_proto::onnx`), its initializers are read
//! inline or from external data files (memory-mapped), and the primitive-op graph is
//! matched against the LLaMA decoder the IR computes (`fuse`). The matched weights are
//! renamed to Hugging Face names (MatMul weights transposed from `[in, out]` to
//! `[out, in]`) and handed to [`super::llama::build`], so an ONNX model and the
//! safetensors checkpoint it was exported from give the same IR graph.
//!
//! The hyper-parameters come from `config.json` beside the model when there is one
//! (checked against the graph); otherwise from the graph itself: sizes from the weight
//! shapes, `head_dim` from the RoPE tables, eps from the RMSNorm constant, `rope_theta`
//! from the RoPE inverse frequencies.

mod data;
mod fuse;
mod graph;

use std::collections::HashMap;
use std::path::Path;

use edge_proto::onnx::ModelProto;
use edge_runtime::ir::ModelConfig;
use edge_runtime::tensor::Tensor;
use prost::Message;

use super::error::{FrontendError, Result};
use super::{LoadedModel, SourceFormat, config, llama, safetensors};
use data::Store;
use fuse::{Head, Llama};
use graph::OnnxGraph;

/// ONNX serializes a model as one protobuf message, which protobuf limits to 2 GiB;
/// larger weights must be in external data files.
const MAX_PROTOBUF_BYTES: u64 = 2 << 30;

/// Standard-domain opsets whose versions of the ops we read are known to us.
const OPSETS: std::ops::RangeInclusive<i64> = 13..=22;

/// `max_position_embeddings` when there is no config.json: the graph computes positions
/// for any length, so nothing in it bounds the context (same default as `config.rs`).
const DEFAULT_MAX_POSITIONS: usize = 2048;

/// Loads an ONNX model file.
pub fn load(path: &Path) -> Result<LoadedModel> {
    let p = path.display().to_string();
    let size = std::fs::metadata(path)
        .map_err(|source| FrontendError::Io {
            path: p.clone(),
            source,
        })?
        .len();
    if size > MAX_PROTOBUF_BYTES {
        return Err(FrontendError::Corrupt {
            path: p,
            msg: format!(
                "{size} bytes is more than an ONNX protobuf can hold (2 GiB); weights this large belong in external data"
            ),
        });
    }
    let model = {
        let map = safetensors::map_file(path)?;
        ModelProto::decode(&map[..]).map_err(|e| FrontendError::Corrupt {
            path: p.clone(),
            msg: format!("not a valid ONNX protobuf (ModelProto): {e}"),
        })?
    };
    if model.ir_version <= 0 {
        return Err(FrontendError::Corrupt {
            path: p,
            msg: format!("ir_version is {}; not an ONNX model", model.ir_version),
        });
    }
    let Some(graph_proto) = model.graph.as_ref() else {
        return Err(FrontendError::Corrupt {
            path: p,
            msg: "the model has no graph".into(),
        });
    };
    let opset = model
        .opset_import
        .iter()
        .find(|o| o.domain.is_empty() || o.domain == "ai.onnx")
        .map(|o| o.version)
        .ok_or_else(|| FrontendError::Corrupt {
            path: p.clone(),
            msg: "no opset_import for the standard ONNX domain".into(),
        })?;
    if !OPSETS.contains(&opset) {
        return Err(FrontendError::Unsupported {
            path: p,
            msg: format!(
                "opset {opset}; supported are {}..={}",
                OPSETS.start(),
                OPSETS.end()
            ),
        });
    }

    let g = OnnxGraph::new(&p, graph_proto)?;
    let found = fuse::match_llama(&g)?;
    let mut store = Store::new(path, g.inits.clone())?;
    let source_tensors = store.listing()?;

    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut weights = hf_weights(&found, &mut store)?;
    let tied_in_graph = match found.head {
        Head::Embedding(_) => true,
        Head::Separate(_) => {
            let head = &weights[llama::LM_HEAD];
            let emb = &weights[llama::EMBED];
            head.dtype == emb.dtype && head.shape == emb.shape && head.raw() == emb.raw()
        }
    };
    let cfg_path = dir.join("config.json");
    let (mut config, config_source) = if cfg_path.exists() {
        let c = config::read_hf_config(&cfg_path)?;
        check_config(&c, &found, &weights, tied_in_graph, &cfg_path)?;
        (c, "config.json")
    } else {
        (
            infer_config(&found, &weights, tied_in_graph, &p)?,
            "inferred from the graph",
        )
    };
    if matches!(found.head, Head::Embedding(_)) && !config.tie_word_embeddings {
        tracing::warn!("{p}: the LM head is the transposed embedding; treating the embeddings as tied");
        config.tie_word_embeddings = true;
    }
    if config.tie_word_embeddings {
        weights.remove(llama::LM_HEAD);
    }
    let tokenizer = safetensors::read_tokenizer(dir, &config)?;
    if let Some(t) = &tokenizer {
        config.add_bos_token = t.add_bos;
    }
    let graph = llama::build(config, weights, &p)?;

    let mut metadata = vec![
        ("producer_name".to_string(), model.producer_name.clone()),
        ("producer_version".to_string(), model.producer_version.clone()),
        ("ir_version".to_string(), model.ir_version.to_string()),
        ("opset".to_string(), opset.to_string()),
        ("nodes".to_string(), graph_proto.node.len().to_string()),
        (
            "initializers".to_string(),
            graph_proto.initializer.len().to_string(),
        ),
        (
            "external_data_files".to_string(),
            store.external_files().to_string(),
        ),
        ("config".to_string(), config_source.to_string()),
    ];
    for o in &model.opset_import {
        if !(o.domain.is_empty() || o.domain == "ai.onnx") {
            metadata.push((format!("opset.{}", o.domain), o.version.to_string()));
        }
    }
    for e in &model.metadata_props {
        metadata.push((format!("meta.{}", e.key), e.value.clone()));
    }
    tracing::info!(
        path = %p,
        layers = graph.config.num_layers,
        nodes = graph_proto.node.len(),
        config = config_source,
        "loaded ONNX LLaMA model"
    );
    Ok(LoadedModel {
        graph,
        tokenizer,
        format: SourceFormat::Onnx,
        source_tensors,
        metadata,
    })
}

/// The matched weights under their Hugging Face names, in the HF layout.
fn hf_weights(found: &Llama<'_>, store: &mut Store<'_>) -> Result<HashMap<String, Tensor>> {
    let mut w = HashMap::new();
    w.insert(llama::EMBED.to_string(), store.weight(found.embed)?);
    for (i, l) in found.layers.iter().enumerate() {
        let [ln1, q, k, v, o, ln2, gate, up, down] = llama::layer_weight_names(i);
        w.insert(ln1, store.weight(l.ln1)?);
        w.insert(ln2, store.weight(l.ln2)?);
        for (hf, name) in [
            (q, l.q),
            (k, l.k),
            (v, l.v),
            (o, l.o),
            (gate, l.gate),
            (up, l.up),
            (down, l.down),
        ] {
            w.insert(hf, store.weight_transposed(name)?);
        }
    }
    w.insert(llama::FINAL_NORM.to_string(), store.weight(found.norm)?);
    if let Head::Separate(name) = found.head {
        w.insert(llama::LM_HEAD.to_string(), store.weight_transposed(name)?);
    }
    Ok(w)
}

/// The RoPE base `theta` that the inverse frequencies `theta^(-2i/head_dim)` were made
/// with, if they fit one (a theta within 1e-5 relative of a 6-significant-digit number
/// is rounded to it, since bases are round numbers and the table is f32).
fn infer_theta(inv_freq: &[f64], head_dim: usize) -> Option<f64> {
    let n = inv_freq.len();
    if n < 2 || inv_freq[n - 1] <= 0.0 {
        return None;
    }
    // The last entry is theta^(-2(n-1)/d): the most precise estimate.
    let raw = inv_freq[n - 1].powf(-(head_dim as f64) / (2.0 * (n - 1) as f64));
    let mag = 10f64.powi(raw.log10().floor() as i32 - 5);
    let rounded = (raw / mag).round() * mag;
    [rounded, raw]
        .into_iter()
        .find(|&t| theta_matches(t, inv_freq, head_dim))
}

/// Whether the inverse frequencies are `theta^(-2i/head_dim)` (f32 precision).
fn theta_matches(theta: f64, inv_freq: &[f64], head_dim: usize) -> bool {
    theta > 0.0
        && inv_freq.iter().enumerate().all(|(i, &f)| {
            let want = 1.0 / theta.powf((2 * i) as f64 / head_dim as f64);
            (f - want).abs() <= 1e-5 * want
        })
}

/// Hyper-parameters read off the graph and its weights.
struct Shapes {
    vocab: usize,
    hidden: usize,
    intermediate: usize,
}

fn shapes(weights: &HashMap<String, Tensor>, path: &str) -> Result<Shapes> {
    let emb = &weights[llama::EMBED].shape;
    let gate = &weights[&llama::layer_weight_names(0)[6]].shape;
    match (emb.as_slice(), gate.as_slice()) {
        (&[vocab, hidden], &[intermediate, _]) => Ok(Shapes {
            vocab,
            hidden,
            intermediate,
        }),
        _ => Err(FrontendError::BadTensor {
            path: path.to_string(),
            name: llama::EMBED.into(),
            msg: format!("embedding {emb:?} / gate {gate:?} are not 2-D"),
        }),
    }
}

/// The config when there is no config.json: everything from the graph.
fn infer_config(
    found: &Llama<'_>,
    weights: &HashMap<String, Tensor>,
    tied: bool,
    path: &str,
) -> Result<ModelConfig> {
    let s = shapes(weights, path)?;
    let rope_theta = infer_theta(&found.inv_freq, found.head_dim).ok_or_else(|| FrontendError::Config {
        path: path.to_string(),
        msg: format!(
            "no config.json, and the RoPE inverse frequencies {:?} do not determine a rope_theta (theta^(-2i/{}))",
            found.inv_freq, found.head_dim
        ),
    })?;
    tracing::warn!(
        "{path}: no config.json beside the model; hyper-parameters inferred from the graph \
         (max_position_embeddings {DEFAULT_MAX_POSITIONS}, no BOS/EOS ids)"
    );
    let config = ModelConfig {
        vocab_size: s.vocab,
        hidden_size: s.hidden,
        intermediate_size: s.intermediate,
        num_layers: found.layers.len(),
        num_heads: found.num_heads,
        num_kv_heads: found.num_kv_heads,
        head_dim: found.head_dim,
        rms_norm_eps: found.eps,
        rope_theta: rope_theta as f32,
        max_position_embeddings: DEFAULT_MAX_POSITIONS,
        tie_word_embeddings: tied,
        bos_token_id: None,
        eos_token_ids: vec![],
        add_bos_token: false,
    };
    config.validate()?;
    Ok(config)
}

/// Checks config.json against what the graph computes.
fn check_config(
    c: &ModelConfig,
    found: &Llama<'_>,
    weights: &HashMap<String, Tensor>,
    tied: bool,
    cfg_path: &Path,
) -> Result<()> {
    let path = cfg_path.display().to_string();
    let s = shapes(weights, &path)?;
    let bad = |msg: String| FrontendError::Config {
        path: path.clone(),
        msg: format!("{msg} (config.json disagrees with the ONNX graph beside it)"),
    };
    for (name, cfg, graph) in [
        ("vocab_size", c.vocab_size, s.vocab),
        ("hidden_size", c.hidden_size, s.hidden),
        ("intermediate_size", c.intermediate_size, s.intermediate),
        ("num_hidden_layers", c.num_layers, found.layers.len()),
        ("num_attention_heads", c.num_heads, found.num_heads),
        ("num_key_value_heads", c.num_kv_heads, found.num_kv_heads),
        ("head_dim", c.head_dim, found.head_dim),
    ] {
        if cfg != graph {
            return Err(bad(format!("{name} is {cfg}, the graph has {graph}")));
        }
    }
    let (ce, ge) = (c.rms_norm_eps as f64, found.eps as f64);
    if (ce - ge).abs() > 1e-6 * ge.abs().max(1e-12) {
        return Err(bad(format!(
            "rms_norm_eps is {:e}, the graph adds {:e}",
            c.rms_norm_eps, found.eps
        )));
    }
    if !theta_matches(c.rope_theta as f64, &found.inv_freq, found.head_dim) {
        let implied = match infer_theta(&found.inv_freq, found.head_dim) {
            Some(t) => format!("which imply rope_theta {t}"),
            None => format!("{:?}, not a geometric series", found.inv_freq),
        };
        return Err(bad(format!(
            "rope_theta {} does not give the graph's RoPE frequencies ({implied})",
            c.rope_theta
        )));
    }
    if c.tie_word_embeddings && !tied {
        return Err(bad(
            "tie_word_embeddings is true, but the LM head weight differs from the embedding".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inv_freq(theta: f64, d: usize) -> Vec<f64> {
        (0..d / 2)
            .map(|i| (1.0 / theta.powf((2 * i) as f64 / d as f64)) as f32 as f64)
            .collect()
    }

    #[test]
    fn infers_round_theta_from_f32_tables() {
        for (theta, d) in [(10000.0, 16), (500000.0, 128), (1e6, 64), (5000.0, 4)] {
            assert_eq!(infer_theta(&inv_freq(theta, d), d), Some(theta), "{theta} {d}");
        }
        // Not geometric: no theta.
        assert_eq!(infer_theta(&[1.0, 0.5, 0.1], 6), None);
        assert!(!theta_matches(10000.0, &inv_freq(10001.0, 16), 16));
    }
}
