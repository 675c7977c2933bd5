//! The process's own memory, for progress reports and benchmarks.

/// `(current, peak)` resident set size of this process in bytes (Linux `VmRSS` / `VmHWM`;
/// zeros where `/proc` is not available).
pub fn rss_bytes() -> (u64, u64) {
    let Ok(s) = std::fs::read_to_string("/proc/self/status") else {
        return (0, 0);
    };
    let field = |k: &str| {
        s.lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Lets the allocator keep the memory a process frees for its next allocations instead of
/// returning it to the kernel at once. A tuning step allocates and frees its activations
/// (hundreds of MB at seq 256 on SmolLM2): with glibc's defaults the large blocks are
/// `mmap`ed, unmapped when freed and faulted in again, page by page, on the next step
/// (43,000 page faults a step for `edgec tune --mode full`, 5% of its time on a loaded
/// machine).
/// Blocks up to 32 MiB (glibc's largest mmap threshold) now come from the heap, and the heap
/// is not trimmed below 1 GiB of free space. The peak RSS is unchanged: the memory was
/// resident at the peak anyway. A no-op where the C library is not glibc.
pub fn retain_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets glibc malloc's tuning parameters (it takes the arena lock);
    // both values are within the ranges glibc accepts, and a refused value leaves the
    // default in place.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}
