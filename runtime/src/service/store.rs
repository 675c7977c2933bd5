//! The device's data directory: content-addressed bundles and datasets, partial uploads,
//! and the `active` pointer.
//!
//! ```text
//! DIR/bundles/<sha256>        an installed bundle: hash and signature verified, fsynced
//! DIR/bundles/<sha256>.json   its metadata (written after the bundle is in place)
//! DIR/bundles/<sha256>.part   an upload in progress (never read as a bundle)
//! DIR/datasets/<sha256>       an uploaded dataset (hash verified)
//! DIR/datasets/<sha256>.part  a dataset upload in progress
//! DIR/active.json             {"active": sha|null, "previous": [sha, ...]}
//! ```
//!
//! Every whole file gets its final name only by `rename` after an `fsync`, and the directory
//! is fsynced after the rename, so a crash leaves either the old state or the new one: a
//! name without a suffix is always a complete, verified file.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::ServiceError;

/// The two kinds of content-addressed files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Bundle,
    Dataset,
}

impl Kind {
    fn dir(self) -> &'static str {
        match self {
            Kind::Bundle => "bundles",
            Kind::Dataset => "datasets",
        }
    }
}

/// What the device remembers about an installed bundle.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BundleMeta {
    pub sha256: String,
    pub size: u64,
    pub name: String,
    pub target: String,
    pub exits: u32,
    pub installed_unix: u64,
    pub signer: String,
}

/// The `active` pointer and the bundles active before it (most recent first).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ActiveState {
    pub active: Option<String>,
    #[serde(default)]
    pub previous: Vec<String>,
}

/// How many previously active bundles `active.json` remembers.
const HISTORY: usize = 8;

/// The lock of one content-addressed file.
type FileLock = Arc<tokio::sync::Mutex<()>>;

pub struct Store {
    root: PathBuf,
    /// One lock per (kind, hash): an upload, a query and an install of the same file never
    /// interleave.
    locks: Mutex<HashMap<(Kind, String), FileLock>>,
    /// Serialises changes of `active.json`.
    active_lock: Mutex<()>,
}

/// A lowercase hex SHA-256, checked before it is used in a path.
pub fn check_sha(sha: &str) -> Result<(), ServiceError> {
    if sha.len() == 64
        && sha
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        Ok(())
    } else {
        Err(ServiceError::BadRequest(format!(
            "`{sha}` is not a SHA-256 (64 lowercase hex digits)"
        )))
    }
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 of a whole file.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut f = File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

fn io_err(path: &Path, what: &str) -> impl FnOnce(std::io::Error) -> ServiceError {
    let path = path.to_path_buf();
    let what = what.to_string();
    move |source| ServiceError::Io {
        what: format!("{what} {}", path.display()),
        source,
    }
}

/// fsync a directory so a rename inside it is durable.
fn sync_dir(dir: &Path) -> Result<(), ServiceError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir, "syncing directory"))
}

/// Writes `bytes` to `path` atomically: a temporary file beside it, fsync, rename, fsync of
/// the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), ServiceError> {
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp).map_err(io_err(&tmp, "creating"))?;
    f.write_all(bytes).map_err(io_err(&tmp, "writing"))?;
    f.sync_all().map_err(io_err(&tmp, "syncing"))?;
    drop(f);
    fs::rename(&tmp, path).map_err(io_err(path, "renaming into place"))?;
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

impl Store {
    /// Opens (creating if needed) the data directory, removes leftover temporary files and
    /// checks `active.json` against the installed bundles.
    pub fn open(root: &Path) -> Result<Store, ServiceError> {
        for kind in [Kind::Bundle, Kind::Dataset] {
            let dir = root.join(kind.dir());
            fs::create_dir_all(&dir).map_err(io_err(&dir, "creating"))?;
            for entry in fs::read_dir(&dir).map_err(io_err(&dir, "reading"))? {
                let path = entry.map_err(io_err(&dir, "reading"))?.path();
                if path.extension().is_some_and(|e| e == "tmp") {
                    fs::remove_file(&path).map_err(io_err(&path, "removing"))?;
                }
            }
        }
        let tmp = root.join("active.tmp");
        if tmp.exists() {
            fs::remove_file(&tmp).map_err(io_err(&tmp, "removing"))?;
        }
        let store = Store {
            root: root.to_path_buf(),
            locks: Mutex::new(HashMap::new()),
            active_lock: Mutex::new(()),
        };
        // A pointer to a bundle that is not installed is dropped, never followed.
        let mut state = store.active_state()?;
        let before = state.clone();
        if state
            .active
            .as_ref()
            .is_some_and(|a| !store.is_installed(Kind::Bundle, a))
        {
            tracing::warn!(
                "active bundle {:?} is not installed; no bundle is active",
                state.active
            );
            state.active = None;
        }
        state.previous.retain(|p| store.is_installed(Kind::Bundle, p));
        if state != before {
            store.write_active(&state)?;
        }
        Ok(store)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The lock of one file; hold it while reading or changing the file's upload state.
    pub fn lock(&self, kind: Kind, sha: &str) -> FileLock {
        let mut locks = self.locks.lock().expect("store lock poisoned");
        locks.entry((kind, sha.to_string())).or_default().clone()
    }

    /// Path of the whole, verified file.
    pub fn path(&self, kind: Kind, sha: &str) -> PathBuf {
        self.root.join(kind.dir()).join(sha)
    }

    /// Path of the partial upload.
    pub fn part_path(&self, kind: Kind, sha: &str) -> PathBuf {
        self.root.join(kind.dir()).join(format!("{sha}.part"))
    }

    fn meta_path(&self, sha: &str) -> PathBuf {
        self.root.join(Kind::Bundle.dir()).join(format!("{sha}.json"))
    }

    pub fn is_installed(&self, kind: Kind, sha: &str) -> bool {
        check_sha(sha).is_ok() && self.path(kind, sha).is_file()
    }

    /// Bytes held of a file: its size when installed, else the length of the partial upload.
    pub fn bytes_held(&self, kind: Kind, sha: &str) -> Result<(u64, bool), ServiceError> {
        let whole = self.path(kind, sha);
        if let Ok(m) = fs::metadata(&whole) {
            return Ok((m.len(), true));
        }
        match fs::metadata(self.part_path(kind, sha)) {
            Ok(m) => Ok((m.len(), false)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok((0, false)),
            Err(e) => Err(io_err(&self.part_path(kind, sha), "reading")(e)),
        }
    }

    /// Opens the partial upload for writing at `offset` (which must not exceed the bytes held;
    /// bytes after it are dropped, since the client resends them).
    pub fn open_part(&self, kind: Kind, sha: &str, offset: u64) -> Result<File, ServiceError> {
        let path = self.part_path(kind, sha);
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_err(&path, "opening"))?;
        let held = f.metadata().map_err(io_err(&path, "reading"))?.len();
        if offset > held {
            return Err(ServiceError::Precondition(format!(
                "upload starts at byte {offset} but the device holds {held} bytes of {sha}; \
                 resume from QueryUpload"
            )));
        }
        f.set_len(offset).map_err(io_err(&path, "truncating"))?;
        let mut f = f;
        f.seek(SeekFrom::Start(offset))
            .map_err(io_err(&path, "seeking"))?;
        Ok(f)
    }

    /// Moves a complete partial upload into place once `verify` accepts it: checks the hash,
    /// fsyncs, renames, fsyncs the directory. A file that fails is deleted.
    pub fn install<T>(
        &self,
        kind: Kind,
        sha: &str,
        verify: impl FnOnce(&Path) -> Result<T, ServiceError>,
    ) -> Result<T, ServiceError> {
        let part = self.part_path(kind, sha);
        File::open(&part)
            .and_then(|f| f.sync_all())
            .map_err(io_err(&part, "syncing"))?;
        let got = sha256_file(&part).map_err(io_err(&part, "hashing"))?;
        if got != sha {
            let _ = fs::remove_file(&part);
            return Err(ServiceError::Corrupt(format!(
                "the uploaded bytes hash to {got}, not {sha}; the upload was discarded"
            )));
        }
        let verified = match verify(&part) {
            Ok(v) => v,
            Err(e) => {
                let _ = fs::remove_file(&part);
                return Err(e);
            }
        };
        if let Some(ms) = std::env::var("EDGE_RUNTIME_FAULT_PAUSE_INSTALL_MS")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
        {
            // Fault-injection hook for the crash tests: a window between verification and
            // the rename in which the process can be killed.
            tracing::warn!("pausing {ms} ms before installing {sha} (EDGE_RUNTIME_FAULT_PAUSE_INSTALL_MS)");
            std::thread::sleep(std::time::Duration::from_millis(ms));
        }
        let dest = self.path(kind, sha);
        fs::rename(&part, &dest).map_err(io_err(&dest, "renaming into place"))?;
        sync_dir(dest.parent().unwrap_or(Path::new(".")))?;
        Ok(verified)
    }

    pub fn write_meta(&self, meta: &BundleMeta) -> Result<(), ServiceError> {
        let json = serde_json::to_vec_pretty(meta).expect("metadata serializes");
        write_atomic(&self.meta_path(&meta.sha256), &json)
    }

    /// The metadata of an installed bundle; `None` when it was lost (a crash between the
    /// bundle's rename and the metadata's), so the caller re-verifies the bundle.
    pub fn read_meta(&self, sha: &str) -> Option<BundleMeta> {
        let bytes = fs::read(self.meta_path(sha)).ok()?;
        serde_json::from_slice(&bytes)
            .ok()
            .filter(|m: &BundleMeta| m.sha256 == sha)
    }

    /// Hashes of the installed files of a kind, sorted.
    pub fn list(&self, kind: Kind) -> Result<Vec<String>, ServiceError> {
        let dir = self.root.join(kind.dir());
        let mut out = vec![];
        for entry in fs::read_dir(&dir).map_err(io_err(&dir, "reading"))? {
            let entry = entry.map_err(io_err(&dir, "reading"))?;
            if let Some(name) = entry.file_name().to_str()
                && check_sha(name).is_ok()
            {
                out.push(name.to_string());
            }
        }
        out.sort();
        Ok(out)
    }

    /// Deletes an installed file (and its metadata) or a partial upload.
    pub fn delete(&self, kind: Kind, sha: &str) -> Result<bool, ServiceError> {
        let mut deleted = false;
        let mut paths = vec![self.path(kind, sha), self.part_path(kind, sha)];
        if kind == Kind::Bundle {
            paths.push(self.meta_path(sha));
        }
        for p in paths {
            match fs::remove_file(&p) {
                Ok(()) => deleted = true,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(&p, "removing")(e)),
            }
        }
        sync_dir(&self.root.join(kind.dir()))?;
        Ok(deleted)
    }

    pub fn active_state(&self) -> Result<ActiveState, ServiceError> {
        let path = self.root.join("active.json");
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| ServiceError::Corrupt(format!("{}: {e}", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(ActiveState::default()),
            Err(e) => Err(io_err(&path, "reading")(e)),
        }
    }

    fn write_active(&self, state: &ActiveState) -> Result<(), ServiceError> {
        let json = serde_json::to_vec_pretty(state).expect("state serializes");
        write_atomic(&self.root.join("active.json"), &json)
    }

    /// Makes `sha` the active bundle; the previous one goes to the front of the history.
    pub fn activate(&self, sha: &str) -> Result<ActiveState, ServiceError> {
        let _g = self.active_lock.lock().expect("active lock poisoned");
        if !self.is_installed(Kind::Bundle, sha) {
            return Err(ServiceError::NotFound(format!("bundle {sha} is not installed")));
        }
        let old = self.active_state()?;
        let mut state = old.clone();
        if state.active.as_deref() != Some(sha) {
            if let Some(prev) = state.active.take() {
                state.previous.retain(|p| p != &prev);
                state.previous.insert(0, prev);
            }
            state.previous.retain(|p| p != sha);
            state.previous.truncate(HISTORY);
            state.active = Some(sha.to_string());
            self.write_active(&state)?;
        }
        Ok(old)
    }

    /// Returns to the most recent previously active bundle that is still installed.
    pub fn rollback(&self) -> Result<ActiveState, ServiceError> {
        let _g = self.active_lock.lock().expect("active lock poisoned");
        let old = self.active_state()?;
        let mut state = old.clone();
        state.previous.retain(|p| self.is_installed(Kind::Bundle, p));
        if state.previous.is_empty() {
            return Err(ServiceError::Precondition(
                "no previous bundle to roll back to".into(),
            ));
        }
        state.active = Some(state.previous.remove(0));
        self.write_active(&state)?;
        Ok(old)
    }

    /// Whether `sha` is the active bundle (which cannot be deleted).
    pub fn is_active(&self, sha: &str) -> Result<bool, ServiceError> {
        Ok(self.active_state()?.active.as_deref() == Some(sha))
    }

    /// Removes a deleted bundle from the rollback history.
    pub fn forget(&self, sha: &str) -> Result<(), ServiceError> {
        let _g = self.active_lock.lock().expect("active lock poisoned");
        let mut state = self.active_state()?;
        let before = state.previous.len();
        state.previous.retain(|p| p != sha);
        if state.previous.len() != before {
            self.write_active(&state)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha_of(bytes: &[u8]) -> String {
        hex(&Sha256::digest(bytes))
    }

    fn upload(store: &Store, kind: Kind, bytes: &[u8]) -> String {
        let sha = sha_of(bytes);
        let mut f = store.open_part(kind, &sha, 0).unwrap();
        f.write_all(bytes).unwrap();
        drop(f);
        store.install(kind, &sha, |_| Ok(())).unwrap();
        sha
    }

    #[test]
    fn partial_uploads_resume_and_install_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let data = b"hello bundle bytes".to_vec();
        let sha = sha_of(&data);
        let mut f = store.open_part(Kind::Bundle, &sha, 0).unwrap();
        f.write_all(&data[..7]).unwrap();
        drop(f);
        assert_eq!(store.bytes_held(Kind::Bundle, &sha).unwrap(), (7, false));
        assert!(!store.is_installed(Kind::Bundle, &sha));
        // Starting past the held bytes is refused; resuming at or before them works.
        assert!(store.open_part(Kind::Bundle, &sha, 8).is_err());
        let mut f = store.open_part(Kind::Bundle, &sha, 5).unwrap();
        f.write_all(&data[5..]).unwrap();
        drop(f);
        store.install(Kind::Bundle, &sha, |_| Ok(())).unwrap();
        assert_eq!(
            store.bytes_held(Kind::Bundle, &sha).unwrap(),
            (data.len() as u64, true)
        );
        assert_eq!(fs::read(store.path(Kind::Bundle, &sha)).unwrap(), data);
    }

    #[test]
    fn wrong_hash_and_refused_verification_discard_the_upload() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let sha = sha_of(b"the real bytes");
        let mut f = store.open_part(Kind::Bundle, &sha, 0).unwrap();
        f.write_all(b"other bytes").unwrap();
        drop(f);
        let err = store.install(Kind::Bundle, &sha, |_| Ok(())).unwrap_err();
        assert!(err.to_string().contains("hash to"), "{err}");
        assert_eq!(store.bytes_held(Kind::Bundle, &sha).unwrap(), (0, false));

        let mut f = store.open_part(Kind::Bundle, &sha, 0).unwrap();
        f.write_all(b"the real bytes").unwrap();
        drop(f);
        let err = store
            .install(Kind::Bundle, &sha, |_| -> Result<(), _> {
                Err(ServiceError::Untrusted("signed by an unknown key".into()))
            })
            .unwrap_err();
        assert!(matches!(err, ServiceError::Untrusted(_)));
        assert!(!store.is_installed(Kind::Bundle, &sha));
    }

    #[test]
    fn activate_rollback_and_restart() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let a = upload(&store, Kind::Bundle, b"bundle a");
        let b = upload(&store, Kind::Bundle, b"bundle b");
        assert!(store.rollback().is_err());
        store.activate(&a).unwrap();
        store.activate(&b).unwrap();
        assert_eq!(store.active_state().unwrap().active.as_deref(), Some(b.as_str()));
        // A restart sees the same state; a dangling pointer is dropped.
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        let s = store.active_state().unwrap();
        assert_eq!(
            (s.active.as_deref(), s.previous.clone()),
            (Some(b.as_str()), vec![a.clone()])
        );
        store.rollback().unwrap();
        assert_eq!(store.active_state().unwrap().active.as_deref(), Some(a.as_str()));
        assert!(store.activate(&sha_of(b"never uploaded")).is_err());
        fs::remove_file(store.path(Kind::Bundle, &a)).unwrap();
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.active_state().unwrap().active, None);
        assert_eq!(store.list(Kind::Bundle).unwrap(), vec![b]);
    }

    #[test]
    fn leftover_temporary_files_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("bundles")).unwrap();
        fs::write(dir.path().join("bundles/x.tmp"), b"half").unwrap();
        fs::write(dir.path().join("active.tmp"), b"{\"act").unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert!(!dir.path().join("bundles/x.tmp").exists());
        assert!(!dir.path().join("active.tmp").exists());
        assert_eq!(store.active_state().unwrap(), ActiveState::default());
        assert!(check_sha("ABC").is_err());
    }
}
