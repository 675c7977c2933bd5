//! `ExportAdapters` into a directory: the streamed files are checked (offsets in order, each
//! file's size and SHA-256 from its last chunk) and written into a temporary directory beside
//! the destination, which is renamed into place only once every file is whole.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use edge_proto::runtime::ExportAdaptersRequest;

use super::{Client, ClientError};

/// One exported file.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ExportedFile {
    pub path: String,
    pub size: u64,
    pub sha256: String,
}

/// Files the device may send (PEFT's layout plus the exits and voting weights); anything
/// else is refused rather than written.
const KNOWN: [&str; 4] = [
    "adapter_config.json",
    "adapter_model.safetensors",
    "exit_heads.safetensors",
    "voting.json",
];

fn invalid(device: &str, m: String) -> ClientError {
    ClientError::Invalid(format!("{device}: {m}"))
}

/// Receives the adapters of job `job` (empty: the device's latest) and checks them.
pub async fn receive(
    client: &mut Client,
    device: &str,
    job: &str,
) -> Result<BTreeMap<String, Vec<u8>>, ClientError> {
    let mut stream = client
        .export_adapters(ExportAdaptersRequest {
            job_id: job.to_string(),
        })
        .await
        .map_err(|s| ClientError::rpc(device, s))?
        .into_inner();
    let mut files: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut complete: Vec<String> = vec![];
    while let Some(ch) = stream.message().await.map_err(|s| ClientError::rpc(device, s))? {
        if !KNOWN.contains(&ch.path.as_str()) {
            return Err(invalid(
                device,
                format!("unexpected file `{}` in the export", ch.path),
            ));
        }
        if complete.contains(&ch.path) {
            return Err(invalid(device, format!("`{}` sent twice", ch.path)));
        }
        let f = files.entry(ch.path.clone()).or_default();
        if ch.offset != f.len() as u64 || f.len() as u64 + ch.data.len() as u64 > ch.total_size {
            return Err(invalid(
                device,
                format!(
                    "`{}`: chunk at offset {} of {} bytes does not continue the {} received",
                    ch.path,
                    ch.offset,
                    ch.total_size,
                    f.len()
                ),
            ));
        }
        f.extend_from_slice(&ch.data);
        if ch.last {
            let sha = super::sha256_hex(f);
            if f.len() as u64 != ch.total_size || sha != ch.sha256 {
                return Err(invalid(
                    device,
                    format!("`{}` arrived damaged (size or SHA-256 differs)", ch.path),
                ));
            }
            complete.push(ch.path.clone());
        }
    }
    if let Some(p) = files.keys().find(|p| !complete.contains(p)) {
        return Err(invalid(
            device,
            format!("the export ended in the middle of `{p}`"),
        ));
    }
    for need in ["adapter_config.json", "adapter_model.safetensors"] {
        if !files.contains_key(need) {
            return Err(invalid(device, format!("the export has no `{need}`")));
        }
    }
    Ok(files)
}

/// Writes `files` to `dir` atomically: a temporary sibling directory, each file fsynced,
/// then renamed to `dir`. An existing `dir` is replaced only with `replace`.
pub fn write_dir(
    dir: &Path,
    files: &BTreeMap<String, Vec<u8>>,
    replace: bool,
) -> Result<Vec<ExportedFile>, ClientError> {
    use std::io::Write;
    let io = |what: String| move |source| ClientError::Io { what, source };
    if dir.exists() && !replace {
        return Err(ClientError::Invalid(format!(
            "{} exists (use --force to replace it)",
            dir.display()
        )));
    }
    let name = dir
        .file_name()
        .ok_or_else(|| ClientError::Invalid(format!("{} is not a directory name", dir.display())))?;
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(io(format!("creating {}", parent.display())))?;
    let tmp = parent.join(format!(".{}.tmp-{}", name.to_string_lossy(), std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io(format!("removing {}", tmp.display())))?;
    }
    std::fs::create_dir(&tmp).map_err(io(format!("creating {}", tmp.display())))?;
    let mut out = vec![];
    for (p, bytes) in files {
        let path = tmp.join(p);
        let mut f = std::fs::File::create(&path).map_err(io(format!("creating {}", path.display())))?;
        f.write_all(bytes)
            .and_then(|_| f.sync_all())
            .map_err(io(format!("writing {}", path.display())))?;
        out.push(ExportedFile {
            path: p.clone(),
            size: bytes.len() as u64,
            sha256: super::sha256_hex(bytes),
        });
    }
    if dir.exists() {
        let old = parent.join(format!(".{}.old-{}", name.to_string_lossy(), std::process::id()));
        std::fs::rename(dir, &old).map_err(io(format!("moving {} aside", dir.display())))?;
        std::fs::rename(&tmp, dir).map_err(io(format!("renaming into {}", dir.display())))?;
        std::fs::remove_dir_all(&old).map_err(io(format!("removing {}", old.display())))?;
    } else {
        std::fs::rename(&tmp, dir).map_err(io(format!("renaming into {}", dir.display())))?;
    }
    if let Ok(d) = std::fs::File::open(&parent) {
        let _ = d.sync_all();
    }
    Ok(out)
}
