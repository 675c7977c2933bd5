//! `edgec deploy`: upload a bundle to devices in parallel (a progress bar each, resumable,
//! devices that hold it already skipped), then activate it everywhere once every device
//! has verified every byte.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use edge_proto::runtime::{ActivateRequest, UploadKind};
use edgec::client::deploy::{Upload, UploadOutcome, file_sha256, upload};
use edgec::client::{self, DeviceOptions};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

/// How to reach devices (shared by the device commands).
#[derive(Args, Clone)]
pub struct DeviceArgs {
    /// Device URL, e.g. http://10.0.0.7:50051 (https:// for TLS); repeat for several.
    #[arg(long = "device", value_name = "URL")]
    pub devices: Vec<String>,
    /// File listing device URLs, one per line (`#` comments allowed).
    #[arg(long = "devices", value_name = "FILE")]
    pub devices_file: Option<PathBuf>,
    /// File holding the devices' bearer token.
    #[arg(long)]
    pub token_file: PathBuf,
    /// CA certificate (PEM) that signed the devices' TLS certificates.
    #[arg(long)]
    pub ca_cert: Option<PathBuf>,
    /// Largest gRPC message sent or received (bytes).
    #[arg(long, default_value_t = 4 << 20)]
    pub max_message_bytes: usize,
}

impl DeviceArgs {
    pub fn urls(&self) -> anyhow::Result<Vec<String>> {
        let mut urls = self.devices.clone();
        if let Some(f) = &self.devices_file {
            urls.extend(client::read_device_list(f)?);
        }
        anyhow::ensure!(
            !urls.is_empty(),
            "no device given: use --device URL or --devices FILE"
        );
        let mut seen = std::collections::HashSet::new();
        urls.retain(|u| seen.insert(u.clone()));
        Ok(urls)
    }

    pub fn options(&self) -> anyhow::Result<DeviceOptions> {
        let ca_cert = match &self.ca_cert {
            Some(p) => Some(std::fs::read(p).with_context(|| format!("reading {}", p.display()))?),
            None => None,
        };
        Ok(DeviceOptions {
            token: client::read_token(&self.token_file)?,
            ca_cert,
            max_message_bytes: self.max_message_bytes,
        })
    }
}

/// A runtime for the device commands' async client.
pub fn tokio_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

#[derive(Args)]
pub struct DeployArgs {
    /// The bundle file (`edgec build`).
    #[arg(long)]
    bundle: PathBuf,
    #[command(flatten)]
    device: DeviceArgs,
    /// Upload and verify only; do not activate.
    #[arg(long)]
    no_activate: bool,
    /// Bytes of the bundle per message.
    #[arg(long, default_value_t = 1 << 20)]
    chunk_bytes: usize,
    /// Upload attempts per device before giving up (each resumes where the last stopped).
    #[arg(long, default_value_t = 5)]
    attempts: u32,
    /// Print one JSON object with each device's outcome.
    #[arg(long)]
    json: bool,
}

#[derive(serde::Serialize)]
struct DeviceReport {
    device: String,
    #[serde(flatten)]
    upload: Option<UploadOutcome>,
    activated: bool,
    error: Option<String>,
}

pub fn run(a: DeployArgs) -> anyhow::Result<()> {
    let urls = a.device.urls()?;
    let opts = a.device.options()?;
    anyhow::ensure!(
        a.chunk_bytes >= 1 && a.chunk_bytes + 1024 <= opts.max_message_bytes,
        "--chunk-bytes must be between 1 and --max-message-bytes minus 1 KiB"
    );
    let (sha, size) = file_sha256(&a.bundle)?;
    let rt = tokio_runtime()?;
    let bars = MultiProgress::new();
    if a.json {
        bars.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let style =
        ProgressStyle::with_template("{prefix:30!} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {msg}")
            .expect("progress template")
            .progress_chars("=> ");
    let mut reports: Vec<DeviceReport> = rt.block_on(async {
        let tasks: Vec<_> = urls
            .iter()
            .map(|url| {
                let bar = bars.add(
                    ProgressBar::new(size)
                        .with_style(style.clone())
                        .with_prefix(url.clone()),
                );
                let (url, opts, path, sha) = (url.clone(), opts.clone(), a.bundle.clone(), sha.clone());
                let (chunk_bytes, attempts) = (a.chunk_bytes, a.attempts);
                tokio::spawn(async move {
                    let b = bar.clone();
                    let progress: Arc<dyn Fn(u64) + Send + Sync> = Arc::new(move |n| b.set_position(n));
                    let result = async {
                        let mut c = client::connect(&url, &opts).await?;
                        let u = Upload {
                            device: &url,
                            kind: UploadKind::Bundle,
                            path: &path,
                            sha256: &sha,
                            size,
                            chunk_bytes,
                            max_attempts: attempts,
                        };
                        upload(&mut c, &u, progress).await
                    }
                    .await;
                    match &result {
                        Ok(o) if o.skipped => bar.finish_with_message("already installed"),
                        Ok(_) => bar.finish_with_message("verified"),
                        Err(e) => bar.abandon_with_message(format!("failed: {e}")),
                    }
                    (url, result)
                })
            })
            .collect();
        let mut out = vec![];
        for t in tasks {
            let (device, result) = t.await.expect("upload task");
            let (upload, error) = match result {
                Ok(o) => (Some(o), None),
                Err(e) => (None, Some(e.to_string())),
            };
            out.push(DeviceReport {
                device,
                upload,
                activated: false,
                error,
            });
        }
        out
    });
    let all_verified = reports.iter().all(|r| r.error.is_none());
    if all_verified && !a.no_activate {
        rt.block_on(async {
            for r in reports.iter_mut() {
                let result = async {
                    let mut c = client::connect(&r.device, &opts).await?;
                    c.activate(ActivateRequest { sha256: sha.clone() })
                        .await
                        .map_err(|s| client::ClientError::rpc(&r.device, s))
                }
                .await;
                match result {
                    Ok(_) => r.activated = true,
                    Err(e) => r.error = Some(format!("activation: {e}")),
                }
            }
        });
    }
    let failed = reports.iter().filter(|r| r.error.is_some()).count();
    if a.json {
        let v = serde_json::json!({ "bundle": a.bundle, "sha256": sha, "size": size, "devices": reports });
        println!("{v}");
    } else {
        for r in &reports {
            match (&r.upload, &r.error) {
                (_, Some(e)) => eprintln!("{}: FAILED: {e}", r.device),
                (Some(u), None) => println!(
                    "{}: {}{}",
                    r.device,
                    if u.skipped {
                        "already held the bundle".to_string()
                    } else if u.resumed_from > 0 {
                        format!("uploaded (resumed at byte {})", u.resumed_from)
                    } else {
                        "uploaded".to_string()
                    },
                    if r.activated { ", active" } else { "" }
                ),
                (None, None) => {}
            }
        }
        if !all_verified && !a.no_activate {
            eprintln!("not activated anywhere: not every device verified the bundle");
        }
    }
    anyhow::ensure!(failed == 0, "{failed} of {} devices failed", reports.len());
    Ok(())
}
