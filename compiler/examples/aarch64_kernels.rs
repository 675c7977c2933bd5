//! Writes what the aarch64 kernel check (`scripts/aarch64-kernels.sh`) links and runs:
//! an aarch64 ELF object exporting a set of generated kernels, `table.c` naming them for
//! the C harness (`tests/aarch64/harness.c`), and one `<kernel>.bin` per kernel with its
//! inputs and the reference kernels' outputs.
//!
//! Usage: `cargo run -p edgec --example aarch64_kernels -- OUT_DIR [FEATURE ...]`
//! (features are Cranelift aarch64 settings, e.g. `has_dotprod`).
//!
//! `<kernel>.bin`, little-endian: u64 kind (0 matvec, 1 decode), rows, cols, padded cols;
//! then eight blobs, each a u64 byte length and the bytes: codes, scales, mins, xq, xd, xs,
//! expected, tolerance. Matvec expects `y [rows]` (the Rust model of its arithmetic,
//! `matvec_int_reference`); decode expects the weight `[rows, cols]` (`decode_rows`),
//! compared against the first `cols` values of each padded output row.

use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::Context;
use edge_runtime::format::{QuantScheme, QuantSpec, WeightFormat};
use edge_runtime::jit::spec::{KernelKind, KernelSpec};
use edge_runtime::jit::{QuantizedX, matvec_int_reference};
use edge_runtime::packed::PackedWeight;
use edgec::codegen;

fn lcg(seed: u64, len: usize) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        })
        .collect()
}

fn blob(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
    out.extend_from_slice(bytes);
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(
        args.next()
            .context("usage: aarch64_kernels OUT_DIR [FEATURE ...]")?,
    );
    let features: Vec<String> = args.collect();
    let features: Vec<&str> = features.iter().map(String::as_str).collect();
    std::fs::create_dir_all(&dir)?;
    let (rows, cols) = (13usize, 200usize);
    let mut kernels = vec![];
    let mut table = String::from("#include \"harness.h\"\n");
    let mut entries = String::new();
    let mut seed = 1;
    for bits in [2u8, 4, 8] {
        for group in [32u32, 64, 128] {
            for scheme in [QuantScheme::Asym, QuantScheme::Sym] {
                let q = QuantSpec { bits, group, scheme };
                let f = WeightFormat::Quant(q);
                seed += 1;
                let w = PackedWeight::pack_quant(rows, cols, &lcg(seed, rows * cols), q)?;
                let wd = w.to_f32_vec();
                let x = lcg(seed + 1000, cols);
                let b = w.buffers();
                for kind in KernelKind::ALL {
                    let spec = KernelSpec::new(kind, rows, cols, &f)?;
                    let name = spec.name();
                    let mut file = vec![];
                    let tag = match kind {
                        KernelKind::Matvec => 0u64,
                        KernelKind::Decode => 1,
                    };
                    for v in [tag, rows as u64, cols as u64, spec.padded_cols() as u64] {
                        file.extend_from_slice(&v.to_le_bytes());
                    }
                    blob(&mut file, b.qweight.as_ref().unwrap().as_slice());
                    blob(&mut file, b.scales.as_ref().unwrap().as_slice());
                    blob(&mut file, b.mins.as_ref().map_or(&[][..], |m| m.as_slice()));
                    let (expected, tol) = match kind {
                        KernelKind::Matvec => {
                            let qx = QuantizedX::new(&x, &q);
                            blob(&mut file, &qx.xq.iter().map(|&v| v as u8).collect::<Vec<u8>>());
                            blob(&mut file, &f32_bytes(&qx.xd));
                            blob(&mut file, &f32_bytes(&qx.xs));
                            let mut y = vec![0.0; rows];
                            matvec_int_reference(&w, &x, &mut y)?;
                            // Sums in another order: relative to the magnitude of the terms.
                            let tol: Vec<f32> = wd
                                .chunks_exact(cols)
                                .map(|wr| {
                                    2e-5 * wr
                                        .iter()
                                        .zip(&x)
                                        .map(|(a, b)| (a.abs() + 2.0) * b.abs())
                                        .sum::<f32>()
                                })
                                .collect();
                            (y, tol)
                        }
                        KernelKind::Decode => {
                            for _ in 0..3 {
                                blob(&mut file, &[]);
                            }
                            let tol = wd.iter().map(|v| 1e-6 * v.abs() + 1e-30).collect();
                            (wd.clone(), tol)
                        }
                    };
                    blob(&mut file, &f32_bytes(&expected));
                    blob(&mut file, &f32_bytes(&tol));
                    std::fs::write(dir.join(format!("{name}.bin")), file)?;
                    writeln!(table, "extern void {name}(void);")?;
                    writeln!(entries, "    {{\"{name}\", {tag}, (void *){name}}},")?;
                    kernels.push((name, codegen::generate_clif(&spec)));
                }
            }
        }
    }
    writeln!(table, "const struct kernel KERNELS[] = {{\n{entries}}};")?;
    writeln!(table, "const int NKERNELS = {};", kernels.len())?;
    std::fs::write(dir.join("table.c"), table)?;
    let isa = codegen::target_isa("aarch64-unknown-linux-gnu", &features)?;
    std::fs::write(dir.join("kernels.o"), codegen::object_file(isa, &kernels)?)?;
    println!(
        "{} kernels for aarch64 {:?} in {}",
        kernels.len(),
        features,
        dir.display()
    );
    Ok(())
}
