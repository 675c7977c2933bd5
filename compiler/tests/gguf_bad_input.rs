//! Malformed GGUF input: every case must come back as an error that names the problem,
//! never a panic. Damaged copies of real files are written to a temporary directory.

mod common;

use common::{repo, smollm2};
use std::path::Path;

use edgec::frontend::gguf::{self, reader};
use edgec::frontend::{LoadOptions, load};

fn tiny() -> Vec<u8> {
    std::fs::read(repo().join("tests/data/gguf/tiny-llama.f16.gguf")).unwrap()
}

/// Writes `bytes` to `dir/name` and returns the error of loading it.
fn load_err(dir: &Path, name: &str, bytes: &[u8]) -> String {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    match gguf::load(&p) {
        Ok(_) => panic!("{name}: loaded without error"),
        Err(e) => e.to_string(),
    }
}

/// Offset of the type field of tensor `name`'s header entry.
fn type_field(bytes: &[u8], name: &str) -> usize {
    let mut pat = (name.len() as u64).to_le_bytes().to_vec();
    pat.extend_from_slice(name.as_bytes());
    let at = bytes
        .windows(pat.len())
        .position(|w| w == pat)
        .unwrap_or_else(|| panic!("tensor {name} not found"));
    let dims_at = at + pat.len();
    let n_dims = u32::from_le_bytes(bytes[dims_at..dims_at + 4].try_into().unwrap()) as usize;
    dims_at + 4 + 8 * n_dims
}

#[test]
fn bad_magic() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = tiny();
    b[..4].copy_from_slice(b"GGML");
    let e = load_err(dir.path(), "magic.gguf", &b);
    assert!(e.contains("bad magic") && e.contains("GGML"), "{e}");
    let e = load_err(dir.path(), "empty.gguf", b"");
    assert!(e.contains("bad magic"), "{e}");
    // The generic loader goes by the extension and reports the same.
    let e = match load(&dir.path().join("magic.gguf"), &LoadOptions::default()) {
        Ok(_) => panic!("loaded"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains("bad magic"), "{e}");
}

#[test]
fn unknown_and_unsupported_tensor_types() {
    let dir = tempfile::tempdir().unwrap();
    let name = "blk.1.attn_v.weight";
    let mut b = tiny();
    let at = type_field(&b, name);
    assert_eq!(
        u32::from_le_bytes(b[at..at + 4].try_into().unwrap()),
        1,
        "f16 in the fixture"
    );
    b[at..at + 4].copy_from_slice(&99u32.to_le_bytes());
    let e = load_err(dir.path(), "type99.gguf", &b);
    assert!(
        e.contains(&format!("tensor `{name}`: unknown tensor type id 99")),
        "{e}"
    );

    // iq4_nl (id 20) is a real ggml type this reader does not dequantize; its blocks of 32
    // fit the 64-wide rows, and its data is smaller than the f16 it replaces.
    b[at..at + 4].copy_from_slice(&20u32.to_le_bytes());
    let e = load_err(dir.path(), "iq4nl.gguf", &b);
    assert!(
        e.contains(&format!(
            "tensor `{name}` has type iq4_nl (id 20), which this reader cannot load"
        )),
        "{e}"
    );

    // q4_k needs rows that are multiples of 256.
    b[at..at + 4].copy_from_slice(&12u32.to_le_bytes());
    let e = load_err(dir.path(), "q4k.gguf", &b);
    assert!(
        e.contains("row length 64 is not a multiple of the q4_k block size 256"),
        "{e}"
    );
}

#[test]
fn tensor_data_out_of_bounds() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = tiny();
    let at = type_field(&b, "output_norm.weight") + 4;
    b[at..at + 8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    let e = load_err(dir.path(), "oob.gguf", &b);
    assert!(
        e.contains("out of bounds") && e.contains("`output_norm.weight`"),
        "{e}"
    );
    b[at..at + 8].copy_from_slice(&(u64::MAX - 31).to_le_bytes());
    let e = load_err(dir.path(), "oob2.gguf", &b);
    assert!(
        e.contains("out of bounds") && e.contains("`output_norm.weight`"),
        "{e}"
    );
}

#[test]
fn wrong_architecture() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = tiny();
    let pat = b"\x05\0\0\0\0\0\0\0llama";
    let at = b.windows(pat.len()).position(|w| w == pat).unwrap() + 8;
    b[at..at + 5].copy_from_slice(b"qwen2");
    let e = load_err(dir.path(), "arch.gguf", &b);
    assert!(
        e.contains("unsupported model: architecture `qwen2` is not supported (only `llama`)"),
        "{e}"
    );
}

#[test]
fn implausible_config_values() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = tiny();
    let key = b"llama.block_count";
    let at = b.windows(key.len()).position(|w| w == key).unwrap() + key.len();
    assert_eq!(&b[at..at + 8], &[4, 0, 0, 0, 4, 0, 0, 0], "u32 4 in the fixture");
    b[at + 4..at + 8].copy_from_slice(&(1u32 << 30).to_le_bytes());
    let e = load_err(dir.path(), "layers.gguf", &b);
    assert!(
        e.contains("llama.block_count = 1073741824 is implausibly large"),
        "{e}"
    );
    b[at..at + 4].copy_from_slice(&6u32.to_le_bytes()); // now an f32
    let e = load_err(dir.path(), "layers-f32.gguf", &b);
    assert!(
        e.contains("`llama.block_count` is") && e.contains("(f32), not a non-negative integer"),
        "{e}"
    );
}

#[test]
fn truncated_copies_of_the_real_model() {
    let full = std::fs::read(smollm2()).unwrap();
    let data_offset = gguf::GgufFile::open(&smollm2()).unwrap().data_offset as usize;
    assert_eq!(data_offset, 1_785_664);
    let dir = tempfile::tempdir().unwrap();
    let find = |pat: &[u8]| full.windows(pat.len()).position(|w| w == pat).unwrap();
    let types_key = find(b"tokenizer.ggml.token_type");
    let merges_key = find(b"tokenizer.ggml.merges");
    let template_key = find(b"tokenizer.chat_template");
    let cases: Vec<(usize, &str)> = vec![
        (2, "bad magic"),
        (6, "truncated header (version)"),
        (20, "truncated header (metadata count)"),
        (1000, "truncated or corrupt header: it claims 272 tensors"),
        (
            100_000,
            "truncated or corrupt metadata (`tokenizer.ggml.tokens`): array of 49152 string elements",
        ),
        (
            types_key - 5000,
            "truncated metadata (`tokenizer.ggml.tokens`) element",
        ),
        (
            merges_key - 5000,
            "truncated or corrupt metadata (`tokenizer.ggml.token_type`): array of 49152 i32",
        ),
        (
            template_key - 5000,
            "truncated metadata (`tokenizer.ggml.merges`) element",
        ),
        (
            template_key + 40,
            "truncated metadata (`tokenizer.chat_template`)",
        ),
        (data_offset - 3000, "truncated tensor info (`blk."),
        (data_offset + 100, "tensor `token_embd.weight`"),
        (full.len() - 1, "tensor `output_norm.weight`"),
    ];
    for (cut, want) in cases {
        let e = load_err(dir.path(), &format!("cut{cut}.gguf"), &full[..cut]);
        eprintln!("cut at {cut}: {e}");
        assert!(e.contains(want), "cut at {cut}: {e}");
        if cut > data_offset {
            assert!(e.contains("truncated tensor data"), "cut at {cut}: {e}");
        }
        std::fs::remove_file(dir.path().join(format!("cut{cut}.gguf"))).unwrap();
    }
}

/// Random damage to the header of a real file never panics and never allocates without
/// bound: every mutant parses or fails with an error.
#[test]
fn mutated_headers_never_panic() {
    let original = tiny();
    let data_offset = gguf::GgufFile::open(&repo().join("tests/data/gguf/tiny-llama.f16.gguf"))
        .unwrap()
        .data_offset as usize;
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let (mut ok, mut failed) = (0, 0);
    let mut b = original.clone();
    for _ in 0..3000 {
        let mut touched = vec![];
        for _ in 0..1 + next() % 4 {
            let at = (next() as usize) % data_offset;
            touched.push(at);
            b[at] = match next() % 3 {
                0 => next() as u8,
                1 => 0xff,
                _ => b[at] ^ (1 << (next() % 8)),
            };
        }
        let cut = if next() % 4 == 0 {
            (next() as usize) % b.len()
        } else {
            b.len()
        };
        match reader::parse_slice(&b[..cut], "mutant") {
            Ok(_) => ok += 1,
            Err(e) => {
                assert!(!e.to_string().is_empty());
                failed += 1;
            }
        }
        for at in touched {
            b[at] = original[at];
        }
    }
    eprintln!("mutants: {ok} parsed, {failed} rejected");
    assert!(failed > 100 && ok > 100, "{ok} parsed, {failed} rejected");
}

/// Random damage to the metadata and tensor infos of a real model file, loaded all the way
/// (config, tokenizer, tensors, graph): an error or a model, never a panic (the tests run
/// with overflow checks on).
#[test]
fn mutated_models_never_panic() {
    let original = tiny();
    let data_offset = gguf::GgufFile::open(&repo().join("tests/data/gguf/tiny-llama.f16.gguf"))
        .unwrap()
        .data_offset as usize;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mutant.gguf");
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let (mut ok, mut failed) = (0, 0);
    for _ in 0..300 {
        let mut b = original.clone();
        for _ in 0..1 + next() % 3 {
            // Past the fixed header, up to the end of the tensor infos.
            let at = 24 + (next() as usize) % (data_offset - 24);
            b[at] = match next() % 4 {
                0 => next() as u8,
                1 => 0xff,
                2 => 0,
                _ => b[at] ^ (1 << (next() % 8)),
            };
        }
        std::fs::write(&path, &b).unwrap();
        match gguf::load(&path) {
            Ok(_) => ok += 1,
            Err(e) => {
                assert!(!e.to_string().is_empty());
                failed += 1;
            }
        }
    }
    eprintln!("model mutants: {ok} loaded, {failed} rejected");
    assert!(failed > 30, "{ok} loaded, {failed} rejected");
}

/// A GGUF with string / string-array metadata only (no tensors).
fn gguf_with(kvs: &[(&str, Vec<&str>)]) -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&0u64.to_le_bytes());
    b.extend_from_slice(&(kvs.len() as u64).to_le_bytes());
    let s = |b: &mut Vec<u8>, x: &str| {
        b.extend_from_slice(&(x.len() as u64).to_le_bytes());
        b.extend_from_slice(x.as_bytes());
    };
    for (k, v) in kvs {
        s(&mut b, k);
        if k.ends_with(".tokens") || k.ends_with(".merges") {
            b.extend_from_slice(&9u32.to_le_bytes());
            b.extend_from_slice(&8u32.to_le_bytes());
            b.extend_from_slice(&(v.len() as u64).to_le_bytes());
            for x in v {
                s(&mut b, x);
            }
        } else {
            b.extend_from_slice(&8u32.to_le_bytes());
            s(&mut b, v[0]);
        }
    }
    b
}

/// The tokenizer of a GGUF with `tokenizer.ggml.model` = `model`, `.pre` = `pre` and, if
/// `vocab`, the tokens `a b c ab abc` with the one merge `a b`.
fn build_tokenizer(
    model: &str,
    pre: &str,
    vocab: bool,
) -> Result<Option<edge_runtime::tokenizer::Tokenizer>, String> {
    let dir = tempfile::tempdir().unwrap();
    let mut kvs = vec![
        ("tokenizer.ggml.model", vec![model]),
        ("tokenizer.ggml.pre", vec![pre]),
    ];
    if vocab {
        kvs.push(("tokenizer.ggml.tokens", vec!["a", "b", "c", "ab", "abc"]));
        kvs.push(("tokenizer.ggml.merges", vec!["a b"]));
    }
    let p = dir.path().join("tok.gguf");
    std::fs::write(&p, gguf_with(&kvs)).unwrap();
    let f = gguf::GgufFile::open(&p).unwrap();
    let ids = gguf::tokenizer::SpecialIds {
        bos: Some(0),
        eos: vec![1],
        add_bos: None,
    };
    gguf::tokenizer::build(&f, &ids).map_err(|e| e.to_string())
}

#[test]
fn tokenizer_models_and_pre_tokenizers() {
    let e = build_tokenizer("llama", "default", true).unwrap_err();
    assert!(e.contains("SentencePiece"), "{e}");
    let e = build_tokenizer("bert", "default", true).unwrap_err();
    assert!(e.contains("tokenizer model `bert` is not supported"), "{e}");
    let e = build_tokenizer("gpt2", "qwen2", true).unwrap_err();
    assert!(
        e.contains("pre-tokenizer `qwen2` (`tokenizer.ggml.pre`) is not supported"),
        "{e}"
    );
    let e = build_tokenizer("gpt2", "gpt-2", false).unwrap_err();
    assert!(e.contains("`tokenizer.ggml.tokens` is missing"), "{e}");
    assert!(build_tokenizer("no_vocab", "", false).unwrap().is_none());

    // gpt-2: BPE by merge rank only; no merge reaches "abc".
    let t = build_tokenizer("gpt2", "gpt-2", true).unwrap().unwrap();
    assert_eq!((t.encode("abc").unwrap(), t.add_bos), (vec![3, 2], false));
    // llama-bpe: a piece that is a whole vocabulary entry is one token (ignore_merges), and
    // llama.cpp's default for this pre-tokenizer is to add BOS.
    let t = build_tokenizer("gpt2", "llama-bpe", true).unwrap().unwrap();
    assert_eq!((t.encode("abc").unwrap(), t.add_bos), (vec![0, 4], true));
}
