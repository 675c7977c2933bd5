//! The transformers fixture (HF safetensors directory) against transformers' own outputs.

mod common;

use edgec::frontend::{LoadOptions, load};

#[test]
fn logits_and_hidden_states_match_transformers() {
    let model = load(&common::tiny_llama(), &LoadOptions::default()).unwrap();
    assert!(
        model
            .graph
            .weights
            .iter()
            .all(|w| w.tensor().unwrap().is_mapped()),
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

/// Writes the fixture's weights as `dtype` into `dir` (one file, or `shards` files with an
/// index), with the fixture's config.json.
fn write_converted(dir: &std::path::Path, dtype: safetensors::Dtype, shards: usize) {
    use std::collections::BTreeMap;
    let src = std::fs::read(common::tiny_llama().join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&src).unwrap();
    let mut names: Vec<String> = st.names().into_iter().map(str::to_string).collect();
    names.sort();
    let mut converted: Vec<(String, Vec<usize>, Vec<u8>)> = vec![];
    for name in &names {
        let v = st.tensor(name).unwrap();
        let vals = v
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()));
        let bytes: Vec<u8> = match dtype {
            safetensors::Dtype::F16 => vals.flat_map(|x| half::f16::from_f32(x).to_le_bytes()).collect(),
            safetensors::Dtype::BF16 => vals.flat_map(|x| half::bf16::from_f32(x).to_le_bytes()).collect(),
            _ => vals.flat_map(|x| x.to_le_bytes()).collect(),
        };
        converted.push((name.to_string(), v.shape().to_vec(), bytes));
    }
    std::fs::copy(common::tiny_llama().join("config.json"), dir.join("config.json")).unwrap();
    let per = converted.len().div_ceil(shards);
    let mut weight_map = BTreeMap::new();
    for (i, chunk) in converted.chunks(per).enumerate() {
        let file = if shards == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{shards:05}.safetensors", i + 1)
        };
        let views: Vec<(String, safetensors::tensor::TensorView)> = chunk
            .iter()
            .map(|(n, s, b)| {
                (
                    n.clone(),
                    safetensors::tensor::TensorView::new(dtype, s.clone(), b).unwrap(),
                )
            })
            .collect();
        safetensors::serialize_to_file(views, None, &dir.join(&file)).unwrap();
        for (n, _, _) in chunk {
            weight_map.insert(n.clone(), file.clone());
        }
    }
    if shards > 1 {
        let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
        std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    }
}

fn logits_of(model: edgec::frontend::LoadedModel) -> Vec<f32> {
    use std::sync::Arc;
    let exec = edge_runtime::Executor::new(Arc::new(model.graph)).unwrap();
    let tokens: Vec<u32> = (0..16).map(|i| (i * 53 % 256) as u32).collect();
    let mut s = exec.session(16);
    exec.forward(&mut s, &tokens, edge_runtime::Rows::All, &[])
        .unwrap()
        .logits
}

/// f16 and bf16 files are read mapped, and compute exactly what the f32 weights rounded to
/// that type compute.
#[test]
fn f16_and_bf16_files_are_mapped_and_exact() {
    for (st, dt) in [
        (safetensors::Dtype::F16, edge_runtime::DType::F16),
        (safetensors::Dtype::BF16, edge_runtime::DType::BF16),
    ] {
        let dir = tempfile::tempdir().unwrap();
        write_converted(dir.path(), st, 1);
        let model = load(dir.path(), &LoadOptions::default()).unwrap();
        assert!(
            model
                .graph
                .weights
                .iter()
                .all(|w| w.tensor().unwrap().dtype == dt && w.tensor().unwrap().is_mapped())
        );
        let from_file = logits_of(model);
        let rounded = logits_of(load(&common::tiny_llama(), &LoadOptions { dtype: Some(dt) }).unwrap());
        assert_eq!(from_file, rounded, "{dt}");
        let exact = logits_of(load(&common::tiny_llama(), &LoadOptions::default()).unwrap());
        let d = common::max_abs_diff(&from_file, &exact);
        assert!(
            d > 0.0 && d < 0.1,
            "{dt}: rounding should move the logits a little, moved {d}"
        );
    }
}

/// A sharded checkpoint (index + several files) loads to the same model as one file.
#[test]
fn sharded_checkpoint_loads_like_a_single_file() {
    let dir = tempfile::tempdir().unwrap();
    write_converted(dir.path(), safetensors::Dtype::F32, 3);
    assert!(dir.path().join("model-00003-of-00003.safetensors").exists());
    let sharded = load(dir.path(), &LoadOptions::default()).unwrap();
    assert_eq!(sharded.metadata[0], ("files".to_string(), "3".to_string()));
    let single = load(&common::tiny_llama(), &LoadOptions::default()).unwrap();
    assert_eq!(logits_of(sharded), logits_of(single));
}

/// Running the graph layer by layer with `run_span` (as calibration and profiling do)
/// gives the same residual stream as one full forward pass.
#[test]
fn layer_spans_reproduce_the_full_forward() {
    use edge_runtime::ir::names;
    use std::sync::Arc;
    let model = load(&common::tiny_llama(), &LoadOptions::default()).unwrap();
    let g = Arc::new(model.graph);
    let exec = edge_runtime::Executor::new(g.clone()).unwrap();
    let tokens: Vec<u32> = (0..10).map(|i| (i * 41 % 256) as u32).collect();
    let outs: Vec<_> = (0..4)
        .map(|i| g.value_id(&names::layer_out(i)).unwrap())
        .collect();
    let embed = g.value_id(names::EMBEDDINGS).unwrap();
    let mut taps = vec![embed];
    taps.extend(&outs);
    let mut s = exec.session(10);
    let full = exec
        .forward(&mut s, &tokens, edge_runtime::Rows::All, &taps)
        .unwrap();
    let mut x = full.taps[0].clone();
    let mut input = embed;
    for (i, &out) in outs.iter().enumerate() {
        let mut s = exec.session(10);
        let span = g.layer_span(i).unwrap();
        x = exec
            .run_span(&mut s, 10, vec![(input, x)], span, &[out])
            .unwrap()
            .remove(0);
        assert_eq!(x, full.taps[i + 1], "layer {i}");
        input = out;
    }
    // A span whose outside inputs are not seeded is an error, not a panic.
    let mut s = exec.session(10);
    let err = exec
        .run_span(&mut s, 10, vec![], g.layer_span(2).unwrap(), &[outs[2]])
        .unwrap_err();
    assert!(err.to_string().contains("layers.1.out"), "{err}");
}
