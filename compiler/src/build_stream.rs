//! The layer-streaming build: `edgec build` without holding the compressed model.
//!
//! [`luc::compress::compress_graph`](crate::luc::compress::compress_graph) returns the whole
//! compressed graph, so building a model that way needs memory for all of it. Everything
//! before the bundle's tensor data (the scheduling pass, the kernel table, the manifest)
//! needs only each weight's name, shape, format and size, and those follow from the
//! policy alone: a quantized weight's size from its shape and format, a pruned one's from
//! the values each row keeps, which every pruner fixes per row in advance
//! ([`kept_per_row`]). So:
//!
//! 1. [`StreamedBuild::new`] makes a *skeleton* of the compressed graph: every linear the
//!    policy compresses is a packed weight of its format whose value buffers are ranges of
//!    one anonymous zero mapping (never touched, so it costs no memory) and whose sparse
//!    positions (mask or N:M index, read when the weight is checked) are one shared row
//!    pattern per shape; the other weights are the source model's (memory-mapped, untouched).
//! 2. The build schedules and generates kernels on the skeleton, as on the real graph.
//! 3. The bundle writer (`bundle::writer::write_streamed_bundle`) asks
//!    [`StreamedBuild::weight`] for each weight in order; the first weight of a decoder
//!    layer has the [`LayerCompressor`] compress the layers up to it, in order: the same
//!    code as `compress_graph` (`edgec compress`), so the same bytes for every policy
//!    (round-to-nearest, GPTQ, magnitude, Wanda, SparseGPT, mixed per layer). For the
//!    methods that need statistics it carries the calibration samples' hidden states from
//!    layer to layer (samples x seq x hidden f32) and takes each layer's Hessians on them;
//!    each linear is read from the mapped model a chunk of rows at a time, the chunk's
//!    source pages released; each produced weight is checked against its declaration,
//!    written, and dropped.
//!
//! The memory held is one layer's packed linears, a chunk per worker, the calibration
//! hidden states and, for a layer with statistics, its four input Hessians and their
//! inverse factors (`[n, n]` each: at LLaMA-7B's shapes the MLP's 11008-wide one
//! dominates), when the frontend maps the source (safetensors, GGUF F32/F16/BF16);
//! weights a frontend copies (GGUF quantized types dequantized to f32, transposed ONNX
//! MatMuls) are held by the loaded model whatever the build does. The bytes written are
//! identical to those of `compress_graph` + `write_scheduled_bundle` (tested in
//! `compiler/tests/build_stream.rs`).

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::Context;
use edge_runtime::format::{SparsePattern, WeightFormat};
use edge_runtime::ir::{Graph, Weight, WeightData};
use edge_runtime::packed::{self, Buf, Buffers, PackedWeight};
use memmap2::{Mmap, MmapOptions};

use crate::luc::calib::LayerIds;
use crate::luc::compress::{CHUNK_ELEMS, LayerCompressor, policy_methods};
use crate::luc::policy::Policy;
use crate::luc::prune::kept_per_row;

/// `Ok` when `policy` can be built layer by layer: every valid policy can (`calibrated`:
/// calibration samples are given; layers naming no quantizer then use GPTQ, as in
/// `compress_graph`). The error says what is wrong with the policy.
pub fn streamable(policy: &Policy, calibrated: bool) -> Result<(), String> {
    policy_methods(policy, calibrated)
        .map(|_| ())
        .map_err(|e| format!("{e:#}"))
}

/// A build that produces the compressed weights one decoder layer at a time.
pub struct StreamedBuild<'a> {
    source: &'a Graph,
    skeleton: Graph,
    /// Per weight id: the decoder layer whose policy compresses it.
    layer_of: Vec<Option<usize>>,
    /// The policy and calibration samples, to start the compression again (another target).
    policy: Option<(Policy, Option<Vec<Vec<u32>>>)>,
    compressor: Option<LayerCompressor<'a>>,
    /// Compressed weights of the layers done not yet handed out.
    ready: HashMap<usize, PackedWeight>,
    chunk_elems: usize,
}

/// Named buffer lengths of a packed weight.
type BufferLens = Vec<(&'static str, usize)>;

/// A sparse weight's positions buffer: its name and the bytes of one row.
type PositionsRow = Option<(&'static str, Vec<u8>)>;

/// The value buffers' lengths of a `[rows, cols]` weight of `format` whose rows keep `kept`
/// values each, and the sparse positions' buffer name and one row of its bytes (every
/// row keeps its first `kept` columns, or the first `n` of every `m`).
fn placeholder_layout(
    format: &WeightFormat,
    rows: usize,
    cols: usize,
    kept: usize,
) -> anyhow::Result<(BufferLens, PositionsRow)> {
    match format {
        WeightFormat::Quant(q) => Ok((packed::quant_buffer_lens(q, rows, cols), None)),
        WeightFormat::Sparse {
            pattern,
            values: edge_runtime::format::ValueFormat::Quant(q),
        } => {
            let row = match *pattern {
                SparsePattern::Unstructured => {
                    let mut row = vec![0u8; cols.div_ceil(8)];
                    for j in 0..kept {
                        row[j / 8] |= 1 << (j % 8);
                    }
                    ("mask", row)
                }
                SparsePattern::NofM { n, m } => {
                    let ib = SparsePattern::index_bits(m);
                    let per_row = cols / m as usize * n as usize;
                    anyhow::ensure!(per_row == kept, "{n}:{m} over {cols} columns");
                    let mut row = vec![0u8; (per_row * ib).div_ceil(8)];
                    for t in 0..per_row {
                        let p = t % n as usize;
                        for b in 0..ib {
                            if p >> b & 1 == 1 {
                                row[(t * ib + b) / 8] |= 1 << ((t * ib + b) % 8);
                            }
                        }
                    }
                    ("index", row)
                }
            };
            Ok((packed::quant_buffer_lens(q, rows, kept), Some(row)))
        }
        _ => anyhow::bail!("format {format} is not a compressed format the policy makes"),
    }
}

impl<'a> StreamedBuild<'a> {
    /// The skeleton of `source` compressed by `policy` (none: the weights as they are),
    /// with `samples` for the methods that need calibration (an error if they are missing).
    pub fn new(
        source: &'a Graph,
        policy: Option<&Policy>,
        samples: Option<&[Vec<u32>]>,
    ) -> anyhow::Result<StreamedBuild<'a>> {
        let mut layer_of = vec![None; source.weights.len()];
        let mut placeholders: Vec<(usize, WeightFormat, BufferLens, PositionsRow)> = vec![];
        let compressor = match policy {
            Some(policy) => {
                let lc = LayerCompressor::new(source, policy, samples)?;
                for (i, (lp, method)) in policy.layers.iter().zip(lc.methods()).enumerate() {
                    let ids = LayerIds::new(source, i)?;
                    let format = lp.candidate.format();
                    for id in ids.weights {
                        let w = source.weight(id);
                        let shape = w.shape();
                        anyhow::ensure!(shape.len() == 2, "weight `{}` is not a matrix", w.name);
                        let kept = kept_per_row(shape[1], &lp.candidate, method.pruner);
                        let (lens, positions) = placeholder_layout(&format, shape[0], shape[1], kept)
                            .with_context(|| format!("weight `{}`", w.name))?;
                        placeholders.push((id.0, format.clone(), lens, positions));
                        layer_of[id.0] = Some(i);
                    }
                }
                Some(lc)
            }
            None => None,
        };
        // One read-only anonymous zero mapping as long as the longest buffer; its pages are
        // never touched (nothing reads a skeleton's packed values), so it holds no memory.
        let longest = placeholders
            .iter()
            .flat_map(|(_, _, lens, _)| lens.iter().map(|l| l.1))
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
            // Sparse positions, one buffer per distinct (rows, row bytes), shared.
            let mut positions_bufs: HashMap<(usize, Vec<u8>), Buf> = HashMap::new();
            for (id, format, lens, positions) in placeholders {
                let w = &source.weights[id];
                let rows = w.shape()[0];
                let mut bufs = Buffers::default();
                for (name, len) in lens {
                    let map = zeros.clone();
                    bufs.set(name, Buf::Mapped { map, offset: 0, len })?;
                }
                if let Some((name, row)) = positions {
                    let buf = positions_bufs
                        .entry((rows, row))
                        .or_insert_with_key(|(rows, row)| Buf::Owned(Arc::new(row.repeat(*rows))));
                    bufs.set(name, buf.clone())?;
                }
                let p = PackedWeight::from_parts(format, rows, w.shape()[1], bufs)
                    .with_context(|| format!("the skeleton of `{}`", w.name))?;
                skeleton.weights[id] = Weight::new_packed(w.name.clone(), p);
            }
        }
        Ok(StreamedBuild {
            source,
            skeleton,
            layer_of,
            policy: policy.map(|p| (p.clone(), samples.map(<[_]>::to_vec))),
            compressor,
            ready: HashMap::new(),
            chunk_elems: CHUNK_ELEMS,
        })
    }

    /// The compressed graph's skeleton: the real graph's names, shapes, formats and sizes;
    /// its compressed weights' bytes are placeholders, never to be read.
    pub fn skeleton(&self) -> &Graph {
        &self.skeleton
    }

    /// Compresses at most `elems` weights of a linear at a time (whole row tiles); the
    /// packed bytes do not depend on it (see `luc::compress::compress_linear`).
    pub fn with_chunk_elems(mut self, elems: usize) -> Self {
        self.chunk_elems = elems.max(1);
        self.compressor = self.compressor.map(|c| c.with_chunk_elems(elems));
        self
    }

    /// Compresses layers in order up to and including `layer`, keeping their weights until
    /// handed out; starts again from layer 0 when `layer` is already done (the next target).
    fn compress_through(&mut self, layer: usize) -> anyhow::Result<()> {
        let (policy, samples) = self.policy.as_ref().context("internal: no policy")?;
        let mut lc = match self.compressor.take() {
            Some(lc) if lc.next_index() <= layer => lc,
            _ => {
                self.ready.clear();
                LayerCompressor::new(self.source, policy, samples.as_deref())?
                    .with_chunk_elems(self.chunk_elems)
            }
        };
        while lc.next_index() <= layer {
            let done = lc.next_layer()?;
            for (id, p) in done.ids.weights.iter().zip(done.weights) {
                let declared = &self.skeleton.weights[id.0];
                let lens = |b: &Buffers| b.iter().map(|(n, b)| (n, b.len())).collect::<Vec<_>>();
                let WeightData::Packed(d) = &declared.data else {
                    anyhow::bail!("internal: `{}` is not packed in the skeleton", declared.name);
                };
                anyhow::ensure!(
                    lens(p.buffers()) == lens(d.buffers()),
                    "layer {}: `{}` was compressed to buffers {:?}, planned as {:?}",
                    done.ids.layer,
                    declared.name,
                    lens(p.buffers()),
                    lens(d.buffers())
                );
                self.ready.insert(id.0, p);
            }
        }
        self.compressor = Some(lc);
        Ok(())
    }

    /// The real data of weight `i` (the skeleton's order): compressed when its layer is
    /// reached, or the source's weight as it is.
    pub fn weight(&mut self, i: usize) -> anyhow::Result<WeightData> {
        anyhow::ensure!(i < self.source.weights.len(), "no weight {i}");
        match self.layer_of[i] {
            Some(layer) => {
                if !self.ready.contains_key(&i) {
                    self.compress_through(layer)?;
                }
                let p = self
                    .ready
                    .remove(&i)
                    .context("internal: a compressed weight asked for twice")?;
                Ok(WeightData::Packed(Arc::new(p)))
            }
            None => Ok(self.source.weights[i].data.clone()),
        }
    }
}
