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

use std::fmt;

use crate::error::{Result, RuntimeError};
use crate::format::{QuantScheme, QuantSpec, WeightFormat};

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
        WeightFormat::Quant(q) if [2, 4, 8].contains(&q.bits) => None,
        WeightFormat::Quant(q) => Some(format!(
            "{q}: {}-bit codes straddle bytes; no vector unpacking yet",
            q.bits
        )),
        WeightFormat::Dense { .. } => Some("dense weights use the dense kernels".into()),
        WeightFormat::Sparse { .. } => Some(format!("{format}: sparse formats have no generated kernel yet")),
    }
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
        if let WeightFormat::Quant(q) = format {
            q.validate().map_err(RuntimeError::Invalid)?;
        }
        Ok(KernelSpec {
            kind,
            rows,
            cols,
            format: format.clone(),
        })
    }

    /// The quantization of the weight (every supported format has one).
    pub fn quant(&self) -> QuantSpec {
        match self.format {
            WeightFormat::Quant(q) => q,
            _ => unreachable!("KernelSpec::new admits quantized formats only"),
        }
    }

    /// Groups a row.
    pub fn groups(&self) -> usize {
        self.cols.div_ceil(self.quant().group as usize)
    }

    /// Values of a row once padded to whole groups (the decode kernel's row stride).
    pub fn padded_cols(&self) -> usize {
        self.groups() * self.quant().group as usize
    }

    /// The stable name: `matvec_r576_c1536_q4g32a` (`a` asymmetric, `s` symmetric).
    pub fn name(&self) -> String {
        let q = self.quant();
        let s = match q.scheme {
            QuantScheme::Asym => 'a',
            QuantScheme::Sym => 's',
        };
        format!(
            "{}_r{}_c{}_q{}g{}{s}",
            self.kind.tag(),
            self.rows,
            self.cols,
            q.bits,
            q.group
        )
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
        let f = parts
            .next()
            .and_then(|f| f.strip_prefix('q'))
            .ok_or_else(|| bad("expected a format `q<bits>g<group><a|s>`"))?;
        if parts.next().is_some() {
            return Err(bad("trailing fields"));
        }
        let (bits, rest) = f.split_once('g').ok_or_else(|| bad("format without `g`"))?;
        let (group, scheme) = match rest.strip_suffix('a') {
            Some(g) => (g, QuantScheme::Asym),
            None => (
                rest.strip_suffix('s')
                    .ok_or_else(|| bad("scheme must be `a` or `s`"))?,
                QuantScheme::Sym,
            ),
        };
        let q = QuantSpec {
            bits: bits.parse().map_err(|_| bad("bits"))?,
            group: group.parse().map_err(|_| bad("group"))?,
            scheme,
        };
        let spec =
            KernelSpec::new(kind, rows, cols, &WeightFormat::Quant(q)).map_err(|e| bad(&e.to_string()))?;
        Ok(spec)
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
        for bits in [2, 4, 8] {
            for group in [32, 64, 128] {
                for scheme in [QuantScheme::Asym, QuantScheme::Sym] {
                    for kind in KernelKind::ALL {
                        let f = WeightFormat::Quant(QuantSpec { bits, group, scheme });
                        let s = KernelSpec::new(kind, 576, 1536, &f).unwrap();
                        assert_eq!(KernelSpec::parse(&s.name()).unwrap(), s);
                    }
                }
            }
        }
        for bad in [
            "",
            "matvec",
            "gemm_r1_c1_q4g32a",
            "matvec_r1_c1_q3g32a",
            "matvec_r1_c1_q4g33a",
            "matvec_r0_c1_q4g32a",
            "matvec_r1_c1_q4g32x",
            "matvec_r1_c1_q4g32a_x",
        ] {
            assert!(KernelSpec::parse(bad).is_err(), "{bad}");
        }
    }
}
