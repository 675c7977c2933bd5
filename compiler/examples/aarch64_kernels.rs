//! Writes what the aarch64 kernel check (`scripts/aarch64-kernels.sh`) links and runs:
//! an aarch64 ELF object exporting a set of generated kernels, `table.c` naming them for
//! the C harness (`tests/aarch64/harness.c`), and one `<kernel>.bin` per kernel with its
//! inputs and the reference kernels' outputs.
//!
//! Usage: `cargo run -p edgec --example aarch64_kernels -- OUT_DIR [FEATURE ...]`
//! (features are Cranelift aarch64 settings, e.g. `has_dotprod`).
//!
//! `<kernel>.bin`, little-endian: u64 kind (0 matvec, 1 decode, 2 sparse matvec, 3 sparse
//! decode), rows, cols, padded cols (the decode output's row stride); then eleven blobs,
//! each a u64 byte length and the bytes: codes (sparse: `qweight` or f16 `values`),
//! scales, mins, xq (sparse: x as f32, zero-padded to whole eight-column steps), xd, xs,
//! expected, tolerance, positions (`mask` or `index`), kept-value and group prefix sums
//! (u64, `rows + 1` each). Matvec expects `y [rows]` (quantized: the Rust model of its
//! arithmetic, `matvec_int_reference`; sparse: the reference `kernels::linear`); decode
//! expects the weight `[rows, cols]` (`decode_rows`), compared against the first `cols`
//! values of each output row.

use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::Context;
use edge_runtime::format::{QuantScheme, QuantSpec, SparsePattern, ValueFormat, WeightFormat};
use edge_runtime::ir::WeightData;
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

fn bytes(o: Option<&edge_runtime::packed::Buf>) -> &[u8] {
    o.map_or(&[][..], |b| b.as_slice())
}

fn u64_bytes(v: &[usize]) -> Vec<u8> {
    v.iter().flat_map(|&x| (x as u64).to_le_bytes()).collect()
}

/// A keep mask for `pattern`: N:M keeps the largest magnitudes of each block;
/// unstructured about 40% of the values, with row 2 empty and row 3 full.
fn keep_mask(pattern: SparsePattern, w: &[f32], cols: usize, seed: u64) -> Vec<bool> {
    match pattern {
        SparsePattern::Unstructured => lcg(seed, w.len())
            .iter()
            .enumerate()
            .map(|(i, h)| match i / cols {
                2 => false,
                3 => true,
                _ => *h < -0.2,
            })
            .collect(),
        SparsePattern::NofM { n, m } => {
            let mut keep = vec![false; w.len()];
            for (b, block) in w.chunks_exact(m as usize).enumerate() {
                let mut idx: Vec<usize> = (0..m as usize).collect();
                idx.sort_by(|&a, &c| block[c].abs().total_cmp(&block[a].abs()).then(a.cmp(&c)));
                for &i in &idx[..n as usize] {
                    keep[b * m as usize + i] = true;
                }
            }
            keep
        }
    }
}

/// Every format with generated kernels: quantized at every bit-width, group and scheme,
/// and each sparse pattern with f16 values and with each of those quantizations.
fn formats() -> Vec<WeightFormat> {
    let mut quants = vec![];
    for bits in [2u8, 3, 4, 8] {
        for group in [32u32, 64, 128] {
            for scheme in [QuantScheme::Asym, QuantScheme::Sym] {
                quants.push(QuantSpec { bits, group, scheme });
            }
        }
    }
    let mut out: Vec<WeightFormat> = quants.iter().map(|&q| WeightFormat::Quant(q)).collect();
    for pattern in [
        SparsePattern::Unstructured,
        SparsePattern::NofM { n: 2, m: 4 },
        SparsePattern::NofM { n: 4, m: 8 },
    ] {
        let values = std::iter::once(ValueFormat::F16).chain(quants.iter().map(|&q| ValueFormat::Quant(q)));
        out.extend(values.map(|values| WeightFormat::Sparse { pattern, values }));
    }
    // Other N:M patterns go through the general index reader: f16 and 4-bit values.
    for (n, m) in [(1, 4), (3, 4), (3, 8), (7, 8)] {
        let q4 = QuantSpec {
            bits: 4,
            group: 32,
            scheme: QuantScheme::Asym,
        };
        for values in [ValueFormat::F16, ValueFormat::Quant(q4)] {
            out.push(WeightFormat::Sparse {
                pattern: SparsePattern::NofM { n, m },
                values,
            });
        }
    }
    out
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
    let rows = 13usize;
    let mut kernels = vec![];
    let mut table = String::from("#include \"harness.h\"\n");
    let mut entries = String::new();
    for (seed, f) in formats().into_iter().enumerate() {
        let seed = seed as u64 + 2;
        // Unstructured rows end in a partial eight-column step, 2:4 rows in half a step.
        let cols = match &f {
            WeightFormat::Sparse {
                pattern: SparsePattern::Unstructured,
                ..
            } => 203,
            WeightFormat::Sparse {
                pattern: SparsePattern::NofM { m: 4, .. },
                ..
            } => 204,
            _ => 200,
        };
        let v = lcg(seed, rows * cols);
        let w = match &f {
            WeightFormat::Quant(q) => PackedWeight::pack_quant(rows, cols, &v, *q)?,
            WeightFormat::Sparse { pattern, values } => {
                let mask = keep_mask(*pattern, &v, cols, seed + 500);
                PackedWeight::pack_sparse(rows, cols, &v, &mask, *pattern, *values)?
            }
            WeightFormat::Dense { .. } => unreachable!("no kernels for dense weights"),
        };
        let wd = w.to_f32_vec();
        let x = lcg(seed + 1000, cols);
        let b = w.buffers();
        let sparse = matches!(f, WeightFormat::Sparse { .. });
        for kind in KernelKind::ALL {
            let spec = KernelSpec::new(kind, rows, cols, &f)?;
            let name = spec.name();
            let mut file = vec![];
            let tag = match kind {
                KernelKind::Matvec => 0u64,
                KernelKind::Decode => 1,
            } + if sparse { 2 } else { 0 };
            for v in [tag, rows as u64, cols as u64, spec.padded_cols() as u64] {
                file.extend_from_slice(&v.to_le_bytes());
            }
            blob(&mut file, bytes(b.qweight.as_ref().or(b.values.as_ref())));
            blob(&mut file, bytes(b.scales.as_ref()));
            blob(&mut file, bytes(b.mins.as_ref()));
            // Sums in another order: relative to the magnitude of the terms.
            let sum_tol = |slack: f32| -> Vec<f32> {
                wd.chunks_exact(cols)
                    .map(|wr| {
                        2e-5 * wr
                            .iter()
                            .zip(&x)
                            .map(|(a, b)| (a.abs() + slack) * b.abs())
                            .sum::<f32>()
                            + 1e-30
                    })
                    .collect()
            };
            let (expected, tol) = match (kind, &f) {
                (KernelKind::Matvec, WeightFormat::Quant(q)) => {
                    let qx = QuantizedX::new(&x, q);
                    blob(&mut file, &qx.xq.iter().map(|&v| v as u8).collect::<Vec<u8>>());
                    blob(&mut file, &f32_bytes(&qx.xd));
                    blob(&mut file, &f32_bytes(&qx.xs));
                    let mut y = vec![0.0; rows];
                    matvec_int_reference(&w, &x, &mut y)?;
                    (y, sum_tol(2.0))
                }
                (KernelKind::Matvec, _) => {
                    let mut xp = x.clone();
                    xp.resize(cols.next_multiple_of(8), 0.0);
                    blob(&mut file, &f32_bytes(&xp));
                    blob(&mut file, &[]);
                    blob(&mut file, &[]);
                    let mut y = vec![0.0; rows];
                    let data = WeightData::Packed(std::sync::Arc::new(w.clone()));
                    edge_runtime::kernels::linear(&x, 1, &data, &mut y);
                    (y, sum_tol(0.0))
                }
                (KernelKind::Decode, _) => {
                    for _ in 0..3 {
                        blob(&mut file, &[]);
                    }
                    let tol = wd.iter().map(|v| 1e-6 * v.abs() + 1e-30).collect();
                    (wd.clone(), tol)
                }
            };
            blob(&mut file, &f32_bytes(&expected));
            blob(&mut file, &f32_bytes(&tol));
            blob(&mut file, bytes(b.mask.as_ref().or(b.index.as_ref())));
            let (ks, gs) = if sparse {
                (u64_bytes(w.kept_starts()), u64_bytes(w.group_starts()))
            } else {
                (vec![], vec![])
            };
            blob(&mut file, &ks);
            blob(&mut file, &gs);
            std::fs::write(dir.join(format!("{name}.bin")), file)?;
            writeln!(table, "extern void {name}(void);")?;
            writeln!(entries, "    {{\"{name}\", {tag}, (void *){name}}},")?;
            kernels.push((name, codegen::generate_clif(&spec)));
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
