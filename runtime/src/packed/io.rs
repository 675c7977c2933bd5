//! Safetensors layout for compressed models (documented in `docs/formats.md`).
//!
//! A packed weight `W` is stored as one safetensors tensor per buffer, named
//! `W.qweight`, `W.scales`, `W.mins`, `W.values`, `W.mask`, `W.index` (those its format
//! uses; see [`super`]): code, mask and index bytes as `U8`, scales, mins and kept values
//! as `F16`. Its format and shape are in the header's `__metadata__` under
//! `edge.format.W`, as JSON: `{"shape": [rows, cols], "format": {...}}` (the serde form of
//! [`WeightFormat`]). Every other tensor is a dense `F32`, `F16` or `BF16` tensor. Other
//! metadata keys are the caller's, returned as they were written.
//!
//! Files are read through a memory map: buffers and dense tensors are ranges of the map,
//! not copies (a dense tensor whose range is misaligned for its type is copied once).

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::sync::Arc;

use memmap2::Mmap;
use serde::{Deserialize, Serialize};

use super::{Buf, Buffers, PackedWeight};
use crate::error::{Result, RuntimeError};
use crate::format::{SparsePattern, WeightFormat};
use crate::tensor::{Bytes, DType, Tensor};

/// Metadata key prefix of a packed weight's format.
pub const FORMAT_KEY_PREFIX: &str = "edge.format.";

/// Largest header accepted (the JSON describing the tensors).
const MAX_HEADER: u64 = 256 << 20;

/// The `__metadata__` entry describing one packed weight.
#[derive(Debug, Serialize, Deserialize)]
struct PackedEntry {
    shape: [usize; 2],
    format: WeightFormat,
}

/// The contents of a packed safetensors file.
#[derive(Debug, Default)]
pub struct PackedFile {
    /// Packed weights, in name order.
    pub packed: Vec<(String, PackedWeight)>,
    /// Dense tensors, in name order.
    pub dense: Vec<(String, Tensor)>,
    /// The caller's metadata (without the `edge.format.*` entries).
    pub metadata: BTreeMap<String, String>,
}

fn bad(path: &Path, msg: String) -> RuntimeError {
    RuntimeError::Invalid(format!("{}: {msg}", path.display()))
}

fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::F32 => "F32",
        DType::F16 => "F16",
        DType::BF16 => "BF16",
    }
}

/// The safetensors dtype of a packed buffer.
fn buffer_dtype(name: &str) -> &'static str {
    match name {
        "scales" | "mins" | "values" => "F16",
        _ => "U8",
    }
}

/// The shape a buffer is written with: `[rows, per_row]` when every row has the same
/// length (quantized weights, masks, N:M weights), else flat.
fn buffer_shape(w: &PackedWeight, name: &str, bytes: usize) -> Vec<usize> {
    let elems = if buffer_dtype(name) == "F16" {
        bytes / 2
    } else {
        bytes
    };
    let uniform = match w.format() {
        WeightFormat::Sparse {
            pattern: SparsePattern::Unstructured,
            ..
        } => name == "mask",
        _ => true,
    };
    if uniform && elems.is_multiple_of(w.rows()) {
        vec![w.rows(), elems / w.rows()]
    } else {
        vec![elems]
    }
}

/// One tensor to write: name, dtype, shape, bytes.
struct Entry<'a> {
    name: String,
    dtype: &'static str,
    shape: Vec<usize>,
    data: &'a [u8],
}

fn elem_size(dtype: &str) -> usize {
    match dtype {
        "F32" => 4,
        "F16" | "BF16" => 2,
        _ => 1,
    }
}

/// Writes the entries as a safetensors file: header padded to 8 bytes, data sorted by
/// element size (largest first) so every tensor stays aligned for its type.
fn write_entries(
    path: &Path,
    mut entries: Vec<Entry<'_>>,
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    entries.sort_by(|a, b| {
        elem_size(b.dtype)
            .cmp(&elem_size(a.dtype))
            .then(a.name.cmp(&b.name))
    });
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        header.insert(
            "__metadata__".into(),
            serde_json::to_value(metadata).expect("strings"),
        );
    }
    let mut offset = 0usize;
    for e in &entries {
        let end = offset + e.data.len();
        header.insert(
            e.name.clone(),
            serde_json::json!({"dtype": e.dtype, "shape": e.shape, "data_offsets": [offset, end]}),
        );
        offset = end;
    }
    let mut h = serde_json::to_vec(&header).expect("json");
    while !(8 + h.len()).is_multiple_of(8) {
        h.push(b' ');
    }
    let mut f = BufWriter::new(File::create(path)?);
    f.write_all(&(h.len() as u64).to_le_bytes())?;
    f.write_all(&h)?;
    for e in &entries {
        f.write_all(e.data)?;
    }
    f.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    Ok(())
}

/// Writes packed weights (each as its buffers), dense tensors and `metadata` into one
/// safetensors file at `path`. Names must be unique once the buffer suffixes are added;
/// metadata keys may not start with `edge.format.`.
pub fn write_packed_safetensors(
    path: &Path,
    weights: &[(&str, &PackedWeight)],
    extra_dense: &[(&str, &Tensor)],
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    let mut meta = metadata.clone();
    if let Some(k) = meta.keys().find(|k| k.starts_with(FORMAT_KEY_PREFIX)) {
        return Err(bad(
            path,
            format!("metadata key `{k}` is reserved for packed formats"),
        ));
    }
    let mut entries = vec![];
    for (name, w) in weights {
        let entry = PackedEntry {
            shape: [w.rows(), w.cols()],
            format: w.format().clone(),
        };
        meta.insert(
            format!("{FORMAT_KEY_PREFIX}{name}"),
            serde_json::to_string(&entry).expect("json"),
        );
        for (buf, b) in w.buffers().iter() {
            entries.push(Entry {
                name: format!("{name}.{buf}"),
                dtype: buffer_dtype(buf),
                shape: buffer_shape(w, buf, b.len()),
                data: b.as_slice(),
            });
        }
    }
    for (name, t) in extra_dense {
        entries.push(Entry {
            name: name.to_string(),
            dtype: dtype_name(t.dtype),
            shape: t.shape.clone(),
            data: t.raw(),
        });
    }
    let mut seen = std::collections::HashSet::new();
    for e in &entries {
        if !seen.insert(e.name.as_str()) {
            return Err(bad(path, format!("tensor name `{}` is used twice", e.name)));
        }
    }
    write_entries(path, entries, &meta)
}

#[derive(Deserialize)]
struct Info {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: [usize; 2],
}

/// Reads a file written by [`write_packed_safetensors`] (or any safetensors file of dense
/// F32/F16/BF16 tensors). Everything is checked: header bounds, dtypes, each buffer's
/// length against its format and shape, N:M positions, mask padding.
pub fn read_packed_safetensors(path: &Path) -> Result<PackedFile> {
    let file = File::open(path).map_err(|e| bad(path, e.to_string()))?;
    // SAFETY: the file is mapped read-only; like the model frontends, we assume nobody
    // truncates or rewrites it while it is mapped.
    let map = Arc::new(unsafe { Mmap::map(&file) }.map_err(|e| bad(path, e.to_string()))?);
    if map.len() < 8 {
        return Err(bad(
            path,
            format!("{} bytes is too short for a safetensors file", map.len()),
        ));
    }
    let hlen = u64::from_le_bytes(map[..8].try_into().expect("8 bytes"));
    if hlen > MAX_HEADER || hlen > (map.len() - 8) as u64 {
        return Err(bad(
            path,
            format!("header length {hlen} exceeds the file ({} bytes)", map.len()),
        ));
    }
    let data_start = 8 + hlen as usize;
    let data_len = map.len() - data_start;
    let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&map[8..data_start])
        .map_err(|e| bad(path, format!("header is not a JSON object: {e}")))?;

    let mut metadata = BTreeMap::new();
    let mut formats: BTreeMap<String, PackedEntry> = BTreeMap::new();
    if let Some(m) = header.get("__metadata__") {
        let m: HashMap<String, String> = serde_json::from_value(m.clone())
            .map_err(|e| bad(path, format!("__metadata__ is not a map of strings: {e}")))?;
        for (k, v) in m {
            match k.strip_prefix(FORMAT_KEY_PREFIX) {
                Some(w) => {
                    let e: PackedEntry = serde_json::from_str(&v)
                        .map_err(|e| bad(path, format!("metadata `{k}`: bad packed format: {e}")))?;
                    formats.insert(w.to_string(), e);
                }
                None => {
                    metadata.insert(k, v);
                }
            }
        }
    }

    let mut bufs: BTreeMap<String, Buffers> =
        formats.keys().map(|k| (k.clone(), Buffers::default())).collect();
    let mut dense = vec![];
    let mut names: Vec<&String> = header.keys().filter(|k| *k != "__metadata__").collect();
    names.sort();
    for name in names {
        let info: Info = serde_json::from_value(header[name].clone())
            .map_err(|e| bad(path, format!("tensor `{name}`: {e}")))?;
        let [b, e] = info.data_offsets;
        if b > e || e > data_len {
            return Err(bad(
                path,
                format!(
                    "tensor `{name}`: data offsets [{b}, {e}] outside the {data_len} data bytes (truncated file?)"
                ),
            ));
        }
        let elem = match info.dtype.as_str() {
            "F32" => 4,
            "F16" | "BF16" => 2,
            "U8" => 1,
            d => return Err(bad(path, format!("tensor `{name}`: unsupported dtype {d}"))),
        };
        let numel = info.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        if numel.and_then(|n| n.checked_mul(elem)) != Some(e - b) {
            return Err(bad(
                path,
                format!(
                    "tensor `{name}`: shape {:?} {} does not fill {} bytes",
                    info.shape,
                    info.dtype,
                    e - b
                ),
            ));
        }
        let range = (data_start + b, e - b);
        // A packed buffer: `<weight>.<buffer>` with `<weight>` described in the metadata.
        let packed = name
            .rsplit_once('.')
            .filter(|(w, buf)| formats.contains_key(*w) && Buffers::NAMES.contains(buf));
        if let Some((w, buf)) = packed {
            if info.dtype != buffer_dtype(buf) {
                return Err(bad(
                    path,
                    format!(
                        "tensor `{name}` is {}, packed `{buf}` buffers are {}",
                        info.dtype,
                        buffer_dtype(buf)
                    ),
                ));
            }
            let mapped = Buf::Mapped {
                map: map.clone(),
                offset: range.0,
                len: range.1,
            };
            bufs.get_mut(w).expect("listed").set(buf, mapped)?;
            continue;
        }
        let dtype = match info.dtype.as_str() {
            "F32" => DType::F32,
            "F16" => DType::F16,
            "BF16" => DType::BF16,
            d => {
                return Err(bad(
                    path,
                    format!("tensor `{name}` ({d}) is not a buffer of any packed weight in the metadata"),
                ));
            }
        };
        let bytes = Bytes::Mapped {
            map: map.clone(),
            offset: range.0,
            len: range.1,
        };
        let t =
            Tensor::new(dtype, info.shape, bytes).map_err(|e| bad(path, format!("tensor `{name}`: {e}")))?;
        dense.push((name.clone(), t));
    }
    let mut packed = vec![];
    for (name, b) in bufs {
        let e = &formats[&name];
        let w = PackedWeight::from_parts(e.format.clone(), e.shape[0], e.shape[1], b).map_err(|err| {
            RuntimeError::Weight {
                name: name.clone(),
                msg: format!("{}: {err}", path.display()),
            }
        })?;
        packed.push((name, w));
    }
    Ok(PackedFile {
        packed,
        dense,
        metadata,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{QuantScheme, QuantSpec, ValueFormat};
    use crate::packed::tests::{Rng, all_specs, nm_mask, random_mask, weights};

    fn sample_weights() -> Vec<(String, PackedWeight)> {
        let mut rng = Rng::new(11);
        let (rows, cols) = (5, 136);
        let vals = weights(&mut rng, rows * cols);
        let mut out = vec![];
        for q in all_specs() {
            let w = PackedWeight::pack_quant(rows, cols, &vals, q).unwrap();
            out.push((format!("quant.{}", q.to_string().replace('/', "_")), w));
        }
        let un = random_mask(&mut rng, rows * cols, 40);
        for (pname, pattern, mask) in [
            ("unstructured", SparsePattern::Unstructured, un),
            ("2_4", SparsePattern::NofM { n: 2, m: 4 }, nm_mask(&vals, 2, 4)),
            ("4_8", SparsePattern::NofM { n: 4, m: 8 }, nm_mask(&vals, 4, 8)),
        ] {
            let q3 = QuantSpec {
                bits: 3,
                group: 32,
                scheme: QuantScheme::Asym,
            };
            for (vname, vf) in [("f16", ValueFormat::F16), ("q3", ValueFormat::Quant(q3))] {
                let w = PackedWeight::pack_sparse(rows, cols, &vals, &mask, pattern, vf).unwrap();
                out.push((format!("sparse.{pname}.{vname}"), w));
            }
        }
        out
    }

    fn dense_tensors() -> Vec<(String, Tensor)> {
        let t = Tensor::from_f32(vec![3, 5], (0..15).map(|i| i as f32 * 0.37 - 2.0).collect()).unwrap();
        vec![
            ("norm.weight".into(), t.clone()),
            ("embed.f16".into(), t.convert(DType::F16).unwrap()),
            ("embed.bf16".into(), t.convert(DType::BF16).unwrap()),
        ]
    }

    fn write_sample(path: &Path) -> PackedFile {
        let ws = sample_weights();
        let ds = dense_tensors();
        let meta: BTreeMap<String, String> = [("edge.policy".to_string(), "bits=4".to_string())].into();
        let wr: Vec<(&str, &PackedWeight)> = ws.iter().map(|(n, w)| (n.as_str(), w)).collect();
        let dr: Vec<(&str, &Tensor)> = ds.iter().map(|(n, t)| (n.as_str(), t)).collect();
        write_packed_safetensors(path, &wr, &dr, &meta).unwrap();
        PackedFile {
            packed: ws,
            dense: ds,
            metadata: meta,
        }
    }

    #[test]
    fn round_trip_is_bit_exact_and_mapped() {
        let dir = std::env::temp_dir().join(format!("edge-packed-io-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("model.safetensors");
        let PackedFile {
            packed: ws,
            dense: ds,
            metadata: meta,
        } = write_sample(&path);
        let f = read_packed_safetensors(&path).unwrap();
        assert_eq!(f.metadata, meta);
        assert_eq!(f.packed.len(), ws.len());
        let mut ws = ws;
        ws.sort_by(|a, b| a.0.cmp(&b.0));
        for ((na, a), (nb, b)) in ws.iter().zip(&f.packed) {
            assert_eq!(na, nb);
            assert_eq!(a.format(), b.format(), "{na}");
            assert_eq!(a.shape(), b.shape(), "{na}");
            assert!(b.is_mapped(), "{na}");
            let ab: Vec<(&str, &[u8])> = a.buffers().iter().map(|(n, b)| (n, b.as_slice())).collect();
            let bb: Vec<(&str, &[u8])> = b.buffers().iter().map(|(n, b)| (n, b.as_slice())).collect();
            assert_eq!(ab, bb, "{na}");
            assert_eq!(a.storage_bytes(), b.storage_bytes(), "{na}");
            let (da, db) = (a.to_f32_vec(), b.to_f32_vec());
            assert!(
                da.iter().zip(&db).all(|(x, y)| x.to_bits() == y.to_bits()),
                "{na}"
            );
        }
        let mut ds = ds;
        ds.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(f.dense.len(), ds.len());
        for ((na, a), (nb, b)) in ds.iter().zip(&f.dense) {
            assert_eq!(na, nb);
            assert_eq!((a.dtype, &a.shape, a.raw()), (b.dtype, &b.shape, b.raw()), "{na}");
            assert!(b.is_mapped(), "{na} is aligned, so mapped");
        }

        // The standard safetensors reader accepts the file and sees the same tensors.
        let bytes = std::fs::read(&path).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let (_, m) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        let md = m.metadata().as_ref().unwrap();
        assert_eq!(md["edge.policy"], "bits=4");
        let (name, w) = &ws[0];
        let entry: serde_json::Value = serde_json::from_str(&md[&format!("edge.format.{name}")]).unwrap();
        assert_eq!(entry["shape"], serde_json::json!([5, 136]));
        let qw = st.tensor(&format!("{name}.qweight")).unwrap();
        assert_eq!(qw.dtype(), safetensors::Dtype::U8);
        assert_eq!(qw.data(), w.buffers().qweight.as_ref().unwrap().as_slice());
        assert_eq!(
            st.tensor(&format!("{name}.scales")).unwrap().dtype(),
            safetensors::Dtype::F16
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Rewrites the file's header with `edit` applied (data unchanged).
    fn edit_header(path: &Path, edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) {
        let bytes = std::fs::read(path).unwrap();
        let hlen = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let mut h: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(&bytes[8..8 + hlen]).unwrap();
        edit(&mut h);
        let hb = serde_json::to_vec(&h).unwrap();
        let mut out = (hb.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(&hb);
        out.extend_from_slice(&bytes[8 + hlen..]);
        std::fs::write(path, out).unwrap();
    }

    #[test]
    fn bad_files_are_errors() {
        let dir = std::env::temp_dir().join(format!("edge-packed-io-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("m.safetensors");
        let err = |p: &Path| read_packed_safetensors(p).unwrap_err().to_string();

        // Truncated data: the last tensors run past the end.
        write_sample(&path);
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 5]).unwrap();
        assert!(err(&path).contains("truncated file"), "{}", err(&path));
        // Truncated header; too short.
        std::fs::write(&path, &bytes[..100]).unwrap();
        assert!(err(&path).contains("exceeds the file"), "{}", err(&path));
        std::fs::write(&path, &bytes[..3]).unwrap();
        assert!(err(&path).contains("too short"));

        // A buffer shorter than its format needs (header and data consistent, format not).
        write_sample(&path);
        let name = "quant.q4_g32_asym";
        edit_header(&path, |h| {
            let e = h.get_mut(&format!("{name}.qweight")).unwrap();
            let [b, end] = [
                e["data_offsets"][0].as_u64().unwrap(),
                e["data_offsets"][1].as_u64().unwrap(),
            ];
            e["data_offsets"] = serde_json::json!([b, end - 5]);
            e["shape"] = serde_json::json!([end - 5 - b]);
        });
        let e = err(&path);
        assert!(
            e.contains(&format!("weight `{name}`")) && e.contains("`qweight` has"),
            "{e}"
        );

        // A missing buffer.
        write_sample(&path);
        edit_header(&path, |h| {
            h.remove(&format!("{name}.scales"));
        });
        assert!(err(&path).contains("`scales` is missing"), "{}", err(&path));

        // A wrong buffer dtype, an unknown dtype, a bad format entry.
        write_sample(&path);
        edit_header(&path, |h| {
            h.get_mut(&format!("{name}.qweight")).unwrap()["dtype"] = "I8".into();
        });
        assert!(err(&path).contains("unsupported dtype I8"), "{}", err(&path));
        write_sample(&path);
        edit_header(&path, |h| {
            let m = h.get_mut("__metadata__").unwrap();
            m[format!("edge.format.{name}")] =
                r#"{"shape":[5,136],"format":{"kind":"quant","bits":4}}"#.into();
        });
        assert!(err(&path).contains("bad packed format"), "{}", err(&path));

        // A shape far larger than the file.
        for shape in ["[1099511627776,1099511627776]", "[1099511627776,1]"] {
            write_sample(&path);
            edit_header(&path, |h| {
                let m = h.get_mut("__metadata__").unwrap();
                let f = format!(
                    r#"{{"shape":{shape},"format":{{"kind":"quant","bits":4,"group":32,"scheme":"asym"}}}}"#
                );
                m[format!("edge.format.{name}")] = f.into();
            });
            assert!(err(&path).contains("cannot be held"), "{}", err(&path));
        }

        // A corrupt N:M index (positions must increase inside a block).
        write_sample(&path);
        let f = read_packed_safetensors(&path).unwrap();
        let (_, w) = f.packed.iter().find(|(n, _)| n == "sparse.2_4.f16").unwrap();
        let idx_len = w.buffers().index.as_ref().unwrap().len();
        drop(f);
        let mut bytes = std::fs::read(&path).unwrap();
        let hlen = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let h: serde_json::Value = serde_json::from_slice(&bytes[8..8 + hlen]).unwrap();
        let off = h["sparse.2_4.f16.index"]["data_offsets"][0].as_u64().unwrap() as usize;
        assert!(idx_len > 0);
        bytes[8 + hlen + off] = 0b0000_0000; // positions 0, 0
        std::fs::write(&path, &bytes).unwrap();
        let e = err(&path);
        assert!(
            e.contains("sparse.2_4.f16") && e.contains("positions must increase"),
            "{e}"
        );

        // Reserved metadata and duplicate names on write.
        let ws = sample_weights();
        let meta: BTreeMap<String, String> = [("edge.format.x".to_string(), "{}".to_string())].into();
        let w0 = [("a", &ws[0].1)];
        assert!(write_packed_safetensors(&path, &w0, &[], &meta).is_err());
        let t = &dense_tensors()[0].1;
        let clash = write_packed_safetensors(&path, &w0, &[("a.qweight", t)], &BTreeMap::new());
        assert!(clash.unwrap_err().to_string().contains("used twice"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
