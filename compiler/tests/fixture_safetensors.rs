//! The transformers fixture (HF safetensors directory) against transformers' own outputs.

mod common;

use edgec::frontend::{LoadOptions, load};

#[test]
fn logits_and_hidden_states_match_transformers() {
    let model = load(&common::tiny_llama(), &LoadOptions::default()).unwrap();
    assert!(
        model.graph.weights.iter().all(|w| w.tensor.is_mapped()),
        "safetensors weights must be mapped, not copied"
    );
    common::check_against_transformers(&model);
}

#[test]
fn incremental_decoding_matches_full_prefill() {
    use std::sync::Arc;
    let model = load(&common::tiny_llama(), &LoadOptions::default()).unwrap();
    let exec = edge_runtime::Executor::new(Arc::new(model.graph)).unwrap();
    let tokens: Vec<u32> = (0..12).map(|i| (i * 37 % 256) as u32).collect();
    let mut s = exec.session(16);
    let full = exec
        .forward(&mut s, &tokens, edge_runtime::Rows::All, &[])
        .unwrap();
    let mut s = exec.session(16);
    let mut step = exec
        .forward(&mut s, &tokens[..5], edge_runtime::Rows::Last, &[])
        .unwrap();
    for (i, &t) in tokens.iter().enumerate().skip(5) {
        let v = 256;
        let d = common::max_abs_diff(&step.logits, &full.logits[(i - 1) * v..i * v]);
        assert!(d < 1e-4, "position {}: {d}", i - 1);
        step = exec.forward(&mut s, &[t], edge_runtime::Rows::Last, &[]).unwrap();
    }
    let d = common::max_abs_diff(&step.logits, &full.logits[11 * 256..]);
    assert!(d < 1e-4);
}

#[test]
fn half_precision_weights_stay_close() {
    let opts = LoadOptions {
        dtype: Some(edge_runtime::DType::BF16),
    };
    let model = load(&common::tiny_llama(), &opts).unwrap();
    assert!(
        model
            .graph
            .weights
            .iter()
            .all(|w| w.tensor.dtype == edge_runtime::DType::BF16)
    );
}
