//! `edge-runtime serve`: the device's gRPC service (`edge.runtime.v1.EdgeRuntime`), plus the
//! standard health and reflection services.
//!
//! - [`store`]: the data directory (content-addressed bundles and datasets, resumable
//!   partial uploads, the atomic `active` pointer).
//! - [`model`]: bundle verification and loading (the single place that reads bundles).
//! - [`engine`]: the compute threads; every request is a task that runs one step (a prefill,
//!   one token, one evaluation chunk) at a time in round-robin order, so concurrent streams
//!   progress fairly and model compute never runs on the async workers.
//! - [`generate`]: one `Generate` stream as a task (sampling, stop strings, deadline).
//! - [`voting`]: the request's voting mode (combined by `train::vote`).
//! - [`rpc`]: the service methods; [`auth`]: the bearer token.

pub mod auth;
pub mod engine;
pub mod generate;
pub mod model;
pub mod rpc;
pub mod store;
pub mod tuned;
pub mod tuning;
pub mod voting;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use edge_proto::runtime::edge_runtime_server::EdgeRuntimeServer;
use thiserror::Error;
use tonic::transport::{Identity, Server, ServerTlsConfig};

/// What the service can fail with; [`ServiceError::status`] gives the gRPC status.
#[derive(Debug, Error)]
pub enum ServiceError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Precondition(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Corrupt(String),
    #[error("{0}")]
    Untrusted(String),
    #[error("{0}")]
    Exhausted(String),
    #[error("{0}")]
    Config(String),
    #[error("runtime: {0}")]
    Runtime(#[from] crate::RuntimeError),
    #[error("transport: {0}")]
    Transport(#[from] tonic::transport::Error),
}

impl ServiceError {
    pub fn status(&self) -> tonic::Status {
        use tonic::Status;
        let msg = self.to_string();
        match self {
            ServiceError::BadRequest(_) | ServiceError::Corrupt(_) => Status::invalid_argument(msg),
            ServiceError::Precondition(_) => Status::failed_precondition(msg),
            ServiceError::NotFound(_) => Status::not_found(msg),
            ServiceError::Untrusted(_) => Status::permission_denied(msg),
            ServiceError::Exhausted(_) => Status::resource_exhausted(msg),
            ServiceError::Runtime(crate::RuntimeError::ContextOverflow { .. }) => {
                Status::invalid_argument(msg)
            }
            _ => Status::internal(msg),
        }
    }
}

impl From<ServiceError> for tonic::Status {
    fn from(e: ServiceError) -> Self {
        e.status()
    }
}

/// Limits on what one request may ask for.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest gRPC message accepted or sent (bytes); upload chunks must fit in it.
    pub max_message_bytes: usize,
    /// Largest prompt, in tokens.
    pub max_prompt_tokens: usize,
    /// Largest `max_tokens` of a Generate request (also its default when the request says 0).
    pub max_new_tokens: usize,
    /// Generate / Evaluate requests in progress at once; more are refused with
    /// RESOURCE_EXHAUSTED.
    pub max_streams: usize,
    /// Largest bundle or dataset accepted (bytes).
    pub max_upload_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_bytes: 4 << 20,
            max_prompt_tokens: 4096,
            max_new_tokens: 1024,
            max_streams: 64,
            max_upload_bytes: 64 << 30,
        }
    }
}

/// Everything `edge-runtime serve` is configured with.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// Public key whose signatures the device accepts.
    pub trusted_key: PathBuf,
    /// Development only: accept unsigned bundles and untrusted signers.
    pub allow_unsigned: bool,
    /// File holding the bearer token (surrounding whitespace ignored).
    pub token_file: PathBuf,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub limits: Limits,
    /// Compute threads running model steps (each step itself uses the rayon pool).
    pub workers: usize,
    /// Memory budget reported by Status (bytes, 0 = none).
    pub memory_budget: u64,
}

fn read_file(path: &std::path::Path, what: &str) -> Result<Vec<u8>, ServiceError> {
    std::fs::read(path).map_err(|source| ServiceError::Io {
        what: format!("reading {what} {}", path.display()),
        source,
    })
}

/// Runs the service until the process is stopped (SIGINT / SIGTERM end it gracefully).
pub async fn serve(cfg: ServeConfig) -> Result<(), ServiceError> {
    let token = String::from_utf8(read_file(&cfg.token_file, "token file")?)
        .map_err(|_| ServiceError::Config(format!("{}: the token is not UTF-8", cfg.token_file.display())))?;
    let auth = auth::Auth::new(token.trim())
        .map_err(|e| ServiceError::Config(format!("{}: {e}", cfg.token_file.display())))?;
    let state = Arc::new(rpc::Runtime::open(&cfg)?);

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<EdgeRuntimeServer<rpc::Runtime>>().await;
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(edge_proto::runtime::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| ServiceError::Config(format!("reflection: {e}")))?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(edge_proto::runtime::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .map_err(|e| ServiceError::Config(format!("reflection: {e}")))?;

    let limit = cfg.limits.max_message_bytes;
    let runtime = EdgeRuntimeServer::from_arc(state.clone())
        .max_decoding_message_size(limit)
        .max_encoding_message_size(limit);

    let mut builder = Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(20)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .max_concurrent_streams(Some((cfg.limits.max_streams as u32).saturating_mul(2).max(16)));
    match (&cfg.tls_cert, &cfg.tls_key) {
        (Some(cert), Some(key)) => {
            let identity =
                Identity::from_pem(read_file(cert, "TLS certificate")?, read_file(key, "TLS key")?);
            builder = builder.tls_config(ServerTlsConfig::new().identity(identity))?;
        }
        (None, None) => {}
        _ => {
            return Err(ServiceError::Config(
                "--tls-cert and --tls-key go together".into(),
            ));
        }
    }
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|source| ServiceError::Io {
            what: format!("binding {}", cfg.listen),
            source,
        })?;
    let local = listener.local_addr().map_err(|source| ServiceError::Io {
        what: "reading the bound address".into(),
        source,
    })?;
    // Scripts and tests read this line to learn the port when listening on port 0.
    println!("listening on {local}");
    tracing::info!(
        "edge-runtime serving on {local}, data in {}",
        cfg.data_dir.display()
    );
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    builder
        .add_service(health_service)
        .add_service(tonic::service::interceptor::InterceptedService::new(
            reflection_v1,
            auth.clone(),
        ))
        .add_service(tonic::service::interceptor::InterceptedService::new(
            reflection_v1alpha,
            auth.clone(),
        ))
        .add_service(tonic::service::interceptor::InterceptedService::new(
            auth::Oversize(runtime),
            auth,
        ))
        .serve_with_incoming_shutdown(incoming, shutdown_signal())
        .await?;
    state.shutdown();
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = ctrl_c.await;
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
    tracing::info!("shutting down");
}

/// `edge-runtime serve` arguments.
#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// Address to listen on, e.g. 0.0.0.0:50051 (port 0 picks a free port; the chosen address is
    /// printed as `listening on ADDR`).
    #[arg(long)]
    pub listen: SocketAddr,
    /// Data directory (bundles, datasets, the active pointer); created if missing.
    #[arg(long)]
    pub data_dir: PathBuf,
    /// Public key (KEY.pub from `edgec keygen`) whose signed bundles this device accepts.
    #[arg(long)]
    pub trusted_key: PathBuf,
    /// File holding the bearer token every call but health must present.
    #[arg(long)]
    pub token_file: PathBuf,
    /// TLS certificate chain (PEM); with --tls-key, the service speaks TLS only.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Largest gRPC message (bytes), upload chunks included.
    #[arg(long, default_value_t = Limits::default().max_message_bytes)]
    pub max_message_bytes: usize,
    /// Largest prompt (tokens).
    #[arg(long, default_value_t = Limits::default().max_prompt_tokens)]
    pub max_prompt_tokens: usize,
    /// Largest max_tokens of a Generate request.
    #[arg(long, default_value_t = Limits::default().max_new_tokens)]
    pub max_new_tokens: usize,
    /// Generate / Evaluate requests served at once; more get RESOURCE_EXHAUSTED.
    #[arg(long, default_value_t = Limits::default().max_streams)]
    pub max_streams: usize,
    /// Largest bundle or dataset accepted (bytes).
    #[arg(long, default_value_t = Limits::default().max_upload_bytes)]
    pub max_upload_bytes: u64,
    /// Compute threads stepping requests in turn (each step uses all --threads).
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
    /// Threads of the kernels' pool (default: all cores).
    #[arg(long, short = 't')]
    pub threads: Option<usize>,
    /// Memory budget reported by Status, in bytes (0: none).
    #[arg(long, default_value_t = 0)]
    pub memory_budget: u64,
    /// Development only: accept unsigned bundles and bundles signed by an untrusted key
    /// (corrupt bytes and forged signatures are still refused).
    #[arg(long)]
    pub allow_unsigned: bool,
}

/// Runs `edge-runtime serve` to completion.
pub fn run_cli(a: ServeArgs) -> Result<(), ServiceError> {
    if let Some(t) = a.threads {
        if t == 0 {
            return Err(ServiceError::Config("--threads must be at least 1".into()));
        }
        rayon::ThreadPoolBuilder::new()
            .num_threads(t)
            .build_global()
            .map_err(|e| ServiceError::Config(format!("thread pool: {e}")))?;
    }
    if a.workers == 0 || a.max_streams == 0 {
        return Err(ServiceError::Config(
            "--workers and --max-streams must be at least 1".into(),
        ));
    }
    let cfg = ServeConfig {
        listen: a.listen,
        data_dir: a.data_dir,
        trusted_key: a.trusted_key,
        allow_unsigned: a.allow_unsigned,
        token_file: a.token_file,
        tls_cert: a.tls_cert,
        tls_key: a.tls_key,
        limits: Limits {
            max_message_bytes: a.max_message_bytes,
            max_prompt_tokens: a.max_prompt_tokens,
            max_new_tokens: a.max_new_tokens,
            max_streams: a.max_streams,
            max_upload_bytes: a.max_upload_bytes,
        },
        workers: a.workers,
        memory_budget: a.memory_budget,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("edge-async")
        .build()
        .map_err(|source| ServiceError::Io {
            what: "starting the async runtime".into(),
            source,
        })?;
    rt.block_on(serve(cfg))
}
