//! The device service end to end, over loopback gRPC with the real binaries: `edge-runtime
//! serve` as a child process, `edgec deploy / status / remote-generate` as clients.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Once};
use std::time::Duration;

use edge_proto::runtime as pb;
use edge_runtime::bundle::{
    BundleContents, SigningKey, TrustPolicy, generate_key, manifest, read_verifying_key, write_bundle,
    write_key_pair,
};
use edge_runtime::{Executor, Rows};
use edgec::client::{self, Client, DeviceOptions};
use edgec::frontend::{self, LoadOptions};

const TOKEN: &str = "test-token-0123456789abcdef";

/// `edge-runtime` lives in another package, so cargo does not hand its path to this test.
/// `cargo test --workspace` builds it beside `edgec` in the same invocation (the runtime has
/// integration tests, so cargo links its binary), with the same feature set; use that one.
/// `EDGE_RUNTIME_BIN` overrides the path. Only when it is missing (this test run alone) is it
/// built here, with the workspace's feature set so that no dependency is compiled a second
/// time under other features.
fn runtime_bin() -> PathBuf {
    static BUILD: Once = Once::new();
    if let Some(path) = std::env::var_os("EDGE_RUNTIME_BIN") {
        return PathBuf::from(path);
    }
    let edgec = PathBuf::from(env!("CARGO_BIN_EXE_edgec"));
    let runtime = edgec.with_file_name("edge-runtime");
    BUILD.call_once(|| {
        if runtime.exists() {
            return;
        }
        let mut cmd = Command::new(env!("CARGO"));
        cmd.args(["build", "-q", "--workspace", "--bins"]);
        if edgec.parent().is_some_and(|p| p.ends_with("release")) {
            cmd.arg("--release");
        }
        assert!(
            cmd.status().expect("cargo build").success(),
            "building edge-runtime failed"
        );
    });
    runtime
}

/// Uploads a dataset file to the device.
async fn upload_dataset(c: &mut Client, url: &str, path: &Path, sha256: &str, size: u64) {
    let u = client::deploy::Upload {
        device: url,
        kind: pb::UploadKind::Dataset,
        path,
        sha256,
        size,
        chunk_bytes: 1 << 16,
        max_attempts: 2,
    };
    client::deploy::upload(c, &u, Arc::new(|_| {})).await.unwrap();
}

/// A byte-level tokenizer over tiny-llama's 256-token vocabulary (one token per byte, GPT-2's
/// byte-to-character mapping, no merges), so text prompts and perplexity work on the fixture.
fn byte_tokenizer() -> edge_runtime::tokenizer::Tokenizer {
    let mut bytes: Vec<u32> = (33..=126).chain(161..=172).chain(174..=255).collect();
    let mut chars = bytes.clone();
    for b in 0..256 {
        if !bytes.contains(&b) {
            bytes.push(b);
            chars.push(256 + chars.len() as u32 - 188);
        }
    }
    let mut vocab = serde_json::Map::new();
    for (b, c) in bytes.iter().zip(&chars) {
        vocab.insert(char::from_u32(*c).unwrap().to_string(), (*b).into());
    }
    let byte_level = serde_json::json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
    let json = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [], "normalizer": null,
        "pre_tokenizer": byte_level, "post_processor": null, "decoder": byte_level,
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": []},
    });
    edge_runtime::tokenizer::Tokenizer::from_json(&json.to_string(), false, Some(1), vec![2]).unwrap()
}

/// Keys, token and bundles shared by a test.
struct Setup {
    dir: tempfile::TempDir,
    key: SigningKey,
    public: PathBuf,
    token: PathBuf,
}

impl Setup {
    fn new() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let key = generate_key().unwrap();
        let public = write_key_pair(&dir.path().join("device-key"), &key, false).unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, format!("{TOKEN}\n")).unwrap();
        Setup {
            dir,
            key,
            public,
            token,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A bundle of the tiny-llama fixture (dense weights converted to `dtype` when given, so
    /// two bundles differ), signed by `key`.
    fn bundle(&self, name: &str, dtype: Option<edge_runtime::DType>, key: Option<&SigningKey>) -> PathBuf {
        let m = frontend::load(&common::tiny_llama(), &LoadOptions { dtype }).unwrap();
        let tokenizer = byte_tokenizer();
        let dest = self.path(name);
        let contents = BundleContents {
            graph: &m.graph,
            tokenizer: Some(&tokenizer),
            policy: String::new(),
            target: manifest::Target {
                name: "host".into(),
                arch: std::env::consts::ARCH.into(),
                features: vec![],
                description: String::new(),
            },
            kernels: vec![],
            compiler_version: "test".into(),
            source: "tiny-llama".into(),
        };
        write_bundle(&dest, &contents, key, |_, _| {}).unwrap();
        dest
    }

    /// 6,000 characters of the corpus's valid.txt as a dataset file: path, SHA-256, size.
    fn dataset(&self) -> (PathBuf, String, u64) {
        let data = self.path("data.txt");
        let text = std::fs::read_to_string(common::repo().join("data/austen/valid.txt")).unwrap();
        std::fs::write(&data, &text[..6000]).unwrap();
        let (sha, size) = client::deploy::file_sha256(&data).unwrap();
        (data, sha, size)
    }

    fn options(&self) -> DeviceOptions {
        DeviceOptions {
            token: TOKEN.into(),
            ca_cert: None,
            max_message_bytes: 4 << 20,
        }
    }

    fn device(&self, data: &str, extra: &[&str], env: &[(&str, &str)]) -> Device {
        let data_dir = self.path(data);
        let mut child = Command::new(runtime_bin())
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(&data_dir)
            .arg("--trusted-key")
            .arg(&self.public)
            .arg("--token-file")
            .arg(&self.token)
            .args(extra)
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn edge-runtime serve");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("edge-runtime serve did not start: {line:?}"))
            .to_string();
        Device {
            child,
            url: format!("http://{addr}"),
            data_dir,
        }
    }

    fn edgec(&self, args: &[&str]) -> std::process::Output {
        Command::new(env!("CARGO_BIN_EXE_edgec"))
            .args(args)
            .arg("--token-file")
            .arg(&self.token)
            .output()
            .unwrap()
    }

    /// `edgec deploy --bundle B --device URL --json` with `extra` arguments.
    fn deploy(&self, bundle: &Path, dev: &Device, extra: &[&str]) -> serde_json::Value {
        let mut args = vec![
            "deploy",
            "--bundle",
            bundle.to_str().unwrap(),
            "--device",
            &dev.url,
            "--json",
        ];
        args.extend_from_slice(extra);
        self.edgec_json(&args)
    }

    fn edgec_json(&self, args: &[&str]) -> serde_json::Value {
        let out = self.edgec(args);
        assert!(
            out.status.success(),
            "edgec {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }
}

struct Device {
    child: Child,
    url: String,
    data_dir: PathBuf,
}

impl Device {
    /// SIGKILL, no chance to clean up.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        self.kill();
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Greedy tokens of the bundle's graph run here with the executor (no service involved).
fn local_greedy(bundle: &Path, public: &Path, prompt: &[u32], n: usize) -> Vec<u32> {
    let policy = TrustPolicy::trusting(vec![read_verifying_key(public).unwrap()]);
    let b = edge_runtime::bundle::Bundle::open(bundle, &policy).unwrap();
    let exec = Executor::new(b.graph_arc()).unwrap();
    let mut s = exec.session(prompt.len() + n);
    let mut out = exec.forward(&mut s, prompt, Rows::Last, &[]).unwrap();
    let mut tokens = vec![];
    loop {
        let t = edge_runtime::sampling::argmax(&out.logits);
        tokens.push(t);
        if tokens.len() == n {
            return tokens;
        }
        out = exec.forward(&mut s, &[t], Rows::Last, &[]).unwrap();
    }
}

fn sha_of(path: &Path) -> String {
    client::deploy::file_sha256(path).unwrap().0
}

async fn generate(c: &mut Client, prompt: &[u32], n: u32) -> Result<Vec<u32>, tonic::Status> {
    let req = pb::GenerateRequest {
        prompt_tokens: prompt.to_vec(),
        max_tokens: n,
        ignore_eos: true,
        ..Default::default()
    };
    let mut stream = c.generate(req).await?.into_inner();
    let mut tokens = vec![];
    while let Some(m) = stream.message().await? {
        tokens.extend(m.token);
        if m.done {
            assert_eq!(m.generated_tokens as usize, tokens.len());
            return Ok(tokens);
        }
    }
    panic!("stream ended without its final message");
}

async fn query(c: &mut Client, sha: &str) -> pb::QueryUploadReply {
    let req = pb::QueryUploadRequest {
        sha256: sha.to_string(),
        kind: pb::UploadKind::Bundle as i32,
    };
    c.query_upload(req).await.unwrap().into_inner()
}

async fn list(c: &mut Client) -> pb::ListBundlesReply {
    c.list_bundles(pb::ListBundlesRequest {})
        .await
        .unwrap()
        .into_inner()
}

fn code(r: Result<impl std::fmt::Debug, tonic::Status>) -> tonic::Code {
    r.expect_err("the call should have been refused").code()
}

const PROMPT: [u32; 5] = [1, 17, 42, 99, 3];

#[test]
fn deploy_activate_generate_matches_local_run() {
    let s = Setup::new();
    let b1 = s.bundle("b1.edgeb", None, Some(&s.key));
    let dev = s.device("dev", &[], &[]);
    let v = s.deploy(&b1, &dev, &[]);
    let d = &v["devices"][0];
    assert_eq!(d["activated"], true, "{v}");
    assert_eq!(d["skipped"], false, "{v}");
    assert_eq!(d["sha256"], sha_of(&b1));
    // Installed under its hash, byte for byte.
    let installed = dev.data_dir.join("bundles").join(sha_of(&b1));
    assert_eq!(std::fs::read(&installed).unwrap(), std::fs::read(&b1).unwrap());

    let st = s.edgec_json(&["status", "--device", &dev.url, "--json"]);
    assert_eq!(st["devices"][0]["active_sha256"], sha_of(&b1), "{st}");
    assert_eq!(st["devices"][0]["bundles"][0]["name"], "b1.edgeb");

    // `edgec generate --device` is `remote-generate`.
    let prompt = PROMPT.map(|t| t.to_string()).join(",");
    let g = s.edgec_json(&[
        "generate",
        "--device",
        &dev.url,
        "--prompt-tokens",
        &prompt,
        "-n",
        "24",
        "--ignore-eos",
        "--json",
    ]);
    let remote: Vec<u32> = serde_json::from_value(g["tokens"].clone()).unwrap();
    assert_eq!(remote, local_greedy(&b1, &s.public, &PROMPT, 24));
    assert_eq!(g["finish_reason"], "length");

    // Voting modes other than `last` need exit heads.
    let out = s.edgec(&[
        "remote-generate",
        "--device",
        &dev.url,
        "--prompt-tokens",
        &prompt,
        "--voting",
        "mean",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("needs exit heads") && err.contains("InvalidArgument"),
        "{err}"
    );

    // A fleet: the first device has the bundle and is skipped, the second gets it; both
    // end up with it active.
    let dev2 = s.device("dev2", &[], &[]);
    let fleet = s.path("fleet.txt");
    std::fs::write(&fleet, format!("# test fleet\n{}\n\n", dev2.url)).unwrap();
    let v = s.deploy(&b1, &dev, &["--devices", fleet.to_str().unwrap()]);
    let by_url = |u: &str| {
        v["devices"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["device"] == u)
            .unwrap()
            .clone()
    };
    assert_eq!(by_url(&dev.url)["skipped"], true, "{v}");
    assert_eq!(by_url(&dev2.url)["skipped"], false, "{v}");
    assert_eq!(
        by_url(&dev2.url)["bytes_sent"],
        std::fs::metadata(&b1).unwrap().len(),
        "{v}"
    );
    assert!(
        v["devices"]
            .as_array()
            .unwrap()
            .iter()
            .all(|d| d["activated"] == true),
        "{v}"
    );
    drop(dev2);

    // A second bundle, then rollback to the first.
    let b2 = s.bundle("b2.edgeb", Some(edge_runtime::DType::F16), Some(&s.key));
    s.deploy(&b2, &dev, &[]);
    rt().block_on(async {
        let mut c = client::connect(&dev.url, &s.options()).await.unwrap();
        let l = list(&mut c).await;
        assert_eq!(
            (l.active.clone(), l.previous.clone()),
            (sha_of(&b2), vec![sha_of(&b1)])
        );
        assert_eq!(
            code(
                c.delete_bundle(pb::DeleteBundleRequest { sha256: sha_of(&b2) })
                    .await
            ),
            tonic::Code::FailedPrecondition
        );
        let r = c.rollback(pb::RollbackRequest {}).await.unwrap().into_inner();
        assert_eq!((r.active, r.previous), (sha_of(&b1), sha_of(&b2)));
        assert_eq!(generate(&mut c, &PROMPT, 24).await.unwrap(), remote);
        let d = c
            .delete_bundle(pb::DeleteBundleRequest { sha256: sha_of(&b2) })
            .await
            .unwrap();
        assert!(d.into_inner().deleted);
        let l = list(&mut c).await;
        assert_eq!(l.bundles.len(), 1);
    });
}

/// Sends `bytes[..cut]` and then holds the stream open until the call is dropped.
async fn cut_upload(c: &mut Client, bytes: Arc<Vec<u8>>, sha: String, cut: usize) {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let sender = tokio::spawn(async move {
        let total = bytes.len() as u64;
        let mut pos = 0;
        while pos < cut {
            let end = (pos + 4096).min(cut);
            let msg = pb::UploadChunk {
                sha256: if pos == 0 { sha.clone() } else { String::new() },
                total_size: total,
                offset: pos as u64,
                data: bytes[pos..end].to_vec(),
                name: String::new(),
            };
            if tx.send(msg).await.is_err() {
                return;
            }
            pos = end;
        }
        // Never finish: the connection is cut from this side instead.
        std::future::pending::<()>().await;
    });
    let call = c.upload_bundle(tokio_stream::wrappers::ReceiverStream::new(rx));
    // Let the chunks go out, then drop the call mid-stream.
    let _ = tokio::time::timeout(Duration::from_millis(500), call).await;
    sender.abort();
}

#[test]
fn upload_cut_at_a_random_byte_resumes_to_the_same_bundle() {
    let s = Setup::new();
    let b1 = s.bundle("b1.edgeb", None, Some(&s.key));
    let bytes = Arc::new(std::fs::read(&b1).unwrap());
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as usize;
    let cut = 1 + seed % (bytes.len() - 1);
    eprintln!("cutting the upload at byte {cut} of {}", bytes.len());
    let dev = s.device("dev", &[], &[]);
    let sha = sha_of(&b1);
    let held = rt().block_on(async {
        let mut c = client::connect(&dev.url, &s.options()).await.unwrap();
        cut_upload(&mut c, bytes.clone(), sha.clone(), cut).await;
        let q = query(&mut c, &sha).await;
        assert!(!q.installed);
        q.bytes_held
    });
    assert!(
        held <= cut as u64,
        "the device holds {held} bytes, more than the {cut} sent"
    );
    // The partial file is never taken for the bundle.
    assert!(!dev.data_dir.join("bundles").join(&sha).exists());
    let v = s.deploy(&b1, &dev, &["--chunk-bytes", "4096"]);
    let d = &v["devices"][0];
    assert_eq!(d["resumed_from"], held, "{v}");
    assert_eq!(d["bytes_sent"], bytes.len() as u64 - held, "{v}");
    assert_eq!(d["activated"], true);
    assert_eq!(
        std::fs::read(dev.data_dir.join("bundles").join(&sha)).unwrap(),
        *bytes
    );
}

#[test]
fn sigkill_during_install_keeps_serving_the_old_bundle() {
    let s = Setup::new();
    let b1 = s.bundle("b1.edgeb", None, Some(&s.key));
    let b2 = s.bundle("b2.edgeb", Some(edge_runtime::DType::F16), Some(&s.key));
    let (sha1, sha2) = (sha_of(&b1), sha_of(&b2));
    let expected = local_greedy(&b1, &s.public, &PROMPT, 16);
    {
        let dev = s.device("dev", &[], &[]);
        s.deploy(&b1, &dev, &[]);
    }
    // The device pauses between verifying and renaming; it is killed in that window.
    let mut dev = s.device("dev", &[], &[("EDGE_RUNTIME_FAULT_PAUSE_INSTALL_MS", "60000")]);
    let part = dev.data_dir.join("bundles").join(format!("{sha2}.part"));
    let size = std::fs::metadata(&b2).unwrap().len();
    let mut deploy = Command::new(env!("CARGO_BIN_EXE_edgec"))
        .args([
            "deploy",
            "--bundle",
            b2.to_str().unwrap(),
            "--device",
            &dev.url,
            "--json",
            "--token-file",
        ])
        .arg(&s.token)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    while std::fs::metadata(&part).map_or(0, |m| m.len()) < size {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the upload never completed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Hashing and signature checks take a moment; the pause holds the install open.
    std::thread::sleep(Duration::from_millis(500));
    dev.kill();
    let _ = deploy.kill();
    let _ = deploy.wait();

    let dev = s.device("dev", &[], &[]);
    rt().block_on(async {
        let mut c = client::connect(&dev.url, &s.options()).await.unwrap();
        let st = c.status(pb::StatusRequest {}).await.unwrap().into_inner();
        assert_eq!(st.active_sha256, sha1);
        assert_eq!(generate(&mut c, &PROMPT, 16).await.unwrap(), expected);
        let l = list(&mut c).await;
        assert_eq!(
            l.bundles.iter().map(|b| b.sha256.clone()).collect::<Vec<_>>(),
            vec![sha1.clone()]
        );
        let q = query(&mut c, &sha2).await;
        assert!(!q.installed);
        assert_eq!(q.bytes_held, size);
    });
    // Resuming finishes the install without sending the bytes again.
    let v = s.deploy(&b2, &dev, &[]);
    assert_eq!(v["devices"][0]["bytes_sent"], 0, "{v}");
    assert_eq!(v["devices"][0]["activated"], true, "{v}");
}

#[test]
fn tokens_limits_and_untrusted_bundles_are_refused() {
    let s = Setup::new();
    let b1 = s.bundle("b1.edgeb", None, Some(&s.key));
    let dev = s.device(
        "dev",
        &[
            "--max-message-bytes",
            "65536",
            "--max-new-tokens",
            "32",
            "--max-prompt-tokens",
            "16",
        ],
        &[],
    );
    let other = generate_key().unwrap();
    let untrusted = s.bundle("untrusted.edgeb", None, Some(&other));
    let unsigned = s.bundle("unsigned.edgeb", None, None);
    let tampered = s.path("tampered.edgeb");
    let mut bytes = std::fs::read(&b1).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x40;
    std::fs::write(&tampered, &bytes).unwrap();
    let deploy_err = |b: &Path| {
        let out = s.edgec(&[
            "deploy",
            "--bundle",
            b.to_str().unwrap(),
            "--device",
            &dev.url,
            "--chunk-bytes",
            "32768",
        ]);
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let e = deploy_err(&tampered);
    assert!(e.contains("InvalidArgument"), "{e}");
    let e = deploy_err(&untrusted);
    assert!(e.contains("PermissionDenied") && e.contains("not trusted"), "{e}");
    let e = deploy_err(&unsigned);
    assert!(e.contains("PermissionDenied") && e.contains("not signed"), "{e}");
    // Refused uploads leave nothing behind.
    let left: Vec<_> = std::fs::read_dir(dev.data_dir.join("bundles")).unwrap().collect();
    assert!(left.is_empty(), "{left:?}");

    rt().block_on(async {
        let mut good = client::connect(&dev.url, &s.options()).await.unwrap();
        // No active bundle yet.
        assert_eq!(
            code(generate(&mut good, &PROMPT, 4).await),
            tonic::Code::FailedPrecondition
        );
        let mut wrong = DeviceOptions {
            token: "wrong-token-0123456789abcdef".into(),
            ..s.options()
        };
        let mut c = client::connect(&dev.url, &wrong).await.unwrap();
        assert_eq!(
            code(c.status(pb::StatusRequest {}).await),
            tonic::Code::Unauthenticated
        );
        assert_eq!(
            code(generate(&mut c, &PROMPT, 4).await),
            tonic::Code::Unauthenticated
        );
        wrong.token = format!("{TOKEN}x");
        let mut c = client::connect(&dev.url, &wrong).await.unwrap();
        assert_eq!(
            code(c.list_bundles(pb::ListBundlesRequest {}).await),
            tonic::Code::Unauthenticated
        );
        // No token at all.
        let ch = client::channel(&dev.url, &s.options()).await.unwrap();
        let mut bare = pb::edge_runtime_client::EdgeRuntimeClient::new(ch.clone());
        assert_eq!(
            code(bare.status(pb::StatusRequest {}).await),
            tonic::Code::Unauthenticated
        );
        // Health needs no token.
        let mut health = tonic_health::pb::health_client::HealthClient::new(ch);
        let h = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: "edge.runtime.v1.EdgeRuntime".into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            h.status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32
        );

        let up = s.options();
        let mut c = client::connect(&dev.url, &up).await.unwrap();
        let sha = sha_of(&b1);
        let u = client::deploy::Upload {
            device: &dev.url,
            kind: pb::UploadKind::Bundle,
            path: &b1,
            sha256: &sha,
            size: std::fs::metadata(&b1).unwrap().len(),
            chunk_bytes: 32768,
            max_attempts: 2,
        };
        client::deploy::upload(&mut c, &u, Arc::new(|_| {}))
            .await
            .unwrap();
        c.activate(pb::ActivateRequest { sha256: sha.clone() })
            .await
            .unwrap();
        // A message over the device's limit.
        let huge = vec![7u32; 100_000];
        assert_eq!(
            code(generate(&mut c, &huge, 4).await),
            tonic::Code::ResourceExhausted
        );
        let long = vec![7u32; 17];
        assert_eq!(
            code(generate(&mut c, &long, 4).await),
            tonic::Code::InvalidArgument
        );
        assert_eq!(
            code(generate(&mut c, &PROMPT, 33).await),
            tonic::Code::InvalidArgument
        );
        assert_eq!(
            code(generate(&mut c, &[300], 4).await),
            tonic::Code::InvalidArgument
        );
        let bad = pb::GenerateRequest {
            prompt_tokens: PROMPT.to_vec(),
            top_p: 2.0,
            ..Default::default()
        };
        assert_eq!(code(c.generate(bad).await), tonic::Code::InvalidArgument);
        // An upload chunk over the limit.
        let big = client::deploy::Upload {
            device: &dev.url,
            kind: pb::UploadKind::Dataset,
            path: &b1,
            sha256: &sha,
            size: std::fs::metadata(&b1).unwrap().len(),
            chunk_bytes: 100_000,
            max_attempts: 1,
        };
        let e = client::deploy::upload(&mut c, &big, Arc::new(|_| {}))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Some(tonic::Code::ResourceExhausted), "{e}");
        // Deadlines are honoured on a stream.
        let mut req = tonic::Request::new(pb::GenerateRequest {
            prompt_tokens: PROMPT.to_vec(),
            max_tokens: 32,
            ignore_eos: true,
            ..Default::default()
        });
        req.set_timeout(Duration::from_nanos(1));
        let r = async {
            let mut st = c.generate(req).await?.into_inner();
            while st.message().await?.is_some() {}
            Ok::<_, tonic::Status>(())
        }
        .await;
        // tonic's server ends an expired unary phase with CANCELLED, the stream with
        // DEADLINE_EXCEEDED; either way the request does not run to its end.
        let c2 = code(r);
        assert!(
            matches!(c2, tonic::Code::DeadlineExceeded | tonic::Code::Cancelled),
            "{c2:?}"
        );
        // Still serving after all that.
        assert_eq!(generate(&mut c, &PROMPT, 8).await.unwrap().len(), 8);
    });
}

#[test]
fn concurrent_streams_match_a_single_stream() {
    let s = Setup::new();
    let b1 = s.bundle("b1.edgeb", None, Some(&s.key));
    let dev = s.device("dev", &["--max-streams", "64", "--workers", "2"], &[]);
    s.deploy(&b1, &dev, &[]);
    let prompts: Vec<Vec<u32>> = (0..4).map(|i| vec![1, 10 + i, 20 + 2 * i, 5]).collect();
    rt().block_on(async {
        let mut c = client::connect(&dev.url, &s.options()).await.unwrap();
        let mut alone = vec![];
        for p in &prompts {
            alone.push(generate(&mut c, p, 24).await.unwrap());
        }
        let tasks: Vec<_> = (0..64)
            .map(|i| {
                let (url, opts, p) = (dev.url.clone(), s.options(), prompts[i % 4].clone());
                tokio::spawn(async move {
                    let mut c = client::connect(&url, &opts).await.unwrap();
                    generate(&mut c, &p, 24).await.unwrap()
                })
            })
            .collect();
        for (i, t) in tasks.into_iter().enumerate() {
            assert_eq!(t.await.unwrap(), alone[i % 4], "stream {i}");
        }
        // Once all finished, every slot is free again.
        let st = c.status(pb::StatusRequest {}).await.unwrap().into_inner();
        assert_eq!((st.active_streams, st.max_streams), (0, 64));
    });
}

#[test]
fn python_grpcio_client_talks_to_the_device() {
    if Command::new("python3").arg("--version").output().is_err() {
        eprintln!("\n\n*** SKIPPED: python3 is not installed; the grpcio client check did not run ***\n\n");
        return;
    }
    let s = Setup::new();
    let b1 = s.bundle("b1.edgeb", None, Some(&s.key));
    let dev = s.device("dev", &[], &[]);
    s.deploy(&b1, &dev, &[]);
    let out = Command::new("bash")
        .arg(common::repo().join("scripts/grpc-python-check.sh"))
        .arg(dev.url.trim_start_matches("http://"))
        .arg(&s.token)
        .arg(PROMPT.map(|t| t.to_string()).join(","))
        .arg("12")
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    assert!(out.status.success(), "grpc-python-check.sh failed");
    let last = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap_or("")
        .to_string();
    let v: serde_json::Value = serde_json::from_str(&last).unwrap_or_else(|e| panic!("{e}: {last}"));
    let services: Vec<String> = serde_json::from_value(v["services"].clone()).unwrap();
    for want in ["edge.runtime.v1.EdgeRuntime", "grpc.health.v1.Health"] {
        assert!(
            services.iter().any(|s| s == want),
            "{want} not listed: {services:?}"
        );
    }
    assert_eq!(v["health"], "SERVING");
    assert_eq!(v["no_token"], "UNAUTHENTICATED");
    let tokens: Vec<u32> = serde_json::from_value(v["tokens"].clone()).unwrap();
    assert_eq!(tokens, local_greedy(&b1, &s.public, &PROMPT, 12));
}

#[test]
fn text_generation_and_evaluation_match_edge_runtime() {
    let s = Setup::new();
    let b1 = s.bundle("b1.edgeb", None, Some(&s.key));
    let dev = s.device("dev", &[], &[]);
    s.deploy(&b1, &dev, &[]);
    let runtime = |args: &[&str]| -> serde_json::Value {
        let out = Command::new(runtime_bin())
            .args(args)
            .arg("--bundle")
            .arg(&b1)
            .arg("--trusted-key")
            .arg(&s.public)
            .arg("--json")
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let prompt = "Hello, device!";
    let local = runtime(&["generate", "--prompt", prompt, "-n", "24", "--ignore-eos"]);
    let remote_text = |extra: &[&str]| {
        let mut args = vec![
            "remote-generate",
            "--device",
            &dev.url,
            "--prompt",
            prompt,
            "-n",
            "24",
        ];
        args.extend_from_slice(&["--ignore-eos", "--json"]);
        args.extend_from_slice(extra);
        s.edgec_json(&args)
    };
    let remote = remote_text(&[]);
    assert_eq!(remote["tokens"], local["tokens"]);
    assert_eq!(remote["text"], local["text"]);

    // A stop string taken from the middle of that text cuts the stream before it.
    let text = local["text"].as_str().unwrap().to_string();
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    let (at, _) = chars[chars.len() / 2];
    let stop: String = text[at..].chars().take(2).collect();
    let first = text.find(&stop).unwrap();
    let stopped = remote_text(&["--stop", &stop]);
    assert_eq!(stopped["finish_reason"], "stop", "{stopped}");
    assert_eq!(stopped["text"], text[..first], "stop string {stop:?}");

    // Perplexity of an uploaded text equals `edge-runtime eval` on the same bundle.
    let data = s.path("text.txt");
    let sentence = "The quick brown fox jumps over the lazy dog; pack my box with five dozen jugs. ";
    std::fs::write(&data, sentence.repeat(8)).unwrap();
    let local = runtime(&["eval", "--text", data.to_str().unwrap(), "--ctx", "32"]);
    let (sha, size) = client::deploy::file_sha256(&data).unwrap();
    rt().block_on(async {
        let mut c = client::connect(&dev.url, &s.options()).await.unwrap();
        let u = client::deploy::Upload {
            device: &dev.url,
            kind: pb::UploadKind::Dataset,
            path: &data,
            sha256: &sha,
            size,
            chunk_bytes: 100,
            max_attempts: 1,
        };
        client::deploy::upload(&mut c, &u, Arc::new(|_| {}))
            .await
            .unwrap();
        let req = pb::EvaluateRequest {
            dataset_sha256: sha.clone(),
            ctx: 32,
            ..Default::default()
        };
        let r = c.evaluate(req).await.unwrap().into_inner();
        let want = local["perplexity"].as_f64().unwrap();
        assert!(
            (r.perplexity - want).abs() <= 1e-6 * want,
            "{} vs {want}",
            r.perplexity
        );
        assert_eq!(r.tokens_scored, local["tokens_scored"].as_u64().unwrap());
        // Chunks too short for the protocol, or longer than the model's context.
        for ctx in [2, 256] {
            let req = pb::EvaluateRequest {
                dataset_sha256: sha.clone(),
                ctx,
                ..Default::default()
            };
            assert_eq!(code(c.evaluate(req).await), tonic::Code::InvalidArgument);
        }
    });
}

/// A CA and a device certificate for `localhost` / 127.0.0.1, made with the openssl CLI.
fn tls_files(s: &Setup) -> (PathBuf, PathBuf, PathBuf) {
    let d = s.dir.path();
    std::fs::write(
        d.join("ext.cnf"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n\
         keyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let steps: [Vec<&str>; 3] = [
        [
            &["req", "-x509"][..],
            &ec,
            &[
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-days",
                "2",
                "-subj",
                "/CN=edge-test-ca",
            ],
        ]
        .concat(),
        [
            &["req"][..],
            &ec,
            &["-keyout", "dev.key", "-out", "dev.csr", "-subj", "/CN=localhost"],
        ]
        .concat(),
        vec![
            "x509",
            "-req",
            "-in",
            "dev.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "dev.pem",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
        ],
    ];
    for args in steps {
        let out = Command::new("openssl")
            .args(&args)
            .current_dir(d)
            .output()
            .expect("the TLS test needs the openssl command");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    (d.join("ca.pem"), d.join("dev.pem"), d.join("dev.key"))
}

#[test]
fn tls_device_needs_the_right_ca() {
    let s = Setup::new();
    let (ca, cert, key) = tls_files(&s);
    let dev = s.device(
        "dev",
        &[
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
        &[],
    );
    let url = dev.url.replace("http://127.0.0.1", "https://localhost");
    let v = s.edgec_json(&[
        "status",
        "--device",
        &url,
        "--ca-cert",
        ca.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(v["devices"][0]["active_sha256"], "", "{v}");
    // Without the CA the certificate is not trusted; plain HTTP/2 is not served.
    for args in [
        vec!["status", "--device", url.as_str()],
        vec!["status", "--device", dev.url.as_str()],
    ] {
        let out = s.edgec(&args);
        assert!(!out.status.success(), "{args:?} should fail");
    }
}

/// Tunes on the device: a dataset uploaded, `Tune` streamed to the end, the adapters
/// exported in PEFT's layout; a cancelled job resumes from its checkpoint.
#[test]
fn tune_on_the_device_and_export_adapters() {
    let s = Setup::new();
    let b1 = s.bundle("b1.edgeb", None, Some(&s.key));
    let dev = s.device("dev", &[], &[]);
    assert_eq!(s.deploy(&b1, &dev, &[])["devices"][0]["activated"], true);
    let (data, sha, size) = s.dataset();
    rt().block_on(async {
        let mut c = client::connect(&dev.url, &s.options()).await.unwrap();
        upload_dataset(&mut c, &dev.url, &data, &sha, size).await;
        let req = pb::TuneRequest {
            dataset_sha256: sha.clone(),
            steps: 120,
            learning_rate: 1e-2,
            lora_rank: 2,
            seq_len: 32,
            checkpoint_every: 2,
            stride: 2,
            ..Default::default()
        };
        // Cancel at the first report (the job runs at most a channel's worth of steps ahead
        // of its reader): it stops with a checkpoint.
        let mut stream = c.tune(req.clone()).await.unwrap().into_inner();
        let mut job = String::new();
        let err = loop {
            match stream.message().await {
                Ok(Some(p)) => {
                    job = p.job_id.clone();
                    assert!(p.window_end >= p.window_start && p.total_steps == 120);
                    if p.step == 1 {
                        let st = c.status(pb::StatusRequest {}).await.unwrap().into_inner();
                        assert_eq!(st.tune_state, format!("running {job}"));
                        assert!(
                            c.cancel_tune(pb::CancelTuneRequest { job_id: job.clone() })
                                .await
                                .unwrap()
                                .into_inner()
                                .cancelled
                        );
                    }
                }
                Ok(None) => panic!("the cancelled job ended without an error"),
                Err(e) => break e,
            }
        };
        assert_eq!(err.code(), tonic::Code::Cancelled, "{err}");
        // Without resume the device refuses to start over; with it, the job continues.
        let again = c.tune(req.clone()).await.map(|_| ()).unwrap_err();
        assert_eq!(again.code(), tonic::Code::AlreadyExists, "{again}");
        let mut stream = c
            .tune(pb::TuneRequest {
                resume: true,
                ..req.clone()
            })
            .await
            .unwrap()
            .into_inner();
        let mut steps = vec![];
        let mut done = false;
        while let Some(p) = stream.message().await.unwrap() {
            assert_eq!(p.job_id, job);
            steps.push(p.step);
            done |= p.done;
        }
        assert!(
            done && steps.first().copied().unwrap_or(0) > 1,
            "resumed steps {steps:?}"
        );
        // The job has left the running set before its last message.
        let st = c.status(pb::StatusRequest {}).await.unwrap().into_inner();
        assert_eq!(st.tune_state, "idle");
        // The adapters, in PEFT's layout.
        let mut files: std::collections::BTreeMap<String, Vec<u8>> = Default::default();
        let mut ex = c
            .export_adapters(pb::ExportAdaptersRequest {
                job_id: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        while let Some(ch) = ex.message().await.unwrap() {
            let f = files.entry(ch.path.clone()).or_default();
            assert_eq!(f.len() as u64, ch.offset);
            f.extend_from_slice(&ch.data);
        }
        let cfg: serde_json::Value = serde_json::from_slice(&files["adapter_config.json"]).unwrap();
        assert_eq!(cfg["peft_type"], "LORA");
        assert_eq!(cfg["r"], 2);
        let st = safetensors::SafeTensors::deserialize(&files["adapter_model.safetensors"]).unwrap();
        let names = st.names();
        assert!(
            names.contains(&"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"),
            "{names:?}"
        );
        assert_eq!(names.len(), 4 * 7 * 2);
        let adapters = s.path("adapters");
        std::fs::create_dir_all(&adapters).unwrap();
        for (name, bytes) in &files {
            std::fs::write(adapters.join(name), bytes).unwrap();
        }
        tuned_generation_matches_local(&mut c, &s, &b1, &job, &adapters, &sha).await;
        // The same files through `edgec adapters`, and a short tune through `edgec tune --device`.
        let out = s.path("exported");
        let v = s.edgec_json(&[
            "adapters",
            "--device",
            &dev.url,
            "--job",
            &job,
            "-o",
            out.to_str().unwrap(),
            "--json",
        ]);
        assert_eq!(v["files"].as_array().unwrap().len(), files.len(), "{v}");
        for (name, bytes) in &files {
            assert_eq!(&std::fs::read(out.join(name)).unwrap(), bytes, "{name}");
        }
        let again = s.edgec(&["adapters", "--device", &dev.url, "-o", out.to_str().unwrap()]);
        assert!(
            !again.status.success(),
            "an existing directory is kept without --force"
        );
        let tuned_dir = s.path("cli-tuned");
        let cli = s.edgec(&[
            "tune",
            "--device",
            &dev.url,
            "--data",
            data.to_str().unwrap(),
            "--steps",
            "4",
            "--seq",
            "32",
            "--rank",
            "2",
            "--stride",
            "2",
            "--lr",
            "0.01",
            "--json",
            "-o",
            tuned_dir.to_str().unwrap(),
        ]);
        assert!(cli.status.success(), "{}", String::from_utf8_lossy(&cli.stderr));
        let lines: Vec<serde_json::Value> = String::from_utf8(cli.stdout)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let summary = lines.last().unwrap();
        let cli_job = summary["job_id"].as_str().unwrap().to_string();
        assert_ne!(cli_job, job);
        assert_eq!(lines.iter().filter(|l| l["done"] == true).count(), 1, "{lines:?}");
        assert_eq!(lines[lines.len() - 2]["step"], 4);
        assert!(
            tuned_dir.join("adapter_model.safetensors").is_file() && tuned_dir.join("voting.json").is_file()
        );
        let g = s.edgec_json(&[
            "remote-generate",
            "--device",
            &dev.url,
            "--prompt-tokens",
            "1,2,3",
            "-n",
            "5",
            "--ignore-eos",
            "--tune-job",
            &cli_job,
            "--voting",
            "weighted",
            "--draft-tokens",
            "2",
            "--json",
        ]);
        assert_eq!(g["tokens"].as_array().unwrap().len(), 5, "{g}");
        assert_eq!(g["tune_job"], cli_job.as_str());
        // A dataset the device does not hold.
        let e = c
            .tune(pb::TuneRequest {
                dataset_sha256: "ab".repeat(32),
                ..req
            })
            .await
            .map(|_| ())
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::NotFound);
    });
}

/// Greedy tokens of the bundle with the tuned adapters of `dir` attached, the exits combined
/// by `vote`, computed here with the runtime's library (no service involved).
fn local_tuned_greedy(
    bundle: &Path,
    public: &Path,
    dir: &Path,
    vote: &edge_runtime::train::vote::Vote,
    prompt: &[u32],
    n: usize,
) -> Vec<u32> {
    use edge_runtime::train::vote::{Tuned, combine, probabilities};
    let policy = TrustPolicy::trusting(vec![read_verifying_key(public).unwrap()]);
    let b = edge_runtime::bundle::Bundle::open(bundle, &policy).unwrap();
    let t = Tuned::load(b.graph(), dir).unwrap();
    let exec = Executor::new(Arc::new(t.graph)).unwrap();
    let taps = t.exits.taps();
    let mut s = exec.session(prompt.len() + n);
    let mut out = exec.forward(&mut s, prompt, Rows::Last, &taps).unwrap();
    let mut tokens = vec![];
    loop {
        let probs: Vec<Vec<f32>> = out
            .taps
            .iter()
            .enumerate()
            .map(|(i, h)| {
                let d = t.exits.heads[i].1.numel();
                probabilities(&t.exits.logits(i, &h[h.len() - d..]))
            })
            .collect();
        let next = edge_runtime::sampling::argmax(&combine(vote, &probs).unwrap());
        tokens.push(next);
        if tokens.len() == n {
            return tokens;
        }
        out = exec.forward(&mut s, &[next], Rows::Last, &taps).unwrap();
    }
}

/// After a device tune: Generate with the job's adapters and exits under every voting mode
/// equals the same tuned model computed locally; self-speculative decoding equals plain
/// greedy decoding (tuned and as built); Evaluate reports every exit and vote.
async fn tuned_generation_matches_local(
    c: &mut Client,
    s: &Setup,
    bundle: &Path,
    job: &str,
    dir: &Path,
    dataset: &str,
) {
    use edge_runtime::train::vote::Vote;
    let n = 20;
    let run = |voting: pb::VotingMode, tune_job: &str, draft: u32, layer: Option<u32>| pb::GenerateRequest {
        prompt_tokens: PROMPT.to_vec(),
        max_tokens: n,
        ignore_eos: true,
        voting: voting as i32,
        tune_job: tune_job.to_string(),
        draft_tokens: draft,
        draft_layer: layer,
        ..Default::default()
    };
    async fn tokens(c: &mut Client, req: pb::GenerateRequest) -> (Vec<u32>, pb::GenerateReply) {
        let mut stream = c.generate(req).await.unwrap().into_inner();
        let mut tokens = vec![];
        while let Some(m) = stream.message().await.unwrap() {
            tokens.extend(m.token);
            if m.done {
                return (tokens, m);
            }
        }
        panic!("stream ended without its final message");
    }
    let mut plain_last = vec![];
    for (mode, name) in [
        (pb::VotingMode::Last, "last"),
        (pb::VotingMode::MaxConfidence, "max-confidence"),
        (pb::VotingMode::Mean, "mean"),
        (pb::VotingMode::Weighted, "weighted"),
    ] {
        let (remote, fin) = tokens(c, run(mode, job, 0, None)).await;
        assert_eq!(fin.tune_job, job);
        let vote = Vote::load(name, dir).unwrap();
        let local = local_tuned_greedy(bundle, &s.public, dir, &vote, &PROMPT, n as usize);
        assert_eq!(remote, local, "voting {name}");
        if mode == pb::VotingMode::Last {
            plain_last = remote;
        }
    }
    // `latest` names the same job.
    assert_eq!(
        tokens(c, run(pb::VotingMode::Last, "latest", 0, None)).await.0,
        plain_last
    );
    // Self-speculative: the full model's greedy output, drafts from exit 1 (tuned) or from
    // layer 0 through the final norm (as built).
    let (spec, fin) = tokens(c, run(pb::VotingMode::Last, job, 3, Some(1))).await;
    assert_eq!(spec, plain_last);
    assert!(
        fin.speculative_rounds > 0 && fin.accepted_draft_tokens <= fin.draft_tokens,
        "{fin:?}"
    );
    assert_eq!(tokens(c, run(pb::VotingMode::Mean, job, 4, None)).await.0, {
        tokens(c, run(pb::VotingMode::Mean, job, 0, None)).await.0
    });
    let (spec, _) = tokens(c, run(pb::VotingMode::Last, "", 2, Some(0))).await;
    assert_eq!(spec, local_greedy(bundle, &s.public, &PROMPT, n as usize));
    // Drafting at the last layer, or while sampling, is refused.
    let bad = c.generate(run(pb::VotingMode::Last, job, 2, Some(3))).await;
    assert_eq!(code(bad.map(|_| ())), tonic::Code::InvalidArgument);
    let mut sampled = run(pb::VotingMode::Last, job, 2, None);
    sampled.temperature = 0.7;
    assert_eq!(
        code(c.generate(sampled).await.map(|_| ())),
        tonic::Code::InvalidArgument
    );
    assert_eq!(
        code(
            c.generate(run(pb::VotingMode::Last, "0123abcd", 0, None))
                .await
                .map(|_| ())
        ),
        tonic::Code::NotFound
    );
    // Evaluate: every exit and vote, the request's vote first.
    let req = pb::EvaluateRequest {
        dataset_sha256: dataset.to_string(),
        ctx: 32,
        max_chunks: 4,
        voting: pb::VotingMode::Mean as i32,
        tune_job: job.to_string(),
    };
    let r = c.evaluate(req).await.unwrap().into_inner();
    assert_eq!(
        r.exits.iter().map(|e| e.layer).collect::<Vec<_>>(),
        vec![1, 3],
        "{r:?}"
    );
    let modes: Vec<&str> = r.votes.iter().map(|v| v.mode.as_str()).collect();
    assert_eq!(modes, ["last", "max-confidence", "mean", "weighted"]);
    assert_eq!(r.perplexity, r.votes[2].perplexity);
    assert_eq!(r.votes[0].perplexity, r.exits[1].perplexity);
    assert!(
        r.exits
            .iter()
            .all(|e| e.perplexity.is_finite() && e.perplexity > 1.0)
    );
    assert_eq!(r.tokens_scored, 4 * 15);
}

/// A device killed (SIGKILL) in the middle of a tuning job resumes it from its last
/// checkpoint after a restart, losing at most one checkpoint interval.
#[test]
fn a_device_killed_during_tune_resumes_from_its_last_checkpoint() {
    let s = Setup::new();
    let b1 = s.bundle("b1.edgeb", None, Some(&s.key));
    let mut dev = s.device("dev", &[], &[]);
    assert_eq!(s.deploy(&b1, &dev, &[])["devices"][0]["activated"], true);
    let (data, sha, size) = s.dataset();
    let req = pb::TuneRequest {
        dataset_sha256: sha.clone(),
        steps: 400,
        learning_rate: 1e-2,
        lora_rank: 2,
        seq_len: 32,
        checkpoint_every: 5,
        stride: 2,
        ..Default::default()
    };
    let last_seen = rt().block_on(async {
        let mut c = client::connect(&dev.url, &s.options()).await.unwrap();
        upload_dataset(&mut c, &dev.url, &data, &sha, size).await;
        let mut stream = c.tune(req.clone()).await.unwrap().into_inner();
        // Read until a checkpoint past step 10 is reported, then the device dies.
        loop {
            let p = stream.message().await.unwrap().expect("job ended early");
            if p.checkpoint_step >= 10 {
                break p.checkpoint_step;
            }
        }
    });
    dev.kill();
    let dev = s.device("dev", &[], &[]);
    rt().block_on(async {
        let mut c = client::connect(&dev.url, &s.options()).await.unwrap();
        let mut stream = c
            .tune(pb::TuneRequest { resume: true, ..req })
            .await
            .unwrap()
            .into_inner();
        let first = stream.message().await.unwrap().expect("progress after restart");
        // Resumed at a checkpoint no older than the one reported before the kill.
        assert!(
            first.step > last_seen,
            "resumed at step {}, checkpoint {last_seen} was reported",
            first.step
        );
        let mut done = false;
        while let Some(p) = stream.message().await.unwrap() {
            done |= p.done;
        }
        assert!(done);
        let ex = c
            .export_adapters(pb::ExportAdaptersRequest {
                job_id: first.job_id.clone(),
            })
            .await;
        assert!(ex.is_ok());
    });
}
