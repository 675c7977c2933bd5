//! Compression budgets (`--budget bits=4.5,sparsity=0.3`, `--budget bytes=60MB`) and the
//! resources a policy uses.
//!
//! A budget is one or more constraints, all of which a policy must meet:
//!
//! - `bits=B`: **upper bound** on the average quantization bit-width of the linear weights,
//!   weighted by each layer's parameter count: `Σ_l params_l · bits_l / Σ_l params_l ≤ B`.
//!   It counts the nominal code width of every weight of the layer (pruned or not) and
//!   nothing else; scales, minima and sparse indices are counted by `bytes`.
//! - `sparsity=S`: **lower bound** on the overall fraction of pruned linear weights,
//!   weighted by parameters: `Σ_l params_l · sparsity_l / Σ_l params_l ≥ S`.
//! - `bytes=N`: **upper bound** on the total storage bytes of the compressed linear weights,
//!   `Σ_l Σ_linear Candidate::estimated_bytes(rows, cols)` with each linear's `rows`/`cols`
//!   from the profile's `linears` (exact packed sizes: codes, f16 scales and minima, masks or
//!   N:M indices, padding of the last group). Units: plain bytes, `B`, `KB`/`MB`/`GB`
//!   (powers of 1000) and `KiB`/`MiB`/`GiB` (powers of 1024), case-insensitive.
//!
//! `params_l` is the profile's `LayerSensitivity::params` (weights in the layer's seven
//! linears). Embeddings, norms and the LM head are outside every budget.
//!
//! Feasibility is decided in integers, so the search and the checks agree exactly: bit-widths
//! and sparsities (the candidates' and the budget's) are taken at a resolution of 10⁻⁶, and
//! a policy uses `Σ params·bits` bit-weights, `Σ params·round(10⁶·(1 − sparsity))` kept
//! micro-weights and `Σ bytes` bytes ([`Usage`]).

use std::fmt;
use std::str::FromStr;

/// 10⁶: budget and candidate fractions are compared at this resolution.
pub const MICRO: u64 = 1_000_000;

/// A budget: each present field is a constraint; at least one is present.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Budget {
    /// Maximum parameter-weighted average bit-width.
    pub bits: Option<f64>,
    /// Minimum parameter-weighted overall sparsity, in `[0, 1)`.
    pub sparsity: Option<f64>,
    /// Maximum total bytes of the compressed linear weights.
    pub bytes: Option<u64>,
}

/// What a policy uses, in the integer units feasibility is decided in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    /// Weights in the linears covered (`Σ params_l`).
    pub params: u64,
    /// `Σ params_l · bits_l`.
    pub bit_params: u64,
    /// `Σ params_l · round(10⁶ · (1 − sparsity_l))`.
    pub kept_micro: u64,
    /// `Σ` exact storage bytes, when every layer's linear shapes are known.
    pub bytes: Option<u64>,
}

impl Usage {
    /// The usage of one layer of `params` weights with a candidate of `bits` and `sparsity`
    /// whose linears take `bytes`.
    pub fn layer(params: u64, bits: u8, sparsity: f64, bytes: Option<u64>) -> Usage {
        Usage {
            params,
            bit_params: params * bits as u64,
            kept_micro: params * (MICRO - micro(sparsity)),
            bytes,
        }
    }

    /// Average bit-width (parameter-weighted).
    pub fn bits(&self) -> f64 {
        self.bit_params as f64 / self.params.max(1) as f64
    }

    /// Overall sparsity (parameter-weighted).
    pub fn sparsity(&self) -> f64 {
        1.0 - self.kept_micro as f64 / (self.params.max(1) as f64 * MICRO as f64)
    }
}

impl std::ops::Add for Usage {
    type Output = Usage;
    fn add(self, o: Usage) -> Usage {
        Usage {
            params: self.params + o.params,
            bit_params: self.bit_params + o.bit_params,
            kept_micro: self.kept_micro + o.kept_micro,
            bytes: match (self.bytes, o.bytes) {
                (Some(a), Some(b)) => Some(a + b),
                _ => None,
            },
        }
    }
}

impl std::iter::Sum for Usage {
    fn sum<I: Iterator<Item = Usage>>(iter: I) -> Usage {
        let mut total = Usage {
            bytes: Some(0),
            ..Usage::default()
        };
        for u in iter {
            total = total + u;
        }
        total
    }
}

/// `round(10⁶ · x)` for a fraction or bit-width.
pub fn micro(x: f64) -> u64 {
    (x * MICRO as f64).round() as u64
}

/// The integer limits of a budget for a model whose covered linears hold `params` weights;
/// a policy is within budget when each of its [`Usage`] totals is at most the limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub bit_params: Option<u64>,
    pub kept_micro: Option<u64>,
    pub bytes: Option<u64>,
}

impl Budget {
    /// Parses `key=value[,key=value...]` with keys `bits`, `sparsity`, `bytes`.
    pub fn parse(spec: &str) -> Result<Budget, String> {
        let mut b = Budget::default();
        if spec.trim().is_empty() {
            return Err("empty budget (expected e.g. bits=4.5, bits=4,sparsity=0.3 or bytes=60MB)".into());
        }
        for part in spec.split(',') {
            let part_t = part.trim();
            let Some((key, value)) = part_t.split_once('=') else {
                return Err(format!(
                    "budget part `{part_t}` is not key=value (keys: bits, sparsity, bytes)"
                ));
            };
            let (key, value) = (key.trim(), value.trim());
            let dup = || format!("budget part `{part_t}`: `{key}` given twice");
            match key.to_ascii_lowercase().as_str() {
                "bits" => {
                    let v: f64 = value
                        .parse()
                        .map_err(|_| format!("budget part `{part_t}`: `{value}` is not a number"))?;
                    if !v.is_finite() || v <= 0.0 || v > 64.0 {
                        return Err(format!(
                            "budget part `{part_t}`: average bits must be in (0, 64], got {value}"
                        ));
                    }
                    if b.bits.replace(v).is_some() {
                        return Err(dup());
                    }
                }
                "sparsity" => {
                    let v: f64 = value
                        .parse()
                        .map_err(|_| format!("budget part `{part_t}`: `{value}` is not a number"))?;
                    if !(0.0..1.0).contains(&v) {
                        return Err(format!(
                            "budget part `{part_t}`: sparsity must be in [0, 1), got {value}"
                        ));
                    }
                    if b.sparsity.replace(v).is_some() {
                        return Err(dup());
                    }
                }
                "bytes" => {
                    let v = parse_bytes(value).map_err(|e| format!("budget part `{part_t}`: {e}"))?;
                    if b.bytes.replace(v).is_some() {
                        return Err(dup());
                    }
                }
                _ => {
                    return Err(format!(
                        "budget part `{part_t}`: unknown key `{key}` (expected bits, sparsity or bytes)"
                    ));
                }
            }
        }
        Ok(b)
    }

    /// The integer limits for a model whose covered linears hold `params` weights.
    pub fn limits(&self, params: u64) -> Limits {
        Limits {
            bit_params: self
                .bits
                .map(|b| ((micro(b) as u128 * params as u128) / MICRO as u128) as u64),
            kept_micro: self.sparsity.map(|s| params * (MICRO - micro(s))),
            bytes: self.bytes,
        }
    }

    /// Whether a policy with this usage meets every constraint (a bytes constraint is not
    /// met when the usage has no byte count).
    pub fn admits(&self, u: &Usage) -> bool {
        let l = self.limits(u.params);
        l.bit_params.is_none_or(|c| u.bit_params <= c)
            && l.kept_micro.is_none_or(|c| u.kept_micro <= c)
            && l.bytes.is_none_or(|c| u.bytes.is_some_and(|b| b <= c))
    }
}

impl FromStr for Budget {
    type Err = String;
    fn from_str(s: &str) -> Result<Budget, String> {
        Budget::parse(s)
    }
}

/// The canonical spec, e.g. `bits=4.5,sparsity=0.3,bytes=60000000` (parses back to itself).
impl fmt::Display for Budget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if let Some(b) = self.bits {
            parts.push(format!("bits={b}"));
        }
        if let Some(s) = self.sparsity {
            parts.push(format!("sparsity={s}"));
        }
        if let Some(n) = self.bytes {
            parts.push(format!("bytes={n}"));
        }
        write!(f, "{}", parts.join(","))
    }
}

/// Parses a byte count: `123`, `123B`, `60MB`, `1.5GiB`, `512 KiB` (case-insensitive; KB, MB,
/// GB are powers of 1000, KiB, MiB, GiB powers of 1024; fractions are rounded down to whole
/// bytes).
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = (t[..split].trim(), t[split..].trim());
    let mult: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        _ => {
            return Err(format!(
                "unknown byte unit `{unit}` in `{t}` (use B, KB, MB, GB, KiB, MiB or GiB)"
            ));
        }
    };
    let v: f64 = num
        .parse()
        .map_err(|_| format!("`{t}` is not a byte count (e.g. 60MB, 512MiB, 1000000)"))?;
    let bytes = (v * mult as f64).floor();
    if !(1.0..1e18).contains(&bytes) {
        return Err(format!("byte count `{t}` must be at least 1 byte"));
    }
    Ok(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_single_and_combined_budgets() {
        assert_eq!(
            Budget::parse("bits=4.5").unwrap(),
            Budget {
                bits: Some(4.5),
                ..Default::default()
            }
        );
        let b = Budget::parse(" bits=4 , sparsity=0.3 ").unwrap();
        assert_eq!((b.bits, b.sparsity, b.bytes), (Some(4.0), Some(0.3), None));
        let b = Budget::parse("bytes=60MB,bits=3.5").unwrap();
        assert_eq!((b.bits, b.bytes), (Some(3.5), Some(60_000_000)));
        assert_eq!(Budget::parse("BITS=3").unwrap().bits, Some(3.0));
        // Display parses back to the same budget.
        let b = Budget::parse("bits=3.25,sparsity=0.5,bytes=1.5KiB").unwrap();
        assert_eq!(Budget::parse(&b.to_string()).unwrap(), b);
    }

    #[test]
    fn parses_byte_units() {
        assert_eq!(parse_bytes("60MB").unwrap(), 60_000_000);
        assert_eq!(parse_bytes("60mb").unwrap(), 60_000_000);
        assert_eq!(parse_bytes("2KB").unwrap(), 2_000);
        assert_eq!(parse_bytes("2KiB").unwrap(), 2_048);
        assert_eq!(parse_bytes("3 MiB").unwrap(), 3 << 20);
        assert_eq!(parse_bytes("1.5GiB").unwrap(), 3 << 29);
        assert_eq!(parse_bytes("1GB").unwrap(), 1_000_000_000);
        assert_eq!(parse_bytes("12345").unwrap(), 12345);
        assert_eq!(parse_bytes("12345B").unwrap(), 12345);
    }

    #[test]
    fn errors_name_the_bad_part() {
        let cases = [
            ("", "empty budget"),
            ("bits", "`bits` is not key=value"),
            ("bits=abc", "`bits=abc`: `abc` is not a number"),
            ("bits=0", "`bits=0`: average bits must be in (0, 64]"),
            (
                "bits=4,sparsity=1.2",
                "`sparsity=1.2`: sparsity must be in [0, 1)",
            ),
            ("sparsity=-0.1", "`sparsity=-0.1`"),
            ("bytes=60XB", "`bytes=60XB`: unknown byte unit `XB`"),
            ("bytes=MB", "`bytes=MB`: `MB` is not a byte count"),
            ("bytes=0", "`bytes=0`: byte count `0` must be at least 1 byte"),
            ("bits=4,bits=3", "`bits=3`: `bits` given twice"),
            ("size=3", "`size=3`: unknown key `size`"),
            ("bits=4,", "budget part `` is not key=value"),
        ];
        for (spec, want) in cases {
            let e = Budget::parse(spec).expect_err(spec);
            assert!(e.contains(want), "{spec}: error `{e}` should contain `{want}`");
        }
    }

    #[test]
    fn admits_uses_exact_integer_limits() {
        // 3 layers of 100 weights: bits 3, 4, 4 average exactly 11/3.
        let u: Usage = [(3, 0.5), (4, 0.0), (4, 0.1)]
            .iter()
            .map(|&(b, s)| Usage::layer(100, b, s, Some(10)))
            .sum();
        assert_eq!(u.bit_params, 1100);
        assert!((u.sparsity() - 0.2).abs() < 1e-12);
        assert!(Budget::parse("bits=3.667").unwrap().admits(&u));
        assert!(!Budget::parse("bits=3.666").unwrap().admits(&u));
        assert!(Budget::parse("sparsity=0.2").unwrap().admits(&u));
        assert!(!Budget::parse("sparsity=0.200001").unwrap().admits(&u));
        assert!(Budget::parse("bytes=30").unwrap().admits(&u));
        assert!(!Budget::parse("bytes=29").unwrap().admits(&u));
        assert!(!Budget::parse("bits=8,bytes=29").unwrap().admits(&u));
        let no_bytes = Usage { bytes: None, ..u };
        assert!(!Budget::parse("bytes=1GB").unwrap().admits(&no_bytes));
    }
}
