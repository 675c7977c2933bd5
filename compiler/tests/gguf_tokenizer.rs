//! The tokenizer embedded in the SmolLM2 GGUF (byte-level BPE, pre-tokenizer `smollm`)
//! against llama.cpp's `llama-tokenize` on the same GGUF: the whole Austen test and valid
//! splits plus a text of edge cases (digits, contractions, whitespace runs, CRLF, many
//! scripts, emoji, Unicode spaces, special tokens), token for token. The reference ids were
//! written by scripts/gguf-make-token-refs.sh (command in tests/data/gguf/PROVENANCE.md).

mod common;

use common::{repo, smollm2};
use std::path::Path;

use edge_runtime::tokenizer::Tokenizer;
use edgec::frontend::gguf::{self, GgufFile, tokenizer};

fn smollm2_tokenizer() -> Tokenizer {
    smollm2_tokenizer_with_pre(None)
}

/// The SmolLM2 vocabulary, split by the pre-tokenizer `pre` (the file's own if `None`).
fn smollm2_tokenizer_with_pre(pre: Option<&str>) -> Tokenizer {
    let f = GgufFile::open(&smollm2()).unwrap();
    let c = gguf::read_config(&f).unwrap();
    let ids = tokenizer::SpecialIds {
        bos: c.bos_token_id,
        eos: c.eos_token_ids.clone(),
        add_bos: f.get("tokenizer.ggml.add_bos_token").and_then(|v| v.as_bool()),
    };
    tokenizer::build_with_pre(&f, &ids, pre)
        .unwrap()
        .expect("the GGUF has a vocabulary")
}

/// Encodes `text` and compares with llama-tokenize's ids; returns the token count.
fn compare(tok: &Tokenizer, text: &str, ref_ids: &Path) -> usize {
    let want: Vec<u32> = std::fs::read_to_string(ref_ids)
        .unwrap()
        .split_ascii_whitespace()
        .map(|s| s.parse().unwrap())
        .collect();
    let got = tok.encode(text).unwrap();
    if let Some(i) = (0..got.len().max(want.len())).find(|&i| got.get(i) != want.get(i)) {
        let lo = i.saturating_sub(8);
        let show = |ids: &[u32]| {
            let end = ids.len().min(i + 8);
            let ids = &ids[lo.min(end)..end];
            format!("{ids:?} = {:?}", tok.decode(ids).unwrap_or_default())
        };
        panic!(
            "{}: first difference at token {i} of {} (llama.cpp has {}):\n ours:      {}\n llama.cpp: {}",
            ref_ids.display(),
            got.len(),
            want.len(),
            show(&got),
            show(&want)
        );
    }
    assert_eq!(
        tok.decode(&got).unwrap(),
        text,
        "{}: decode(encode(text)) != text",
        ref_ids.display()
    );
    got.len()
}

#[test]
fn austen_test_split_matches_llama_tokenize() {
    let tok = smollm2_tokenizer();
    let text = std::fs::read_to_string(repo().join("data/austen/test.txt")).unwrap();
    let n = compare(&tok, &text, &repo().join("tests/data/gguf/austen-test.ids"));
    eprintln!("austen test.txt: {n} tokens identical to llama-tokenize");
    assert_eq!(n, 53281);
}

#[test]
fn austen_valid_split_matches_llama_tokenize() {
    let tok = smollm2_tokenizer();
    let text = std::fs::read_to_string(repo().join("data/austen/valid.txt")).unwrap();
    let n = compare(&tok, &text, &repo().join("tests/data/gguf/austen-valid.ids"));
    eprintln!("austen valid.txt: {n} tokens identical to llama-tokenize");
    assert_eq!(n, 51100);
}

#[test]
fn edge_cases_match_llama_tokenize() {
    let tok = smollm2_tokenizer();
    let text = std::fs::read_to_string(repo().join("tests/data/gguf/tokenizer-edge.txt")).unwrap();
    let n = compare(&tok, &text, &repo().join("tests/data/gguf/tokenizer-edge.ids"));
    eprintln!("tokenizer-edge.txt: {n} tokens identical to llama-tokenize");
    // Special tokens are matched whole.
    assert_eq!(tok.encode("<|im_start|>user").unwrap()[0], 1);
    assert_eq!(tok.encode("a<|endoftext|>").unwrap()[1], 0);
}

/// The same vocabulary under llama.cpp's `gpt-2`, `default` and `llama-bpe` pre-tokenizers
/// (references from vocabulary-only copies of the GGUF with that `tokenizer.ggml.pre`, see
/// scripts/gguf-make-pre-variants.py).
#[test]
fn other_pre_tokenizers_match_llama_tokenize() {
    let edge = std::fs::read_to_string(repo().join("tests/data/gguf/tokenizer-edge.txt")).unwrap();
    let valid = std::fs::read_to_string(repo().join("data/austen/valid.txt")).unwrap();
    let valid30k = &valid[..30000];
    let data = repo().join("tests/data/gguf");
    let mut counts = vec![];
    for pre in ["gpt-2", "default", "llama-bpe"] {
        let tok = smollm2_tokenizer_with_pre(Some(pre));
        let a = compare(&tok, &edge, &data.join(format!("pre-{pre}.edge.ids")));
        let b = compare(&tok, valid30k, &data.join(format!("pre-{pre}.valid30k.ids")));
        eprintln!("pre-tokenizer {pre}: {a} + {b} tokens identical to llama-tokenize");
        counts.push((a, b));
    }
    // The three split differently (so each reference checks something of its own).
    assert_eq!(counts, vec![(520, 7339), (553, 7323), (519, 7258)]);
}

#[test]
fn conventions() {
    let tok = smollm2_tokenizer();
    assert_eq!((tok.add_bos, tok.bos, tok.eos.clone()), (false, Some(1), vec![2]));
    assert_eq!(tok.vocab_size(), 49152);
    // Digits are split one by one (the `smollm` pre-tokenizer), unlike GPT-2.
    let ids = tok.encode("12345").unwrap();
    assert_eq!(ids.len(), 5);
    assert_eq!(tok.decode(&ids).unwrap(), "12345");
    let with_bos = Tokenizer::new(tok.inner().clone(), true, tok.bos, tok.eos.clone());
    assert_eq!(with_bos.encode("Hi").unwrap()[0], 1);
}
