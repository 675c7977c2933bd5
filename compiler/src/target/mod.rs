//! Target descriptions (`targets/*.toml`): what a device offers the compiled model —
//! instruction set and CPU features, cores, memory levels with size and bandwidth, peak
//! compute per data type, and the memory budget for the model. Schema in `docs/targets.md`.
//!
//! Files are read with serde + toml (unknown keys refused); every error names the file, the
//! key and its line. A file saying `detect = true` (`targets/host.toml`) describes the
//! machine the compiler runs on, read at load time ([`host`]).

pub mod host;

use std::fmt::Write as _;
use std::ops::Range;
use std::path::{Path, PathBuf};

use edge_runtime::bundle::host::{KNOWN_ARCHES, known_features};
use edge_runtime::bundle::manifest as pb;
use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize};
use toml::Spanned;

/// A target file that failed to load: the message names the file, line, column and key.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TargetError(pub String);

/// Kinds of memory levels, fastest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MemoryKind {
    /// On-chip scratchpad the kernels place data in explicitly (accelerators).
    Sram,
    /// A hardware-managed CPU cache.
    Cache,
    /// Main memory.
    Dram,
    /// Where weights can be offloaded to and streamed from (flash, NVMe, SD card).
    Storage,
}

/// One level of the memory hierarchy.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MemoryLevel {
    pub name: String,
    pub kind: MemoryKind,
    /// Bytes of one instance (per core when `per_core`).
    pub size_bytes: u64,
    /// Sustained read bandwidth, GB/s (10^9 bytes a second), of the whole level (all
    /// instances together when `per_core`).
    pub bandwidth_gb_s: f64,
    /// One instance per core (private L1/L2) rather than one shared.
    pub per_core: bool,
}

/// Peak arithmetic throughput, GFLOP/s (GOP/s for integers), all cores together.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeakCompute {
    pub f32: f64,
    pub f16: Option<f64>,
    pub bf16: Option<f64>,
    pub int8: Option<f64>,
}

/// A validated target description.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Target {
    pub name: String,
    pub description: String,
    /// `x86_64` or `aarch64` (Rust's `std::env::consts::ARCH` spelling).
    pub arch: String,
    pub features: Vec<String>,
    pub cores: usize,
    pub frequency_ghz: Option<f64>,
    /// Fastest first.
    pub memory: Vec<MemoryLevel>,
    pub peak_gflops: PeakCompute,
    /// Bytes the model (weights, KV cache, activations) may use on the device.
    pub budget_bytes: u64,
    /// Read from the machine (`detect = true`).
    pub detected: bool,
    /// The file it came from.
    pub path: PathBuf,
    /// How much of the peaks the runtime's kernels reach (the scheduler's cost model).
    pub efficiency: Efficiency,
}

/// The fraction of the peak figures the runtime reaches and its fixed costs, for the
/// scheduler's cost model (`[efficiency]`, optional; `docs/schedule.md`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Efficiency {
    /// Fraction of `peak_gflops.f32` the kernels sustain, (0, 1].
    pub compute: f64,
    /// Factor on the memory levels' bandwidths, (0, 4] (above 1 when several cores read
    /// more than a single-thread measurement shows).
    pub bandwidth: f64,
    /// Fixed cost of one op (dispatch, allocation), microseconds, >= 0.
    pub op_overhead_us: f64,
    /// Extra fixed cost of an op split over threads (fork and join), microseconds, >= 0.
    pub parallel_overhead_us: f64,
}

impl Default for Efficiency {
    /// Figures of a well-tuned CPU runtime, for targets that were not measured.
    fn default() -> Self {
        Efficiency {
            compute: 0.5,
            bandwidth: 0.8,
            op_overhead_us: 2.0,
            parallel_overhead_us: 10.0,
        }
    }
}

// ---- the file's schema ----

/// A byte count: an integer, or a string with a unit (`"64 KiB"`, `"8 GiB"`, `"1.5 MB"`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ByteSize(pub u64);

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = ByteSize;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a byte count: an integer or a string such as \"64 KiB\" or \"8 GiB\"")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v)
                    .map(ByteSize)
                    .map_err(|_| E::custom(format!("size {v} is negative")))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ByteSize, E> {
                parse_size(v).map(ByteSize).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// Parses `"<number> <unit>"` with units B, KB, MB, GB, TB (powers of 1000) and KiB, MiB,
/// GiB, TiB (powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = (t[..split].trim(), t[split..].trim());
    let value: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a size such as \"64 KiB\" or \"8 GiB\""))?;
    let mult: f64 = match unit {
        "" | "B" => 1.0,
        "KB" | "kB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "TB" => 1e12,
        "KiB" => 1024.0,
        "MiB" => 1024.0 * 1024.0,
        "GiB" => 1024.0 * 1024.0 * 1024.0,
        "TiB" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        u => {
            return Err(format!(
                "unknown size unit `{u}` in `{s}` (B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)"
            ));
        }
    };
    let bytes = value * mult;
    if !bytes.is_finite() || bytes >= u64::MAX as f64 || bytes.fract() != 0.0 {
        return Err(format!("`{s}` is not a whole number of bytes"));
    }
    Ok(bytes as u64)
}

/// Formats bytes with the largest binary unit that keeps them whole, e.g. `64 KiB`.
pub fn format_size(b: u64) -> String {
    for (unit, m) in [
        ("TiB", 1u64 << 40),
        ("GiB", 1 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
    ] {
        if b >= m && b.is_multiple_of(m) {
            return format!("{} {unit}", b / m);
        }
    }
    format!("{b} B")
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileIsa {
    arch: Spanned<String>,
    features: Spanned<Vec<Spanned<String>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileCores {
    count: Spanned<i64>,
    frequency_ghz: Option<Spanned<f64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileMemory {
    name: Spanned<String>,
    kind: MemoryKind,
    size: Spanned<ByteSize>,
    bandwidth_gb_s: Spanned<f64>,
    #[serde(default)]
    per_core: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FilePeak {
    f32: Spanned<f64>,
    f16: Option<Spanned<f64>>,
    bf16: Option<Spanned<f64>>,
    int8: Option<Spanned<f64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileEfficiency {
    compute: Option<Spanned<f64>>,
    bandwidth: Option<Spanned<f64>>,
    op_overhead_us: Option<Spanned<f64>>,
    parallel_overhead_us: Option<Spanned<f64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileBudget {
    model_memory: Option<Spanned<ByteSize>>,
    /// Host only: the budget as a fraction of the machine's available memory.
    model_memory_fraction: Option<Spanned<f64>>,
}

/// A device described by hand.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileTarget {
    name: Spanned<String>,
    description: String,
    /// `false` here (a described device); `true` files are read as [`HostFile`].
    #[serde(default)]
    #[allow(dead_code)]
    detect: bool,
    isa: FileIsa,
    cores: FileCores,
    memory: Spanned<Vec<FileMemory>>,
    peak_gflops: FilePeak,
    budget: FileBudget,
    efficiency: Option<FileEfficiency>,
}

/// The machine the compiler runs on (`detect = true`).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HostFile {
    name: Spanned<String>,
    description: String,
    #[allow(dead_code)]
    detect: bool,
    budget: Option<FileBudget>,
    efficiency: Option<FileEfficiency>,
}

/// Line and column (1-based) of a byte offset.
fn line_col(src: &str, at: usize) -> (usize, usize) {
    let at = at.min(src.len());
    let before = &src[..at];
    let line = before.matches('\n').count() + 1;
    let col = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    (line, col)
}

/// The key a byte offset belongs to: the text before `=` on its line, or a table header.
fn key_at(src: &str, at: usize) -> Option<String> {
    let at = at.min(src.len());
    let start = src[..at].rfind('\n').map_or(0, |i| i + 1);
    let end = src[at..].find('\n').map_or(src.len(), |i| at + i);
    let line = src[start..end].trim();
    if line.starts_with('[') {
        return Some(line.split('#').next().unwrap_or(line).trim().to_string());
    }
    line.split_once('=').map(|(k, _)| k.trim().to_string())
}

struct Ctx<'a> {
    path: &'a Path,
    src: &'a str,
}

impl Ctx<'_> {
    fn err(&self, span: Range<usize>, key: &str, msg: impl std::fmt::Display) -> TargetError {
        let (line, col) = line_col(self.src, span.start);
        TargetError(format!("{}:{line}:{col}: `{key}`: {msg}", self.path.display()))
    }

    fn toml_err(&self, e: toml::de::Error) -> TargetError {
        let msg = e.message().trim().to_string();
        match e.span() {
            Some(span) => {
                let key = key_at(self.src, span.start).unwrap_or_else(|| "(top level)".into());
                self.err(span, &key, msg)
            }
            None => TargetError(format!("{}: {msg}", self.path.display())),
        }
    }

    fn positive(&self, v: &Spanned<f64>, key: &str) -> Result<f64, TargetError> {
        let x = *v.get_ref();
        if !x.is_finite() || x <= 0.0 {
            return Err(self.err(v.span(), key, format!("must be a positive number, got {x}")));
        }
        Ok(x)
    }
}

/// Parses and validates a target description (`path` names it in errors).
pub fn parse(path: &Path, src: &str) -> Result<Target, TargetError> {
    let cx = Ctx { path, src };
    let table: toml::Table = toml::from_str(src).map_err(|e| cx.toml_err(e))?;
    let detect = matches!(table.get("detect"), Some(toml::Value::Boolean(true)));
    let expect_name = path.file_stem().map(|s| s.to_string_lossy().into_owned());
    let check_name = |name: &Spanned<String>| -> Result<String, TargetError> {
        let n = name.get_ref();
        if n.is_empty()
            || !n
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        {
            return Err(cx.err(
                name.span(),
                "name",
                format!("`{n}` must be lowercase letters, digits and `-`"),
            ));
        }
        if let Some(stem) = &expect_name
            && stem != n
        {
            return Err(cx.err(
                name.span(),
                "name",
                format!("`{n}` differs from the file name `{stem}.toml`"),
            ));
        }
        Ok(n.clone())
    };
    if detect {
        let f: HostFile = toml::from_str(src).map_err(|e| cx.toml_err(e))?;
        let name = check_name(&f.name)?;
        let fraction = budget_fraction(&cx, f.budget.as_ref())?;
        let fixed = match f.budget.as_ref().and_then(|b| b.model_memory.as_ref()) {
            Some(m) if m.get_ref().0 == 0 => {
                return Err(cx.err(m.span(), "budget.model_memory", "must be positive"));
            }
            Some(m) => Some(m.get_ref().0),
            None => None,
        };
        let mut t = host::detect_target(&name, &f.description, fraction, fixed);
        t.path = path.to_path_buf();
        t.efficiency = efficiency(&cx, f.efficiency.as_ref())?;
        return Ok(t);
    }
    let f: FileTarget = toml::from_str(src).map_err(|e| cx.toml_err(e))?;
    let name = check_name(&f.name)?;
    let arch = f.isa.arch.get_ref().clone();
    if !KNOWN_ARCHES.contains(&arch.as_str()) {
        return Err(cx.err(
            f.isa.arch.span(),
            "isa.arch",
            format!(
                "unknown instruction set `{arch}` (known: {})",
                KNOWN_ARCHES.join(", ")
            ),
        ));
    }
    let mut features = vec![];
    for feat in f.isa.features.get_ref() {
        let s = feat.get_ref();
        if !known_features(&arch).contains(&s.as_str()) {
            return Err(cx.err(
                feat.span(),
                "isa.features",
                format!(
                    "`{s}` is not a {arch} feature (known: {})",
                    known_features(&arch).join(", ")
                ),
            ));
        }
        if features.contains(s) {
            return Err(cx.err(feat.span(), "isa.features", format!("`{s}` is listed twice")));
        }
        features.push(s.clone());
    }
    let count = *f.cores.count.get_ref();
    if !(1..=4096).contains(&count) {
        return Err(cx.err(
            f.cores.count.span(),
            "cores.count",
            format!("must be in 1..=4096, got {count}"),
        ));
    }
    let frequency_ghz = match &f.cores.frequency_ghz {
        Some(g) => {
            let v = cx.positive(g, "cores.frequency_ghz")?;
            if v > 10.0 {
                return Err(cx.err(
                    g.span(),
                    "cores.frequency_ghz",
                    format!("{v} GHz is not a CPU clock"),
                ));
            }
            Some(v)
        }
        None => None,
    };
    let memory = memory_levels(&cx, &f.memory)?;
    let peak = &f.peak_gflops;
    let opt = |v: &Option<Spanned<f64>>, key: &str| v.as_ref().map(|v| cx.positive(v, key)).transpose();
    let peak_gflops = PeakCompute {
        f32: cx.positive(&peak.f32, "peak_gflops.f32")?,
        f16: opt(&peak.f16, "peak_gflops.f16")?,
        bf16: opt(&peak.bf16, "peak_gflops.bf16")?,
        int8: opt(&peak.int8, "peak_gflops.int8")?,
    };
    let dram = memory
        .iter()
        .find(|m| m.kind == MemoryKind::Dram)
        .expect("memory_levels checks for DRAM");
    let budget_bytes = match (&f.budget.model_memory, &f.budget.model_memory_fraction) {
        (Some(m), None) => {
            let b = m.get_ref().0;
            if b == 0 || b > dram.size_bytes {
                return Err(cx.err(
                    m.span(),
                    "budget.model_memory",
                    format!(
                        "{} must be positive and at most the DRAM's {}",
                        format_size(b),
                        format_size(dram.size_bytes)
                    ),
                ));
            }
            b
        }
        (None, Some(_)) => (dram.size_bytes as f64 * budget_fraction(&cx, Some(&f.budget))?) as u64,
        (Some(m), Some(_)) => {
            return Err(cx.err(
                m.span(),
                "budget",
                "give either model_memory or model_memory_fraction, not both",
            ));
        }
        (None, None) => {
            let at = src.find("[budget]").unwrap_or(0);
            return Err(cx.err(at..at, "budget", "missing field `model_memory`"));
        }
    };
    Ok(Target {
        name,
        description: f.description,
        arch,
        features,
        cores: count as usize,
        frequency_ghz,
        memory,
        peak_gflops,
        budget_bytes,
        detected: false,
        path: path.to_path_buf(),
        efficiency: efficiency(&cx, f.efficiency.as_ref())?,
    })
}

/// The `[efficiency]` table, defaults for what it leaves out.
fn efficiency(cx: &Ctx, f: Option<&FileEfficiency>) -> Result<Efficiency, TargetError> {
    let mut e = Efficiency::default();
    let Some(f) = f else { return Ok(e) };
    let range = |v: &Option<Spanned<f64>>, key: &str, lo: f64, hi: f64, lo_open: bool| {
        v.as_ref()
            .map(|v| {
                let x = *v.get_ref();
                let ok = x.is_finite() && x <= hi && if lo_open { x > lo } else { x >= lo };
                if ok {
                    Ok(x)
                } else {
                    let open = if lo_open { "(" } else { "[" };
                    Err(cx.err(v.span(), key, format!("must be in {open}{lo}, {hi}], got {x}")))
                }
            })
            .transpose()
    };
    if let Some(x) = range(&f.compute, "efficiency.compute", 0.0, 1.0, true)? {
        e.compute = x;
    }
    if let Some(x) = range(&f.bandwidth, "efficiency.bandwidth", 0.0, 4.0, true)? {
        e.bandwidth = x;
    }
    if let Some(x) = range(&f.op_overhead_us, "efficiency.op_overhead_us", 0.0, 1e6, false)? {
        e.op_overhead_us = x;
    }
    if let Some(x) = range(
        &f.parallel_overhead_us,
        "efficiency.parallel_overhead_us",
        0.0,
        1e6,
        false,
    )? {
        e.parallel_overhead_us = x;
    }
    Ok(e)
}

fn budget_fraction(cx: &Ctx, b: Option<&FileBudget>) -> Result<f64, TargetError> {
    match b.and_then(|b| b.model_memory_fraction.as_ref()) {
        None => Ok(host::DEFAULT_BUDGET_FRACTION),
        Some(v) => {
            let x = cx.positive(v, "budget.model_memory_fraction")?;
            if x > 1.0 {
                return Err(cx.err(
                    v.span(),
                    "budget.model_memory_fraction",
                    format!("{x} is more than 1"),
                ));
            }
            Ok(x)
        }
    }
}

fn memory_levels(cx: &Ctx, levels: &Spanned<Vec<FileMemory>>) -> Result<Vec<MemoryLevel>, TargetError> {
    let mut out: Vec<MemoryLevel> = vec![];
    for (i, m) in levels.get_ref().iter().enumerate() {
        let key = |k: &str| format!("memory[{i}].{k}");
        let name = m.name.get_ref().clone();
        if name.is_empty() || out.iter().any(|o| o.name == name) {
            return Err(cx.err(
                m.name.span(),
                &key("name"),
                format!("`{name}` is empty or used twice"),
            ));
        }
        let size = m.size.get_ref().0;
        if size == 0 {
            return Err(cx.err(m.size.span(), &key("size"), "must be positive"));
        }
        let bandwidth = cx.positive(&m.bandwidth_gb_s, &key("bandwidth_gb_s"))?;
        if let Some(prev) = out.last()
            && m.kind < prev.kind
        {
            return Err(cx.err(
                m.name.span(),
                &key("kind"),
                format!(
                    "levels go fastest first (sram, cache, dram, storage); `{name}` ({:?}) follows `{}` ({:?})",
                    m.kind, prev.name, prev.kind
                ),
            ));
        }
        if m.per_core && matches!(m.kind, MemoryKind::Dram | MemoryKind::Storage) {
            return Err(cx.err(
                m.name.span(),
                &key("per_core"),
                "DRAM and storage are shared, not per core",
            ));
        }
        out.push(MemoryLevel {
            name,
            kind: m.kind,
            size_bytes: size,
            bandwidth_gb_s: bandwidth,
            per_core: m.per_core,
        });
    }
    let drams = out.iter().filter(|m| m.kind == MemoryKind::Dram).count();
    if drams != 1 {
        return Err(cx.err(
            levels.span(),
            "memory",
            format!("needs exactly one level of kind \"dram\", found {drams}"),
        ));
    }
    Ok(out)
}

/// Reads a target file.
pub fn load(path: &Path) -> Result<Target, TargetError> {
    let src = std::fs::read_to_string(path).map_err(|e| TargetError(format!("{}: {e}", path.display())))?;
    parse(path, &src)
}

/// The repository's `targets/` folder as built (used when no other folder is given).
pub fn builtin_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../targets")
}

/// Finds a target by file path or by name: `NAME.toml` in `dir` (if given), then
/// `./targets`, then the repository's `targets/`.
pub fn resolve(spec: &str, dir: Option<&Path>) -> Result<Target, TargetError> {
    let p = Path::new(spec);
    if p.extension().is_some_and(|e| e == "toml") || p.components().count() > 1 {
        return load(p);
    }
    let mut tried = vec![];
    for d in dir
        .map(Path::to_path_buf)
        .into_iter()
        .chain([PathBuf::from("targets"), builtin_dir()])
    {
        let f = d.join(format!("{spec}.toml"));
        if f.is_file() {
            return load(&f);
        }
        tried.push(d.display().to_string());
    }
    let mut names = list(dir.unwrap_or(&builtin_dir()))
        .unwrap_or_default()
        .into_iter()
        .filter_map(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .collect::<Vec<_>>();
    names.sort();
    Err(TargetError(format!(
        "no target `{spec}` (looked for {spec}.toml in {}; known: {})",
        tried.join(", "),
        names.join(", ")
    )))
}

/// The `.toml` files of a folder, sorted.
pub fn list(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    v.sort();
    Ok(v)
}

impl Target {
    /// The resolved description as TOML (what a bundle records; for a detected host, the
    /// figures read from the machine).
    pub fn to_toml(&self) -> String {
        let mut s = String::new();
        let q = |x: &str| toml::Value::String(x.into()).to_string();
        let _ = writeln!(s, "name = {}", q(&self.name));
        let _ = writeln!(s, "description = {}", q(&self.description));
        if self.detected {
            let _ = writeln!(s, "# detected from the build machine");
        }
        let _ = writeln!(s, "\n[isa]\narch = {}", q(&self.arch));
        let feats: Vec<String> = self.features.iter().map(|f| q(f)).collect();
        let _ = writeln!(s, "features = [{}]", feats.join(", "));
        let _ = writeln!(s, "\n[cores]\ncount = {}", self.cores);
        if let Some(g) = self.frequency_ghz {
            let _ = writeln!(s, "frequency_ghz = {g:?}");
        }
        for m in &self.memory {
            let kind = match m.kind {
                MemoryKind::Sram => "sram",
                MemoryKind::Cache => "cache",
                MemoryKind::Dram => "dram",
                MemoryKind::Storage => "storage",
            };
            let _ = writeln!(
                s,
                "\n[[memory]]\nname = {}\nkind = {}\nsize = {}\nbandwidth_gb_s = {:?}\nper_core = {}",
                q(&m.name),
                q(kind),
                q(&format_size(m.size_bytes)),
                m.bandwidth_gb_s,
                m.per_core
            );
        }
        let p = &self.peak_gflops;
        let _ = writeln!(s, "\n[peak_gflops]\nf32 = {:?}", p.f32);
        for (k, v) in [("f16", p.f16), ("bf16", p.bf16), ("int8", p.int8)] {
            if let Some(v) = v {
                let _ = writeln!(s, "{k} = {v:?}");
            }
        }
        let _ = writeln!(
            s,
            "\n[budget]\nmodel_memory = {}",
            q(&format_size(self.budget_bytes))
        );
        let e = &self.efficiency;
        let _ = writeln!(
            s,
            "\n[efficiency]\ncompute = {:?}\nbandwidth = {:?}\nop_overhead_us = {:?}\nparallel_overhead_us = {:?}",
            e.compute, e.bandwidth, e.op_overhead_us, e.parallel_overhead_us
        );
        s
    }

    /// The bundle manifest's target entry.
    pub fn to_manifest(&self) -> pb::Target {
        pb::Target {
            name: self.name.clone(),
            arch: self.arch.clone(),
            features: self.features.clone(),
            description: self.to_toml(),
        }
    }

    /// The DRAM level.
    pub fn dram(&self) -> &MemoryLevel {
        self.memory
            .iter()
            .find(|m| m.kind == MemoryKind::Dram)
            .expect("validated targets have DRAM")
    }

    /// The Cranelift triple and ISA settings for the target's arch and features (features
    /// Cranelift has no setting for are left out).
    pub fn cranelift_isa(&self) -> (String, Vec<&'static str>) {
        let triple = format!("{}-unknown-linux-gnu", self.arch);
        let flags = self
            .features
            .iter()
            .filter_map(|f| {
                Some(match (self.arch.as_str(), f.as_str()) {
                    ("x86_64", "sse3") => "has_sse3",
                    ("x86_64", "ssse3") => "has_ssse3",
                    ("x86_64", "sse4.1") => "has_sse41",
                    ("x86_64", "sse4.2") => "has_sse42",
                    ("x86_64", "popcnt") => "has_popcnt",
                    ("x86_64", "avx") => "has_avx",
                    ("x86_64", "avx2") => "has_avx2",
                    ("x86_64", "fma") => "has_fma",
                    ("x86_64", "bmi1") => "has_bmi1",
                    ("x86_64", "bmi2") => "has_bmi2",
                    ("x86_64", "avx512f") => "has_avx512f",
                    ("x86_64", "avx512vl") => "has_avx512vl",
                    ("x86_64", "avx512vnni") => "has_avx512vnni",
                    ("x86_64", "avxvnni") => "has_avx_vnni",
                    ("aarch64", "fp16") => "has_fp16",
                    ("aarch64", "dotprod") => "has_dotprod",
                    ("aarch64", "i8mm") => "has_i8mm",
                    _ => return None,
                })
            })
            .collect();
        (triple, flags)
    }

    /// Whether this machine can run code for the target (same ISA and features).
    pub fn runs_here(&self) -> bool {
        self.arch == std::env::consts::ARCH
            && self
                .features
                .iter()
                .all(|f| edge_runtime::bundle::host::has_feature(f))
    }
}
