//! Packed compressed weights: the real storage of the `Quant` and `Sparse` formats of
//! [`crate::format`] (byte layout in `docs/formats.md`).
//!
//! A [`PackedWeight`] is a `[rows, cols]` linear weight held as up to six byte buffers,
//! named as in the safetensors layout ([`io`]):
//!
//! | buffer | holds | for |
//! |---|---|---|
//! | `qweight` | codes, `bits` wide, little-endian bit order, `group * bits / 8` bytes a group | `Quant`, sparse with quantized values |
//! | `scales` | one f16 (little-endian) a group | same |
//! | `mins` | one f16 a group | asymmetric only |
//! | `values` | kept values as f16 | sparse with f16 values |
//! | `mask` | `ceil(cols / 8)` bytes a row, bit `j % 8` of byte `j / 8` = column `j` kept | unstructured |
//! | `index` | `ceil(kept * ceil(log2 m) / 8)` bytes a row: each kept value's position in its block of `m` | N:M |
//!
//! Rows follow each other in every buffer. For a sparse weight the quantization groups run
//! over each row's kept values (in column order), the last group of a row padded with zero
//! codes; a row that keeps nothing has no groups. The bytes held are exactly
//! [`WeightFormat::storage_bytes`] of the real kept counts. On construction the weight
//! derives (does not store) per-row prefix sums of kept values and groups, so any row can
//! be decoded without reading the rows before it.

pub mod io;

pub use io::{PackedFile, read_packed_safetensors, write_packed_safetensors};

use std::fmt;
use std::sync::Arc;

use half::f16;
use memmap2::Mmap;

use crate::error::{Result, RuntimeError};
use crate::format::{QuantScheme, QuantSpec, SparsePattern, ValueFormat, WeightFormat};

/// The bytes of one buffer: owned, or a range of a memory-mapped file (no copy).
#[derive(Clone)]
pub enum Buf {
    Owned(Arc<Vec<u8>>),
    Mapped {
        map: Arc<Mmap>,
        offset: usize,
        len: usize,
    },
}

impl Buf {
    pub fn as_slice(&self) -> &[u8] {
        match self {
            Buf::Owned(v) => v,
            Buf::Mapped { map, offset, len } => &map[*offset..*offset + *len],
        }
    }
    pub fn len(&self) -> usize {
        self.as_slice().len()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn is_mapped(&self) -> bool {
        matches!(self, Buf::Mapped { .. })
    }
}

impl From<Vec<u8>> for Buf {
    fn from(v: Vec<u8>) -> Buf {
        Buf::Owned(Arc::new(v))
    }
}

/// The buffers of a packed weight; which ones a format needs is listed in the module docs.
#[derive(Clone, Default)]
pub struct Buffers {
    pub qweight: Option<Buf>,
    pub scales: Option<Buf>,
    pub mins: Option<Buf>,
    pub values: Option<Buf>,
    pub mask: Option<Buf>,
    pub index: Option<Buf>,
}

impl Buffers {
    /// The buffer names, in the order [`Buffers::iter`] yields them.
    pub const NAMES: [&'static str; 6] = ["qweight", "scales", "mins", "values", "mask", "index"];

    /// The present buffers with their names.
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, &Buf)> {
        let all = [
            &self.qweight,
            &self.scales,
            &self.mins,
            &self.values,
            &self.mask,
            &self.index,
        ];
        Self::NAMES
            .into_iter()
            .zip(all)
            .filter_map(|(n, b)| b.as_ref().map(|b| (n, b)))
    }

    /// Sets the buffer called `name` (one of [`Buffers::NAMES`]).
    pub fn set(&mut self, name: &str, buf: Buf) -> Result<()> {
        let slot = match name {
            "qweight" => &mut self.qweight,
            "scales" => &mut self.scales,
            "mins" => &mut self.mins,
            "values" => &mut self.values,
            "mask" => &mut self.mask,
            "index" => &mut self.index,
            _ => return Err(RuntimeError::Invalid(format!("unknown packed buffer `{name}`"))),
        };
        *slot = Some(buf);
        Ok(())
    }
}

/// A `[rows, cols]` weight in a quantized and/or sparse format.
#[derive(Clone)]
pub struct PackedWeight {
    format: WeightFormat,
    shape: [usize; 2],
    bufs: Buffers,
    /// `kept_start[r]..kept_start[r + 1]`: the kept values of row `r` (rows + 1 entries).
    kept_start: Vec<usize>,
    /// `group_start[r]..group_start[r + 1]`: the quantization groups of row `r`.
    group_start: Vec<usize>,
}

impl fmt::Debug for PackedWeight {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "PackedWeight({} {:?}, {} bytes{})",
            self.format,
            self.shape,
            self.storage_bytes(),
            if self.is_mapped() { ", mapped" } else { "" }
        )
    }
}

fn invalid<T>(msg: String) -> Result<T> {
    Err(RuntimeError::Invalid(msg))
}

/// The value a float takes once stored as f16 (scales and mins are stored as f16, so
/// methods choosing their own codes should compute them against these rounded values).
pub fn round_f16(x: f32) -> f32 {
    f16::from_f32(x).to_f32()
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[2 * i], b[2 * i + 1]])).to_f32()
}

fn quant_spec(format: &WeightFormat) -> Option<QuantSpec> {
    match format {
        WeightFormat::Quant(q)
        | WeightFormat::Sparse {
            values: ValueFormat::Quant(q),
            ..
        } => Some(*q),
        _ => None,
    }
}

fn check_pattern(pattern: SparsePattern, cols: usize) -> Result<()> {
    if let SparsePattern::NofM { n, m } = pattern {
        if n == 0 || n > m || m < 2 {
            return invalid(format!("N:M pattern {n}:{m} needs 0 < n <= m and m >= 2"));
        }
        if !cols.is_multiple_of(m as usize) {
            return invalid(format!(
                "{cols} columns are not a multiple of the block size {m} of the {n}:{m} pattern"
            ));
        }
    }
    Ok(())
}

/// Bytes of the packed codes of `n` values: every group whole.
fn code_bytes(q: &QuantSpec, groups: usize) -> usize {
    groups * q.group as usize * q.bits as usize / 8
}

/// The buffers of a dense (unpruned) `[rows, cols]` weight quantized by `q`, with their
/// byte lengths, as [`PackedWeight::from_parts`] requires them: the codes, the f16 scales
/// and (asymmetric) the f16 minima of every group (the last group of a row padded).
pub fn quant_buffer_lens(q: &QuantSpec, rows: usize, cols: usize) -> Vec<(&'static str, usize)> {
    let groups = rows * cols.div_ceil(q.group as usize);
    let mut lens = vec![("qweight", code_bytes(q, groups)), ("scales", 2 * groups)];
    if q.scheme == QuantScheme::Asym {
        lens.push(("mins", 2 * groups));
    }
    lens
}

/// Unpacks the codes of one whole group (`bytes`: its `group * bits / 8` packed bytes)
/// into `out` (`group` long) as floats.
#[inline]
fn unpack_codes(bits: usize, bytes: &[u8], out: &mut [f32]) {
    match bits {
        8 => {
            for (o, &b) in out.iter_mut().zip(bytes) {
                *o = b as f32;
            }
        }
        4 => {
            for (o, &b) in out.chunks_exact_mut(2).zip(bytes) {
                o[0] = (b & 15) as f32;
                o[1] = (b >> 4) as f32;
            }
        }
        2 => {
            for (o, &b) in out.chunks_exact_mut(4).zip(bytes) {
                o[0] = (b & 3) as f32;
                o[1] = ((b >> 2) & 3) as f32;
                o[2] = ((b >> 4) & 3) as f32;
                o[3] = (b >> 6) as f32;
            }
        }
        _ => {
            // Eight codes take exactly `bits` bytes.
            let mask = (1u64 << bits) - 1;
            for (chunk, src) in out.chunks_exact_mut(8).zip(bytes.chunks_exact(bits)) {
                let mut v = 0u64;
                for (t, &b) in src.iter().enumerate() {
                    v |= (b as u64) << (8 * t);
                }
                for (i, o) in chunk.iter_mut().enumerate() {
                    *o = ((v >> (bits * i)) & mask) as f32;
                }
            }
        }
    }
}

/// `sum a[i] * b[i]` with eight partial sums (vectorizes without `unsafe`).
#[inline]
fn dot8(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ac.zip(bc) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Packs codes (each `< 2^bits`) into `out` (`codes.len() * bits / 8` bytes, zeroed).
fn pack_code_bits(bits: usize, codes: &[u8], out: &mut [u8]) {
    for (i, &c) in codes.iter().enumerate() {
        let p = i * bits;
        let v = (c as u16) << (p % 8);
        out[p / 8] |= v as u8;
        if p % 8 + bits > 8 {
            out[p / 8 + 1] |= (v >> 8) as u8;
        }
    }
}

/// Round-to-nearest quantization of one group: returns (scale, min) as stored (f16-rounded)
/// and writes the codes. Asymmetric: min-max; symmetric: absmax with
/// `scale = absmax / (2^(bits-1) - 1)` so no value is clipped.
fn quantize_group(vals: &[f32], q: &QuantSpec, codes: &mut [u8]) -> Result<(f32, f32)> {
    let qmax = ((1u32 << q.bits) - 1) as f32;
    let (scale, min) = match q.scheme {
        QuantScheme::Asym => {
            let lo = vals.iter().copied().fold(f32::INFINITY, f32::min);
            let hi = vals.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            (round_f16((hi - lo) / qmax), round_f16(lo))
        }
        QuantScheme::Sym => {
            let amax = vals.iter().fold(0.0f32, |a, v| a.max(v.abs()));
            let half = (1u32 << (q.bits - 1)) as f32;
            let s = round_f16(amax / (half - 1.0));
            (s, -s * half)
        }
    };
    if !scale.is_finite() || !min.is_finite() || vals.iter().any(|v| !v.is_finite()) {
        return invalid(format!(
            "a group's values are not finite or out of f16 range (scale {scale}, min {min})"
        ));
    }
    for (c, &v) in codes.iter_mut().zip(vals) {
        *c = if scale > 0.0 {
            ((v - min) / scale).round().clamp(0.0, qmax) as u8
        } else if q.scheme == QuantScheme::Sym {
            (1u32 << (q.bits - 1)) as u8
        } else {
            0
        };
    }
    Ok((scale, if q.scheme == QuantScheme::Asym { min } else { 0.0 }))
}

/// Encodes rows of `row_lens[r]` quantized values into (qweight, scales, mins) buffers.
/// `codes` holds every row's codes back to back; `scales`/`mins` one per group, where a
/// row of `k` values has `ceil(k / group)` groups.
fn encode_rows(
    q: &QuantSpec,
    row_lens: &[usize],
    codes: &[u8],
    scales: &[f32],
    mins: Option<&[f32]>,
) -> Result<Buffers> {
    q.validate().map_err(RuntimeError::Invalid)?;
    let g = q.group as usize;
    let bits = q.bits as usize;
    let total: usize = row_lens.iter().sum();
    let groups: usize = row_lens.iter().map(|k| k.div_ceil(g)).sum();
    if codes.len() != total {
        return invalid(format!(
            "{} codes given, the rows hold {total} values",
            codes.len()
        ));
    }
    if scales.len() != groups {
        return invalid(format!(
            "{} scales given, the rows have {groups} groups",
            scales.len()
        ));
    }
    if let Some(&c) = codes.iter().find(|&&c| (c as u32) >> bits != 0) {
        return invalid(format!("code {c} does not fit in {bits} bits"));
    }
    let mins = match (q.scheme, mins) {
        (QuantScheme::Asym, Some(m)) if m.len() == groups => Some(m),
        (QuantScheme::Asym, m) => {
            return invalid(format!(
                "asymmetric quantization needs {groups} mins, {} given",
                m.map_or(0, |m| m.len())
            ));
        }
        (QuantScheme::Sym, None) => None,
        (QuantScheme::Sym, Some(_)) => return invalid("symmetric quantization takes no mins".into()),
    };
    let gb = g * bits / 8;
    let mut qweight = vec![0u8; groups * gb];
    let (mut t, mut gi) = (0, 0);
    for &k in row_lens {
        for c in codes[t..t + k].chunks(g) {
            pack_code_bits(bits, c, &mut qweight[gi * gb..(gi + 1) * gb]);
            gi += 1;
        }
        t += k;
    }
    let halves = |v: &[f32]| -> Result<Buf> {
        let mut out = Vec::with_capacity(2 * v.len());
        for &x in v {
            let h = f16::from_f32(x);
            if !h.is_finite() {
                return invalid(format!("scale or min {x} is not finite in f16"));
            }
            out.extend_from_slice(&h.to_bits().to_le_bytes());
        }
        Ok(out.into())
    };
    Ok(Buffers {
        qweight: Some(qweight.into()),
        scales: Some(halves(scales)?),
        mins: mins.map(halves).transpose()?,
        ..Buffers::default()
    })
}

/// Round-to-nearest codes, scales and mins for rows of `row_lens[r]` values taken back to
/// back from `vals`.
fn rtn_rows(q: &QuantSpec, row_lens: &[usize], vals: &[f32]) -> Result<Buffers> {
    q.validate().map_err(RuntimeError::Invalid)?;
    let g = q.group as usize;
    let mut codes = vec![0u8; vals.len()];
    let (mut scales, mut mins) = (vec![], vec![]);
    let mut t = 0;
    for &k in row_lens {
        for (vs, cs) in vals[t..t + k].chunks(g).zip(codes[t..t + k].chunks_mut(g)) {
            let (s, m) = quantize_group(vs, q, cs)?;
            scales.push(s);
            mins.push(m);
        }
        t += k;
    }
    let mins = (q.scheme == QuantScheme::Asym).then_some(mins.as_slice());
    encode_rows(q, row_lens, &codes, &scales, mins)
}

impl PackedWeight {
    /// Checks `bufs` against the format and shape (lengths, N:M positions, mask padding)
    /// and builds the weight. Every packer and the file reader come through here.
    pub fn from_parts(format: WeightFormat, rows: usize, cols: usize, bufs: Buffers) -> Result<PackedWeight> {
        if rows == 0 || cols == 0 {
            return invalid(format!("packed weight of shape [{rows}, {cols}] is empty"));
        }
        let expect = |name: &str, b: &Option<Buf>, present: bool| -> Result<()> {
            if b.is_some() != present {
                return invalid(format!(
                    "format {format}: buffer `{name}` {}",
                    if present { "is missing" } else { "is not used" }
                ));
            }
            Ok(())
        };
        let q = quant_spec(&format);
        if let Some(q) = q {
            q.validate().map_err(RuntimeError::Invalid)?;
        }
        let (pattern, f16_values) = match format {
            WeightFormat::Dense { .. } => {
                return invalid("a dense format is a Tensor, not a packed weight".into());
            }
            WeightFormat::Quant(_) => (None, false),
            WeightFormat::Sparse { pattern, values } => {
                check_pattern(pattern, cols)?;
                (Some(pattern), values == ValueFormat::F16)
            }
        };
        // Every format holds at least a byte per row; checking this first bounds what a
        // shape read from a file can make us allocate.
        let held: usize = bufs.iter().map(|(_, b)| b.len()).sum();
        if rows
            .checked_mul(cols)
            .is_none_or(|n| n > isize::MAX as usize / 16)
            || rows > held
        {
            return invalid(format!(
                "packed weight of shape [{rows}, {cols}] cannot be held in {held} bytes"
            ));
        }
        expect("qweight", &bufs.qweight, q.is_some())?;
        expect("scales", &bufs.scales, q.is_some())?;
        expect(
            "mins",
            &bufs.mins,
            q.is_some_and(|q| q.scheme == QuantScheme::Asym),
        )?;
        expect("values", &bufs.values, f16_values)?;
        expect("mask", &bufs.mask, pattern == Some(SparsePattern::Unstructured))?;
        expect(
            "index",
            &bufs.index,
            matches!(pattern, Some(SparsePattern::NofM { .. })),
        )?;
        let len_is = |name: &str, b: &Option<Buf>, want: usize| -> Result<()> {
            match b {
                Some(b) if b.len() != want => invalid(format!(
                    "format {format}, shape [{rows}, {cols}]: buffer `{name}` has {} bytes, expected {want}",
                    b.len()
                )),
                _ => Ok(()),
            }
        };
        // Kept values per row.
        let kept: Vec<usize> = match pattern {
            None => vec![cols; rows],
            Some(SparsePattern::Unstructured) => {
                let mb = cols.div_ceil(8);
                len_is("mask", &bufs.mask, rows * mb)?;
                let mask = bufs.mask.as_ref().expect("checked").as_slice();
                let pad = if cols.is_multiple_of(8) {
                    0
                } else {
                    0xffu8 << (cols % 8)
                };
                let mut kept = Vec::with_capacity(rows);
                for (r, row) in mask.chunks_exact(mb).enumerate() {
                    if row[mb - 1] & pad != 0 {
                        return invalid(format!("mask row {r} has bits set past column {cols}"));
                    }
                    kept.push(row.iter().map(|b| b.count_ones() as usize).sum());
                }
                kept
            }
            Some(SparsePattern::NofM { n, m }) => {
                let (n, m) = (n as usize, m as usize);
                let kpr = cols / m * n;
                let ib = SparsePattern::index_bits(m as u8);
                let rb = (kpr * ib).div_ceil(8);
                len_is("index", &bufs.index, rows * rb)?;
                let index = bufs.index.as_ref().expect("checked").as_slice();
                for (r, row) in index.chunks_exact(rb.max(1)).take(rows).enumerate() {
                    for b in 0..cols / m {
                        let mut prev = None;
                        for t in b * n..(b + 1) * n {
                            let p = read_bits(row, t * ib, ib);
                            if p >= m || prev.is_some_and(|q| p <= q) {
                                return invalid(format!(
                                    "index row {r}, block {b}: positions must increase and be < {m}"
                                ));
                            }
                            prev = Some(p);
                        }
                    }
                }
                vec![kpr; rows]
            }
        };
        let mut kept_start = Vec::with_capacity(rows + 1);
        let mut group_start = Vec::with_capacity(rows + 1);
        let (mut ks, mut gs) = (0, 0);
        kept_start.push(0);
        group_start.push(0);
        for &k in &kept {
            ks += k;
            gs += q.map_or(0, |q| k.div_ceil(q.group as usize));
            kept_start.push(ks);
            group_start.push(gs);
        }
        if let Some(q) = q {
            len_is("qweight", &bufs.qweight, code_bytes(&q, gs))?;
            len_is("scales", &bufs.scales, 2 * gs)?;
            len_is("mins", &bufs.mins, 2 * gs)?;
        }
        len_is("values", &bufs.values, 2 * ks)?;
        let w = PackedWeight {
            format,
            shape: [rows, cols],
            bufs,
            kept_start,
            group_start,
        };
        debug_assert_eq!(w.held_bytes(), w.storage_bytes());
        Ok(w)
    }

    /// Group-wise round-to-nearest quantization of a `[rows, cols]` row-major weight:
    /// min-max per group (asymmetric) or absmax (symmetric). Codes are chosen against the
    /// f16-rounded scale and min.
    pub fn pack_quant(rows: usize, cols: usize, values: &[f32], spec: QuantSpec) -> Result<PackedWeight> {
        if values.len() != rows * cols {
            return invalid(format!("{} values for a [{rows}, {cols}] weight", values.len()));
        }
        let bufs = rtn_rows(&spec, &vec![cols; rows], values)?;
        PackedWeight::from_parts(WeightFormat::Quant(spec), rows, cols, bufs)
    }

    /// Packs codes chosen elsewhere (e.g. GPTQ): `codes` is `[rows, cols]` (each below
    /// `2^bits`), `scales` and `mins` are `[rows, ceil(cols / group)]`; `mins` only for
    /// asymmetric specs. Scales and mins are stored as f16 (see [`round_f16`]). Decoding
    /// gives `scale * q + min` (asymmetric) or `scale * (q - 2^(bits-1))` (symmetric).
    pub fn pack_codes(
        rows: usize,
        cols: usize,
        codes: &[u8],
        scales: &[f32],
        mins: Option<&[f32]>,
        spec: QuantSpec,
    ) -> Result<PackedWeight> {
        let bufs = encode_rows(&spec, &vec![cols; rows], codes, scales, mins)?;
        PackedWeight::from_parts(WeightFormat::Quant(spec), rows, cols, bufs)
    }

    /// Packs a sparse `[rows, cols]` weight: `mask[i]` is true where `values[i]` is kept
    /// (other values are ignored). For N:M patterns every block of `m` columns must keep
    /// exactly `n`. Kept values are stored as f16 or quantized round-to-nearest, the groups
    /// running over each row's kept values.
    pub fn pack_sparse(
        rows: usize,
        cols: usize,
        values: &[f32],
        mask: &[bool],
        pattern: SparsePattern,
        value_format: ValueFormat,
    ) -> Result<PackedWeight> {
        let (positions, kept_vals, row_lens) = sparse_positions(rows, cols, values, mask, pattern)?;
        let mut bufs = match value_format {
            ValueFormat::F16 => {
                let mut b = Vec::with_capacity(2 * kept_vals.len());
                for &v in &kept_vals {
                    let h = f16::from_f32(v);
                    if !h.is_finite() {
                        return invalid(format!("kept value {v} is not finite in f16"));
                    }
                    b.extend_from_slice(&h.to_bits().to_le_bytes());
                }
                Buffers {
                    values: Some(b.into()),
                    ..Buffers::default()
                }
            }
            ValueFormat::Quant(q) => rtn_rows(&q, &row_lens, &kept_vals)?,
        };
        positions.install(&mut bufs);
        let format = WeightFormat::Sparse {
            pattern,
            values: value_format,
        };
        PackedWeight::from_parts(format, rows, cols, bufs)
    }

    /// Packs a sparse weight whose kept values are already quantized (e.g. SparseGPT with
    /// joint quantization): `codes` holds each row's kept values in column order, rows
    /// back to back; a row keeping `k` values has `ceil(k / group)` scales (and mins).
    #[allow(clippy::too_many_arguments)]
    pub fn pack_sparse_codes(
        rows: usize,
        cols: usize,
        mask: &[bool],
        pattern: SparsePattern,
        codes: &[u8],
        scales: &[f32],
        mins: Option<&[f32]>,
        spec: QuantSpec,
    ) -> Result<PackedWeight> {
        let zeros = vec![0.0; mask.len()];
        let (positions, _, row_lens) = sparse_positions(rows, cols, &zeros, mask, pattern)?;
        let mut bufs = encode_rows(&spec, &row_lens, codes, scales, mins)?;
        positions.install(&mut bufs);
        let format = WeightFormat::Sparse {
            pattern,
            values: ValueFormat::Quant(spec),
        };
        PackedWeight::from_parts(format, rows, cols, bufs)
    }

    pub fn format(&self) -> &WeightFormat {
        &self.format
    }
    /// `[rows, cols]`.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    pub fn rows(&self) -> usize {
        self.shape[0]
    }
    pub fn cols(&self) -> usize {
        self.shape[1]
    }
    pub fn buffers(&self) -> &Buffers {
        &self.bufs
    }
    /// Kept values of row `r` (`cols` unless sparse).
    pub fn kept(&self, r: usize) -> usize {
        self.kept_start[r + 1] - self.kept_start[r]
    }
    /// Kept values of every row.
    pub fn kept_counts(&self) -> Vec<usize> {
        self.kept_start.windows(2).map(|w| w[1] - w[0]).collect()
    }
    /// Prefix sums of kept values per row (`rows + 1` entries; read by the JIT kernels).
    pub fn kept_starts(&self) -> &[usize] {
        &self.kept_start
    }
    /// Prefix sums of quantization groups per row (`rows + 1` entries).
    pub fn group_starts(&self) -> &[usize] {
        &self.group_start
    }
    /// Whether every buffer is a range of a mapped file.
    pub fn is_mapped(&self) -> bool {
        self.bufs.iter().all(|(_, b)| b.is_mapped())
    }

    /// Exact storage bytes: [`WeightFormat::storage_bytes`] for the real kept counts.
    pub fn storage_bytes(&self) -> usize {
        let kept = match self.format {
            WeightFormat::Sparse { .. } => self.kept_counts(),
            _ => vec![],
        };
        self.format.storage_bytes(self.rows(), self.cols(), &kept)
    }

    /// The bytes the buffers actually hold (equals [`storage_bytes`](Self::storage_bytes)).
    pub fn held_bytes(&self) -> usize {
        self.bufs.iter().map(|(_, b)| b.len()).sum()
    }

    /// Dequantizes row `r` into `out` (`cols` long), zeros where pruned.
    pub fn decode_row(&self, r: usize, out: &mut [f32]) -> Result<()> {
        if r >= self.rows() || out.len() != self.cols() {
            return invalid(format!(
                "decode_row({r}) into {} values: the weight is {:?}",
                out.len(),
                self.shape
            ));
        }
        self.decode_row_unchecked(r, out);
        Ok(())
    }

    /// Dequantizes rows `r0..r0 + out.len() / cols` into `out`.
    pub fn decode_rows(&self, r0: usize, out: &mut [f32]) -> Result<()> {
        let c = self.cols();
        if !out.len().is_multiple_of(c) || r0 + out.len() / c > self.rows() {
            return invalid(format!(
                "decode_rows({r0}) into {} values: the weight is {:?}",
                out.len(),
                self.shape
            ));
        }
        for (i, o) in out.chunks_exact_mut(c).enumerate() {
            self.decode_row_unchecked(r0 + i, o);
        }
        Ok(())
    }

    /// The whole weight dequantized, row-major.
    pub fn to_f32_vec(&self) -> Vec<f32> {
        let mut v = vec![0.0; self.rows() * self.cols()];
        self.decode_rows(0, &mut v).expect("whole shape");
        v
    }

    /// Decodes row `r` (in range; `out.len() == cols`).
    pub(crate) fn decode_row_unchecked(&self, r: usize, out: &mut [f32]) {
        let cols = self.cols();
        let k = self.kept(r);
        // The kept values go to the tail of `out` first, then are spread forward: the
        // t-th kept value lands at a column <= cols - k + t, so no unread value is
        // overwritten.
        let base = cols - k;
        self.decode_values(r, &mut out[base..]);
        let pattern = match self.format {
            WeightFormat::Sparse { pattern, .. } => pattern,
            _ => return,
        };
        match pattern {
            SparsePattern::Unstructured => {
                let mb = cols.div_ceil(8);
                let mask = &self.bufs.mask.as_ref().expect("verified").as_slice()[r * mb..(r + 1) * mb];
                let mut t = 0;
                for j in 0..cols {
                    if mask[j / 8] >> (j % 8) & 1 == 1 {
                        out[j] = out[base + t];
                        t += 1;
                    } else {
                        out[j] = 0.0;
                    }
                }
            }
            SparsePattern::NofM { n, m } => {
                let (n, m) = (n as usize, m as usize);
                let ib = SparsePattern::index_bits(m as u8);
                let rb = (k * ib).div_ceil(8);
                let index = &self.bufs.index.as_ref().expect("verified").as_slice()[r * rb..(r + 1) * rb];
                let mut t = 0;
                for b in 0..cols / m {
                    let mut next = b * m;
                    for _ in 0..n {
                        let col = b * m + read_bits(index, t * ib, ib);
                        out[next..col].fill(0.0);
                        out[col] = out[base + t];
                        next = col + 1;
                        t += 1;
                    }
                    out[next..(b + 1) * m].fill(0.0);
                }
            }
        }
    }

    /// For a `Quant` weight: the sums of `x` (`cols` long) over each column group, the
    /// second input of [`dot_quant_row`](Self::dot_quant_row). `None` for sparse formats.
    pub fn group_sums(&self, x: &[f32]) -> Option<Vec<f32>> {
        match self.format {
            WeightFormat::Quant(q) => Some(x.chunks(q.group as usize).map(|c| c.iter().sum()).collect()),
            _ => None,
        }
    }

    /// The packed buffers of a quantized weight (or a sparse weight's quantized values),
    /// with the sizes the kernels derive from its spec.
    fn quant_view(&self, q: &QuantSpec) -> QuantView<'_> {
        let g = q.group as usize;
        let bits = q.bits as usize;
        QuantView {
            g,
            bits,
            gb: g * bits / 8,
            codes: self.bufs.qweight.as_ref().expect("verified").as_slice(),
            scales: self.bufs.scales.as_ref().expect("verified").as_slice(),
            mins: self.bufs.mins.as_ref().map(|b| b.as_slice()),
            off: (1u32 << (bits - 1)) as f32,
        }
    }

    /// `sum_j W[r, j] * x[j]` for a `Quant` weight without decoding the row: per group,
    /// `scale * sum(q * x) + min * sum(x)` (symmetric: `min = -scale * 2^(bits-1)`), with
    /// `xsums` from [`group_sums`](Self::group_sums). `r < rows`, `x.len() == cols`.
    pub fn dot_quant_row(&self, r: usize, x: &[f32], xsums: &[f32]) -> f32 {
        let WeightFormat::Quant(q) = self.format else {
            panic!("dot_quant_row on a {} weight", self.format);
        };
        let QuantView {
            g,
            bits,
            gb,
            codes,
            scales,
            mins,
            off,
        } = self.quant_view(&q);
        let mut qs = [0f32; 128];
        let mut acc = 0.0;
        for (i, (xg, xs)) in x.chunks(g).zip(xsums).enumerate() {
            let gi = self.group_start[r] + i;
            let s = f16_at(scales, gi);
            let m = match mins {
                Some(mins) => f16_at(mins, gi),
                None => -s * off,
            };
            unpack_codes(bits, &codes[gi * gb..(gi + 1) * gb], &mut qs[..g]);
            acc += s * dot8(&qs[..xg.len()], xg) + m * xs;
        }
        acc
    }

    /// `sum_j W[r, j] * x[j]` for a sparse weight: gathers `x` at the row's kept columns,
    /// decodes the kept values, and dots the two (`scratch` is reused between calls).
    /// `r < rows`, `x.len() == cols`.
    pub fn dot_sparse_row(&self, r: usize, x: &[f32], scratch: &mut Vec<f32>) -> f32 {
        let WeightFormat::Sparse { pattern, .. } = self.format else {
            panic!("dot_sparse_row on a {} weight", self.format);
        };
        let cols = self.cols();
        let k = self.kept(r);
        scratch.resize(2 * k, 0.0);
        let (xk, vals) = scratch.split_at_mut(k);
        match pattern {
            SparsePattern::Unstructured => {
                let mb = cols.div_ceil(8);
                let mask = &self.bufs.mask.as_ref().expect("verified").as_slice()[r * mb..(r + 1) * mb];
                let mut t = 0;
                for (byte, &b) in mask.iter().enumerate() {
                    let mut bits = b;
                    while bits != 0 {
                        xk[t] = x[8 * byte + bits.trailing_zeros() as usize];
                        bits &= bits - 1;
                        t += 1;
                    }
                }
            }
            SparsePattern::NofM { n, m } => {
                let (n, m) = (n as usize, m as usize);
                let ib = SparsePattern::index_bits(m as u8);
                let rb = (k * ib).div_ceil(8);
                let index = &self.bufs.index.as_ref().expect("verified").as_slice()[r * rb..(r + 1) * rb];
                let pmask = (1usize << ib) - 1;
                for (t, xv) in xk.iter_mut().enumerate() {
                    let p = if 8 % ib == 0 {
                        (index[t * ib / 8] as usize >> (t * ib % 8)) & pmask
                    } else {
                        read_bits(index, t * ib, ib)
                    };
                    *xv = x[t / n * m + p];
                }
            }
        }
        self.decode_values(r, vals);
        dot8(vals, xk)
    }

    /// Decodes the kept values of row `r` (in column order) into `out` (`kept(r)` long).
    fn decode_values(&self, r: usize, out: &mut [f32]) {
        match quant_spec(&self.format) {
            None => {
                let v = self.bufs.values.as_ref().expect("verified").as_slice();
                let k0 = self.kept_start[r];
                for (i, o) in out.iter_mut().enumerate() {
                    *o = f16_at(v, k0 + i);
                }
            }
            Some(q) => {
                let QuantView {
                    g,
                    bits,
                    gb,
                    codes,
                    scales,
                    mins,
                    off,
                } = self.quant_view(&q);
                let mut qs = [0f32; 128];
                for (i, o) in out.chunks_mut(g).enumerate() {
                    let gi = self.group_start[r] + i;
                    let s = f16_at(scales, gi);
                    let m = match mins {
                        Some(mins) => f16_at(mins, gi),
                        None => -s * off,
                    };
                    unpack_codes(bits, &codes[gi * gb..(gi + 1) * gb], &mut qs[..g]);
                    for (o, &c) in o.iter_mut().zip(qs.iter()) {
                        *o = s * c + m;
                    }
                }
            }
        }
    }
}

/// Reads `bits` bits (at most 8) at bit position `p` of a little-endian bit stream.
#[inline]
fn read_bits(b: &[u8], p: usize, bits: usize) -> usize {
    let lo = b[p / 8] as usize;
    let hi = b.get(p / 8 + 1).copied().unwrap_or(0) as usize;
    ((lo | hi << 8) >> (p % 8)) & ((1 << bits) - 1)
}

/// Where the kept values of a sparse weight are, encoded.
enum Positions {
    Mask(Vec<u8>),
    Index(Vec<u8>),
}

impl Positions {
    fn install(self, bufs: &mut Buffers) {
        match self {
            Positions::Mask(m) => bufs.mask = Some(m.into()),
            Positions::Index(i) => bufs.index = Some(i.into()),
        }
    }
}

/// Checks a mask against the pattern and encodes it; returns the kept values (rows back to
/// back) and the kept count of every row.
fn sparse_positions(
    rows: usize,
    cols: usize,
    values: &[f32],
    mask: &[bool],
    pattern: SparsePattern,
) -> Result<(Positions, Vec<f32>, Vec<usize>)> {
    if rows == 0 || cols == 0 || values.len() != rows * cols || mask.len() != rows * cols {
        return invalid(format!(
            "{} values and {} mask entries for a [{rows}, {cols}] weight",
            values.len(),
            mask.len()
        ));
    }
    check_pattern(pattern, cols)?;
    let mut kept_vals = Vec::new();
    let mut row_lens = Vec::with_capacity(rows);
    for (vr, mr) in values.chunks_exact(cols).zip(mask.chunks_exact(cols)) {
        let before = kept_vals.len();
        kept_vals.extend(vr.iter().zip(mr).filter(|(_, k)| **k).map(|(v, _)| *v));
        row_lens.push(kept_vals.len() - before);
    }
    let positions = match pattern {
        SparsePattern::Unstructured => {
            let mb = cols.div_ceil(8);
            let mut bits = vec![0u8; rows * mb];
            for (r, mr) in mask.chunks_exact(cols).enumerate() {
                for (j, _) in mr.iter().enumerate().filter(|(_, k)| **k) {
                    bits[r * mb + j / 8] |= 1 << (j % 8);
                }
            }
            Positions::Mask(bits)
        }
        SparsePattern::NofM { n, m } => {
            let (n, m) = (n as usize, m as usize);
            let ib = SparsePattern::index_bits(m as u8);
            let kpr = cols / m * n;
            let rb = (kpr * ib).div_ceil(8);
            let mut index = vec![0u8; rows * rb];
            for (r, mr) in mask.chunks_exact(cols).enumerate() {
                let row = &mut index[r * rb..(r + 1) * rb];
                for (b, block) in mr.chunks_exact(m).enumerate() {
                    let kept = block.iter().filter(|k| **k).count();
                    if kept != n {
                        return invalid(format!(
                            "{n}:{m} mask: row {r}, columns {}..{} keep {kept} values, not {n}",
                            b * m,
                            (b + 1) * m
                        ));
                    }
                    for (t, (p, _)) in block.iter().enumerate().filter(|(_, k)| **k).enumerate() {
                        let bitpos = (b * n + t) * ib;
                        let v = (p as u16) << (bitpos % 8);
                        row[bitpos / 8] |= v as u8;
                        if bitpos % 8 + ib > 8 {
                            row[bitpos / 8 + 1] |= (v >> 8) as u8;
                        }
                    }
                }
            }
            Positions::Index(index)
        }
    };
    Ok((positions, kept_vals, row_lens))
}

#[cfg(test)]
mod tests;

/// See [`PackedWeight::quant_view`].
struct QuantView<'a> {
    /// Values a group.
    g: usize,
    bits: usize,
    /// Code bytes a group.
    gb: usize,
    codes: &'a [u8],
    scales: &'a [u8],
    mins: Option<&'a [u8]>,
    /// The symmetric code offset `2^(bits-1)`.
    off: f32,
}
