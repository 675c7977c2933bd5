//! Dequantization of every supported GGUF tensor type against gguf-py's reference
//! dequantizers, on real SmolLM2 tensors quantized by llama.cpp's `llama-quantize`.
//!
//! tests/data/gguf/quants.gguf holds, per type, the first rows of one real tensor (whole
//! blocks, byte for byte); quants-ref.safetensors holds what `gguf.quants.dequantize` makes of
//! them. Both were written by scripts/gguf-make-fixture.py (tests/data/gguf/PROVENANCE.md).
//! The same GGUF carries one metadata key of every value type and `general.alignment = 64`.

use std::path::{Path, PathBuf};

use edge_runtime::DType;
use edgec::frontend::gguf::{self, Array, GgmlType, GgufFile, Value};

fn data() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data/gguf")
}

const TYPES: [(&str, GgmlType); 11] = [
    ("q8_0", GgmlType::Q8_0),
    ("q4_0", GgmlType::Q4_0),
    ("q4_1", GgmlType::Q4_1),
    ("q5_0", GgmlType::Q5_0),
    ("q5_1", GgmlType::Q5_1),
    ("q4_k", GgmlType::Q4_K),
    ("q5_k", GgmlType::Q5_K),
    ("q6_k", GgmlType::Q6_K),
    ("f16", GgmlType::F16),
    ("bf16", GgmlType::BF16),
    ("f32", GgmlType::F32),
];

#[test]
fn every_type_matches_gguf_py() {
    let f = GgufFile::open(&data().join("quants.gguf")).unwrap();
    let refs_bytes = std::fs::read(data().join("quants-ref.safetensors")).unwrap();
    let refs = safetensors::SafeTensors::deserialize(&refs_bytes).unwrap();
    assert_eq!(f.tensors.len(), TYPES.len());
    for (name, ty) in TYPES {
        let info = f.tensor_info(name).unwrap();
        assert_eq!(info.ggml_type, ty, "{name}");
        let t = gguf::tensor(&f, info).unwrap();
        let r = refs.tensor(name).unwrap();
        assert_eq!(r.dtype(), safetensors::Dtype::F32);
        assert_eq!(t.shape, r.shape(), "{name}");
        let want: Vec<f32> = r
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let got = t.to_f32_vec();
        assert_eq!(got.len(), want.len());
        let (mut max_abs, mut max_rel, mut exact) = (0f32, 0f32, 0usize);
        for (&g, &w) in got.iter().zip(&want) {
            assert!(g.is_finite() && w.is_finite(), "{name}: non-finite value");
            let d = (g - w).abs();
            max_abs = max_abs.max(d);
            max_rel = max_rel.max(d / w.abs().max(f32::MIN_POSITIVE));
            exact += (g.to_bits() == w.to_bits()) as usize;
        }
        let distinct = {
            let mut v: Vec<u32> = want.iter().map(|x| x.to_bits()).collect();
            v.sort_unstable();
            v.dedup();
            v.len()
        };
        eprintln!(
            "{name}: {} values ({distinct} distinct), {exact} bit-exact, max abs err {max_abs:e}, max rel err {max_rel:e}",
            want.len()
        );
        assert!(distinct > 8, "{name}: the reference is degenerate");
        // Measured: bit-exact for every type (the same f32 operations in the same order).
        assert!(
            max_rel <= 1e-6,
            "{name}: max relative error {max_rel:e} (abs {max_abs:e})"
        );
        assert_eq!(
            exact,
            want.len(),
            "{name}: not bit-exact (max abs err {max_abs:e})"
        );
        let mapped = matches!(ty, GgmlType::F16 | GgmlType::BF16 | GgmlType::F32);
        assert_eq!(t.is_mapped(), mapped, "{name}");
        let dtype = match ty {
            GgmlType::F16 => DType::F16,
            GgmlType::BF16 => DType::BF16,
            _ => DType::F32,
        };
        assert_eq!(t.dtype, dtype, "{name}");
    }
}

#[test]
fn metadata_of_every_value_type() {
    let f = GgufFile::open(&data().join("quants.gguf")).unwrap();
    assert_eq!((f.version, f.alignment), (3, 64));
    assert_eq!(f.data_offset % 64, 0);
    for t in &f.tensors {
        assert_eq!(t.offset % 64, 0, "{}", t.name);
    }
    let get = |k: &str| f.get(k).unwrap_or_else(|| panic!("{k} missing")).clone();
    assert_eq!(get("general.architecture"), Value::String("edge-fixture".into()));
    assert_eq!(get("general.alignment"), Value::U32(64));
    assert_eq!(get("fixture.u8"), Value::U8(200));
    assert_eq!(get("fixture.i8"), Value::I8(-100));
    assert_eq!(get("fixture.u16"), Value::U16(60000));
    assert_eq!(get("fixture.i16"), Value::I16(-30000));
    assert_eq!(get("fixture.u32"), Value::U32(4_000_000_000));
    assert_eq!(get("fixture.i32"), Value::I32(-2_000_000_000));
    assert_eq!(get("fixture.f32"), Value::F32(0.25));
    assert_eq!(get("fixture.bool"), Value::Bool(true));
    assert_eq!(get("fixture.string"), Value::String("héllo, GGUF".into()));
    assert_eq!(get("fixture.u64"), Value::U64((1 << 63) + 5));
    assert_eq!(get("fixture.i64"), Value::I64(-(1 << 62)));
    assert_eq!(get("fixture.f64"), Value::F64(-1.5e300));
    assert_eq!(get("fixture.array_i32"), Value::Array(Array::I32(vec![1, -2, 3])));
    assert_eq!(
        get("fixture.array_str"),
        Value::Array(Array::String(vec!["a".into(), "".into(), "ß".into()]))
    );
    assert_eq!(
        get("fixture.array_nested"),
        Value::Array(Array::Array(vec![Array::I32(vec![1, 2]), Array::I32(vec![3])]))
    );
    assert_eq!(get("fixture.array_nested").summary(), "[array; 2]");
    assert_eq!(f.metadata.len(), 17);
}

#[test]
fn the_fixture_is_not_a_model() {
    let err = match gguf::load(&data().join("quants.gguf")) {
        Ok(_) => panic!("the fixture loaded as a model"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("architecture `edge-fixture` is not supported (only `llama`)"),
        "{err}"
    );
}
