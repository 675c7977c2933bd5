//! The IR: one graph type for a LLaMA-family decoder.
//!
//! Values are activations of shape `[rows, width]` (one row per token of the step).
//! Nodes are stored in execution (topological) order; every value is produced by exactly
//! one node. The runtime owns these types because it interprets them; the compiler
//! builds and transforms them (frontends, passes) and never the other way round.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::error::{Result, RuntimeError};
use crate::format::WeightFormat;
use crate::packed::PackedWeight;
use crate::tensor::Tensor;

/// Hyper-parameters of a LLaMA-family model, independent of the file it came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f32,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// Whether the tokenizer prepends BOS to a text (llama.cpp's `add_bos_token`).
    pub add_bos_token: bool,
}

impl ModelConfig {
    /// Checks the relations between the fields.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(RuntimeError::InvalidGraph(format!("config: {m}")));
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_layers),
            ("num_attention_heads", self.num_heads),
            ("num_key_value_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
        ] {
            if v == 0 {
                return bad(format!("{name} must be positive"));
            }
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return bad(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_heads, self.num_kv_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return bad(format!("head_dim {} must be even for RoPE", self.head_dim));
        }
        if self.rope_theta.is_nan()
            || self.rope_theta <= 0.0
            || self.rms_norm_eps.is_nan()
            || self.rms_norm_eps < 0.0
        {
            return bad("rope_theta must be positive and rms_norm_eps non-negative".into());
        }
        Ok(())
    }

    /// Number of weight parameters implied by the config.
    pub fn parameter_count(&self) -> usize {
        let (d, f, hd) = (self.hidden_size, self.intermediate_size, self.head_dim);
        let attn = d * self.num_heads * hd * 2 + d * self.num_kv_heads * hd * 2;
        let layer = attn + 3 * d * f + 2 * d;
        let head = if self.tie_word_embeddings {
            0
        } else {
            self.vocab_size * d
        };
        self.vocab_size * d + self.num_layers * layer + d + head
    }
}

/// Index of a weight in [`Graph::weights`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct WeightId(pub usize);

/// Index of a value in [`Graph::values`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ValueId(pub usize);

/// A named weight. Its storage format is part of its type: a dense tensor's dtype, or a
/// packed quantized / sparse format.
#[derive(Debug, Clone)]
pub struct Weight {
    pub name: String,
    pub data: WeightData,
}

/// The storage of a weight.
#[derive(Debug, Clone)]
pub enum WeightData {
    /// f32, f16 or bf16 values (any rank).
    Dense(Tensor),
    /// A `[rows, cols]` matrix in a packed format (linear weights and embedding tables).
    Packed(Arc<PackedWeight>),
}

impl WeightData {
    pub fn shape(&self) -> &[usize] {
        match self {
            WeightData::Dense(t) => &t.shape,
            WeightData::Packed(p) => p.shape(),
        }
    }
    pub fn numel(&self) -> usize {
        self.shape().iter().product()
    }
    /// The storage format (`Dense { dtype }` for a tensor).
    pub fn format(&self) -> WeightFormat {
        match self {
            WeightData::Dense(t) => WeightFormat::Dense { dtype: t.dtype },
            WeightData::Packed(p) => p.format().clone(),
        }
    }
    /// Exact bytes of storage.
    pub fn storage_bytes(&self) -> usize {
        match self {
            WeightData::Dense(t) => t.nbytes(),
            WeightData::Packed(p) => p.storage_bytes(),
        }
    }
    /// Whether the bytes are ranges of a memory-mapped file.
    pub fn is_mapped(&self) -> bool {
        match self {
            WeightData::Dense(t) => t.is_mapped(),
            WeightData::Packed(p) => p.is_mapped(),
        }
    }
    /// The dense tensor, if the weight is dense.
    pub fn dense(&self) -> Option<&Tensor> {
        match self {
            WeightData::Dense(t) => Some(t),
            WeightData::Packed(_) => None,
        }
    }
    pub fn packed(&self) -> Option<&PackedWeight> {
        match self {
            WeightData::Dense(_) => None,
            WeightData::Packed(p) => Some(p),
        }
    }
    /// Row `r` of a matrix as f32 (dequantized, zeros where pruned). `r` must be in range
    /// and `out` as long as a row.
    pub fn read_row_f32(&self, r: usize, out: &mut [f32]) {
        match self {
            WeightData::Dense(t) => t.read_f32(r * out.len(), out),
            WeightData::Packed(p) => p.decode_row_unchecked(r, out),
        }
    }
    /// All values as f32, row-major (dequantized for packed formats).
    pub fn to_f32_vec(&self) -> Vec<f32> {
        match self {
            WeightData::Dense(t) => t.to_f32_vec(),
            WeightData::Packed(p) => p.to_f32_vec(),
        }
    }
}

impl Weight {
    pub fn new_dense(name: impl Into<String>, tensor: Tensor) -> Weight {
        Weight {
            name: name.into(),
            data: WeightData::Dense(tensor),
        }
    }
    pub fn new_packed(name: impl Into<String>, packed: PackedWeight) -> Weight {
        Weight {
            name: name.into(),
            data: WeightData::Packed(Arc::new(packed)),
        }
    }
    /// The dense tensor, if the weight is dense.
    pub fn tensor(&self) -> Option<&Tensor> {
        self.data.dense()
    }
    pub fn shape(&self) -> &[usize] {
        self.data.shape()
    }
}

/// An activation value: `[rows, width]`, f32.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ValueInfo {
    pub name: String,
    pub width: usize,
}

/// The operations of the IR.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Op {
    /// Looks up the step's token ids in `table` (`[vocab, hidden]`). No inputs.
    Embedding { table: WeightId },
    /// `x / sqrt(mean(x^2) + eps) * weight`, per row.
    RmsNorm { weight: WeightId, eps: f32 },
    /// `x W^T` with `W` of shape `[out, in]`.
    Linear { weight: WeightId },
    /// Rotary position embedding in the rotate-half layout (dims `[0, d/2)` pair with
    /// `[d/2, d)`), applied per head to rows at the session's positions.
    Rope {
        heads: usize,
        head_dim: usize,
        theta: f32,
    },
    /// Causal grouped-query attention over `(q, k, v)`; appends k and v to the session's
    /// cache slot `layer`. Query head `h` reads key/value head `h / (heads / kv_heads)`.
    Attention {
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
        layer: usize,
    },
    /// `silu(gate) * up` over inputs `(gate, up)`.
    SwiGlu,
    /// Elementwise sum of two values.
    Add,
    /// Keeps only the rows the request asks outputs for (everything after it, such as
    /// the final norm and LM head, runs on those rows only).
    OutputRows,
}

impl Op {
    pub fn name(&self) -> &'static str {
        match self {
            Op::Embedding { .. } => "Embedding",
            Op::RmsNorm { .. } => "RmsNorm",
            Op::Linear { .. } => "Linear",
            Op::Rope { .. } => "Rope",
            Op::Attention { .. } => "Attention",
            Op::SwiGlu => "SwiGlu",
            Op::Add => "Add",
            Op::OutputRows => "OutputRows",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Node {
    pub name: String,
    pub op: Op,
    pub inputs: Vec<ValueId>,
    pub output: ValueId,
}

/// A model graph with its weights.
#[derive(Debug, Clone)]
pub struct Graph {
    pub config: ModelConfig,
    pub weights: Vec<Weight>,
    pub values: Vec<ValueInfo>,
    pub nodes: Vec<Node>,
    /// The logits value, `[rows, vocab]`.
    pub logits: ValueId,
}

/// Names of the values every LLaMA graph exposes (exit heads attach to these).
pub mod names {
    /// The token embeddings (input of layer 0); transformers' `hidden_states[0]`.
    pub const EMBEDDINGS: &str = "embed.out";
    /// The residual stream after decoder layer `i` (before any norm).
    pub fn layer_out(i: usize) -> String {
        format!("layers.{i}.out")
    }
    /// The final-norm output (the LM head input).
    pub const FINAL_NORM: &str = "norm.out";
    pub const LOGITS: &str = "logits";
}

impl Graph {
    pub fn value_id(&self, name: &str) -> Option<ValueId> {
        self.values.iter().position(|v| v.name == name).map(ValueId)
    }
    pub fn weight_id(&self, name: &str) -> Option<WeightId> {
        self.weights.iter().position(|w| w.name == name).map(WeightId)
    }
    pub fn weight(&self, id: WeightId) -> &Weight {
        &self.weights[id.0]
    }
    /// The nodes of decoder layer `i`: from its first node (named `layers.{i}.*`) to the
    /// node producing `layers.{i}.out`. Its outside input is `layers.{i-1}.out` (or
    /// `embed.out` for layer 0).
    pub fn layer_span(&self, i: usize) -> Option<std::ops::Range<usize>> {
        let prefix = format!("layers.{i}.");
        let first = self.nodes.iter().position(|n| n.name.starts_with(&prefix))?;
        let out = names::layer_out(i);
        let last = self.nodes.iter().position(|n| n.name == out)?;
        (first <= last).then_some(first..last + 1)
    }

    /// Total bytes of weight storage (each weight counted once, whatever its users).
    pub fn weight_bytes(&self) -> usize {
        self.weights.iter().map(|w| w.data.storage_bytes()).sum()
    }

    /// Checks that the graph is well formed: ids in range, values defined once before
    /// use, shapes consistent with each op and its weights, the config consistent with
    /// the weights. Passes call this between transformations.
    pub fn verify(&self) -> Result<()> {
        self.config.validate()?;
        let err = |node: &Node, m: String| {
            Err(RuntimeError::InvalidGraph(format!(
                "node `{}` ({}): {m}",
                node.name,
                node.op.name()
            )))
        };
        let mut defined = vec![false; self.values.len()];
        let mut names = HashMap::new();
        for (i, v) in self.values.iter().enumerate() {
            if names.insert(v.name.as_str(), i).is_some() {
                return Err(RuntimeError::InvalidGraph(format!(
                    "value name `{}` is used twice",
                    v.name
                )));
            }
        }
        let c = &self.config;
        for node in &self.nodes {
            for &ValueId(i) in &node.inputs {
                if i >= self.values.len() || !defined[i] {
                    return err(node, format!("input value {i} is not defined before use"));
                }
            }
            let ValueId(o) = node.output;
            if o >= self.values.len() {
                return err(node, format!("output value {o} does not exist"));
            }
            if defined[o] {
                return err(node, format!("value `{}` is defined twice", self.values[o].name));
            }
            defined[o] = true;
            let width = |v: &ValueId| self.values[v.0].width;
            let in_w: Vec<usize> = node.inputs.iter().map(width).collect();
            let out_w = self.values[o].width;
            let arity = match node.op {
                Op::Embedding { .. } => 0,
                Op::Attention { .. } => 3,
                Op::SwiGlu | Op::Add => 2,
                _ => 1,
            };
            if in_w.len() != arity {
                return err(node, format!("takes {arity} inputs, has {}", in_w.len()));
            }
            let weight = |id: WeightId| -> Result<&Weight> {
                self.weights.get(id.0).ok_or_else(|| {
                    RuntimeError::InvalidGraph(format!(
                        "node `{}`: weight {} does not exist",
                        node.name, id.0
                    ))
                })
            };
            match &node.op {
                Op::Embedding { table } => {
                    let w = weight(*table)?;
                    if w.shape() != [c.vocab_size, out_w] {
                        return err(
                            node,
                            format!(
                                "table `{}` has shape {:?}, expected [{}, {out_w}]",
                                w.name,
                                w.shape(),
                                c.vocab_size
                            ),
                        );
                    }
                }
                Op::RmsNorm { weight: wid, .. } => {
                    let w = weight(*wid)?;
                    if w.tensor().is_none() {
                        return err(
                            node,
                            format!(
                                "weight `{}` is {}; norms need a dense weight",
                                w.name,
                                w.data.format()
                            ),
                        );
                    }
                    if w.shape() != [in_w[0]] || out_w != in_w[0] {
                        return err(
                            node,
                            format!(
                                "weight `{}` has shape {:?} for width {}",
                                w.name,
                                w.shape(),
                                in_w[0]
                            ),
                        );
                    }
                }
                Op::Linear { weight: wid } => {
                    let w = weight(*wid)?;
                    if w.shape() != [out_w, in_w[0]] {
                        return err(
                            node,
                            format!(
                                "weight `{}` has shape {:?}, expected [{out_w}, {}]",
                                w.name,
                                w.shape(),
                                in_w[0]
                            ),
                        );
                    }
                }
                Op::Rope { heads, head_dim, .. } => {
                    if in_w[0] != heads * head_dim || out_w != in_w[0] || head_dim % 2 != 0 {
                        return err(
                            node,
                            format!("width {} does not match {heads} heads x {head_dim}", in_w[0]),
                        );
                    }
                }
                Op::Attention {
                    heads,
                    kv_heads,
                    head_dim,
                    layer,
                } => {
                    if *kv_heads == 0 || heads % kv_heads != 0 {
                        return err(node, format!("{heads} heads over {kv_heads} kv heads"));
                    }
                    if in_w != [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim]
                        || out_w != heads * head_dim
                    {
                        return err(node, format!("input widths {in_w:?} do not match the heads"));
                    }
                    if *layer >= c.num_layers {
                        return err(node, format!("cache slot {layer} >= {} layers", c.num_layers));
                    }
                }
                Op::SwiGlu | Op::Add => {
                    if in_w[0] != in_w[1] || out_w != in_w[0] {
                        return err(node, format!("input widths {in_w:?}, output {out_w}"));
                    }
                }
                Op::OutputRows => {
                    if out_w != in_w[0] {
                        return err(node, format!("width {} -> {out_w}", in_w[0]));
                    }
                }
            }
        }
        if self.logits.0 >= self.values.len() || !defined[self.logits.0] {
            return Err(RuntimeError::InvalidGraph(
                "the logits value is never computed".into(),
            ));
        }
        if self.values[self.logits.0].width != c.vocab_size {
            return Err(RuntimeError::InvalidGraph(format!(
                "logits width {} differs from vocab_size {}",
                self.values[self.logits.0].width, c.vocab_size
            )));
        }
        Ok(())
    }
}

impl fmt::Display for Graph {
    /// A readable listing of the graph (what `edgec inspect --graph` prints).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for n in &self.nodes {
            let ins: Vec<&str> = n.inputs.iter().map(|v| self.values[v.0].name.as_str()).collect();
            let attrs = match &n.op {
                Op::Embedding { table } => format!("table={}", self.weights[table.0].name),
                Op::RmsNorm { weight, eps } => {
                    format!("weight={} eps={eps:e}", self.weights[weight.0].name)
                }
                Op::Linear { weight } => {
                    let w = &self.weights[weight.0];
                    format!("weight={} {:?} {}", w.name, w.shape(), w.data.format())
                }
                Op::Rope {
                    heads,
                    head_dim,
                    theta,
                } => {
                    format!("heads={heads} head_dim={head_dim} theta={theta}")
                }
                Op::Attention {
                    heads,
                    kv_heads,
                    head_dim,
                    layer,
                } => {
                    format!("heads={heads} kv_heads={kv_heads} head_dim={head_dim} cache={layer} causal")
                }
                _ => String::new(),
            };
            let out = &self.values[n.output.0];
            writeln!(
                f,
                "%{}[{}] = {}({}) {attrs}",
                out.name,
                out.width,
                n.op.name(),
                ins.join(", ")
            )?;
        }
        Ok(())
    }
}
