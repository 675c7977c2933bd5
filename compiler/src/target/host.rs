//! The `host` target: the machine the compiler runs on, read when the target is loaded.
//!
//! - ISA and features: `edge_runtime::bundle::host` (`is_x86_feature_detected!` /
//!   `is_aarch64_feature_detected!`), the same check the runtime makes before running a bundle.
//! - cores: `available_parallelism`; clock: cpufreq's maximum or `/proc/cpuinfo`.
//! - caches: `/sys/devices/system/cpu/cpu0/cache/index*` (instruction caches left out);
//!   DRAM size: `/proc/meminfo` MemTotal.
//! - bandwidths: measured, single-thread sequential reads over a buffer of half a cache
//!   level (times the cores for a per-core level) and, for DRAM, four times the last-level
//!   cache (at least 64 MiB). Single-thread DRAM figures understate what all cores reach.
//! - peak compute: cores × clock × flops a cycle of the widest vector unit the features
//!   give (an estimate: two FMA pipes assumed).
//! - budget: `budget.model_memory`, else `budget.model_memory_fraction` (default 0.5) of
//!   MemAvailable.

use std::sync::OnceLock;

use edge_runtime::bundle::host::{self, HostInfo};

use super::{MemoryKind, MemoryLevel, PeakCompute, Target};

/// Default share of the available memory a host build may plan for.
pub const DEFAULT_BUDGET_FRACTION: f64 = 0.5;

/// Clock assumed when the machine does not report one.
const FALLBACK_GHZ: f64 = 2.0;

/// What was measured, once per process.
struct Measured {
    info: HostInfo,
    ghz: Option<f64>,
    caches: Vec<MemoryLevel>,
    dram_gb_s: f64,
}

fn measured() -> &'static Measured {
    static M: OnceLock<Measured> = OnceLock::new();
    M.get_or_init(|| {
        let info = host::detect();
        let mut caches = vec![];
        for c in info.caches.iter().filter(|c| c.kind != "Instruction") {
            let per_core = c.shared_by <= 1 && info.cores > 1;
            let one = host::measure_read_gb_s((c.size_bytes / 2) as usize);
            caches.push(MemoryLevel {
                name: format!("L{}{}", c.level, if c.kind == "Data" { "d" } else { "" }),
                kind: MemoryKind::Cache,
                size_bytes: c.size_bytes,
                bandwidth_gb_s: round2(if per_core { one * info.cores as f64 } else { one }),
                per_core,
            });
        }
        caches.sort_by_key(|c| c.size_bytes);
        let llc = info.caches.iter().map(|c| c.size_bytes).max().unwrap_or(0);
        let dram_buf = (4 * llc).clamp(64 << 20, 256 << 20);
        Measured {
            ghz: host::frequency_ghz(),
            dram_gb_s: round2(host::measure_read_gb_s(dram_buf as usize)),
            caches,
            info,
        }
    })
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// f32 flops a cycle of one core for the features (two FMA pipes of the widest vectors).
fn f32_flops_per_cycle(arch: &str, has: impl Fn(&str) -> bool) -> f64 {
    match arch {
        "x86_64" if has("avx512f") => 64.0,
        "x86_64" if has("avx2") && has("fma") => 32.0,
        "x86_64" if has("avx") => 16.0,
        "aarch64" if has("neon") => 16.0,
        _ => 8.0,
    }
}

/// The host target. `fraction` of the available memory is the budget unless `fixed` is given.
pub fn detect_target(name: &str, description: &str, fraction: f64, fixed: Option<u64>) -> Target {
    let m = measured();
    let info = &m.info;
    let has = |f: &str| info.features.iter().any(|x| x == f);
    let ghz = m.ghz.unwrap_or(FALLBACK_GHZ);
    let f32 = round2(info.cores as f64 * ghz * f32_flops_per_cycle(&info.arch, has));
    let peak_gflops = PeakCompute {
        f32,
        // x86 has no f16 arithmetic short of AVX512-FP16 (F16C only converts).
        f16: (info.arch == "aarch64" && has("fp16")).then_some(2.0 * f32),
        bf16: (has("avx512bf16") || has("bf16")).then_some(2.0 * f32),
        int8: if has("avx512vnni") || has("avxvnni") || has("dotprod") {
            Some(4.0 * f32)
        } else if has("avx2") {
            Some(2.0 * f32)
        } else {
            None
        },
    };
    let total = info.memory_total_bytes.unwrap_or(1 << 30);
    let available = info.memory_available_bytes.unwrap_or(total);
    let mut memory = m.caches.clone();
    memory.push(MemoryLevel {
        name: "DRAM".into(),
        kind: MemoryKind::Dram,
        size_bytes: total,
        bandwidth_gb_s: m.dram_gb_s,
        per_core: false,
    });
    let mut description = description.to_string();
    if m.ghz.is_none() {
        description.push_str(&format!(" (clock unknown: {FALLBACK_GHZ} GHz assumed)"));
    }
    Target {
        name: name.to_string(),
        description,
        arch: info.arch.clone(),
        features: info.features.clone(),
        cores: info.cores,
        frequency_ghz: m.ghz.map(round2),
        memory,
        peak_gflops,
        budget_bytes: fixed.unwrap_or((available as f64 * fraction) as u64).min(total),
        detected: true,
        path: Default::default(),
        efficiency: Default::default(),
    }
}
