//! Weight bytes streamed per second by the JIT matvec kernel versus the reference kernel,
//! one thread, on SmolLM2-135M's linear shapes (4-bit, group 32, asymmetric by default),
//! and the time of a 16-row product (decode + GEMM versus the reference).
//!
//! Usage: `cargo run --release -p edgec --example kernel_bench -- [BITS|f16] [GROUP] [PATTERN]`
//! with `PATTERN` one of `dense` (default), `unstructured` (half the values kept), `2:4`,
//! `4:8`; `f16` values need a pattern.

use std::sync::Arc;
use std::time::Instant;

use edge_runtime::format::{QuantScheme, QuantSpec, SparsePattern, ValueFormat, WeightFormat};
use edge_runtime::ir::WeightData;
use edge_runtime::jit::KernelSet;
use edge_runtime::kernels::linear;
use edge_runtime::packed::PackedWeight;
use edgec::codegen;

/// Packs `vals` in `format` (N:M keeps the largest magnitudes, unstructured every value
/// whose hash is even).
fn pack(n: usize, k: usize, vals: &[f32], format: &WeightFormat) -> anyhow::Result<PackedWeight> {
    Ok(match format {
        WeightFormat::Quant(q) => PackedWeight::pack_quant(n, k, vals, *q)?,
        WeightFormat::Sparse { pattern, values } => {
            let mask: Vec<bool> = match *pattern {
                SparsePattern::Unstructured => (0..n * k).map(|i| (i * 2654435761) >> 7 & 1 == 0).collect(),
                SparsePattern::NofM { n: keep, m } => vals
                    .chunks_exact(m as usize)
                    .flat_map(|b| {
                        let mut idx: Vec<usize> = (0..b.len()).collect();
                        idx.sort_by(|&x, &y| b[y].abs().total_cmp(&b[x].abs()));
                        let mut keep_b = vec![false; b.len()];
                        for &i in &idx[..keep as usize] {
                            keep_b[i] = true;
                        }
                        keep_b
                    })
                    .collect(),
            };
            PackedWeight::pack_sparse(n, k, vals, &mask, *pattern, *values)?
        }
        WeightFormat::Dense { .. } => anyhow::bail!("dense weights have no generated kernels"),
    })
}

fn main() -> anyhow::Result<()> {
    let a: Vec<String> = std::env::args().collect();
    let values = a.get(1).map_or("4", String::as_str);
    let bits: u8 = if values == "f16" { 4 } else { values.parse()? };
    let group: u32 = a.get(2).map_or(Ok(32), |s| s.parse())?;
    let pattern = match a.get(3).map_or("dense", String::as_str) {
        "dense" => None,
        "unstructured" => Some(SparsePattern::Unstructured),
        p => {
            let (n, m) = p
                .split_once(':')
                .ok_or_else(|| anyhow::anyhow!("pattern `{p}`: dense, unstructured or N:M"))?;
            Some(SparsePattern::NofM {
                n: n.parse()?,
                m: m.parse()?,
            })
        }
    };
    if let Ok(path) = std::env::var("KERNEL_OBJECT") {
        // Writes the host object of the 576 x 576 matvec kernel for objdump.
        use edge_runtime::jit::spec::{KernelKind, KernelSpec};
        let spec = KernelSpec::new(
            KernelKind::Matvec,
            576,
            576,
            &WeightFormat::Quant(QuantSpec {
                bits,
                group,
                scheme: QuantScheme::Asym,
            }),
        )?;
        let obj = codegen::object_file(
            codegen::target_isa("host", &[])?,
            &[(spec.name(), codegen::generate_clif(&spec))],
        )?;
        std::fs::write(path, obj)?;
        return Ok(());
    }
    rayon::ThreadPoolBuilder::new().num_threads(1).build_global()?;
    let q = QuantSpec {
        bits,
        group,
        scheme: QuantScheme::Asym,
    };
    let format = match (pattern, values) {
        (None, "f16") => anyhow::bail!("f16 values need a sparsity pattern"),
        (None, _) => WeightFormat::Quant(q),
        (Some(pattern), v) => WeightFormat::Sparse {
            pattern,
            values: if v == "f16" {
                ValueFormat::F16
            } else {
                ValueFormat::Quant(q)
            },
        },
    };
    for (n, k) in [(576, 576), (1536, 576), (576, 1536), (49152, 576)] {
        let vals: Vec<f32> = (0..n * k)
            .map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 500.0)
            .collect();
        let p = pack(n, k, &vals, &format)?;
        let bytes = p.storage_bytes() as f64;
        let w = WeightData::Packed(Arc::new(p));
        let x: Vec<f32> = (0..k).map(|i| (i as f32 * 0.37).sin()).collect();
        let mut y = vec![0.0; n];
        let WeightData::Packed(p) = &w else { unreachable!() };
        let set = KernelSet::compile(&codegen::weight_sources("w", p).map_err(anyhow::Error::msg)?)?;
        let kern = set.get("w").unwrap();
        let reps = (2e8 / bytes).max(3.0) as usize;
        let t = Instant::now();
        for _ in 0..reps {
            kern.linear(&x, 1, &w, &mut y)?;
        }
        let jit = bytes * reps as f64 / t.elapsed().as_secs_f64() / 1e9;
        let t = Instant::now();
        for _ in 0..reps.div_ceil(4) {
            linear(&x, 1, &w, &mut y);
        }
        let reference = bytes * reps.div_ceil(4) as f64 / t.elapsed().as_secs_f64() / 1e9;
        // 16 token rows: decode + GEMM against the reference.
        let x16: Vec<f32> = (0..16 * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let mut y16 = vec![0.0; 16 * n];
        let reps16 = reps.div_ceil(16);
        let t = Instant::now();
        for _ in 0..reps16 {
            kern.linear(&x16, 16, &w, &mut y16)?;
        }
        let jit16 = t.elapsed().as_secs_f64() / reps16 as f64 * 1e3;
        let t = Instant::now();
        for _ in 0..reps16 {
            linear(&x16, 16, &w, &mut y16);
        }
        let ref16 = t.elapsed().as_secs_f64() / reps16 as f64 * 1e3;
        println!(
            "{n:>6} x {k:<5} {format}: matvec jit {jit:5.1} GB/s, reference {reference:5.1} GB/s; \
             16 rows jit {jit16:7.2} ms, reference {ref16:7.2} ms"
        );
    }
    Ok(())
}
