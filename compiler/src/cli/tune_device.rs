//! `edgec tune --device URL --data FILE ...`: tuning on a device. Uploads the training text
//! (resumable, skipped when the device holds it), starts `Tune` on the active bundle and
//! follows its progress stream with a progress bar (or JSON lines); with `-o DIR` the
//! finished adapters are exported there. `edgec adapters` exports them later.

use std::path::PathBuf;
use std::sync::Arc;

use clap::{Args, ValueEnum};
use edge_proto::runtime::{TuneRequest, UploadKind};
use edgec::client::adapters::{receive, write_dir};
use edgec::client::deploy::{Upload, file_sha256, upload};
use edgec::client::{self, DeviceOptions};

use super::deploy::tokio_runtime;

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum DeviceMode {
    /// Edge-LLM's adaptive layer tuning: an exit every --stride layers, windows shallow to deep.
    Edge,
    /// Full-depth LoRA.
    Full,
    /// The last --stride layers only.
    LastK,
}

/// How to reach one device.
#[derive(Args, Clone)]
pub struct OneDevice {
    /// Device URL, e.g. http://10.0.0.7:50051 (https:// for TLS).
    #[arg(long, value_name = "URL")]
    pub device: String,
    /// File holding the device's bearer token.
    #[arg(long)]
    pub token_file: PathBuf,
    /// CA certificate (PEM) for an https:// device.
    #[arg(long)]
    pub ca_cert: Option<PathBuf>,
}

impl OneDevice {
    pub fn options(&self) -> anyhow::Result<DeviceOptions> {
        let ca_cert = self.ca_cert.as_ref().map(std::fs::read).transpose()?;
        Ok(DeviceOptions {
            token: client::read_token(&self.token_file)?,
            ca_cert,
            max_message_bytes: 4 << 20,
        })
    }
}

#[derive(Args)]
#[command(
    about = "Tune the device's active bundle on a text (LoRA adapters + exit heads), following its progress",
    after_help = "\
The job runs on the device and outlives this command: if the connection drops, run the same \
command with --resume to follow it again (the device continues from its last checkpoint). The \
job id printed at the start names the result: `edgec remote-generate --tune-job ID` generates \
with it (every voting mode), `edgec adapters --job ID -o DIR` exports it in PEFT's layout."
)]
pub struct DeviceTuneArgs {
    #[command(flatten)]
    target: OneDevice,
    /// Training text (UTF-8), uploaded to the device (content-addressed, resumable).
    #[arg(long)]
    data: PathBuf,
    #[arg(long, value_enum, default_value_t = DeviceMode::Edge)]
    mode: DeviceMode,
    /// Layers per window (edge) or tuned layers (last-k); 0: the device picks a divisor of
    /// the layer count near 6.
    #[arg(long, default_value_t = 0)]
    stride: u32,
    #[arg(long, default_value_t = 8)]
    rank: u32,
    /// LoRA alpha (scale = alpha / rank); default 2 x rank.
    #[arg(long)]
    alpha: Option<f32>,
    /// Projections with adapters: `all` or a list of q,k,v,o,gate,up,down.
    #[arg(long, default_value = "all")]
    targets: String,
    #[arg(long, default_value_t = 100)]
    steps: u32,
    /// Tokens per training sequence.
    #[arg(long, default_value_t = 256)]
    seq: u32,
    /// Sequences per step.
    #[arg(long, default_value_t = 1)]
    batch: u32,
    #[arg(long, default_value_t = 4e-4)]
    lr: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Checkpoint every K steps on the device.
    #[arg(long, default_value_t = 20)]
    checkpoint_every: u32,
    /// Continue the device's unfinished job with these settings from its last checkpoint.
    #[arg(long)]
    resume: bool,
    /// When the job finishes, export its adapters to this directory (PEFT's layout).
    #[arg(long, short = 'o')]
    output: Option<PathBuf>,
    /// Replace --output if it exists.
    #[arg(long)]
    force: bool,
    /// Print one JSON object per progress report and a summary object at the end.
    #[arg(long)]
    json: bool,
}

pub fn run(a: DeviceTuneArgs) -> anyhow::Result<()> {
    anyhow::ensure!(a.steps > 0, "--steps must be at least 1");
    anyhow::ensure!(a.rank > 0, "--rank must be at least 1");
    anyhow::ensure!(a.lr > 0.0 && a.lr.is_finite(), "--lr must be positive");
    let text = super::read_text(&a.data)?;
    anyhow::ensure!(
        !text.trim().is_empty(),
        "{}: the training text is empty",
        a.data.display()
    );
    let targets = if a.targets == "all" {
        String::new()
    } else {
        let t = edge_runtime::train::lora::parse_targets(&a.targets)?;
        t.iter().map(|m| m.peft_name()).collect::<Vec<_>>().join(",")
    };
    let opts = a.target.options()?;
    let device = a.target.device.clone();
    let (sha, size) = file_sha256(&a.data)?;
    let req = TuneRequest {
        dataset_sha256: sha.clone(),
        steps: a.steps,
        learning_rate: a.lr,
        lora_rank: a.rank,
        lora_alpha: a.alpha.unwrap_or(0.0),
        seq_len: a.seq,
        batch_size: a.batch,
        checkpoint_every: a.checkpoint_every,
        seed: a.seed,
        resume: a.resume,
        stride: a.stride,
        mode: match a.mode {
            DeviceMode::Edge => "edge",
            DeviceMode::Full => "full",
            DeviceMode::LastK => "last-k",
        }
        .into(),
        targets,
    };
    let rt = tokio_runtime()?;
    rt.block_on(async {
        let rpc = |s| client::ClientError::rpc(&device, s);
        let mut c = client::connect(&device, &opts).await?;
        let up_bar = super::progress_bar(size, "uploading the text");
        up_bar.set_draw_target(if a.json {
            indicatif::ProgressDrawTarget::hidden()
        } else {
            indicatif::ProgressDrawTarget::stderr()
        });
        let bar = up_bar.clone();
        let u = Upload {
            device: &device,
            kind: UploadKind::Dataset,
            path: &a.data,
            sha256: &sha,
            size,
            chunk_bytes: 1 << 20,
            max_attempts: 5,
        };
        upload(&mut c, &u, Arc::new(move |n| bar.set_position(n))).await?;
        up_bar.finish_and_clear();
        let mut stream = c.tune(req).await.map_err(rpc)?.into_inner();
        let pb = super::progress_bar(a.steps as u64, "tuning");
        if a.json {
            pb.set_draw_target(indicatif::ProgressDrawTarget::hidden());
        }
        let mut job = String::new();
        let mut last = None;
        let started = std::time::Instant::now();
        while let Some(p) = stream.message().await.map_err(rpc)? {
            if job.is_empty() {
                job = p.job_id.clone();
                if !a.json {
                    pb.println(format!("{device}: job {job}"));
                }
            }
            if a.json {
                println!(
                    "{}",
                    serde_json::json!({
                        "job_id": p.job_id, "step": p.step, "total_steps": p.total_steps,
                        "loss": p.loss, "tokens_per_second": p.tokens_per_second,
                        "memory_bytes": p.memory_bytes, "checkpoint_step": p.checkpoint_step,
                        "window": [p.window_start, p.window_end], "done": p.done,
                    })
                );
            } else {
                pb.set_length(p.total_steps as u64);
                pb.set_position(p.step as u64);
                if !p.done {
                    pb.set_message(format!(
                        "tuning layers {}..={} loss {:.4} {:.0} tok/s",
                        p.window_start, p.window_end, p.loss, p.tokens_per_second
                    ));
                }
            }
            if p.done {
                last = Some(p);
                break;
            }
            last = Some(p);
        }
        pb.finish_and_clear();
        let Some(fin) = last.filter(|p| p.done) else {
            anyhow::bail!("{device}: the progress stream ended before the job finished (job {job}; --resume follows it again)");
        };
        let exported = match &a.output {
            Some(dir) => {
                let files = receive(&mut c, &device, &job).await?;
                Some(write_dir(dir, &files, a.force)?)
            }
            None => None,
        };
        if a.json {
            println!(
                "{}",
                serde_json::json!({
                    "device": device, "job_id": job, "dataset_sha256": sha,
                    "steps": fin.step, "seconds": started.elapsed().as_secs_f64(),
                    "output": a.output, "files": exported,
                })
            );
        } else {
            eprintln!(
                "{device}: job {job} finished ({} steps in {:.1} s)",
                fin.step,
                started.elapsed().as_secs_f64()
            );
            if let Some(dir) = &a.output {
                eprintln!("adapters: {}", dir.display());
            }
        }
        Ok(())
    })
}
