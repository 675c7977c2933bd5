//! Recognizes a LLaMA decoder in the primitive-op graph that torch.onnx (TorchScript
//! exporter, opset 17) emits for transformers' `LlamaForCausalLM`, and collects its
//! weights per layer.
//!
//! The matcher starts at the graph's single output (the logits) and walks the data path
//! backwards: LM head MatMul, final RMSNorm, then per decoder layer the MLP residual Add
//! (SwiGLU MLP, post-attention RMSNorm) and the attention residual Add (o_proj, softmax
//! attention with scale and causal mask, GQA repeat, RoPE on q and k, q/k/v projections,
//! input RMSNorm), down to the embedding Gather. Each idiom is checked by op types,
//! attributes, constants (RMSNorm exponent and eps, attention scale, RoPE frequencies,
//! mask values) and by which values feed which nodes (the residual adds the norm's own
//! input, q/k/v read one normed tensor, rotate-half slices the tensor it rotates, ...).
//! Inputs that only carry shapes (Reshape/Expand targets, Slice bounds, Range limits) must
//! be computed by shape plumbing alone. Node names are never used as proof; the module
//! path in them is only compared with the layer index found, for a warning.

use edge_proto::onnx::NodeProto;

use super::super::error::Result;
use super::data::dims;
use super::graph::{OnnxGraph, attr_int, attr_ints, node_label};

/// An RMSNorm `x / sqrt(mean(x^2) + eps) * weight` found in the graph.
pub(super) struct Norm<'a> {
    /// The normalized value (identity casts stripped).
    pub input: &'a str,
    /// Initializer name of the weight (`[hidden]`).
    pub weight: &'a str,
    pub eps: f32,
    /// The `Add(mean, eps)` node (for messages).
    pub eps_node: &'a NodeProto,
}

/// Initializer names of one decoder layer. Projections are MatMul right operands,
/// `[in, out]`.
pub(super) struct Layer<'a> {
    pub ln1: &'a str,
    pub q: &'a str,
    pub k: &'a str,
    pub v: &'a str,
    pub o: &'a str,
    pub ln2: &'a str,
    pub gate: &'a str,
    pub up: &'a str,
    pub down: &'a str,
}

/// Where the LM head weight comes from.
pub(super) enum Head<'a> {
    /// A separate `[hidden, vocab]` initializer.
    Separate(&'a str),
    /// `Transpose(embedding)` (the node): tied embeddings with no separate tensor.
    Embedding(&'a NodeProto),
}

/// The decoder found in the graph.
pub(super) struct Llama<'a> {
    pub embed: &'a str,
    pub layers: Vec<Layer<'a>>,
    pub norm: &'a str,
    pub head: Head<'a>,
    pub eps: f32,
    pub head_dim: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    /// The RoPE inverse frequencies (`head_dim / 2` values) the graph multiplies the
    /// positions by.
    pub inv_freq: Vec<f64>,
}

/// Matches the whole graph.
pub(super) fn match_llama<'a>(g: &OnnxGraph<'a>) -> Result<Llama<'a>> {
    M { g }.model()
}

/// A Slice bound in rotate-half: a constant, or `x.shape[-1] // 2` of the sliced tensor.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Bound {
    Const(i64),
    HalfOfLastDim,
}

/// RoPE applied to one tensor.
struct Rope<'a> {
    /// The rotated tensor (`[b, heads, s, head_dim]`).
    x: &'a str,
    inv_freq: Vec<f64>,
    /// Bounds of `x[..., :h]` and `x[..., h:]`: (lo start, lo end, hi start, hi end).
    bounds: [Bound; 4],
    node: &'a NodeProto,
}

/// One projection feeding a head split: `Transpose(Reshape(MatMul(h, W)), [0,2,1,3])`.
struct HeadsIn<'a> {
    h: &'a str,
    w: &'a str,
    /// The last element of the Reshape target (the head size), if constant.
    head_size: Option<i64>,
    matmul: &'a NodeProto,
    reshape: &'a NodeProto,
}

struct Attn<'a> {
    norm: Norm<'a>,
    q: &'a str,
    k: &'a str,
    v: &'a str,
    o: &'a str,
    head_dim: usize,
    heads: usize,
    kv_heads: usize,
    inv_freq: Vec<f64>,
}

struct Mlp<'a> {
    norm: Norm<'a>,
    gate: &'a str,
    up: &'a str,
    down: &'a str,
}

struct M<'g, 'a> {
    g: &'g OnnxGraph<'a>,
}

impl<'a> M<'_, 'a> {
    fn err(&self, n: &NodeProto, msg: impl Into<String>) -> super::super::FrontendError {
        self.g.node_err(n, msg)
    }

    /// Input `i` of `n` (present and non-empty).
    fn input(&self, n: &'a NodeProto, i: usize) -> Result<&'a str> {
        match n.input.get(i) {
            Some(s) if !s.is_empty() => Ok(s.as_str()),
            _ => Err(self.err(n, format!("input {i} is missing"))),
        }
    }

    /// The node producing `v` (identity casts stripped), which must be one of `ops`.
    fn node_of(&self, v: &'a str, consumer: &NodeProto, ops: &[&str], what: &str) -> Result<&'a NodeProto> {
        let s = self.g.strip(v);
        match self.g.producer(s) {
            Some(n) if ops.contains(&n.op_type.as_str()) => Ok(n),
            Some(n) => Err(self.err(
                n,
                format!(
                    "expected {what} ({}) feeding `{}`",
                    ops.join(" or "),
                    node_label(consumer)
                ),
            )),
            None => Err(self.err(
                consumer,
                format!("input `{s}` should be {what}, but it is a graph input or initializer"),
            )),
        }
    }

    fn producer_op(&self, v: &str) -> Option<&'a str> {
        self.g.producer(self.g.strip(v)).map(|n| n.op_type.as_str())
    }

    fn scalar(&self, v: &str) -> Option<f64> {
        self.g.constant(v).and_then(|c| c.scalar())
    }

    /// `MatMul(x, W)` with `W` a 2-D initializer: returns `(x, W)`.
    fn projection(&self, mm: &'a NodeProto) -> Result<(&'a str, &'a str)> {
        let x = self.input(mm, 0)?;
        let w = self.input(mm, 1)?;
        match self.g.init(w).and_then(dims) {
            Some(d) if d.len() == 2 => Ok((x, w)),
            Some(d) => Err(self.err(mm, format!("weight `{w}` has {} dims, expected 2", d.len()))),
            None => Err(self.err(mm, format!("second input `{w}` is not a weight initializer"))),
        }
    }

    fn is_projection(&self, v: &str) -> Option<&'a NodeProto> {
        let n = self.g.producer(self.g.strip(v))?;
        (n.op_type == "MatMul" && n.input.get(1).is_some_and(|w| self.g.init(w).is_some())).then_some(n)
    }

    fn expect_perm(&self, n: &'a NodeProto, want: &[i64]) -> Result<()> {
        match attr_ints(n, "perm") {
            Some(p) if p == want => Ok(()),
            p => Err(self.err(n, format!("perm is {p:?}, expected {want:?}"))),
        }
    }

    fn expect_axes(&self, n: &'a NodeProto, allowed: &[&[i64]]) -> Result<Vec<i64>> {
        match self.g.axes(n) {
            Some(a) if allowed.contains(&a.as_slice()) => Ok(a),
            a => Err(self.err(n, format!("axes are {a:?}, expected one of {allowed:?}"))),
        }
    }

    fn model(&self) -> Result<Llama<'a>> {
        let graph = self.g.graph;
        if graph.output.len() != 1 {
            return Err(super::super::FrontendError::Unsupported {
                path: self.g.path.to_string(),
                msg: format!(
                    "the graph has {} outputs; expected exactly one (the logits, without KV-cache outputs)",
                    graph.output.len()
                ),
            });
        }
        let out = graph.output[0].name.as_str();
        let Some(lm) = self.g.producer(self.g.strip(out)) else {
            return Err(super::super::FrontendError::Unsupported {
                path: self.g.path.to_string(),
                msg: format!("output `{out}` is not computed by any node"),
            });
        };
        if lm.op_type != "MatMul" {
            return Err(self.err(lm, "expected the LM head MatMul producing the logits"));
        }
        let h = self.input(lm, 0)?;
        let w = self.input(lm, 1)?;
        let head = if self.g.init(w).is_some() {
            self.projection(lm)?;
            Head::Separate(w)
        } else {
            let t = self.node_of(
                w,
                lm,
                &["Transpose"],
                "the LM head weight (initializer or transposed embedding)",
            )?;
            self.expect_perm(t, &[1, 0])?;
            Head::Embedding(t)
        };
        let final_norm = self.rmsnorm(h, lm)?;

        let mut layers = Vec::new();
        let mut hints = Vec::new();
        let mut norms_eps = vec![(final_norm.eps, final_norm.eps_node)];
        let mut rope: Option<(Vec<f64>, usize, usize, usize)> = None;
        let mut x = final_norm.input;
        let embed = loop {
            if layers.len() > graph.node.len() {
                return Err(self.err(lm, "the residual stream does not end at an embedding"));
            }
            let Some(n) = self.g.producer(x) else {
                return Err(self.err(
                    final_norm.eps_node,
                    format!("the residual stream starts at `{x}`, not at an embedding Gather"),
                ));
            };
            match n.op_type.as_str() {
                "Gather" => break self.embedding(n)?,
                "Add" => {}
                _ => {
                    return Err(self.err(
                        n,
                        "expected a decoder layer's residual Add or the token embedding Gather",
                    ));
                }
            }
            // MLP half: x = x1 + down(silu(gate(norm2(x1))) * up(norm2(x1)))
            let (x1, down_mm) = self.residual(n)?;
            let mlp = self.mlp(down_mm)?;
            if mlp.norm.input != x1 {
                return Err(self.err(
                    n,
                    "the residual Add does not add the MLP's normalized input to the MLP's output",
                ));
            }
            let add1 = self.node_of(x1, n, &["Add"], "the attention residual Add")?;
            // Attention half: x1 = x0 + o(attn(norm1(x0)))
            let (x0, o_mm) = self.residual(add1)?;
            let attn = self.attention(o_mm)?;
            if attn.norm.input != x0 {
                return Err(self.err(
                    add1,
                    "the residual Add does not add the attention's normalized input to its output",
                ));
            }
            let dims_now = (attn.inv_freq.clone(), attn.head_dim, attn.heads, attn.kv_heads);
            if rope.as_ref().is_some_and(|prev| *prev != dims_now) {
                return Err(self.err(
                    o_mm,
                    format!(
                        "layer's attention (head_dim {}, {} heads, {} kv heads, RoPE frequencies) differs from the later layers'",
                        attn.head_dim, attn.heads, attn.kv_heads
                    ),
                ));
            }
            rope = Some(dims_now);
            norms_eps.push((attn.norm.eps, attn.norm.eps_node));
            norms_eps.push((mlp.norm.eps, mlp.norm.eps_node));
            hints.push(layer_hint(&o_mm.name));
            layers.push(Layer {
                ln1: attn.norm.weight,
                q: attn.q,
                k: attn.k,
                v: attn.v,
                o: attn.o,
                ln2: mlp.norm.weight,
                gate: mlp.gate,
                up: mlp.up,
                down: mlp.down,
            });
            x = x0;
        };
        if let Head::Embedding(t) = head {
            let src = self.g.strip(self.input(t, 0)?);
            if src != embed {
                return Err(self.err(
                    t,
                    format!("the LM head transposes `{src}`, not the embedding table `{embed}`"),
                ));
            }
        }
        layers.reverse();
        hints.reverse();
        for (i, h) in hints.iter().enumerate() {
            if let Some(h) = h.filter(|&h| h != i) {
                tracing::warn!(
                    "ONNX node names suggest layer {h} where the data path has layer {i}; following the data path"
                );
            }
        }
        let Some((inv_freq, head_dim, num_heads, num_kv_heads)) = rope else {
            return Err(self.err(lm, "no decoder layer between the embedding and the final norm"));
        };
        let eps = final_norm.eps;
        if let Some((e, node)) = norms_eps.iter().find(|(e, _)| e.to_bits() != eps.to_bits()) {
            return Err(self.err(
                node,
                format!("RMSNorm eps {e:e} differs from the final norm's {eps:e}; the IR uses one eps"),
            ));
        }
        tracing::debug!(
            layers = layers.len(),
            head_dim,
            num_heads,
            num_kv_heads,
            eps,
            "matched LLaMA decoder"
        );
        Ok(Llama {
            embed,
            layers,
            norm: final_norm.weight,
            head,
            eps,
            head_dim,
            num_heads,
            num_kv_heads,
            inv_freq,
        })
    }

    /// `Gather(table, input_ids)` with the table an initializer and the ids a graph input.
    fn embedding(&self, n: &'a NodeProto) -> Result<&'a str> {
        let table = self.input(n, 0)?;
        let ids = self.input(n, 1)?;
        if attr_int(n, "axis").unwrap_or(0) != 0 {
            return Err(self.err(n, "embedding Gather must gather along axis 0"));
        }
        match self.g.init(table).and_then(dims) {
            Some(d) if d.len() == 2 => {}
            _ => return Err(self.err(n, format!("`{table}` is not a 2-D embedding initializer"))),
        }
        if !self.g.is_input(self.g.strip(ids)) {
            return Err(self.err(n, format!("indices `{ids}` are not the graph's token-id input")));
        }
        Ok(table)
    }

    /// A residual `Add(stream, MatMul(branch, W))` (either order): returns the stream
    /// (stripped) and the branch's final projection.
    fn residual(&self, add: &'a NodeProto) -> Result<(&'a str, &'a NodeProto)> {
        let a = self.input(add, 0)?;
        let b = self.input(add, 1)?;
        if add.input.len() != 2 {
            return Err(self.err(add, "expected two inputs"));
        }
        match (self.is_projection(a), self.is_projection(b)) {
            (None, Some(mm)) => Ok((self.g.strip(a), mm)),
            (Some(mm), None) => Ok((self.g.strip(b), mm)),
            _ => Err(self.err(
                add,
                "expected a residual Add of the stream and one projection MatMul (o_proj or down_proj)",
            )),
        }
    }

    /// `weight * (x * 1/sqrt(mean(x^2, -1) + eps))`, also with `Reciprocal` or a direct
    /// `Div(x, sqrt)`, the multiplications in either order.
    fn rmsnorm(&self, v: &'a str, consumer: &'a NodeProto) -> Result<Norm<'a>> {
        let mul = self.node_of(v, consumer, &["Mul"], "the RMSNorm weight multiplication")?;
        let (a, b) = (self.input(mul, 0)?, self.input(mul, 1)?);
        let (w, y) = if self.g.init(a).is_some() {
            (a, b)
        } else if self.g.init(b).is_some() {
            (b, a)
        } else {
            return Err(self.err(mul, "expected one input to be the RMSNorm weight initializer"));
        };
        match self.g.init(w).and_then(dims) {
            Some(d) if d.len() == 1 => {}
            _ => return Err(self.err(mul, format!("RMSNorm weight `{w}` is not 1-D"))),
        }
        let n = self.node_of(y, mul, &["Mul", "Div"], "x * rsqrt(mean(x^2) + eps)")?;
        let (x, sqrt) = if n.op_type == "Div" {
            let s = self.node_of(self.input(n, 1)?, n, &["Sqrt"], "sqrt(mean(x^2) + eps)")?;
            (self.input(n, 0)?, s)
        } else {
            let (p, q) = (self.input(n, 0)?, self.input(n, 1)?);
            let is_inv = |v: &str| matches!(self.producer_op(v), Some("Div" | "Reciprocal"));
            let (x, r) = match (is_inv(p), is_inv(q)) {
                (false, true) => (p, q),
                (true, false) => (q, p),
                _ => return Err(self.err(n, "expected x * (1 / sqrt(mean(x^2) + eps))")),
            };
            let inv = self.node_of(r, n, &["Div", "Reciprocal"], "1 / sqrt(mean(x^2) + eps)")?;
            let s = if inv.op_type == "Div" {
                if self.scalar(self.input(inv, 0)?) != Some(1.0) {
                    return Err(self.err(inv, "expected 1 / sqrt(...) (numerator 1.0)"));
                }
                self.input(inv, 1)?
            } else {
                self.input(inv, 0)?
            };
            (x, self.node_of(s, inv, &["Sqrt"], "sqrt(mean(x^2) + eps)")?)
        };
        let add = self.node_of(self.input(sqrt, 0)?, sqrt, &["Add"], "mean(x^2) + eps")?;
        let (p, q) = (self.input(add, 0)?, self.input(add, 1)?);
        let (mean, eps) = match (self.scalar(p), self.scalar(q)) {
            (None, Some(e)) => (p, e),
            (Some(e), None) => (q, e),
            _ => return Err(self.err(add, "expected mean(x^2) + a scalar eps constant")),
        };
        if !(eps >= 0.0 && eps.is_finite()) {
            return Err(self.err(add, format!("RMSNorm eps {eps} is not a non-negative number")));
        }
        let rm = self.node_of(mean, add, &["ReduceMean"], "mean(x^2) over the last axis")?;
        self.expect_axes(rm, &[&[-1], &[2]])?;
        if attr_int(rm, "keepdims").unwrap_or(1) != 1 {
            return Err(self.err(rm, "expected keepdims=1"));
        }
        let pow = self.node_of(self.input(rm, 0)?, rm, &["Pow"], "x^2")?;
        if self.scalar(self.input(pow, 1)?) != Some(2.0) {
            return Err(self.err(pow, "expected exponent 2.0"));
        }
        let xs = self.g.strip(x);
        if self.g.strip(self.input(pow, 0)?) != xs {
            return Err(self.err(
                pow,
                "RMSNorm squares a different tensor than the one it normalizes",
            ));
        }
        Ok(Norm {
            input: xs,
            weight: w,
            eps: eps as f32,
            eps_node: add,
        })
    }

    /// `down(silu(gate(h)) * up(h))` with `h` an RMSNorm output.
    fn mlp(&self, down: &'a NodeProto) -> Result<Mlp<'a>> {
        let (m, wd) = self.projection(down)?;
        let mul = self.node_of(m, down, &["Mul"], "silu(gate) * up")?;
        let (a, b) = (self.input(mul, 0)?, self.input(mul, 1)?);
        let (act, up) = match (self.producer_op(a), self.producer_op(b)) {
            (Some("Mul"), Some("MatMul")) => (a, b),
            (Some("MatMul"), Some("Mul")) => (b, a),
            _ => return Err(self.err(mul, "expected silu(gate) * up (SwiGLU)")),
        };
        let act = self.node_of(act, mul, &["Mul"], "silu(gate)")?;
        let (c, d) = (self.input(act, 0)?, self.input(act, 1)?);
        let (sig, gate) = match (self.producer_op(c), self.producer_op(d)) {
            (Some("Sigmoid"), Some(o)) if o != "Sigmoid" => (c, d),
            (Some(o), Some("Sigmoid")) if o != "Sigmoid" => (d, c),
            _ => {
                // Name the node that should have been the Sigmoid, if there is one.
                let culprit = [c, d]
                    .iter()
                    .filter_map(|v| self.g.producer(self.g.strip(v)))
                    .find(|n| n.op_type != "MatMul");
                return Err(match culprit {
                    Some(n) => self.err(
                        n,
                        format!("expected Sigmoid(gate) of the SiLU in `{}`", node_label(act)),
                    ),
                    None => self.err(act, "expected gate * Sigmoid(gate) (SiLU)"),
                });
            }
        };
        let sig = self.node_of(sig, act, &["Sigmoid"], "sigmoid(gate)")?;
        if self.g.strip(self.input(sig, 0)?) != self.g.strip(gate) {
            return Err(self.err(
                sig,
                "SiLU: the Sigmoid reads a different tensor than the one it multiplies",
            ));
        }
        let gate_mm = self.node_of(gate, act, &["MatMul"], "the gate projection")?;
        let (hg, wg) = self.projection(gate_mm)?;
        let up_mm = self.node_of(up, mul, &["MatMul"], "the up projection")?;
        let (hu, wu) = self.projection(up_mm)?;
        if self.g.strip(hg) != self.g.strip(hu) {
            return Err(self.err(
                up_mm,
                "the up projection reads a different tensor than the gate projection",
            ));
        }
        let norm = self.rmsnorm(hg, gate_mm)?;
        Ok(Mlp {
            norm,
            gate: wg,
            up: wu,
            down: wd,
        })
    }

    /// `o(merge_heads(softmax(rope(q) @ repeat(rope(k))^T * scale + causal_mask) @ repeat(v)))`
    /// with q, k, v projections of one RMSNorm output.
    fn attention(&self, o_mm: &'a NodeProto) -> Result<Attn<'a>> {
        let (merged, wo) = self.projection(o_mm)?;
        let merge = self.node_of(merged, o_mm, &["Reshape"], "the merge of the attention heads")?;
        let merge_shape = self.input(merge, 1)?;
        self.g.check_plumbing(merge_shape, merge)?;
        let merge_last = self.shape_last(merge_shape);
        let tr = self.node_of(
            self.input(merge, 0)?,
            merge,
            &["Transpose"],
            "the heads-to-sequence transpose",
        )?;
        self.expect_perm(tr, &[0, 2, 1, 3])?;
        let pv = self.node_of(self.input(tr, 0)?, tr, &["MatMul"], "probabilities @ V")?;
        let sm = self.node_of(
            self.input(pv, 0)?,
            pv,
            &["Softmax"],
            "the attention probabilities",
        )?;
        let axis = attr_int(sm, "axis").unwrap_or(-1);
        if axis != -1 && axis != 3 {
            return Err(self.err(sm, format!("softmax over axis {axis}, expected the last axis")));
        }
        let add = self.node_of(self.input(sm, 0)?, sm, &["Add"], "scaled scores + causal mask")?;
        let (a, b) = (self.input(add, 0)?, self.input(add, 1)?);
        let is_scaled = |v: &str| {
            self.g.producer(self.g.strip(v)).is_some_and(|n| {
                matches!(n.op_type.as_str(), "Mul" | "Div")
                    && n.input.len() == 2
                    && self.scalar(&n.input[1]).is_some()
                    && self.producer_op(&n.input[0]) == Some("MatMul")
            })
        };
        let (scores, mask) = match (is_scaled(a), is_scaled(b)) {
            (true, false) => (a, b),
            (false, true) => (b, a),
            _ => return Err(self.err(add, "expected (Q @ K^T) * scale + mask")),
        };
        self.causal_mask(mask, add)?;
        let sc = self.node_of(scores, add, &["Mul", "Div"], "the scaled scores")?;
        let c = self.scalar(self.input(sc, 1)?).unwrap_or(f64::NAN);
        let scale = if sc.op_type == "Mul" { c } else { 1.0 / c };
        let qk = self.node_of(self.input(sc, 0)?, sc, &["MatMul"], "Q @ K^T")?;
        let kt = self.node_of(self.input(qk, 1)?, qk, &["Transpose"], "K transposed")?;
        self.expect_perm(kt, &[0, 1, 3, 2])?;

        let q_rope = self.rope(self.input(qk, 0)?, qk)?;
        let (k_roped, k_rep) = self.repeat_kv(self.input(kt, 0)?)?;
        let k_rope = self.rope(k_roped, kt)?;
        let (v_heads, v_rep) = self.repeat_kv(self.input(pv, 1)?)?;
        let q = self.heads_in(q_rope.x, q_rope.node)?;
        let k = self.heads_in(k_rope.x, k_rope.node)?;
        let v = self.heads_in(v_heads, pv)?;
        let h = self.g.strip(q.h);
        for p in [&k, &v] {
            if self.g.strip(p.h) != h {
                return Err(self.err(p.matmul, "q, k and v projections read different tensors"));
            }
        }
        let norm = self.rmsnorm(q.h, q.matmul)?;

        // Numbers: head size from the RoPE tables, heads from the weight widths.
        if q_rope.inv_freq != k_rope.inv_freq {
            return Err(self.err(k_rope.node, "RoPE frequencies of k differ from those of q"));
        }
        let head_dim = q_rope.inv_freq.len() * 2;
        for r in [&q_rope, &k_rope] {
            self.check_rope_bounds(r, head_dim)?;
        }
        for p in [&q, &k, &v] {
            if p.head_size != Some(head_dim as i64) {
                return Err(self.err(
                    p.reshape,
                    format!(
                        "head split to size {:?}, but the RoPE tables imply head_dim {head_dim}",
                        p.head_size
                    ),
                ));
            }
        }
        let width = |p: &HeadsIn<'a>| -> Result<usize> {
            let d = self.g.init(p.w).and_then(dims).unwrap_or_default();
            match d.as_slice() {
                &[_, out] if out % head_dim == 0 && out > 0 => Ok(out / head_dim),
                _ => Err(self.err(
                    p.matmul,
                    format!("weight `{}` dims {d:?} are not [in, heads x {head_dim}]", p.w),
                )),
            }
        };
        let heads = width(&q)?;
        let kv_heads = width(&k)?;
        if width(&v)? != kv_heads {
            return Err(self.err(v.matmul, "v projection width differs from k projection width"));
        }
        if heads % kv_heads != 0 {
            return Err(self.err(
                o_mm,
                format!("{heads} query heads are not a multiple of {kv_heads} key/value heads"),
            ));
        }
        let n_rep = (heads / kv_heads) as i64;
        for (rep, node) in [(k_rep, kt), (v_rep, pv)] {
            if rep.unwrap_or(1) != n_rep {
                return Err(self.err(
                    node,
                    format!(
                        "key/value heads repeated {} times, but {heads} query heads over {kv_heads} kv heads need {n_rep}",
                        rep.unwrap_or(1)
                    ),
                ));
            }
        }
        let want = 1.0 / (head_dim as f64).sqrt();
        let close = (scale - want).abs() <= 1e-5 * want; // false for NaN
        if !close {
            return Err(self.err(
                sc,
                format!("attention scale {scale}, expected 1/sqrt({head_dim}) = {want}"),
            ));
        }
        if !matches!(merge_last, Some(-1)) && merge_last != Some((heads * head_dim) as i64) {
            return Err(self.err(
                merge,
                format!(
                    "heads merged to width {merge_last:?}, expected {}",
                    heads * head_dim
                ),
            ));
        }
        Ok(Attn {
            norm,
            q: q.w,
            k: k.w,
            v: v.w,
            o: wo,
            head_dim,
            heads,
            kv_heads,
            inv_freq: q_rope.inv_freq,
        })
    }

    /// `Transpose(Reshape(MatMul(h, W), [b, s, -1, head]), [0, 2, 1, 3])`.
    fn heads_in(&self, v: &'a str, consumer: &'a NodeProto) -> Result<HeadsIn<'a>> {
        let tr = self.node_of(v, consumer, &["Transpose"], "the sequence-to-heads transpose")?;
        self.expect_perm(tr, &[0, 2, 1, 3])?;
        let rs = self.node_of(self.input(tr, 0)?, tr, &["Reshape"], "the split into heads")?;
        let shape = self.input(rs, 1)?;
        self.g.check_plumbing(shape, rs)?;
        let mm = self.node_of(self.input(rs, 0)?, rs, &["MatMul"], "a q/k/v projection")?;
        let (h, w) = self.projection(mm)?;
        Ok(HeadsIn {
            h,
            w,
            head_size: self.shape_last(shape),
            matmul: mm,
            reshape: rs,
        })
    }

    /// The last element of a shape tensor, if it is a constant (a constant shape or a
    /// Concat whose last part is constant).
    fn shape_last(&self, v: &str) -> Option<i64> {
        if let Some(c) = self.g.constant(v) {
            return c.ints()?.last().copied();
        }
        let n = self.g.producer(v)?;
        if n.op_type != "Concat" {
            return None;
        }
        self.g.constant(n.input.last()?)?.ints()?.last().copied()
    }

    /// GQA repeat `Reshape(Expand(Unsqueeze(x, [2]), [b, kv, n_rep, s, d]), [b, kv*n_rep, s, d])`.
    /// Returns the repeated tensor and the repeat factor; a tensor that is not repeated is
    /// returned as is with `None`.
    fn repeat_kv(&self, v: &'a str) -> Result<(&'a str, Option<i64>)> {
        let s = self.g.strip(v);
        let Some(rs) = self.g.producer(s).filter(|n| n.op_type == "Reshape") else {
            return Ok((v, None));
        };
        let target = self.input(rs, 1)?;
        self.g.check_plumbing(target, rs)?;
        let ex = self.node_of(self.input(rs, 0)?, rs, &["Expand"], "the GQA repeat (expand)")?;
        let ex_shape = self.input(ex, 1)?;
        self.g.check_plumbing(ex_shape, ex)?;
        let un = self.node_of(
            self.input(ex, 0)?,
            ex,
            &["Unsqueeze"],
            "the GQA repeat (unsqueeze)",
        )?;
        self.expect_axes(un, &[&[2]])?;
        let factor = self
            .expand_factor(ex_shape)
            .ok_or_else(|| self.err(ex, "cannot read the GQA repeat factor from the Expand shape"))?;
        Ok((self.input(un, 0)?, Some(factor)))
    }

    /// Element 2 of the 5-D Expand target of the GQA repeat, traced through the
    /// `Where(target == -1, 1, target)` and Reshape plumbing torch emits.
    fn expand_factor(&self, v: &'a str) -> Option<i64> {
        let mut v = v;
        for _ in 0..16 {
            if let Some(c) = self.g.constant(v) {
                let i = c.ints()?;
                return (i.len() == 5).then(|| i[2]);
            }
            let n = self.g.producer(v)?;
            v = match n.op_type.as_str() {
                "Where" => n.input.get(2)?,
                "Reshape" | "Cast" | "Identity" => n.input.first()?,
                "Concat" if n.input.len() == 5 => {
                    return self.g.constant(&n.input[2])?.int_scalar();
                }
                _ => return None,
            };
        }
        None
    }

    /// RoPE in the rotate-half layout: `x * cos + cat(-x[..., h:], x[..., :h]) * sin`.
    fn rope(&self, v: &'a str, consumer: &'a NodeProto) -> Result<Rope<'a>> {
        let add = self.node_of(v, consumer, &["Add"], "RoPE x*cos + rotate_half(x)*sin")?;
        let ma = self.node_of(self.input(add, 0)?, add, &["Mul"], "x*cos or rotate_half(x)*sin")?;
        let mb = self.node_of(self.input(add, 1)?, add, &["Mul"], "x*cos or rotate_half(x)*sin")?;
        let rot_idx = |m: &'a NodeProto| -> Option<usize> {
            (0..2).find(|&i| {
                m.input
                    .get(i)
                    .is_some_and(|x| self.producer_op(x) == Some("Concat"))
            })
        };
        let (cos_mul, sin_mul, ri) = match (rot_idx(ma), rot_idx(mb)) {
            (None, Some(i)) => (ma, mb, i),
            (Some(i), None) => (mb, ma, i),
            _ => return Err(self.err(add, "expected x*cos + rotate_half(x)*sin")),
        };
        let sin_v = self.input(sin_mul, 1 - ri)?;
        let cat = self.node_of(self.input(sin_mul, ri)?, sin_mul, &["Concat"], "rotate_half(x)")?;
        if cat.input.len() != 2 || !matches!(attr_int(cat, "axis"), Some(-1 | 3)) {
            return Err(self.err(
                cat,
                "rotate_half: expected Concat of two halves along the last axis",
            ));
        }
        let neg = self.node_of(self.input(cat, 0)?, cat, &["Neg"], "-x[..., h:]")?;
        let hi = self.node_of(self.input(neg, 0)?, neg, &["Slice"], "x[..., h:]")?;
        let lo = self.node_of(self.input(cat, 1)?, cat, &["Slice"], "x[..., :h]")?;
        let x = self.g.strip(self.input(hi, 0)?);
        if self.g.strip(self.input(lo, 0)?) != x {
            return Err(self.err(lo, "rotate_half slices two different tensors"));
        }
        let (c0, c1) = (self.input(cos_mul, 0)?, self.input(cos_mul, 1)?);
        let cos_v = if self.g.strip(c0) == x {
            c1
        } else if self.g.strip(c1) == x {
            c0
        } else {
            return Err(self.err(
                cos_mul,
                "x*cos multiplies a different tensor than rotate_half rotates",
            ));
        };
        let (lo_s, lo_e) = self.slice_bounds(lo, x)?;
        let (hi_s, hi_e) = self.slice_bounds(hi, x)?;
        let inv_freq = self.rope_tables(cos_v, sin_v, add)?;
        Ok(Rope {
            x,
            inv_freq,
            bounds: [lo_s, lo_e, hi_s, hi_e],
            node: add,
        })
    }

    fn check_rope_bounds(&self, r: &Rope<'a>, head_dim: usize) -> Result<()> {
        let half = (head_dim / 2) as i64;
        let is_half = |b: Bound| b == Bound::HalfOfLastDim || b == Bound::Const(half);
        let [lo_s, lo_e, hi_s, hi_e] = r.bounds;
        let ok = lo_s == Bound::Const(0)
            && is_half(lo_e)
            && is_half(hi_s)
            && matches!(hi_e, Bound::Const(e) if e >= head_dim as i64);
        if ok {
            Ok(())
        } else {
            Err(self.err(
                r.node,
                format!(
                    "rotate_half slices {:?}, expected [0, {half}) and [{half}, end)",
                    r.bounds
                ),
            ))
        }
    }

    /// Start and end of a `Slice(x, start, end, axes=[-1], steps=[1])`.
    fn slice_bounds(&self, s: &'a NodeProto, x: &'a str) -> Result<(Bound, Bound)> {
        if s.input.len() < 4 {
            return Err(self.err(s, "expected explicit axes (the last axis)"));
        }
        match self
            .g
            .constant(&s.input[3])
            .and_then(|c| c.ints().map(<[i64]>::to_vec))
        {
            Some(a) if a == [-1] || a == [3] => {}
            a => return Err(self.err(s, format!("slices axes {a:?}, expected the last axis"))),
        }
        let step = match s.input.get(4).filter(|v| !v.is_empty()) {
            Some(st) => self.g.constant(st).and_then(|c| c.int_scalar()),
            None => Some(1),
        };
        if step != Some(1) {
            return Err(self.err(s, "expected step 1"));
        }
        Ok((
            self.bound(self.input(s, 1)?, s, x)?,
            self.bound(self.input(s, 2)?, s, x)?,
        ))
    }

    /// A Slice bound: a one-element constant, or `x.shape[-1] // 2` (through
    /// Unsqueeze/Cast).
    fn bound(&self, v: &'a str, slice: &'a NodeProto, x: &'a str) -> Result<Bound> {
        let fail = || self.err(slice, format!("cannot verify the rotate_half split point `{v}`"));
        let mut v = v;
        for _ in 0..16 {
            if let Some(c) = self.g.constant(v) {
                return c
                    .ints()
                    .filter(|i| i.len() == 1)
                    .map(|i| Bound::Const(i[0]))
                    .ok_or_else(fail);
            }
            let n = self.g.producer(v).ok_or_else(fail)?;
            match n.op_type.as_str() {
                "Unsqueeze" | "Cast" | "Identity" => v = n.input.first().ok_or_else(fail)?,
                "Div" => {
                    if n.input.len() != 2
                        || self.g.constant(&n.input[1]).and_then(|c| c.int_scalar()) != Some(2)
                    {
                        return Err(fail());
                    }
                    let mut d = n.input[0].as_str();
                    while let Some(p) = self
                        .g
                        .producer(d)
                        .filter(|p| matches!(p.op_type.as_str(), "Cast" | "Identity"))
                    {
                        d = &p.input[0];
                    }
                    let gather = self
                        .g
                        .producer(d)
                        .filter(|p| p.op_type == "Gather")
                        .ok_or_else(fail)?;
                    let idx = gather
                        .input
                        .get(1)
                        .and_then(|i| self.g.constant(i))
                        .and_then(|c| c.int_scalar());
                    let shape = gather.input.first().and_then(|s| self.g.producer(s));
                    let ok = matches!(idx, Some(3 | -1))
                        && attr_int(gather, "axis").unwrap_or(0) == 0
                        && shape.is_some_and(|sh| {
                            sh.op_type == "Shape"
                                && sh.attribute.is_empty()
                                && sh.input.first().is_some_and(|y| self.g.strip(y) == x)
                        });
                    return if ok { Ok(Bound::HalfOfLastDim) } else { Err(fail()) };
                }
                _ => return Err(fail()),
            }
        }
        Err(fail())
    }

    /// The cos and sin tables: `Unsqueeze(Cos(cat(f, f)) * 1.0, [1])` (resp. Sin) with
    /// `f = positions * inv_freq`. Returns the inverse frequencies.
    fn rope_tables(&self, cos_v: &'a str, sin_v: &'a str, consumer: &'a NodeProto) -> Result<Vec<f64>> {
        let (emb_c, uc) = self.table(cos_v, "Cos", consumer)?;
        let (emb_s, _) = self.table(sin_v, "Sin", consumer)?;
        if self.g.strip(emb_c) != self.g.strip(emb_s) {
            return Err(self.err(consumer, "cos and sin tables are computed from different angles"));
        }
        let cat = self.node_of(emb_c, uc, &["Concat"], "cat(freqs, freqs)")?;
        if cat.input.len() != 2
            || self.g.strip(&cat.input[0]) != self.g.strip(&cat.input[1])
            || !matches!(attr_int(cat, "axis"), Some(-1 | 2))
        {
            return Err(self.err(
                cat,
                "expected cat(freqs, freqs) along the last axis (rotate-half layout)",
            ));
        }
        let f = self.node_of(self.input(cat, 0)?, cat, &["Mul"], "positions * inv_freq")?;
        let (a, b) = (self.input(f, 0)?, self.input(f, 1)?);
        let (pos, inv) = match (self.g.constant(a), self.g.constant(b)) {
            (None, Some(c)) => (a, c),
            (Some(c), None) => (b, c),
            _ => return Err(self.err(f, "expected positions * a constant inv_freq")),
        };
        let (rank, seq_axis) = self.positions(pos, f)?;
        if rank < 2 || seq_axis != rank - 2 {
            return Err(self.err(f, "positions must be laid out [.., seq, 1] against inv_freq"));
        }
        let n = inv.len();
        if n == 0 || inv.dims.last().copied() != Some(n as i64) {
            return Err(self.err(
                f,
                format!(
                    "inv_freq constant has dims {:?}, expected [head_dim / 2]",
                    inv.dims
                ),
            ));
        }
        // The tables are [.., seq, head_dim]; after Unsqueeze(axes=[1]) they must be
        // [b, 1, seq, head_dim] to broadcast over heads.
        let (r2, s2) = unsqueezed(rank, seq_axis, &[1]);
        if r2 != 4 || s2 != 2 {
            return Err(self.err(uc, "cos/sin tables do not broadcast as [batch, 1, seq, head_dim]"));
        }
        Ok(inv.floats())
    }

    /// `Unsqueeze([Mul(]op(emb)[, 1.0)], [1])`: returns `emb` and the Unsqueeze.
    fn table(&self, v: &'a str, op: &str, consumer: &'a NodeProto) -> Result<(&'a str, &'a NodeProto)> {
        let un = self.node_of(
            v,
            consumer,
            &["Unsqueeze"],
            "the cos/sin table broadcast over heads",
        )?;
        self.expect_axes(un, &[&[1]])?;
        let mut t = self.node_of(self.input(un, 0)?, un, &["Mul", op], &format!("the {op} table"))?;
        if t.op_type == "Mul" {
            let (a, b) = (self.input(t, 0)?, self.input(t, 1)?);
            let (x, s) = match (self.scalar(a), self.scalar(b)) {
                (None, Some(s)) => (a, s),
                (Some(s), None) => (b, s),
                _ => return Err(self.err(t, "expected table * attention_scaling constant")),
            };
            if s != 1.0 {
                return Err(self.err(
                    t,
                    format!(
                        "RoPE attention scaling {s} (only the default RoPE with scaling 1.0 is supported)"
                    ),
                ));
            }
            t = self.node_of(x, t, &[op], &format!("{op}(angles)"))?;
        }
        Ok((self.input(t, 0)?, un))
    }

    /// Position indices: `Range(0, seq_len, 1)` through Unsqueeze/Cast. Returns the rank
    /// of `v` and the axis that runs along the sequence.
    fn positions(&self, v: &'a str, consumer: &'a NodeProto) -> Result<(usize, usize)> {
        let mut chain = Vec::new();
        let mut cur = v;
        let range = loop {
            if chain.len() > 16 {
                return Err(self.err(consumer, "position indices: Unsqueeze chain too long"));
            }
            let n = self.g.producer(cur).ok_or_else(|| {
                self.err(
                    consumer,
                    format!("`{cur}` should be the positions Range(0, seq_len, 1)"),
                )
            })?;
            match n.op_type.as_str() {
                "Cast" | "Identity" => cur = self.input(n, 0)?,
                "Unsqueeze" => {
                    chain.push(n);
                    cur = self.input(n, 0)?;
                }
                "Range" => break n,
                _ => {
                    return Err(self.err(
                        n,
                        "expected the positions Range(0, seq_len, 1) (through Unsqueeze/Cast)",
                    ));
                }
            }
        };
        if self.scalar(self.input(range, 0)?) != Some(0.0) || self.scalar(self.input(range, 2)?) != Some(1.0)
        {
            return Err(self.err(range, "positions must start at 0 with step 1"));
        }
        self.g.check_plumbing(self.input(range, 1)?, range)?;
        let (mut rank, mut seq) = (1usize, 0usize);
        for u in chain.iter().rev() {
            let axes = self
                .g
                .axes(u)
                .ok_or_else(|| self.err(u, "axes are not constant"))?;
            (rank, seq) = unsqueezed(rank, seq, &axes);
        }
        Ok((rank, seq))
    }

    /// The causal mask: `Where(Expand(kv_pos <= q_pos), 0, very negative)` with both
    /// positions from one Range, keys along the last axis and queries along the one
    /// before.
    fn causal_mask(&self, v: &'a str, consumer: &'a NodeProto) -> Result<()> {
        let w = self.node_of(v, consumer, &["Where"], "the causal attention mask")?;
        let keep = self.scalar(self.input(w, 1)?);
        let fill = self.scalar(self.input(w, 2)?);
        if keep != Some(0.0) || !fill.is_some_and(|f| f <= -1e30) {
            return Err(self.err(
                w,
                format!(
                    "mask values {keep:?} / {fill:?}, expected 0 where attending and a very negative fill"
                ),
            ));
        }
        let mut c = self.g.strip(self.input(w, 0)?);
        while let Some(ex) = self.g.producer(c).filter(|n| n.op_type == "Expand") {
            self.g.check_plumbing(self.input(ex, 1)?, ex)?;
            c = self.g.strip(self.input(ex, 0)?);
        }
        let le = self.node_of(
            c,
            w,
            &["LessOrEqual"],
            "the causal comparison key_pos <= query_pos",
        )?;
        let k = self.positions(self.input(le, 0)?, le)?;
        let q = self.positions(self.input(le, 1)?, le)?;
        if k != (4, 3) || q != (4, 2) {
            return Err(self.err(
                le,
                format!(
                    "mask compares positions laid out {k:?} and {q:?} (rank, seq axis); the causal mask needs keys (4, 3) <= queries (4, 2)"
                ),
            ));
        }
        Ok(())
    }
}

/// Rank and sequence axis after `Unsqueeze(axes)` of a tensor of `rank` whose sequence
/// runs along `seq`.
fn unsqueezed(rank: usize, seq: usize, axes: &[i64]) -> (usize, usize) {
    let out = rank + axes.len();
    let mut a: Vec<i64> = axes
        .iter()
        .map(|&x| if x < 0 { x + out as i64 } else { x })
        .collect();
    a.sort_unstable();
    let mut seq = seq as i64;
    for x in a {
        if x <= seq {
            seq += 1;
        }
    }
    (out, seq as usize)
}

/// The layer index in a node name's module path (`/model/model/layers.3/...`), if any.
fn layer_hint(name: &str) -> Option<usize> {
    let rest = &name[name.find("layers.")? + "layers.".len()..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsqueeze_tracks_the_sequence_axis() {
        // Range [S] -> [1, S] -> [1, 1, S]
        assert_eq!(unsqueezed(1, 0, &[0]), (2, 1));
        assert_eq!(unsqueezed(2, 1, &[1]), (3, 2));
        // keys: [1, 1, 1, S]; queries: [1, 1, S, 1]
        assert_eq!(unsqueezed(3, 2, &[2]), (4, 3));
        assert_eq!(unsqueezed(3, 2, &[3]), (4, 2));
        assert_eq!(unsqueezed(3, 2, &[-1]), (4, 2));
    }

    #[test]
    fn reads_layer_hints() {
        assert_eq!(
            layer_hint("/model/model/layers.12/self_attn/o_proj/MatMul"),
            Some(12)
        );
        assert_eq!(layer_hint("/model/lm_head/MatMul"), None);
    }
}
