//! Target descriptions: every file in targets/ loads; bad files fail naming file, key, line.

mod common;

use std::path::Path;

use edgec::target::{self, MemoryKind, parse, parse_size};

fn good() -> String {
    std::fs::read_to_string(common::repo().join("targets/raspberry-pi-5.toml")).unwrap()
}

/// Parses `src` as `targets/raspberry-pi-5.toml` and returns the error text.
fn error_of(src: &str) -> String {
    parse(Path::new("targets/raspberry-pi-5.toml"), src)
        .expect_err("the file must be refused")
        .to_string()
}

/// The 1-based line of the first line containing `needle`.
fn line_of(src: &str, needle: &str) -> usize {
    src.lines()
        .position(|l| l.contains(needle))
        .expect("needle in source")
        + 1
}

#[test]
fn every_target_file_loads() {
    let files = target::list(&common::repo().join("targets")).unwrap();
    let names: Vec<String> = files
        .iter()
        .map(|p| p.file_stem().unwrap().to_string_lossy().into_owned())
        .collect();
    for want in [
        "jetson-orin",
        "raspberry-pi-5",
        "x86-64-avx2",
        "host",
        "edge-accelerator",
    ] {
        assert!(names.iter().any(|n| n == want), "targets/{want}.toml is missing");
    }
    for f in files {
        let t = target::load(&f).unwrap_or_else(|e| panic!("{e}"));
        assert!(
            t.budget_bytes > 0 && t.budget_bytes <= t.dram().size_bytes,
            "{}",
            t.name
        );
        assert!(t.peak_gflops.f32 > 0.0);
        // The resolved description is itself a valid target file.
        let again = parse(&f, &t.to_toml()).unwrap_or_else(|e| panic!("{}: {e}\n{}", t.name, t.to_toml()));
        assert_eq!(again.memory, t.memory);
        assert_eq!(again.features, t.features);
        assert_eq!(again.budget_bytes, t.budget_bytes);
    }
}

#[test]
fn the_accelerator_has_on_chip_sram_of_the_papers_size() {
    let t = target::resolve("edge-accelerator", None).unwrap();
    let sram = t
        .memory
        .iter()
        .find(|m| m.kind == MemoryKind::Sram)
        .expect("an SRAM level");
    assert!(
        (512 << 10..=1 << 20).contains(&sram.size_bytes),
        "{}",
        sram.size_bytes
    );
    assert!(t.memory.iter().any(|m| m.kind == MemoryKind::Storage));
}

#[test]
fn host_is_read_from_this_machine() {
    let t = target::resolve("host", None).unwrap();
    assert!(t.detected);
    assert_eq!(t.arch, std::env::consts::ARCH);
    assert_eq!(t.cores, std::thread::available_parallelism().unwrap().get());
    let dram = t.dram();
    assert!(dram.size_bytes > 0 && dram.bandwidth_gb_s > 0.0);
    assert!(t.runs_here());
    if Path::new("/sys/devices/system/cpu/cpu0/cache/index0").exists() {
        assert!(
            t.memory.iter().any(|m| m.kind == MemoryKind::Cache),
            "caches from sysfs"
        );
    }
    #[cfg(target_arch = "x86_64")]
    assert_eq!(
        t.features.contains(&"avx2".to_string()),
        std::arch::is_x86_feature_detected!("avx2")
    );
}

#[test]
fn unknown_key_is_named_with_its_line() {
    let src = good().replace("bandwidth_gb_s = 17.07", "bandwith_gb_s = 17.07");
    let e = error_of(&src);
    let line = line_of(&src, "bandwith_gb_s");
    assert!(e.contains("targets/raspberry-pi-5.toml"), "{e}");
    assert!(e.contains(&format!(":{line}:")), "line {line}: {e}");
    assert!(e.contains("bandwith_gb_s") && e.contains("unknown field"), "{e}");
}

#[test]
fn missing_field_is_named() {
    let src = good().replace("count = 4 ", "# count removed ");
    let e = error_of(&src);
    assert!(e.contains("targets/raspberry-pi-5.toml"), "{e}");
    assert!(e.contains("missing field `count`"), "{e}");
    let line = line_of(&src, "[cores]");
    assert!(e.contains(&format!(":{line}:")), "line {line}: {e}");
}

#[test]
fn nonsense_values_are_named_with_key_and_line() {
    let cases = [
        (
            "bandwidth_gb_s = 17.07",
            "bandwidth_gb_s = -3.0",
            "memory[3].bandwidth_gb_s",
            "positive",
        ),
        ("count = 4 ", "count = 0 ", "cores.count", "1..=4096"),
        (
            "arch = \"aarch64\"",
            "arch = \"mips\"",
            "isa.arch",
            "unknown instruction set",
        ),
        (
            "\"neon\", \"fp16\"",
            "\"neon\", \"avx2\"",
            "isa.features",
            "not a aarch64 feature",
        ),
        (
            "size = \"512 KiB\"",
            "size = \"512 KiQ\"",
            "size",
            "unknown size unit",
        ),
        (
            "model_memory = \"4 GiB\"",
            "model_memory = \"64 GiB\"",
            "budget.model_memory",
            "at most the DRAM",
        ),
        (
            "frequency_ghz = 2.4",
            "frequency_ghz = \"fast\"",
            "frequency_ghz",
            "invalid type",
        ),
        (
            "name = \"raspberry-pi-5\"",
            "name = \"rpi5\"",
            "name",
            "differs from the file name",
        ),
    ];
    for (from, to, key, what) in cases {
        let src = good().replacen(from, to, 1);
        assert_ne!(src, good(), "{from}");
        let e = error_of(&src);
        let line = line_of(&src, to);
        assert!(e.contains("targets/raspberry-pi-5.toml"), "{e}");
        assert!(
            e.contains(&format!(":{line}:")),
            "{to}: expected line {line}: {e}"
        );
        assert!(e.contains(key), "{to}: expected key {key}: {e}");
        assert!(e.contains(what), "{to}: expected `{what}`: {e}");
    }
}

#[test]
fn memory_levels_need_one_dram_in_order() {
    let src = good().replace("kind = \"dram\"", "kind = \"cache\"");
    let e = error_of(&src);
    assert!(
        e.contains("memory") && e.contains("exactly one level of kind \"dram\""),
        "{e}"
    );
    let src = good().replace(
        "name = \"L3\"\nkind = \"cache\"",
        "name = \"L3\"\nkind = \"storage\"",
    );
    assert_ne!(src, good());
    let e = error_of(&src);
    assert!(e.contains("fastest first"), "{e}");
}

#[test]
fn host_file_refuses_device_keys() {
    let src = "name = \"host\"\ndescription = \"x\"\ndetect = true\n[cores]\ncount = 3\n";
    let e = parse(Path::new("host.toml"), src).unwrap_err().to_string();
    assert!(e.contains("host.toml:4:") && e.contains("cores"), "{e}");
}

#[test]
fn unknown_target_names_the_known_ones() {
    let e = target::resolve("pdp-11", None).unwrap_err().to_string();
    assert!(e.contains("pdp-11") && e.contains("jetson-orin"), "{e}");
}

#[test]
fn sizes_parse_with_units() {
    assert_eq!(parse_size("64 KiB").unwrap(), 64 << 10);
    assert_eq!(parse_size("1.5 GB").unwrap(), 1_500_000_000);
    assert_eq!(parse_size("4096").unwrap(), 4096);
    assert!(parse_size("0.5 B").is_err());
    assert!(parse_size("12 parsecs").is_err());
}
