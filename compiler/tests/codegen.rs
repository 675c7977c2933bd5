//! Generated kernels against the plain Rust reference kernels of their formats (property
//! tests over random shapes, formats and values), their ahead-of-time compilation for
//! x86-64 and aarch64, and the instruction selection the matvec kernel relies on.

use std::sync::Arc;

use edge_runtime::format::{QuantScheme, QuantSpec, SparsePattern, ValueFormat, WeightFormat};
use edge_runtime::ir::WeightData;
use edge_runtime::jit::spec::{KernelKind, KernelSpec};
use edge_runtime::jit::{KernelSet, KernelSource, QuantizedX, matvec_int_reference};
use edge_runtime::kernels::{linear, linear_transposed};
use edge_runtime::packed::PackedWeight;
use edgec::codegen;
use proptest::prelude::*;

fn sources(weight: &str, rows: usize, cols: usize, f: &WeightFormat) -> Vec<KernelSource> {
    KernelKind::ALL
        .iter()
        .map(|&kind| {
            let spec = KernelSpec::new(kind, rows, cols, f).unwrap();
            KernelSource {
                weight: weight.into(),
                clif: codegen::generate_clif(&spec),
                spec,
            }
        })
        .collect()
}

/// Deterministic values in `[-amp, amp]` (a splitmix-style hash of the index and seed).
fn values(len: usize, seed: u64, amp: f32) -> Vec<f32> {
    (0..len as u64)
        .map(|i| {
            let mut z = i.wrapping_add(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            ((z >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * amp
        })
        .collect()
}

/// `sum_t |a[i, t]| |b[j, t]|` for `a [m, k]`, `b [n, k]`: the scale of each product's error.
fn abs_products(a: &[f32], b: &[f32], k: usize) -> Vec<f32> {
    let mut o = vec![];
    for ar in a.chunks_exact(k) {
        for br in b.chunks_exact(k) {
            o.push(ar.iter().zip(br).map(|(x, y)| x.abs() * y.abs()).sum());
        }
    }
    o
}

fn close(got: &[f32], want: &[f32], tol: &[f32], what: &str) -> Result<(), TestCaseError> {
    for (i, ((a, b), t)) in got.iter().zip(want).zip(tol).enumerate() {
        prop_assert!((a - b).abs() <= *t, "{what} [{i}]: {a} vs {b} (tolerance {t})");
    }
    Ok(())
}

/// Each group's `min` (symmetric: `-scale * 2^(bits-1)`), read from the packed buffers.
fn group_mins(w: &PackedWeight) -> Vec<f32> {
    let WeightFormat::Quant(q) = *w.format() else {
        unreachable!()
    };
    let half = |b: &[u8]| -> Vec<f32> {
        b.chunks_exact(2)
            .map(|h| half::f16::from_le_bytes([h[0], h[1]]).to_f32())
            .collect()
    };
    match &w.buffers().mins {
        Some(m) => half(m.as_slice()),
        None => half(w.buffers().scales.as_ref().unwrap().as_slice())
            .iter()
            .map(|s| -s * (1u32 << (q.bits - 1)) as f32)
            .collect(),
    }
}

/// `dx = dy W` through the JIT kernels against the reference (`wd`: W decoded).
fn check_transposed(
    kern: &edge_runtime::jit::WeightKernels,
    data: &WeightData,
    wd: &[f32],
    [n, k]: [usize; 2],
    tokens: usize,
    seed: u64,
    what: &str,
) -> Result<(), TestCaseError> {
    let dy = values(tokens * n, seed + 2, 1.0);
    let mut want = vec![0.0; tokens * k];
    linear_transposed(&dy, tokens, data, &mut want);
    let mut got = vec![f32::NAN; tokens * k];
    kern.linear_transposed(&dy, tokens, data, &mut got).unwrap();
    let mut wt = vec![0.0; n * k];
    for j in 0..n {
        for c in 0..k {
            wt[c * n + j] = wd[j * k + c];
        }
    }
    let tol: Vec<f32> = abs_products(&dy, &wt, n)
        .iter()
        .map(|s| 1e-5 * s + 1e-30)
        .collect();
    close(&got, &want, &tol, what)
}

fn spec_strategy() -> impl Strategy<Value = QuantSpec> {
    (
        prop::sample::select(vec![2u8, 3, 4, 8]),
        prop::sample::select(vec![32u32, 64, 128]),
        prop::bool::ANY,
    )
        .prop_map(|(bits, group, sym)| QuantSpec {
            bits,
            group,
            scheme: if sym { QuantScheme::Sym } else { QuantScheme::Asym },
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]

    /// Every kernel of a random quantized weight: the matvec (1-3 token rows) equals the
    /// Rust model of its integer arithmetic and the f32 reference within the error of
    /// quantizing x to int8; matmul and the transposed product equal the reference.
    #[test]
    fn jit_kernels_match_the_reference(
        q in spec_strategy(),
        n in 1usize..48,
        k in 1usize..300,
        tokens in prop::sample::select(vec![1usize, 2, 3, 4, 7]),
        seed in 0u64..1000,
        amp in prop::sample::select(vec![1e-3f32, 1.0, 40.0]),
    ) {
        let w = PackedWeight::pack_quant(n, k, &values(n * k, seed, amp), q).unwrap();
        let wd = w.to_f32_vec();
        let data = WeightData::Packed(Arc::new(w.clone()));
        let set = KernelSet::compile(&sources("w", n, k, &WeightFormat::Quant(q))).unwrap();
        let kern = set.get("w").unwrap();
        let x = values(tokens * k, seed + 1, 1.0);
        let scale = abs_products(&x, &wd, k);

        let mut want = vec![0.0; tokens * n];
        linear(&x, tokens, &data, &mut want);
        let mut got = vec![f32::NAN; tokens * n];
        kern.linear(&x, tokens, &data, &mut got).unwrap();
        if tokens <= 3 {
            for (t, xr) in x.chunks_exact(k).enumerate() {
                let mut int_ref = vec![0.0; n];
                matvec_int_reference(&w, xr, &mut int_ref).unwrap();
                let g = &got[t * n..(t + 1) * n];
                let tight: Vec<f32> = scale[t * n..(t + 1) * n].iter().map(|s| 2e-5 * s + 1e-30).collect();
                close(g, &int_ref, &tight, &format!("{q} matvec vs its integer model"))?;
                // Quantizing x moves each x by at most d/2 (d = the group's int8 step), and
                // the kernel multiplies that by `scale * code = w - min`.
                let qx = QuantizedX::new(xr, &q);
                let mins = group_mins(&w);
                let groups = k.div_ceil(q.group as usize);
                let loose: Vec<f32> = wd
                    .chunks_exact(k)
                    .enumerate()
                    .map(|(r, wr)| {
                        wr.chunks(q.group as usize)
                            .zip(&qx.xd)
                            .enumerate()
                            .map(|(g, (wg, d))| {
                                let m = mins[r * groups + g];
                                wg.iter().map(|v| (v - m).abs()).sum::<f32>() * d * 0.51
                            })
                            .sum::<f32>()
                    })
                    .zip(&scale[t * n..(t + 1) * n])
                    .map(|(b, s)| b + 2e-5 * s + 1e-30)
                    .collect();
                close(g, &want[t * n..(t + 1) * n], &loose, &format!("{q} matvec vs f32 reference"))?;
            }
        } else {
            let tol: Vec<f32> = scale.iter().map(|s| 1e-5 * s + 1e-30).collect();
            close(&got, &want, &tol, &format!("{q} matmul"))?;
        }

        // dx = dy W: the reference with W^T as the weight.
        check_transposed(kern, &data, &wd, [n, k], tokens, seed, &format!("{q} transposed"))?;
    }
}

/// Every pattern with generated kernels: unstructured and `n:4`, `n:8` for every `n`.
fn patterns() -> Vec<SparsePattern> {
    let nofm = |m: u8| (1..=m).map(move |n| SparsePattern::NofM { n, m });
    std::iter::once(SparsePattern::Unstructured)
        .chain(nofm(4))
        .chain(nofm(8))
        .collect()
}

/// The keep mask of a `[n, k]` weight: N:M keeps the `n` largest magnitudes of each block;
/// unstructured keeps a pseudo-random `density` of the values (whole rows may be empty or
/// full).
fn keep_mask(pattern: SparsePattern, w: &[f32], k: usize, seed: u64, density: f32) -> Vec<bool> {
    match pattern {
        SparsePattern::Unstructured => values(w.len(), seed + 7, 1.0)
            .iter()
            .enumerate()
            .map(|(i, h)| match density {
                d if d >= 1.0 => true,
                d if d <= 0.0 => false,
                // Some rows keep nothing, some everything.
                d => match (i / k) % 7 {
                    3 => false,
                    5 => true,
                    _ => (h + 1.0) / 2.0 < d,
                },
            })
            .collect(),
        SparsePattern::NofM { n, m } => {
            let (n, m) = (n as usize, m as usize);
            let mut keep = vec![false; w.len()];
            for (b, block) in w.chunks_exact(m).enumerate() {
                let mut idx: Vec<usize> = (0..m).collect();
                idx.sort_by(|&a, &c| block[c].abs().total_cmp(&block[a].abs()).then(a.cmp(&c)));
                for &i in &idx[..n] {
                    keep[b * m + i] = true;
                }
            }
            keep
        }
    }
}

fn value_format_strategy() -> impl Strategy<Value = ValueFormat> {
    prop_oneof![
        Just(ValueFormat::F16),
        spec_strategy().prop_map(ValueFormat::Quant),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Every kernel of a random sparse weight (unstructured, 2:4, 4:8; f16 or quantized
    /// kept values): the matvec (f32, 1-3 token rows), matmul and the transposed product
    /// equal the reference kernels up to float order.
    #[test]
    fn sparse_jit_kernels_match_the_reference(
        pattern in prop::sample::select(patterns()),
        v in value_format_strategy(),
        n in 1usize..40,
        blocks in 1usize..40,
        extra in 0usize..8,
        density in prop::sample::select(vec![0.0f32, 0.1, 0.5, 0.9, 1.0]),
        tokens in prop::sample::select(vec![1usize, 2, 3, 4, 7]),
        seed in 0u64..1000,
        amp in prop::sample::select(vec![1e-3f32, 1.0, 40.0]),
    ) {
        let k = match pattern {
            SparsePattern::NofM { m, .. } => blocks * m as usize,
            SparsePattern::Unstructured => blocks * 7 + extra,
        };
        let vals = values(n * k, seed, amp);
        let mask = keep_mask(pattern, &vals, k, seed, density);
        let w = PackedWeight::pack_sparse(n, k, &vals, &mask, pattern, v).unwrap();
        let f = w.format().clone();
        let wd = w.to_f32_vec();
        let data = WeightData::Packed(Arc::new(w));
        let set = KernelSet::compile(&sources("w", n, k, &f)).unwrap();
        let kern = set.get("w").unwrap();
        let x = values(tokens * k, seed + 1, 1.0);
        let mut want = vec![0.0; tokens * n];
        linear(&x, tokens, &data, &mut want);
        let mut got = vec![f32::NAN; tokens * n];
        kern.linear(&x, tokens, &data, &mut got).unwrap();
        let tol: Vec<f32> = abs_products(&x, &wd, k).iter().map(|s| 1e-5 * s + 1e-30).collect();
        close(&got, &want, &tol, &format!("{f} linear, {tokens} rows"))?;

        check_transposed(kern, &data, &wd, [n, k], tokens, seed, &format!("{f} transposed"))?;
    }
}

fn every_spec(rows: usize, cols: usize) -> Vec<KernelSpec> {
    let mut out = vec![];
    let mut values = vec![ValueFormat::F16];
    for bits in [2, 3, 4, 8] {
        for group in [32, 64, 128] {
            for scheme in [QuantScheme::Asym, QuantScheme::Sym] {
                values.push(ValueFormat::Quant(QuantSpec { bits, group, scheme }));
            }
        }
    }
    for v in values {
        let mut formats: Vec<WeightFormat> = patterns()
            .into_iter()
            .map(|pattern| WeightFormat::Sparse { pattern, values: v })
            .collect();
        if let ValueFormat::Quant(q) = v {
            formats.push(WeightFormat::Quant(q));
        }
        for f in formats {
            for kind in KernelKind::ALL {
                out.push(KernelSpec::new(kind, rows, cols, &f).unwrap());
            }
        }
    }
    out
}

#[test]
fn every_kernel_compiles_for_x86_64_and_aarch64_from_its_clif_text() {
    let isas = [
        codegen::target_isa("x86_64-unknown-linux-gnu", &["has_sse41", "has_avx", "has_avx2"]).unwrap(),
        codegen::target_isa("x86_64-unknown-linux-gnu", &[]).unwrap(),
        codegen::target_isa("aarch64-unknown-linux-gnu", &[]).unwrap(),
        codegen::target_isa("aarch64-unknown-linux-gnu", &["has_dotprod"]).unwrap(),
    ];
    for spec in every_spec(7, 104) {
        let clif = codegen::generate_clif(&spec);
        // The text is what ships: it parses back to the same function.
        let parsed = codegen::parse_clif(&clif).unwrap();
        assert_eq!(parsed.display().to_string(), clif, "{spec}");
        for isa in &isas {
            let code = codegen::compile_for_isa(&clif, isa.as_ref()).unwrap();
            assert!(!code.is_empty(), "{spec} for {}", isa.triple());
        }
    }
}

#[test]
fn bad_isas_and_clif_are_refused() {
    assert!(codegen::target_isa("mips-unknown-linux-gnu", &[]).is_err());
    assert!(codegen::target_isa("x86_64-unknown-linux-gnu", &["has_warp_drive"]).is_err());
    let isa = codegen::target_isa("aarch64-unknown-linux-gnu", &[]).unwrap();
    assert!(codegen::compile_for_isa("function %f( {", isa.as_ref()).is_err());
    assert!(codegen::compile_for_isa("", isa.as_ref()).is_err());
    // The runtime refuses a function whose signature is not its kind's.
    let spec = every_spec(4, 64).remove(0);
    let other = KernelSpec {
        kind: KernelKind::Decode,
        ..spec.clone()
    };
    let err = KernelSet::compile(&[KernelSource {
        weight: "w".into(),
        spec: other,
        clif: codegen::generate_clif(&spec),
    }])
    .unwrap_err();
    assert!(err.to_string().contains("signature"), "{err}");
    let err = KernelSet::compile(&[KernelSource {
        weight: "w".into(),
        spec,
        clif: "function %f() {".into(),
    }])
    .unwrap_err();
    assert!(err.to_string().contains("JIT"), "{err}");
}

/// Whether `code` holds an EVEX-encoded `vpdpbusd` (62 P0 P1 P2 50 /r, map 0F38, prefix 66).
fn has_evex_vpdpbusd(code: &[u8]) -> bool {
    code.windows(6)
        .any(|w| w[0] == 0x62 && w[1] & 0x07 == 0x02 && w[2] & 0x07 == 0x05 && w[4] == 0x50)
}

#[test]
fn matvec_uses_the_vnni_dot_product_where_the_isa_has_it() {
    let vnni = codegen::target_isa("x86_64-unknown-linux-gnu", &["icelake-server"]).unwrap();
    let plain = codegen::target_isa("x86_64-unknown-linux-gnu", &["has_avx2"]).unwrap();
    for spec in every_spec(64, 512)
        .into_iter()
        .filter(|s| s.kind == KernelKind::Matvec && s.pattern().is_none())
    {
        let fast = codegen::compile_spec_for_isa(&spec, vnni.as_ref()).unwrap();
        assert!(has_evex_vpdpbusd(&fast), "{spec}: no vpdpbusd with AVX-512 VNNI");
        let slow = codegen::compile_spec_for_isa(&spec, plain.as_ref()).unwrap();
        assert!(!has_evex_vpdpbusd(&slow), "{spec}: vpdpbusd without VNNI");
    }
}

/// The tiny-llama fixture with every linear packed (4-bit g32 asym, 8-bit g64 sym, 3-bit
/// g128 sym, and sparse: unstructured f16, 2:4 with 4-bit values, 4:8 with 3-bit values):
/// the executor with JIT kernels gives the reference executor's logits, exactly up to
/// float order for prefill (decode + GEMM) and sparse decoding (f32 matvec), within the
/// int8 rounding of x for quantized decoding (integer matvec).
#[test]
fn executor_with_jit_kernels_matches_the_reference_executor() {
    use edge_runtime::ir::Op;
    use edge_runtime::{Executor, Rows};
    let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny-llama");
    let model = edgec::frontend::load(&fixture, &edgec::frontend::LoadOptions::default()).unwrap();
    let tokens = [1u32, 5, 9, 200, 17, 3, 42];
    let q = |bits, group, scheme| QuantSpec { bits, group, scheme };
    let sparse = |pattern, values| WeightFormat::Sparse { pattern, values };
    for f in [
        WeightFormat::Quant(q(4, 32, QuantScheme::Asym)),
        WeightFormat::Quant(q(8, 64, QuantScheme::Sym)),
        WeightFormat::Quant(q(3, 128, QuantScheme::Sym)),
        sparse(SparsePattern::Unstructured, ValueFormat::F16),
        sparse(
            SparsePattern::NofM { n: 2, m: 4 },
            ValueFormat::Quant(q(4, 32, QuantScheme::Asym)),
        ),
        sparse(
            SparsePattern::NofM { n: 4, m: 8 },
            ValueFormat::Quant(q(3, 64, QuantScheme::Asym)),
        ),
    ] {
        let mut g = model.graph.clone();
        let mut linears = std::collections::BTreeSet::new();
        for n in &g.nodes {
            if let Op::Linear { weight } = n.op {
                linears.insert(weight.0);
            }
        }
        for &id in &linears {
            let w = &g.weights[id];
            let (r, c) = (w.data.shape()[0], w.data.shape()[1]);
            let v = w.data.to_f32_vec();
            let p = match &f {
                WeightFormat::Quant(q) => PackedWeight::pack_quant(r, c, &v, *q),
                WeightFormat::Sparse { pattern, values } => {
                    let mask = keep_mask(*pattern, &v, c, id as u64, 0.5);
                    PackedWeight::pack_sparse(r, c, &v, &mask, *pattern, *values)
                }
                WeightFormat::Dense { .. } => unreachable!(),
            };
            g.weights[id].data = WeightData::Packed(Arc::new(p.unwrap()));
        }
        let (sources, skipped) = codegen::kernel_sources(&g);
        assert!(skipped.is_empty(), "{f}: {skipped:?}");
        assert_eq!(sources.len(), 2 * linears.len(), "{f}");
        let g = Arc::new(g);
        let reference = Executor::new(g.clone()).unwrap();
        let jit = codegen::executor(g, codegen::KernelMode::Jit).unwrap();
        let run = |e: &Executor| {
            let mut s = e.session(16);
            let prefill = e.forward(&mut s, &tokens, Rows::All, &[]).unwrap().logits;
            let mut s = e.session(16);
            let steps: Vec<f32> = tokens
                .iter()
                .flat_map(|&t| e.forward(&mut s, &[t], Rows::Last, &[]).unwrap().logits)
                .collect();
            (prefill, steps)
        };
        let (pa, sa) = run(&reference);
        let (pb, sb) = run(&jit);
        let scale = pa.iter().fold(1.0f32, |m, v| m.max(v.abs()));
        let diff = |a: &[f32], b: &[f32]| a.iter().zip(b).fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(
            diff(&pa, &pb) <= 1e-4 * scale,
            "{f} prefill: {} (scale {scale})",
            diff(&pa, &pb)
        );
        let d = diff(&sa, &sb);
        let tol = match f {
            WeightFormat::Quant(_) => 5e-2 * scale,
            _ => 1e-4 * scale,
        };
        assert!(d <= tol, "{f} decode: {d} (scale {scale})");
    }
}
