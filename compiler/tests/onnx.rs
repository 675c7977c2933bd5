//! The ONNX frontend against the tiny-llama fixture: the graph it builds from
//! `model.onnx` must be the graph the safetensors frontend builds from the checkpoint the
//! ONNX file was exported from (same weights bit for bit, same config, same nodes), with
//! inline or external weights; and broken or altered files must be refused with messages
//! that name the problem.

mod common;

use std::path::{Path, PathBuf};

use edge_proto::onnx::tensor_proto::DataLocation;
use edge_proto::onnx::{ModelProto, NodeProto, StringStringEntryProto};
use edge_runtime::ir::Graph;
use edgec::frontend::{self, LoadOptions, LoadedModel, SourceFormat};
use prost::Message;

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny-llama")
}

fn load(path: &Path) -> frontend::Result<LoadedModel> {
    frontend::load(path, &LoadOptions::default())
}

fn reference() -> Graph {
    load(&fixture_dir()).expect("safetensors fixture").graph
}

fn fixture_proto() -> ModelProto {
    let bytes = std::fs::read(fixture_dir().join("model.onnx")).unwrap();
    ModelProto::decode(bytes.as_slice()).unwrap()
}

fn write_model(dir: &Path, m: &ModelProto) -> PathBuf {
    let p = dir.join("model.onnx");
    std::fs::write(&p, m.encode_to_vec()).unwrap();
    p
}

fn node_mut<'m>(m: &'m mut ModelProto, name: &str) -> &'m mut NodeProto {
    m.graph
        .as_mut()
        .unwrap()
        .node
        .iter_mut()
        .find(|n| n.name == name)
        .unwrap_or_else(|| panic!("no node {name}"))
}

/// Same weights (names, order, shapes, types, bytes), values and nodes.
fn assert_same_graph(got: &Graph, want: &Graph) {
    assert_eq!(got.weights.len(), want.weights.len());
    for (a, b) in got.weights.iter().zip(&want.weights) {
        assert_eq!(a.name, b.name);
        assert_eq!(a.tensor().unwrap().shape, b.tensor().unwrap().shape, "{}", a.name);
        assert_eq!(a.tensor().unwrap().dtype, b.tensor().unwrap().dtype, "{}", a.name);
        assert!(
            a.tensor().unwrap().raw() == b.tensor().unwrap().raw(),
            "weight {} differs",
            a.name
        );
    }
    assert_eq!(got.values, want.values);
    assert_eq!(got.nodes, want.nodes);
    assert_eq!(got.logits, want.logits);
}

fn err_of(r: frontend::Result<LoadedModel>) -> String {
    match r {
        Ok(_) => panic!("expected the load to fail"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn onnx_graph_equals_safetensors_graph() {
    let want = reference();
    let m = load(&fixture_dir().join("model.onnx")).unwrap();
    assert_eq!(m.format, SourceFormat::Onnx);
    let c = &m.graph.config;
    assert_eq!(c, &want.config);
    assert_eq!(c.rope_theta, 10000.0);
    assert_eq!(c.rms_norm_eps, 1e-5);
    assert_eq!((c.num_heads, c.num_kv_heads, c.head_dim), (4, 2, 16));
    assert_eq!(c.num_layers, 4);
    assert!(!c.tie_word_embeddings);
    assert_same_graph(&m.graph, &want);

    assert_eq!(m.source_tensors.len(), 39);
    let emb = m
        .source_tensors
        .iter()
        .find(|t| t.name == "model.model.embed_tokens.weight")
        .unwrap();
    assert_eq!(
        (emb.shape.as_slice(), emb.dtype.as_str(), emb.bytes),
        (&[256, 64][..], "f32", 65536)
    );
    let meta = |k: &str| {
        m.metadata
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
            .unwrap_or_else(|| panic!("no metadata {k}"))
    };
    assert_eq!(meta("producer_name"), "pytorch");
    assert_eq!(meta("producer_version"), "2.15.0");
    assert_eq!(meta("opset"), "17");
    assert_eq!(meta("ir_version"), "8");
    assert_eq!(meta("nodes"), "967");
    assert_eq!(meta("config"), "config.json");
}

/// The end-to-end check: our executor on the ONNX model vs transformers' logits, hidden
/// states and loss (`reference.safetensors`, max abs diff 1e-4).
#[test]
fn onnx_logits_match_transformers() {
    let m = load(&fixture_dir().join("model.onnx")).unwrap();
    common::check_against_transformers(&m);
}

#[test]
fn onnx_without_config_json_infers_the_config() {
    let want = reference();
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("model.onnx");
    std::fs::copy(fixture_dir().join("model.onnx"), &p).unwrap();
    let m = load(&p).unwrap();
    let (c, w) = (&m.graph.config, &want.config);
    assert_eq!(c.rope_theta, w.rope_theta);
    assert_eq!(c.rms_norm_eps.to_bits(), w.rms_norm_eps.to_bits());
    assert_eq!(
        (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_layers),
        (w.vocab_size, w.hidden_size, w.intermediate_size, w.num_layers)
    );
    assert_eq!(
        (c.num_heads, c.num_kv_heads, c.head_dim),
        (w.num_heads, w.num_kv_heads, w.head_dim)
    );
    assert!(!c.tie_word_embeddings);
    assert!(
        m.metadata
            .contains(&("config".into(), "inferred from the graph".into()))
    );
    assert_same_graph(&m.graph, &want);
}

#[test]
fn onnx_config_json_contradicting_the_graph_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(fixture_dir().join("model.onnx"), tmp.path().join("model.onnx")).unwrap();
    let cfg = std::fs::read_to_string(fixture_dir().join("config.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&cfg).unwrap();
    for (key, value, needle) in [
        ("rms_norm_eps", serde_json::json!(1e-6), "rms_norm_eps"),
        (
            "num_key_value_heads",
            serde_json::json!(4),
            "num_key_value_heads is 4, the graph has 2",
        ),
        (
            "rope_parameters",
            serde_json::json!({"rope_theta": 500000.0, "rope_type": "default"}),
            "rope_theta 500000",
        ),
    ] {
        let mut v = v.clone();
        v[key] = value;
        std::fs::write(tmp.path().join("config.json"), v.to_string()).unwrap();
        let e = err_of(load(&tmp.path().join("model.onnx")));
        assert!(
            e.contains(needle) && e.contains("disagrees with the ONNX graph"),
            "{key}: {e}"
        );
    }
}

/// Moves every initializer's bytes into `weights.bin` (each at a 64-byte aligned offset).
fn externalize(m: &mut ModelProto, dir: &Path, location: &str) {
    let mut blob: Vec<u8> = Vec::new();
    for t in &mut m.graph.as_mut().unwrap().initializer {
        let bytes = if t.raw_data.is_empty() {
            t.float_data.iter().flat_map(|f| f.to_le_bytes()).collect()
        } else {
            std::mem::take(&mut t.raw_data)
        };
        t.float_data.clear();
        while !blob.len().is_multiple_of(64) {
            blob.push(0);
        }
        let entry = |k: &str, v: String| StringStringEntryProto {
            key: k.into(),
            value: v,
        };
        t.external_data = vec![
            entry("location", location.into()),
            entry("offset", blob.len().to_string()),
            entry("length", bytes.len().to_string()),
        ];
        t.data_location = DataLocation::External as i32;
        blob.extend_from_slice(&bytes);
    }
    std::fs::write(dir.join("weights.bin"), blob).unwrap();
}

#[test]
fn onnx_external_data_is_mapped_and_equal() {
    let want = reference();
    let tmp = tempfile::tempdir().unwrap();
    let mut m = fixture_proto();
    externalize(&mut m, tmp.path(), "weights.bin");
    let p = write_model(tmp.path(), &m);
    // The model file itself no longer holds the weights.
    assert!(std::fs::metadata(&p).unwrap().len() < 200_000);
    std::fs::copy(fixture_dir().join("config.json"), tmp.path().join("config.json")).unwrap();

    let got = load(&p).unwrap();
    assert_same_graph(&got.graph, &want);
    assert_eq!(got.graph.config, want.config);
    // Weights used as stored (embedding, norms) reference the mapped file; transposed
    // MatMul weights are copies.
    let g = &got.graph;
    for name in [
        "model.embed_tokens.weight",
        "model.norm.weight",
        "model.layers.2.input_layernorm.weight",
    ] {
        assert!(
            g.weight(g.weight_id(name).unwrap()).tensor().unwrap().is_mapped(),
            "{name} is not mapped"
        );
    }
    assert!(got.metadata.contains(&("external_data_files".into(), "1".into())));
    let q = got
        .source_tensors
        .iter()
        .find(|t| t.name == "onnx::MatMul_1129")
        .unwrap();
    assert_eq!((q.shape.as_slice(), q.bytes), (&[64, 64][..], 16384));
}

#[test]
fn onnx_external_data_outside_the_model_directory_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let inner = tmp.path().join("model");
    std::fs::create_dir(&inner).unwrap();
    for loc in ["../weights.bin", "/etc/passwd", "sub/../../weights.bin"] {
        let mut m = fixture_proto();
        externalize(&mut m, tmp.path(), loc);
        let e = err_of(load(&write_model(&inner, &m)));
        assert!(
            e.contains(loc) && e.contains("inside the model's directory"),
            "{loc}: {e}"
        );
    }
    // A symlink inside the directory that points out of it.
    #[cfg(unix)]
    {
        let mut m = fixture_proto();
        externalize(&mut m, tmp.path(), "link.bin");
        std::os::unix::fs::symlink(tmp.path().join("weights.bin"), inner.join("link.bin")).unwrap();
        let e = err_of(load(&write_model(&inner, &m)));
        assert!(e.contains("outside the model's directory"), "{e}");
    }
}

#[test]
fn onnx_external_data_past_the_end_of_the_file_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let mut m = fixture_proto();
    externalize(&mut m, tmp.path(), "weights.bin");
    let t = &mut m.graph.as_mut().unwrap().initializer[0];
    t.external_data[1].value = "100000000".into();
    let name = t.name.clone();
    let e = err_of(load(&write_model(tmp.path(), &m)));
    assert!(
        e.contains(&name) && e.contains("beyond the end of `weights.bin`"),
        "{e}"
    );
}

#[test]
fn onnx_garbage_file_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("x.onnx");
    std::fs::write(
        &p,
        b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff this is not a model",
    )
    .unwrap();
    let e = err_of(load(&p));
    assert!(
        e.contains("x.onnx") && e.contains("not a valid ONNX protobuf"),
        "{e}"
    );
    // An empty file decodes as an empty ModelProto, which is no model.
    std::fs::write(&p, b"").unwrap();
    let e = err_of(load(&p));
    assert!(e.contains("x.onnx") && e.contains("not an ONNX model"), "{e}");
}

#[test]
fn onnx_truncated_model_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(fixture_dir().join("model.onnx")).unwrap();
    let p = tmp.path().join("model.onnx");
    for cut in [bytes.len() / 2, bytes.len() - 1, 100] {
        std::fs::write(&p, &bytes[..cut]).unwrap();
        let e = err_of(load(&p));
        assert!(
            e.contains("corrupt or truncated") && e.contains("not a valid ONNX protobuf"),
            "cut {cut}: {e}"
        );
    }
}

/// Loads the fixture with one change applied (in a tempdir, without config.json).
fn load_altered(f: impl FnOnce(&mut ModelProto)) -> String {
    let tmp = tempfile::tempdir().unwrap();
    let mut m = fixture_proto();
    f(&mut m);
    err_of(load(&write_model(tmp.path(), &m)))
}

#[test]
fn onnx_unsupported_op_type_names_the_node() {
    let e = load_altered(|m| node_mut(m, "/model/model/layers.2/mlp/act_fn/Sigmoid").op_type = "Tanh".into());
    assert!(
        e.contains("ONNX node `/model/model/layers.2/mlp/act_fn/Sigmoid` (Tanh)")
            && e.contains("not supported"),
        "{e}"
    );
    let e = load_altered(|m| node_mut(m, "/model/model/layers.0/self_attn/Softmax").op_type = "Erf".into());
    assert!(
        e.contains("`/model/model/layers.0/self_attn/Softmax` (Erf)"),
        "{e}"
    );
    let e =
        load_altered(|m| node_mut(m, "/model/model/layers.1/self_attn/Neg").domain = "com.microsoft".into());
    assert!(
        e.contains("layers.1/self_attn/Neg") && e.contains("com.microsoft"),
        "{e}"
    );
}

/// Supported op types in the wrong place: the fusion must refuse them, naming the node.
#[test]
fn onnx_structural_mismatches_name_the_node() {
    // SiLU replaced by an op of a supported type.
    let e = load_altered(|m| node_mut(m, "/model/model/layers.3/mlp/act_fn/Sigmoid").op_type = "Neg".into());
    assert!(
        e.contains("`/model/model/layers.3/mlp/act_fn/Sigmoid` (Neg)") && e.contains("Sigmoid"),
        "{e}"
    );

    // Softmax replaced by Sigmoid.
    let e =
        load_altered(|m| node_mut(m, "/model/model/layers.1/self_attn/Softmax").op_type = "Sigmoid".into());
    assert!(
        e.contains("`/model/model/layers.1/self_attn/Softmax` (Sigmoid)"),
        "{e}"
    );

    // rotate_half without the negation: Neg -> Identity is still a valid ONNX graph.
    let e =
        load_altered(|m| node_mut(m, "/model/model/layers.0/self_attn/Neg_1").op_type = "Identity".into());
    assert!(
        e.contains("/model/model/layers.0/self_attn/Concat_4") && e.contains("Neg"),
        "{e}"
    );

    // Residual Add turned into Mul.
    let e = load_altered(|m| node_mut(m, "/model/model/layers.2/Add").op_type = "Mul".into());
    assert!(e.contains("`/model/model/layers.2/Add` (Mul)"), "{e}");
}

/// Rewirings that keep every op type and idiom shape but compute something else.
#[test]
fn onnx_miswired_data_paths_are_refused() {
    // The MLP residual skips from the layer's input instead of the attention output.
    let e = load_altered(|m| {
        node_mut(m, "/model/model/layers.1/Add_1").input[0] =
            "/model/model/layers.1/input_layernorm/Cast_output_0".into()
    });
    assert!(
        e.contains("`/model/model/layers.1/Add_1`") && e.contains("does not add the MLP's normalized input"),
        "{e}"
    );

    // k projected from the norm output before the weight multiplication.
    let e = load_altered(|m| {
        node_mut(m, "/model/model/layers.0/self_attn/k_proj/MatMul").input[0] =
            "/model/model/layers.0/input_layernorm/Cast_1_output_0".into()
    });
    assert!(
        e.contains("k_proj/MatMul") && e.contains("read different tensors"),
        "{e}"
    );

    // q multiplied by the sin table where RoPE needs cos.
    let e = load_altered(|m| {
        node_mut(m, "/model/model/layers.0/self_attn/Mul").input[1] =
            "/model/model/layers.0/self_attn/Unsqueeze_7_output_0".into()
    });
    assert!(e.contains("(Sin)") && e.contains("Cos"), "{e}");

    // GQA repeat factor 1 where 4 heads over 2 kv heads need 2.
    let e = load_altered(|m| {
        let t = node_mut(m, "/model/model/layers.0/self_attn/Constant_37").attribute[0]
            .t
            .as_mut()
            .unwrap();
        t.raw_data = 1i64.to_le_bytes().to_vec();
    });
    assert!(e.contains("repeated 1 times") && e.contains("need 2"), "{e}");
}

fn set_float_constant(m: &mut ModelProto, node: &str, value: f32) {
    let n = node_mut(m, node);
    let t = n.attribute[0].t.as_mut().unwrap();
    t.raw_data = value.to_le_bytes().to_vec();
}

#[test]
fn onnx_wrong_constants_are_refused() {
    // One layer with another eps.
    let e = load_altered(|m| set_float_constant(m, "/model/model/layers.2/input_layernorm/Constant_1", 1e-6));
    assert!(
        e.contains("/model/model/layers.2/input_layernorm/Add") && e.contains("eps"),
        "{e}"
    );
    // Attention scale other than 1/sqrt(head_dim).
    let e = load_altered(|m| set_float_constant(m, "/model/model/layers.0/self_attn/Constant_56", 0.3));
    assert!(
        e.contains("/model/model/layers.0/self_attn/Mul_8") && e.contains("attention scale 0.3"),
        "{e}"
    );
    // RMSNorm exponent.
    let e = load_altered(|m| set_float_constant(m, "/model/model/norm/Constant", 3.0));
    assert!(
        e.contains("/model/model/norm/Pow") && e.contains("exponent 2"),
        "{e}"
    );
}

#[test]
fn onnx_non_causal_mask_is_refused() {
    // Swap the operands of the mask comparison: key_pos >= query_pos (anti-causal).
    let e = load_altered(|m| node_mut(m, "/model/model/LessOrEqual").input.swap(0, 1));
    assert!(
        e.contains("/model/model/LessOrEqual") && e.contains("causal"),
        "{e}"
    );
}

/// The embedding table, `[vocab, hidden]` f32 little-endian bytes, and its transpose.
fn embedding_bytes(m: &ModelProto) -> (Vec<u8>, Vec<u8>) {
    let g = m.graph.as_ref().unwrap();
    let t = g
        .initializer
        .iter()
        .find(|t| t.name == "model.model.embed_tokens.weight")
        .unwrap();
    let (rows, cols) = (t.dims[0] as usize, t.dims[1] as usize);
    let mut tr = vec![0u8; t.raw_data.len()];
    for r in 0..rows {
        for c in 0..cols {
            let src = (r * cols + c) * 4;
            let dst = (c * rows + r) * 4;
            tr[dst..dst + 4].copy_from_slice(&t.raw_data[src..src + 4]);
        }
    }
    (t.raw_data.clone(), tr)
}

#[test]
fn onnx_lm_head_equal_to_the_embedding_is_tied() {
    let tmp = tempfile::tempdir().unwrap();
    let mut m = fixture_proto();
    let (emb, emb_t) = embedding_bytes(&m);
    let head = m
        .graph
        .as_mut()
        .unwrap()
        .initializer
        .iter_mut()
        .find(|t| t.name == "onnx::MatMul_1241")
        .unwrap();
    head.raw_data = emb_t;
    let p = write_model(tmp.path(), &m);

    // No config.json: tied, inferred from the weights being equal.
    let g = load(&p).unwrap().graph;
    assert!(g.config.tie_word_embeddings);
    assert!(g.weight_id("lm_head.weight").is_none());
    let logits = g.nodes.iter().find(|n| n.name == "logits").unwrap();
    let table = g.weight_id("model.embed_tokens.weight").unwrap();
    assert_eq!(logits.op, edge_runtime::ir::Op::Linear { weight: table });
    assert_eq!(g.weight(table).tensor().unwrap().raw(), emb.as_slice());

    // config.json saying untied keeps the (equal) separate head.
    std::fs::copy(fixture_dir().join("config.json"), tmp.path().join("config.json")).unwrap();
    let g = load(&p).unwrap().graph;
    assert!(!g.config.tie_word_embeddings);
    assert!(g.weight_id("lm_head.weight").is_some());
}

#[test]
fn onnx_lm_head_reading_the_transposed_embedding_is_tied() {
    let tmp = tempfile::tempdir().unwrap();
    let mut m = fixture_proto();
    let g = m.graph.as_mut().unwrap();
    g.initializer.retain(|t| t.name != "onnx::MatMul_1241");
    let lm = g
        .node
        .iter_mut()
        .find(|n| n.name == "/model/lm_head/MatMul")
        .unwrap();
    lm.input[1] = "embed_T".into();
    g.node.insert(
        0,
        NodeProto {
            name: "tie/Transpose".into(),
            op_type: "Transpose".into(),
            input: vec!["model.model.embed_tokens.weight".into()],
            output: vec!["embed_T".into()],
            attribute: vec![edge_proto::onnx::AttributeProto {
                name: "perm".into(),
                r#type: edge_proto::onnx::attribute_proto::AttributeType::Ints as i32,
                ints: vec![1, 0],
                ..Default::default()
            }],
            ..Default::default()
        },
    );
    let got = load(&write_model(tmp.path(), &m)).unwrap().graph;
    assert!(got.config.tie_word_embeddings);
    assert!(got.weight_id("lm_head.weight").is_none());
    assert_eq!(got.weights.len(), reference().weights.len() - 1);

    // A transpose with the wrong permutation is not the embedding's transpose.
    let tie = m
        .graph
        .as_mut()
        .unwrap()
        .node
        .iter_mut()
        .find(|n| n.name == "tie/Transpose")
        .unwrap();
    tie.attribute[0].ints = vec![0, 1];
    let e = err_of(load(&write_model(tmp.path(), &m)));
    assert!(
        e.contains("`tie/Transpose` (Transpose): perm is Some([0, 1]), expected [1, 0]"),
        "{e}"
    );

    // The transpose of another matrix is not a tied head.
    let tie = m
        .graph
        .as_mut()
        .unwrap()
        .node
        .iter_mut()
        .find(|n| n.name == "tie/Transpose")
        .unwrap();
    tie.attribute[0].ints = vec![1, 0];
    tie.input[0] = "onnx::MatMul_1156".into();
    let e = err_of(load(&write_model(tmp.path(), &m)));
    assert!(
        e.contains("`tie/Transpose`")
            && e.contains("transposes `onnx::MatMul_1156`, not the embedding table"),
        "{e}"
    );
}
