//! One compression choice for a layer's linear weights.

use edge_runtime::format::{QuantScheme, QuantSpec, SparsePattern, ValueFormat, WeightFormat};
use serde::{Deserialize, Serialize};

/// Bits, group, scheme and sparsity applied to every linear of a decoder layer.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Candidate {
    pub bits: u8,
    pub group: u32,
    pub scheme: QuantScheme,
    /// Fraction of weights pruned (0 = dense). For N:M patterns it is `1 - n/m`.
    pub sparsity: f64,
    /// How pruned weights are laid out (ignored when `sparsity == 0`).
    pub pattern: SparsePattern,
}

impl Candidate {
    pub fn quant(&self) -> QuantSpec {
        QuantSpec {
            bits: self.bits,
            group: self.group,
            scheme: self.scheme,
        }
    }

    /// The storage format a weight with this candidate gets.
    pub fn format(&self) -> WeightFormat {
        if self.sparsity > 0.0 {
            WeightFormat::Sparse {
                pattern: self.pattern,
                values: ValueFormat::Quant(self.quant()),
            }
        } else {
            WeightFormat::Quant(self.quant())
        }
    }

    /// Expected storage bytes of a `[rows, cols]` weight.
    pub fn estimated_bytes(&self, rows: usize, cols: usize) -> usize {
        self.format().estimated_bytes(rows, cols, self.sparsity)
    }

    /// Checks the fields (bits, group, sparsity in [0, 1), N:M consistent with sparsity).
    pub fn validate(&self) -> Result<(), String> {
        self.quant().validate()?;
        if !(0.0..1.0).contains(&self.sparsity) {
            return Err(format!("sparsity {} must be in [0, 1)", self.sparsity));
        }
        if let SparsePattern::NofM { n, m } = self.pattern
            && self.sparsity > 0.0
        {
            if n == 0 || n >= m || !(m == 4 || m == 8) {
                return Err(format!(
                    "N:M pattern {n}:{m} is not supported (2:4, 4:8, 1:4, ...)"
                ));
            }
            let implied = 1.0 - n as f64 / m as f64;
            if (implied - self.sparsity).abs() > 1e-9 {
                return Err(format!(
                    "sparsity {} contradicts the {n}:{m} pattern ({implied})",
                    self.sparsity
                ));
            }
        }
        Ok(())
    }

    /// A short label, e.g. `4b-g32-asym-s0.30` or `3b-g128-sym-2:4`.
    pub fn label(&self) -> String {
        let scheme = match self.scheme {
            QuantScheme::Asym => "asym",
            QuantScheme::Sym => "sym",
        };
        let sparse = match (self.sparsity > 0.0, self.pattern) {
            (false, _) => String::new(),
            (true, SparsePattern::Unstructured) => format!("-s{:.2}", self.sparsity),
            (true, SparsePattern::NofM { n, m }) => format!("-{n}:{m}"),
        };
        format!("{}b-g{}-{scheme}{sparse}", self.bits, self.group)
    }
}
