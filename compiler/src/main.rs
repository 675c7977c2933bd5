//! `edgec`: the Edge-LLM model compiler's command line.

mod cli;

use std::alloc::System;
use std::process::ExitCode;

use peakmem_alloc::{INSTRUMENTED_SYSTEM, PeakMemAlloc, PeakMemAllocTrait};

/// The system allocator with a peak counter, so that `edgec tune` can report the heap its
/// tuning needs beyond the loaded model (activations, gradients, optimizer state, caches).
#[global_allocator]
static HEAP: &PeakMemAlloc<System> = &INSTRUMENTED_SYSTEM;

/// Starts measuring the heap peak from now.
pub fn reset_heap_peak() {
    HEAP.reset_peak_memory();
}

/// The most heap allocated at once since [`reset_heap_peak`], in bytes above the level
/// at the reset.
pub fn heap_peak() -> usize {
    HEAP.get_peak_memory()
}

fn main() -> ExitCode {
    edge_runtime::memory::retain_freed_memory();
    // A closed stdout (e.g. `edgec inspect M | head`) ends the program quietly, as a
    // SIGPIPE would, instead of reporting a panic.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let msg = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("");
        if msg.contains("failed printing to stdout") {
            std::process::exit(141);
        }
        default_hook(info);
    }));
    let args = cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match cli::run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
