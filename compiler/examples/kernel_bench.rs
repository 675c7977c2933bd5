//! Weight bytes streamed per second by the JIT matvec kernel versus the reference kernel,
//! one thread, on SmolLM2-135M's linear shapes (4-bit, group 32, asymmetric by default).
//!
//! Usage: `cargo run --release -p edgec --example kernel_bench -- [BITS] [GROUP]`

use std::sync::Arc;
use std::time::Instant;

use edge_runtime::format::{QuantScheme, QuantSpec, WeightFormat};
use edge_runtime::ir::WeightData;
use edge_runtime::jit::KernelSet;
use edge_runtime::kernels::linear;
use edge_runtime::packed::PackedWeight;
use edgec::codegen;

fn main() -> anyhow::Result<()> {
    let a: Vec<String> = std::env::args().collect();
    let bits: u8 = a.get(1).map_or(Ok(4), |s| s.parse())?;
    let group: u32 = a.get(2).map_or(Ok(32), |s| s.parse())?;
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
    for (n, k) in [(576, 576), (1536, 576), (576, 1536), (49152, 576)] {
        let vals: Vec<f32> = (0..n * k)
            .map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 500.0)
            .collect();
        let p = PackedWeight::pack_quant(n, k, &vals, q)?;
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
        println!(
            "{n:>6} x {k:<5} {}: jit {jit:5.1} GB/s, reference {reference:5.1} GB/s",
            WeightFormat::Quant(q)
        );
    }
    Ok(())
}
