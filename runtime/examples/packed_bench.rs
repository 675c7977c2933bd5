//! Times `kernels::linear` on a 1536 x 576 weight (SmolLM2's MLP up projection) in dense
//! and packed formats, for one row (matvec) and 256 rows (GEMM tiles).

use std::sync::Arc;
use std::time::Instant;

use edge_runtime::format::{QuantScheme, QuantSpec, SparsePattern, ValueFormat};
use edge_runtime::ir::WeightData;
use edge_runtime::kernels::linear;
use edge_runtime::packed::PackedWeight;
use edge_runtime::{DType, Tensor};

fn main() {
    let (n, k) = (1536, 576);
    let w: Vec<f32> = (0..n * k)
        .map(|i| ((i * 7919 % 2001) as f32 / 1000.0) - 1.0)
        .collect();
    let q4 = QuantSpec {
        bits: 4,
        group: 32,
        scheme: QuantScheme::Asym,
    };
    let q3 = QuantSpec {
        bits: 3,
        group: 128,
        scheme: QuantScheme::Sym,
    };
    let mask: Vec<bool> = (0..n * k).map(|i| (i % 4) < 2).collect();
    let dense = Tensor::from_f32(vec![n, k], w.clone()).unwrap();
    let nm = SparsePattern::NofM { n: 2, m: 4 };
    let packed = |p: PackedWeight| WeightData::Packed(Arc::new(p));
    let ws: Vec<(&str, WeightData)> = vec![
        ("f32", WeightData::Dense(dense.clone())),
        ("f16", WeightData::Dense(dense.convert(DType::F16).unwrap())),
        ("q4g32a", packed(PackedWeight::pack_quant(n, k, &w, q4).unwrap())),
        ("q3g128s", packed(PackedWeight::pack_quant(n, k, &w, q3).unwrap())),
        (
            "2:4+q4",
            packed(PackedWeight::pack_sparse(n, k, &w, &mask, nm, ValueFormat::Quant(q4)).unwrap()),
        ),
    ];
    for rows in [1usize, 256] {
        let x: Vec<f32> = (0..rows * k).map(|i| (i % 13) as f32 / 13.0).collect();
        let mut out = vec![0.0; rows * n];
        for (name, wd) in &ws {
            linear(&x, rows, wd, &mut out);
            let reps = if rows == 1 { 200 } else { 10 };
            let t = Instant::now();
            for _ in 0..reps {
                linear(&x, rows, wd, &mut out);
            }
            let dt = t.elapsed().as_secs_f64() / reps as f64;
            let gflops = 2.0 * (rows * n * k) as f64 / dt / 1e9;
            println!("rows {rows:4} {name:8} {:9.1} us {gflops:7.2} GFLOP/s", dt * 1e6);
        }
    }
}
