//! Tensor data of an ONNX file: initializers stored inline (`raw_data` or the typed
//! fields) or in external files (`data_location == EXTERNAL`), small constants, and their
//! conversion to runtime tensors.

use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use edge_proto::onnx::TensorProto;
use edge_proto::onnx::tensor_proto::{DataLocation, DataType};
use edge_runtime::tensor::{Bytes, DType, Tensor};
use memmap2::Mmap;

use super::super::error::{FrontendError, Result};
use super::super::{SourceTensor, safetensors};

/// Bits per element of an ONNX data type (`None` for strings and unknown types).
pub(super) fn elem_bits(data_type: i32) -> Option<usize> {
    use DataType as D;
    Some(match DataType::try_from(data_type).ok()? {
        D::Float | D::Int32 | D::Uint32 => 32,
        D::Uint8 | D::Int8 | D::Bool => 8,
        D::Float8e4m3fn | D::Float8e4m3fnuz | D::Float8e5m2 | D::Float8e5m2fnuz => 8,
        D::Uint16 | D::Int16 | D::Float16 | D::Bfloat16 => 16,
        D::Int64 | D::Double | D::Uint64 | D::Complex64 => 64,
        D::Complex128 => 128,
        D::Uint4 | D::Int4 | D::Float4e2m1 => 4,
        D::Undefined | D::String => return None,
    })
}

/// A short name of an ONNX data type for listings (`f32`, `i64`, ...).
pub(super) fn dtype_name(data_type: i32) -> String {
    use DataType as D;
    let s = match DataType::try_from(data_type) {
        Ok(D::Float) => "f32",
        Ok(D::Float16) => "f16",
        Ok(D::Bfloat16) => "bf16",
        Ok(D::Double) => "f64",
        Ok(D::Int8) => "i8",
        Ok(D::Int16) => "i16",
        Ok(D::Int32) => "i32",
        Ok(D::Int64) => "i64",
        Ok(D::Uint8) => "u8",
        Ok(D::Uint16) => "u16",
        Ok(D::Uint32) => "u32",
        Ok(D::Uint64) => "u64",
        Ok(D::Bool) => "bool",
        Ok(D::String) => "string",
        Ok(other) => return other.as_str_name().to_ascii_lowercase(),
        Err(_) => return format!("type{data_type}"),
    };
    s.to_string()
}

/// The runtime element type of a weight stored as `data_type`.
fn weight_dtype(data_type: i32) -> Option<DType> {
    match DataType::try_from(data_type).ok()? {
        DataType::Float => Some(DType::F32),
        DataType::Float16 => Some(DType::F16),
        DataType::Bfloat16 => Some(DType::BF16),
        _ => None,
    }
}

/// The dimensions of a tensor as `usize` (`None` if one is negative).
pub(super) fn dims(t: &TensorProto) -> Option<Vec<usize>> {
    t.dims.iter().map(|&d| usize::try_from(d).ok()).collect()
}

/// Number of bytes the elements of `t` take (`None` on overflow or unsized types).
fn byte_len(t: &TensorProto) -> Option<usize> {
    let bits = elem_bits(t.data_type)?;
    let numel = dims(t)?.iter().try_fold(1usize, |a, &d| a.checked_mul(d))?;
    numel.checked_mul(bits).map(|b| b.div_ceil(8))
}

fn is_external(t: &TensorProto) -> bool {
    t.data_location == DataLocation::External as i32
}

/// Values of a small constant tensor.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum ConstData {
    F(Vec<f64>),
    I(Vec<i64>),
}

/// A small constant: its dims and values.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Const {
    pub dims: Vec<i64>,
    pub data: ConstData,
}

impl Const {
    pub fn len(&self) -> usize {
        match &self.data {
            ConstData::F(v) => v.len(),
            ConstData::I(v) => v.len(),
        }
    }
    /// All values as f64 (integers converted).
    pub fn floats(&self) -> Vec<f64> {
        match &self.data {
            ConstData::F(v) => v.clone(),
            ConstData::I(v) => v.iter().map(|&x| x as f64).collect(),
        }
    }
    /// All values if the constant is an integer tensor.
    pub fn ints(&self) -> Option<&[i64]> {
        match &self.data {
            ConstData::I(v) => Some(v),
            ConstData::F(_) => None,
        }
    }
    /// The single value of a one-element constant, as f64.
    pub fn scalar(&self) -> Option<f64> {
        (self.len() == 1).then(|| self.floats()[0])
    }
    /// The single value of a one-element integer constant.
    pub fn int_scalar(&self) -> Option<i64> {
        self.ints().filter(|v| v.len() == 1).map(|v| v[0])
    }
}

/// Largest constant (in elements) decoded for pattern checks; weights are never decoded
/// this way.
const MAX_CONST_ELEMS: usize = 1 << 16;

/// Decodes a small inline tensor (a `Constant` node's value or a small initializer).
/// Returns `None` for external, large, malformed or non-numeric tensors.
pub(super) fn const_of(t: &TensorProto) -> Option<Const> {
    if is_external(t) {
        return None;
    }
    let numel = dims(t)?.iter().try_fold(1usize, |a, &d| a.checked_mul(d))?;
    if numel > MAX_CONST_ELEMS {
        return None;
    }
    let raw = &t.raw_data;
    let data = match DataType::try_from(t.data_type).ok()? {
        DataType::Float => ConstData::F(if raw.is_empty() {
            t.float_data.iter().map(|&x| x as f64).collect()
        } else {
            le_chunks::<4>(raw)?
                .map(|c| f32::from_le_bytes(c) as f64)
                .collect()
        }),
        DataType::Double => ConstData::F(if raw.is_empty() {
            t.double_data.clone()
        } else {
            le_chunks::<8>(raw)?.map(f64::from_le_bytes).collect()
        }),
        DataType::Float16 => ConstData::F(if raw.is_empty() {
            t.int32_data
                .iter()
                .map(|&x| half::f16::from_bits(x as u16).to_f64())
                .collect()
        } else {
            le_chunks::<2>(raw)?
                .map(|c| half::f16::from_le_bytes(c).to_f64())
                .collect()
        }),
        DataType::Int64 => ConstData::I(if raw.is_empty() {
            t.int64_data.clone()
        } else {
            le_chunks::<8>(raw)?.map(i64::from_le_bytes).collect()
        }),
        DataType::Int32 => ConstData::I(if raw.is_empty() {
            t.int32_data.iter().map(|&x| x as i64).collect()
        } else {
            le_chunks::<4>(raw)?
                .map(|c| i32::from_le_bytes(c) as i64)
                .collect()
        }),
        DataType::Bool | DataType::Uint8 | DataType::Int8 => ConstData::I(if raw.is_empty() {
            t.int32_data.iter().map(|&x| x as i64).collect()
        } else if t.data_type == DataType::Int8 as i32 {
            raw.iter().map(|&b| b as i8 as i64).collect()
        } else {
            raw.iter().map(|&b| b as i64).collect()
        }),
        _ => return None,
    };
    let c = Const {
        dims: t.dims.clone(),
        data,
    };
    (c.len() == numel).then_some(c)
}

/// Splits little-endian bytes into `N`-byte chunks (`None` if the length is not a
/// multiple of `N`).
fn le_chunks<const N: usize>(raw: &[u8]) -> Option<impl Iterator<Item = [u8; N]> + '_> {
    raw.len().is_multiple_of(N).then(|| {
        raw.chunks_exact(N).map(|c| {
            let mut a = [0u8; N];
            a.copy_from_slice(c);
            a
        })
    })
}

/// Where the bytes of one initializer are.
enum Source<'a> {
    /// `raw_data` (little-endian elements).
    Raw(&'a [u8]),
    /// `float_data`.
    Floats(&'a [f32]),
    /// `int32_data` holding 16-bit patterns (f16, bf16).
    HalfBits(&'a [i32]),
    /// A byte range of a memory-mapped external file (little-endian elements).
    Mapped {
        map: Arc<Mmap>,
        offset: usize,
        len: usize,
    },
}

/// The initializers of a graph, with their external files mapped on first use.
pub(super) struct Store<'a> {
    /// The model file (for error messages).
    path: String,
    /// The model file's directory, canonicalized; external data must stay inside it.
    dir: PathBuf,
    inits: HashMap<&'a str, &'a TensorProto>,
    maps: HashMap<PathBuf, Arc<Mmap>>,
}

impl<'a> Store<'a> {
    pub fn new(model_path: &Path, inits: HashMap<&'a str, &'a TensorProto>) -> Result<Store<'a>> {
        let path = model_path.display().to_string();
        let parent = match model_path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let dir = parent.canonicalize().map_err(|source| FrontendError::Io {
            path: parent.display().to_string(),
            source,
        })?;
        Ok(Store {
            path,
            dir,
            inits,
            maps: HashMap::new(),
        })
    }

    /// Number of distinct external data files mapped so far.
    pub fn external_files(&self) -> usize {
        self.maps.len()
    }

    fn bad(&self, name: &str, msg: String) -> FrontendError {
        FrontendError::BadTensor {
            path: self.path.clone(),
            name: name.to_string(),
            msg,
        }
    }

    fn get(&self, name: &str) -> Result<&'a TensorProto> {
        self.inits
            .get(name)
            .copied()
            .ok_or_else(|| FrontendError::MissingTensor {
                path: self.path.clone(),
                name: name.to_string(),
            })
    }

    /// Checks every initializer (sizes, external references) and lists them.
    pub fn listing(&mut self) -> Result<Vec<SourceTensor>> {
        let mut names: Vec<&'a str> = self.inits.keys().copied().collect();
        names.sort_unstable();
        let mut out = Vec::with_capacity(names.len());
        for name in names {
            let t = self.get(name)?;
            let shape =
                dims(t).ok_or_else(|| self.bad(name, format!("negative dimension in {:?}", t.dims)))?;
            let bytes = match byte_len(t) {
                Some(n) => {
                    if is_external(t) {
                        // Resolves and bounds-checks the reference.
                        self.source(name, t)?;
                    }
                    n as u64
                }
                None => 0,
            };
            out.push(SourceTensor {
                name: name.to_string(),
                shape,
                dtype: dtype_name(t.data_type),
                bytes,
            });
        }
        Ok(out)
    }

    /// Finds the bytes of a numeric initializer and checks their length.
    fn source(&mut self, name: &str, t: &'a TensorProto) -> Result<Source<'a>> {
        let want = byte_len(t).ok_or_else(|| {
            self.bad(
                name,
                format!(
                    "element type {} with dims {:?} has no byte size",
                    dtype_name(t.data_type),
                    t.dims
                ),
            )
        })?;
        if is_external(t) {
            let (map, offset, len) = self.external(name, t, want)?;
            return Ok(Source::Mapped { map, offset, len });
        }
        if t.data_location != DataLocation::Default as i32 {
            return Err(self.bad(name, format!("unknown data_location {}", t.data_location)));
        }
        let numel = dims(t).map(|d| d.iter().product::<usize>()).unwrap_or(0);
        let src = if !t.raw_data.is_empty() || want == 0 {
            if t.raw_data.len() != want {
                return Err(self.bad(
                    name,
                    format!(
                        "raw_data holds {} bytes, dims {:?} need {want}",
                        t.raw_data.len(),
                        t.dims
                    ),
                ));
            }
            Source::Raw(&t.raw_data)
        } else if t.data_type == DataType::Float as i32 {
            if t.float_data.len() != numel {
                return Err(self.bad(
                    name,
                    format!(
                        "float_data holds {} values, dims {:?} need {numel}",
                        t.float_data.len(),
                        t.dims
                    ),
                ));
            }
            Source::Floats(&t.float_data)
        } else if matches!(weight_dtype(t.data_type), Some(DType::F16 | DType::BF16)) {
            if t.int32_data.len() != numel {
                return Err(self.bad(
                    name,
                    format!(
                        "int32_data holds {} values, dims {:?} need {numel}",
                        t.int32_data.len(),
                        t.dims
                    ),
                ));
            }
            Source::HalfBits(&t.int32_data)
        } else {
            // Integer initializers are only read as small constants (`const_of`).
            return Err(self.bad(
                name,
                format!(
                    "{} data in typed fields is not read as a weight",
                    dtype_name(t.data_type)
                ),
            ));
        };
        Ok(src)
    }

    /// Resolves an external data reference: a file inside the model's directory, mapped,
    /// and a byte range within it of exactly `want` bytes.
    fn external(&mut self, name: &str, t: &TensorProto, want: usize) -> Result<(Arc<Mmap>, usize, usize)> {
        let (mut location, mut offset, mut length) = (None, 0usize, None);
        for e in &t.external_data {
            let num = |v: &str| {
                v.trim().parse::<usize>().map_err(|_| {
                    self.bad(
                        name,
                        format!("external data `{}` is not a byte count: `{v}`", e.key),
                    )
                })
            };
            match e.key.as_str() {
                "location" => location = Some(e.value.as_str()),
                "offset" => offset = num(&e.value)?,
                "length" => length = Some(num(&e.value)?),
                _ => {} // `checksum` and future keys do not change where the bytes are
            }
        }
        let loc = location.ok_or_else(|| self.bad(name, "external data without a `location`".into()))?;
        let rel = Path::new(loc);
        let plain = !loc.is_empty()
            && rel
                .components()
                .all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
        if !plain {
            return Err(self.bad(
                name,
                format!("external data location `{loc}` is not a relative path inside the model's directory"),
            ));
        }
        let file = self.dir.join(rel);
        let canon = file.canonicalize().map_err(|source| FrontendError::Io {
            path: file.display().to_string(),
            source,
        })?;
        if !canon.starts_with(&self.dir) {
            return Err(self.bad(
                name,
                format!(
                    "external data location `{loc}` resolves to {} outside the model's directory",
                    canon.display()
                ),
            ));
        }
        if let Some(len) = length.filter(|&l| l != want) {
            return Err(self.bad(
                name,
                format!("external data length {len} differs from the {want} bytes its dims need"),
            ));
        }
        let map = match self.maps.get(&canon) {
            Some(m) => m.clone(),
            None => {
                let m = safetensors::map_file(&canon)?;
                self.maps.insert(canon.clone(), m.clone());
                m
            }
        };
        let end = offset
            .checked_add(want)
            .filter(|&e| e <= map.len())
            .ok_or_else(|| {
                self.bad(
                    name,
                    format!(
                        "bytes {offset}..{} are beyond the end of `{loc}` ({} bytes)",
                        offset as u128 + want as u128,
                        map.len()
                    ),
                )
            })?;
        Ok((map, offset, end - offset))
    }

    /// Loads a weight as stored (shape = the initializer's dims). External f32/f16/bf16
    /// data stays memory-mapped (on little-endian hosts); inline data is copied.
    pub fn weight(&mut self, name: &str) -> Result<Tensor> {
        let t = self.get(name)?;
        let dtype = weight_dtype(t.data_type).ok_or_else(|| {
            self.bad(
                name,
                format!(
                    "element type {} is not a weight type (f32, f16, bf16)",
                    dtype_name(t.data_type)
                ),
            )
        })?;
        let shape = dims(t).ok_or_else(|| self.bad(name, format!("negative dimension in {:?}", t.dims)))?;
        let src = self.source(name, t)?;
        let bytes = match src {
            Source::Mapped { map, offset, len } if cfg!(target_endian = "little") => {
                Bytes::Mapped { map, offset, len }
            }
            other => owned(dtype, &other),
        };
        Tensor::new(dtype, shape, bytes).map_err(|e| self.bad(name, e.to_string()))
    }

    /// Loads a 2-D weight stored `[in, out]` (as a MatMul's right operand) as `[out, in]`
    /// (the HF layout the IR uses). This is an owned copy.
    pub fn weight_transposed(&mut self, name: &str) -> Result<Tensor> {
        let t = self.get(name)?;
        let dtype = weight_dtype(t.data_type).ok_or_else(|| {
            self.bad(
                name,
                format!(
                    "element type {} is not a weight type (f32, f16, bf16)",
                    dtype_name(t.data_type)
                ),
            )
        })?;
        let (rows, cols) = match dims(t).as_deref() {
            Some(&[r, c]) => (r, c),
            _ => {
                return Err(self.bad(name, format!("expected a 2-D weight, dims are {:?}", t.dims)));
            }
        };
        let src = self.source(name, t)?;
        let bytes = match owned(dtype, &src) {
            Bytes::F32(v) => Bytes::F32(Arc::new(transpose(&v, rows, cols))),
            Bytes::Half(v) => Bytes::Half(Arc::new(transpose(&v, rows, cols))),
            Bytes::Mapped { .. } => unreachable!("owned() returns owned bytes"),
        };
        Tensor::new(dtype, vec![cols, rows], bytes).map_err(|e| self.bad(name, e.to_string()))
    }
}

/// Copies the elements of a source into owned storage of the given type.
fn owned(dtype: DType, src: &Source<'_>) -> Bytes {
    let raw: &[u8] = match src {
        Source::Raw(r) => r,
        Source::Mapped { map, offset, len } => &map[*offset..*offset + *len],
        Source::Floats(f) => return Bytes::F32(Arc::new(f.to_vec())),
        Source::HalfBits(h) => return Bytes::Half(Arc::new(h.iter().map(|&x| x as u16).collect())),
    };
    edge_runtime::tensor::copy_owned(dtype, raw)
}

/// Transposes a row-major `[rows, cols]` matrix into `[cols, rows]`, in cache-sized tiles.
fn transpose<T: Copy + Default>(src: &[T], rows: usize, cols: usize) -> Vec<T> {
    const TILE: usize = 32;
    let mut out = vec![T::default(); src.len()];
    for r0 in (0..rows).step_by(TILE) {
        for c0 in (0..cols).step_by(TILE) {
            for r in r0..(r0 + TILE).min(rows) {
                for c in c0..(c0 + TILE).min(cols) {
                    out[c * rows + r] = src[r * cols + c];
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transposes_non_square() {
        let m: Vec<u16> = (0..6).collect(); // [[0,1,2],[3,4,5]]
        assert_eq!(transpose(&m, 2, 3), vec![0, 3, 1, 4, 2, 5]);
        let big: Vec<u32> = (0..70 * 45).collect();
        let t = transpose(&big, 70, 45);
        assert_eq!(t[44 * 70 + 69], big[69 * 45 + 44]);
        assert_eq!(transpose(&t, 45, 70), big);
    }

    #[test]
    fn decodes_constants() {
        let t = TensorProto {
            dims: vec![2],
            data_type: DataType::Int64 as i32,
            raw_data: [7i64, -1].iter().flat_map(|x| x.to_le_bytes()).collect(),
            ..Default::default()
        };
        assert_eq!(const_of(&t).unwrap().ints(), Some(&[7i64, -1][..]));
        let f = TensorProto {
            data_type: DataType::Float as i32,
            float_data: vec![0.25],
            ..Default::default()
        };
        assert_eq!(const_of(&f).unwrap().scalar(), Some(0.25));
        // Wrong length for the dims.
        let bad = TensorProto { dims: vec![3], ..f };
        assert_eq!(const_of(&bad), None);
    }
}
