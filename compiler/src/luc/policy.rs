//! `policy.toml`: the per-layer compression policy `edgec policy` writes and `edgec compress`
//! reads. Human-editable; validated on load with errors naming the layer and the field.
//!
//! ```toml
//! model = "models/SmolLM2-135M"
//! method = "optimal"          # any name; edgec writes optimal, edge-llm or uniform
//! budget = "bits=3.5"         # the budget the policy was made for (same syntax as --budget)
//!
//! [[layer]]
//! index = 0                   # decoder layer, 0-based; every layer exactly once
//! bits = 4                    # 2, 3, 4 or 8
//! group = 32                  # 32, 64 or 128 values per scale
//! scheme = "asym"             # "asym" (scale + min) or "sym" (scale)
//! sparsity = 0.3              # fraction of weights pruned, in [0, 1) (default 0)
//! pattern = "unstructured"    # "unstructured" or N:M such as "2:4", "4:8" (default unstructured;
//!                             # N:M needs sparsity = 1 - N/M)
//! quantizer = "gptq"          # optional: how to quantize (e.g. rtn, gptq)
//! pruner = "sparsegpt"        # optional: how to prune (e.g. magnitude, wanda, sparsegpt)
//! ```
//!
//! Comments are free; `edgec policy` writes the predicted error and the budget usage in them.
//! They are not read back.

use std::path::Path;

use edge_runtime::format::{QuantScheme, QuantSpec, SparsePattern};
use toml::{Table, Value};

use super::budget::Budget;
use super::candidate::Candidate;

/// One layer's entry.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerPolicy {
    pub index: usize,
    pub candidate: Candidate,
    pub quantizer: Option<String>,
    pub pruner: Option<String>,
}

/// A whole policy: one entry per decoder layer, sorted by index.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub model: String,
    pub method: String,
    pub budget: Budget,
    pub layers: Vec<LayerPolicy>,
    /// Lines written as comments at the top of the file (not read back).
    pub notes: Vec<String>,
}

const LAYER_FIELDS: [&str; 8] = [
    "index",
    "bits",
    "group",
    "scheme",
    "sparsity",
    "pattern",
    "quantizer",
    "pruner",
];

fn quote(s: &str) -> String {
    Value::String(s.to_string()).to_string()
}

fn pattern_name(c: &Candidate) -> String {
    match c.pattern {
        SparsePattern::Unstructured => "unstructured".into(),
        SparsePattern::NofM { n, m } => format!("{n}:{m}"),
    }
}

fn parse_pattern(s: &str) -> Result<SparsePattern, String> {
    if s == "unstructured" {
        return Ok(SparsePattern::Unstructured);
    }
    let bad = || format!("`{s}` is not \"unstructured\" or an N:M pattern such as \"2:4\" or \"4:8\"");
    let (n, m) = s.split_once(':').ok_or_else(bad)?;
    let n: u8 = n.trim().parse().map_err(|_| bad())?;
    let m: u8 = m.trim().parse().map_err(|_| bad())?;
    Ok(SparsePattern::NofM { n, m })
}

impl Policy {
    /// Serializes to TOML (notes as comments at the top).
    pub fn to_toml(&self) -> String {
        let mut out = String::new();
        out.push_str("# Edge-LLM layer-wise compression policy (edgec policy). Human-editable:\n");
        out.push_str("# bits 2|3|4|8, group 32|64|128, scheme asym|sym, sparsity in [0, 1),\n");
        out.push_str("# pattern \"unstructured\" or N:M (\"2:4\", \"4:8\"; sparsity must be 1 - N/M).\n");
        for n in &self.notes {
            for line in n.lines() {
                out.push_str(&format!("# {line}\n"));
            }
        }
        out.push('\n');
        out.push_str(&format!("model = {}\n", quote(&self.model)));
        out.push_str(&format!("method = {}\n", quote(&self.method)));
        out.push_str(&format!("budget = {}\n", quote(&self.budget.to_string())));
        for l in &self.layers {
            let c = &l.candidate;
            out.push_str(&format!("\n[[layer]]  # {}\n", c.label()));
            out.push_str(&format!("index = {}\n", l.index));
            out.push_str(&format!("bits = {}\n", c.bits));
            out.push_str(&format!("group = {}\n", c.group));
            let scheme = match c.scheme {
                QuantScheme::Asym => "asym",
                QuantScheme::Sym => "sym",
            };
            out.push_str(&format!("scheme = {}\n", quote(scheme)));
            out.push_str(&format!("sparsity = {:?}\n", c.sparsity));
            out.push_str(&format!("pattern = {}\n", quote(&pattern_name(c))));
            if let Some(q) = &l.quantizer {
                out.push_str(&format!("quantizer = {}\n", quote(q)));
            }
            if let Some(p) = &l.pruner {
                out.push_str(&format!("pruner = {}\n", quote(p)));
            }
        }
        out
    }

    /// Parses and validates a policy. With `num_layers`, every layer `0..num_layers` must
    /// appear exactly once; without it, the indices must be exactly `0..=max`.
    pub fn parse(text: &str, num_layers: Option<usize>) -> Result<Policy, String> {
        let table: Table = text
            .parse()
            .map_err(|e: toml::de::Error| format!("not valid TOML: {e}"))?;
        for key in table.keys() {
            if !["model", "method", "budget", "layer"].contains(&key.as_str()) {
                return Err(format!(
                    "unknown top-level field `{key}` (fields: model, method, budget, [[layer]])"
                ));
            }
        }
        let string = |key: &str| -> Result<String, String> {
            match table.get(key) {
                None => Err(format!("missing field `{key}`")),
                Some(Value::String(s)) => Ok(s.clone()),
                Some(v) => Err(format!("field `{key}` must be a string, not {}", v.type_str())),
            }
        };
        let model = string("model")?;
        let method = string("method")?;
        if method.trim().is_empty() {
            return Err("field `method` is empty".into());
        }
        let budget = Budget::parse(&string("budget")?).map_err(|e| format!("field `budget`: {e}"))?;
        let entries = match table.get("layer") {
            None => return Err("the policy has no [[layer]] tables".into()),
            Some(Value::Array(a)) => a,
            Some(v) => {
                return Err(format!(
                    "`layer` must be an array of tables ([[layer]]), not {}",
                    v.type_str()
                ));
            }
        };
        if entries.is_empty() {
            return Err("the policy has no [[layer]] tables".into());
        }
        let mut layers = Vec::with_capacity(entries.len());
        for (e, entry) in entries.iter().enumerate() {
            let t = entry
                .as_table()
                .ok_or_else(|| format!("[[layer]] entry {} is not a table", e + 1))?;
            layers.push(parse_layer(t, e + 1, num_layers)?);
        }
        let mut seen: Vec<Option<usize>> = Vec::new();
        for (e, l) in layers.iter().enumerate() {
            if seen.len() <= l.index {
                seen.resize(l.index + 1, None);
            }
            if let Some(first) = seen[l.index] {
                return Err(format!(
                    "layer {} appears twice ([[layer]] entries {} and {})",
                    l.index,
                    first + 1,
                    e + 1
                ));
            }
            seen[l.index] = Some(e);
        }
        let expected = num_layers.unwrap_or(seen.len());
        if let Some(missing) = (0..expected).find(|&i| seen.get(i).is_none_or(|s| s.is_none())) {
            return Err(match num_layers {
                Some(n) => format!(
                    "layer {missing} is missing (the model has {n} layers; each needs one [[layer]] table)"
                ),
                None => format!(
                    "layer {missing} is missing (layers must be 0..={} with none skipped)",
                    seen.len() - 1
                ),
            });
        }
        layers.sort_by_key(|l| l.index);
        Ok(Policy {
            model,
            method,
            budget,
            layers,
            notes: Vec::new(),
        })
    }

    /// Reads and validates `path` (errors are prefixed with the path).
    pub fn load(path: &Path, num_layers: Option<usize>) -> Result<Policy, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
        Policy::parse(&text, num_layers).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Writes the TOML to `path`.
    pub fn save(&self, path: &Path) -> Result<(), String> {
        std::fs::write(path, self.to_toml()).map_err(|e| format!("writing {}: {e}", path.display()))
    }
}

fn parse_layer(t: &Table, entry: usize, num_layers: Option<usize>) -> Result<LayerPolicy, String> {
    let index = match t.get("index") {
        None => return Err(format!("[[layer]] entry {entry}: missing field `index`")),
        Some(Value::Integer(i)) if *i >= 0 => *i as usize,
        Some(v) => {
            return Err(format!(
                "[[layer]] entry {entry}: field `index` must be a non-negative integer, not {v}"
            ));
        }
    };
    let at = |field: &str, msg: String| format!("layer {index}: field `{field}`: {msg}");
    if let Some(n) = num_layers
        && index >= n
    {
        return Err(format!(
            "layer {index}: no such layer (the model has {n} layers, 0..={})",
            n.saturating_sub(1)
        ));
    }
    for key in t.keys() {
        if !LAYER_FIELDS.contains(&key.as_str()) {
            return Err(format!(
                "layer {index}: unknown field `{key}` (fields: {})",
                LAYER_FIELDS.join(", ")
            ));
        }
    }
    let int = |field: &str| -> Result<i64, String> {
        match t.get(field) {
            None => Err(format!("layer {index}: missing field `{field}`")),
            Some(Value::Integer(i)) => Ok(*i),
            Some(v) => Err(at(field, format!("must be an integer, not {v}"))),
        }
    };
    let opt_str = |field: &str| -> Result<Option<String>, String> {
        match t.get(field) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(v) => Err(at(field, format!("must be a string, not {v}"))),
        }
    };
    let bits = int("bits")?;
    if !QuantSpec::BITS.iter().any(|&b| b as i64 == bits) {
        return Err(at(
            "bits",
            format!("unsupported bit-width {bits} (supported: 2, 3, 4, 8)"),
        ));
    }
    let group = int("group")?;
    if !QuantSpec::GROUPS.iter().any(|&g| g as i64 == group) {
        return Err(at(
            "group",
            format!("unsupported group size {group} (supported: 32, 64, 128)"),
        ));
    }
    let scheme = match opt_str("scheme")?.as_deref() {
        None => return Err(format!("layer {index}: missing field `scheme`")),
        Some("asym") => QuantScheme::Asym,
        Some("sym") => QuantScheme::Sym,
        Some(s) => return Err(at("scheme", format!("`{s}` is not \"asym\" or \"sym\""))),
    };
    let sparsity = match t.get("sparsity") {
        None => 0.0,
        Some(Value::Float(f)) => *f,
        Some(Value::Integer(i)) => *i as f64,
        Some(v) => return Err(at("sparsity", format!("must be a number, not {v}"))),
    };
    if !(0.0..1.0).contains(&sparsity) {
        return Err(at("sparsity", format!("{sparsity} is out of range [0, 1)")));
    }
    let pattern = match opt_str("pattern")? {
        None => SparsePattern::Unstructured,
        Some(p) => parse_pattern(&p).map_err(|e| at("pattern", e))?,
    };
    let candidate = Candidate {
        bits: bits as u8,
        group: group as u32,
        scheme,
        sparsity,
        pattern,
    };
    if let Err(e) = candidate.validate() {
        let field = if e.contains("contradicts") {
            "sparsity"
        } else {
            "pattern"
        };
        return Err(at(field, e));
    }
    Ok(LayerPolicy {
        index,
        candidate,
        quantizer: opt_str("quantizer")?,
        pruner: opt_str("pruner")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cand(bits: u8, sparsity: f64, pattern: SparsePattern) -> Candidate {
        Candidate {
            bits,
            group: 32,
            scheme: QuantScheme::Asym,
            sparsity,
            pattern,
        }
    }

    fn sample() -> Policy {
        Policy {
            model: "models/Smol \"LM\"".into(),
            method: "optimal".into(),
            budget: Budget::parse("bits=3.5,sparsity=0.25").unwrap(),
            layers: vec![
                LayerPolicy {
                    index: 0,
                    candidate: cand(4, 0.0, SparsePattern::Unstructured),
                    quantizer: Some("gptq".into()),
                    pruner: None,
                },
                LayerPolicy {
                    index: 1,
                    candidate: cand(3, 0.3, SparsePattern::Unstructured),
                    quantizer: None,
                    pruner: Some("sparsegpt".into()),
                },
                LayerPolicy {
                    index: 2,
                    candidate: Candidate {
                        group: 128,
                        scheme: QuantScheme::Sym,
                        ..cand(2, 0.5, SparsePattern::NofM { n: 2, m: 4 })
                    },
                    quantizer: None,
                    pruner: None,
                },
            ],
            notes: vec!["predicted error 0.5".into()],
        }
    }

    #[test]
    fn round_trips_through_a_file() {
        let p = sample();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("policy.toml");
        p.save(&path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("# predicted error 0.5"), "{text}");
        assert!(text.contains("pattern = \"2:4\""), "{text}");
        let back = Policy::load(&path, Some(3)).unwrap();
        assert_eq!(
            back,
            Policy {
                notes: vec![],
                ..p.clone()
            }
        );
        // Without the layer count too.
        assert_eq!(Policy::load(&path, None).unwrap().layers, p.layers);
    }

    #[test]
    fn accepts_hand_written_defaults_and_any_order() {
        let text = r#"
model = "m"
method = "manual"
budget = "bytes=1MB"
[[layer]]
index = 1
bits = 8
group = 64
scheme = "sym"
[[layer]]
index = 0
bits = 2
group = 32
scheme = "asym"
sparsity = 0
"#;
        let p = Policy::parse(text, Some(2)).unwrap();
        assert_eq!(p.layers[0].index, 0);
        assert_eq!(p.layers[1].candidate.bits, 8);
        assert_eq!(p.layers[1].candidate.sparsity, 0.0);
        assert_eq!(p.layers[1].candidate.pattern, SparsePattern::Unstructured);
    }

    /// The sample's TOML with one line of layer `layer`'s table replaced (or, with an empty
    /// `from`, a line added).
    fn edited(layer: usize, from: &str, to: &str) -> String {
        let text = sample().to_toml();
        let start = text.find(&format!("index = {layer}\n")).unwrap();
        let (head, tail) = text.split_at(start);
        if from.is_empty() {
            return format!("{head}{to}\n{tail}");
        }
        assert!(tail.contains(from), "{from} not in layer {layer}");
        format!("{head}{}", tail.replacen(from, to, 1))
    }

    #[test]
    fn each_validation_error_names_the_layer_and_field() {
        let cases: Vec<(String, Option<usize>, &str)> = vec![
            (
                edited(1, "bits = 3", "bits = 5"),
                Some(3),
                "layer 1: field `bits`: unsupported bit-width 5",
            ),
            (
                edited(1, "bits = 3", "bits = \"3\""),
                Some(3),
                "layer 1: field `bits`: must be an integer",
            ),
            (
                edited(1, "group = 32", "group = 48"),
                Some(3),
                "layer 1: field `group`: unsupported group size 48",
            ),
            (
                edited(1, "scheme = \"asym\"", "scheme = \"affine\""),
                Some(3),
                "layer 1: field `scheme`: `affine`",
            ),
            (
                edited(1, "sparsity = 0.3", "sparsity = 1.2"),
                Some(3),
                "layer 1: field `sparsity`: 1.2 is out of range [0, 1)",
            ),
            (
                edited(1, "sparsity = 0.3", "sparsity = -0.1"),
                Some(3),
                "layer 1: field `sparsity`: -0.1 is out of range",
            ),
            (
                edited(2, "sparsity = 0.5", "sparsity = 0.3"),
                Some(3),
                "layer 2: field `sparsity`: sparsity 0.3 contradicts the 2:4 pattern",
            ),
            (
                edited(2, "pattern = \"2:4\"", "pattern = \"2:5\""),
                Some(3),
                "layer 2: field `pattern`: N:M pattern 2:5 is not supported",
            ),
            (
                edited(2, "pattern = \"2:4\"", "pattern = \"dense\""),
                Some(3),
                "layer 2: field `pattern`: `dense` is not",
            ),
            (
                edited(1, "", "bitz = 3"),
                Some(3),
                "layer 1: unknown field `bitz`",
            ),
            (
                edited(1, "bits = 3\n", ""),
                Some(3),
                "layer 1: missing field `bits`",
            ),
            (
                edited(1, "scheme = \"asym\"\n", ""),
                Some(3),
                "layer 1: missing field `scheme`",
            ),
            (
                edited(2, "index = 2", "index = 7"),
                Some(3),
                "layer 7: no such layer (the model has 3 layers, 0..=2)",
            ),
            (
                edited(2, "index = 2", "index = 1"),
                Some(3),
                "layer 1 appears twice ([[layer]] entries 2 and 3)",
            ),
            (
                edited(2, "index = 2", "index = -1"),
                Some(3),
                "[[layer]] entry 3: field `index` must be a non-negative integer",
            ),
            (
                edited(2, "index = 2", "index = 3"),
                None,
                "layer 2 is missing (layers must be 0..=3",
            ),
            (
                sample().to_toml(),
                Some(4),
                "layer 3 is missing (the model has 4 layers",
            ),
            (
                sample().to_toml().replace("budget = ", "budgt = "),
                Some(3),
                "unknown top-level field `budgt`",
            ),
            (
                sample().to_toml().replace("bits=3.5", "bits=x"),
                Some(3),
                "field `budget`: budget part `bits=x`",
            ),
            (
                sample().to_toml().replace("model = ", "# model = "),
                Some(3),
                "missing field `model`",
            ),
            (
                "model = \"m\"\nmethod = \"x\"\nbudget = \"bits=4\"\n".to_string(),
                None,
                "no [[layer]] tables",
            ),
            ("model = \"m\n".to_string(), None, "not valid TOML"),
        ];
        for (text, n, want) in cases {
            let e = Policy::parse(&text, n).expect_err(want);
            assert!(e.contains(want), "error `{e}` should contain `{want}`");
        }
    }
}
