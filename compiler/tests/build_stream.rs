//! The layer-streaming build (`edgec::build_stream`) writes the bytes of the whole-graph
//! build: `edgec build` with and without `--no-stream` on the tiny-llama fixture gives
//! identical files, and the skeleton it plans on has the compressed graph's formats and
//! sizes.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use edgec::build_stream::{StreamedBuild, streamable};
use edgec::frontend::{LoadOptions, load};
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
fn a_pruned_policy_takes_the_whole_graph_path() {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("p.toml");
    std::fs::write(&policy, policy_text(4, true)).unwrap();
    let (_, streamed) = build(dir.path(), "s.edgeb", Some(&policy), &[]);
    assert!(!streamed);
    let p = Policy::parse(&policy_text(4, true), Some(4)).unwrap();
    assert!(streamable(&p, false).unwrap_err().contains("layer 1 is pruned"));
    // Without a named quantizer, calibration text means GPTQ.
    let mut p = Policy::parse(&policy_text(4, false), Some(4)).unwrap();
    assert!(streamable(&p, true).is_ok());
    p.layers[2].quantizer = None;
    assert!(streamable(&p, false).is_ok());
    assert!(streamable(&p, true).unwrap_err().contains("gptq"));
}

#[test]
fn the_skeleton_has_the_compressed_graphs_formats_and_sizes() {
    let m = load(&common::tiny_llama(), &LoadOptions::default()).unwrap();
    let p = Policy::parse(&policy_text(4, false), Some(4)).unwrap();
    let (real, _) = compress_graph(&m.graph, &p, None, |_, _| {}).unwrap();
    // Whole matrices (the default on the fixture), 1000 weights (a few rows) and 1 row at a time.
    for chunk in [None, Some(1000), Some(1)] {
        let mut s = StreamedBuild::new(&m.graph, Some(&p)).unwrap();
        if let Some(c) = chunk {
            s = s.with_chunk_elems(c);
        }
        let sk = s.skeleton().clone();
        assert_eq!(sk.weights.len(), real.weights.len());
        let mut packed = 0;
        for (i, (a, b)) in sk.weights.iter().zip(&real.weights).enumerate() {
            assert_eq!(a.name, b.name);
            assert_eq!(a.data.format(), b.data.format(), "{}", a.name);
            assert_eq!(a.data.storage_bytes(), b.data.storage_bytes(), "{}", a.name);
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
            assert!(bytes(&w) == bytes(&b.data), "{} (chunk {chunk:?})", a.name);
        }
        assert_eq!(packed, 2 * 4 * 7);
    }
    // A policy for another depth is refused.
    let p3 = Policy::parse(&policy_text(3, false), Some(3)).unwrap();
    assert!(StreamedBuild::new(&m.graph, Some(&p3)).is_err());
}

#[test]
fn a_produced_weight_unlike_its_declaration_or_a_producer_error_fails_and_writes_nothing() {
    use edge_runtime::bundle::{BundleContents, manifest, writer::write_streamed_bundle};
    let m = load(&common::tiny_llama(), &LoadOptions::default()).unwrap();
    let p = Policy::parse(&policy_text(4, false), Some(4)).unwrap();
    let mut s = StreamedBuild::new(&m.graph, Some(&p)).unwrap();
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
