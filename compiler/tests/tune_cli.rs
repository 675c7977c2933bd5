//! `edgec grad` and `edgec tune` through the real binary: gradients against PyTorch,
//! kill and resume, bad input.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{read_reference, repo, smollm2, tiny_llama};

fn edgec() -> Command {
    Command::new(env!("CARGO_BIN_EXE_edgec"))
}

fn fixture_ids(dir: &Path) -> std::path::PathBuf {
    let r = read_reference(&tiny_llama().join("reference.safetensors"));
    let (shape, ids) = &r["input_ids"];
    let s = shape[1];
    let lines: Vec<String> = ids
        .chunks(s)
        .map(|row| {
            row.iter()
                .map(|v| (*v as i64).to_string())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect();
    let p = dir.join("ids.txt");
    std::fs::write(&p, lines.join("\n") + "\n").unwrap();
    p
}

fn assert_grads_match(out: &Path, reference: &str, renamed: impl Fn(&str) -> String) {
    let got = read_reference(out);
    let want = read_reference(&tiny_llama().join(reference));
    let mut n = 0;
    for (name, (_, w)) in &want {
        let Some(base) = name.strip_suffix(".grad") else {
            continue;
        };
        let (_, g) = &got[&renamed(base)];
        let max_ref = w.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let diff = g.iter().zip(w).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(diff <= 1e-4 * max_ref, "{base}: {diff:e} vs max ref {max_ref:e}");
        n += 1;
    }
    assert!(n >= 56 / 2, "only {n} gradients compared");
}

#[test]
fn grad_command_matches_pytorch_full_depth_and_at_an_exit() {
    let tmp = tempfile::tempdir().unwrap();
    let ids = fixture_ids(tmp.path());
    let out = tmp.path().join("g.safetensors");
    let st = edgec()
        .args(["grad", "-m"])
        .arg(tiny_llama())
        .arg("--tokens")
        .arg(&ids)
        .arg("--adapters")
        .arg(tiny_llama().join("lora.safetensors"))
        .args(["--alpha", "8", "-o"])
        .arg(&out)
        .status()
        .unwrap();
    assert!(st.success());
    assert_grads_match(&out, "lora.safetensors", |b| b.to_string());

    // PEFT's own file and names, alpha from its adapter_config.json; window 0:1, exit 1.
    let out2 = tmp.path().join("g2.safetensors");
    let st = edgec()
        .args(["grad", "-m"])
        .arg(tiny_llama())
        .arg("--tokens")
        .arg(&ids)
        .arg("--adapters")
        .arg(tiny_llama().join("peft_adapter/adapter_model.safetensors"))
        .args(["--exit", "1", "--window", "0:1", "-o"])
        .arg(&out2)
        .status()
        .unwrap();
    assert!(st.success());
    assert_grads_match(&out2, "exit.safetensors", |b| {
        let (layer, rest) = b.strip_prefix("layers.").unwrap().split_once('.').unwrap();
        let (module, ab) = rest.split_once('.').unwrap();
        let parent = if ["q_proj", "k_proj", "v_proj", "o_proj"].contains(&module) {
            "self_attn"
        } else {
            "mlp"
        };
        format!("base_model.model.model.layers.{layer}.{parent}.{module}.{ab}.weight")
    });
}

fn tune_args(model: &Path, out: &Path) -> Command {
    let mut c = tune_on(model, out, &repo().join("data/austen/valid.txt"));
    c.args(["--stride", "10", "--rank", "2", "--targets", "q,v,down"]);
    c
}

fn tune_on(model: &Path, out: &Path, data: &Path) -> Command {
    let mut c = edgec();
    c.args(["tune", "-m"])
        .arg(model)
        .arg("--data")
        .arg(data)
        .args(["--seq", "24", "-t", "2", "-o"])
        .arg(out);
    c
}

fn read_adapters(dir: &Path) -> std::collections::HashMap<String, (Vec<usize>, Vec<f32>)> {
    read_reference(&dir.join("adapter_model.safetensors"))
}

#[test]
fn killed_tuning_resumes_from_its_last_checkpoint() {
    let model = smollm2();
    let tmp = tempfile::tempdir().unwrap();
    // The uninterrupted run.
    let whole = tmp.path().join("whole");
    let st = tune_args(&model, &whole)
        .args(["--steps", "6", "--checkpoint-every", "2"])
        .status()
        .unwrap();
    assert!(st.success());
    assert!(whole.join("adapter_config.json").exists());

    // The same run killed once its first checkpoint is written, then resumed.
    let cut = tmp.path().join("cut");
    let mut child = tune_args(&model, &cut)
        .args(["--steps", "6", "--checkpoint-every", "2"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let latest = cut.join("checkpoints/latest");
    let t0 = Instant::now();
    while !latest.exists() {
        assert!(t0.elapsed() < Duration::from_secs(300), "no checkpoint appeared");
        if let Some(s) = child.try_wait().unwrap() {
            panic!("tune exited early: {s}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let at = std::fs::read_to_string(&latest).unwrap();
    assert!(at.starts_with("checkpoint-"), "{at}");
    // Without --resume a second run refuses to clobber the checkpoint.
    let o = tune_args(&model, &cut)
        .args(["--steps", "6", "--checkpoint-every", "2"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--resume"));
    let o = tune_args(&model, &cut)
        .args(["--steps", "6", "--checkpoint-every", "2", "--resume"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("resuming from the checkpoint at step"));

    let (a, b) = (read_adapters(&whole), read_adapters(&cut));
    assert_eq!(a.len(), b.len());
    for (name, (_, x)) in &a {
        let y = &b[name].1;
        let d = x.iter().zip(y).map(|(p, q)| (p - q).abs()).fold(0.0f32, f32::max);
        assert!(d < 1e-5, "{name} differs by {d} after resume");
    }
    // Tuning moved the adapters (B starts at zero).
    assert!(
        a.iter()
            .any(|(n, (_, x))| n.contains("lora_B") && x.iter().any(|v| *v != 0.0))
    );

    // The tuned model: every exit and voting mode scored, and generation from a vote.
    let o = edgec()
        .args(["eval", "-m"])
        .arg(&model)
        .arg("--adapters")
        .arg(&whole)
        .arg("--text")
        .arg(repo().join("data/austen/test.txt"))
        .args([
            "--ctx",
            "64",
            "--chunks",
            "2",
            "--vote",
            "last,max-confidence,mean",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let exits = v["exits"].as_array().unwrap();
    assert_eq!(exits.len(), 3, "exits 9, 19, 29: {v}");
    assert_eq!(v["votes"].as_array().unwrap().len(), 3);
    // `last` is the final exit.
    assert_eq!(v["votes"][0]["perplexity"], exits[2]["perplexity"]);
    for s in exits.iter().chain(v["votes"].as_array().unwrap()) {
        let p = s["perplexity"].as_f64().unwrap();
        assert!(p.is_finite() && p > 1.0, "{s}");
        assert_eq!(s["tokens"], 2 * 31);
    }
    let o = edgec()
        .args(["generate", "-m"])
        .arg(&model)
        .arg("--adapters")
        .arg(&whole)
        .args(["--vote", "mean", "-p", "It is a truth", "-n", "4", "--json"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let g: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(g["tokens"].as_array().unwrap().len(), 4);
}

#[test]
fn bad_tuning_input_is_refused_with_a_clear_error() {
    let model = smollm2();
    let tmp = tempfile::tempdir().unwrap();
    let empty = tmp.path().join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    let binary = tmp.path().join("bin.txt");
    std::fs::write(&binary, [0x66, 0x6f, 0xff, 0xfe, 0x00]).unwrap();
    let valid = repo().join("data/austen/valid.txt");
    let cases: Vec<(Vec<&str>, &Path, &str)> = vec![
        (vec!["--exits", "5,40"], &valid, "out of range"),
        (vec!["--stride", "7"], &valid, "does not divide"),
        (vec!["--rank", "0"], &valid, "rank"),
        (vec![], &empty, "empty"),
        (vec![], &binary, "not UTF-8"),
        (vec!["--targets", "q,zz"], &valid, "unknown LoRA target"),
    ];
    for (extra, data, want) in cases {
        let out = tmp.path().join("o");
        let mut c = tune_on(&model, &out, data);
        c.args(["--steps", "2"]).args(&extra);
        let o = c.output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{extra:?} was accepted");
        assert!(err.contains(want), "{extra:?}: `{err}` does not say `{want}`");
        assert!(!err.contains("panicked"), "{extra:?}: {err}");
    }
    // A sequence longer than the model's positions (8192 for SmolLM2).
    let o = edgec()
        .args(["tune", "-m"])
        .arg(&model)
        .arg("--data")
        .arg(&valid)
        .args(["--seq", "10000", "--steps", "5", "-o"])
        .arg(tmp.path().join("long"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("8192 positions"), "{err}");
}
