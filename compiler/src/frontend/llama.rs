//! Builds the IR graph of a LLaMA decoder from weights named as Hugging Face names them
//! (`model.embed_tokens.weight`, `model.layers.{i}.self_attn.q_proj.weight`, ...).
//! Every frontend maps its file's names to these and calls [`build`].

use std::collections::HashMap;

use edge_runtime::ir::{
    Graph, ModelConfig, Node, Op, ValueId, ValueInfo, Weight, WeightData, WeightId, names,
};
use edge_runtime::tensor::Tensor;

use super::error::{FrontendError, Result};

/// HF names of the weights of decoder layer `i`, in a fixed order.
pub fn layer_weight_names(i: usize) -> [String; 9] {
    let p = format!("model.layers.{i}");
    [
        format!("{p}.input_layernorm.weight"),
        format!("{p}.self_attn.q_proj.weight"),
        format!("{p}.self_attn.k_proj.weight"),
        format!("{p}.self_attn.v_proj.weight"),
        format!("{p}.self_attn.o_proj.weight"),
        format!("{p}.post_attention_layernorm.weight"),
        format!("{p}.mlp.gate_proj.weight"),
        format!("{p}.mlp.up_proj.weight"),
        format!("{p}.mlp.down_proj.weight"),
    ]
}

pub const EMBED: &str = "model.embed_tokens.weight";
pub const FINAL_NORM: &str = "model.norm.weight";
pub const LM_HEAD: &str = "lm_head.weight";

struct Builder {
    weights: Vec<Weight>,
    by_name: HashMap<String, WeightId>,
    values: Vec<ValueInfo>,
    nodes: Vec<Node>,
    source: HashMap<String, WeightData>,
    path: String,
}

impl Builder {
    fn weight(&mut self, name: &str, shape: &[usize]) -> Result<WeightId> {
        if let Some(&id) = self.by_name.get(name) {
            return Ok(id);
        }
        let data = self
            .source
            .remove(name)
            .ok_or_else(|| FrontendError::MissingTensor {
                path: self.path.clone(),
                name: name.to_string(),
            })?;
        if data.shape() != shape {
            return Err(FrontendError::BadTensor {
                path: self.path.clone(),
                name: name.to_string(),
                msg: format!("shape {:?}, the config implies {shape:?}", data.shape()),
            });
        }
        let id = WeightId(self.weights.len());
        self.weights.push(Weight {
            name: name.to_string(),
            data,
        });
        self.by_name.insert(name.to_string(), id);
        Ok(id)
    }

    fn node(&mut self, name: String, op: Op, inputs: &[ValueId], width: usize) -> ValueId {
        let out = ValueId(self.values.len());
        self.values.push(ValueInfo {
            name: name.clone(),
            width,
        });
        self.nodes.push(Node {
            name,
            op,
            inputs: inputs.to_vec(),
            output: out,
        });
        out
    }
}

/// Builds the graph. `weights` must hold every tensor the config implies (extra tensors
/// such as `rotary_emb.inv_freq` are ignored); `lm_head.weight` may be absent when the
/// embeddings are tied. `path` names the source in error messages.
pub fn build(config: ModelConfig, weights: HashMap<String, Tensor>, path: &str) -> Result<Graph> {
    let weights = weights
        .into_iter()
        .map(|(k, t)| (k, WeightData::Dense(t)))
        .collect();
    build_with(config, weights, path)
}

/// [`build`] for weights that may be packed (compressed models).
pub fn build_with(config: ModelConfig, weights: HashMap<String, WeightData>, path: &str) -> Result<Graph> {
    config.validate()?;
    let c = config.clone();
    let (d, f, hd) = (c.hidden_size, c.intermediate_size, c.head_dim);
    let (qd, kvd) = (c.num_heads * hd, c.num_kv_heads * hd);
    let mut b = Builder {
        weights: vec![],
        by_name: HashMap::new(),
        values: vec![],
        nodes: vec![],
        source: weights,
        path: path.to_string(),
    };

    let table = b.weight(EMBED, &[c.vocab_size, d])?;
    let mut x = b.node(names::EMBEDDINGS.into(), Op::Embedding { table }, &[], d);
    for i in 0..c.num_layers {
        let [ln1, wq, wk, wv, wo, ln2, wg, wu, wd] = layer_weight_names(i);
        let p = format!("layers.{i}");
        let ln1 = b.weight(&ln1, &[d])?;
        let wq = b.weight(&wq, &[qd, d])?;
        let wk = b.weight(&wk, &[kvd, d])?;
        let wv = b.weight(&wv, &[kvd, d])?;
        let wo = b.weight(&wo, &[d, qd])?;
        let ln2 = b.weight(&ln2, &[d])?;
        let wg = b.weight(&wg, &[f, d])?;
        let wu = b.weight(&wu, &[f, d])?;
        let wd = b.weight(&wd, &[d, f])?;
        let eps = c.rms_norm_eps;

        let h = b.node(
            format!("{p}.attn_norm"),
            Op::RmsNorm { weight: ln1, eps },
            &[x],
            d,
        );
        let q = b.node(format!("{p}.q"), Op::Linear { weight: wq }, &[h], qd);
        let k = b.node(format!("{p}.k"), Op::Linear { weight: wk }, &[h], kvd);
        let v = b.node(format!("{p}.v"), Op::Linear { weight: wv }, &[h], kvd);
        let rope = |heads| Op::Rope {
            heads,
            head_dim: hd,
            theta: c.rope_theta,
        };
        let q = b.node(format!("{p}.q_rope"), rope(c.num_heads), &[q], qd);
        let k = b.node(format!("{p}.k_rope"), rope(c.num_kv_heads), &[k], kvd);
        let attn = Op::Attention {
            heads: c.num_heads,
            kv_heads: c.num_kv_heads,
            head_dim: hd,
            layer: i,
        };
        let a = b.node(format!("{p}.attn"), attn, &[q, k, v], qd);
        let o = b.node(format!("{p}.o"), Op::Linear { weight: wo }, &[a], d);
        let x1 = b.node(format!("{p}.attn_res"), Op::Add, &[x, o], d);
        let h2 = b.node(
            format!("{p}.mlp_norm"),
            Op::RmsNorm { weight: ln2, eps },
            &[x1],
            d,
        );
        let g = b.node(format!("{p}.gate"), Op::Linear { weight: wg }, &[h2], f);
        let u = b.node(format!("{p}.up"), Op::Linear { weight: wu }, &[h2], f);
        let s = b.node(format!("{p}.swiglu"), Op::SwiGlu, &[g, u], f);
        let dn = b.node(format!("{p}.down"), Op::Linear { weight: wd }, &[s], d);
        x = b.node(names::layer_out(i), Op::Add, &[x1, dn], d);
    }
    let x = b.node("output_rows".into(), Op::OutputRows, &[x], d);
    let norm = b.weight(FINAL_NORM, &[d])?;
    let eps = c.rms_norm_eps;
    let x = b.node(
        names::FINAL_NORM.into(),
        Op::RmsNorm { weight: norm, eps },
        &[x],
        d,
    );
    let head = if c.tie_word_embeddings || !b.source.contains_key(LM_HEAD) {
        if !c.tie_word_embeddings {
            return Err(FrontendError::MissingTensor {
                path: path.to_string(),
                name: LM_HEAD.into(),
            });
        }
        table
    } else {
        b.weight(LM_HEAD, &[c.vocab_size, d])?
    };
    let logits = b.node(
        names::LOGITS.into(),
        Op::Linear { weight: head },
        &[x],
        c.vocab_size,
    );

    let graph = Graph {
        config,
        weights: b.weights,
        values: b.values,
        nodes: b.nodes,
        logits,
    };
    graph.verify()?;
    Ok(graph)
}
