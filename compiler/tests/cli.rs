//! The `edgec` binary end to end: commands, JSON output, and clear errors on bad input.

mod common;

use std::process::{Command, Output};

fn edgec(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_edgec"))
        .args(args)
        .output()
        .expect("run edgec")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A bad input must give a non-zero exit and an error message, never a panic.
fn assert_clean_failure(o: &Output, must_contain: &[&str]) {
    let e = stderr(o);
    assert!(!o.status.success(), "expected failure, got success; stderr: {e}");
    assert_eq!(
        o.status.code(),
        Some(1),
        "expected exit code 1 (error), stderr: {e}"
    );
    assert!(!e.contains("panicked"), "panicked: {e}");
    for s in must_contain {
        assert!(e.contains(s), "stderr should mention `{s}`: {e}");
    }
}

/// Copies the tiny-llama fixture's model files into a temp dir for mutation.
fn fixture_copy() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(common::tiny_llama().join(f), dir.path().join(f)).unwrap();
    }
    dir
}

#[test]
fn eval_tokens_reproduces_transformers_loss() {
    let reference = common::read_reference(&common::tiny_llama().join("reference.safetensors"));
    let (shape, ids) = &reference["input_ids"];
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("ids.txt");
    let lines: Vec<String> = ids
        .chunks(shape[1])
        .map(|r| {
            r.iter()
                .map(|x| (*x as u32).to_string())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect();
    std::fs::write(&tokens, lines.join("\n") + "\n").unwrap();
    let fixture = common::tiny_llama();
    let o = edgec(&[
        "eval",
        "--model",
        fixture.to_str().unwrap(),
        "--tokens",
        tokens.to_str().unwrap(),
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let loss = v["loss"].as_f64().unwrap();
    let want = reference["loss"].1[0] as f64;
    assert!((loss - want).abs() < 1e-4, "loss {loss} vs transformers {want}");
    assert_eq!(v["tokens_scored"], 30);
    assert!((v["perplexity"].as_f64().unwrap() - want.exp()).abs() < 1e-3);
}

#[test]
fn inspect_json_reports_config_and_bytes() {
    let fixture = common::tiny_llama();
    let o = edgec(&["inspect", fixture.to_str().unwrap(), "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["config"]["num_layers"], 4);
    assert_eq!(v["parameters"], 217_664);
    assert_eq!(v["tensor_bytes_in_file"], 870_656);
    assert_eq!(v["weights_mapped"], 39);
}

#[test]
fn every_command_has_help() {
    for cmd in ["inspect", "eval", "generate", "bench"] {
        let o = edgec(&[cmd, "--help"]);
        assert!(o.status.success(), "{cmd} --help: {}", stderr(&o));
        assert!(String::from_utf8_lossy(&o.stdout).contains("Usage"));
    }
}

#[test]
fn truncated_safetensors_is_a_clear_error() {
    let dir = fixture_copy();
    let st = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    for cut in [4, 100, bytes.len() / 2, bytes.len() - 1] {
        std::fs::write(&st, &bytes[..cut]).unwrap();
        let o = edgec(&["inspect", dir.path().to_str().unwrap()]);
        assert_clean_failure(&o, &["model.safetensors"]);
    }
}

#[test]
fn non_llama_config_is_a_clear_error() {
    let dir = fixture_copy();
    let cfg = dir.path().join("config.json");
    let text = std::fs::read_to_string(&cfg).unwrap();
    let text = text
        .replace("\"llama\"", "\"mistral\"")
        .replace("LlamaForCausalLM", "MistralForCausalLM");
    std::fs::write(&cfg, text).unwrap();
    let o = edgec(&["inspect", dir.path().to_str().unwrap()]);
    assert_clean_failure(&o, &["mistral", "not LLaMA"]);
}

#[test]
fn missing_tensor_is_named() {
    let dir = fixture_copy();
    let cfg = dir.path().join("config.json");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("\"num_hidden_layers\": 4", "\"num_hidden_layers\": 5");
    std::fs::write(&cfg, text).unwrap();
    let o = edgec(&["inspect", dir.path().to_str().unwrap()]);
    assert_clean_failure(&o, &["model.layers.4.input_layernorm.weight"]);
}

#[test]
fn non_utf8_text_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("latin1.txt");
    std::fs::write(&text, b"caf\xe9 au lait").unwrap();
    let ids = dir.path().join("ids.txt");
    std::fs::write(&ids, b"1 2 3\n\xff\xfe\n").unwrap();
    let fixture = common::tiny_llama();
    let o = edgec(&[
        "eval",
        "--model",
        fixture.to_str().unwrap(),
        "--tokens",
        ids.to_str().unwrap(),
    ]);
    assert_clean_failure(&o, &["not UTF-8", "byte offset 6"]);
    let o = edgec(&[
        "eval",
        "--model",
        fixture.to_str().unwrap(),
        "--text",
        text.to_str().unwrap(),
    ]);
    assert_clean_failure(&o, &["latin1.txt", "not UTF-8", "byte offset 3"]);
}

#[test]
fn bad_token_ids_are_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let ids = dir.path().join("ids.txt");
    std::fs::write(&ids, "1 2 3\n4 999 5\n").unwrap();
    let fixture = common::tiny_llama();
    let o = edgec(&[
        "eval",
        "--model",
        fixture.to_str().unwrap(),
        "--tokens",
        ids.to_str().unwrap(),
    ]);
    assert_clean_failure(&o, &["line 2", "999", "vocabulary"]);
}

#[test]
fn missing_model_is_a_clear_error() {
    let o = edgec(&["inspect", "/nonexistent/model.gguf"]);
    assert_clean_failure(&o, &["/nonexistent/model.gguf"]);
}

#[test]
fn gguf_with_bad_magic_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("model.gguf");
    std::fs::write(&f, b"GGML\x03\x00\x00\x00 not a gguf file at all").unwrap();
    let o = edgec(&["eval", "--model", f.to_str().unwrap(), "--text", "/dev/null"]);
    assert_clean_failure(&o, &["model.gguf", "magic"]);
}

#[test]
fn garbage_onnx_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("model.onnx");
    std::fs::write(
        &f,
        (0..4096u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect::<Vec<u8>>(),
    )
    .unwrap();
    let o = edgec(&["generate", "--model", f.to_str().unwrap(), "--prompt", "hello"]);
    assert_clean_failure(&o, &["model.onnx", "ONNX"]);
}
