//! The GGUF container (versions 2 and 3, little-endian), read from a memory map.
//!
//! Layout (all integers little-endian):
//!
//! ```text
//! magic "GGUF" | version u32 | tensor_count u64 | kv_count u64
//! kv_count x  { key: string | value_type u32 | value }
//! tensor_count x { name: string | n_dims u32 | ne[n_dims] u64 | type u32 | offset u64 }
//! padding to `general.alignment` (default 32) | tensor data
//! ```
//!
//! A string is a u64 byte length and that many UTF-8 bytes. An array value is an element
//! type u32, a u64 count and the elements. `ne[0]` is the innermost (fastest varying)
//! dimension, so a ggml tensor with `ne = [in, out]` is a row-major `[out, in]` matrix.
//! Tensor offsets are relative to the start of the data section and multiples of the
//! alignment.
//!
//! Every count and length is checked against the bytes that are left in the file before
//! anything is allocated for it, so a corrupt header cannot make the reader allocate more
//! than a small multiple of the file's size.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::sync::Arc;

use memmap2::Mmap;

use super::super::error::{FrontendError, Result};
use super::super::safetensors::map_file;

/// The four bytes every GGUF file starts with.
pub const MAGIC: &[u8; 4] = b"GGUF";
/// Alignment of the tensor data when the file does not set `general.alignment`.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml tensors have at most four dimensions.
pub const MAX_DIMS: usize = 4;
/// Nested metadata arrays deeper than this are rejected (the format allows nesting; real
/// files use none, and unbounded recursion on a hostile file must not overflow the stack).
pub const MAX_ARRAY_DEPTH: usize = 8;

/// The type of a metadata value, as its id in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ValueType {
    U8,
    I8,
    U16,
    I16,
    U32,
    I32,
    F32,
    Bool,
    String,
    Array,
    U64,
    I64,
    F64,
}

impl ValueType {
    pub fn from_id(id: u32) -> Option<ValueType> {
        use ValueType::*;
        Some(match id {
            0 => U8,
            1 => I8,
            2 => U16,
            3 => I16,
            4 => U32,
            5 => I32,
            6 => F32,
            7 => Bool,
            8 => String,
            9 => Array,
            10 => U64,
            11 => I64,
            12 => F64,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        use ValueType::*;
        match self {
            U8 => "u8",
            I8 => "i8",
            U16 => "u16",
            I16 => "i16",
            U32 => "u32",
            I32 => "i32",
            F32 => "f32",
            Bool => "bool",
            String => "string",
            Array => "array",
            U64 => "u64",
            I64 => "i64",
            F64 => "f64",
        }
    }

    /// The fewest bytes one value of this type takes in the file.
    fn min_size(self) -> usize {
        use ValueType::*;
        match self {
            U8 | I8 | Bool => 1,
            U16 | I16 => 2,
            U32 | I32 | F32 => 4,
            U64 | I64 | F64 | String => 8,
            Array => 12,
        }
    }
}

impl fmt::Display for ValueType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Array),
    U64(u64),
    I64(i64),
    F64(f64),
}

/// A metadata array: its elements, stored by type.
#[derive(Debug, Clone, PartialEq)]
pub enum Array {
    U8(Vec<u8>),
    I8(Vec<i8>),
    U16(Vec<u16>),
    I16(Vec<i16>),
    U32(Vec<u32>),
    I32(Vec<i32>),
    F32(Vec<f32>),
    Bool(Vec<bool>),
    String(Vec<String>),
    Array(Vec<Array>),
    U64(Vec<u64>),
    I64(Vec<i64>),
    F64(Vec<f64>),
}

impl Array {
    pub fn elem_type(&self) -> ValueType {
        match self {
            Array::U8(_) => ValueType::U8,
            Array::I8(_) => ValueType::I8,
            Array::U16(_) => ValueType::U16,
            Array::I16(_) => ValueType::I16,
            Array::U32(_) => ValueType::U32,
            Array::I32(_) => ValueType::I32,
            Array::F32(_) => ValueType::F32,
            Array::Bool(_) => ValueType::Bool,
            Array::String(_) => ValueType::String,
            Array::Array(_) => ValueType::Array,
            Array::U64(_) => ValueType::U64,
            Array::I64(_) => ValueType::I64,
            Array::F64(_) => ValueType::F64,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Array::U8(v) => v.len(),
            Array::I8(v) => v.len(),
            Array::U16(v) => v.len(),
            Array::I16(v) => v.len(),
            Array::U32(v) => v.len(),
            Array::I32(v) => v.len(),
            Array::F32(v) => v.len(),
            Array::Bool(v) => v.len(),
            Array::String(v) => v.len(),
            Array::Array(v) => v.len(),
            Array::U64(v) => v.len(),
            Array::I64(v) => v.len(),
            Array::F64(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The elements as i64 if they are integers (any width, signed or not, that fits).
    pub fn to_i64s(&self) -> Option<Vec<i64>> {
        Some(match self {
            Array::U8(v) => v.iter().map(|&x| x as i64).collect(),
            Array::I8(v) => v.iter().map(|&x| x as i64).collect(),
            Array::U16(v) => v.iter().map(|&x| x as i64).collect(),
            Array::I16(v) => v.iter().map(|&x| x as i64).collect(),
            Array::U32(v) => v.iter().map(|&x| x as i64).collect(),
            Array::I32(v) => v.iter().map(|&x| x as i64).collect(),
            Array::U64(v) => v.iter().map(|&x| i64::try_from(x).ok()).collect::<Option<_>>()?,
            Array::I64(v) => v.clone(),
            _ => return None,
        })
    }
}

impl Value {
    pub fn value_type(&self) -> ValueType {
        match self {
            Value::U8(_) => ValueType::U8,
            Value::I8(_) => ValueType::I8,
            Value::U16(_) => ValueType::U16,
            Value::I16(_) => ValueType::I16,
            Value::U32(_) => ValueType::U32,
            Value::I32(_) => ValueType::I32,
            Value::F32(_) => ValueType::F32,
            Value::Bool(_) => ValueType::Bool,
            Value::String(_) => ValueType::String,
            Value::Array(_) => ValueType::Array,
            Value::U64(_) => ValueType::U64,
            Value::I64(_) => ValueType::I64,
            Value::F64(_) => ValueType::F64,
        }
    }

    /// The value as an unsigned integer, if it is a non-negative integer of any width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(x) => Some(x as u64),
            Value::U16(x) => Some(x as u64),
            Value::U32(x) => Some(x as u64),
            Value::U64(x) => Some(x),
            Value::I8(x) => u64::try_from(x).ok(),
            Value::I16(x) => u64::try_from(x).ok(),
            Value::I32(x) => u64::try_from(x).ok(),
            Value::I64(x) => u64::try_from(x).ok(),
            _ => None,
        }
    }

    /// The value as a float, if it is a number.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(x) => Some(x as f64),
            Value::F64(x) => Some(x),
            Value::I8(x) => Some(x as f64),
            Value::I16(x) => Some(x as f64),
            Value::I32(x) => Some(x as f64),
            Value::I64(x) => Some(x as f64),
            _ => self.as_u64().map(|x| x as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&Array> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }

    /// A short text form: scalars as themselves, arrays as `[type; len]`.
    pub fn summary(&self) -> String {
        match self {
            Value::U8(x) => x.to_string(),
            Value::I8(x) => x.to_string(),
            Value::U16(x) => x.to_string(),
            Value::I16(x) => x.to_string(),
            Value::U32(x) => x.to_string(),
            Value::I32(x) => x.to_string(),
            Value::F32(x) => x.to_string(),
            Value::Bool(x) => x.to_string(),
            Value::String(s) => s.clone(),
            Value::Array(a) => format!("[{}; {}]", a.elem_type(), a.len()),
            Value::U64(x) => x.to_string(),
            Value::I64(x) => x.to_string(),
            Value::F64(x) => x.to_string(),
        }
    }
}

/// A ggml tensor type, with its id in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[allow(non_camel_case_types)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
    Q8_K,
    IQ2_XXS,
    IQ2_XS,
    IQ3_XXS,
    IQ1_S,
    IQ4_NL,
    IQ3_S,
    IQ2_S,
    IQ4_XS,
    I8,
    I16,
    I32,
    I64,
    F64,
    IQ1_M,
    BF16,
    TQ1_0,
    TQ2_0,
    MXFP4,
}

impl GgmlType {
    /// The type with this id, if ggml defines one (ids of removed types are unknown).
    pub fn from_id(id: u32) -> Option<GgmlType> {
        use GgmlType::*;
        Some(match id {
            0 => F32,
            1 => F16,
            2 => Q4_0,
            3 => Q4_1,
            6 => Q5_0,
            7 => Q5_1,
            8 => Q8_0,
            9 => Q8_1,
            10 => Q2_K,
            11 => Q3_K,
            12 => Q4_K,
            13 => Q5_K,
            14 => Q6_K,
            15 => Q8_K,
            16 => IQ2_XXS,
            17 => IQ2_XS,
            18 => IQ3_XXS,
            19 => IQ1_S,
            20 => IQ4_NL,
            21 => IQ3_S,
            22 => IQ2_S,
            23 => IQ4_XS,
            24 => I8,
            25 => I16,
            26 => I32,
            27 => I64,
            28 => F64,
            29 => IQ1_M,
            30 => BF16,
            34 => TQ1_0,
            35 => TQ2_0,
            39 => MXFP4,
            _ => return None,
        })
    }

    pub fn id(self) -> u32 {
        use GgmlType::*;
        match self {
            F32 => 0,
            F16 => 1,
            Q4_0 => 2,
            Q4_1 => 3,
            Q5_0 => 6,
            Q5_1 => 7,
            Q8_0 => 8,
            Q8_1 => 9,
            Q2_K => 10,
            Q3_K => 11,
            Q4_K => 12,
            Q5_K => 13,
            Q6_K => 14,
            Q8_K => 15,
            IQ2_XXS => 16,
            IQ2_XS => 17,
            IQ3_XXS => 18,
            IQ1_S => 19,
            IQ4_NL => 20,
            IQ3_S => 21,
            IQ2_S => 22,
            IQ4_XS => 23,
            I8 => 24,
            I16 => 25,
            I32 => 26,
            I64 => 27,
            F64 => 28,
            IQ1_M => 29,
            BF16 => 30,
            TQ1_0 => 34,
            TQ2_0 => 35,
            MXFP4 => 39,
        }
    }

    /// The lower-case name ggml gives the type (`q4_1`, `q6_K` is written `q6_k`).
    pub fn name(self) -> &'static str {
        use GgmlType::*;
        match self {
            F32 => "f32",
            F16 => "f16",
            Q4_0 => "q4_0",
            Q4_1 => "q4_1",
            Q5_0 => "q5_0",
            Q5_1 => "q5_1",
            Q8_0 => "q8_0",
            Q8_1 => "q8_1",
            Q2_K => "q2_k",
            Q3_K => "q3_k",
            Q4_K => "q4_k",
            Q5_K => "q5_k",
            Q6_K => "q6_k",
            Q8_K => "q8_k",
            IQ2_XXS => "iq2_xxs",
            IQ2_XS => "iq2_xs",
            IQ3_XXS => "iq3_xxs",
            IQ1_S => "iq1_s",
            IQ4_NL => "iq4_nl",
            IQ3_S => "iq3_s",
            IQ2_S => "iq2_s",
            IQ4_XS => "iq4_xs",
            I8 => "i8",
            I16 => "i16",
            I32 => "i32",
            I64 => "i64",
            F64 => "f64",
            IQ1_M => "iq1_m",
            BF16 => "bf16",
            TQ1_0 => "tq1_0",
            TQ2_0 => "tq2_0",
            MXFP4 => "mxfp4",
        }
    }

    /// `(elements per block, bytes per block)`, from ggml's block layouts.
    pub fn block(self) -> (usize, usize) {
        use GgmlType::*;
        match self {
            F32 | I32 => (1, 4),
            F16 | BF16 | I16 => (1, 2),
            I8 => (1, 1),
            I64 | F64 => (1, 8),
            Q4_0 => (32, 18),
            Q4_1 => (32, 20),
            Q5_0 => (32, 22),
            Q5_1 => (32, 24),
            Q8_0 => (32, 34),
            Q8_1 => (32, 36),
            IQ4_NL => (32, 18),
            MXFP4 => (32, 17),
            Q2_K => (256, 84),
            Q3_K => (256, 110),
            Q4_K => (256, 144),
            Q5_K => (256, 176),
            Q6_K => (256, 210),
            Q8_K => (256, 292),
            IQ2_XXS => (256, 66),
            IQ2_XS => (256, 74),
            IQ3_XXS => (256, 98),
            IQ1_S => (256, 50),
            IQ3_S => (256, 110),
            IQ2_S => (256, 82),
            IQ4_XS => (256, 136),
            IQ1_M => (256, 56),
            TQ1_0 => (256, 54),
            TQ2_0 => (256, 66),
        }
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One tensor's entry in the header.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    /// Dimensions as ggml lists them: `ne[0]` (the row length) first.
    pub ne: Vec<u64>,
    pub ggml_type: GgmlType,
    /// Offset of the data from the start of the data section.
    pub offset: u64,
    /// Bytes of data.
    pub size: u64,
}

impl TensorInfo {
    /// The shape outermost first (Hugging Face / row-major order): `ne` reversed.
    pub fn shape(&self) -> Vec<usize> {
        self.ne.iter().rev().map(|&d| d as usize).collect()
    }
    pub fn numel(&self) -> usize {
        self.ne.iter().product::<u64>() as usize
    }
}

/// A parsed GGUF file; the tensor data stays in the memory map.
pub struct GgufFile {
    /// The file's path, for error messages.
    pub path: String,
    pub map: Arc<Mmap>,
    pub version: u32,
    pub alignment: u64,
    /// Offset of the data section in the file.
    pub data_offset: u64,
    /// Metadata in file order.
    pub metadata: Vec<(String, Value)>,
    pub tensors: Vec<TensorInfo>,
    kv_index: HashMap<String, usize>,
    tensor_index: HashMap<String, usize>,
}

impl fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "GgufFile({}, v{}, {} metadata keys, {} tensors, alignment {}, data at {})",
            self.path,
            self.version,
            self.metadata.len(),
            self.tensors.len(),
            self.alignment,
            self.data_offset
        )
    }
}

impl GgufFile {
    /// Memory-maps and parses a GGUF file.
    pub fn open(path: &Path) -> Result<GgufFile> {
        let map = map_file(path)?;
        GgufFile::parse(map, &path.display().to_string())
    }

    /// Parses a mapped GGUF file. `path` names it in error messages.
    pub fn parse(map: Arc<Mmap>, path: &str) -> Result<GgufFile> {
        let (version, alignment, data_offset, metadata, tensors) = parse_bytes(&map, path)?;
        let kv_index = metadata
            .iter()
            .enumerate()
            .map(|(i, (k, _))| (k.clone(), i))
            .collect();
        let tensor_index = tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        Ok(GgufFile {
            path: path.to_string(),
            map,
            version,
            alignment,
            data_offset,
            metadata,
            tensors,
            kv_index,
            tensor_index,
        })
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.kv_index.get(key).map(|&i| &self.metadata[i].1)
    }

    pub fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }

    /// The bytes of a tensor (bounds were checked when the file was parsed).
    pub fn tensor_bytes(&self, info: &TensorInfo) -> &[u8] {
        let start = (self.data_offset + info.offset) as usize;
        &self.map[start..start + info.size as usize]
    }

    /// Where a tensor's bytes start in the file.
    pub fn tensor_file_offset(&self, info: &TensorInfo) -> usize {
        (self.data_offset + info.offset) as usize
    }
}

/// Reads little-endian values from a byte slice, reporting where it ran out.
struct Cursor<'a> {
    data: &'a [u8],
    pos: usize,
    path: &'a str,
}

/// What the header holds: version, alignment, data offset, metadata, tensor infos.
pub type Parsed = (u32, u64, u64, Vec<(String, Value)>, Vec<TensorInfo>);

impl<'a> Cursor<'a> {
    fn remaining(&self) -> usize {
        self.data.len() - self.pos
    }

    fn corrupt(&self, msg: String) -> FrontendError {
        FrontendError::Corrupt {
            path: self.path.to_string(),
            msg,
        }
    }

    /// Takes `n` bytes; `what` says what they were meant to be, for the error.
    fn take(&mut self, n: usize, what: &dyn Fn() -> String) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(self.corrupt(format!(
                "truncated {}: needs {n} bytes at offset {}, but the file ends at {}",
                what(),
                self.pos,
                self.data.len()
            )));
        }
        let s = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &dyn Fn() -> String) -> Result<[u8; N]> {
        Ok(self.take(N, what)?.try_into().expect("length checked"))
    }
    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }
    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A string's raw bytes: u64 length, then the bytes (length checked against the file).
    fn string_bytes(&mut self, what: &dyn Fn() -> String) -> Result<&'a [u8]> {
        let len = self.u64(&|| format!("{} (string length)", what()))?;
        if len > self.remaining() as u64 {
            return Err(self.corrupt(format!(
                "truncated {}: string of {len} bytes at offset {}, but only {} bytes are left",
                what(),
                self.pos,
                self.remaining()
            )));
        }
        self.take(len as usize, what)
    }

    /// A string that must be UTF-8 (keys and tensor names).
    fn string_strict(&mut self, what: &dyn Fn() -> String) -> Result<String> {
        let at = self.pos;
        let b = self.string_bytes(what)?;
        match std::str::from_utf8(b) {
            Ok(s) => Ok(s.to_string()),
            Err(e) => Err(self.corrupt(format!("{} at offset {at} is not UTF-8: {e}", what()))),
        }
    }

    /// A string value: invalid UTF-8 is replaced (and logged), as a value is not structure.
    fn string_value(&mut self, what: &dyn Fn() -> String) -> Result<String> {
        let b = self.string_bytes(what)?;
        match std::str::from_utf8(b) {
            Ok(s) => Ok(s.to_string()),
            Err(_) => {
                tracing::warn!(
                    "{}: {} is not valid UTF-8; invalid bytes replaced",
                    self.path,
                    what()
                );
                Ok(String::from_utf8_lossy(b).into_owned())
            }
        }
    }

    fn value_type(&mut self, what: &dyn Fn() -> String) -> Result<ValueType> {
        let at = self.pos;
        let id = self.u32(&|| format!("{} (value type)", what()))?;
        ValueType::from_id(id).ok_or_else(|| {
            self.corrupt(format!(
                "{}: unknown metadata value type id {id} at offset {at}",
                what()
            ))
        })
    }

    fn value(&mut self, ty: ValueType, what: &dyn Fn() -> String, depth: usize) -> Result<Value> {
        Ok(match ty {
            ValueType::U8 => Value::U8(self.array::<1>(what)?[0]),
            ValueType::I8 => Value::I8(self.array::<1>(what)?[0] as i8),
            ValueType::U16 => Value::U16(u16::from_le_bytes(self.array(what)?)),
            ValueType::I16 => Value::I16(i16::from_le_bytes(self.array(what)?)),
            ValueType::U32 => Value::U32(u32::from_le_bytes(self.array(what)?)),
            ValueType::I32 => Value::I32(i32::from_le_bytes(self.array(what)?)),
            ValueType::F32 => Value::F32(f32::from_le_bytes(self.array(what)?)),
            ValueType::U64 => Value::U64(u64::from_le_bytes(self.array(what)?)),
            ValueType::I64 => Value::I64(i64::from_le_bytes(self.array(what)?)),
            ValueType::F64 => Value::F64(f64::from_le_bytes(self.array(what)?)),
            ValueType::Bool => {
                let at = self.pos;
                match self.array::<1>(what)?[0] {
                    0 => Value::Bool(false),
                    1 => Value::Bool(true),
                    b => {
                        return Err(self.corrupt(format!(
                            "{}: bool byte {b} at offset {at} is neither 0 nor 1",
                            what()
                        )));
                    }
                }
            }
            ValueType::String => Value::String(self.string_value(what)?),
            ValueType::Array => Value::Array(self.array_value(what, depth + 1)?),
        })
    }

    fn array_value(&mut self, what: &dyn Fn() -> String, depth: usize) -> Result<Array> {
        if depth > MAX_ARRAY_DEPTH {
            return Err(self.corrupt(format!(
                "{}: arrays nested deeper than {MAX_ARRAY_DEPTH} levels",
                what()
            )));
        }
        let ty = self.value_type(&|| format!("{} (array element type)", what()))?;
        let at = self.pos;
        let count = self.u64(&|| format!("{} (array length)", what()))?;
        // Each element takes at least min_size bytes, so a count the rest of the file cannot
        // hold is rejected before anything is allocated for it.
        let room = (self.remaining() / ty.min_size()) as u64;
        if count > room {
            return Err(self.corrupt(format!(
                "truncated or corrupt {}: array of {count} {ty} elements at offset {at} cannot fit in the {} bytes left in the file",
                what(),
                self.remaining()
            )));
        }
        let n = count as usize;
        let elem = |i: usize| move || format!("{} element {i}", what());
        macro_rules! fixed {
            ($variant:ident, $t:ty, $size:expr) => {{
                let bytes = self.take(n * $size, &|| format!("{} ({n} {ty} elements)", what()))?;
                Array::$variant(
                    bytes
                        .chunks_exact($size)
                        .map(|c| <$t>::from_le_bytes(c.try_into().expect("chunk size")))
                        .collect(),
                )
            }};
        }
        Ok(match ty {
            ValueType::U8 => Array::U8(self.take(n, what)?.to_vec()),
            ValueType::I8 => Array::I8(self.take(n, what)?.iter().map(|&b| b as i8).collect()),
            ValueType::U16 => fixed!(U16, u16, 2),
            ValueType::I16 => fixed!(I16, i16, 2),
            ValueType::U32 => fixed!(U32, u32, 4),
            ValueType::I32 => fixed!(I32, i32, 4),
            ValueType::F32 => fixed!(F32, f32, 4),
            ValueType::U64 => fixed!(U64, u64, 8),
            ValueType::I64 => fixed!(I64, i64, 8),
            ValueType::F64 => fixed!(F64, f64, 8),
            ValueType::Bool => {
                let start = self.pos;
                let bytes = self.take(n, what)?;
                let mut v = Vec::with_capacity(n);
                for (i, &b) in bytes.iter().enumerate() {
                    match b {
                        0 => v.push(false),
                        1 => v.push(true),
                        _ => {
                            return Err(self.corrupt(format!(
                                "{}: bool byte {b} at offset {} is neither 0 nor 1",
                                elem(i)(),
                                start + i
                            )));
                        }
                    }
                }
                Array::Bool(v)
            }
            ValueType::String => {
                let mut v = Vec::with_capacity(n);
                for i in 0..n {
                    v.push(self.string_value(&elem(i))?);
                }
                Array::String(v)
            }
            ValueType::Array => {
                let mut v = Vec::with_capacity(n);
                for i in 0..n {
                    v.push(self.array_value(&elem(i), depth + 1)?);
                }
                Array::Array(v)
            }
        })
    }
}

fn parse_bytes(data: &[u8], path: &str) -> Result<Parsed> {
    let mut c = Cursor { data, pos: 0, path };
    if data.len() < 4 || &data[..4] != MAGIC {
        let head = &data[..data.len().min(4)];
        return Err(FrontendError::UnknownFormat {
            path: path.to_string(),
            msg: format!(
                "bad magic {head:02x?} ({:?}): a GGUF file starts with \"GGUF\"",
                String::from_utf8_lossy(head)
            ),
        });
    }
    c.pos = 4;
    let version = c.u32(&|| "header (version)".into())?;
    if version != 2 && version != 3 {
        let msg = if matches!(version.swap_bytes(), 2 | 3) {
            format!(
                "big-endian GGUF (version field reads {version:#010x}); only little-endian files are supported"
            )
        } else {
            format!("unsupported GGUF version {version} (this reader handles versions 2 and 3)")
        };
        return Err(FrontendError::Unsupported {
            path: path.to_string(),
            msg,
        });
    }
    let tensor_count = c.u64(&|| "header (tensor count)".into())?;
    let kv_count = c.u64(&|| "header (metadata count)".into())?;
    // A metadata entry takes at least 8 (key length) + 4 (type) + 1 bytes; a tensor entry at
    // least 8 (name length) + 4 (n_dims) + 4 (type) + 8 (offset).
    let left = c.remaining() as u64;
    if kv_count > left / 13 {
        return Err(c.corrupt(format!(
            "truncated or corrupt header: it claims {kv_count} metadata entries, but the {left} bytes after it can hold at most {}",
            left / 13
        )));
    }
    if tensor_count > left / 24 {
        return Err(c.corrupt(format!(
            "truncated or corrupt header: it claims {tensor_count} tensors, but the {left} bytes after it can hold at most {}",
            left / 24
        )));
    }

    let mut metadata: Vec<(String, Value)> = Vec::with_capacity(kv_count as usize);
    let mut seen = HashMap::new();
    for i in 0..kv_count as usize {
        let key = c.string_strict(&|| format!("metadata (key of entry #{i})"))?;
        let what = || format!("metadata (`{key}`)");
        let ty = c.value_type(&what)?;
        let value = c.value(ty, &what, 0)?;
        if seen.insert(key.clone(), i).is_some() {
            return Err(c.corrupt(format!("metadata key `{key}` appears twice")));
        }
        metadata.push((key, value));
    }

    let alignment = match seen.get("general.alignment").map(|&i| &metadata[i].1) {
        None => DEFAULT_ALIGNMENT,
        Some(v) => match v.as_u64() {
            Some(a) if a.is_power_of_two() && a <= 1 << 30 => a,
            _ => {
                return Err(c.corrupt(format!(
                    "`general.alignment` is {} ({}); it must be a power of two",
                    v.summary(),
                    v.value_type()
                )));
            }
        },
    };

    let mut tensors = Vec::with_capacity(tensor_count as usize);
    let mut names = HashMap::new();
    for i in 0..tensor_count as usize {
        let name = c.string_strict(&|| format!("tensor info (name of tensor #{i})"))?;
        let what = || format!("tensor info (`{name}`)");
        let bad = |msg: String| FrontendError::BadTensor {
            path: path.to_string(),
            name: name.clone(),
            msg,
        };
        let n_dims = c.u32(&what)? as usize;
        if n_dims > MAX_DIMS {
            return Err(bad(format!(
                "{n_dims} dimensions (ggml allows at most {MAX_DIMS})"
            )));
        }
        let mut ne = Vec::with_capacity(n_dims);
        for _ in 0..n_dims {
            ne.push(c.u64(&what)?);
        }
        let type_id = c.u32(&what)?;
        let offset = c.u64(&what)?;
        let ggml_type =
            GgmlType::from_id(type_id).ok_or_else(|| bad(format!("unknown tensor type id {type_id}")))?;
        let numel = ne
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .filter(|&n| n <= i64::MAX as u64)
            .ok_or_else(|| bad(format!("dimensions {ne:?} overflow")))?;
        let (block, block_bytes) = ggml_type.block();
        let row = ne.first().copied().unwrap_or(1);
        if row % block as u64 != 0 {
            return Err(bad(format!(
                "row length {row} is not a multiple of the {ggml_type} block size {block}"
            )));
        }
        let size = (numel / block as u64)
            .checked_mul(block_bytes as u64)
            .ok_or_else(|| bad(format!("dimensions {ne:?} overflow")))?;
        if offset % alignment != 0 {
            return Err(bad(format!(
                "data offset {offset} is not a multiple of the alignment {alignment}"
            )));
        }
        if names.insert(name.clone(), i).is_some() {
            return Err(c.corrupt(format!("tensor name `{name}` appears twice")));
        }
        tensors.push(TensorInfo {
            name,
            ne,
            ggml_type,
            offset,
            size,
        });
    }

    let data_offset = (c.pos as u64).div_ceil(alignment) * alignment;
    let file_len = data.len() as u64;
    for t in &tensors {
        let start = data_offset.checked_add(t.offset);
        let end = start.and_then(|s| s.checked_add(t.size));
        match (start, end) {
            (Some(_), Some(end)) if end <= file_len => {}
            _ => {
                return Err(FrontendError::Corrupt {
                    path: path.to_string(),
                    msg: format!(
                        "truncated tensor data or tensor data out of bounds: tensor `{}` ({} bytes of {}) \
                         spans file bytes {}..{}, but the file is {file_len} bytes",
                        t.name,
                        t.size,
                        t.ggml_type,
                        data_offset as u128 + t.offset as u128,
                        data_offset as u128 + t.offset as u128 + t.size as u128
                    ),
                });
            }
        }
    }
    Ok((version, alignment, data_offset, metadata, tensors))
}

/// Parses GGUF bytes that are not memory-mapped (tests of the parser on crafted input).
pub fn parse_slice(data: &[u8], path: &str) -> Result<Parsed> {
    parse_bytes(data, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal GGUF writer for crafted inputs.
    pub(crate) struct W(pub Vec<u8>);
    impl W {
        fn new(version: u32, tensors: u64, kvs: u64) -> W {
            let mut w = W(b"GGUF".to_vec());
            w.u32(version);
            w.u64(tensors);
            w.u64(kvs);
            w
        }
        fn u32(&mut self, x: u32) {
            self.0.extend_from_slice(&x.to_le_bytes());
        }
        fn u64(&mut self, x: u64) {
            self.0.extend_from_slice(&x.to_le_bytes());
        }
        fn str(&mut self, s: &str) {
            self.u64(s.len() as u64);
            self.0.extend_from_slice(s.as_bytes());
        }
    }

    fn err(data: &[u8]) -> String {
        parse_slice(data, "x.gguf").unwrap_err().to_string()
    }

    #[test]
    fn rejects_bad_magic_and_versions() {
        assert!(err(b"GGML\x03\0\0\0").contains("bad magic"), "{}", err(b"GGML"));
        assert!(err(b"GG").contains("bad magic"));
        assert!(err(b"").contains("bad magic"));
        let e = err(&W::new(1, 0, 0).0);
        assert!(e.contains("unsupported GGUF version 1"), "{e}");
        let e = err(&W::new(3u32.swap_bytes(), 0, 0).0);
        assert!(e.contains("big-endian"), "{e}");
        let e = err(b"GGUF\x03\0\0\0\x01\0");
        assert!(e.contains("truncated header (tensor count)"), "{e}");
    }

    #[test]
    fn rejects_absurd_counts_without_allocating() {
        let e = err(&W::new(3, 0, u64::MAX).0);
        assert!(e.contains("metadata entries"), "{e}");
        let e = err(&W::new(3, 1 << 40, 0).0);
        assert!(e.contains("claims 1099511627776 tensors"), "{e}");
        assert!(e.contains("truncated or corrupt header"), "{e}");
        // A key whose length is huge.
        let mut w = W::new(3, 0, 1);
        w.u64(u64::MAX);
        w.0.extend_from_slice(&[0; 16]);
        let e = err(&w.0);
        assert!(e.contains("string of 18446744073709551615 bytes"), "{e}");
        // An array claiming 2^60 strings.
        let mut w = W::new(3, 0, 1);
        w.str("k");
        w.u32(9);
        w.u32(8);
        w.u64(1 << 60);
        w.0.extend_from_slice(&[0; 32]);
        let e = err(&w.0);
        assert!(e.contains("array of 1152921504606846976 string elements"), "{e}");
    }

    #[test]
    fn reads_every_value_type_and_empty_and_nested_arrays() {
        let mut w = W::new(2, 0, 4);
        w.str("a.u16");
        w.u32(2);
        w.0.extend_from_slice(&7u16.to_le_bytes());
        w.str("a.empty");
        w.u32(9);
        w.u32(4);
        w.u64(0);
        w.str("a.nested");
        w.u32(9);
        w.u32(9);
        w.u64(2);
        for xs in [&[1u8, 2][..], &[3][..]] {
            w.u32(0);
            w.u64(xs.len() as u64);
            w.0.extend_from_slice(xs);
        }
        w.str("a.bools");
        w.u32(9);
        w.u32(7);
        w.u64(2);
        w.0.extend_from_slice(&[1, 0]);
        let (v, align, _, md, tensors) = parse_slice(&w.0, "x").unwrap();
        assert_eq!((v, align, tensors.len()), (2, 32, 0));
        assert_eq!(md[0].1, Value::U16(7));
        assert_eq!(md[1].1, Value::Array(Array::U32(vec![])));
        assert_eq!(
            md[2].1,
            Value::Array(Array::Array(vec![Array::U8(vec![1, 2]), Array::U8(vec![3])]))
        );
        assert_eq!(md[2].1.summary(), "[array; 2]");
        assert_eq!(md[3].1, Value::Array(Array::Bool(vec![true, false])));
    }

    #[test]
    fn rejects_bad_values() {
        let mut w = W::new(3, 0, 1);
        w.str("k");
        w.u32(13);
        let e = err(&w.0);
        assert!(e.contains("unknown metadata value type id 13"), "{e}");
        let mut w = W::new(3, 0, 1);
        w.str("b");
        w.u32(7);
        w.0.push(2);
        assert!(err(&w.0).contains("bool byte 2"));
        // Deep nesting is bounded.
        let mut w = W::new(3, 0, 1);
        w.str("deep");
        w.u32(9);
        for _ in 0..20 {
            w.u32(9);
            w.u64(1);
        }
        w.0.extend_from_slice(&[0; 64]);
        assert!(err(&w.0).contains("nested deeper"), "{}", err(&w.0));
        // Bad alignment.
        let mut w = W::new(3, 0, 1);
        w.str("general.alignment");
        w.u32(4);
        w.u32(24);
        assert!(err(&w.0).contains("power of two"));
    }

    #[test]
    fn checks_tensor_infos() {
        let tensor = |ne: &[u64], ty: u32, off: u64| {
            let mut w = W::new(3, 1, 0);
            w.str("t");
            w.u32(ne.len() as u32);
            for &d in ne {
                w.u64(d);
            }
            w.u32(ty);
            w.u64(off);
            w
        };
        let e = err(&tensor(&[32], 99, 0).0);
        assert!(e.contains("tensor `t`: unknown tensor type id 99"), "{e}");
        let e = err(&tensor(&[33], 2, 0).0);
        assert!(e.contains("not a multiple of the q4_0 block size 32"), "{e}");
        let e = err(&tensor(&[1, 1, 1, 1, 1], 0, 0).0);
        assert!(e.contains("5 dimensions"), "{e}");
        let e = err(&tensor(&[1 << 32, 1 << 32], 0, 0).0);
        assert!(e.contains("overflow"), "{e}");
        let e = err(&tensor(&[4], 0, 3).0);
        assert!(e.contains("not a multiple of the alignment"), "{e}");
        let e = err(&tensor(&[4], 0, 0).0);
        assert!(e.contains("out of bounds"), "{e}");
        let mut w = tensor(&[4], 0, 0);
        w.0.resize(64 + 16, 0);
        let (_, _, data_offset, _, t) = parse_slice(&w.0, "x").unwrap();
        assert_eq!(data_offset, 64);
        assert_eq!((t[0].size, t[0].shape()), (16, vec![4]));
    }
}
