//! `edgec adapters --device URL [--job ID] -o DIR`: a device's tuned adapters in PEFT's
//! layout (`adapter_config.json`, `adapter_model.safetensors`, plus `exit_heads.safetensors`
//! and `voting.json`), every file checked against its SHA-256, the directory written
//! atomically.

use std::path::PathBuf;

use clap::Args;
use edgec::client::{self, adapters};

use super::deploy::tokio_runtime;
use super::tune_device::OneDevice;

#[derive(Args)]
pub struct AdaptersArgs {
    #[command(flatten)]
    target: OneDevice,
    /// The tuning job (its id from `edgec tune --device`); default the device's latest.
    #[arg(long)]
    job: Option<String>,
    /// Output directory (created; written beside it, then renamed into place).
    #[arg(long, short = 'o')]
    output: PathBuf,
    /// Replace --output if it exists.
    #[arg(long)]
    force: bool,
    /// Print JSON (the files with sizes and SHA-256).
    #[arg(long)]
    json: bool,
}

pub fn run(a: AdaptersArgs) -> anyhow::Result<()> {
    let opts = a.target.options()?;
    let device = a.target.device.clone();
    let job = a.job.clone().unwrap_or_default();
    let files = tokio_runtime()?.block_on(async {
        let mut c = client::connect(&device, &opts).await?;
        adapters::receive(&mut c, &device, &job).await
    })?;
    let written = adapters::write_dir(&a.output, &files, a.force)?;
    if a.json {
        println!(
            "{}",
            serde_json::json!({"device": device, "job_id": a.job, "output": a.output, "files": written})
        );
    } else {
        for f in &written {
            println!("{:<28} {:>12} bytes  {}", f.path, f.size, f.sha256);
        }
        eprintln!("adapters: {}", a.output.display());
    }
    Ok(())
}
