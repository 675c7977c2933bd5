//! The `edge-runtime` binary on bad input: every subcommand documents itself, and a corrupt
//! bundle, a missing key or a missing token file ends in a clear error and a non-zero exit,
//! never a panic.

use std::path::Path;
use std::process::{Command, Output};

fn runtime(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_edge-runtime"))
        .args(args)
        .output()
        .expect("run edge-runtime")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn assert_clean_failure(out: &Output, expect: &str) {
    let err = stderr(out);
    assert!(!out.status.success(), "should fail: {err}");
    assert!(!err.contains("panicked"), "panicked: {err}");
    assert!(err.contains(expect), "error should mention {expect:?}: {err}");
}

#[test]
fn every_subcommand_has_help() {
    for sub in ["info", "eval", "generate", "serve"] {
        let out = runtime(&[sub, "--help"]);
        assert!(out.status.success(), "{sub} --help: {}", stderr(&out));
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("Usage: edge-runtime"),
            "{sub} --help printed {text}"
        );
    }
}

#[test]
fn a_corrupt_bundle_is_named_and_refused() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.edgeb");
    std::fs::write(&bad, b"this is not a bundle").unwrap();
    let bad = bad.to_str().unwrap();
    let out = runtime(&["generate", "--bundle", bad, "--prompt", "hi", "--allow-unsigned"]);
    assert_clean_failure(&out, "not an Edge-LLM bundle");
    let out = runtime(&["eval", "--bundle", bad, "--text", bad, "--allow-unsigned"]);
    assert_clean_failure(&out, "not an Edge-LLM bundle");
    let missing = dir.path().join("missing.edgeb");
    let out = runtime(&[
        "generate",
        "--bundle",
        missing.to_str().unwrap(),
        "--prompt",
        "hi",
        "--allow-unsigned",
    ]);
    assert_clean_failure(&out, "missing.edgeb");
}

#[test]
fn a_bundle_needs_a_trusted_key_unless_told_otherwise() {
    let out = runtime(&["generate", "--bundle", "x.edgeb", "--prompt", "hi"]);
    assert_clean_failure(&out, "--trusted-key");
}

#[test]
fn serve_refuses_to_start_without_its_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let key = dir.path().join("absent.pub");
    let token = dir.path().join("absent-token");
    let out = runtime(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        data.to_str().unwrap(),
        "--trusted-key",
        key.to_str().unwrap(),
        "--token-file",
        token.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        err.contains("absent-token") || err.contains("absent.pub"),
        "{err}"
    );
    assert!(!Path::new(&token).exists());
}
