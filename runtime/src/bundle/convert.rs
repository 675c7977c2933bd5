//! The IR in the manifest's protobuf messages and back: config, formats, values, nodes.
//! Weights are converted by the writer (which lays out their bytes) and the reader (which
//! maps them).

use edge_proto::bundle as pb;

use crate::format::{QuantScheme, QuantSpec, SparsePattern, ValueFormat, WeightFormat};
use crate::ir::{Graph, ModelConfig, Node, Op, ValueId, ValueInfo, WeightId};
use crate::tensor::DType;

pub fn config_to_pb(c: &ModelConfig) -> pb::ModelConfig {
    pb::ModelConfig {
        vocab_size: c.vocab_size as u64,
        hidden_size: c.hidden_size as u64,
        intermediate_size: c.intermediate_size as u64,
        num_layers: c.num_layers as u64,
        num_heads: c.num_heads as u64,
        num_kv_heads: c.num_kv_heads as u64,
        head_dim: c.head_dim as u64,
        rms_norm_eps: c.rms_norm_eps,
        rope_theta: c.rope_theta,
        max_position_embeddings: c.max_position_embeddings as u64,
        tie_word_embeddings: c.tie_word_embeddings,
        bos_token_id: c.bos_token_id,
        eos_token_ids: c.eos_token_ids.clone(),
        add_bos_token: c.add_bos_token,
    }
}

fn usize_of(v: u64, what: &str) -> Result<usize, String> {
    usize::try_from(v).map_err(|_| format!("{what} {v} does not fit this machine's address size"))
}

pub fn config_from_pb(c: &pb::ModelConfig) -> Result<ModelConfig, String> {
    Ok(ModelConfig {
        vocab_size: usize_of(c.vocab_size, "vocab_size")?,
        hidden_size: usize_of(c.hidden_size, "hidden_size")?,
        intermediate_size: usize_of(c.intermediate_size, "intermediate_size")?,
        num_layers: usize_of(c.num_layers, "num_layers")?,
        num_heads: usize_of(c.num_heads, "num_heads")?,
        num_kv_heads: usize_of(c.num_kv_heads, "num_kv_heads")?,
        head_dim: usize_of(c.head_dim, "head_dim")?,
        rms_norm_eps: c.rms_norm_eps,
        rope_theta: c.rope_theta,
        max_position_embeddings: usize_of(c.max_position_embeddings, "max_position_embeddings")?,
        tie_word_embeddings: c.tie_word_embeddings,
        bos_token_id: c.bos_token_id,
        eos_token_ids: c.eos_token_ids.clone(),
        add_bos_token: c.add_bos_token,
    })
}

pub fn dtype_to_pb(d: DType) -> pb::ElemType {
    match d {
        DType::F32 => pb::ElemType::F32,
        DType::F16 => pb::ElemType::F16,
        DType::BF16 => pb::ElemType::Bf16,
    }
}

/// The float type of a manifest dtype (`None` for U8 and unknown values).
pub fn dtype_from_pb(d: i32) -> Option<DType> {
    match pb::ElemType::try_from(d).ok()? {
        pb::ElemType::F32 => Some(DType::F32),
        pb::ElemType::F16 => Some(DType::F16),
        pb::ElemType::Bf16 => Some(DType::BF16),
        _ => None,
    }
}

/// Bytes of one element of a manifest dtype.
pub fn dtype_size(d: i32) -> Option<usize> {
    match pb::ElemType::try_from(d).ok()? {
        pb::ElemType::F32 => Some(4),
        pb::ElemType::F16 | pb::ElemType::Bf16 => Some(2),
        pb::ElemType::U8 => Some(1),
        pb::ElemType::Unspecified => None,
    }
}

fn quant_to_pb(q: &QuantSpec) -> pb::QuantSpec {
    pb::QuantSpec {
        bits: q.bits as u32,
        group: q.group,
        scheme: match q.scheme {
            QuantScheme::Asym => pb::QuantScheme::Asym,
            QuantScheme::Sym => pb::QuantScheme::Sym,
        } as i32,
    }
}

fn quant_from_pb(q: &pb::QuantSpec) -> Result<QuantSpec, String> {
    let scheme = match pb::QuantScheme::try_from(q.scheme) {
        Ok(pb::QuantScheme::Asym) => QuantScheme::Asym,
        Ok(pb::QuantScheme::Sym) => QuantScheme::Sym,
        _ => return Err(format!("unknown quantization scheme {}", q.scheme)),
    };
    let spec = QuantSpec {
        bits: u8::try_from(q.bits).map_err(|_| format!("bit-width {} is out of range", q.bits))?,
        group: q.group,
        scheme,
    };
    spec.validate()?;
    Ok(spec)
}

pub fn format_to_pb(f: &WeightFormat) -> pb::WeightFormat {
    use pb::weight_format::Kind;
    let kind = match f {
        WeightFormat::Dense { dtype } => Kind::Dense(dtype_to_pb(*dtype) as i32),
        WeightFormat::Quant(q) => Kind::Quant(quant_to_pb(q)),
        WeightFormat::Sparse { pattern, values } => {
            let (n, m) = match pattern {
                SparsePattern::Unstructured => (0, 0),
                SparsePattern::NofM { n, m } => (*n as u32, *m as u32),
            };
            Kind::Sparse(pb::weight_format::Sparse {
                n,
                m,
                quant: match values {
                    ValueFormat::F16 => None,
                    ValueFormat::Quant(q) => Some(quant_to_pb(q)),
                },
            })
        }
    };
    pb::WeightFormat { kind: Some(kind) }
}

pub fn format_from_pb(f: Option<&pb::WeightFormat>) -> Result<WeightFormat, String> {
    use pb::weight_format::Kind;
    match f.and_then(|f| f.kind.as_ref()) {
        None => Err("has no format".into()),
        Some(Kind::Dense(d)) => dtype_from_pb(*d)
            .map(|dtype| WeightFormat::Dense { dtype })
            .ok_or_else(|| format!("dense dtype {d} is not f32, f16 or bf16")),
        Some(Kind::Quant(q)) => Ok(WeightFormat::Quant(quant_from_pb(q)?)),
        Some(Kind::Sparse(s)) => {
            let pattern = match (s.n, s.m) {
                (0, 0) => SparsePattern::Unstructured,
                (n, m) => SparsePattern::NofM {
                    n: u8::try_from(n).map_err(|_| format!("N:M pattern {n}:{m} is out of range"))?,
                    m: u8::try_from(m).map_err(|_| format!("N:M pattern {n}:{m} is out of range"))?,
                },
            };
            let values = match &s.quant {
                None => ValueFormat::F16,
                Some(q) => ValueFormat::Quant(quant_from_pb(q)?),
            };
            Ok(WeightFormat::Sparse { pattern, values })
        }
    }
}

fn op_to_pb(op: &Op) -> pb::node::Op {
    use pb::node::{self as n, Op as P};
    match op {
        Op::Embedding { table } => P::Embedding(n::Embedding {
            table: table.0 as u32,
        }),
        Op::RmsNorm { weight, eps } => P::RmsNorm(n::RmsNorm {
            weight: weight.0 as u32,
            eps: *eps,
        }),
        Op::Linear { weight } => P::Linear(n::Linear {
            weight: weight.0 as u32,
        }),
        Op::Rope {
            heads,
            head_dim,
            theta,
        } => P::Rope(n::Rope {
            heads: *heads as u64,
            head_dim: *head_dim as u64,
            theta: *theta,
        }),
        Op::Attention {
            heads,
            kv_heads,
            head_dim,
            layer,
        } => P::Attention(n::Attention {
            heads: *heads as u64,
            kv_heads: *kv_heads as u64,
            head_dim: *head_dim as u64,
            layer: *layer as u64,
        }),
        Op::SwiGlu => P::Swiglu(n::Empty {}),
        Op::Add => P::Add(n::Empty {}),
        Op::OutputRows => P::OutputRows(n::Empty {}),
    }
}

fn op_from_pb(op: &pb::node::Op) -> Result<Op, String> {
    use pb::node::Op as P;
    Ok(match op {
        P::Embedding(e) => Op::Embedding {
            table: WeightId(e.table as usize),
        },
        P::RmsNorm(r) => Op::RmsNorm {
            weight: WeightId(r.weight as usize),
            eps: r.eps,
        },
        P::Linear(l) => Op::Linear {
            weight: WeightId(l.weight as usize),
        },
        P::Rope(r) => Op::Rope {
            heads: usize_of(r.heads, "heads")?,
            head_dim: usize_of(r.head_dim, "head_dim")?,
            theta: r.theta,
        },
        P::Attention(a) => Op::Attention {
            heads: usize_of(a.heads, "heads")?,
            kv_heads: usize_of(a.kv_heads, "kv_heads")?,
            head_dim: usize_of(a.head_dim, "head_dim")?,
            layer: usize_of(a.layer, "layer")?,
        },
        P::Swiglu(_) => Op::SwiGlu,
        P::Add(_) => Op::Add,
        P::OutputRows(_) => Op::OutputRows,
    })
}

/// The values, nodes and logits of a graph (its weights go to `Manifest.weights`).
pub fn graph_to_pb(name: &str, g: &Graph) -> pb::Graph {
    pb::Graph {
        name: name.to_string(),
        values: g
            .values
            .iter()
            .map(|v| pb::Value {
                name: v.name.clone(),
                width: v.width as u64,
            })
            .collect(),
        nodes: g
            .nodes
            .iter()
            .map(|n| pb::Node {
                name: n.name.clone(),
                inputs: n.inputs.iter().map(|v| v.0 as u32).collect(),
                output: n.output.0 as u32,
                op: Some(op_to_pb(&n.op)),
            })
            .collect(),
        logits: g.logits.0 as u32,
    }
}

/// Values, nodes and the logits id of a manifest graph. Ids are checked by `Graph::verify`.
pub fn graph_parts_from_pb(g: &pb::Graph) -> Result<(Vec<ValueInfo>, Vec<Node>, ValueId), String> {
    let values = g
        .values
        .iter()
        .map(|v| {
            Ok(ValueInfo {
                name: v.name.clone(),
                width: usize_of(v.width, "value width")?,
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    let nodes = g
        .nodes
        .iter()
        .map(|n| {
            let op =
                n.op.as_ref()
                    .ok_or_else(|| format!("node `{}` has no op (written by a newer compiler?)", n.name))?;
            Ok(Node {
                name: n.name.clone(),
                op: op_from_pb(op)?,
                inputs: n.inputs.iter().map(|&v| ValueId(v as usize)).collect(),
                output: ValueId(n.output as usize),
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    Ok((values, nodes, ValueId(g.logits as usize)))
}
