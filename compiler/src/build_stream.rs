//! The layer-streaming build: `edgec build` without holding the compressed model.
//!
//! [`luc::compress::compress_graph`](crate::luc::compress::compress_graph) returns the whole
//! compressed graph, so building a model needs memory for all of it. Everything before the
//! bundle's tensor data (the scheduling pass, the kernel table, the manifest) needs only
//! each weight's name, shape, format and size, and for round-to-nearest quantization
//! without pruning those follow from the policy alone. So:
//!
//! 1. [`StreamedBuild::new`] makes a *skeleton* of the compressed graph: every linear the
//!    policy compresses is a packed weight of the policy's format whose buffers are ranges
//!    of one anonymous zero mapping (never touched, so it costs no memory); the other
//!    weights are the source model's (memory-mapped, untouched).
//! 2. The build schedules and generates kernels on the skeleton, as on the real graph.
//! 3. The bundle writer (`bundle::writer::write_streamed_bundle`) asks
//!    [`StreamedBuild::weight`] for each weight in order: a decoder layer's seven linears
//!    are compressed in parallel, each read from the mapped model a chunk of rows at a time
//!    (4 Mi weights), compressed by the functions `compress_graph` uses (round-to-nearest
//!    quantizes each row on its own, so chunks give the same bytes), and the chunk's source
//!    pages released (`madvise(MADV_DONTNEED)`); each weight is written, its mapped pages
//!    released, and dropped.
//!
//! The memory held is one layer's packed linears plus a chunk per worker, when the frontend
//! maps the source (safetensors, GGUF F32/F16/BF16); weights a frontend copies (GGUF
//! quantized types dequantized to f32, transposed ONNX MatMuls) are held by the loaded
//! model whatever the build does. The bytes written are identical to those of
//! `compress_graph` + `write_scheduled_bundle` (tested in `compiler/tests/build_stream.rs`). Policies whose sizes depend on the data (pruning:
//! a sparse weight's size is its kept count) or whose methods need calibration statistics
//! carried through the compressed model (GPTQ, Wanda, SparseGPT) are not streamed
//! ([`streamable`] says why) and take the whole-graph path.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::Context;
use edge_runtime::exec_stream::release_weight;
use edge_runtime::format::WeightFormat;
use edge_runtime::ir::{Graph, Weight, WeightData, WeightId};
use edge_runtime::packed::{self, Buf, Buffers, PackedWeight};
use memmap2::{Mmap, MmapOptions};
use rayon::prelude::*;

use crate::luc::calib::{self, LayerIds};
use crate::luc::candidate::Candidate;
use crate::luc::compress::to_packed;
use crate::luc::policy::Policy;
use crate::luc::prune::{Method, Pruner, Quantizer, compress};

/// `Ok` when `policy` can be built layer by layer: every layer quantized by round-to-nearest
/// without pruning. `calibrated`: calibration text is given (layers naming no quantizer
/// then use GPTQ, as in `compress_graph`). The error says why not.
pub fn streamable(policy: &Policy, calibrated: bool) -> Result<(), String> {
    for l in &policy.layers {
        if l.candidate.sparsity > 0.0 {
            return Err(format!(
                "layer {} is pruned (sparsity {}): its size depends on the weights",
                l.index, l.candidate.sparsity
            ));
        }
        match l.quantizer.as_deref() {
            Some("rtn") => {}
            None if !calibrated => {}
            q => {
                return Err(format!(
                    "layer {} is quantized by {} (needs calibration statistics through the compressed model)",
                    l.index,
                    q.unwrap_or("gptq")
                ));
            }
        }
        match l.pruner.as_deref() {
            None | Some("magnitude" | "wanda" | "sparsegpt") => {}
            Some(p) => return Err(format!("layer {}: unknown pruner `{p}`", l.index)),
        }
    }
    Ok(())
}

/// A build that produces the compressed weights one decoder layer at a time.
pub struct StreamedBuild<'a> {
    source: &'a Graph,
    skeleton: Graph,
    /// Per weight id: the decoder layer whose policy compresses it.
    layer_of: Vec<Option<usize>>,
    layers: Vec<(LayerIds, Candidate)>,
    /// Compressed weights of the current layer not yet handed out.
    ready: HashMap<usize, PackedWeight>,
    chunk_elems: usize,
}

/// Weights compressed at a time by default (see [`StreamedBuild::with_chunk_elems`]).
const CHUNK_ELEMS: usize = 1 << 22;

/// One linear by round-to-nearest, `chunk_elems` weights (whole rows) at a time: the same
/// codes, scales and mins as compressing the whole matrix (`compress_graph`), appended
/// buffer by buffer.
fn compress_linear(
    g: &Graph,
    id: WeightId,
    cand: &Candidate,
    chunk_elems: usize,
) -> anyhow::Result<PackedWeight> {
    let method = Method {
        quantizer: Quantizer::Rtn,
        pruner: Pruner::Magnitude,
    };
    let w = g.weight(id);
    let WeightData::Dense(t) = &w.data else {
        // Already packed (a compressed model as the source): decoded whole, as compress_graph does.
        let (values, rows, cols) = calib::weight_f32(g, id)?;
        return to_packed(
            &compress(&values, rows, cols, cand, method, None, true),
            cand.pattern,
        );
    };
    let (rows, cols) = (t.shape[0], t.shape[1]);
    let step = (chunk_elems / cols).max(1);
    let mut parts: Vec<(&'static str, Vec<u8>)> = vec![];
    let mut chunk = vec![];
    for r0 in (0..rows).step_by(step) {
        let n = step.min(rows - r0);
        chunk.resize(n * cols, 0.0);
        t.read_f32(r0 * cols, &mut chunk);
        release_weight(&w.data);
        let p = to_packed(&compress(&chunk, n, cols, cand, method, None, true), cand.pattern)?;
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

/// Named buffer lengths of a packed weight.
type BufferLens = Vec<(&'static str, usize)>;

/// The buffer lengths of a `[rows, cols]` weight in a quantized format (no pruning).
fn quant_buffer_lens(format: &WeightFormat, rows: usize, cols: usize) -> anyhow::Result<BufferLens> {
    let WeightFormat::Quant(q) = format else {
        anyhow::bail!("format {format} is not a plain quantized format");
    };
    Ok(packed::quant_buffer_lens(q, rows, cols))
}

impl<'a> StreamedBuild<'a> {
    /// The skeleton of `source` compressed by `policy` (none: the weights as they are).
    /// Fails when the policy is not [`streamable`] without calibration.
    pub fn new(source: &'a Graph, policy: Option<&Policy>) -> anyhow::Result<StreamedBuild<'a>> {
        let mut layer_of = vec![None; source.weights.len()];
        let mut layers = vec![];
        let mut placeholders: Vec<(usize, WeightFormat, BufferLens)> = vec![];
        if let Some(policy) = policy {
            let (have, want) = (policy.layers.len(), source.config.num_layers);
            anyhow::ensure!(have == want, "the policy has {have} layers, the model {want}");
            streamable(policy, false).map_err(|e| anyhow::anyhow!("not a streamable policy: {e}"))?;
            for (i, lp) in policy.layers.iter().enumerate() {
                let ids = LayerIds::new(source, i)?;
                let format = lp.candidate.format();
                for id in ids.weights {
                    let shape = source.weight(id).shape();
                    anyhow::ensure!(
                        shape.len() == 2,
                        "weight `{}` is not a matrix",
                        source.weight(id).name
                    );
                    let lens = quant_buffer_lens(&format, shape[0], shape[1])?;
                    placeholders.push((id.0, format.clone(), lens));
                    layer_of[id.0] = Some(i);
                }
                layers.push((ids, lp.candidate));
            }
        }
        // One read-only anonymous zero mapping as long as the longest buffer; its pages are
        // never touched (nothing reads a skeleton's packed bytes), so it holds no memory.
        let longest = placeholders
            .iter()
            .flat_map(|(_, _, lens)| lens.iter().map(|l| l.1))
            .max()
            .unwrap_or(0);
        let mut skeleton = source.clone();
        if longest > 0 {
            let zeros: Arc<Mmap> = Arc::new(
                MmapOptions::new()
                    .len(longest)
                    .map_anon()
                    .context("mapping the placeholder bytes")?
                    .make_read_only()
                    .context("mapping the placeholder bytes")?,
            );
            for (id, format, lens) in placeholders {
                let w = &source.weights[id];
                let mut bufs = Buffers::default();
                for (name, len) in lens {
                    bufs.set(
                        name,
                        Buf::Mapped {
                            map: zeros.clone(),
                            offset: 0,
                            len,
                        },
                    )?;
                }
                let p = PackedWeight::from_parts(format, w.shape()[0], w.shape()[1], bufs)
                    .with_context(|| format!("the skeleton of `{}`", w.name))?;
                skeleton.weights[id] = Weight::new_packed(w.name.clone(), p);
            }
        }
        Ok(StreamedBuild {
            source,
            skeleton,
            layer_of,
            layers,
            ready: HashMap::new(),
            chunk_elems: CHUNK_ELEMS,
        })
    }

    /// The compressed graph's skeleton: the real graph's names, shapes, formats and sizes;
    /// its compressed weights' bytes are placeholders, never to be read.
    pub fn skeleton(&self) -> &Graph {
        &self.skeleton
    }

    /// Compresses at most `elems` weights at a time (whole rows; at least one row). Round-to-
    /// nearest quantizes each row on its own, so the packed bytes do not depend on it; the
    /// default, 4 Mi, keeps a worker's working set near 50 MB.
    pub fn with_chunk_elems(mut self, elems: usize) -> Self {
        self.chunk_elems = elems.max(1);
        self
    }

    /// Compresses decoder layer `i`'s seven linears as `compress_graph` does for a
    /// round-to-nearest layer (in parallel), each a chunk of rows at a time, releasing
    /// the source pages of each chunk once read.
    fn compress_layer(&mut self, i: usize) -> anyhow::Result<()> {
        let (ids, cand) = &self.layers[i];
        let (g, chunk_elems) = (self.source, self.chunk_elems);
        let packed: Vec<PackedWeight> = ids
            .weights
            .par_iter()
            .map(|&id| {
                compress_linear(g, id, cand, chunk_elems)
                    .with_context(|| format!("layer {i}: compressing {}", g.weight(id).name))
            })
            .collect::<anyhow::Result<_>>()?;
        for (id, p) in ids.weights.iter().zip(packed) {
            self.ready.insert(id.0, p);
        }
        Ok(())
    }

    /// The real data of weight `i` (the skeleton's order): compressed on first use of its
    /// layer, or the source's weight as it is.
    pub fn weight(&mut self, i: usize) -> anyhow::Result<WeightData> {
        anyhow::ensure!(i < self.source.weights.len(), "no weight {i}");
        match self.layer_of[i] {
            Some(layer) => {
                if !self.ready.contains_key(&i) {
                    self.compress_layer(layer)?;
                }
                let p = self
                    .ready
                    .remove(&i)
                    .context("internal: weight compressed twice")?;
                Ok(WeightData::Packed(Arc::new(p)))
            }
            None => Ok(self.source.weights[i].data.clone()),
        }
    }
}
