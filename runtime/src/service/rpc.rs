//! The `edge.runtime.v1.EdgeRuntime` methods.

use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use edge_proto::runtime as pb;
use edge_proto::runtime::edge_runtime_server::EdgeRuntime;
use tokio::io::AsyncWriteExt;
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

use super::engine::Engine;
use super::generate::{Draft, GenParams, Generation, Speculative, parse_grpc_timeout};
use super::model::{BundleInfo, Model, trust_policy, verify_bundle};
use super::store::{BundleMeta, Kind, Store, check_sha};
use super::{Limits, ServeConfig, ServiceError, tuned, tuning, voting};
use crate::bundle::TrustPolicy;
use crate::sampling::Sampling;

/// How long a request waits for another request on the same file (an upload in progress).
const FILE_LOCK_WAIT: Duration = Duration::from_secs(30);

pub struct Runtime {
    store: Arc<Store>,
    trust: Arc<TrustPolicy>,
    limits: Limits,
    engine: Arc<Engine>,
    model: RwLock<Option<Arc<Model>>>,
    /// Serialises Activate / Rollback / Delete.
    activation: tokio::sync::Mutex<()>,
    started: Instant,
    memory_budget: u64,
    jobs: Arc<tuning::Jobs>,
}

type ReplyStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Runs blocking work (file system, hashing, model loading) off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ServiceError> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(format!("blocking task failed: {e}")))?
        .map_err(|e| e.status())
}

fn meta_to_pb(m: &BundleMeta, active: bool) -> pb::BundleInfo {
    pb::BundleInfo {
        sha256: m.sha256.clone(),
        size: m.size,
        name: m.name.clone(),
        target: m.target.clone(),
        exits: m.exits,
        active,
        installed_unix: m.installed_unix,
        signer: m.signer.clone(),
    }
}

/// A stream error from the client side of an upload: a message over the size limit becomes
/// RESOURCE_EXHAUSTED, anything else (a cut connection) keeps its status.
fn upload_stream_error(s: Status) -> Status {
    if s.code() == tonic::Code::OutOfRange {
        Status::resource_exhausted(s.message().to_string())
    } else {
        s
    }
}

/// A failed write of an upload: a full disk is the device's resource running out.
fn write_error(e: std::io::Error) -> Status {
    if e.kind() == std::io::ErrorKind::StorageFull {
        Status::resource_exhausted(format!("the device's disk is full: {e}"))
    } else {
        Status::internal(format!("writing the upload: {e}"))
    }
}

fn make_meta(sha: &str, size: u64, name: &str, info: &BundleInfo) -> BundleMeta {
    BundleMeta {
        sha256: sha.to_string(),
        size,
        name: if name.is_empty() {
            info.target.clone()
        } else {
            name.to_string()
        },
        target: info.target.clone(),
        exits: info.exits,
        installed_unix: unix_now(),
        signer: info.signer.clone(),
    }
}

impl Runtime {
    /// Opens the data directory, re-verifies any bundle whose metadata was lost in a crash,
    /// and loads the active bundle.
    pub fn open(cfg: &ServeConfig) -> Result<Runtime, ServiceError> {
        let store = Arc::new(Store::open(&cfg.data_dir)?);
        let trust = Arc::new(trust_policy(&cfg.trusted_key, cfg.allow_unsigned)?);
        for sha in store.list(Kind::Bundle)? {
            if store.read_meta(&sha).is_some() {
                continue;
            }
            let path = store.path(Kind::Bundle, &sha);
            match verify_bundle(&path, &trust) {
                Ok(info) => {
                    let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
                    store.write_meta(&make_meta(&sha, size, "", &info))?;
                }
                Err(e) => {
                    tracing::warn!("removing installed bundle {sha} that no longer verifies: {e}");
                    store.delete(Kind::Bundle, &sha)?;
                }
            }
        }
        let model = match store.active_state()?.active {
            Some(sha) => match Model::load(&store.path(Kind::Bundle, &sha), &sha, &trust) {
                Ok(m) => Some(m),
                Err(e) => {
                    tracing::error!("the active bundle {sha} does not load: {e}");
                    None
                }
            },
            None => None,
        };
        Ok(Runtime {
            store,
            trust,
            limits: cfg.limits.clone(),
            engine: Arc::new(Engine::new(cfg.workers, cfg.limits.max_streams)),
            model: RwLock::new(model),
            activation: tokio::sync::Mutex::new(()),
            started: Instant::now(),
            memory_budget: cfg.memory_budget,
            jobs: Arc::new(tuning::Jobs::default()),
        })
    }

    pub fn shutdown(&self) {
        self.engine.shutdown();
    }

    fn model(&self) -> Option<Arc<Model>> {
        self.model.read().expect("model lock poisoned").clone()
    }

    /// How a request with `voting` and `tune_job` scores tokens on `model`.
    async fn scorer(&self, model: &Arc<Model>, voting: i32, job: &str) -> Result<tuned::Scorer, Status> {
        let mode = pb::VotingMode::try_from(voting)
            .map_err(|_| Status::invalid_argument(format!("unknown voting mode {voting}")))?;
        if job.is_empty() {
            voting::check_mode(mode, 0, &[])?;
            return Ok(tuned::Scorer::Base);
        }
        let root = self.store.root().join("jobs");
        let (m, job) = (model.clone(), job.to_string());
        let t = tokio::task::spawn_blocking(move || tuned::load(&root, &m, &job))
            .await
            .map_err(|e| Status::internal(format!("blocking task failed: {e}")))??;
        let vote = voting::check_mode(mode, t.exits.heads.len(), &t.weights)?;
        Ok(tuned::Scorer::Tuned { model: t, vote })
    }

    fn active_model(&self) -> Result<Arc<Model>, Status> {
        self.model().ok_or_else(|| {
            Status::failed_precondition("no active bundle: upload one (UploadBundle) and Activate it")
        })
    }

    async fn lock_file(&self, kind: Kind, sha: &str) -> Result<tokio::sync::OwnedMutexGuard<()>, Status> {
        tokio::time::timeout(FILE_LOCK_WAIT, self.store.lock(kind, sha).lock_owned())
            .await
            .map_err(|_| Status::aborted(format!("another request on {sha} is still in progress; retry")))
    }

    /// The upload protocol shared by bundles and datasets.
    async fn upload(
        &self,
        kind: Kind,
        mut stream: Streaming<pb::UploadChunk>,
    ) -> Result<pb::UploadReply, Status> {
        let first = stream
            .message()
            .await
            .map_err(upload_stream_error)?
            .ok_or_else(|| Status::invalid_argument("empty upload: the first message names the file"))?;
        let sha = first.sha256.clone();
        let name = first.name.clone();
        check_sha(&sha)?;
        let total = first.total_size;
        if total == 0 {
            return Err(Status::invalid_argument(
                "total_size must be set in the first message",
            ));
        }
        if total > self.limits.max_upload_bytes {
            return Err(Status::resource_exhausted(format!(
                "the file has {total} bytes; this device accepts at most {}",
                self.limits.max_upload_bytes
            )));
        }
        let _guard = self.lock_file(kind, &sha).await?;
        let done = |bundle: Option<pb::BundleInfo>, already: bool| pb::UploadReply {
            sha256: sha.clone(),
            bytes_held: total,
            total_size: total,
            complete: true,
            already_installed: already,
            bundle,
        };
        if self.store.is_installed(kind, &sha) {
            let info = self.store.read_meta(&sha).map(|m| meta_to_pb(&m, false));
            return Ok(done(info, true));
        }
        if first.offset > total {
            return Err(Status::invalid_argument(format!(
                "offset {} is past the file's {total} bytes",
                first.offset
            )));
        }
        let store = self.store.clone();
        let (sha2, offset) = (sha.clone(), first.offset);
        let file = blocking(move || store.open_part(kind, &sha2, offset)).await?;
        let mut file = tokio::fs::File::from_std(file);
        let mut pos = first.offset;
        let mut chunk = Some(first);
        let result: Result<(), Status> = async {
            while let Some(c) = chunk.take() {
                if !c.sha256.is_empty() && c.sha256 != sha {
                    return Err(Status::invalid_argument("sha256 changed within one upload"));
                }
                if c.offset != pos {
                    return Err(Status::invalid_argument(format!(
                        "chunk at offset {} but the upload is at byte {pos}",
                        c.offset
                    )));
                }
                let end = pos + c.data.len() as u64;
                if end > total {
                    return Err(Status::invalid_argument(format!(
                        "chunk ends at byte {end}, past the file's {total} bytes"
                    )));
                }
                file.write_all(&c.data).await.map_err(write_error)?;
                pos = end;
                chunk = stream.message().await.map_err(upload_stream_error)?;
            }
            Ok(())
        }
        .await;
        // Whatever arrived stays, durable, for a resumed upload.
        file.flush().await.map_err(write_error)?;
        file.sync_all()
            .await
            .map_err(|e| Status::internal(format!("syncing the upload: {e}")))?;
        drop(file);
        result?;
        if pos < total {
            return Ok(pb::UploadReply {
                sha256: sha.clone(),
                bytes_held: pos,
                total_size: total,
                complete: false,
                already_installed: false,
                bundle: None,
            });
        }
        let store = self.store.clone();
        let trust = self.trust.clone();
        let sha2 = sha.clone();
        let info = blocking(move || match kind {
            Kind::Bundle => {
                let info = store.install(kind, &sha2, |p| verify_bundle(p, &trust))?;
                let meta = make_meta(&sha2, total, &name, &info);
                store.write_meta(&meta)?;
                Ok(Some(meta))
            }
            Kind::Dataset => store.install(kind, &sha2, |_| Ok(None)),
        })
        .await?;
        tracing::info!("installed {kind:?} {sha} ({total} bytes)");
        Ok(done(info.map(|m| meta_to_pb(&m, false)), false))
    }

    async fn switch_to(&self, sha: String, rollback: bool) -> Result<pb::ActivateReply, Status> {
        let _g = self.activation.lock().await;
        let store = self.store.clone();
        let target = if rollback {
            let state = store.active_state()?;
            state
                .previous
                .iter()
                .find(|p| store.is_installed(Kind::Bundle, p))
                .cloned()
                .ok_or_else(|| Status::failed_precondition("no previous bundle to roll back to"))?
        } else {
            check_sha(&sha)?;
            if !store.is_installed(Kind::Bundle, &sha) {
                return Err(Status::not_found(format!("bundle {sha} is not installed")));
            }
            sha
        };
        // Load first: a bundle that does not load never becomes active.
        let trust = self.trust.clone();
        let t = target.clone();
        let model = blocking(move || {
            let m = Model::load(&store.path(Kind::Bundle, &t), &t, &trust)?;
            let old = if rollback {
                store.rollback()?
            } else {
                store.activate(&t)?
            };
            Ok((m, old))
        })
        .await?;
        *self.model.write().expect("model lock poisoned") = Some(model.0);
        tracing::info!("active bundle: {target}");
        Ok(pb::ActivateReply {
            active: target,
            previous: model.1.active.unwrap_or_default(),
        })
    }
}

/// The self-speculative settings of a Generate request, checked.
fn speculative(
    model: &Model,
    scorer: &tuned::Scorer,
    r: &pb::GenerateRequest,
) -> Result<Option<Speculative>, Status> {
    if r.draft_tokens == 0 {
        if r.draft_layer.is_some() {
            return Err(Status::invalid_argument("draft_layer needs draft_tokens > 0"));
        }
        return Ok(None);
    }
    if r.draft_tokens > MAX_DRAFT {
        return Err(Status::invalid_argument(format!(
            "draft_tokens {} is above {MAX_DRAFT}",
            r.draft_tokens
        )));
    }
    if r.temperature != 0.0 {
        return Err(Status::invalid_argument(
            "self-speculative decoding (draft_tokens) is greedy only: set temperature 0",
        ));
    }
    let layers = model.bundle.graph().config.num_layers;
    let (graph, params) = match scorer {
        tuned::Scorer::Base => (model.bundle.graph(), None),
        tuned::Scorer::Tuned { model: t, .. } => (t.executor.graph(), Some(&t.params)),
    };
    let layer = match r.draft_layer {
        Some(l) => l as usize,
        None => {
            // The trained exit nearest half the depth, or half the depth.
            let half = layers / 2;
            params
                .map(|p| {
                    p.exits
                        .iter()
                        .map(|e| e.layer)
                        .filter(|&l| l + 1 < layers)
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default()
                .into_iter()
                .min_by_key(|&l| (l + 1).abs_diff(half))
                .unwrap_or(half.saturating_sub(1))
        }
    };
    let draft = Draft::new(graph, params, layer).map_err(|e| Status::invalid_argument(e.to_string()))?;
    Ok(Some(Speculative {
        k: r.draft_tokens as usize,
        draft,
    }))
}

/// Most tokens a speculative round may draft.
const MAX_DRAFT: u32 = 16;

#[tonic::async_trait]
impl EdgeRuntime for Runtime {
    async fn upload_bundle(
        &self,
        request: Request<Streaming<pb::UploadChunk>>,
    ) -> Result<Response<pb::UploadReply>, Status> {
        self.upload(Kind::Bundle, request.into_inner())
            .await
            .map(Response::new)
    }

    async fn query_upload(
        &self,
        request: Request<pb::QueryUploadRequest>,
    ) -> Result<Response<pb::QueryUploadReply>, Status> {
        let r = request.into_inner();
        check_sha(&r.sha256)?;
        let kind = match pb::UploadKind::try_from(r.kind) {
            Ok(pb::UploadKind::Dataset) => Kind::Dataset,
            Ok(_) => Kind::Bundle,
            Err(_) => {
                return Err(Status::invalid_argument(format!(
                    "unknown upload kind {}",
                    r.kind
                )));
            }
        };
        let _guard = self.lock_file(kind, &r.sha256).await?;
        let (held, installed) = self.store.bytes_held(kind, &r.sha256)?;
        Ok(Response::new(pb::QueryUploadReply {
            sha256: r.sha256,
            bytes_held: held,
            installed,
        }))
    }

    async fn list_bundles(
        &self,
        _request: Request<pb::ListBundlesRequest>,
    ) -> Result<Response<pb::ListBundlesReply>, Status> {
        let store = self.store.clone();
        blocking(move || {
            let state = store.active_state()?;
            let active = state.active.clone().unwrap_or_default();
            let bundles = store
                .list(Kind::Bundle)?
                .into_iter()
                .filter_map(|sha| store.read_meta(&sha))
                .map(|m| {
                    let is_active = m.sha256 == active;
                    meta_to_pb(&m, is_active)
                })
                .collect();
            Ok(pb::ListBundlesReply {
                bundles,
                active,
                previous: state.previous,
            })
        })
        .await
        .map(Response::new)
    }

    async fn activate(
        &self,
        request: Request<pb::ActivateRequest>,
    ) -> Result<Response<pb::ActivateReply>, Status> {
        self.switch_to(request.into_inner().sha256, false)
            .await
            .map(Response::new)
    }

    async fn rollback(
        &self,
        _request: Request<pb::RollbackRequest>,
    ) -> Result<Response<pb::ActivateReply>, Status> {
        self.switch_to(String::new(), true).await.map(Response::new)
    }

    async fn delete_bundle(
        &self,
        request: Request<pb::DeleteBundleRequest>,
    ) -> Result<Response<pb::DeleteBundleReply>, Status> {
        let sha = request.into_inner().sha256;
        check_sha(&sha)?;
        let _g = self.activation.lock().await;
        let _f = self.lock_file(Kind::Bundle, &sha).await?;
        let store = self.store.clone();
        blocking(move || {
            if store.is_active(&sha)? {
                return Err(ServiceError::Precondition(format!(
                    "bundle {sha} is active; activate another one before deleting it"
                )));
            }
            let deleted = store.delete(Kind::Bundle, &sha)?;
            store.forget(&sha)?;
            Ok(pb::DeleteBundleReply { deleted })
        })
        .await
        .map(Response::new)
    }

    async fn upload_dataset(
        &self,
        request: Request<Streaming<pb::UploadChunk>>,
    ) -> Result<Response<pb::UploadReply>, Status> {
        self.upload(Kind::Dataset, request.into_inner())
            .await
            .map(Response::new)
    }

    type TuneStream = ReplyStream<pb::TuneProgress>;

    async fn tune(&self, request: Request<pb::TuneRequest>) -> Result<Response<Self::TuneStream>, Status> {
        let req = request.into_inner();
        let model = self.active_model()?;
        check_sha(&req.dataset_sha256).map_err(|e| e.status())?;
        if !self.store.is_installed(Kind::Dataset, &req.dataset_sha256) {
            return Err(Status::not_found(format!(
                "dataset {} is not on this device",
                req.dataset_sha256
            )));
        }
        let spec = tuning::job_spec(&req, &model)?;
        let id = tuning::job_id(&model.sha256, &spec);
        let dir = self.store.root().join("jobs").join(&id);
        if dir.join("checkpoints/latest").exists() && !req.resume && !dir.join("adapters").exists() {
            return Err(Status::already_exists(format!(
                "job {id} has a checkpoint on this device: set resume to continue it"
            )));
        }
        let path = self.store.path(Kind::Dataset, &req.dataset_sha256);
        let text = blocking(move || {
            let bytes = std::fs::read(&path).map_err(|source| ServiceError::Io {
                what: format!("reading dataset {}", path.display()),
                source,
            })?;
            String::from_utf8(bytes).map_err(|e| {
                ServiceError::BadRequest(format!(
                    "the dataset is not UTF-8 text (byte {})",
                    e.utf8_error().valid_up_to()
                ))
            })
        })
        .await?;
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        self.jobs.start(model, spec, text, dir, id, tx)?;
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn cancel_tune(
        &self,
        request: Request<pb::CancelTuneRequest>,
    ) -> Result<Response<pb::CancelTuneReply>, Status> {
        let cancelled = self.jobs.cancel(&request.into_inner().job_id);
        Ok(Response::new(pb::CancelTuneReply { cancelled }))
    }

    type ExportAdaptersStream = ReplyStream<pb::FileChunk>;

    async fn export_adapters(
        &self,
        request: Request<pb::ExportAdaptersRequest>,
    ) -> Result<Response<Self::ExportAdaptersStream>, Status> {
        let id = request.into_inner().job_id;
        let root = self.store.root().join("jobs");
        let chunks = tokio::task::spawn_blocking(move || {
            tuning::adapters_dir(&root, &id).and_then(|d| tuning::export_chunks(&d))
        })
        .await
        .map_err(|e| Status::internal(format!("blocking task failed: {e}")))??;
        Ok(Response::new(Box::pin(tokio_stream::iter(
            chunks.into_iter().map(Ok),
        ))))
    }

    type GenerateStream = ReplyStream<pb::GenerateReply>;

    async fn generate(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        let deadline = request
            .metadata()
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_grpc_timeout)
            .map(|d| Instant::now() + d);
        let r = request.into_inner();
        let model = self.active_model()?;
        let scorer = self.scorer(&model, r.voting, &r.tune_job).await?;
        let speculative = speculative(&model, &scorer, &r)?;
        let limits = &self.limits;
        if !(r.temperature.is_finite() && r.temperature >= 0.0) {
            return Err(Status::invalid_argument(format!(
                "temperature must be >= 0, got {}",
                r.temperature
            )));
        }
        let top_p = if r.top_p == 0.0 { 1.0 } else { r.top_p };
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(Status::invalid_argument(format!(
                "top_p must be in (0, 1], got {}",
                r.top_p
            )));
        }
        let max_tokens = if r.max_tokens == 0 {
            limits.max_new_tokens.min(256)
        } else {
            r.max_tokens as usize
        };
        if max_tokens > limits.max_new_tokens {
            return Err(Status::invalid_argument(format!(
                "max_tokens {max_tokens} is above this device's limit of {}",
                limits.max_new_tokens
            )));
        }
        if r.stop.len() > 16 || r.stop.iter().any(|s| s.is_empty() || s.len() > 256) {
            return Err(Status::invalid_argument(
                "at most 16 stop strings, each 1 to 256 bytes",
            ));
        }
        let prompt = if !r.prompt_tokens.is_empty() {
            if !r.prompt.is_empty() {
                return Err(Status::invalid_argument(
                    "give either prompt or prompt_tokens, not both",
                ));
            }
            r.prompt_tokens
        } else {
            let Some(tok) = model.tokenizer.clone() else {
                return Err(Status::failed_precondition(
                    "the active bundle carries no tokenizer: send prompt_tokens instead of prompt",
                ));
            };
            // Every token holds at least one byte, so a longer text cannot fit.
            if r.prompt.len() > limits.max_prompt_tokens * 64 {
                return Err(Status::invalid_argument(format!(
                    "the prompt has {} bytes; the limit is {} tokens",
                    r.prompt.len(),
                    limits.max_prompt_tokens
                )));
            }
            let text = r.prompt;
            blocking(move || Ok(tok.encode(&text)?)).await?
        };
        if prompt.is_empty() {
            return Err(Status::invalid_argument("the prompt is empty"));
        }
        if prompt.len() > limits.max_prompt_tokens {
            return Err(Status::invalid_argument(format!(
                "the prompt has {} tokens; this device's limit is {}",
                prompt.len(),
                limits.max_prompt_tokens
            )));
        }
        let vocab = model.bundle.graph().config.vocab_size;
        if let Some(bad) = prompt.iter().find(|&&t| t as usize >= vocab) {
            return Err(Status::invalid_argument(format!(
                "token id {bad} is outside the vocabulary ({vocab})"
            )));
        }
        let positions = model.max_positions();
        if prompt.len() + max_tokens > positions {
            return Err(Status::invalid_argument(format!(
                "{} prompt tokens + max_tokens {max_tokens} exceed the model's {positions} positions",
                prompt.len()
            )));
        }
        let slot = self.engine.admit().ok_or_else(|| {
            Status::resource_exhausted(format!(
                "{} requests are running, the most this device takes; retry later",
                self.engine.max_in_flight()
            ))
        })?;
        let sampling = if r.temperature == 0.0 {
            Sampling::Greedy
        } else {
            Sampling::TopP {
                temperature: r.temperature,
                top_p,
            }
        };
        let params = GenParams {
            prompt,
            max_tokens,
            sampling,
            seed: r.seed,
            stop: r.stop,
            ignore_eos: r.ignore_eos,
            scorer,
            speculative,
        };
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        self.engine
            .submit(Box::new(Generation::new(model, params, tx, deadline, slot)));
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::UnboundedReceiverStream::new(rx),
        )))
    }

    async fn evaluate(
        &self,
        request: Request<pb::EvaluateRequest>,
    ) -> Result<Response<pb::EvaluateReply>, Status> {
        let r = request.into_inner();
        check_sha(&r.dataset_sha256)?;
        let model = self.active_model()?;
        let scorer = self.scorer(&model, r.voting, &r.tune_job).await?;
        let Some(tok) = model.tokenizer.clone() else {
            return Err(Status::failed_precondition(
                "the active bundle carries no tokenizer, so it cannot score a text",
            ));
        };
        let ctx = if r.ctx == 0 {
            512.min(model.max_positions())
        } else {
            r.ctx as usize
        };
        if ctx > model.max_positions() {
            return Err(Status::invalid_argument(format!(
                "ctx {ctx} exceeds the model's {} positions",
                model.max_positions()
            )));
        }
        let path = self.store.path(Kind::Dataset, &r.dataset_sha256);
        if !path.is_file() {
            return Err(Status::not_found(format!(
                "dataset {} is not on the device (UploadDataset)",
                r.dataset_sha256
            )));
        }
        let slot = self.engine.admit().ok_or_else(|| {
            Status::resource_exhausted(format!(
                "{} requests are running, the most this device takes; retry later",
                self.engine.max_in_flight()
            ))
        })?;
        let max_chunks = (r.max_chunks > 0).then_some(r.max_chunks as usize);
        // One long computation: a blocking thread, holding a request slot.
        let reply = blocking(move || {
            let _slot = slot;
            let text = std::fs::read_to_string(&path)
                .map_err(|e| ServiceError::BadRequest(format!("the dataset is not UTF-8 text: {e}")))?;
            let tokens = tok.encode(&text)?;
            let bos = if tok.add_bos { tok.bos } else { None };
            // The text's own problems (shorter than one chunk) are the request's.
            let bad = |e: crate::RuntimeError| ServiceError::BadRequest(e.to_string());
            let mut reply = pb::EvaluateReply {
                bundle_sha256: model.sha256.clone(),
                tune_job: scorer.job(),
                ..Default::default()
            };
            match &scorer {
                tuned::Scorer::Base => {
                    let p = crate::eval::chunked_perplexity(
                        &model.executor,
                        &tokens,
                        ctx,
                        max_chunks,
                        bos,
                        |_, _| {},
                    )
                    .map_err(bad)?;
                    reply.loss = p.loss;
                    reply.perplexity = p.perplexity;
                    reply.perplexity_stderr = p.perplexity_stderr;
                    reply.tokens_scored = p.tokens_scored as u64;
                    reply.chunks = p.chunks as u32;
                }
                tuned::Scorer::Tuned { model: t, vote } => {
                    tuned::evaluate(t, vote, &tokens, ctx, max_chunks, bos, &mut reply).map_err(bad)?;
                }
            }
            Ok(reply)
        })
        .await?;
        Ok(Response::new(reply))
    }

    async fn status(
        &self,
        _request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusReply>, Status> {
        let model = self.model();
        let store = self.store.clone();
        let (bundles, name) = blocking(move || {
            let name = model
                .as_ref()
                .and_then(|m| store.read_meta(&m.sha256))
                .map(|m| m.name)
                .unwrap_or_default();
            Ok((store.list(Kind::Bundle)?.len() as u32, name))
        })
        .await?;
        Ok(Response::new(pb::StatusReply {
            runtime_version: env!("CARGO_PKG_VERSION").into(),
            target: format!("{}-{}", std::env::consts::ARCH, std::env::consts::OS),
            threads: rayon::current_num_threads() as u32,
            active_bundle: name,
            active_sha256: self.model().map(|m| m.sha256.clone()).unwrap_or_default(),
            uptime_seconds: self.started.elapsed().as_secs(),
            memory_bytes: crate::memory::rss_bytes().0,
            memory_budget_bytes: self.memory_budget,
            tune_state: self.jobs.state(),
            active_streams: self.engine.in_flight() as u32,
            max_streams: self.engine.max_in_flight() as u32,
            bundles,
        }))
    }
}
