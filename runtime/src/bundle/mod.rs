//! Bundles (`.edgeb`): one signed file holding a compiled model — the format's only reader,
//! writer and verifier (the compiler writes through [`write_bundle`]). Byte layout in
//! `docs/bundle.md`:
//!
//! ```text
//! 0        "EDGEBNDL"  u32 version (1)  u32 flags (0)  u64 manifest length M
//! 24       manifest (protobuf edge.bundle.v1.Manifest, proto/proto/bundle.proto)
//! 24+M     zero padding to a multiple of 64
//!          tensor data: each tensor at its manifest offset (multiple of 64), zero padding between
//! T        trailer (144 bytes): "EDGESIG1", u32 flags (bit 0: signed), u32 0,
//!          SHA-256 of bytes [0, T), ed25519 public key, ed25519 signature
//! ```
//!
//! [`Bundle::open`] maps the file, checks magic, version, trailer, the SHA-256 of
//! everything before the trailer, the signature against a [`TrustPolicy`], the manifest
//! and tensor table, and that this machine can run the bundle's target; dense tensors and
//! packed buffers of the graph are then ranges of the map (no copy). [`verify_file`] does
//! the same checks except the machine's, and also checks every tensor's own SHA-256.

pub mod convert;
pub mod host;
pub mod keys;
pub mod writer;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ed25519_dalek::{Signature, VerifyingKey};
use edge_proto::bundle as pb;
use memmap2::Mmap;
use prost::Message;
use serde::Serialize;
use sha2::{Digest, Sha256};
use thiserror::Error;

pub use keys::{generate_key, hex, public_key_path, read_signing_key, read_verifying_key, write_key_pair};
pub use writer::{BundleContents, BundleWriter, WrittenBundle, write_bundle, write_scheduled_bundle};

pub use ed25519_dalek::SigningKey;
pub use edge_proto::bundle as manifest;

use crate::ir::{Graph, Weight, WeightData};
use crate::packed::{Buf, Buffers, PackedWeight};
use crate::tensor::{Bytes, Tensor};
use crate::tokenizer::Tokenizer;

/// First bytes of every bundle.
pub const MAGIC: &[u8; 8] = b"EDGEBNDL";
/// The layout version this runtime reads and writes.
pub const FORMAT_VERSION: u32 = 1;
/// Magic, version, flags, manifest length.
pub const HEADER_LEN: usize = 24;
/// Alignment of the tensor data and of every tensor.
pub const ALIGN: u64 = 64;
/// First bytes of the trailer.
pub const TRAILER_MAGIC: &[u8; 8] = b"EDGESIG1";
/// Magic, flags, reserved, SHA-256, public key, signature.
pub const TRAILER_LEN: usize = 8 + 4 + 4 + 32 + 32 + 64;
/// Signed message = this context followed by the 32-byte SHA-256.
pub const SIGNATURE_CONTEXT: &[u8] = b"edge-llm bundle v1\0";
/// The name of the inference graph (`graphs[0]`).
pub const FORWARD_GRAPH: &str = "forward";
/// Largest manifest accepted.
const MAX_MANIFEST: u64 = 1 << 30;

pub(crate) fn align_up(x: u64) -> u64 {
    x.div_ceil(ALIGN) * ALIGN
}

/// Why a bundle was refused. Every variant names the file.
#[derive(Debug, Error)]
pub enum BundleError {
    #[error("{path}: {error}")]
    Io { path: String, error: std::io::Error },
    #[error("{path}: not an Edge-LLM bundle ({msg})")]
    NotABundle { path: String, msg: String },
    #[error("{path}: bundle format version {found}; this runtime reads version {FORMAT_VERSION}")]
    Version { path: String, found: u32 },
    #[error("{path}: truncated or incomplete bundle: {msg} (it may still be uploading, or was cut short)")]
    Truncated { path: String, msg: String },
    #[error(
        "{path}: the bundle's bytes changed: their SHA-256 is {actual}, the trailer records {expected} (corrupt or modified)"
    )]
    HashMismatch {
        path: String,
        expected: String,
        actual: String,
    },
    #[error("{path}: tensor `{name}` does not match its SHA-256 in the manifest (corrupt or modified)")]
    TensorHash { path: String, name: String },
    #[error(
        "{path}: the bundle is not signed; sign it (edgec build --sign-key) or pass --allow-unsigned for development"
    )]
    Unsigned { path: String },
    #[error(
        "{path}: signed by key {key}, which is not trusted (pass its public key with --trusted-key, or --allow-unsigned for development)"
    )]
    UntrustedKey { path: String, key: String },
    #[error("{path}: the signature does not verify with key {key} (forged or modified trailer)")]
    BadSignature { path: String, key: String },
    #[error(
        "{path}: built for target `{target}` ({arch}); this machine is {host_arch} — build it for this machine (e.g. --target host)"
    )]
    WrongArch {
        path: String,
        target: String,
        arch: String,
        host_arch: String,
    },
    #[error("{path}: target `{target}` needs CPU features this machine lacks: {missing}")]
    MissingFeatures {
        path: String,
        target: String,
        missing: String,
    },
    #[error("{path}: invalid bundle: {msg}")]
    Format { path: String, msg: String },
    #[error("{path}: {msg}")]
    Key { path: String, msg: String },
}

/// Which signatures a reader accepts.
#[derive(Debug, Clone, Default)]
pub struct TrustPolicy {
    /// Public keys whose signatures are accepted.
    pub trusted_keys: Vec<VerifyingKey>,
    /// Development only: accept unsigned bundles and bundles signed by an untrusted key.
    /// Corrupt bytes (hash mismatch) and forged signatures are refused regardless.
    pub allow_unsigned: bool,
}

impl TrustPolicy {
    pub fn trusting(keys: Vec<VerifyingKey>) -> TrustPolicy {
        TrustPolicy {
            trusted_keys: keys,
            allow_unsigned: false,
        }
    }
    /// Trusts the public keys in these files (`KEY.pub` as `edgec keygen` writes them).
    pub fn from_key_files(paths: &[PathBuf], allow_unsigned: bool) -> Result<TrustPolicy, BundleError> {
        Ok(TrustPolicy {
            trusted_keys: paths
                .iter()
                .map(|p| read_verifying_key(p))
                .collect::<Result<_, _>>()?,
            allow_unsigned,
        })
    }
}

/// The target a bundle was built for.
#[derive(Debug, Clone, Serialize)]
pub struct BundleTarget {
    pub name: String,
    pub arch: String,
    pub features: Vec<String>,
    /// The resolved target description (TOML).
    pub description: String,
}

/// What checking a bundle found.
#[derive(Debug, Clone, Serialize)]
pub struct Verification {
    pub path: String,
    pub size: u64,
    /// Hex SHA-256 of the bytes before the trailer (the bundle's identity).
    pub sha256: String,
    pub signed: bool,
    /// Hex public key of the signer.
    pub signer: Option<String>,
    /// Whether the signer is one of the trusted keys.
    pub trusted: bool,
    pub format_version: u32,
    pub compiler_version: String,
    pub target: BundleTarget,
    pub tensors: usize,
    /// Tensors whose own SHA-256 was checked.
    pub tensors_checked: usize,
    pub tensor_bytes: u64,
    pub kernels: usize,
    pub graphs: Vec<String>,
}

/// The file checked up to its manifest.
struct Checked {
    map: Arc<Mmap>,
    manifest: pb::Manifest,
    verification: Verification,
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

/// Bytes hashed between releases of the mapped pages.
const HASH_SLICE: usize = 8 << 20;

/// The SHA-256 of `map[range]`, hashed a slice at a time with each slice's pages released
/// after it, so that hashing a bundle does not leave it resident (a schedule may stream its
/// weights, and a bundle may be bigger than memory).
fn sha256_released(map: &Mmap, range: std::ops::Range<usize>) -> [u8; 32] {
    let mut hasher = Sha256::new();
    for at in range.clone().step_by(HASH_SLICE) {
        let end = (at + HASH_SLICE).min(range.end);
        hasher.update(&map[at..end]);
        crate::exec_stream::release_range(map, at, end - at);
    }
    hasher.finalize().into()
}

fn check(path: &Path, policy: &TrustPolicy) -> Result<Checked, BundleError> {
    let p = path.display().to_string();
    let file = std::fs::File::open(path).map_err(|error| BundleError::Io {
        path: p.clone(),
        error,
    })?;
    // SAFETY: the file is mapped read-only; a bundle is never written in place (writers
    // create a new file and rename it), so the mapped bytes do not change under us.
    let map = unsafe { Mmap::map(&file) }.map_err(|error| BundleError::Io {
        path: p.clone(),
        error,
    })?;
    let b: &[u8] = &map;
    if b.len() < MAGIC.len() || &b[..MAGIC.len()] != MAGIC {
        return Err(BundleError::NotABundle {
            path: p,
            msg: "it does not start with the magic bytes EDGEBNDL".into(),
        });
    }
    if b.len() < HEADER_LEN + TRAILER_LEN {
        return Err(BundleError::Truncated {
            path: p,
            msg: format!("{} bytes, shorter than a header and a trailer", b.len()),
        });
    }
    let version = u32_at(b, 8);
    if version != FORMAT_VERSION {
        return Err(BundleError::Version {
            path: p,
            found: version,
        });
    }
    let trailer_start = b.len() - TRAILER_LEN;
    let t = &b[trailer_start..];
    if &t[..8] != TRAILER_MAGIC {
        return Err(BundleError::Truncated {
            path: p,
            msg: "no trailer at the end of the file".into(),
        });
    }
    let manifest_len = u64::from_le_bytes(b[16..24].try_into().expect("8 bytes"));
    if manifest_len > MAX_MANIFEST || HEADER_LEN as u64 + manifest_len > trailer_start as u64 {
        return Err(BundleError::Truncated {
            path: p,
            msg: format!("the header announces a {manifest_len}-byte manifest that the file cannot hold"),
        });
    }
    let flags = u32_at(t, 8);
    let expected: [u8; 32] = t[16..48].try_into().expect("32 bytes");
    let actual = sha256_released(&map, 0..trailer_start);
    if actual != expected {
        return Err(BundleError::HashMismatch {
            path: p,
            expected: hex(&expected),
            actual: hex(&actual),
        });
    }
    let signed = flags & 1 == 1;
    let (mut signer, mut trusted) = (None, false);
    if signed {
        let key_bytes: [u8; 32] = t[48..80].try_into().expect("32 bytes");
        let key_hex = hex(&key_bytes);
        let key = VerifyingKey::from_bytes(&key_bytes).map_err(|_| BundleError::BadSignature {
            path: p.clone(),
            key: key_hex.clone(),
        })?;
        let sig = Signature::from_bytes(&t[80..144].try_into().expect("64 bytes"));
        key.verify_strict(&writer::signed_message(&actual), &sig)
            .map_err(|_| BundleError::BadSignature {
                path: p.clone(),
                key: key_hex.clone(),
            })?;
        trusted = policy.trusted_keys.contains(&key);
        if !trusted && !policy.allow_unsigned {
            return Err(BundleError::UntrustedKey {
                path: p,
                key: key_hex,
            });
        }
        signer = Some(key_hex);
    } else if !policy.allow_unsigned {
        return Err(BundleError::Unsigned { path: p });
    }
    let bad = |msg: String| BundleError::Format { path: p.clone(), msg };
    let manifest = pb::Manifest::decode(&b[HEADER_LEN..HEADER_LEN + manifest_len as usize])
        .map_err(|e| bad(format!("the manifest does not decode: {e}")))?;
    if manifest.format_version != FORMAT_VERSION {
        return Err(bad(format!(
            "the manifest says format version {}, the header {FORMAT_VERSION}",
            manifest.format_version
        )));
    }
    // The tensor table: aligned, in order, inside the data section, sizes matching shapes.
    let mut pos = HEADER_LEN as u64 + manifest_len;
    let mut tensor_bytes = 0u64;
    for e in &manifest.tensors {
        let elem = convert::dtype_size(e.dtype)
            .ok_or_else(|| bad(format!("tensor `{}` has unknown dtype {}", e.name, e.dtype)))?;
        let numel = e.shape.iter().try_fold(1u64, |a, &d| a.checked_mul(d));
        if numel.and_then(|n| n.checked_mul(elem as u64)) != Some(e.size) {
            return Err(bad(format!(
                "tensor `{}`: shape {:?} does not fill its {} bytes",
                e.name, e.shape, e.size
            )));
        }
        if !e.offset.is_multiple_of(ALIGN) || e.offset < pos {
            return Err(bad(format!(
                "tensor `{}` at offset {} is misaligned or overlaps what precedes it",
                e.name, e.offset
            )));
        }
        let end = e
            .offset
            .checked_add(e.size)
            .filter(|&end| end <= trailer_start as u64)
            .ok_or_else(|| bad(format!("tensor `{}` runs past the data section", e.name)))?;
        if e.sha256.len() != 32 {
            return Err(bad(format!("tensor `{}` has no SHA-256", e.name)));
        }
        pos = end;
        tensor_bytes += e.size;
    }
    let target = manifest
        .target
        .as_ref()
        .map(|t| BundleTarget {
            name: t.name.clone(),
            arch: t.arch.clone(),
            features: t.features.clone(),
            description: t.description.clone(),
        })
        .ok_or_else(|| bad("the manifest names no target".into()))?;
    let verification = Verification {
        path: p.clone(),
        size: b.len() as u64,
        sha256: hex(&actual),
        signed,
        signer,
        trusted,
        format_version: manifest.format_version,
        compiler_version: manifest.compiler_version.clone(),
        target,
        tensors: manifest.tensors.len(),
        tensors_checked: 0,
        tensor_bytes,
        kernels: manifest.kernels.len(),
        graphs: manifest.graphs.iter().map(|g| g.name.clone()).collect(),
    };
    Ok(Checked {
        map: Arc::new(map),
        manifest,
        verification,
    })
}

/// Checks a bundle's integrity and signature against `policy`, including every tensor's
/// own SHA-256, without building the model and whatever machine it was built for.
pub fn verify_file(path: &Path, policy: &TrustPolicy) -> Result<Verification, BundleError> {
    let c = check(path, policy)?;
    let mut v = c.verification;
    for e in &c.manifest.tensors {
        let actual = sha256_released(&c.map, e.offset as usize..(e.offset + e.size) as usize);
        if actual.as_slice() != e.sha256.as_slice() {
            return Err(BundleError::TensorHash {
                path: v.path.clone(),
                name: e.name.clone(),
            });
        }
        v.tensors_checked += 1;
    }
    Ok(v)
}

/// Whether this machine can run code built for `target`: the same instruction set and
/// every listed CPU feature.
pub fn check_host(path: &Path, target: &BundleTarget) -> Result<(), BundleError> {
    let host_arch = std::env::consts::ARCH;
    if target.arch != host_arch {
        return Err(BundleError::WrongArch {
            path: path.display().to_string(),
            target: target.name.clone(),
            arch: target.arch.clone(),
            host_arch: host_arch.into(),
        });
    }
    let missing: Vec<&str> = target
        .features
        .iter()
        .map(String::as_str)
        .filter(|f| !host::has_feature(f))
        .collect();
    if !missing.is_empty() {
        return Err(BundleError::MissingFeatures {
            path: path.display().to_string(),
            target: target.name.clone(),
            missing: missing.join(", "),
        });
    }
    Ok(())
}

/// An opened, verified bundle: the model graph (weights mapped from the file), tokenizer
/// and everything else in its manifest.
pub struct Bundle {
    path: PathBuf,
    manifest: pb::Manifest,
    verification: Verification,
    graph: Arc<Graph>,
    /// The schedule the executor follows (parsed from `plan_json`, checked on open).
    plan: Option<crate::plan::ExecPlan>,
    tokenizer: Option<Tokenizer>,
    sha256: [u8; 32],
}

impl std::fmt::Debug for Bundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Bundle({}, target {}, sha256 {})",
            self.path.display(),
            self.verification.target.name,
            self.verification.sha256
        )
    }
}

impl Bundle {
    /// Opens and checks a bundle (see the module docs), refusing one this machine cannot
    /// run.
    pub fn open(path: &Path, policy: &TrustPolicy) -> Result<Bundle, BundleError> {
        let c = check(path, policy)?;
        check_host(path, &c.verification.target)?;
        let p = path.display().to_string();
        let bad = |msg: String| BundleError::Format { path: p.clone(), msg };
        let m = &c.manifest;
        let config = convert::config_from_pb(m.config.as_ref().ok_or_else(|| bad("no model config".into()))?)
            .map_err(|e| bad(format!("model config: {e}")))?;
        let g = m
            .graphs
            .first()
            .ok_or_else(|| bad("the manifest holds no graph".into()))?;
        let (values, nodes, logits) =
            convert::graph_parts_from_pb(g).map_err(|e| bad(format!("graph: {e}")))?;
        let weights = m
            .weights
            .iter()
            .map(|w| map_weight(&c.map, m, w).map_err(|e| bad(format!("weight `{}`: {e}", w.name))))
            .collect::<Result<Vec<_>, _>>()?;
        let graph = Graph {
            config,
            weights,
            values,
            nodes,
            logits,
        };
        graph.verify().map_err(|e| bad(e.to_string()))?;
        if let Some(sc) = &m.schedule
            && let Some(w) = sc
                .streamed_weights
                .iter()
                .find(|&&w| w as usize >= graph.weights.len())
        {
            return Err(bad(format!(
                "the schedule streams weight {w}, the bundle has {}",
                graph.weights.len()
            )));
        }
        let plan = match &m.schedule {
            Some(sc) if !sc.plan_json.is_empty() => {
                let plan = crate::plan::ExecPlan::from_json(&sc.plan_json).map_err(|e| bad(e.to_string()))?;
                plan.check(&graph).map_err(|e| bad(e.to_string()))?;
                Some(plan)
            }
            _ => None,
        };
        let tokenizer = match &m.tokenizer {
            Some(t) => Some(
                Tokenizer::from_json(&t.json, t.add_bos, t.bos, t.eos.clone())
                    .map_err(|e| bad(e.to_string()))?,
            ),
            None => None,
        };
        let mut sha256 = [0u8; 32];
        let digest = &c.map[c.map.len() - TRAILER_LEN + 16..c.map.len() - TRAILER_LEN + 48];
        sha256.copy_from_slice(digest);
        Ok(Bundle {
            path: path.to_path_buf(),
            manifest: c.manifest,
            verification: c.verification,
            graph: Arc::new(graph),
            plan,
            tokenizer,
            sha256,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
    /// The inference graph; its dense weights and packed buffers are ranges of the mapped file.
    pub fn graph(&self) -> &Graph {
        &self.graph
    }
    /// The graph, shared (as `Executor::new` takes it).
    pub fn graph_arc(&self) -> Arc<Graph> {
        self.graph.clone()
    }
    pub fn tokenizer(&self) -> Option<&Tokenizer> {
        self.tokenizer.as_ref()
    }
    /// SHA-256 of the bundle's bytes before the trailer (its identity).
    pub fn sha256(&self) -> [u8; 32] {
        self.sha256
    }
    pub fn sha256_hex(&self) -> String {
        hex(&self.sha256)
    }
    pub fn target(&self) -> &BundleTarget {
        &self.verification.target
    }
    /// Hex public key of the signer, if signed.
    pub fn signer(&self) -> Option<&str> {
        self.verification.signer.as_deref()
    }
    pub fn verification(&self) -> &Verification {
        &self.verification
    }
    /// The policy text the weights were compressed with (empty: none).
    pub fn policy(&self) -> &str {
        &self.manifest.policy
    }
    pub fn kernels(&self) -> &[pb::Kernel] {
        &self.manifest.kernels
    }

    /// The kernel table matched to the graph's compressed weights: for every packed weight
    /// and kernel kind with a generated kernel in the table, the source the JIT compiles
    /// (`jit::KernelSet::compile`). Weights without one run the reference kernels.
    pub fn kernel_sources(&self) -> Vec<crate::jit::KernelSource> {
        use crate::jit::spec::{KernelKind, KernelSpec};
        let mut out = vec![];
        for w in &self.graph.weights {
            let Some(p) = w.data.packed() else { continue };
            for kind in KernelKind::ALL {
                let Ok(spec) = KernelSpec::new(kind, p.rows(), p.cols(), p.format()) else {
                    continue;
                };
                let name = spec.name();
                if let Some(k) = self.manifest.kernels.iter().find(|k| k.name == name) {
                    out.push(crate::jit::KernelSource {
                        weight: w.name.clone(),
                        spec,
                        clif: k.clif.clone(),
                    });
                }
            }
        }
        out
    }
    /// The weights the bundle's schedule streams (none without a schedule): give them to
    /// [`Executor::with_streamed_weights`](crate::Executor::with_streamed_weights).
    pub fn streamed_weights(&self) -> Vec<crate::ir::WeightId> {
        self.manifest
            .schedule
            .iter()
            .flat_map(|s| {
                s.streamed_weights
                    .iter()
                    .map(|&w| crate::ir::WeightId(w as usize))
            })
            .collect()
    }

    /// The schedule as the executor follows it (checked against the graph when the
    /// bundle was opened); `None` for a bundle built without one.
    pub fn plan(&self) -> Option<&crate::plan::ExecPlan> {
        self.plan.as_ref()
    }

    /// The tuning window's keep-vs-recompute decision the bundle was planned with
    /// (`edgec build --train A:B --seq S`), if any.
    pub fn recompute(&self) -> Option<crate::plan::TuningDecision> {
        self.plan.as_ref().and_then(|p| p.recompute)
    }

    pub fn manifest(&self) -> &pb::Manifest {
        &self.manifest
    }

    /// The executor that runs this bundle as it was built: its generated kernels
    /// JIT-compiled for this machine (with `jit`; weights without a kernel, or every weight
    /// without `jit`, run the reference kernels) and its schedule's streamed weights
    /// released after each use. Also returns how many kernels were compiled.
    pub fn executor(&self, jit: bool) -> crate::Result<(crate::Executor, usize)> {
        self.executor_following(jit, crate::exec::Follow::ALL)
    }

    /// [`executor`](Self::executor) following only the parts of the schedule in `follow`
    /// (its residency always).
    pub fn executor_following(
        &self,
        jit: bool,
        follow: crate::exec::Follow,
    ) -> crate::Result<(crate::Executor, usize)> {
        let streamed = self.streamed_weights();
        let sources = self.kernel_sources();
        let (exec, n) = if !jit || sources.is_empty() {
            (crate::Executor::new(self.graph_arc())?, 0)
        } else {
            let set = crate::jit::KernelSet::compile(&sources)?;
            let n = set.functions();
            (crate::Executor::with_kernels(self.graph_arc(), Arc::new(set))?, n)
        };
        let mut exec = exec.with_streamed_weights(&streamed)?;
        if let Some(plan) = &self.plan {
            exec = exec.with_plan(plan, follow)?;
        }
        Ok((exec, n))
    }
}

/// Builds one weight over the mapped file.
fn map_weight(map: &Arc<Mmap>, m: &pb::Manifest, w: &pb::Weight) -> Result<Weight, String> {
    let format = convert::format_from_pb(w.format.as_ref())?;
    let shape: Vec<usize> = w
        .shape
        .iter()
        .map(|&d| usize::try_from(d).map_err(|_| format!("dimension {d} is too large")))
        .collect::<Result<_, _>>()?;
    let entry = |r: &pb::BufferRef| -> Result<&pb::TensorEntry, String> {
        m.tensors.get(r.tensor as usize).ok_or_else(|| {
            format!(
                "buffer `{}` refers to tensor {} which does not exist",
                r.name, r.tensor
            )
        })
    };
    let mapped = |e: &pb::TensorEntry| (e.offset as usize, e.size as usize);
    match format {
        crate::format::WeightFormat::Dense { dtype } => {
            let [r] = w.buffers.as_slice() else {
                return Err(format!(
                    "a dense weight has one buffer, found {}",
                    w.buffers.len()
                ));
            };
            let e = entry(r)?;
            if convert::dtype_from_pb(e.dtype) != Some(dtype) {
                return Err(format!("tensor `{}` is not {dtype}", e.name));
            }
            let (offset, len) = mapped(e);
            let t = Tensor::new(
                dtype,
                shape,
                Bytes::Mapped {
                    map: map.clone(),
                    offset,
                    len,
                },
            )
            .map_err(|e| e.to_string())?;
            Ok(Weight::new_dense(w.name.clone(), t))
        }
        format => {
            let [rows, cols] = shape[..] else {
                return Err(format!("a packed weight is 2-D, shape {shape:?}"));
            };
            let mut bufs = Buffers::default();
            for r in &w.buffers {
                let (offset, len) = mapped(entry(r)?);
                bufs.set(
                    &r.name,
                    Buf::Mapped {
                        map: map.clone(),
                        offset,
                        len,
                    },
                )
                .map_err(|e| e.to_string())?;
            }
            let p = PackedWeight::from_parts(format, rows, cols, bufs).map_err(|e| e.to_string())?;
            Ok(Weight {
                name: w.name.clone(),
                data: WeightData::Packed(Arc::new(p)),
            })
        }
    }
}
