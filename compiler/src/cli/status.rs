//! `edgec status`: what each device runs (active bundle, memory, streams, uptime).

use clap::Args;
use edge_proto::runtime::{ListBundlesRequest, StatusRequest};
use edgec::client;

use super::deploy::{DeviceArgs, tokio_runtime};

#[derive(Args)]
pub struct StatusArgs {
    #[command(flatten)]
    device: DeviceArgs,
    /// Print JSON (one object with a `devices` array).
    #[arg(long)]
    json: bool,
}

pub fn run(a: StatusArgs) -> anyhow::Result<()> {
    let urls = a.device.urls()?;
    let opts = a.device.options()?;
    let rt = tokio_runtime()?;
    let results = rt.block_on(async {
        let tasks: Vec<_> = urls
            .iter()
            .map(|url| {
                let (url, opts) = (url.clone(), opts.clone());
                tokio::spawn(async move {
                    let r = async {
                        let mut c = client::connect(&url, &opts).await?;
                        let s = c
                            .status(StatusRequest {})
                            .await
                            .map_err(|s| client::ClientError::rpc(&url, s))?
                            .into_inner();
                        let b = c
                            .list_bundles(ListBundlesRequest {})
                            .await
                            .map_err(|s| client::ClientError::rpc(&url, s))?
                            .into_inner();
                        Ok::<_, client::ClientError>((s, b))
                    }
                    .await;
                    (url, r)
                })
            })
            .collect();
        let mut out = vec![];
        for t in tasks {
            out.push(t.await.expect("status task"));
        }
        out
    });
    let mut failed = 0;
    let mut json = vec![];
    for (url, r) in results {
        match r {
            Ok((s, b)) => {
                if a.json {
                    json.push(serde_json::json!({
                        "device": url,
                        "runtime_version": s.runtime_version,
                        "target": s.target,
                        "threads": s.threads,
                        "active_bundle": s.active_bundle,
                        "active_sha256": s.active_sha256,
                        "uptime_seconds": s.uptime_seconds,
                        "memory_bytes": s.memory_bytes,
                        "memory_budget_bytes": s.memory_budget_bytes,
                        "tune_state": s.tune_state,
                        "active_streams": s.active_streams,
                        "max_streams": s.max_streams,
                        "bundles": b.bundles.iter().map(|x| serde_json::json!({
                            "sha256": x.sha256, "name": x.name, "size": x.size, "target": x.target,
                            "active": x.active, "exits": x.exits, "signer": x.signer,
                        })).collect::<Vec<_>>(),
                        "previous": b.previous,
                    }));
                } else {
                    println!("{url}");
                    println!(
                        "  runtime   edge-runtime {} on {} ({} threads)",
                        s.runtime_version, s.target, s.threads
                    );
                    let active = if s.active_sha256.is_empty() {
                        "none".to_string()
                    } else {
                        format!(
                            "{} ({})",
                            s.active_bundle,
                            &s.active_sha256[..12.min(s.active_sha256.len())]
                        )
                    };
                    println!("  active    {active}");
                    println!(
                        "  bundles   {} installed, {} to roll back to",
                        s.bundles,
                        b.previous.len()
                    );
                    println!(
                        "  memory    {:.1} MiB{}",
                        s.memory_bytes as f64 / (1 << 20) as f64,
                        if s.memory_budget_bytes > 0 {
                            format!(" of {:.1} MiB", s.memory_budget_bytes as f64 / (1 << 20) as f64)
                        } else {
                            String::new()
                        }
                    );
                    println!("  streams   {} of {}", s.active_streams, s.max_streams);
                    println!("  tuning    {}", s.tune_state);
                    println!("  uptime    {} s", s.uptime_seconds);
                }
            }
            Err(e) => {
                failed += 1;
                if a.json {
                    json.push(serde_json::json!({ "device": url, "error": e.to_string() }));
                } else {
                    eprintln!("{url}: FAILED: {e}");
                }
            }
        }
    }
    if a.json {
        println!("{}", serde_json::json!({ "devices": json }));
    }
    anyhow::ensure!(failed == 0, "{failed} device(s) did not answer");
    Ok(())
}
