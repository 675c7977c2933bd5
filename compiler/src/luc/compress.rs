//! `edgec compress`: applies a policy to a model, layer by layer, and writes the compressed
//! model directory.
//!
//! Layers are compressed in order. For methods that need input statistics (GPTQ, Wanda,
//! SparseGPT) the calibration samples are carried through the model: layer `i`'s Hessians
//! are taken on the outputs of the already-compressed layers `0..i` (as GPTQ and SparseGPT
//! do), then its seven linears are compressed in parallel and packed exactly (codes, f16
//! scales and mins, masks or N:M positions), and the samples are run through the
//! compressed layer to feed the next one.
//!
//! The output directory holds `model.safetensors` (packed linears as `.qweight/.scales/...`
//! buffers, the other tensors dense; see `docs/formats.md`), `edge-model.json` (the model
//! config, the tokenizer's conventions and the policy) and `tokenizer.json`.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use edge_runtime::Executor;
use edge_runtime::format::SparsePattern;
use edge_runtime::ir::{Graph, Weight, WeightData};
use edge_runtime::packed::PackedWeight;
use edge_runtime::packed::io::write_packed_safetensors;
use edge_runtime::tokenizer::Tokenizer;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::calib::{self, LINEAR_INPUT, LayerIds};
use super::policy::Policy;
use super::prune::{Method, Pruner, Quantizer, compress};
use super::quantize::Compressed;

/// The file in a compressed model directory that marks it and holds its description.
pub const MODEL_FILE: &str = "edge-model.json";

/// Contents of `edge-model.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CompressedModelInfo {
    pub config: edge_runtime::ir::ModelConfig,
    pub source: String,
    /// The policy as TOML text.
    pub policy: String,
    pub add_bos: bool,
    pub bos: Option<u32>,
    pub eos: Vec<u32>,
    /// Exact bytes of the compressed linear weights.
    pub linear_bytes: usize,
    /// Weights in those linears.
    pub linear_params: usize,
}

/// What compressing one model did.
#[derive(Debug, Clone, Serialize)]
pub struct CompressReport {
    pub linear_bytes: usize,
    pub linear_params: usize,
    /// Average stored bits per original linear weight (codes, scales, mins, masks).
    pub bits_per_weight: f64,
    /// Fraction of linear weights pruned.
    pub sparsity: f64,
    pub layers: Vec<LayerReport>,
}

#[derive(Debug, Clone, Serialize)]
pub struct LayerReport {
    pub layer: usize,
    pub candidate: String,
    pub method: String,
    pub bytes: usize,
}

fn parse_method(quantizer: Option<&str>, pruner: Option<&str>, calibrated: bool) -> anyhow::Result<Method> {
    let quantizer = match quantizer {
        None if calibrated => Quantizer::Gptq,
        None => Quantizer::Rtn,
        Some("gptq") => Quantizer::Gptq,
        Some("rtn") => Quantizer::Rtn,
        Some(q) => anyhow::bail!("unknown quantizer `{q}` (rtn, gptq)"),
    };
    let pruner = match pruner {
        None if calibrated => Pruner::SparseGpt,
        None => Pruner::Magnitude,
        Some("sparsegpt") => Pruner::SparseGpt,
        Some("wanda") => Pruner::Wanda,
        Some("magnitude") => Pruner::Magnitude,
        Some(p) => anyhow::bail!("unknown pruner `{p}` (magnitude, wanda, sparsegpt)"),
    };
    Ok(Method { quantizer, pruner })
}

/// Packs a compressed weight exactly as the method chose it.
pub fn to_packed(c: &Compressed, pattern: SparsePattern) -> anyhow::Result<PackedWeight> {
    let spec = c
        .spec
        .context("a compressed weight without quantization cannot be packed")?;
    let scales: Vec<f32> = c.params.iter().map(|p| p.scale.to_f32()).collect();
    let mins: Vec<f32> = c.params.iter().map(|p| p.min.to_f32()).collect();
    let mins = (spec.scheme == edge_runtime::format::QuantScheme::Asym).then_some(&mins[..]);
    Ok(match &c.mask {
        None => PackedWeight::pack_codes(c.rows, c.cols, &c.codes, &scales, mins, spec)?,
        Some(mask) => {
            PackedWeight::pack_sparse_codes(c.rows, c.cols, mask, pattern, &c.codes, &scales, mins, spec)?
        }
    })
}

/// Compresses every decoder layer of `graph` by `policy`. `samples` (token sequences of
/// equal length) are needed when a layer's method uses input statistics. `progress(done,
/// total)` is called after each layer.
pub fn compress_graph(
    graph: &Graph,
    policy: &Policy,
    samples: Option<&[Vec<u32>]>,
    mut progress: impl FnMut(usize, usize),
) -> anyhow::Result<(Graph, CompressReport)> {
    let c = &graph.config;
    anyhow::ensure!(
        policy.layers.len() == c.num_layers,
        "the policy has {} layers, the model {}",
        policy.layers.len(),
        c.num_layers
    );
    let calibrated = samples.is_some();
    let methods: Vec<Method> = policy
        .layers
        .iter()
        .map(|l| {
            parse_method(l.quantizer.as_deref(), l.pruner.as_deref(), calibrated)
                .with_context(|| format!("policy layer {}", l.index))
        })
        .collect::<anyhow::Result<_>>()?;
    let needs_stats = policy.layers.iter().zip(&methods).any(|(l, m)| {
        m.quantizer == Quantizer::Gptq || (l.candidate.sparsity > 0.0 && m.pruner != Pruner::Magnitude)
    });
    anyhow::ensure!(
        !needs_stats || calibrated,
        "the policy asks for GPTQ, Wanda or SparseGPT, which need calibration text (--calib)"
    );
    let seq = samples.and_then(|s| s.first()).map_or(0, Vec::len);
    let mut inputs = match samples {
        Some(s) if needs_stats => calib::embed(graph, s)?,
        _ => vec![],
    };
    let mut out = graph.clone();
    let mut layers = vec![];
    for (i, (lp, method)) in policy.layers.iter().zip(&methods).enumerate() {
        let ids = LayerIds::new(graph, i)?;
        let prepared = if needs_stats {
            // Statistics of this layer's linear inputs, on the compressed prefix's outputs.
            let exec = Executor::new(Arc::new(graph.clone()))?;
            let cap = calib::capture_layer(&exec, &ids, &inputs, seq)?;
            Some(cap.hessians.par_iter().map(|h| h.prepare()).collect::<Vec<_>>())
        } else {
            None
        };
        let packed: Vec<PackedWeight> = (0..7)
            .into_par_iter()
            .map(|k| {
                let (w, rows, cols) = calib::weight_f32(graph, ids.weights[k])?;
                let h = prepared.as_ref().map(|p| &p[LINEAR_INPUT[k]]);
                let comp = compress(&w, rows, cols, &lp.candidate, *method, h, true);
                to_packed(&comp, lp.candidate.pattern)
                    .with_context(|| format!("layer {i}: packing {}", graph.weight(ids.weights[k]).name))
            })
            .collect::<anyhow::Result<_>>()?;
        let mut bytes = 0;
        for (k, p) in packed.into_iter().enumerate() {
            bytes += p.storage_bytes();
            let name = graph.weight(ids.weights[k]).name.clone();
            out.weights[ids.weights[k].0] = Weight::new_packed(name, p);
        }
        layers.push(LayerReport {
            layer: i,
            candidate: lp.candidate.label(),
            method: format!("{}+{}", method.quantizer.name(), method.pruner.name()),
            bytes,
        });
        if needs_stats && i + 1 < c.num_layers {
            let exec = Executor::new(Arc::new(out.clone()))?;
            inputs = calib::run_layer(&exec, &ids, &inputs, seq)?;
        }
        progress(i + 1, c.num_layers);
    }
    out.verify()?;
    let report = report(&out, layers);
    Ok((out, report))
}

fn report(g: &Graph, layers: Vec<LayerReport>) -> CompressReport {
    let (mut bytes, mut params, mut kept) = (0usize, 0usize, 0usize);
    for w in &g.weights {
        if let WeightData::Packed(p) = &w.data {
            bytes += p.storage_bytes();
            params += p.rows() * p.cols();
            kept += p.kept_counts().iter().sum::<usize>();
        }
    }
    CompressReport {
        linear_bytes: bytes,
        linear_params: params,
        bits_per_weight: 8.0 * bytes as f64 / params.max(1) as f64,
        sparsity: 1.0 - kept as f64 / params.max(1) as f64,
        layers,
    }
}

/// Writes a compressed graph as a model directory (created if missing; files replaced
/// atomically by rename so an interrupted write leaves no half file under the final name).
pub fn write_model_dir(
    dir: &Path,
    graph: &Graph,
    tokenizer: Option<&Tokenizer>,
    policy: &Policy,
    source: &str,
    report: &CompressReport,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut packed: Vec<(&str, &PackedWeight)> = vec![];
    let mut dense = vec![];
    for w in &graph.weights {
        match &w.data {
            WeightData::Packed(p) => packed.push((w.name.as_str(), p)),
            WeightData::Dense(t) => dense.push((w.name.as_str(), t)),
        }
    }
    let info = CompressedModelInfo {
        config: graph.config.clone(),
        source: source.to_string(),
        policy: policy.to_toml(),
        add_bos: tokenizer.is_some_and(|t| t.add_bos),
        bos: tokenizer.and_then(|t| t.bos),
        eos: tokenizer.map(|t| t.eos.clone()).unwrap_or_default(),
        linear_bytes: report.linear_bytes,
        linear_params: report.linear_params,
    };
    let tmp = dir.join("model.safetensors.partial");
    write_packed_safetensors(&tmp, &packed, &dense, &BTreeMap::new())?;
    std::fs::rename(&tmp, dir.join("model.safetensors"))?;
    if let Some(t) = tokenizer {
        std::fs::write(dir.join("tokenizer.json"), t.to_json()?)?;
    }
    let tmp = dir.join(format!("{MODEL_FILE}.partial"));
    std::fs::write(&tmp, serde_json::to_string_pretty(&info)?)?;
    std::fs::rename(&tmp, dir.join(MODEL_FILE))?;
    Ok(())
}
