//! Writing bundles: tensors one at a time into a temporary file beside the destination,
//! then the manifest, the trailer, fsync and rename.
//!
//! The manifest precedes the tensor data but holds each tensor's SHA-256, known only once
//! the tensor is written. Its encoded length does not depend on those values (offsets and
//! sizes are `fixed64`, hashes always 32 bytes), so the writer reserves the manifest's
//! bytes, streams the tensors after them, and writes the real manifest into the reserved
//! space at the end. Only one tensor's bytes need to be in memory at a time.

use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use ed25519_dalek::{Signer, SigningKey};
use edge_proto::bundle as pb;
use prost::Message;
use sha2::{Digest, Sha256};

use super::convert::{config_to_pb, dtype_to_pb, format_to_pb, graph_to_pb};
use super::{
    BundleError, FORMAT_VERSION, HEADER_LEN, MAGIC, SIGNATURE_CONTEXT, TRAILER_LEN, TRAILER_MAGIC, align_up,
};
use crate::ir::{Graph, WeightData};
use crate::tensor::Bytes;
use crate::tokenizer::Tokenizer;

/// Streams tensors into a bundle file. Create it with the manifest whose `tensors` list
/// names, dtypes, shapes and sizes (offsets and hashes are filled in), call
/// [`BundleWriter::write_tensor`] once per entry in order, then [`BundleWriter::finish`].
/// Until `finish` succeeds the destination is untouched; dropping the writer removes the
/// temporary file.
pub struct BundleWriter {
    dest: PathBuf,
    tmp: PathBuf,
    file: Option<BufWriter<File>>,
    manifest: pb::Manifest,
    manifest_len: usize,
    next: usize,
    pos: u64,
}

/// What [`BundleWriter::finish`] wrote.
#[derive(Debug, Clone)]
pub struct WrittenBundle {
    pub path: PathBuf,
    pub size: u64,
    /// SHA-256 of the bundle's bytes before the trailer.
    pub sha256: [u8; 32],
    pub signed: bool,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> BundleError + '_ {
    move |error| BundleError::Io {
        path: path.display().to_string(),
        error,
    }
}

impl BundleWriter {
    pub fn create(dest: &Path, mut manifest: pb::Manifest) -> Result<BundleWriter, BundleError> {
        let bad = |msg: String| BundleError::Format {
            path: dest.display().to_string(),
            msg,
        };
        // Reserve: every offset non-zero (fixed64 fields at their default would be omitted)
        // and every hash 32 bytes, so the final manifest has exactly this length.
        for t in &mut manifest.tensors {
            if t.size == 0 {
                return Err(bad(format!("tensor `{}` is empty", t.name)));
            }
            t.offset = u64::MAX;
            t.sha256 = vec![0; 32];
        }
        manifest.format_version = FORMAT_VERSION;
        let manifest_len = manifest.encoded_len();
        let mut pos = align_up(HEADER_LEN as u64 + manifest_len as u64);
        for t in &mut manifest.tensors {
            t.offset = pos;
            pos = align_up(pos + t.size);
        }
        debug_assert_eq!(manifest.encoded_len(), manifest_len);
        let dir = match dest.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let name = dest
            .file_name()
            .ok_or_else(|| bad("the destination has no file name".into()))?
            .to_string_lossy()
            .into_owned();
        let tmp = dir.join(format!(".{name}.{}.partial", std::process::id()));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(io_err(&tmp))?;
        let mut w = BundleWriter {
            dest: dest.to_path_buf(),
            tmp,
            file: Some(BufWriter::with_capacity(1 << 20, file)),
            manifest,
            manifest_len,
            next: 0,
            pos: 0,
        };
        // Header and the reserved (zeroed) manifest space up to the first tensor.
        let first = align_up(HEADER_LEN as u64 + manifest_len as u64);
        let mut head = Vec::with_capacity(first as usize);
        head.extend_from_slice(MAGIC);
        head.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        head.extend_from_slice(&0u32.to_le_bytes());
        head.extend_from_slice(&(manifest_len as u64).to_le_bytes());
        head.resize(first as usize, 0);
        w.put(&head)?;
        Ok(w)
    }

    fn put(&mut self, bytes: &[u8]) -> Result<(), BundleError> {
        let tmp = self.tmp.clone();
        self.file
            .as_mut()
            .expect("writer is open")
            .write_all(bytes)
            .map_err(io_err(&tmp))?;
        self.pos += bytes.len() as u64;
        Ok(())
    }

    /// The tensor entries (offsets assigned) — the order `write_tensor` expects.
    pub fn tensors(&self) -> &[pb::TensorEntry] {
        &self.manifest.tensors
    }

    /// Writes the bytes of the next tensor entry.
    pub fn write_tensor(&mut self, bytes: &[u8]) -> Result<(), BundleError> {
        self.write_parts(bytes.len(), std::iter::once(bytes), |_, _| {})
    }

    /// Writes the next tensor entry, `len` bytes given as `parts` in order (hashed as they
    /// go); `after(at, n)` is called once the `n` bytes at `at` of the tensor are written.
    fn write_parts<'b>(
        &mut self,
        len: usize,
        parts: impl Iterator<Item = &'b [u8]>,
        mut after: impl FnMut(usize, usize),
    ) -> Result<(), BundleError> {
        let i = self.next;
        let path = self.dest.display().to_string();
        let bad = |msg: String| BundleError::Format {
            path: path.clone(),
            msg,
        };
        let entry = self.manifest.tensors.get(i).ok_or_else(|| {
            bad(format!(
                "more tensors written than the {} declared",
                self.manifest.tensors.len()
            ))
        })?;
        if len as u64 != entry.size {
            return Err(bad(format!(
                "tensor `{}` was declared {} bytes, {len} given",
                entry.name, entry.size
            )));
        }
        let offset = entry.offset;
        let pad = (offset - self.pos) as usize;
        self.put(&vec![0u8; pad])?;
        let mut hasher = Sha256::new();
        let mut at = 0;
        for part in parts {
            self.put(part)?;
            hasher.update(part);
            after(at, part.len());
            at += part.len();
        }
        if at != len {
            return Err(bad(format!("internal: tensor {i}: {at} of {len} bytes given")));
        }
        self.manifest.tensors[i].sha256 = hasher.finalize().to_vec();
        self.next += 1;
        Ok(())
    }

    /// Writes the manifest and the trailer (signed with `key` when given), syncs the file
    /// and renames it to the destination.
    pub fn finish(mut self, key: Option<&SigningKey>) -> Result<WrittenBundle, BundleError> {
        if self.next != self.manifest.tensors.len() {
            return Err(BundleError::Format {
                path: self.dest.display().to_string(),
                msg: format!("{} of {} tensors written", self.next, self.manifest.tensors.len()),
            });
        }
        let end = align_up(self.pos);
        let pad = (end - self.pos) as usize;
        self.put(&vec![0u8; pad])?;
        let tmp = self.tmp.clone();
        let mut file = self
            .file
            .take()
            .expect("writer is open")
            .into_inner()
            .map_err(|e| io_err(&tmp)(e.into_error()))?;
        let manifest = self.manifest.encode_to_vec();
        if manifest.len() != self.manifest_len {
            return Err(BundleError::Format {
                path: self.dest.display().to_string(),
                msg: format!(
                    "internal: manifest is {} bytes, {} were reserved",
                    manifest.len(),
                    self.manifest_len
                ),
            });
        }
        file.seek(SeekFrom::Start(HEADER_LEN as u64))
            .map_err(io_err(&tmp))?;
        file.write_all(&manifest).map_err(io_err(&tmp))?;
        // Hash everything before the trailer, reading the file back in order.
        file.seek(SeekFrom::Start(0)).map_err(io_err(&tmp))?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut left = end;
        while left > 0 {
            let n = (left as usize).min(buf.len());
            file.read_exact(&mut buf[..n]).map_err(io_err(&tmp))?;
            hasher.update(&buf[..n]);
            left -= n as u64;
        }
        let digest: [u8; 32] = hasher.finalize().into();
        let mut trailer = Vec::with_capacity(TRAILER_LEN);
        trailer.extend_from_slice(TRAILER_MAGIC);
        trailer.extend_from_slice(&(key.is_some() as u32).to_le_bytes());
        trailer.extend_from_slice(&0u32.to_le_bytes());
        trailer.extend_from_slice(&digest);
        match key {
            Some(k) => {
                trailer.extend_from_slice(k.verifying_key().as_bytes());
                let sig = k.sign(&signed_message(&digest));
                trailer.extend_from_slice(&sig.to_bytes());
            }
            None => trailer.resize(TRAILER_LEN, 0),
        }
        debug_assert_eq!(trailer.len(), TRAILER_LEN);
        file.seek(SeekFrom::Start(end)).map_err(io_err(&tmp))?;
        file.write_all(&trailer).map_err(io_err(&tmp))?;
        file.sync_all().map_err(io_err(&tmp))?;
        drop(file);
        std::fs::rename(&self.tmp, &self.dest).map_err(io_err(&self.dest))?;
        // Make the rename itself durable.
        if let Some(dir) = self.dest.parent().filter(|p| !p.as_os_str().is_empty())
            && let Ok(d) = File::open(dir)
        {
            d.sync_all().ok();
        }
        Ok(WrittenBundle {
            path: self.dest.clone(),
            size: end + TRAILER_LEN as u64,
            sha256: digest,
            signed: key.is_some(),
        })
    }
}

impl Drop for BundleWriter {
    fn drop(&mut self) {
        if self.file.is_some() || self.tmp.exists() {
            self.file = None;
            std::fs::remove_file(&self.tmp).ok();
        }
    }
}

/// The message an ed25519 signature covers: a context string and the bundle's digest.
pub fn signed_message(digest: &[u8; 32]) -> Vec<u8> {
    let mut m = SIGNATURE_CONTEXT.to_vec();
    m.extend_from_slice(digest);
    m
}

/// Everything a bundle holds besides the weights, which come from the graph.
pub struct BundleContents<'a> {
    pub graph: &'a Graph,
    pub tokenizer: Option<&'a Tokenizer>,
    /// The policy's TOML text (empty: weights as in the source).
    pub policy: String,
    pub target: pb::Target,
    pub kernels: Vec<pb::Kernel>,
    pub compiler_version: String,
    pub source: String,
}

/// The manifest entries of the graph's weights and the byte ranges behind them, in the
/// order they are written: each weight's dense tensor, or its packed buffers.
fn weight_entries(g: &Graph) -> (Vec<pb::Weight>, Vec<pb::TensorEntry>) {
    let (mut weights, mut tensors) = (vec![], vec![]);
    for w in &g.weights {
        let mut buffers = vec![];
        match &w.data {
            WeightData::Dense(t) => {
                buffers.push(pb::BufferRef {
                    name: "data".into(),
                    tensor: tensors.len() as u32,
                });
                tensors.push(pb::TensorEntry {
                    name: w.name.clone(),
                    dtype: dtype_to_pb(t.dtype) as i32,
                    shape: t.shape.iter().map(|&d| d as u64).collect(),
                    size: t.nbytes() as u64,
                    ..Default::default()
                });
            }
            WeightData::Packed(p) => {
                for (name, buf) in p.buffers().iter() {
                    let dtype = match name {
                        "scales" | "mins" | "values" => pb::ElemType::F16,
                        _ => pb::ElemType::U8,
                    };
                    let elems = buf.len() / if dtype == pb::ElemType::F16 { 2 } else { 1 };
                    buffers.push(pb::BufferRef {
                        name: name.into(),
                        tensor: tensors.len() as u32,
                    });
                    tensors.push(pb::TensorEntry {
                        name: format!("{}.{name}", w.name),
                        dtype: dtype as i32,
                        shape: vec![elems as u64],
                        size: buf.len() as u64,
                        ..Default::default()
                    });
                }
            }
        }
        weights.push(pb::Weight {
            name: w.name.clone(),
            shape: w.shape().iter().map(|&d| d as u64).collect(),
            format: Some(format_to_pb(&w.data.format())),
            buffers,
        });
    }
    (weights, tensors)
}

/// Writes `contents` as a bundle at `path`, signed with `key` when given. `progress(done,
/// total)` is called after each weight.
pub fn write_bundle(
    path: &Path,
    contents: &BundleContents<'_>,
    key: Option<&SigningKey>,
    progress: impl FnMut(usize, usize),
) -> Result<WrittenBundle, BundleError> {
    write_scheduled_bundle(path, contents, None, key, progress)
}

/// [`write_bundle`] with the scheduling pass's plan in the manifest.
pub fn write_scheduled_bundle(
    path: &Path,
    contents: &BundleContents<'_>,
    schedule: Option<pb::Schedule>,
    key: Option<&SigningKey>,
    progress: impl FnMut(usize, usize),
) -> Result<WrittenBundle, BundleError> {
    let g = contents.graph;
    write_weights(
        path,
        contents,
        schedule,
        key,
        |i| Ok(g.weights[i].data.clone()),
        false,
        progress,
    )
}

/// [`write_scheduled_bundle`] with the weights' bytes produced one weight at a time by
/// `weight(i)` (for `contents.graph.weights[i]`, in order) instead of taken from the graph,
/// whose weights then only give names, shapes, formats and sizes (their bytes are never
/// read). Each produced weight must have its graph weight's format and shape; it is
/// written, its mapped pages are released (`madvise(MADV_DONTNEED)`, so a producer reading
/// a mapped model file keeps none of it resident) and it is dropped before the next is
/// asked for. The bytes written are those [`write_scheduled_bundle`] writes for a graph
/// holding the produced weights.
pub fn write_streamed_bundle(
    path: &Path,
    contents: &BundleContents<'_>,
    schedule: Option<pb::Schedule>,
    key: Option<&SigningKey>,
    weight: impl FnMut(usize) -> Result<WeightData, String>,
    progress: impl FnMut(usize, usize),
) -> Result<WrittenBundle, BundleError> {
    write_weights(path, contents, schedule, key, weight, true, progress)
}

/// Bytes of a mapped tensor written between page releases.
const RELEASE_PART: usize = 16 << 20;

fn write_weights(
    path: &Path,
    contents: &BundleContents<'_>,
    schedule: Option<pb::Schedule>,
    key: Option<&SigningKey>,
    mut weight: impl FnMut(usize) -> Result<WeightData, String>,
    release: bool,
    mut progress: impl FnMut(usize, usize),
) -> Result<WrittenBundle, BundleError> {
    let g = contents.graph;
    let bad = |msg: String| BundleError::Format {
        path: path.display().to_string(),
        msg,
    };
    g.verify()
        .map_err(|e| bad(format!("the graph does not verify: {e}")))?;
    let (weights, tensors) = weight_entries(g);
    let tokenizer = match contents.tokenizer {
        Some(t) => Some(pb::Tokenizer {
            json: t
                .to_json()
                .map_err(|e| bad(format!("serializing the tokenizer: {e}")))?,
            add_bos: t.add_bos,
            bos: t.bos,
            eos: t.eos.clone(),
        }),
        None => None,
    };
    let manifest = pb::Manifest {
        format_version: FORMAT_VERSION,
        compiler_version: contents.compiler_version.clone(),
        config: Some(config_to_pb(&g.config)),
        tokenizer,
        policy: contents.policy.clone(),
        weights,
        graphs: vec![graph_to_pb(super::FORWARD_GRAPH, g)],
        schedule,
        kernels: contents.kernels.clone(),
        tensors,
        target: Some(contents.target.clone()),
        source: contents.source.clone(),
    };
    let mut w = BundleWriter::create(path, manifest)?;
    let total = g.weights.len();
    for (i, declared) in g.weights.iter().enumerate() {
        let data = weight(i).map_err(|e| bad(format!("weight `{}`: {e}", declared.name)))?;
        if data.format() != declared.data.format() || data.shape() != declared.shape() {
            return Err(bad(format!(
                "weight `{}` was declared {} {:?}, {} {:?} given",
                declared.name,
                declared.data.format(),
                declared.shape(),
                data.format(),
                data.shape()
            )));
        }
        match &data {
            // A mapped tensor (an embedding table is 250 MB at 7B) is written and released
            // a part at a time, so it is never resident whole.
            WeightData::Dense(t) if release && t.is_mapped() => {
                let Bytes::Mapped { map, offset, len } = t.bytes() else {
                    unreachable!("checked: mapped")
                };
                w.write_parts(*len, t.raw().chunks(RELEASE_PART), |at, n| {
                    crate::exec_stream::release_range(map, offset + at, n)
                })?
            }
            WeightData::Dense(t) => w.write_tensor(t.raw())?,
            WeightData::Packed(p) => {
                for (_, buf) in p.buffers().iter() {
                    w.write_tensor(buf.as_slice())?;
                }
            }
        }
        if release {
            crate::exec_stream::release_weight(&data);
        }
        progress(i + 1, total);
    }
    w.finish(key)
}
