//! Times `kernels::linear` (forward, `x W^T`) and `kernels::linear_transposed` (backward,
//! `dy W`) over 256 token rows on SmolLM2-135M's projection shapes, f32 and 4-bit
//! (group 32, asymmetric), best of 20 runs each, and sums one decoder layer's seven.
//!
//!   cargo run --release -p edge-runtime --example linear_shapes

use std::sync::Arc;
use std::time::Instant;

use edge_runtime::Tensor;
use edge_runtime::format::{QuantScheme, QuantSpec};
use edge_runtime::ir::WeightData;
use edge_runtime::kernels::{linear, linear_transposed};
use edge_runtime::packed::PackedWeight;

fn best_of(runs: usize, mut f: impl FnMut()) -> f64 {
    (0..runs)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::MAX, f64::min)
}

fn main() {
    let rows = 256;
    let q4 = QuantSpec {
        bits: 4,
        group: 32,
        scheme: QuantScheme::Asym,
    };
    // (out, in, projections of that shape in a layer): q and o; k and v; gate and up; down.
    let shapes = [
        (576usize, 576usize, 2usize),
        (192, 576, 2),
        (1536, 576, 2),
        (576, 1536, 1),
    ];
    let mut layer = [[0.0f64; 2]; 2];
    for &(n, k, count) in &shapes {
        let w: Vec<f32> = (0..n * k)
            .map(|i| ((i * 7919 % 2001) as f32 / 1000.0) - 1.0)
            .collect();
        let x: Vec<f32> = (0..rows * k)
            .map(|i| ((i * 13 % 101) as f32 / 50.0) - 1.0)
            .collect();
        let dy: Vec<f32> = (0..rows * n)
            .map(|i| ((i * 17 % 103) as f32 / 50.0) - 1.0)
            .collect();
        let (mut out, mut dx) = (vec![0.0f32; rows * n], vec![0.0f32; rows * k]);
        let weights = [
            (
                "f32",
                WeightData::Dense(Tensor::from_f32(vec![n, k], w.clone()).unwrap()),
            ),
            (
                "q4g32a",
                WeightData::Packed(Arc::new(PackedWeight::pack_quant(n, k, &w, q4).unwrap())),
            ),
        ];
        for (i, (name, wd)) in weights.iter().enumerate() {
            let fwd = best_of(20, || linear(&x, rows, wd, &mut out));
            let bwd = best_of(20, || linear_transposed(&dy, rows, wd, &mut dx));
            layer[i][0] += fwd * count as f64;
            layer[i][1] += bwd * count as f64;
            let gflop = 2.0 * (rows * n * k) as f64 / 1e9;
            println!(
                "[{n}, {k}] {name:7} forward {:7.1} us {:4.0} GFLOP/s   backward {:7.1} us {:4.0} GFLOP/s",
                fwd * 1e6,
                gflop / fwd,
                bwd * 1e6,
                gflop / bwd
            );
        }
    }
    for (i, name) in ["f32", "q4g32a"].iter().enumerate() {
        println!(
            "one layer's 7 projections, {name}: forward {:.2} ms, backward {:.2} ms",
            layer[i][0] * 1e3,
            layer[i][1] * 1e3
        );
    }
}
