//! Weight formats: how a linear weight `[rows = out, cols = in]` is stored.
//!
//! A format is part of a weight's type in the IR. Dense formats keep every value as f32,
//! f16 or bf16. Compressed formats are real packed storage (see `docs/formats.md` for the
//! exact byte layout):
//!
//! - `Quant`: group-wise integer quantization along each row. Every `group` consecutive
//!   values of a row share a scale (and, asymmetric, a minimum), both f16. Codes are
//!   `bits` wide, packed little-endian into bytes (`group * bits / 8` bytes a group; `group`
//!   is a multiple of 8 so this is whole bytes).
//!   - asymmetric: `w = scale * q + min`, `q` in `0 ..= 2^bits - 1`;
//!   - symmetric: `w = scale * (q - 2^(bits-1))`, `q` in `0 ..= 2^bits - 1`
//!     (stored offset by `2^(bits-1)` so codes are unsigned).
//! - `Sparse`: only the kept values of each row are stored, in `values` format (dense f16,
//!   or `Quant` where groups run over the row's kept values, the last group of a row padded);
//!   where they are is stored as
//!   - `Unstructured`: a bitmask per row, `ceil(cols / 8)` bytes, bit `j % 8` of byte `j / 8`
//!     set when column `j` is kept;
//!   - `NofM { n, m }`: in every block of `m` consecutive columns exactly `n` values are
//!     kept (2:4 keeps 2 of every 4, i.e. two zeros in every group of four); each kept value
//!     has its `ceil(log2 m)`-bit position inside its block, packed little-endian, per row.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::tensor::DType;

/// How quantized values map back to reals.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QuantScheme {
    /// `w = scale * q + min` (scale and min per group).
    Asym,
    /// `w = scale * (q - 2^(bits-1))` (scale per group).
    Sym,
}

/// Group-wise integer quantization.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct QuantSpec {
    /// 2, 3, 4 or 8.
    pub bits: u8,
    /// 32, 64 or 128 values share one scale (and min).
    pub group: u32,
    pub scheme: QuantScheme,
}

impl QuantSpec {
    pub const BITS: [u8; 4] = [2, 3, 4, 8];
    pub const GROUPS: [u32; 3] = [32, 64, 128];

    /// Checks bits and group size.
    pub fn validate(&self) -> Result<(), String> {
        if !Self::BITS.contains(&self.bits) {
            return Err(format!(
                "unsupported bit-width {} (supported: 2, 3, 4, 8)",
                self.bits
            ));
        }
        if !Self::GROUPS.contains(&self.group) {
            return Err(format!(
                "unsupported group size {} (supported: 32, 64, 128)",
                self.group
            ));
        }
        Ok(())
    }

    /// Bytes of one packed group: codes plus f16 scale (plus f16 min when asymmetric).
    pub fn group_bytes(&self) -> usize {
        self.group as usize * self.bits as usize / 8 + if self.scheme == QuantScheme::Asym { 4 } else { 2 }
    }

    /// Bytes to store `n` values of one row (the last group padded).
    pub fn row_bytes(&self, n: usize) -> usize {
        n.div_ceil(self.group as usize) * self.group_bytes()
    }
}

/// Where the kept values of a sparse weight are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "kind")]
pub enum SparsePattern {
    Unstructured,
    /// `n` kept values in every block of `m` columns.
    NofM {
        n: u8,
        m: u8,
    },
}

impl SparsePattern {
    /// Bits of the position of one kept value inside its N:M block.
    pub fn index_bits(m: u8) -> usize {
        (usize::BITS - (m as usize - 1).leading_zeros()) as usize
    }
}

/// The storage format of a weight.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "kind")]
pub enum WeightFormat {
    Dense {
        dtype: DType,
    },
    Quant(QuantSpec),
    Sparse {
        pattern: SparsePattern,
        values: ValueFormat,
    },
}

/// The format of the kept values of a sparse weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "kind")]
pub enum ValueFormat {
    F16,
    Quant(QuantSpec),
}

impl fmt::Display for QuantSpec {
    /// `q4/g32/asym`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = match self.scheme {
            QuantScheme::Asym => "asym",
            QuantScheme::Sym => "sym",
        };
        write!(f, "q{}/g{}/{scheme}", self.bits, self.group)
    }
}

impl fmt::Display for WeightFormat {
    /// `f16`, `q4/g32/asym`, `2:4+q4/g32/sym`, `unstructured+f16`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WeightFormat::Dense { dtype } => write!(f, "{dtype}"),
            WeightFormat::Quant(q) => write!(f, "{q}"),
            WeightFormat::Sparse { pattern, values } => {
                match pattern {
                    SparsePattern::Unstructured => f.write_str("unstructured+")?,
                    SparsePattern::NofM { n, m } => write!(f, "{n}:{m}+")?,
                }
                match values {
                    ValueFormat::F16 => f.write_str("f16"),
                    ValueFormat::Quant(q) => write!(f, "{q}"),
                }
            }
        }
    }
}

impl WeightFormat {
    /// Exact bytes of a `[rows, cols]` weight whose rows keep `kept[r]` values (ignored for
    /// dense and quantized formats; pass an empty slice).
    pub fn storage_bytes(&self, rows: usize, cols: usize, kept: &[usize]) -> usize {
        match self {
            WeightFormat::Dense { dtype } => rows * cols * dtype.size(),
            WeightFormat::Quant(q) => rows * q.row_bytes(cols),
            WeightFormat::Sparse { pattern, values } => {
                let values_bytes: usize = kept
                    .iter()
                    .map(|&k| match values {
                        ValueFormat::F16 => 2 * k,
                        ValueFormat::Quant(q) => q.row_bytes(k),
                    })
                    .sum();
                let index_bytes = match pattern {
                    SparsePattern::Unstructured => rows * cols.div_ceil(8),
                    SparsePattern::NofM { m, .. } => kept
                        .iter()
                        .map(|&k| (k * SparsePattern::index_bits(*m)).div_ceil(8))
                        .sum(),
                };
                values_bytes + index_bytes
            }
        }
    }

    /// Expected bytes for a weight of `[rows, cols]` pruned to `sparsity` (used by the
    /// policy search before any weight is compressed; N:M formats imply their sparsity).
    pub fn estimated_bytes(&self, rows: usize, cols: usize, sparsity: f64) -> usize {
        let kept_per_row = match self {
            WeightFormat::Sparse {
                pattern: SparsePattern::NofM { n, m },
                ..
            } => cols / *m as usize * *n as usize,
            _ => ((1.0 - sparsity) * cols as f64).round() as usize,
        };
        self.storage_bytes(rows, cols, &vec![kept_per_row; rows])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_of_common_formats() {
        let q4 = QuantSpec {
            bits: 4,
            group: 32,
            scheme: QuantScheme::Asym,
        };
        // 576 columns: 18 groups of (16 code bytes + 4) = 360 bytes a row.
        assert_eq!(WeightFormat::Quant(q4).storage_bytes(576, 576, &[]), 576 * 360);
        let q3s = QuantSpec {
            bits: 3,
            group: 128,
            scheme: QuantScheme::Sym,
        };
        assert_eq!(q3s.group_bytes(), 48 + 2);
        assert_eq!(SparsePattern::index_bits(4), 2);
        assert_eq!(SparsePattern::index_bits(8), 3);
        let s24 = WeightFormat::Sparse {
            pattern: SparsePattern::NofM { n: 2, m: 4 },
            values: ValueFormat::Quant(q4),
        };
        // 64 columns -> 32 kept -> 1 group (20 bytes) + 32 * 2 bits = 8 index bytes.
        assert_eq!(s24.estimated_bytes(1, 64, 0.0), 28);
    }
}
