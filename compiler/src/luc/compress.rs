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
use edge_runtime::exec_stream::release_weight;
use edge_runtime::format::SparsePattern;
use edge_runtime::ir::{Graph, Weight, WeightData, WeightId};
use edge_runtime::packed::io::write_packed_safetensors;
use edge_runtime::packed::{Buffers, PackedWeight};
use edge_runtime::tokenizer::Tokenizer;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::calib::{self, LINEAR_INPUT, LayerIds};
use super::candidate::Candidate;
use super::policy::Policy;
use super::prune::{Method, Pruner, Quantizer, compress};
use super::quantize::{Compressed, Prepared, TILE};
use crate::frontend::llama::layer_weight_names;

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

/// Whether `method` applied to `cand` needs the layer's input statistics.
fn uses_stats(method: Method, cand: &Candidate) -> bool {
    method.quantizer == Quantizer::Gptq || (cand.sparsity > 0.0 && method.pruner != Pruner::Magnitude)
}

/// Weights compressed at a time by default (see [`LayerCompressor::with_chunk_elems`]).
pub const CHUNK_ELEMS: usize = 1 << 22;

/// One linear compressed `chunk_elems` weights (whole rows, a multiple of the sweep's row
/// tile) at a time, reading each chunk from the (possibly mapped) weight and releasing the
/// source pages once read. Every method treats rows independently (the masks are chosen
/// per row, GPTQ and SparseGPT sweep tiles of rows against the same `h`), and chunks of
/// whole tiles are swept exactly as the whole matrix is, so the packed buffers are the
/// whole matrix's, appended chunk by chunk.
pub fn compress_linear(
    g: &Graph,
    id: WeightId,
    cand: &Candidate,
    method: Method,
    h: Option<&Prepared>,
    chunk_elems: usize,
) -> anyhow::Result<PackedWeight> {
    let w = g.weight(id);
    let WeightData::Dense(t) = &w.data else {
        // Already packed (a compressed model as the source): decoded whole.
        let (values, rows, cols) = calib::weight_f32(g, id)?;
        return to_packed(
            &compress(&values, rows, cols, cand, method, h, true),
            cand.pattern,
        );
    };
    anyhow::ensure!(t.shape.len() == 2, "weight `{}` is not a matrix", w.name);
    let (rows, cols) = (t.shape[0], t.shape[1]);
    let step = (chunk_elems / cols).max(1).next_multiple_of(TILE);
    let mut parts: Vec<(&'static str, Vec<u8>)> = vec![];
    let mut chunk = vec![];
    for r0 in (0..rows).step_by(step) {
        let n = step.min(rows - r0);
        chunk.resize(n * cols, 0.0);
        t.read_f32(r0 * cols, &mut chunk);
        release_weight(&w.data);
        let p = to_packed(&compress(&chunk, n, cols, cand, method, h, true), cand.pattern)?;
        if step >= rows {
            return Ok(p);
        }
        for (k, (name, b)) in p.buffers().iter().enumerate() {
            if parts.len() == k {
                parts.push((name, Vec::with_capacity(b.len() * rows.div_ceil(n))));
            }
            parts[k].1.extend_from_slice(b.as_slice());
        }
    }
    let mut bufs = Buffers::default();
    for (name, b) in parts {
        bufs.set(name, b.into())?;
    }
    Ok(PackedWeight::from_parts(cand.format(), rows, cols, bufs)?)
}

/// One decoder layer compressed by [`LayerCompressor::next_layer`].
pub struct CompressedLayer {
    pub ids: LayerIds,
    /// The seven linears in [`LayerIds::weights`] order.
    pub weights: Vec<PackedWeight>,
    pub report: LayerReport,
}

/// Compresses a model's decoder layers in order, one at a time: the sequential core of
/// [`compress_graph`] and of the streamed build (`build_stream`), which keep or write
/// what it returns. It holds the calibration samples' hidden states entering the next
/// layer (samples x seq x hidden f32) and nothing of the layers already done: layer `i`'s
/// Hessians are taken by running the source layer on the outputs of the compressed layers
/// `0..i` (as GPTQ and SparseGPT do), its linears are compressed (in parallel, each a
/// chunk of rows at a time, [`compress_linear`]), the samples are run through the
/// compressed layer for layer `i + 1`, and the layer's source pages are released.
/// Layers whose method needs no statistics (round-to-nearest, magnitude pruning) are
/// compressed without them.
pub struct LayerCompressor<'g> {
    graph: &'g Graph,
    candidates: Vec<Candidate>,
    methods: Vec<Method>,
    needs_stats: bool,
    seq: usize,
    /// The hidden states entering layer `next`, per sample (empty without statistics).
    inputs: Vec<Vec<f32>>,
    next: usize,
    chunk_elems: usize,
}

impl<'g> LayerCompressor<'g> {
    /// Checks `policy` against `graph` (depth, method names, calibration for the methods
    /// that need it) and embeds the calibration `samples` (token sequences of equal length)
    /// when a layer needs statistics.
    pub fn new(graph: &'g Graph, policy: &Policy, samples: Option<&[Vec<u32>]>) -> anyhow::Result<Self> {
        let c = &graph.config;
        anyhow::ensure!(
            policy.layers.len() == c.num_layers,
            "the policy has {} layers, the model {}",
            policy.layers.len(),
            c.num_layers
        );
        let methods = policy_methods(policy, samples.is_some())?;
        let candidates: Vec<Candidate> = policy.layers.iter().map(|l| l.candidate).collect();
        let needs_stats = candidates.iter().zip(&methods).any(|(c, m)| uses_stats(*m, c));
        let seq = samples.and_then(|s| s.first()).map_or(0, Vec::len);
        let inputs = match samples {
            Some(s) if needs_stats => calib::embed(graph, s)?,
            Some(_) => vec![],
            None => {
                anyhow::ensure!(
                    !needs_stats,
                    "the policy asks for GPTQ, Wanda or SparseGPT, which need calibration text (--calib)"
                );
                vec![]
            }
        };
        Ok(LayerCompressor {
            graph,
            candidates,
            methods,
            needs_stats,
            seq,
            inputs,
            next: 0,
            chunk_elems: CHUNK_ELEMS,
        })
    }

    /// Compresses at most `elems` weights of a linear at a time (whole row tiles; the
    /// packed bytes do not depend on it). The default, 4 Mi, keeps a worker's working set
    /// near 50 MB.
    pub fn with_chunk_elems(mut self, elems: usize) -> Self {
        self.chunk_elems = elems.max(1);
        self
    }

    /// The method of each layer.
    pub fn methods(&self) -> &[Method] {
        &self.methods
    }

    /// The layer [`next_layer`](Self::next_layer) compresses.
    pub fn next_index(&self) -> usize {
        self.next
    }

    /// The calibration hidden states entering layer [`next_index`](Self::next_index)
    /// (empty when no layer needs statistics).
    pub fn inputs(&self) -> &[Vec<f32>] {
        &self.inputs
    }

    /// Skips to layer `layer`, whose calibration inputs are `inputs`: what a compressor
    /// for a policy that agrees with this one on every layer below `layer` held there
    /// ([`inputs`](Self::inputs)). The layers compressed from then on are the same bytes as
    /// a compressor that ran from layer 0.
    pub fn resume_at(mut self, layer: usize, inputs: Vec<Vec<f32>>) -> anyhow::Result<Self> {
        anyhow::ensure!(
            layer < self.graph.config.num_layers,
            "cannot resume at layer {layer}: the model has {} layers",
            self.graph.config.num_layers
        );
        if self.needs_stats {
            anyhow::ensure!(
                inputs.len() == self.inputs.len()
                    && inputs.iter().zip(&self.inputs).all(|(a, b)| a.len() == b.len()),
                "resuming at layer {layer}: the calibration inputs have the wrong shape"
            );
            self.inputs = inputs;
        }
        self.next = layer;
        Ok(self)
    }

    /// Compresses the next decoder layer (an error past the last).
    pub fn next_layer(&mut self) -> anyhow::Result<CompressedLayer> {
        let (g, i) = (self.graph, self.next);
        anyhow::ensure!(i < g.config.num_layers, "all {i} layers are compressed");
        let (cand, method) = (self.candidates[i], self.methods[i]);
        let ids = LayerIds::new(g, i)?;
        let prepared = if uses_stats(method, &cand) {
            // Statistics of this layer's linear inputs, on the compressed prefix's outputs.
            let exec = Executor::new(Arc::new(g.clone()))?;
            let cap = calib::capture_layer(&exec, &ids, &self.inputs, self.seq)?;
            Some(cap.hessians.par_iter().map(|h| h.prepare()).collect::<Vec<_>>())
        } else {
            None
        };
        let chunk_elems = self.chunk_elems;
        let weights: Vec<PackedWeight> = (0..7)
            .into_par_iter()
            .map(|k| {
                let h = prepared.as_ref().map(|p| &p[LINEAR_INPUT[k]]);
                compress_linear(g, ids.weights[k], &cand, method, h, chunk_elems)
                    .with_context(|| format!("layer {i}: compressing {}", g.weight(ids.weights[k]).name))
            })
            .collect::<anyhow::Result<_>>()?;
        drop(prepared);
        if self.needs_stats && i + 1 < g.config.num_layers {
            // The next layer's inputs: the samples through this layer, compressed.
            let exec = layer_executor(g, &ids, &weights)?;
            self.inputs = calib::run_layer(&exec, &ids, &self.inputs, self.seq)?;
        }
        // The layer's source pages (mapped models): read again only if asked again.
        for name in layer_weight_names(i) {
            if let Some(id) = g.weight_id(&name) {
                release_weight(&g.weight(id).data);
            }
        }
        self.next += 1;
        let report = LayerReport {
            layer: i,
            candidate: cand.label(),
            method: format!("{}+{}", method.quantizer.name(), method.pruner.name()),
            bytes: weights.iter().map(PackedWeight::storage_bytes).sum(),
        };
        Ok(CompressedLayer { ids, weights, report })
    }
}

/// An executor of `g` with the linears of layer `ids.layer` replaced by `weights` (in
/// [`LayerIds::weights`] order): runs that layer compressed, for
/// [`calib::run_layer`] or [`calib::loss_from`] from it.
pub fn layer_executor(g: &Graph, ids: &LayerIds, weights: &[PackedWeight]) -> anyhow::Result<Executor> {
    let mut lg = g.clone();
    for (id, p) in ids.weights.iter().zip(weights) {
        let name = lg.weights[id.0].name.clone();
        lg.weights[id.0] = Weight::new_packed(name, p.clone());
    }
    Ok(Executor::new(Arc::new(lg))?)
}

/// Each policy layer's method (`calibrated`: calibration samples are given, so layers
/// naming no quantizer or pruner use GPTQ and SparseGPT).
pub fn policy_methods(policy: &Policy, calibrated: bool) -> anyhow::Result<Vec<Method>> {
    policy
        .layers
        .iter()
        .map(|l| {
            parse_method(l.quantizer.as_deref(), l.pruner.as_deref(), calibrated)
                .with_context(|| format!("policy layer {}", l.index))
        })
        .collect()
}

/// Compresses every decoder layer of `graph` by `policy` ([`LayerCompressor`], keeping
/// every layer). `samples` (token sequences of equal length) are needed when a layer's
/// method uses input statistics. `progress(done, total)` is called after each layer.
pub fn compress_graph(
    graph: &Graph,
    policy: &Policy,
    samples: Option<&[Vec<u32>]>,
    mut progress: impl FnMut(usize, usize),
) -> anyhow::Result<(Graph, CompressReport)> {
    let mut lc = LayerCompressor::new(graph, policy, samples)?;
    let n = graph.config.num_layers;
    let mut out = graph.clone();
    let mut layers = vec![];
    for i in 0..n {
        let l = lc.next_layer()?;
        for (id, p) in l.ids.weights.iter().zip(l.weights) {
            let name = graph.weight(*id).name.clone();
            out.weights[id.0] = Weight::new_packed(name, p);
        }
        layers.push(l.report);
        progress(i + 1, n);
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
