//! The tuned model of a request: a finished tuning job's adapters attached to the active
//! bundle's graph, with the job's exit heads and fitted voting weights
//! ([`crate::train::vote::Tuned`]), and how a step's outputs become next-token scores under
//! a voting mode.
//!
//! A request names the tuned state with `tune_job`: empty = the bundle as built, a job id
//! (`jobs/<id>/adapters`), or `latest` (the most recently finished job of the active
//! bundle). A job records the bundle it tuned (`jobs/<id>/bundle`); its adapters apply only
//! to that bundle. Loaded models are cached on the [`Model`] (so they go when it does).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use edge_proto::runtime as pb;
use tonic::Status;

use super::model::Model;
use crate::exec::{Executor, StepOutput};
use crate::ir::ValueId;
use crate::train::lora::write_atomic;
use crate::train::vote::{Exits, Tuned, Vote, combine, evaluate_exits, fit_weights, probabilities};

/// File in a job directory naming the bundle (SHA-256) the job tuned.
const BUNDLE_MARK: &str = "bundle";

/// A finished job's model, ready to run.
pub struct TunedModel {
    pub job: String,
    pub executor: Executor,
    pub exits: Exits,
    /// Fitted weights of the `weighted` vote (empty when the job has none).
    pub weights: Vec<f32>,
    /// The adapters directory (its exits also serve as draft heads).
    pub dir: PathBuf,
    pub params: crate::train::lora::Params,
}

/// Records that the job in `dir` tunes bundle `sha`.
pub fn mark_bundle(dir: &Path, sha: &str) -> Result<(), Status> {
    std::fs::create_dir_all(dir)
        .and_then(|_| write_atomic(&dir.join(BUNDLE_MARK), sha.as_bytes()).map_err(std::io::Error::other))
        .map_err(|e| Status::internal(format!("writing {}: {e}", dir.display())))
}

fn bundle_of(job_dir: &Path) -> Option<String> {
    std::fs::read_to_string(job_dir.join(BUNDLE_MARK))
        .ok()
        .map(|s| s.trim().to_string())
}

/// The job directory a request's `tune_job` names, checked against the active bundle.
fn job_dir(jobs_root: &Path, model: &Model, name: &str) -> Result<(String, PathBuf), Status> {
    if name == "latest" {
        let mut best: Option<(std::time::SystemTime, String, PathBuf)> = None;
        for e in std::fs::read_dir(jobs_root).into_iter().flatten().flatten() {
            let d = e.path();
            if bundle_of(&d).as_deref() != Some(&model.sha256) {
                continue;
            }
            if let Ok(t) = std::fs::metadata(d.join("adapters")).and_then(|m| m.modified())
                && best.as_ref().is_none_or(|b| t > b.0)
            {
                best = Some((t, e.file_name().to_string_lossy().into_owned(), d));
            }
        }
        return best.map(|b| (b.1, b.2)).ok_or_else(|| {
            Status::failed_precondition("no tuning job of the active bundle has finished on this device")
        });
    }
    if name.is_empty() || name.len() > 64 || !name.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(Status::invalid_argument(format!(
            "bad tune_job `{name}` (a job id from TuneProgress, or `latest`)"
        )));
    }
    let d = jobs_root.join(name);
    if !d.join("adapters").is_dir() {
        return Err(Status::not_found(format!(
            "job {name} has no finished adapters on this device"
        )));
    }
    match bundle_of(&d) {
        Some(b) if b == model.sha256 => Ok((name.to_string(), d)),
        Some(b) => Err(Status::failed_precondition(format!(
            "job {name} tuned bundle {b}, but the active bundle is {}",
            model.sha256
        ))),
        None => Err(Status::failed_precondition(format!(
            "job {name} does not record which bundle it tuned"
        ))),
    }
}

/// The tuned model `name` of the active `model` (loaded once, then cached).
pub fn load(jobs_root: &Path, model: &Model, name: &str) -> Result<Arc<TunedModel>, Status> {
    let (id, dir) = job_dir(jobs_root, model, name)?;
    if let Some(t) = model.tuned.lock().unwrap_or_else(|e| e.into_inner()).get(&id) {
        return Ok(t.clone());
    }
    let adapters = dir.join("adapters");
    let bad = |e: crate::RuntimeError| Status::failed_precondition(format!("job {id}'s adapters: {e}"));
    let Tuned { graph, params, exits } = Tuned::load(model.bundle.graph(), &adapters).map_err(bad)?;
    let weights = match Vote::load("weighted", &adapters) {
        Ok(Vote::Weighted(w)) => w,
        _ => vec![],
    };
    let executor = Executor::new(Arc::new(graph)).map_err(bad)?;
    let t = Arc::new(TunedModel {
        job: id.clone(),
        executor,
        exits,
        weights,
        dir: adapters,
        params,
    });
    model
        .tuned
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(id, t.clone());
    Ok(t)
}

/// Fits the `weighted` vote of a finished job on (at most four `ctx`-token chunks of) its
/// training text and writes `voting.json` beside the adapters, as `edgec tune --valid` does.
/// A text shorter than one chunk gets equal weights.
pub fn fit_voting(model: &Model, adapters: &Path, tokens: &[u32], ctx: usize) -> crate::Result<()> {
    let t = Tuned::load(model.bundle.graph(), adapters)?;
    let n = t.exits.heads.len();
    let exec = Executor::new(Arc::new(t.graph))?;
    let cfg = &model.bundle.graph().config;
    let bos = cfg.add_bos_token.then_some(cfg.bos_token_id).flatten();
    let ctx = ctx.clamp(4, cfg.max_position_embeddings);
    let (weights, fitted) = match evaluate_exits(&exec, &t.exits, &[], tokens, ctx, Some(4), bos, |_, _| {}) {
        Ok(e) => (fit_weights(&e.p_target, 100), e.p_target.len()),
        Err(_) => (vec![1.0 / n as f32; n], 0),
    };
    let j = serde_json::json!({
        "exits": t.exits.layers(),
        "weights": weights,
        "fitted_on_tokens": fitted,
    });
    write_atomic(
        &adapters.join("voting.json"),
        serde_json::to_string_pretty(&j).expect("json").as_bytes(),
    )
}

/// How a request turns a step's outputs into next-token scores.
#[derive(Clone)]
pub enum Scorer {
    /// The bundle's own logits.
    Base,
    /// The tuned model's exits combined by `vote` (scores are log probabilities, which the
    /// sampler and argmax treat like logits).
    Tuned { model: Arc<TunedModel>, vote: Vote },
}

impl Scorer {
    /// The exits a vote reads (`last` needs only the final one).
    fn used(&self) -> Vec<usize> {
        match self {
            Scorer::Base => vec![],
            Scorer::Tuned { model, vote } => {
                let n = model.exits.heads.len();
                if *vote == Vote::Last {
                    vec![n - 1]
                } else {
                    (0..n).collect()
                }
            }
        }
    }

    /// The values a forward pass must tap for [`Scorer::scores`].
    pub fn taps(&self) -> Vec<ValueId> {
        match self {
            Scorer::Base => vec![],
            Scorer::Tuned { model, .. } => {
                let all = model.exits.taps();
                self.used().into_iter().map(|i| all[i]).collect()
            }
        }
    }

    /// One score vector per output row of `out` (in row order); `out` must come from a
    /// forward pass that tapped [`Scorer::taps`].
    pub fn scores(&self, out: &StepOutput) -> crate::Result<Vec<Vec<f32>>> {
        let rows = out.rows.len();
        match self {
            Scorer::Base => {
                let vocab = out.logits.len() / rows.max(1);
                Ok(out.logits.chunks_exact(vocab).map(<[f32]>::to_vec).collect())
            }
            Scorer::Tuned { model, vote } => {
                let exits = &model.exits;
                // Taps hold every row of the step; the output rows are its last `rows`.
                let logits: Vec<Vec<f32>> = self
                    .used()
                    .into_iter()
                    .zip(&out.taps)
                    .map(|(i, h)| {
                        let d = exits.heads[i].1.numel();
                        exits.logits(i, &h[h.len() - rows * d..])
                    })
                    .collect();
                let vocab = logits[0].len() / rows;
                (0..rows)
                    .map(|r| {
                        let probs: Vec<Vec<f32>> = logits
                            .iter()
                            .map(|l| probabilities(&l[r * vocab..(r + 1) * vocab]))
                            .collect();
                        Ok(combine(vote, &probs)?
                            .into_iter()
                            .map(|p| p.max(1e-30).ln())
                            .collect())
                    })
                    .collect()
            }
        }
    }

    pub fn job(&self) -> String {
        match self {
            Scorer::Base => String::new(),
            Scorer::Tuned { model, .. } => model.job.clone(),
        }
    }
}

/// Evaluate on a tuned model: perplexity and accuracy per exit and per voting mode
/// (`weighted` when the job has fitted weights), with `vote`'s as the reply's main figures.
pub fn evaluate(
    t: &TunedModel,
    vote: &Vote,
    tokens: &[u32],
    ctx: usize,
    max_chunks: Option<usize>,
    bos: Option<u32>,
    reply: &mut pb::EvaluateReply,
) -> crate::Result<()> {
    let mut votes = vec![Vote::Last, Vote::MaxConfidence, Vote::Mean];
    if t.weights.len() == t.exits.heads.len() {
        votes.push(Vote::Weighted(t.weights.clone()));
    }
    let e = evaluate_exits(
        &t.executor,
        &t.exits,
        &votes,
        tokens,
        ctx,
        max_chunks,
        bos,
        |_, _| {},
    )?;
    reply.exits = e
        .exits
        .iter()
        .zip(t.exits.layers())
        .map(|(s, layer)| pb::ExitPerplexity {
            layer: layer as u32,
            perplexity: s.perplexity(),
            accuracy: s.accuracy(),
        })
        .collect();
    reply.votes = e
        .votes
        .iter()
        .map(|s| pb::VotePerplexity {
            mode: s.name.clone(),
            perplexity: s.perplexity(),
            accuracy: s.accuracy(),
        })
        .collect();
    let main = e
        .votes
        .iter()
        .find(|s| s.name == vote.name())
        .expect("the request's vote is evaluated");
    reply.loss = main.nll_sum / main.count.max(1) as f64;
    reply.perplexity = main.perplexity();
    reply.tokens_scored = main.count as u64;
    reply.chunks = (tokens.len() / ctx).min(max_chunks.unwrap_or(usize::MAX)) as u32;
    Ok(())
}
