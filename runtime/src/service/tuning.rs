//! `Tune`, `CancelTune` and `ExportAdapters`: on-device tuning jobs ([`crate::train::job`])
//! in the data directory's `jobs/<job id>/`, one at a time, on a blocking thread.
//!
//! A job's id is a hash of the bundle and the settings, so the same request after a crash
//! or restart (with `resume`) finds the job directory and continues from its last
//! checkpoint; a finished job's adapters are exported in PEFT's layout.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use edge_proto::runtime as pb;
use sha2::{Digest, Sha256};
use tonic::Status;

use super::model::Model;
use super::store::hex;
use crate::train::job::{JobEnd, JobSpec, run_job_with_kernels};
use crate::train::lora::Module;
use crate::train::tune::{TuneConfig, TuneMode};

/// Running jobs and their cancel flags.
#[derive(Default)]
pub struct Jobs {
    running: Mutex<HashMap<String, Arc<AtomicBool>>>,
}

/// Bytes of a chunk of an exported file.
const EXPORT_CHUNK: usize = 1 << 20;

fn default_stride(layers: usize) -> usize {
    [6, 5, 4, 8, 3, 2, 1]
        .into_iter()
        .find(|s| layers.is_multiple_of(*s))
        .unwrap_or(1)
}

/// The job settings of a request on `model`.
pub fn job_spec(req: &pb::TuneRequest, model: &Model) -> Result<JobSpec, Status> {
    let layers = model.bundle.graph().config.num_layers;
    let stride = if req.stride == 0 {
        default_stride(layers)
    } else {
        req.stride as usize
    };
    let mode = match req.mode.as_str() {
        "" | "edge" => TuneMode::Edge { stride },
        "full" => TuneMode::Full,
        "last-k" => TuneMode::LastK { k: stride },
        m => {
            return Err(Status::invalid_argument(format!(
                "unknown tuning mode `{m}` (edge, full, last-k)"
            )));
        }
    };
    let bad = |m: String| Err(Status::invalid_argument(m));
    if req.steps == 0 {
        return bad("steps must be at least 1".into());
    }
    if req.lora_rank == 0 {
        return bad("lora_rank must be at least 1".into());
    }
    let seq = if req.seq_len == 0 {
        256
    } else {
        req.seq_len as usize
    };
    if seq < 2 || seq > model.max_positions() {
        return bad(format!("seq_len {seq} is outside 2..={}", model.max_positions()));
    }
    let targets: Vec<String> = if req.targets.is_empty() {
        Module::ALL.iter().map(|m| m.peft_name().to_string()).collect()
    } else {
        req.targets.split(',').map(|t| t.trim().to_string()).collect()
    };
    Ok(JobSpec {
        tune: TuneConfig {
            mode,
            exits: None,
            steps: req.steps as usize,
            seq,
            batch: req.batch_size.max(1) as usize,
            grad_accum: 1,
            lr: if req.learning_rate > 0.0 {
                req.learning_rate
            } else {
                4e-4
            },
            weight_decay: 0.01,
            warmup: 0,
            min_lr_ratio: 0.1,
            clip: 1.0,
            seed: req.seed,
            cache_prefix: true,
            checkpoint_every: if req.checkpoint_every == 0 {
                20
            } else {
                req.checkpoint_every as usize
            },
            max_samples: None,
            // The bundle's plan (`edgec build --train`) decided keep vs recompute for the
            // device's budget; the request has no field to override it.
            recompute: model.bundle.recompute().is_some_and(|d| d.recompute),
            exit_lr: Some(0.1),
        },
        rank: req.lora_rank as usize,
        alpha: if req.lora_alpha > 0.0 {
            req.lora_alpha
        } else {
            2.0 * req.lora_rank as f32
        },
        targets,
        train_exit_norms: matches!(mode, TuneMode::Edge { .. }),
        dataset: req.dataset_sha256.clone(),
    })
}

/// The id of a job: the bundle and the settings.
pub fn job_id(bundle_sha: &str, spec: &JobSpec) -> String {
    let mut h = Sha256::new();
    h.update(bundle_sha.as_bytes());
    h.update(serde_json::to_vec(spec).expect("json"));
    hex(&h.finalize()[..8])
}

impl Jobs {
    /// Starts (or resumes) a job on a blocking thread; progress and the end go to `tx`.
    pub fn start(
        self: &Arc<Self>,
        model: Arc<Model>,
        spec: JobSpec,
        text: String,
        dir: PathBuf,
        id: String,
        tx: tokio::sync::mpsc::Sender<Result<pb::TuneProgress, Status>>,
    ) -> Result<(), Status> {
        let cancel = Arc::new(AtomicBool::new(false));
        {
            let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(other) = running.keys().next() {
                return Err(Status::resource_exhausted(format!(
                    "tuning job {other} is running; one job at a time (CancelTune it or wait)"
                )));
            }
            running.insert(id.clone(), cancel.clone());
        }
        if let Err(e) = super::tuned::mark_bundle(&dir, &model.sha256) {
            self.running.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
            return Err(e);
        }
        let jobs = self.clone();
        tokio::task::spawn_blocking(move || {
            // The final progress message waits until the job's voting weights are fitted,
            // so a client that sees `done` can use every voting mode at once.
            let mut done_msg = None;
            let result = (|| -> Result<JobEnd, Status> {
                let tok = model
                    .tokenizer
                    .as_ref()
                    .ok_or_else(|| Status::failed_precondition("the active bundle has no tokenizer"))?;
                let tokens = tok
                    .encode(&text)
                    .map_err(|e| Status::invalid_argument(e.to_string()))?;
                let g = model.bundle.graph();
                // The bundle's JIT kernels run the frozen compressed weights, as in inference.
                let kernels = model.executor.kernels().cloned();
                let end = run_job_with_kernels(g, kernels, &spec, tokens.clone(), &dir, &cancel, |p| {
                    let msg = pb::TuneProgress {
                        job_id: id.clone(),
                        step: p.step as u32,
                        total_steps: p.total_steps as u32,
                        loss: p.loss as f32,
                        tokens_per_second: p.tokens_per_second,
                        memory_bytes: p.memory_bytes,
                        checkpoint_step: p.checkpoint_step as u32,
                        window_start: p.window.0 as u32,
                        window_end: p.window.1 as u32,
                        done: p.done,
                    };
                    if p.done {
                        done_msg = Some(msg);
                    } else {
                        // A client gone away does not stop the job (it stays resumable).
                        let _ = tx.blocking_send(Ok(msg));
                    }
                })
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
                if let JobEnd::Finished { adapters } = &end
                    && let Err(e) = super::tuned::fit_voting(&model, adapters, &tokens, spec.tune.seq)
                {
                    tracing::warn!("job {id}: fitting the voting weights failed: {e}");
                }
                Ok(end)
            })();
            let last = match result {
                Ok(JobEnd::Cancelled { at_step }) => Some(Err(Status::cancelled(format!(
                    "tuning job {id} cancelled at step {at_step} (checkpointed; Tune with resume continues it)"
                )))),
                Ok(JobEnd::Finished { .. }) => done_msg.map(Ok),
                Err(s) => Some(Err(s)),
            };
            // The job is over before its last message goes out, so a client that reads it
            // can start the next job at once.
            jobs.running.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
            if let Some(m) = last {
                let _ = tx.blocking_send(m);
            }
        });
        Ok(())
    }

    /// What Status reports: `idle`, or `running <job id>`.
    pub fn state(&self) -> String {
        let running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        running
            .keys()
            .next()
            .map_or_else(|| "idle".to_string(), |id| format!("running {id}"))
    }

    /// Sets the cancel flag of `id` (or of the running job when `id` is empty).
    pub fn cancel(&self, id: &str) -> bool {
        let running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        let flag = if id.is_empty() {
            running.values().next()
        } else {
            running.get(id)
        };
        flag.map(|f| f.store(true, Ordering::Relaxed)).is_some()
    }
}

/// The adapters directory of job `id` (empty: the most recently finished job).
pub fn adapters_dir(jobs_root: &Path, id: &str) -> Result<PathBuf, Status> {
    if !id.is_empty() {
        if !id.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(Status::invalid_argument(format!("bad job id `{id}`")));
        }
        let d = jobs_root.join(id).join("adapters");
        return if d.is_dir() {
            Ok(d)
        } else {
            Err(Status::not_found(format!("job {id} has no finished adapters")))
        };
    }
    let mut best: Option<(std::time::SystemTime, PathBuf)> = None;
    for e in std::fs::read_dir(jobs_root).into_iter().flatten().flatten() {
        let d = e.path().join("adapters");
        if let Ok(t) = std::fs::metadata(&d).and_then(|m| m.modified())
            && best.as_ref().is_none_or(|b| t > b.0)
        {
            best = Some((t, d));
        }
    }
    best.map(|b| b.1)
        .ok_or_else(|| Status::not_found("no tuning job has finished on this device"))
}

/// The files of an adapters directory as chunks (PEFT's layout; each file's last chunk
/// carries its SHA-256).
pub fn export_chunks(dir: &Path) -> Result<Vec<pb::FileChunk>, Status> {
    let mut out = vec![];
    for name in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "exit_heads.safetensors",
        "voting.json",
    ] {
        let p = dir.join(name);
        let Ok(bytes) = std::fs::read(&p) else { continue };
        let sha = hex(&Sha256::digest(&bytes));
        let n = bytes.len().div_ceil(EXPORT_CHUNK).max(1);
        for i in 0..n {
            let (a, b) = (i * EXPORT_CHUNK, ((i + 1) * EXPORT_CHUNK).min(bytes.len()));
            out.push(pb::FileChunk {
                path: name.to_string(),
                offset: a as u64,
                data: bytes[a..b].to_vec(),
                total_size: bytes.len() as u64,
                last: i + 1 == n,
                sha256: if i + 1 == n { sha.clone() } else { String::new() },
            });
        }
    }
    Ok(out)
}
