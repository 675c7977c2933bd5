//! What a generated kernel computes: the contract between the compiler, which writes a
//! kernel's CLIF, and the runtime, which JIT-compiles and calls it.
//!
//! A [`KernelSpec`] names one kernel for one weight shape and format. Its [`name`]
//! (`KernelSpec::name`) is stable and parses back ([`KernelSpec::parse`]); it is the key of
//! the bundle's kernel table and the symbol of the compiled function.
//!
//! Two kinds of kernels serve every product with a compressed weight `W [rows, cols]`:
//!
//! - [`KernelKind::Matvec`]: `y[r] = sum_j W[r, j] x[j]` for a row range, in integer form:
//!   `x` is quantized to int8 once per call (one scale per weight group, see
//!   [`QuantizedX`](super::QuantizedX)), each group is an integer dot product of the codes
//!   with it, then `scale * dx * isum + min * sum(x)`. Used for decode (1-3 token rows).
//! - [`KernelKind::Decode`]: dequantizes a row range to f32 (rows `Cp = G * group` long,
//!   padding included). Matmul (`x W^T`, prefill) and the transposed product (`dy W`,
//!   backward) decode a tile of weight rows once and multiply it with the GEMM crate, so
//!   the decoding is amortised over all token rows.
//!
//! Function signatures (all pointers are `i64` addresses, the default call convention):
//!
//! ```text
//! matvec(xq, xd, xs, codes, scales, mins, y, r0, r1)
//!   xq: i8 [G * group]   x quantized per group, permuted per unit (QuantizedX)
//!   xd: f32 [G]          the int8 scale of each group of x
//!   xs: f32 [G]          sum of x over each group
//!   codes/scales/mins:   the weight's `qweight`, `scales`, `mins` buffers (mins unused when symmetric)
//!   y: f32 [r1 - r0]     y[r - r0] = row r's dot product, for r in r0..r1
//! decode(codes, scales, mins, out, r0, r1)
//!   out: f32 [(r1 - r0) * G * group]   row r at (r - r0) * G * group
//! ```
//!
//! Sparse weights (unstructured, `n:4`, `n:8`; f16 or quantized kept values):
//!
//! ```text
//! matvec(x, vals, scales, mins, pos, kstart, gstart, scratch, y, r0, r1)
//!   x: f32 [ceil(cols / 8) * 8]   x in f32, zero-padded
//!   vals: `values` (f16) or `qweight`; scales/mins: quantized values only
//!   pos: `mask` or `index`
//!   kstart, gstart: u64 [rows + 1]  prefix sums of kept values and of groups per row
//!   scratch: f32 [cols + 128]       the kernel's working row
//! decode(vals, scales, mins, pos, kstart, gstart, out, r0, r1)
//!   out: f32 [(r1 - r0) * cols + 136]   row r at (r - r0) * cols; the kernel may write
//!                                      past the last row (slack) but no other row's values
//! ```

use std::fmt;

use crate::error::{Result, RuntimeError};
use crate::format::{QuantScheme, QuantSpec, SparsePattern, ValueFormat, WeightFormat};

/// Which product a kernel computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KernelKind {
    /// `y = W x` for a row range (integer dot products).
    Matvec,
    /// Dequantize a row range to f32 (matmul and transposed matmul tiles).
    Decode,
}

impl KernelKind {
    pub const ALL: [KernelKind; 2] = [KernelKind::Matvec, KernelKind::Decode];

    fn tag(self) -> &'static str {
        match self {
            KernelKind::Matvec => "matvec",
            KernelKind::Decode => "decode",
        }
    }
}

/// One kernel: its kind, the weight's shape and its format.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct KernelSpec {
    pub kind: KernelKind,
    pub rows: usize,
    pub cols: usize,
    pub format: WeightFormat,
}

/// Why a format has no generated kernel (it runs the reference kernel instead).
pub fn unsupported_reason(format: &WeightFormat) -> Option<String> {
    match format {
        WeightFormat::Quant(_) => None,
        WeightFormat::Dense { .. } => Some("dense weights use the dense kernels".into()),
        WeightFormat::Sparse { pattern, .. } => match pattern {
            SparsePattern::Unstructured => None,
            SparsePattern::NofM { n, m } if (*m == 4 || *m == 8) && *n > 0 && n <= m => None,
            SparsePattern::NofM { .. } => Some(format!(
                "{format}: generated sparse kernels cover unstructured and n:4, n:8 patterns"
            )),
        },
    }
}

/// The name token of a quantization: `q4g32a` (`a` asymmetric, `s` symmetric).
fn quant_token(q: &QuantSpec) -> String {
    let s = match q.scheme {
        QuantScheme::Asym => 'a',
        QuantScheme::Sym => 's',
    };
    format!("q{}g{}{s}", q.bits, q.group)
}

fn parse_quant_token(f: &str) -> std::result::Result<QuantSpec, String> {
    let f = f
        .strip_prefix('q')
        .ok_or("expected a quantization `q<bits>g<group><a|s>`")?;
    let (bits, rest) = f.split_once('g').ok_or("quantization without `g`")?;
    let (group, scheme) = match rest.strip_suffix('a') {
        Some(g) => (g, QuantScheme::Asym),
        None => (
            rest.strip_suffix('s').ok_or("scheme must be `a` or `s`")?,
            QuantScheme::Sym,
        ),
    };
    Ok(QuantSpec {
        bits: bits.parse().map_err(|_| "bits")?,
        group: group.parse().map_err(|_| "group")?,
        scheme,
    })
}

impl KernelSpec {
    /// A spec for a weight, or the reason there is no generated kernel for its format.
    pub fn new(kind: KernelKind, rows: usize, cols: usize, format: &WeightFormat) -> Result<KernelSpec> {
        if let Some(why) = unsupported_reason(format) {
            return Err(RuntimeError::Invalid(why));
        }
        if rows == 0 || cols == 0 {
            return Err(RuntimeError::Invalid(format!(
                "kernel for an empty [{rows}, {cols}] weight"
            )));
        }
        match format {
            WeightFormat::Quant(q)
            | WeightFormat::Sparse {
                values: ValueFormat::Quant(q),
                ..
            } => q.validate().map_err(RuntimeError::Invalid)?,
            _ => {}
        }
        if let WeightFormat::Sparse {
            pattern: SparsePattern::NofM { m, .. },
            ..
        } = format
            && !cols.is_multiple_of(*m as usize)
        {
            return Err(RuntimeError::Invalid(format!(
                "{format}: {cols} columns are not a multiple of {m}"
            )));
        }
        Ok(KernelSpec {
            kind,
            rows,
            cols,
            format: format.clone(),
        })
    }

    /// The quantization of the weight, or of a sparse weight's kept values (`None`: f16
    /// values).
    pub fn quant(&self) -> Option<QuantSpec> {
        match self.format {
            WeightFormat::Quant(q)
            | WeightFormat::Sparse {
                values: ValueFormat::Quant(q),
                ..
            } => Some(q),
            _ => None,
        }
    }

    /// The sparsity pattern (`None`: a dense quantized weight).
    pub fn pattern(&self) -> Option<SparsePattern> {
        match self.format {
            WeightFormat::Sparse { pattern, .. } => Some(pattern),
            _ => None,
        }
    }

    /// Groups a row of a quantized (not sparse) weight.
    pub fn groups(&self) -> usize {
        match (self.pattern(), self.quant()) {
            (None, Some(q)) => self.cols.div_ceil(q.group as usize),
            _ => 0,
        }
    }

    /// The decode kernel's output row stride: quantized rows padded to whole groups
    /// (`G * group`), sparse rows `cols`.
    pub fn padded_cols(&self) -> usize {
        match (self.pattern(), self.quant()) {
            (None, Some(q)) => self.groups() * q.group as usize,
            _ => self.cols,
        }
    }

    /// The number of `i64` parameters of the kernel's function (see the module docs).
    pub fn params(&self) -> usize {
        match (self.kind, self.pattern().is_some()) {
            (KernelKind::Matvec, false) => 9,
            (KernelKind::Decode, false) => 6,
            (KernelKind::Matvec, true) => 11,
            (KernelKind::Decode, true) => 9,
        }
    }

    /// The stable name: `matvec_r576_c1536_q4g32a` (`a` asymmetric, `s` symmetric);
    /// sparse: `decode_r576_c1536_s2x4_q4g32a`, `matvec_r64_c100_su_f16` (`su`
    /// unstructured, `s<n>x<m>` N:M, then the kept values' format).
    pub fn name(&self) -> String {
        let f = match &self.format {
            WeightFormat::Quant(q) => quant_token(q),
            WeightFormat::Sparse { pattern, values } => {
                let p = match pattern {
                    SparsePattern::Unstructured => "su".to_string(),
                    SparsePattern::NofM { n, m } => format!("s{n}x{m}"),
                };
                let v = match values {
                    ValueFormat::F16 => "f16".to_string(),
                    ValueFormat::Quant(q) => quant_token(q),
                };
                format!("{p}_{v}")
            }
            WeightFormat::Dense { .. } => unreachable!("KernelSpec::new refuses dense formats"),
        };
        format!("{}_r{}_c{}_{f}", self.kind.tag(), self.rows, self.cols)
    }

    /// Parses [`name`](Self::name).
    pub fn parse(name: &str) -> Result<KernelSpec> {
        let bad = |why: &str| RuntimeError::Invalid(format!("kernel name `{name}`: {why}"));
        let mut parts = name.split('_');
        let kind = match parts.next() {
            Some("matvec") => KernelKind::Matvec,
            Some("decode") => KernelKind::Decode,
            _ => return Err(bad("unknown kind (matvec, decode)")),
        };
        let num = |p: Option<&str>, prefix: char| -> Result<usize> {
            p.and_then(|p| p.strip_prefix(prefix))
                .and_then(|p| p.parse().ok())
                .ok_or_else(|| bad(&format!("expected `{prefix}<number>`")))
        };
        let rows = num(parts.next(), 'r')?;
        let cols = num(parts.next(), 'c')?;
        let f = parts.next().ok_or_else(|| bad("expected a format"))?;
        let format = if let Some(p) = f.strip_prefix('s') {
            let pattern = if p == "u" {
                SparsePattern::Unstructured
            } else {
                let (n, m) = p
                    .split_once('x')
                    .ok_or_else(|| bad("pattern must be `su` or `s<n>x<m>`"))?;
                SparsePattern::NofM {
                    n: n.parse().map_err(|_| bad("N of N:M"))?,
                    m: m.parse().map_err(|_| bad("M of N:M"))?,
                }
            };
            let v = parts.next().ok_or_else(|| bad("expected the values' format"))?;
            let values = match v {
                "f16" => ValueFormat::F16,
                _ => ValueFormat::Quant(parse_quant_token(v).map_err(|e| bad(&e))?),
            };
            WeightFormat::Sparse { pattern, values }
        } else {
            WeightFormat::Quant(parse_quant_token(f).map_err(|e| bad(&e))?)
        };
        if parts.next().is_some() {
            return Err(bad("trailing fields"));
        }
        KernelSpec::new(kind, rows, cols, &format).map_err(|e| bad(&e.to_string()))
    }
}

impl fmt::Display for KernelSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_bad_names_are_refused() {
        let mut formats = vec![];
        for bits in [2, 3, 4, 8] {
            for group in [32, 64, 128] {
                for scheme in [QuantScheme::Asym, QuantScheme::Sym] {
                    formats.push(ValueFormat::Quant(QuantSpec { bits, group, scheme }));
                }
            }
        }
        formats.push(ValueFormat::F16);
        let patterns = [
            SparsePattern::Unstructured,
            SparsePattern::NofM { n: 2, m: 4 },
            SparsePattern::NofM { n: 4, m: 8 },
            SparsePattern::NofM { n: 3, m: 8 },
        ];
        for v in formats {
            let mut fs: Vec<WeightFormat> = patterns
                .iter()
                .map(|&pattern| WeightFormat::Sparse { pattern, values: v })
                .collect();
            if let ValueFormat::Quant(q) = v {
                fs.push(WeightFormat::Quant(q));
            }
            for f in fs {
                for kind in KernelKind::ALL {
                    let s = KernelSpec::new(kind, 576, 1536, &f).unwrap();
                    assert_eq!(KernelSpec::parse(&s.name()).unwrap(), s, "{}", s.name());
                }
            }
        }
        assert_eq!(
            KernelSpec::parse("decode_r5_c64_s2x4_q3g32s")
                .unwrap()
                .format
                .to_string(),
            "2:4+q3/g32/sym"
        );
        for bad in [
            "",
            "matvec",
            "gemm_r1_c1_q4g32a",
            "matvec_r1_c1_q5g32a",
            "matvec_r1_c1_q4g33a",
            "matvec_r0_c1_q4g32a",
            "matvec_r1_c1_q4g32x",
            "matvec_r1_c1_q4g32a_x",
            "matvec_r1_c8_su",
            "matvec_r1_c8_su_f32",
            "matvec_r1_c8_s3x5_f16",
            "matvec_r1_c8_s9x8_f16",
            "matvec_r1_c8_s0x8_f16",
            "matvec_r1_c6_s2x4_f16",
            "matvec_r1_c8_sx_f16",
            "matvec_r1_c8_su_f16_x",
        ] {
            assert!(KernelSpec::parse(bad).is_err(), "{bad}");
        }
    }
}
