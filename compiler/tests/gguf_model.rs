//! GGUF model loading: SmolLM2-135M-Instruct (Q4_1, fetched by scripts/fetch-model.sh)
//! against the figures llama.cpp reports for it (shared/peers/llamacpp/RESULTS.md), and the
//! tiny-llama fixture converted to GGUF by llama.cpp's own converter against its
//! safetensors original (names, dim order, q/k un-permutation, f16 values).

mod common;

use common::{repo, smollm2};
use std::collections::HashMap;

use edge_runtime::DType;
use edgec::frontend::{LoadOptions, SourceFormat, gguf, load, safetensors};

#[test]
fn smollm2_config_graph_and_listing() {
    let m = gguf::load(&smollm2()).unwrap();
    let c = &m.graph.config;
    assert_eq!(
        (
            c.num_layers,
            c.hidden_size,
            c.intermediate_size,
            c.num_heads,
            c.num_kv_heads,
            c.head_dim
        ),
        (30, 576, 1536, 9, 3, 64)
    );
    assert_eq!(c.vocab_size, 49152);
    assert!(c.tie_word_embeddings);
    assert_eq!(c.rope_theta, 100000.0);
    assert_eq!(c.rms_norm_eps, 1e-5);
    assert_eq!(c.max_position_embeddings, 8192);
    assert_eq!(
        (c.bos_token_id, c.eos_token_ids.clone(), c.add_bos_token),
        (Some(1), vec![2], false)
    );
    assert_eq!(c.parameter_count(), 134_515_008);
    let stored: usize = m.graph.weights.iter().map(|w| w.tensor().unwrap().numel()).sum();
    assert_eq!(stored, 134_515_008);
    m.graph.verify().unwrap();
    assert_eq!(m.format, SourceFormat::Gguf);
    assert_eq!(m.graph.weights.len(), 1 + 30 * 9 + 1);

    // Storage: q4_1 / q8_0 dequantized to owned f32, f32 norms still mapped.
    let w = |n: &str| m.graph.weight(m.graph.weight_id(n).unwrap()).tensor().unwrap();
    let embed = w("model.embed_tokens.weight");
    assert_eq!(
        (embed.dtype, embed.shape.clone(), embed.is_mapped()),
        (DType::F32, vec![49152, 576], false)
    );
    let norm = w("model.layers.7.input_layernorm.weight");
    assert_eq!((norm.dtype, norm.is_mapped()), (DType::F32, true));
    assert_eq!(w("model.layers.0.self_attn.k_proj.weight").shape, vec![192, 576]);
    assert_eq!(w("model.layers.0.mlp.down_proj.weight").shape, vec![576, 1536]);

    // The listing is the file's: 272 tensors, 210 q4_1 + 1 q8_0 + 61 f32 (RESULTS.md).
    assert_eq!(m.source_tensors.len(), 272);
    let mut by_type: HashMap<&str, usize> = HashMap::new();
    for t in &m.source_tensors {
        *by_type.entry(t.dtype.as_str()).or_default() += 1;
    }
    assert_eq!(by_type, HashMap::from([("q4_1", 210), ("q8_0", 1), ("f32", 61)]));
    let te = m
        .source_tensors
        .iter()
        .find(|t| t.name == "token_embd.weight")
        .unwrap();
    assert_eq!(
        (te.shape.clone(), te.bytes),
        (vec![49152, 576], 49152 * 576 / 32 * 34)
    );
    let ffn = m
        .source_tensors
        .iter()
        .find(|t| t.name == "blk.0.ffn_down.weight")
        .unwrap();
    assert_eq!(
        (ffn.shape.clone(), ffn.bytes),
        (vec![576, 1536], 576 * 1536 / 32 * 20)
    );

    let md: HashMap<&str, &str> = m.metadata.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    assert_eq!(md["general.architecture"], "llama");
    assert_eq!(md["gguf.version"], "3");
    assert_eq!(md["llama.block_count"], "30");
    assert_eq!(md["tokenizer.ggml.tokens"], "[string; 49152]");
    assert_eq!(md["tokenizer.ggml.merges"], "[string; 48900]");
    assert_eq!(md["tokenizer.ggml.pre"], "smollm");

    let tok = m.tokenizer.as_ref().expect("the GGUF carries a tokenizer");
    assert_eq!(
        (tok.vocab_size(), tok.add_bos, tok.bos, tok.eos.clone()),
        (49152, false, Some(1), vec![2])
    );
}

#[test]
fn smollm2_through_the_generic_loader_with_a_dtype() {
    let opts = LoadOptions {
        dtype: Some(DType::BF16),
    };
    let m = load(&smollm2(), &opts).unwrap();
    assert!(
        m.graph
            .weights
            .iter()
            .all(|w| w.tensor().unwrap().dtype == DType::BF16)
    );
    assert_eq!(m.graph.config.num_layers, 30);
}

/// tiny-llama.f16.gguf was written by llama.cpp's converter (scripts/gguf-make-tiny.sh),
/// which permutes q/k rows and stores matrices as f16 and norms as f32. Loading it must give
/// exactly the safetensors weights, rounded to f16 where the GGUF holds f16.
#[test]
fn tiny_llama_gguf_equals_its_safetensors_original() {
    let st = safetensors::load_dir(&repo().join("tests/fixtures/tiny-llama")).unwrap();
    let gg = gguf::load(&repo().join("tests/data/gguf/tiny-llama.f16.gguf")).unwrap();
    let (a, b) = (&st.graph.config, &gg.graph.config);
    assert_eq!(
        (
            a.vocab_size,
            a.hidden_size,
            a.intermediate_size,
            a.num_layers,
            a.num_heads,
            a.num_kv_heads,
            a.head_dim
        ),
        (
            b.vocab_size,
            b.hidden_size,
            b.intermediate_size,
            b.num_layers,
            b.num_heads,
            b.num_kv_heads,
            b.head_dim
        )
    );
    assert_eq!(
        (
            a.rms_norm_eps,
            a.rope_theta,
            a.max_position_embeddings,
            a.tie_word_embeddings
        ),
        (
            b.rms_norm_eps,
            b.rope_theta,
            b.max_position_embeddings,
            b.tie_word_embeddings
        )
    );
    assert!(gg.tokenizer.is_none(), "converted with --no-vocab");
    assert_eq!(st.graph.weights.len(), gg.graph.weights.len());
    assert_eq!(st.graph.nodes, gg.graph.nodes);
    let mut permuted = 0;
    for w in &st.graph.weights {
        let g = gg.graph.weight(
            gg.graph
                .weight_id(&w.name)
                .unwrap_or_else(|| panic!("{} missing", w.name)),
        );
        assert_eq!(w.tensor().unwrap().shape, g.tensor().unwrap().shape, "{}", w.name);
        let want = if w.tensor().unwrap().shape.len() == 2 {
            assert_eq!(g.tensor().unwrap().dtype, DType::F16, "{}", w.name);
            w.tensor().unwrap().convert(DType::F16).unwrap().to_f32_vec()
        } else {
            assert_eq!(g.tensor().unwrap().dtype, DType::F32, "{}", w.name);
            w.tensor().unwrap().to_f32_vec()
        };
        let got = g.tensor().unwrap().to_f32_vec();
        let same = want.iter().zip(&got).all(|(x, y)| x.to_bits() == y.to_bits());
        assert!(same, "{}: values differ from the safetensors original", w.name);
        let qk = w.name.ends_with("q_proj.weight") || w.name.ends_with("k_proj.weight");
        assert_eq!(
            g.tensor().unwrap().is_mapped(),
            !qk,
            "{}: only q/k are copied",
            w.name
        );
        permuted += qk as usize;
    }
    assert_eq!(permuted, 8);
}
