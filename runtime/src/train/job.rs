//! A tuning job on the device: the tuning loop of [`super::tune`] bound to a job
//! directory (its settings, checkpoints and finished adapters), cancellable, resumable
//! after a crash from its last checkpoint, reporting progress through a callback. The
//! gRPC service runs one on a blocking thread per `Tune` call.
//!
//! Layout of a job directory:
//! - `job.json` — the settings (written first, atomically);
//! - `checkpoints/` — see [`super::tune::Tuner::checkpoint`];
//! - `adapters/` — the result in PEFT's layout, present only once the job finished
//!   (written to `adapters.tmp/` and renamed).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use serde::{Deserialize, Serialize};

use super::lora::{LoraConfig, Module, Params, write_atomic};
use super::tune::{TuneConfig, Tuner, exit_layers, rss_bytes};
use crate::error::{Result, RuntimeError};
use crate::ir::Graph;

/// Everything that defines a job (a resumed job must have the same).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobSpec {
    pub tune: TuneConfig,
    pub rank: usize,
    pub alpha: f32,
    pub targets: Vec<String>,
    pub train_exit_norms: bool,
    /// The dataset's SHA-256 (content address on the device).
    pub dataset: String,
}

impl JobSpec {
    fn lora(&self) -> Result<LoraConfig> {
        let targets = self
            .targets
            .iter()
            .map(|t| t.parse::<Module>())
            .collect::<Result<Vec<_>>>()?;
        let l = LoraConfig {
            rank: self.rank,
            alpha: self.alpha,
            targets,
        };
        l.validate()?;
        Ok(l)
    }
}

/// One progress report.
#[derive(Debug, Clone, Default, Serialize)]
pub struct JobProgress {
    pub step: usize,
    pub total_steps: usize,
    pub loss: f64,
    pub tokens_per_second: f64,
    pub memory_bytes: u64,
    pub checkpoint_step: usize,
    pub window: (usize, usize),
    pub done: bool,
}

/// How a job ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobEnd {
    Finished { adapters: PathBuf },
    Cancelled { at_step: usize },
}

/// Runs (or resumes) the job in `dir` on `tokens` until it finishes or `cancel` is set
/// (checked between steps; a checkpoint is written before returning). `progress` is
/// called after every step.
pub fn run_job(
    graph: &Graph,
    spec: &JobSpec,
    tokens: Vec<u32>,
    dir: &Path,
    cancel: &AtomicBool,
    progress: impl FnMut(&JobProgress),
) -> Result<JobEnd> {
    run_job_with_kernels(graph, None, spec, tokens, dir, cancel, progress)
}

/// [`run_job`] with the compressed weights' products through JIT `kernels` (the bundle's).
pub fn run_job_with_kernels(
    graph: &Graph,
    kernels: Option<std::sync::Arc<crate::jit::KernelSet>>,
    spec: &JobSpec,
    tokens: Vec<u32>,
    dir: &Path,
    cancel: &AtomicBool,
    mut progress: impl FnMut(&JobProgress),
) -> Result<JobEnd> {
    std::fs::create_dir_all(dir)?;
    let spec_path = dir.join("job.json");
    if let Ok(old) = std::fs::read(&spec_path) {
        let old: JobSpec = serde_json::from_slice(&old)
            .map_err(|e| RuntimeError::Invalid(format!("{}: {e}", spec_path.display())))?;
        if &old != spec {
            return Err(RuntimeError::Invalid(format!(
                "{} holds a job with other settings; it cannot be resumed with these",
                dir.display()
            )));
        }
    } else {
        write_atomic(
            &spec_path,
            serde_json::to_string_pretty(spec).expect("json").as_bytes(),
        )?;
    }
    let layers = graph.config.num_layers;
    let exits = exit_layers(spec.tune.mode, spec.tune.exits.as_deref(), layers)?;
    let params = Params::new(
        graph,
        spec.lora()?,
        &exits,
        spec.train_exit_norms,
        false,
        spec.tune.seed,
    )?;
    let mut tuner = Tuner::new(graph, spec.tune.clone(), params, tokens)?.with_kernels(kernels);
    let ckdir = dir.join("checkpoints");
    let mut checkpoint_step = tuner.resume(&ckdir)?.unwrap_or(0);
    let every = if spec.tune.checkpoint_every == 0 {
        20
    } else {
        spec.tune.checkpoint_every
    };
    while !tuner.finished() {
        if cancel.load(Ordering::Relaxed) {
            tuner.checkpoint(&ckdir)?;
            return Ok(JobEnd::Cancelled { at_step: tuner.step });
        }
        let r = tuner.run_step()?;
        if tuner.step % every == 0 && !tuner.finished() {
            tuner.checkpoint(&ckdir)?;
            checkpoint_step = tuner.step;
        }
        progress(&JobProgress {
            step: r.step + 1,
            total_steps: r.total_steps,
            loss: r.loss,
            tokens_per_second: r.tokens as f64 / r.seconds.max(1e-9),
            memory_bytes: rss_bytes().0,
            checkpoint_step,
            window: r.window,
            done: false,
        });
    }
    tuner.checkpoint(&ckdir)?;
    let tmp = dir.join("adapters.tmp");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    tuner.params.save_peft(&tmp, "edge-runtime bundle")?;
    let fin = dir.join("adapters");
    if fin.exists() {
        std::fs::remove_dir_all(&fin)?;
    }
    std::fs::rename(&tmp, &fin)?;
    progress(&JobProgress {
        step: tuner.step,
        total_steps: tuner.total_steps(),
        checkpoint_step: tuner.step,
        done: true,
        memory_bytes: rss_bytes().0,
        ..Default::default()
    });
    Ok(JobEnd::Finished { adapters: fin })
}
