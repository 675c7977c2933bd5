//! Bundles end to end on the tiny-llama fixture: `edgec build` -> `Bundle::open` gives the
//! loss of `edgec eval` and of transformers; every target in targets/ builds and verifies;
//! changed, truncated, unsigned, untrusted and foreign-ISA bundles are refused.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

use edge_runtime::bundle::{self, Bundle, BundleError, TrustPolicy, verify_file};
use edge_runtime::ir::WeightData;
use edge_runtime::{Executor, eval};
use edgec::frontend::{LoadOptions, load};
use edgec::luc::compress::compress_graph;
use edgec::luc::policy::Policy;

fn edgec(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_edgec"))
        .args(args)
        .output()
        .expect("run edgec")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A key pair in `dir`: (private, public).
fn keys(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let k = dir.join(name);
    let key = bundle::generate_key().unwrap();
    let public = bundle::write_key_pair(&k, &key, false).unwrap();
    (k, public)
}

fn build(out: &Path, extra: &[&str]) -> Output {
    let fixture = common::tiny_llama();
    let mut args = vec![
        "build",
        "--model",
        fixture.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    edgec(&args)
}

fn trusting(public: &Path) -> TrustPolicy {
    TrustPolicy::from_key_files(&[public.to_path_buf()], false).unwrap()
}

/// The fixture's reference token sequences (transformers' `input_ids`).
fn reference_sequences() -> (Vec<Vec<u32>>, f64) {
    let r = common::read_reference(&common::tiny_llama().join("reference.safetensors"));
    let (shape, ids) = &r["input_ids"];
    let s = shape[1];
    let seqs = ids
        .chunks(s)
        .map(|c| c.iter().map(|&x| x as u32).collect())
        .collect();
    (seqs, r["loss"].1[0] as f64)
}

fn loss(graph: Arc<edge_runtime::ir::Graph>, seqs: &[Vec<u32>]) -> f64 {
    let exec = Executor::new(graph).unwrap();
    eval::sequence_loss(&exec, seqs, |_, _| {}).unwrap().loss
}

fn policy_text(layers: usize) -> String {
    let mut s = String::from("model = \"tiny\"\nmethod = \"uniform\"\nbudget = \"bits=4\"\n");
    for i in 0..layers {
        // Alternate plain 4-bit and 2:4-sparse 8-bit layers so both packed kinds travel.
        let (bits, sparsity, pattern) = if i % 2 == 0 {
            (4, 0.0, "unstructured")
        } else {
            (8, 0.5, "2:4")
        };
        s += &format!(
            "\n[[layer]]\nindex = {i}\nbits = {bits}\ngroup = 32\nscheme = \"asym\"\nsparsity = {sparsity}\n\
             pattern = \"{pattern}\"\nquantizer = \"rtn\"\npruner = \"magnitude\"\n"
        );
    }
    s
}

#[test]
fn host_bundle_gives_the_loss_of_edgec_eval_and_transformers() {
    let dir = tempfile::tempdir().unwrap();
    let (key, public) = keys(dir.path(), "k");
    let out = dir.path().join("tiny.edgeb");
    let o = build(&out, &["--target", "host", "--sign-key", key.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let b = Bundle::open(&out, &trusting(&public)).unwrap();
    assert_eq!(b.target().name, "host");
    assert!(b.signer().is_some() && b.verification().trusted);
    // Zero copy: every weight is a range of the mapped bundle.
    assert!(b.graph().weights.iter().all(|w| w.data.is_mapped()));

    let (seqs, transformers) = reference_sequences();
    let from_bundle = loss(b.graph_arc(), &seqs);
    let source = load(&common::tiny_llama(), &LoadOptions::default()).unwrap();
    let exec = Executor::new(Arc::new(source.graph.clone())).unwrap();
    let from_model = edgec::eval::sequence_loss(&exec, &seqs, |_, _| {}).unwrap().loss;
    assert!(
        ((from_bundle - from_model) / from_model).abs() <= 1e-4,
        "bundle {from_bundle} vs edgec eval {from_model}"
    );
    assert!(
        (from_bundle - transformers).abs() <= 1e-4,
        "bundle {from_bundle} vs transformers {transformers}"
    );
}

#[test]
fn compressed_bundle_gives_the_loss_of_the_compressed_model() {
    let dir = tempfile::tempdir().unwrap();
    let (key, public) = keys(dir.path(), "k");
    let policy_path = dir.path().join("policy.toml");
    std::fs::write(&policy_path, policy_text(4)).unwrap();
    let out = dir.path().join("q.edgeb");
    let o = build(
        &out,
        &[
            "--target",
            "host",
            "--policy",
            policy_path.to_str().unwrap(),
            "--sign-key",
            key.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let b = Bundle::open(&out, &trusting(&public)).unwrap();
    assert_eq!(b.policy(), policy_text(4));
    let packed: Vec<_> = b.graph().weights.iter().filter_map(|w| w.data.packed()).collect();
    assert_eq!(packed.len(), 4 * 7, "every linear of every layer is packed");
    assert!(packed.iter().all(|p| p.is_mapped()));
    assert!(
        packed
            .iter()
            .any(|p| p.format().to_string().starts_with("2:4+q8"))
    );

    // The same compression in process, as `edgec compress` + `edgec eval` do.
    let source = load(&common::tiny_llama(), &LoadOptions::default()).unwrap();
    let policy = Policy::parse(&policy_text(4), Some(4)).unwrap();
    let (g, _) = compress_graph(&source.graph, &policy, None, |_, _| {}).unwrap();
    for (a, w) in g.weights.iter().zip(&b.graph().weights) {
        assert_eq!(a.name, w.name);
        if let (WeightData::Packed(x), WeightData::Packed(y)) = (&a.data, &w.data) {
            for (bx, by) in x.buffers().iter().zip(y.buffers().iter()) {
                assert_eq!(bx.1.as_slice(), by.1.as_slice(), "{} {}", a.name, bx.0);
            }
        }
    }
    let (seqs, _) = reference_sequences();
    let g = Arc::new(g);
    let exec = Executor::new(g.clone()).unwrap();
    let want = edgec::eval::sequence_loss(&exec, &seqs, |_, _| {}).unwrap().loss;
    let got = loss(b.graph_arc(), &seqs);
    assert!(
        ((got - want) / want).abs() <= 1e-4,
        "bundle {got} vs compressed model {want}"
    );

    // The kernel table: the 4-bit and the 2:4 layers' kernels, matched to their weights;
    // through the JIT the bundle computes what the compiler's JIT path does.
    let sources = b.kernel_sources();
    assert!(!b.kernels().is_empty() && !sources.is_empty());
    assert!(
        b.kernels().iter().all(|k| k.clif.contains("function")),
        "CLIF text"
    );
    assert!(
        sources
            .iter()
            .any(|s| s.weight.contains("layers.1.") && s.spec.pattern().is_some())
    );
    let set = edge_runtime::jit::KernelSet::compile(&sources).unwrap();
    let jit = Executor::with_kernels(b.graph_arc(), Arc::new(set)).unwrap();
    let got_jit = eval::sequence_loss(&jit, &seqs, |_, _| {}).unwrap().loss;
    let compiler_jit = edgec::codegen::executor(g, edgec::codegen::KernelMode::Jit).unwrap();
    let want_jit = edgec::eval::sequence_loss(&compiler_jit, &seqs, |_, _| {})
        .unwrap()
        .loss;
    assert!(
        ((got_jit - want_jit) / want_jit).abs() <= 1e-4,
        "bundle JIT {got_jit} vs compiler JIT {want_jit}"
    );
    // The JIT's int8 activations move the loss a little from the reference kernels.
    assert!(
        ((got_jit - got) / got).abs() <= 1e-2,
        "JIT {got_jit} vs reference {got}"
    );
}

#[test]
fn every_target_builds_verifies_and_runs_only_where_it_can() {
    let dir = tempfile::tempdir().unwrap();
    let (key, public) = keys(dir.path(), "k");
    let files = edgec::target::list(&common::repo().join("targets")).unwrap();
    let mut args = vec![
        "--sign-key".to_string(),
        key.to_str().unwrap().to_string(),
        "--json".into(),
    ];
    for f in &files {
        args.push("--target".into());
        args.push(f.file_stem().unwrap().to_string_lossy().into_owned());
    }
    let out = dir.path().join("bundles");
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = build(&out, &refs);
    assert!(o.status.success(), "{}", stderr(&o));
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(report["bundles"].as_array().unwrap().len(), files.len());
    let policy = trusting(&public);
    for f in &files {
        let name = f.file_stem().unwrap().to_string_lossy();
        let path = out.join(format!("{name}.edgeb"));
        let v = verify_file(&path, &policy).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(v.target.name, name);
        assert_eq!(v.tensors_checked, v.tensors);
        let t = edgec::target::load(f).unwrap();
        match Bundle::open(&path, &policy) {
            Ok(b) => assert!(t.runs_here(), "{name} opened on a machine it does not fit: {b:?}"),
            Err(BundleError::WrongArch { arch, .. }) => {
                assert_ne!(arch, std::env::consts::ARCH);
            }
            Err(BundleError::MissingFeatures { missing, .. }) => assert!(!t.runs_here(), "{missing}"),
            Err(e) => panic!("{name}: {e}"),
        }
        // The CLI agrees.
        let o = edgec(&[
            "verify",
            "--bundle",
            path.to_str().unwrap(),
            "--trusted-key",
            public.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
    }
}

/// Opens `path` expecting a refusal; returns the message.
fn refusal(path: &Path, policy: &TrustPolicy) -> (BundleError, String) {
    let e = Bundle::open(path, policy).expect_err("the bundle must be refused");
    let msg = e.to_string();
    assert!(
        msg.contains(&path.display().to_string()),
        "the error names the file: {msg}"
    );
    (e, msg)
}

#[test]
fn changed_truncated_unsigned_untrusted_and_foreign_bundles_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (key, public) = keys(dir.path(), "k");
    let (_, other_public) = keys(dir.path(), "other");
    let good = dir.path().join("good.edgeb");
    let o = build(&good, &["--target", "host", "--sign-key", key.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let policy = trusting(&public);
    Bundle::open(&good, &policy).unwrap();
    let bytes = std::fs::read(&good).unwrap();
    let write = |name: &str, b: &[u8]| {
        let p = dir.path().join(name);
        std::fs::write(&p, b).unwrap();
        p
    };

    // One byte flipped in the tensor data, in the manifest, in the signature.
    for (name, at) in [
        ("data.edgeb", bytes.len() / 2),
        ("manifest.edgeb", 40),
        ("sig.edgeb", bytes.len() - 3),
    ] {
        let mut b = bytes.clone();
        b[at] ^= 0x10;
        let p = write(name, &b);
        let (e, msg) = refusal(&p, &policy);
        if name == "sig.edgeb" {
            assert!(matches!(e, BundleError::BadSignature { .. }), "{msg}");
        } else {
            assert!(matches!(e, BundleError::HashMismatch { .. }), "{msg}");
            assert!(msg.contains("changed"), "{msg}");
        }
        // --allow-unsigned does not make corrupt bytes acceptable.
        assert!(
            Bundle::open(
                &p,
                &TrustPolicy {
                    allow_unsigned: true,
                    ..policy.clone()
                }
            )
            .is_err()
        );
        let o = edgec(&[
            "verify",
            "--bundle",
            p.to_str().unwrap(),
            "--trusted-key",
            public.to_str().unwrap(),
        ]);
        assert!(!o.status.success() && stderr(&o).contains(name), "{}", stderr(&o));
    }

    // Truncated: the tail cut off, or cut in the middle.
    for (name, len) in [
        ("cut-tail.edgeb", bytes.len() - 10),
        ("cut-half.edgeb", bytes.len() / 2),
        ("cut-head.edgeb", 12),
    ] {
        let p = write(name, &bytes[..len]);
        let (e, msg) = refusal(&p, &policy);
        assert!(matches!(e, BundleError::Truncated { .. }), "{msg}");
        assert!(msg.contains("truncated"), "{msg}");
    }
    let p = write("empty.edgeb", b"");
    let (e, msg) = refusal(&p, &policy);
    assert!(matches!(e, BundleError::NotABundle { .. }), "{msg}");

    // Unsigned: refused, accepted for development.
    let unsigned = dir.path().join("unsigned.edgeb");
    let o = build(&unsigned, &["--target", "host", "--unsigned"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let (e, msg) = refusal(&unsigned, &policy);
    assert!(
        matches!(e, BundleError::Unsigned { .. }) && msg.contains("--allow-unsigned"),
        "{msg}"
    );
    let dev = TrustPolicy {
        allow_unsigned: true,
        ..policy.clone()
    };
    assert!(Bundle::open(&unsigned, &dev).unwrap().signer().is_none());
    let o = edgec(&["build", "--model", "x", "--target", "host", "-o", "y"]);
    assert!(
        !o.status.success() && stderr(&o).contains("--sign-key"),
        "{}",
        stderr(&o)
    );

    // Signed by a key that is not trusted.
    let (e, msg) = refusal(&good, &trusting(&other_public));
    assert!(
        matches!(e, BundleError::UntrustedKey { .. }) && msg.contains("not trusted"),
        "{msg}"
    );
    let o = edgec(&[
        "verify",
        "--bundle",
        good.to_str().unwrap(),
        "--trusted-key",
        other_public.to_str().unwrap(),
        "--json",
    ]);
    assert!(!o.status.success());
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["ok"], false);
    assert!(j["error"].as_str().unwrap().contains("not trusted"));

    // Built for another instruction set.
    let foreign = if std::env::consts::ARCH == "x86_64" {
        "raspberry-pi-5"
    } else {
        "x86-64-avx2"
    };
    let fp = dir.path().join("foreign.edgeb");
    let o = build(&fp, &["--target", foreign, "--sign-key", key.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    verify_file(&fp, &policy).unwrap();
    let (e, msg) = refusal(&fp, &policy);
    assert!(
        matches!(e, BundleError::WrongArch { .. }) && msg.contains(foreign),
        "{msg}"
    );
}

#[test]
fn a_tensor_changed_and_resigned_fails_its_own_hash() {
    // Someone holding the key re-hashes and re-signs a changed file: the trailer checks
    // pass, the per-tensor SHA-256 in the manifest does not.
    let dir = tempfile::tempdir().unwrap();
    let (key, public) = keys(dir.path(), "k");
    let out = dir.path().join("t.edgeb");
    let o = build(&out, &["--target", "host", "--sign-key", key.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let mut b = std::fs::read(&out).unwrap();
    let mid = b.len() / 2;
    b[mid] ^= 1;
    let t = b.len() - bundle::TRAILER_LEN;
    use sha2::Digest;
    let digest: [u8; 32] = sha2::Sha256::digest(&b[..t]).into();
    b[t + 16..t + 48].copy_from_slice(&digest);
    let sk = bundle::read_signing_key(&key).unwrap();
    use ed25519_dalek::Signer;
    let sig = sk.sign(&bundle::writer::signed_message(&digest));
    b[t + 80..t + 144].copy_from_slice(&sig.to_bytes());
    std::fs::write(&out, &b).unwrap();
    let e = verify_file(&out, &trusting(&public)).unwrap_err();
    assert!(matches!(e, BundleError::TensorHash { .. }), "{e}");
}

#[test]
fn a_budget_the_model_exceeds_is_a_build_error_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let src = std::fs::read_to_string(common::repo().join("targets/raspberry-pi-5.toml")).unwrap();
    let tdir = dir.path().join("t");
    std::fs::create_dir(&tdir).unwrap();
    std::fs::write(
        tdir.join("raspberry-pi-5.toml"),
        src.replace("model_memory = \"4 GiB\"", "model_memory = \"64 KiB\""),
    )
    .unwrap();
    let out = dir.path().join("out.edgeb");
    let o = build(
        &out,
        &[
            "--target",
            "raspberry-pi-5",
            "--targets-dir",
            tdir.to_str().unwrap(),
            "--unsigned",
        ],
    );
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("raspberry-pi-5") && e.contains("over by") && e.contains("65536"),
        "{e}"
    );
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(!out.exists() && left.len() == 1, "left behind: {left:?}");

    // A bad target file fails before the model is read, naming file and line.
    std::fs::write(
        tdir.join("raspberry-pi-5.toml"),
        src.replace("[cores]", "[cores]\nthreads = 4"),
    )
    .unwrap();
    let o = build(
        &out,
        &[
            "--target",
            "raspberry-pi-5",
            "--targets-dir",
            tdir.to_str().unwrap(),
            "--unsigned",
        ],
    );
    let e = stderr(&o);
    assert!(
        !o.status.success() && e.contains("raspberry-pi-5.toml:13:") && e.contains("threads"),
        "{e}"
    );
}
