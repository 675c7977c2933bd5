//! The executor on packed weights: the tiny-llama fixture with every linear weight (and the
//! embedding table) packed gives the logits of the same model with the dequantized weights
//! stored dense, for prefill (GEMM tiles) and decoding (matvec), also after a round trip
//! through the packed safetensors layout.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;

use edge_runtime::format::{QuantScheme, QuantSpec, SparsePattern, ValueFormat};
use edge_runtime::ir::{Graph, Op, WeightData};
use edge_runtime::packed::{PackedWeight, read_packed_safetensors, write_packed_safetensors};
use edge_runtime::{Executor, Rows, Tensor};
use edgec::frontend::{LoadOptions, load};

/// The weights the executor reads as matrices (linear weights and the embedding table).
fn matrix_weights(g: &Graph) -> Vec<usize> {
    let mut ids: Vec<usize> = g
        .nodes
        .iter()
        .filter_map(|n| match n.op {
            Op::Linear { weight } | Op::Embedding { table: weight } => Some(weight.0),
            _ => None,
        })
        .collect();
    ids.sort();
    ids.dedup();
    ids
}

fn mask_keeping_largest(w: &[f32], block: usize, keep: usize) -> Vec<bool> {
    let mut mask = vec![false; w.len()];
    for (b, chunk) in w.chunks(block).enumerate() {
        let mut idx: Vec<usize> = (0..chunk.len()).collect();
        idx.sort_by(|&x, &y| chunk[y].abs().total_cmp(&chunk[x].abs()).then(x.cmp(&y)));
        for &i in &idx[..keep.min(chunk.len())] {
            mask[b * block + i] = true;
        }
    }
    mask
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    Quant(QuantSpec),
    Sparse(SparsePattern, ValueFormat),
}

fn pack(w: &[f32], rows: usize, cols: usize, kind: Kind) -> PackedWeight {
    match kind {
        Kind::Quant(q) => PackedWeight::pack_quant(rows, cols, w, q).unwrap(),
        Kind::Sparse(p, vf) => {
            let mask = match p {
                // Half of each row, by magnitude.
                SparsePattern::Unstructured => mask_keeping_largest(w, cols, cols / 2),
                SparsePattern::NofM { n, m } => mask_keeping_largest(w, m as usize, n as usize),
            };
            PackedWeight::pack_sparse(rows, cols, w, &mask, p, vf).unwrap()
        }
    }
}

/// The graph with its matrix weights packed, and the same graph with those weights
/// dequantized into dense f32 tensors.
fn packed_and_dequantized(g: &Graph, kind: Kind) -> (Graph, Graph) {
    let (mut packed, mut dense) = (g.clone(), g.clone());
    for id in matrix_weights(g) {
        let w = &g.weights[id];
        let (rows, cols) = (w.shape()[0], w.shape()[1]);
        let p = pack(&w.data.to_f32_vec(), rows, cols, kind);
        dense.weights[id].data =
            WeightData::Dense(Tensor::from_f32(vec![rows, cols], p.to_f32_vec()).unwrap());
        packed.weights[id].data = WeightData::Packed(Arc::new(p));
    }
    (packed, dense)
}

fn logits(g: Graph, tokens: &[u32]) -> (Vec<f32>, Vec<f32>) {
    let exec = Executor::new(Arc::new(g)).unwrap();
    let mut s = exec.session(32);
    let prefill = exec.forward(&mut s, tokens, Rows::All, &[]).unwrap().logits;
    // Decoding one token at a time (the matvec path).
    let mut s = exec.session(32);
    let mut steps = vec![];
    for &t in tokens {
        steps.extend(exec.forward(&mut s, &[t], Rows::Last, &[]).unwrap().logits);
    }
    (prefill, steps)
}

fn assert_close(a: &[f32], b: &[f32], what: &str) {
    let scale = b.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let d = common::max_abs_diff(a, b);
    assert!(
        d <= 1e-4 * scale.max(1.0),
        "{what}: max diff {d} (logit scale {scale})"
    );
}

fn kinds() -> Vec<Kind> {
    let q = |bits, group, scheme| QuantSpec { bits, group, scheme };
    vec![
        Kind::Quant(q(4, 32, QuantScheme::Asym)),
        Kind::Quant(q(3, 64, QuantScheme::Sym)),
        Kind::Quant(q(2, 128, QuantScheme::Asym)),
        Kind::Quant(q(8, 32, QuantScheme::Sym)),
        Kind::Sparse(SparsePattern::Unstructured, ValueFormat::F16),
        Kind::Sparse(
            SparsePattern::NofM { n: 2, m: 4 },
            ValueFormat::Quant(q(4, 32, QuantScheme::Asym)),
        ),
        Kind::Sparse(SparsePattern::NofM { n: 4, m: 8 }, ValueFormat::F16),
        Kind::Sparse(
            SparsePattern::Unstructured,
            ValueFormat::Quant(q(3, 32, QuantScheme::Sym)),
        ),
    ]
}

#[test]
fn packed_graphs_run_like_their_dequantized_weights() {
    let model = load(&common::tiny_llama(), &LoadOptions::default()).unwrap();
    let tokens: Vec<u32> = (0..12).map(|i| (i * 37 % 256) as u32).collect();
    let (base, _) = logits(model.graph.clone(), &tokens);
    for kind in kinds() {
        let (packed, dense) = packed_and_dequantized(&model.graph, kind);
        let label = packed.weights[matrix_weights(&packed)[1]]
            .data
            .format()
            .to_string();
        assert!(
            format!("{packed}").contains(&label),
            "Display shows the format {label}"
        );
        assert!(packed.weight_bytes() < model.graph.weight_bytes(), "{label}");
        let (pp, ps) = logits(packed, &tokens);
        let (dp, ds) = logits(dense, &tokens);
        assert_close(&pp, &dp, &format!("{label} prefill"));
        assert_close(&ps, &ds, &format!("{label} decode"));
        // The compression changed the model (the comparison above is not vacuous).
        assert!(common::max_abs_diff(&pp, &base) > 1e-3, "{label}");
    }
}

#[test]
fn packed_safetensors_round_trip_runs_the_same() {
    let model = load(&common::tiny_llama(), &LoadOptions::default()).unwrap();
    let g = &model.graph;
    let kind = Kind::Sparse(
        SparsePattern::NofM { n: 2, m: 4 },
        ValueFormat::Quant(QuantSpec {
            bits: 3,
            group: 32,
            scheme: QuantScheme::Asym,
        }),
    );
    let (packed, _) = packed_and_dequantized(g, kind);
    let pw: Vec<(&str, &PackedWeight)> = packed
        .weights
        .iter()
        .filter_map(|w| w.data.packed().map(|p| (w.name.as_str(), p)))
        .collect();
    let dw: Vec<(&str, &Tensor)> = packed
        .weights
        .iter()
        .filter_map(|w| w.tensor().map(|t| (w.name.as_str(), t)))
        .collect();
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("model.safetensors");
    let meta = BTreeMap::from([("edge.source".to_string(), "tiny-llama".to_string())]);
    write_packed_safetensors(&path, &pw, &dw, &meta).unwrap();
    let file = read_packed_safetensors(&path).unwrap();
    assert_eq!(file.metadata, meta);
    assert_eq!(file.packed.len(), pw.len());
    assert_eq!(file.dense.len(), dw.len());

    let mut reread = g.clone();
    for (name, p) in file.packed {
        let id = reread.weight_id(&name).unwrap();
        assert!(p.is_mapped());
        reread.weights[id.0].data = WeightData::Packed(Arc::new(p));
    }
    for (name, t) in file.dense {
        let id = reread.weight_id(&name).unwrap();
        reread.weights[id.0].data = WeightData::Dense(t);
    }
    assert_eq!(reread.weight_bytes(), packed.weight_bytes());
    let tokens: Vec<u32> = (0..9).map(|i| (i * 53 % 256) as u32).collect();
    let (a, b) = (logits(packed, &tokens), logits(reread, &tokens));
    assert_eq!(a.0, b.0, "bit-exact after the round trip");
    assert_eq!(a.1, b.1);
}

#[test]
fn verify_checks_packed_weights() {
    let model = load(&common::tiny_llama(), &LoadOptions::default()).unwrap();
    let g = &model.graph;
    let q4 = QuantSpec {
        bits: 4,
        group: 32,
        scheme: QuantScheme::Asym,
    };
    // A packed weight of the wrong shape in a Linear.
    let mut bad = g.clone();
    let id = matrix_weights(g)[1];
    let (rows, cols) = (bad.weights[id].shape()[0], bad.weights[id].shape()[1]);
    let p = PackedWeight::pack_quant(rows - 1, cols, &vec![0.5; (rows - 1) * cols], q4).unwrap();
    bad.weights[id].data = WeightData::Packed(Arc::new(p));
    let e = bad.verify().unwrap_err().to_string();
    assert!(e.contains(&format!("[{}, {cols}]", rows - 1)), "{e}");
    // A norm weight cannot be packed.
    let mut bad = g.clone();
    let norm = g.weight_id("model.norm.weight").unwrap();
    let d = g.config.hidden_size;
    let p = PackedWeight::pack_quant(1, d, &vec![1.0; d], q4).unwrap();
    bad.weights[norm.0].data = WeightData::Packed(Arc::new(p));
    let e = bad.verify().unwrap_err().to_string();
    assert!(e.contains("norms need a dense weight"), "{e}");
}
