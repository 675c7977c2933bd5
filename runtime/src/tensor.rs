//! Weight storage: element types and bytes that are either memory-mapped from a model file
//! or owned (after a conversion such as dequantization).

use std::fmt;
use std::sync::Arc;

use half::{bf16, f16};
use memmap2::Mmap;
use serde::{Deserialize, Serialize};

use crate::error::{Result, RuntimeError};

/// Element type of a dense tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    F32,
    F16,
    BF16,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The bytes behind a tensor.
#[derive(Clone)]
pub enum Bytes {
    /// A byte range of a memory-mapped file (no copy).
    Mapped {
        map: Arc<Mmap>,
        offset: usize,
        len: usize,
    },
    /// Owned f32 values (e.g. dequantized from a packed format).
    F32(Arc<Vec<f32>>),
    /// Owned 16-bit values (f16 or bf16 bit patterns).
    Half(Arc<Vec<u16>>),
}

impl Bytes {
    pub fn as_slice(&self) -> &[u8] {
        match self {
            Bytes::Mapped { map, offset, len } => &map[*offset..*offset + *len],
            Bytes::F32(v) => bytemuck::cast_slice(v.as_slice()),
            Bytes::Half(v) => bytemuck::cast_slice(v.as_slice()),
        }
    }
    pub fn is_mapped(&self) -> bool {
        matches!(self, Bytes::Mapped { .. })
    }
}

/// A dense tensor: shape (row-major, outermost first), element type and its bytes.
///
/// A linear weight has shape `[out, in]` (y = x W^T), as Hugging Face stores it.
#[derive(Clone)]
pub struct Tensor {
    pub dtype: DType,
    pub shape: Vec<usize>,
    bytes: Bytes,
}

impl fmt::Debug for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Tensor({} {:?}{})",
            self.dtype,
            self.shape,
            if self.bytes.is_mapped() { ", mapped" } else { "" }
        )
    }
}

impl Tensor {
    /// Wraps bytes as a tensor, checking that the length matches the shape and that
    /// the bytes are aligned for the element type. A misaligned mapping is copied.
    pub fn new(dtype: DType, shape: Vec<usize>, bytes: Bytes) -> Result<Tensor> {
        let numel: usize = shape.iter().product();
        let want = numel
            .checked_mul(dtype.size())
            .ok_or_else(|| RuntimeError::Invalid(format!("tensor shape {shape:?} overflows")))?;
        let have = bytes.as_slice().len();
        if have != want {
            return Err(RuntimeError::Invalid(format!(
                "tensor of shape {shape:?} {dtype} needs {want} bytes, got {have}"
            )));
        }
        let bytes = match bytes {
            Bytes::Mapped { .. } if !(bytes.as_slice().as_ptr() as usize).is_multiple_of(dtype.size()) => {
                copy_owned(dtype, bytes.as_slice())
            }
            b => b,
        };
        Ok(Tensor { dtype, shape, bytes })
    }

    pub fn from_f32(shape: Vec<usize>, data: Vec<f32>) -> Result<Tensor> {
        Tensor::new(DType::F32, shape, Bytes::F32(Arc::new(data)))
    }

    pub fn from_half(dtype: DType, shape: Vec<usize>, data: Vec<u16>) -> Result<Tensor> {
        Tensor::new(dtype, shape, Bytes::Half(Arc::new(data)))
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn nbytes(&self) -> usize {
        self.numel() * self.dtype.size()
    }
    pub fn is_mapped(&self) -> bool {
        self.bytes.is_mapped()
    }
    pub fn raw(&self) -> &[u8] {
        self.bytes.as_slice()
    }
    /// Where the bytes are (a mapped file range or owned values).
    pub fn bytes(&self) -> &Bytes {
        &self.bytes
    }

    /// The values as f32 if the tensor is stored as f32.
    pub fn f32s(&self) -> Option<&[f32]> {
        (self.dtype == DType::F32).then(|| bytemuck::cast_slice(self.raw()))
    }
    /// The raw 16-bit patterns if the tensor is f16 or bf16.
    pub fn halves(&self) -> Option<&[u16]> {
        (self.dtype != DType::F32).then(|| bytemuck::cast_slice(self.raw()))
    }

    /// Converts `count` elements starting at element `start` to f32 into `out`.
    pub fn read_f32(&self, start: usize, out: &mut [f32]) {
        let n = out.len();
        match self.dtype {
            DType::F32 => out.copy_from_slice(&self.f32s().unwrap()[start..start + n]),
            DType::F16 => {
                let src: &[f16] = bytemuck::cast_slice(&self.halves().unwrap()[start..start + n]);
                half::slice::HalfFloatSliceExt::convert_to_f32_slice(src, out);
            }
            DType::BF16 => {
                let src: &[bf16] = bytemuck::cast_slice(&self.halves().unwrap()[start..start + n]);
                half::slice::HalfFloatSliceExt::convert_to_f32_slice(src, out);
            }
        }
    }

    /// All values converted to f32 (a copy).
    pub fn to_f32_vec(&self) -> Vec<f32> {
        let mut v = vec![0.0; self.numel()];
        self.read_f32(0, &mut v);
        v
    }

    /// A copy converted to another element type.
    pub fn convert(&self, dtype: DType) -> Result<Tensor> {
        if dtype == self.dtype {
            return Ok(self.clone());
        }
        let v = self.to_f32_vec();
        match dtype {
            DType::F32 => Tensor::from_f32(self.shape.clone(), v),
            DType::F16 => Tensor::from_half(
                dtype,
                self.shape.clone(),
                v.iter().map(|&x| f16::from_f32(x).to_bits()).collect(),
            ),
            DType::BF16 => Tensor::from_half(
                dtype,
                self.shape.clone(),
                v.iter().map(|&x| bf16::from_f32(x).to_bits()).collect(),
            ),
        }
    }
}

/// Owned storage holding a copy of little-endian `raw` bytes of element type `dtype`.
pub fn copy_owned(dtype: DType, raw: &[u8]) -> Bytes {
    match dtype {
        DType::F32 => Bytes::F32(Arc::new(
            raw.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        )),
        DType::F16 | DType::BF16 => Bytes::Half(Arc::new(
            raw.chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .collect(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn length_mismatch_is_an_error() {
        let err = Tensor::from_f32(vec![2, 3], vec![0.0; 5]).unwrap_err();
        assert!(err.to_string().contains("needs 24 bytes"), "{err}");
    }

    #[test]
    fn converts_between_types() {
        let t = Tensor::from_f32(vec![3], vec![1.0, -2.5, 0.125]).unwrap();
        for dt in [DType::F16, DType::BF16] {
            let c = t.convert(dt).unwrap();
            assert_eq!(c.to_f32_vec(), vec![1.0, -2.5, 0.125]);
        }
    }
}
