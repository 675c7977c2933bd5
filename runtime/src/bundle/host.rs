//! What the machine this process runs on offers: instruction set, CPU features, cores,
//! caches and memory. The runtime checks a bundle's target against it before running the
//! bundle; the compiler's `host` target description is filled from it.

use serde::Serialize;

/// One CPU cache level, from `/sys/devices/system/cpu/cpu0/cache/index*`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CacheInfo {
    pub level: u32,
    /// `Data`, `Instruction` or `Unified`.
    pub kind: String,
    pub size_bytes: u64,
    /// How many logical CPUs share it.
    pub shared_by: usize,
}

/// The machine.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HostInfo {
    /// `std::env::consts::ARCH`: `x86_64`, `aarch64`, ...
    pub arch: String,
    /// Features from [`known_features`] the CPU has.
    pub features: Vec<String>,
    /// Logical CPUs this process may use.
    pub cores: usize,
    pub caches: Vec<CacheInfo>,
    /// `/proc/meminfo` MemTotal and MemAvailable, when readable.
    pub memory_total_bytes: Option<u64>,
    pub memory_available_bytes: Option<u64>,
}

/// The feature names a target may list for an instruction set (as Rust's
/// `is_*_feature_detected!` spell them); empty for an instruction set the runtime does not
/// know.
pub fn known_features(arch: &str) -> &'static [&'static str] {
    match arch {
        "x86_64" => &[
            "sse2",
            "sse3",
            "ssse3",
            "sse4.1",
            "sse4.2",
            "popcnt",
            "avx",
            "avx2",
            "fma",
            "f16c",
            "bmi1",
            "bmi2",
            "avx512f",
            "avx512bw",
            "avx512vl",
            "avx512vnni",
            "avx512bf16",
            "avxvnni",
        ],
        "aarch64" => &[
            "neon", "fp16", "dotprod", "i8mm", "bf16", "sve", "sve2", "crc", "aes", "sha2",
        ],
        _ => &[],
    }
}

/// The instruction sets bundles may target.
pub const KNOWN_ARCHES: [&str; 2] = ["x86_64", "aarch64"];

/// Whether the running CPU has `feature` (a name from [`known_features`] of this arch).
pub fn has_feature(feature: &str) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        match feature {
            "sse2" => std::arch::is_x86_feature_detected!("sse2"),
            "sse3" => std::arch::is_x86_feature_detected!("sse3"),
            "ssse3" => std::arch::is_x86_feature_detected!("ssse3"),
            "sse4.1" => std::arch::is_x86_feature_detected!("sse4.1"),
            "sse4.2" => std::arch::is_x86_feature_detected!("sse4.2"),
            "popcnt" => std::arch::is_x86_feature_detected!("popcnt"),
            "avx" => std::arch::is_x86_feature_detected!("avx"),
            "avx2" => std::arch::is_x86_feature_detected!("avx2"),
            "fma" => std::arch::is_x86_feature_detected!("fma"),
            "f16c" => std::arch::is_x86_feature_detected!("f16c"),
            "bmi1" => std::arch::is_x86_feature_detected!("bmi1"),
            "bmi2" => std::arch::is_x86_feature_detected!("bmi2"),
            "avx512f" => std::arch::is_x86_feature_detected!("avx512f"),
            "avx512bw" => std::arch::is_x86_feature_detected!("avx512bw"),
            "avx512vl" => std::arch::is_x86_feature_detected!("avx512vl"),
            "avx512vnni" => std::arch::is_x86_feature_detected!("avx512vnni"),
            "avx512bf16" => std::arch::is_x86_feature_detected!("avx512bf16"),
            "avxvnni" => std::arch::is_x86_feature_detected!("avxvnni"),
            _ => false,
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        match feature {
            "neon" => std::arch::is_aarch64_feature_detected!("neon"),
            "fp16" => std::arch::is_aarch64_feature_detected!("fp16"),
            "dotprod" => std::arch::is_aarch64_feature_detected!("dotprod"),
            "i8mm" => std::arch::is_aarch64_feature_detected!("i8mm"),
            "bf16" => std::arch::is_aarch64_feature_detected!("bf16"),
            "sve" => std::arch::is_aarch64_feature_detected!("sve"),
            "sve2" => std::arch::is_aarch64_feature_detected!("sve2"),
            "crc" => std::arch::is_aarch64_feature_detected!("crc"),
            "aes" => std::arch::is_aarch64_feature_detected!("aes"),
            "sha2" => std::arch::is_aarch64_feature_detected!("sha2"),
            _ => false,
        }
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        let _ = feature;
        false
    }
}

/// Parses sysfs sizes such as `48K`, `2048K`, `32M`.
fn parse_sysfs_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, mult) = match s.as_bytes().last()? {
        b'K' => (&s[..s.len() - 1], 1u64 << 10),
        b'M' => (&s[..s.len() - 1], 1 << 20),
        b'G' => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<u64>().ok().map(|n| n * mult)
}

/// Counts the CPUs of a sysfs list such as `0-3,8,10-11`.
fn count_cpu_list(s: &str) -> usize {
    s.trim()
        .split(',')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('-') {
            Some((a, b)) => match (a.parse::<usize>(), b.parse::<usize>()) {
                (Ok(a), Ok(b)) if b >= a => b - a + 1,
                _ => 1,
            },
            None => 1,
        })
        .sum()
}

fn read_caches() -> Vec<CacheInfo> {
    let base = std::path::Path::new("/sys/devices/system/cpu/cpu0/cache");
    let mut out = vec![];
    let Ok(dir) = std::fs::read_dir(base) else {
        return out;
    };
    let mut names: Vec<_> = dir
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("index"))
        .collect();
    names.sort();
    for n in names {
        let read = |f: &str| std::fs::read_to_string(base.join(&n).join(f)).ok();
        let (Some(level), Some(kind), Some(size)) = (read("level"), read("type"), read("size")) else {
            continue;
        };
        let (Ok(level), Some(size_bytes)) = (level.trim().parse(), parse_sysfs_size(&size)) else {
            continue;
        };
        out.push(CacheInfo {
            level,
            kind: kind.trim().to_string(),
            size_bytes,
            shared_by: read("shared_cpu_list").map_or(1, |s| count_cpu_list(&s).max(1)),
        });
    }
    out
}

fn meminfo(key: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = s.lines().find(|l| l.starts_with(key))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// The CPU's clock in GHz: cpufreq's maximum, else `/proc/cpuinfo`'s current `cpu MHz`.
pub fn frequency_ghz() -> Option<f64> {
    if let Ok(khz) = std::fs::read_to_string("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")
        && let Ok(khz) = khz.trim().parse::<f64>()
    {
        return Some(khz / 1e6);
    }
    let s = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let line = s.lines().find(|l| l.starts_with("cpu MHz"))?;
    let mhz: f64 = line.split(':').nth(1)?.trim().parse().ok()?;
    Some(mhz / 1e3)
}

/// Measures single-thread sequential read bandwidth (GB/s) over a buffer of `bytes`:
/// the best of a few passes, each summing the buffer as 64-bit words.
pub fn measure_read_gb_s(bytes: usize) -> f64 {
    let words = (bytes / 8).max(1024);
    let buf: Vec<u64> = (0..words as u64).collect();
    // Enough passes for ~64 MiB of reads, at least 3.
    let passes = ((64usize << 20) / (words * 8)).clamp(3, 4096);
    let mut best = f64::INFINITY;
    let mut sink = 0u64;
    for _ in 0..3 {
        let t = std::time::Instant::now();
        for _ in 0..passes {
            let mut acc = [0u64; 8];
            for c in buf.chunks_exact(8) {
                for (a, &x) in acc.iter_mut().zip(c) {
                    *a = a.wrapping_add(x);
                }
            }
            sink = sink.wrapping_add(acc.iter().fold(0, |a, &b| a.wrapping_add(b)));
            std::hint::black_box(&buf);
        }
        best = best.min(t.elapsed().as_secs_f64());
    }
    std::hint::black_box(sink);
    (words * 8 * passes) as f64 / best.max(1e-9) / 1e9
}

/// Reads the machine's description.
pub fn detect() -> HostInfo {
    let arch = std::env::consts::ARCH.to_string();
    let features = known_features(&arch)
        .iter()
        .filter(|f| has_feature(f))
        .map(|f| f.to_string())
        .collect();
    HostInfo {
        arch,
        features,
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        caches: read_caches(),
        memory_total_bytes: meminfo("MemTotal:"),
        memory_available_bytes: meminfo("MemAvailable:"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sysfs_formats() {
        assert_eq!(parse_sysfs_size("48K\n"), Some(48 << 10));
        assert_eq!(parse_sysfs_size("32M"), Some(32 << 20));
        assert_eq!(parse_sysfs_size("x"), None);
        assert_eq!(count_cpu_list("0-3,8,10-11\n"), 7);
        assert_eq!(count_cpu_list("0"), 1);
    }

    #[test]
    fn detects_this_machine() {
        let h = detect();
        assert_eq!(h.arch, std::env::consts::ARCH);
        assert!(h.cores >= 1);
        for f in &h.features {
            assert!(known_features(&h.arch).contains(&f.as_str()));
        }
        #[cfg(target_arch = "x86_64")]
        assert!(h.features.iter().any(|f| f == "sse2"), "x86-64 always has SSE2");
    }
}
