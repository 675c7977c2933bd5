//! `edgec profile` on the tiny-llama fixture (no tokenizer: calibration as token ids), and
//! its bad-input errors.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use edgec::luc::sensitivity::Sensitivity;

fn edgec(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_edgec"))
        .args(args)
        .output()
        .expect("run edgec")
}

fn token_file(dir: &Path, n: usize) -> String {
    // A deterministic pseudo-random stream over the fixture's 256-token vocabulary.
    let mut s: u64 = 12345;
    let ids: Vec<String> = (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 33) % 256).to_string()
        })
        .collect();
    let p = dir.join("tokens.txt");
    std::fs::write(&p, ids.join(" ")).unwrap();
    p.display().to_string()
}

/// `edgec profile` of the fixture `m` on the token file: 4 samples of 64 tokens, no N:M
/// candidates, written to `out`, plus `extra` arguments.
fn profile_small(m: &str, tokens: &str, out: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "profile",
        "-m",
        m,
        "--calib-tokens",
        tokens,
        "--samples",
        "4",
        "--seq",
        "64",
        "--nm",
        "none",
        "-o",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    edgec(&args)
}

#[test]
fn profile_writes_a_valid_monotone_profile_heatmap_and_table() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = token_file(dir.path(), 3000);
    let out = dir.path().join("sens.json");
    let model = common::tiny_llama();
    let o = edgec(&[
        "profile",
        "-m",
        model.to_str().unwrap(),
        "--calib-tokens",
        &tokens,
        "--samples",
        "6",
        "--seq",
        "96",
        "--layer-samples",
        "6",
        "--e2e-layers",
        "0,3",
        "--e2e-samples",
        "2",
        "-o",
        out.to_str().unwrap(),
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let summary: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(summary["layers"], 4);
    let s = Sensitivity::from_json(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(s.layers.len(), 4);
    // Default grid: {2,3,4,8} x {0,.1,.2,.3,.5,.7} + {2,3,4,8} x {2:4, 4:8}.
    assert_eq!(s.candidates.len(), 32);
    assert_eq!(s.quantizer, "gptq");
    assert_eq!(s.pruner, "sparsegpt");
    assert!(s.base_loss.is_finite() && s.base_loss > 0.0);
    // End-to-end: 2 layers x the 4 dense candidates.
    assert_eq!(s.end_to_end.len(), 8);
    for l in &s.layers {
        assert_eq!(l.linears.len(), 7);
        assert!(l.nmse.iter().all(|v| v.is_finite() && *v >= 0.0));
    }
    // Fewer bits, more error: averaged over layers, for the dense candidates, and for every
    // linear alone.
    let mean = |c: usize| s.layers.iter().map(|l| l.nmse[c]).sum::<f64>() / s.layers.len() as f64;
    let dense: Vec<usize> = (0..s.candidates.len())
        .filter(|&c| s.candidates[c].sparsity == 0.0)
        .collect();
    let bits: Vec<u8> = dense.iter().map(|&c| s.candidates[c].bits).collect();
    assert_eq!(bits, [2, 3, 4, 8]);
    for w in dense.windows(2) {
        assert!(
            mean(w[0]) > mean(w[1]),
            "{} bits: {:.3e}, {} bits: {:.3e}",
            s.candidates[w[0]].bits,
            mean(w[0]),
            s.candidates[w[1]].bits,
            mean(w[1])
        );
        for l in &s.layers {
            for lin in &l.linears {
                assert!(lin.nmse[w[0]] > lin.nmse[w[1]], "layer {} {}", l.layer, lin.name);
            }
        }
    }
    // More sparsity, more error (4 bits, averaged over layers).
    let four: Vec<usize> = (0..s.candidates.len())
        .filter(|&c| {
            s.candidates[c].bits == 4
                && s.candidates[c].pattern == edge_runtime::format::SparsePattern::Unstructured
        })
        .collect();
    assert!(mean(four[0]) < mean(*four.last().unwrap()));
    let svg = std::fs::read_to_string(dir.path().join("sens.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("4b-g32-asym-2:4") && svg.trim_end().ends_with("</svg>"));
    assert_eq!(svg.matches("<title>layer").count(), 4 * 32);
    let md = std::fs::read_to_string(dir.path().join("sens.md")).unwrap();
    assert!(md.contains("| 3 |") && md.contains("End-to-end"));
}

fn fails_with(args: &[&str], needle: &str) {
    let o = edgec(args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{args:?} succeeded");
    assert!(err.contains(needle), "{args:?}: stderr `{err}` lacks `{needle}`");
}

#[test]
fn bad_inputs_give_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let model = common::tiny_llama();
    let m = model.to_str().unwrap();
    let out = dir.path().join("o.json");
    let o = out.to_str().unwrap();
    let tokens = token_file(dir.path(), 500);
    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, "  \n").unwrap();
    let binary = dir.path().join("bin.txt");
    std::fs::write(&binary, [0x66, 0x6f, 0xff, 0xfe, 0x00]).unwrap();
    let e = empty.to_str().unwrap();
    let b = binary.to_str().unwrap();
    fails_with(
        &["profile", "-m", m, "--calib", e, "-o", o],
        "calibration file is empty",
    );
    fails_with(
        &["profile", "-m", m, "--calib-tokens", e, "-o", o],
        "calibration file is empty",
    );
    fails_with(&["profile", "-m", m, "--calib", b, "-o", o], "not UTF-8");
    fails_with(
        &[
            "profile",
            "-m",
            m,
            "--calib-tokens",
            &tokens,
            "--seq",
            "1000",
            "-o",
            o,
        ],
        "fewer than one sample of --seq 1000",
    );
    fails_with(
        &[
            "profile",
            "-m",
            m,
            "--calib-tokens",
            &tokens,
            "--bits",
            "4,5",
            "-o",
            o,
        ],
        "unsupported bit-width 5",
    );
    fails_with(
        &[
            "profile",
            "-m",
            m,
            "--calib-tokens",
            &tokens,
            "--group",
            "48",
            "-o",
            o,
        ],
        "unsupported group size 48",
    );
    fails_with(
        &[
            "profile",
            "-m",
            m,
            "--calib-tokens",
            &tokens,
            "--sparsity",
            "0,1.5",
            "-o",
            o,
        ],
        "sparsity 1.5",
    );
    fails_with(
        &[
            "profile",
            "-m",
            m,
            "--calib-tokens",
            &tokens,
            "--nm",
            "2:5",
            "-o",
            o,
        ],
        "2:5",
    );
    fails_with(
        &[
            "profile",
            "-m",
            m,
            "--calib-tokens",
            &tokens,
            "--seq",
            "32",
            "--e2e-layers",
            "7",
            "-o",
            o,
        ],
        "layer 7 does not exist",
    );
    fails_with(
        &["profile", "-m", m, "--calib", e, "-o", o],
        "calibration file is empty",
    );
    // A model without a tokenizer needs --calib-tokens.
    let text = dir.path().join("t.txt");
    std::fs::write(&text, "Some text.").unwrap();
    fails_with(
        &["profile", "-m", m, "--calib", text.to_str().unwrap(), "-o", o],
        "carries no tokenizer",
    );
    assert!(!out.exists());
}

#[test]
fn end_to_end_deltas_in_the_context_of_a_compressed_model() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = token_file(dir.path(), 3000);
    let model = common::tiny_llama();
    let m = model.to_str().unwrap();
    // The context: the fixture with every layer at 4-bit RTN, as `edgec compress` makes it.
    let mut pol = String::from("model = \"tiny\"\nmethod = \"uniform\"\nbudget = \"bits=4\"\n");
    for i in 0..4 {
        pol += &format!(
            "\n[[layer]]\nindex = {i}\nbits = 4\ngroup = 32\nscheme = \"asym\"\nsparsity = 0.0\n\
             pattern = \"unstructured\"\nquantizer = \"rtn\"\npruner = \"magnitude\"\n"
        );
    }
    let pol_path = dir.path().join("q4.toml");
    std::fs::write(&pol_path, pol).unwrap();
    let q4 = dir.path().join("q4");
    let o = edgec(&[
        "compress",
        "-m",
        m,
        "--policy",
        pol_path.to_str().unwrap(),
        "-o",
        q4.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let run = |name: &str, context: Option<&Path>| -> Sensitivity {
        let out = dir.path().join(name);
        let mut args = vec![
            "--bits",
            "2,4",
            "--sparsity",
            "0",
            "--quantizer",
            "rtn",
            "--e2e-layers",
            "all",
            "--e2e-candidates",
            "2b-g32-asym,4b-g32-asym",
        ];
        if let Some(c) = context {
            args.extend(["--context", c.to_str().unwrap()]);
        }
        let o = profile_small(m, &tokens, &out, &args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        Sensitivity::from_json(&std::fs::read_to_string(&out).unwrap()).unwrap()
    };
    let plain = run("plain.json", None);
    // The model itself as its own context: the same deltas.
    let own = run("own.json", Some(&model));
    assert_eq!(own.context.as_deref(), Some(m));
    assert!(
        (own.base_loss - plain.base_loss).abs() < 1e-9,
        "{} vs {}",
        own.base_loss,
        plain.base_loss
    );
    for (a, b) in own.end_to_end.iter().zip(&plain.end_to_end) {
        assert_eq!((a.layer, a.candidate), (b.layer, b.candidate));
        assert!((a.loss_delta - b.loss_delta).abs() < 1e-9, "{a:?} vs {b:?}");
    }
    // In the 4-bit model: its base loss is its own, replacing a layer by the same 4-bit RTN
    // weights changes nothing, and 2-bit layers change the loss (the fixture's random
    // weights may even gain from them).
    let ctx = run("ctx.json", Some(&q4));
    assert_eq!(plain.end_to_end.len(), 8);
    assert_eq!(ctx.end_to_end.len(), 8);
    assert!((ctx.base_loss - plain.base_loss).abs() > 1e-6);
    let four = ctx.candidates.iter().position(|c| c.bits == 4).unwrap();
    for e in &ctx.end_to_end {
        if e.candidate == four {
            assert!(e.loss_delta.abs() < 1e-5, "{e:?}");
        } else {
            assert!(e.loss_delta.abs() > 1e-4, "{e:?}");
        }
    }
    // A context that cannot be loaded is refused.
    let o = edgec(&[
        "profile",
        "-m",
        m,
        "--calib-tokens",
        &tokens,
        "--context",
        "/nonexistent-model",
        "-o",
        "/tmp/x.json",
    ]);
    assert!(!o.status.success());
}

#[test]
fn policy_refined_by_measurement_keeps_the_best_measured_policy() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = token_file(dir.path(), 3000);
    let prof = dir.path().join("sens.json");
    let model = common::tiny_llama();
    let m = model.to_str().unwrap();
    let o = profile_small(
        m,
        &tokens,
        &prof,
        &[
            "--bits",
            "2,3,4",
            "--sparsity",
            "0,0.5",
            "--e2e-layers",
            "0",
            "--e2e-samples",
            "1",
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = dir.path().join("p.toml");
    let trials = dir.path().join("trials.jsonl");
    let o = edgec(&[
        "policy",
        "--profile",
        prof.to_str().unwrap(),
        "--budget",
        "bits=3,sparsity=0.25",
        "--refine",
        "3",
        "--model",
        m,
        "--calib",
        &tokens,
        "--refine-text",
        &tokens,
        "--token-ids",
        "--samples",
        "2",
        "--seq",
        "64",
        "--refine-samples",
        "3",
        "--trials-out",
        trials.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(v["bits"].as_f64().unwrap() <= 3.0 + 1e-9 && v["sparsity"].as_f64().unwrap() >= 0.25 - 1e-9);
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&trials)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // Up to three distinct starts (knapsack, uniform, edge-llm), then up to three moves.
    assert!((2..=6).contains(&lines.len()), "{} trials", lines.len());
    assert_eq!(lines[0]["origin"]["start"], "optimal");
    // The policy written is the measured best, and every trial's loss is a real loss.
    let best = lines
        .iter()
        .min_by(|a, b| {
            a["loss"]
                .as_f64()
                .unwrap()
                .total_cmp(&b["loss"].as_f64().unwrap())
        })
        .unwrap();
    assert!(lines.iter().all(|t| t["loss"].as_f64().unwrap().is_finite()));
    let labels: Vec<String> = v["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["label"].as_str().unwrap().to_string())
        .collect();
    let best: Vec<String> = best["choice"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap().to_string())
        .collect();
    assert_eq!(labels, best);
    // Refinement without the text to measure on, or on another method: clear errors.
    let o = edgec(&[
        "policy",
        "--profile",
        prof.to_str().unwrap(),
        "--budget",
        "bits=3",
        "--refine",
        "1",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--refine-text"));
    let o = edgec(&[
        "policy",
        "--profile",
        prof.to_str().unwrap(),
        "--budget",
        "bits=3",
        "--method",
        "uniform",
        "--refine",
        "1",
        "--refine-text",
        &tokens,
        "-o",
        out.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("optimal"));
}
