//! Talking to devices that run `edge-runtime serve`: connection with the bearer token
//! (and TLS for `https://` URLs), and the upload protocol with resume ([`deploy`]).

pub mod adapters;
pub mod deploy;

use std::path::Path;
use std::time::Duration;

use edge_proto::runtime::edge_runtime_client::EdgeRuntimeClient;
use thiserror::Error;
use tonic::metadata::AsciiMetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

#[derive(Debug, Error)]
pub enum ClientError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{device}: cannot connect: {source}")]
    Connect {
        device: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("{device}: {} ({:?})", status.message(), status.code())]
    Rpc { device: String, status: tonic::Status },
    #[error("{0}")]
    Invalid(String),
}

impl ClientError {
    pub fn rpc(device: &str, status: tonic::Status) -> ClientError {
        ClientError::Rpc {
            device: device.to_string(),
            status,
        }
    }
    /// The gRPC status code when the device answered with an error.
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            ClientError::Rpc { status, .. } => Some(status.code()),
            _ => None,
        }
    }
}

/// Adds `authorization: Bearer <token>` to every request.
#[derive(Clone)]
pub struct Bearer(AsciiMetadataValue);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

pub type Client = EdgeRuntimeClient<InterceptedService<Channel, Bearer>>;

/// Reads a token file (surrounding whitespace ignored).
pub fn read_token(path: &Path) -> Result<String, ClientError> {
    let text = std::fs::read_to_string(path).map_err(|source| ClientError::Io {
        what: format!("reading token file {}", path.display()),
        source,
    })?;
    let token = text.trim().to_string();
    if token.is_empty() {
        return Err(ClientError::Invalid(format!(
            "token file {} is empty",
            path.display()
        )));
    }
    Ok(token)
}

/// How to reach a device.
#[derive(Debug, Clone)]
pub struct DeviceOptions {
    pub token: String,
    /// CA certificate (PEM) for `https://` devices with a private certificate authority.
    pub ca_cert: Option<Vec<u8>>,
    /// Largest message sent or received.
    pub max_message_bytes: usize,
}

/// Opens a channel to a device (`http://host:port`, or `https://` for TLS).
pub async fn channel(url: &str, opts: &DeviceOptions) -> Result<Channel, ClientError> {
    let connect = |source| ClientError::Connect {
        device: url.to_string(),
        source,
    };
    let mut ep = Endpoint::from_shared(url.to_string())
        .map_err(connect)?
        .connect_timeout(Duration::from_secs(10))
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_while_idle(true);
    if url.starts_with("https://") {
        let mut tls = ClientTlsConfig::new().with_enabled_roots();
        if let Some(ca) = &opts.ca_cert {
            tls = tls.ca_certificate(Certificate::from_pem(ca));
        }
        ep = ep.tls_config(tls).map_err(connect)?;
    }
    ep.connect().await.map_err(connect)
}

/// Connects to a device's `EdgeRuntime` service with the bearer token.
pub async fn connect(url: &str, opts: &DeviceOptions) -> Result<Client, ClientError> {
    let value: AsciiMetadataValue = format!("Bearer {}", opts.token)
        .parse()
        .map_err(|_| ClientError::Invalid("the token must be printable ASCII".into()))?;
    let ch = channel(url, opts).await?;
    Ok(EdgeRuntimeClient::with_interceptor(ch, Bearer(value))
        .max_decoding_message_size(opts.max_message_bytes)
        .max_encoding_message_size(opts.max_message_bytes))
}

/// Reads a `--devices` file: one URL per line; blank lines and `#` comments are skipped.
pub fn read_device_list(path: &Path) -> Result<Vec<String>, ClientError> {
    let text = std::fs::read_to_string(path).map_err(|source| ClientError::Io {
        what: format!("reading device list {}", path.display()),
        source,
    })?;
    Ok(text
        .lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect())
}

/// Lowercase hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
