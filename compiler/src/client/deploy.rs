//! Uploading a file to a device with resume: ask the device how many bytes it holds
//! (`QueryUpload`), stream the rest in chunks with their offsets, retry from the device's
//! count when the connection breaks.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use edge_proto::runtime::{QueryUploadRequest, UploadChunk, UploadKind};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use super::{Client, ClientError};

/// SHA-256 (lowercase hex) and size of a file.
pub fn file_sha256(path: &Path) -> Result<(String, u64), ClientError> {
    use std::io::Read;
    let io = |source| ClientError::Io {
        what: format!("reading {}", path.display()),
        source,
    };
    let mut f = std::fs::File::open(path).map_err(io)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        size += n as u64;
    }
    Ok((h.finalize().iter().map(|b| format!("{b:02x}")).collect(), size))
}

/// What one upload did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct UploadOutcome {
    pub sha256: String,
    pub size: u64,
    /// The device already had the file installed; nothing was sent.
    pub skipped: bool,
    /// Bytes the device held before this upload (0 for a fresh upload).
    pub resumed_from: u64,
    pub bytes_sent: u64,
    /// Upload attempts (more than one when the connection broke and was resumed).
    pub attempts: u32,
}

/// The file to upload and how.
pub struct Upload<'a> {
    pub device: &'a str,
    pub kind: UploadKind,
    pub path: &'a Path,
    pub sha256: &'a str,
    pub size: u64,
    /// Bytes of file data per message (must fit the device's message limit).
    pub chunk_bytes: usize,
    /// Attempts before giving up on a device whose connection keeps breaking.
    pub max_attempts: u32,
}

fn retryable(code: tonic::Code) -> bool {
    matches!(
        code,
        tonic::Code::Unavailable | tonic::Code::Aborted | tonic::Code::Unknown | tonic::Code::Cancelled
    )
}

/// Uploads `u.path` to the device, resuming from what it holds. `progress(bytes_held)` is
/// called as chunks go out.
pub async fn upload(
    client: &mut Client,
    u: &Upload<'_>,
    progress: Arc<dyn Fn(u64) + Send + Sync>,
) -> Result<UploadOutcome, ClientError> {
    let mut outcome = UploadOutcome {
        sha256: u.sha256.to_string(),
        size: u.size,
        skipped: false,
        resumed_from: 0,
        bytes_sent: 0,
        attempts: 0,
    };
    loop {
        let q = client
            .query_upload(QueryUploadRequest {
                sha256: u.sha256.to_string(),
                kind: u.kind as i32,
            })
            .await
            .map_err(|s| ClientError::rpc(u.device, s))?
            .into_inner();
        if q.installed {
            outcome.skipped = outcome.attempts == 0;
            progress(u.size);
            return Ok(outcome);
        }
        if outcome.attempts == 0 {
            outcome.resumed_from = q.bytes_held;
        }
        if outcome.attempts >= u.max_attempts {
            return Err(ClientError::Invalid(format!(
                "{}: upload did not complete after {} attempts ({} of {} bytes held)",
                u.device, u.max_attempts, q.bytes_held, u.size
            )));
        }
        outcome.attempts += 1;
        progress(q.bytes_held);
        let chunks = chunk_stream(u, q.bytes_held, progress.clone()).await?;
        let result = match u.kind {
            UploadKind::Dataset => client.upload_dataset(chunks).await,
            _ => client.upload_bundle(chunks).await,
        };
        match result {
            Ok(reply) => {
                let reply = reply.into_inner();
                outcome.bytes_sent += reply.bytes_held - q.bytes_held.min(reply.bytes_held);
                if reply.complete {
                    progress(u.size);
                    return Ok(outcome);
                }
            }
            Err(s) if retryable(s.code()) => {
                tracing::warn!("{}: upload interrupted ({s}); resuming", u.device);
                tokio::time::sleep(Duration::from_millis(200 * outcome.attempts as u64)).await;
            }
            Err(s) => return Err(ClientError::rpc(u.device, s)),
        }
    }
}

/// The chunks of the file from `offset` to its end, read as the transport asks for them.
async fn chunk_stream(
    u: &Upload<'_>,
    offset: u64,
    progress: Arc<dyn Fn(u64) + Send + Sync>,
) -> Result<tokio_stream::wrappers::ReceiverStream<UploadChunk>, ClientError> {
    let path = u.path.to_path_buf();
    let io = |source| ClientError::Io {
        what: format!("reading {}", path.display()),
        source,
    };
    let mut file = tokio::fs::File::open(&path).await.map_err(io)?;
    file.seek(std::io::SeekFrom::Start(offset)).await.map_err(io)?;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let (sha, total, chunk) = (u.sha256.to_string(), u.size, u.chunk_bytes.max(1));
    let name = u
        .path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    tokio::spawn(async move {
        let mut pos = offset;
        let mut first = true;
        loop {
            let want = chunk.min((total - pos) as usize);
            let mut data = vec![0u8; want];
            if want > 0 && file.read_exact(&mut data).await.is_err() {
                // The file changed under us; the device's hash check refuses the result.
                return;
            }
            let msg = UploadChunk {
                sha256: if first { sha.clone() } else { String::new() },
                total_size: if first { total } else { 0 },
                offset: pos,
                data,
                name: if first { name.clone() } else { String::new() },
            };
            if tx.send(msg).await.is_err() {
                return;
            }
            pos += want as u64;
            first = false;
            progress(pos);
            if pos >= total {
                return;
            }
        }
    });
    Ok(tokio_stream::wrappers::ReceiverStream::new(rx))
}
