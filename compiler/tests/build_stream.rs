//! The layer-streaming build (`edgec::build_stream`) writes the bytes of the whole-graph
//! build for every policy (round-to-nearest, magnitude, Wanda, SparseGPT, GPTQ, mixed per
//! layer, unstructured and N:M): `edgec build` with and without `--no-stream` on the
//! tiny-llama fixture gives identical files, and the skeleton it plans on has the
//! compressed graph's formats and sizes.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use edgec::build_stream::{StreamedBuild, streamable};
use edgec::frontend::{LoadOptions, load};
use edgec::luc::calib::samples_from_tokens;
use edgec::luc::compress::compress_graph;
use edgec::luc::policy::Policy;

fn edgec(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_edgec"))
        .args(args)
        .output()
        .expect("run edgec")
}

/// A round-to-nearest policy mixing bit widths, groups and schemes; `sparse`: layer 1 is
/// 2:4-pruned instead.
fn policy_text(layers: usize, sparse: bool) -> String {
    let mut s = String::from("model = \"tiny\"\nmethod = \"uniform\"\nbudget = \"bits=4\"\n");
    for i in 0..layers {
        let (bits, group, scheme) = [(4, 32, "asym"), (8, 64, "sym"), (3, 32, "asym"), (2, 32, "sym")][i % 4];
        let (sparsity, pattern) = if sparse && i == 1 {
            (0.5, "2:4")
        } else {
            (0.0, "unstructured")
        };
        s += &format!(
            "\n[[layer]]\nindex = {i}\nbits = {bits}\ngroup = {group}\nscheme = \"{scheme}\"\n\
             sparsity = {sparsity}\npattern = \"{pattern}\"\nquantizer = \"rtn\"\npruner = \"magnitude\"\n"
        );
    }
    s
}

/// One `[[layer]]` of a policy.
fn layer(i: usize, bits: u8, sparsity: f64, pattern: &str, quantizer: &str, pruner: &str) -> String {
    format!(
        "\n[[layer]]\nindex = {i}\nbits = {bits}\ngroup = 32\nscheme = \"asym\"\nsparsity = {sparsity}\n\
         pattern = \"{pattern}\"\nquantizer = \"{quantizer}\"\npruner = \"{pruner}\"\n"
    )
}

/// Policies whose methods need calibration statistics, 4 layers each: every layer one
/// method (`gptq`, `wanda`, `sparsegpt`, `sparsegpt-nm`), and one mixing them per layer
/// (`mixed`: GPTQ, magnitude 4:8 + RTN, Wanda + GPTQ, SparseGPT 2:4). SparseGPT at 0.45
/// prunes 58 + 22 of down_proj's 176 columns per row (per 128-column block) and keeps 96,
/// magnitude and Wanda prune 79 and keep 97: a skeleton sized by the wrong count
/// would have a group more per row.
fn calibrated_policies() -> Vec<(&'static str, String)> {
    let head = "model = \"tiny\"\nmethod = \"uniform\"\nbudget = \"bits=4\"\n";
    let uniform = |f: &dyn Fn(usize) -> String| head.to_string() + &(0..4).map(f).collect::<String>();
    vec![
        (
            "gptq",
            uniform(&|i| layer(i, [4, 3, 8, 2][i], 0.0, "unstructured", "gptq", "magnitude")),
        ),
        (
            "wanda",
            uniform(&|i| layer(i, 4, 0.3, "unstructured", "rtn", "wanda")),
        ),
        (
            "sparsegpt",
            uniform(&|i| layer(i, 4, 0.45, "unstructured", "gptq", "sparsegpt")),
        ),
        (
            "sparsegpt-nm",
            uniform(&|i| layer(i, 3, 0.5, "2:4", "gptq", "sparsegpt")),
        ),
        (
            "mixed",
            head.to_string()
                + &layer(0, 4, 0.0, "unstructured", "gptq", "magnitude")
                + &layer(1, 4, 0.5, "4:8", "rtn", "magnitude")
                + &layer(2, 3, 0.25, "unstructured", "gptq", "wanda")
                + &layer(3, 4, 0.5, "2:4", "rtn", "sparsegpt"),
        ),
    ]
}

/// Calibration for the fixture (no tokenizer): token ids, as `--calib` takes them.
fn calib_tokens() -> Vec<u32> {
    (0..700u32).map(|t| (t * 37 + t / 5) % 256).collect()
}

/// Builds the fixture for a fixed target (not `host`, whose figures are measured at each
/// run) and returns the bundle's bytes and whether the build streamed.
fn build(dir: &Path, name: &str, policy: Option<&Path>, extra: &[&str]) -> (Vec<u8>, bool) {
    let fixture = common::tiny_llama();
    let out = dir.join(name);
    let mut args = vec![
        "build",
        "--model",
        fixture.to_str().unwrap(),
        "--target",
        "x86-64-avx2",
        "--unsigned",
        "--json",
        "-o",
        out.to_str().unwrap(),
    ];
    if let Some(p) = policy {
        args.extend(["--policy", p.to_str().unwrap()]);
    }
    args.extend_from_slice(extra);
    let o = edgec(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let streamed = report["bundles"][0]["streamed_build"].as_bool().unwrap();
    (std::fs::read(&out).unwrap(), streamed)
}

#[test]
fn streamed_build_writes_the_bytes_of_the_whole_graph_build() {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("p.toml");
    std::fs::write(&policy, policy_text(4, false)).unwrap();
    for (tag, p) in [("plain", None), ("rtn", Some(policy.as_path()))] {
        let (streamed, s1) = build(dir.path(), &format!("{tag}-s.edgeb"), p, &[]);
        let (whole, s2) = build(dir.path(), &format!("{tag}-w.edgeb"), p, &["--no-stream"]);
        assert!(s1 && !s2, "{tag}: streamed {s1}, whole {s2}");
        assert!(streamed.len() > 1000);
        assert!(streamed == whole, "{tag}: the streamed bundle's bytes differ");
    }
}

#[test]
fn pruned_and_calibrated_policies_stream_to_the_same_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let calib = dir.path().join("calib.txt");
    let ids: Vec<String> = calib_tokens().iter().map(u32::to_string).collect();
    std::fs::write(&calib, ids.join(" ")).unwrap();
    let extra = [
        "--calib",
        calib.to_str().unwrap(),
        "--samples",
        "3",
        "--seq",
        "24",
    ];
    let mut policies = vec![("pruned", policy_text(4, true))];
    policies.extend(calibrated_policies().into_iter().filter(|(t, _)| *t == "mixed"));
    for (tag, text) in policies {
        let policy = dir.path().join(format!("{tag}.toml"));
        std::fs::write(&policy, text).unwrap();
        let (streamed, s1) = build(dir.path(), &format!("{tag}-s.edgeb"), Some(&policy), &extra);
        let whole_args = [&extra[..], &["--no-stream"]].concat();
        let (whole, s2) = build(dir.path(), &format!("{tag}-w.edgeb"), Some(&policy), &whole_args);
        assert!(s1 && !s2, "{tag}: streamed {s1}, whole {s2}");
        assert!(streamed == whole, "{tag}: the streamed bundle's bytes differ");
    }
}

#[test]
fn only_a_bad_policy_is_not_streamable() {
    let p = Policy::parse(&policy_text(4, true), Some(4)).unwrap();
    assert!(streamable(&p, false).is_ok());
    // Without a named quantizer, calibration text means GPTQ.
    let mut p = Policy::parse(&policy_text(4, false), Some(4)).unwrap();
    p.layers[2].quantizer = None;
    assert!(streamable(&p, false).is_ok() && streamable(&p, true).is_ok());
    p.layers[1].pruner = Some("random".into());
    assert!(streamable(&p, true).unwrap_err().contains("random"));
    // GPTQ without calibration samples is refused when the build is set up.
    let m = load(&common::tiny_llama(), &LoadOptions::default()).unwrap();
    let (_, text) = &calibrated_policies()[0];
    let p = Policy::parse(text, Some(4)).unwrap();
    let e = StreamedBuild::new(&m.graph, Some(&p), None)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("--calib"), "{e}");
}

/// Checks a streamed build's skeleton and produced weights against `compress_graph`'s
/// graph: names, formats, sizes, and every byte, whole matrices and a few row tiles at a
/// time, and in a second pass (a second target starts the compression again).
fn check_skeleton_and_bytes(tag: &str, policy: &Policy, samples: Option<&[Vec<u32>]>) {
    let m = load(&common::tiny_llama(), &LoadOptions::default()).unwrap();
    let (real, _) = compress_graph(&m.graph, policy, samples, |_, _| {}).unwrap();
    // Whole matrices (the default on the fixture), 5000 weights and 1 weight (one 32-row
    // tile) at a time.
    for chunk in [None, Some(5000), Some(1)] {
        let mut s = StreamedBuild::new(&m.graph, Some(policy), samples).unwrap();
        if let Some(c) = chunk {
            s = s.with_chunk_elems(c);
        }
        let sk = s.skeleton().clone();
        assert_eq!(sk.weights.len(), real.weights.len());
        for pass in 0..2 {
            let mut packed = 0;
            for (i, (a, b)) in sk.weights.iter().zip(&real.weights).enumerate() {
                assert_eq!(a.name, b.name);
                assert_eq!(a.data.format(), b.data.format(), "{tag}: {}", a.name);
                assert_eq!(
                    a.data.storage_bytes(),
                    b.data.storage_bytes(),
                    "{tag}: {}",
                    a.name
                );
                // The produced weight is the compressed one, byte for byte.
                let w = s.weight(i).unwrap();
                let mut bytes = |d: &edge_runtime::ir::WeightData| -> Vec<Vec<u8>> {
                    match d {
                        edge_runtime::ir::WeightData::Dense(t) => vec![t.raw().to_vec()],
                        edge_runtime::ir::WeightData::Packed(p) => {
                            packed += 1;
                            p.buffers().iter().map(|(_, b)| b.as_slice().to_vec()).collect()
                        }
                    }
                };
                assert!(
                    bytes(&w) == bytes(&b.data),
                    "{tag}: {} (chunk {chunk:?}, pass {pass})",
                    a.name
                );
            }
            assert_eq!(packed, 2 * 4 * 7);
        }
    }
}

#[test]
fn the_skeleton_has_the_compressed_graphs_formats_and_sizes() {
    for (tag, sparse) in [("rtn", false), ("magnitude", true)] {
        let p = Policy::parse(&policy_text(4, sparse), Some(4)).unwrap();
        check_skeleton_and_bytes(tag, &p, None);
    }
    // A policy for another depth is refused.
    let m = load(&common::tiny_llama(), &LoadOptions::default()).unwrap();
    let p3 = Policy::parse(&policy_text(3, false), Some(3)).unwrap();
    assert!(StreamedBuild::new(&m.graph, Some(&p3), None).is_err());
}

#[test]
fn calibrated_policies_stream_the_bytes_of_compress_graph() {
    let samples = samples_from_tokens(&calib_tokens(), 3, 24, None).unwrap();
    for (tag, text) in calibrated_policies() {
        let p = Policy::parse(&text, Some(4)).unwrap();
        check_skeleton_and_bytes(tag, &p, Some(&samples));
    }
}

#[test]
fn a_produced_weight_unlike_its_declaration_or_a_producer_error_fails_and_writes_nothing() {
    use edge_runtime::bundle::{BundleContents, manifest, writer::write_streamed_bundle};
    let m = load(&common::tiny_llama(), &LoadOptions::default()).unwrap();
    let p = Policy::parse(&policy_text(4, false), Some(4)).unwrap();
    let mut s = StreamedBuild::new(&m.graph, Some(&p), None).unwrap();
    let sk = s.skeleton().clone();
    let contents = BundleContents {
        graph: &sk,
        tokenizer: None,
        policy: String::new(),
        target: manifest::Target::default(),
        kernels: vec![],
        compiler_version: "test".into(),
        source: "fixture".into(),
    };
    let packed = sk
        .weights
        .iter()
        .position(|w| matches!(w.data, edge_runtime::ir::WeightData::Packed(_)))
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("b.edgeb");
    // The source's dense weight where the skeleton declares a packed one.
    let e = write_streamed_bundle(
        &out,
        &contents,
        None,
        None,
        |i| Ok(m.graph.weights[i].data.clone()),
        |_, _| {},
    )
    .unwrap_err()
    .to_string();
    let name = &sk.weights[packed].name;
    assert!(e.contains(&format!("weight `{name}` was declared")), "{e}");
    let e = write_streamed_bundle(
        &out,
        &contents,
        None,
        None,
        |i| {
            if i == packed {
                Err("disk on fire".into())
            } else {
                s.weight(i).map_err(|e| e.to_string())
            }
        },
        |_, _| {},
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains(name.as_str()) && e.contains("disk on fire"), "{e}");
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "files left behind"
    );
}
