//! An indexed view of an ONNX graph for pattern matching: who produces each value,
//! which values are initializers or graph inputs, attribute and constant look-ups.

use std::collections::{HashMap, HashSet};

use edge_proto::onnx::tensor_proto::DataType;
use edge_proto::onnx::{AttributeProto, GraphProto, NodeProto, TensorProto};

use super::super::error::{FrontendError, Result};
use super::data::{Const, ConstData, const_of};

/// Operator types the importer knows (standard domain). Any other op type anywhere in
/// the graph is rejected before matching.
pub(super) const SUPPORTED_OPS: &[&str] = &[
    // Data path of a LLaMA decoder.
    "Gather",
    "MatMul",
    "Mul",
    "Add",
    "Div",
    "Pow",
    "ReduceMean",
    "Sqrt",
    "Reciprocal",
    "Neg",
    "Sigmoid",
    "Softmax",
    "Cos",
    "Sin",
    // Shape plumbing, masks, position tables.
    "Shape",
    "Constant",
    "ConstantOfShape",
    "Cast",
    "Identity",
    "Reshape",
    "Transpose",
    "Unsqueeze",
    "Expand",
    "Concat",
    "Slice",
    "Range",
    "Equal",
    "LessOrEqual",
    "Where",
];

/// Op types allowed in sub-graphs that only compute shapes, indices and masks
/// (see [`OnnxGraph::check_plumbing`]).
const PLUMBING_OPS: &[&str] = &[
    "Shape",
    "Constant",
    "ConstantOfShape",
    "Gather",
    "Unsqueeze",
    "Concat",
    "Cast",
    "Identity",
    "Reshape",
    "Expand",
    "Slice",
    "Range",
    "Equal",
    "LessOrEqual",
    "Where",
    "Mul",
    "Div",
    "Add",
];

/// Float element types: a Cast to one of these on the data path only changes precision
/// (the IR computes activations in f32).
const FLOAT_TYPES: &[i32] = &[
    DataType::Float as i32,
    DataType::Float16 as i32,
    DataType::Bfloat16 as i32,
    DataType::Double as i32,
];

/// A readable name of a node for messages (its name, or what it produces).
pub(super) fn node_label(n: &NodeProto) -> String {
    if n.name.is_empty() {
        format!(
            "<unnamed, output `{}`>",
            n.output.first().map(String::as_str).unwrap_or("")
        )
    } else {
        n.name.clone()
    }
}

pub(super) fn attr<'n>(n: &'n NodeProto, name: &str) -> Option<&'n AttributeProto> {
    n.attribute.iter().find(|a| a.name == name)
}

pub(super) fn attr_int(n: &NodeProto, name: &str) -> Option<i64> {
    attr(n, name).map(|a| a.i)
}

pub(super) fn attr_ints<'n>(n: &'n NodeProto, name: &str) -> Option<&'n [i64]> {
    attr(n, name).map(|a| a.ints.as_slice())
}

/// The graph with its indexes. Node order is the file's (topological) order.
pub(super) struct OnnxGraph<'a> {
    pub path: &'a str,
    pub graph: &'a GraphProto,
    producer: HashMap<&'a str, &'a NodeProto>,
    pub inits: HashMap<&'a str, &'a TensorProto>,
    inputs: HashSet<&'a str>,
}

impl<'a> OnnxGraph<'a> {
    /// Indexes the graph, rejecting unsupported op types and values defined twice.
    pub fn new(path: &'a str, graph: &'a GraphProto) -> Result<OnnxGraph<'a>> {
        let mut inits = HashMap::new();
        for t in &graph.initializer {
            if inits.insert(t.name.as_str(), t).is_some() {
                return Err(FrontendError::Corrupt {
                    path: path.to_string(),
                    msg: format!("initializer `{}` is defined twice", t.name),
                });
            }
        }
        let inputs = graph
            .input
            .iter()
            .map(|v| v.name.as_str())
            .filter(|n| !inits.contains_key(n))
            .collect();
        let g = OnnxGraph {
            path,
            graph,
            producer: HashMap::new(),
            inits,
            inputs,
        };
        let mut producer = HashMap::new();
        for n in &graph.node {
            if !(n.domain.is_empty() || n.domain == "ai.onnx") {
                return Err(g.node_err(
                    n,
                    format!(
                        "operator domain `{}` is not supported (only the standard ONNX domain)",
                        n.domain
                    ),
                ));
            }
            if !SUPPORTED_OPS.contains(&n.op_type.as_str()) {
                return Err(g.node_err(
                    n,
                    "operator type not supported by the LLaMA importer (which accepts only the primitive ops torch.onnx emits for LlamaForCausalLM)",
                ));
            }
            if let Some(a) = n.attribute.iter().find(|a| !a.ref_attr_name.is_empty()) {
                return Err(g.node_err(
                    n,
                    format!(
                        "attribute `{}` refers to a function attribute; functions are not supported",
                        a.name
                    ),
                ));
            }
            for o in n.output.iter().filter(|o| !o.is_empty()) {
                if producer.insert(o.as_str(), n).is_some()
                    || g.inits.contains_key(o.as_str())
                    || g.inputs.contains(o.as_str())
                {
                    return Err(g.node_err(n, format!("value `{o}` is defined more than once")));
                }
            }
        }
        Ok(OnnxGraph { producer, ..g })
    }

    pub fn node_err(&self, n: &NodeProto, msg: impl Into<String>) -> FrontendError {
        FrontendError::OnnxNode {
            path: self.path.to_string(),
            node: node_label(n),
            op_type: n.op_type.clone(),
            msg: msg.into(),
        }
    }

    pub fn producer(&self, v: &str) -> Option<&'a NodeProto> {
        self.producer.get(v).copied()
    }

    pub fn init(&self, v: &str) -> Option<&'a TensorProto> {
        self.inits.get(v).copied()
    }

    /// Whether `v` is a graph input that is not an initializer.
    pub fn is_input(&self, v: &str) -> bool {
        self.inputs.contains(v)
    }

    /// Follows identity-like nodes backwards: `Identity` and `Cast` to a float type
    /// (on f32 data a no-op; the IR computes in f32 regardless).
    pub fn strip<'s>(&self, mut v: &'s str) -> &'s str
    where
        'a: 's,
    {
        for _ in 0..self.graph.node.len() {
            match self.producer(v) {
                Some(n)
                    if (n.op_type == "Identity"
                        || (n.op_type == "Cast"
                            && attr_int(n, "to").is_some_and(|t| FLOAT_TYPES.contains(&(t as i32)))))
                        && !n.input.is_empty() =>
                {
                    v = &n.input[0];
                }
                _ => break,
            }
        }
        v
    }

    /// The value of `v` if it is a constant: a `Constant` node's output (possibly through
    /// Cast/Identity) or a small initializer.
    pub fn constant(&self, v: &str) -> Option<Const> {
        self.constant_at(v, 0)
    }

    fn constant_at(&self, v: &str, depth: usize) -> Option<Const> {
        if let Some(t) = self.init(v) {
            return const_of(t);
        }
        let n = self.producer(v)?;
        match n.op_type.as_str() {
            "Constant" => constant_node(n),
            "Identity" | "Cast" if !n.input.is_empty() && depth < 16 => {
                let c = self.constant_at(&n.input[0], depth + 1)?;
                if n.op_type == "Identity" {
                    return Some(c);
                }
                let to = attr_int(n, "to")? as i32;
                let data = if FLOAT_TYPES.contains(&to) {
                    ConstData::F(c.floats())
                } else if to == DataType::Int64 as i32 || to == DataType::Int32 as i32 {
                    match c.data {
                        ConstData::I(v) => ConstData::I(v),
                        ConstData::F(v) => ConstData::I(v.iter().map(|&x| x as i64).collect()),
                    }
                } else {
                    return None;
                };
                Some(Const { dims: c.dims, data })
            }
            _ => None,
        }
    }

    /// Checks that `v` is computed only by shape/index plumbing: every node it depends on
    /// is a plumbing op, and data values enter only through `Shape` (their shape, not
    /// their contents). Reaching a graph input directly is an error.
    pub fn check_plumbing(&self, v: &'a str, consumer: &NodeProto) -> Result<()> {
        let mut seen: HashSet<&'a str> = HashSet::new();
        let mut stack = vec![v];
        while let Some(v) = stack.pop() {
            if v.is_empty() || !seen.insert(v) || self.init(v).is_some() {
                continue;
            }
            let Some(n) = self.producer(v) else {
                return Err(self.node_err(
                    consumer,
                    format!("shape input depends on the contents of graph input `{v}`"),
                ));
            };
            if !PLUMBING_OPS.contains(&n.op_type.as_str()) {
                return Err(self.node_err(
                    n,
                    format!(
                        "feeds the shape/index input of `{}` but is not shape plumbing",
                        node_label(consumer)
                    ),
                ));
            }
            if n.op_type != "Shape" {
                stack.extend(n.input.iter().map(String::as_str));
            }
        }
        Ok(())
    }

    /// The `axes` of an Unsqueeze/ReduceMean node: the attribute (opsets before 13/18) or
    /// the constant second input.
    pub fn axes(&self, n: &NodeProto) -> Option<Vec<i64>> {
        if let Some(a) = attr_ints(n, "axes") {
            return Some(a.to_vec());
        }
        let c = self.constant(n.input.get(1)?)?;
        c.ints().map(<[i64]>::to_vec)
    }
}

/// The value of a `Constant` node.
fn constant_node(n: &NodeProto) -> Option<Const> {
    let a = n.attribute.first()?;
    match a.name.as_str() {
        "value" => const_of(a.t.as_ref()?),
        "value_float" => Some(Const {
            dims: vec![],
            data: ConstData::F(vec![a.f as f64]),
        }),
        "value_floats" => Some(Const {
            dims: vec![a.floats.len() as i64],
            data: ConstData::F(a.floats.iter().map(|&x| x as f64).collect()),
        }),
        "value_int" => Some(Const {
            dims: vec![],
            data: ConstData::I(vec![a.i]),
        }),
        "value_ints" => Some(Const {
            dims: vec![a.ints.len() as i64],
            data: ConstData::I(a.ints.clone()),
        }),
        _ => None,
    }
}
