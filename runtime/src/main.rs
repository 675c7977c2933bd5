//! `edge-runtime`: the Edge-LLM device runtime's command line.
//!
//! Today it reports what the device offers the kernels; the gRPC service (`serve`) comes
//! with the bundle format.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "edge-runtime", version, about = "Edge-LLM device runtime")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the runtime version, the target, the worker threads and the CPU features the
    /// kernels use.
    Info {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Serve the device's gRPC service (bundles, generation, status; health and reflection).
    Serve(edge_runtime::service::ServeArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Command::Serve(a) => {
            if let Err(e) = edge_runtime::service::run_cli(a) {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        }
        Command::Info { json } => {
            let info = serde_json::json!({
                "runtime_version": env!("CARGO_PKG_VERSION"),
                "arch": std::env::consts::ARCH,
                "os": std::env::consts::OS,
                "threads": rayon::current_num_threads(),
                "simd_dot_kernels": edge_runtime::kernels::dot::simd_name(),
            });
            if json {
                println!("{info}");
            } else {
                println!("edge-runtime {}", env!("CARGO_PKG_VERSION"));
                println!("target     {}-{}", std::env::consts::ARCH, std::env::consts::OS);
                println!("threads    {}", rayon::current_num_threads());
                println!("kernels    {}", edge_runtime::kernels::dot::simd_name());
            }
        }
    }
    ExitCode::SUCCESS
}
