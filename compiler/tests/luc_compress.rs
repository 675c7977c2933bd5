//! `edgec compress` end to end on the tiny-llama fixture: the written directory loads back
//! through every command, computes exactly what the packed weights decode to, and bad
//! inputs fail cleanly.

mod common;

use std::process::{Command, Output};
use std::sync::Arc;

use edge_runtime::ir::WeightData;
use edge_runtime::{Executor, Rows};
use edgec::frontend::{LoadOptions, SourceFormat, load};

fn edgec(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_edgec"))
        .args(args)
        .output()
        .expect("run edgec")
}

fn policy(layers: usize, bits: u8, sparsity: f64, pattern: &str, quantizer: &str, pruner: &str) -> String {
    let mut s = String::from("model = \"tiny\"\nmethod = \"uniform\"\nbudget = \"bits=4\"\n");
    for i in 0..layers {
        s += &format!(
            "\n[[layer]]\nindex = {i}\nbits = {bits}\ngroup = 32\nscheme = \"asym\"\nsparsity = {sparsity}\n\
             pattern = \"{pattern}\"\nquantizer = \"{quantizer}\"\npruner = \"{pruner}\"\n"
        );
    }
    s
}

fn logits(model: &edgec::frontend::LoadedModel) -> Vec<f32> {
    let exec = Executor::new(Arc::new(model.graph.clone())).unwrap();
    let tokens: Vec<u32> = (0..16).map(|i| (i * 29 % 256) as u32).collect();
    let mut s = exec.session(16);
    exec.forward(&mut s, &tokens, Rows::All, &[]).unwrap().logits
}

#[test]
fn compressed_directory_round_trips_and_runs_its_packed_weights() {
    let dir = tempfile::tempdir().unwrap();
    let fixture = common::tiny_llama();
    for (name, pol) in [
        ("q4", policy(4, 4, 0.0, "unstructured", "rtn", "magnitude")),
        ("q3s24", policy(4, 3, 0.5, "2:4", "rtn", "magnitude")),
    ] {
        let p = dir.path().join(format!("{name}.toml"));
        std::fs::write(&p, pol).unwrap();
        let out = dir.path().join(name);
        let o = edgec(&[
            "compress",
            "--model",
            fixture.to_str().unwrap(),
            "--policy",
            p.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--json",
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let model = load(&out, &LoadOptions::default()).unwrap();
        assert_eq!(model.format, SourceFormat::Compressed);
        let packed: Vec<_> = model
            .graph
            .weights
            .iter()
            .filter_map(|w| match &w.data {
                WeightData::Packed(p) => Some(p.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(
            packed.len(),
            28,
            "{name}: all seven linears of four layers are packed"
        );
        assert!(
            packed.iter().all(|p| p.is_mapped()),
            "{name}: packed buffers are mapped"
        );
        let bytes: usize = packed.iter().map(|p| p.storage_bytes()).sum();
        assert_eq!(report["linear_bytes"].as_u64().unwrap() as usize, bytes);
        if name == "q3s24" {
            assert!((report["sparsity"].as_f64().unwrap() - 0.5).abs() < 1e-9);
        }
        // The compressed model computes exactly what its decoded weights compute densely.
        let mut dense = model.graph.clone();
        for w in &mut dense.weights {
            if let WeightData::Packed(p) = &w.data {
                let t = edge_runtime::Tensor::from_f32(p.shape().to_vec(), p.to_f32_vec()).unwrap();
                w.data = WeightData::Dense(t);
            }
        }
        let dense_model = edgec::frontend::LoadedModel {
            graph: dense,
            tokenizer: None,
            format: SourceFormat::Safetensors,
            source_tensors: vec![],
            metadata: vec![],
        };
        let (a, b) = (logits(&model), logits(&dense_model));
        let d = common::max_abs_diff(&a, &b);
        assert!(d < 1e-4, "{name}: packed vs decoded-dense logits differ by {d}");
        // And it is close to the original at 4 bits, further at 3 bits + 2:4.
        let orig = logits(&load(&fixture, &LoadOptions::default()).unwrap());
        let d = common::max_abs_diff(&a, &orig);
        assert!(d > 0.0, "{name}: compression must change the model");
        // Every command reads the directory.
        let o = edgec(&["inspect", out.to_str().unwrap(), "--json"]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
}

#[test]
fn bad_policies_and_corrupt_outputs_fail_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let fixture = common::tiny_llama();
    let run = |pol: &str| {
        let p = dir.path().join("p.toml");
        std::fs::write(&p, pol).unwrap();
        let out = dir.path().join("out");
        edgec(&[
            "compress",
            "--model",
            fixture.to_str().unwrap(),
            "--policy",
            p.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
        ])
    };
    let check = |o: &Output, needles: &[&str]| {
        let e = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{e}");
        assert!(!e.contains("panicked"), "{e}");
        for n in needles {
            assert!(e.contains(n), "stderr should mention `{n}`: {e}");
        }
    };
    // A layer the model does not have.
    check(
        &run(&policy(5, 4, 0.0, "unstructured", "rtn", "magnitude")),
        &["layer", "4"],
    );
    // An unsupported bit-width.
    check(
        &run(&policy(4, 5, 0.0, "unstructured", "rtn", "magnitude")),
        &["bit"],
    );
    // GPTQ without calibration text.
    check(
        &run(&policy(4, 4, 0.0, "unstructured", "gptq", "magnitude")),
        &["--calib"],
    );
    // An unknown quantizer.
    check(
        &run(&policy(4, 4, 0.0, "unstructured", "awq", "magnitude")),
        &["awq"],
    );

    // A truncated compressed model is reported, not loaded.
    let o = run(&policy(4, 4, 0.0, "unstructured", "rtn", "magnitude"));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let st = dir.path().join("out/model.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    std::fs::write(&st, &bytes[..bytes.len() / 2]).unwrap();
    let o = edgec(&["inspect", dir.path().join("out").to_str().unwrap()]);
    check(&o, &["model.safetensors"]);
}
