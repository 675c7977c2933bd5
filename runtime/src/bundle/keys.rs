//! Signing keys: ed25519 key pairs in two small text files.
//!
//! - private key `KEY`: one line `edge-ed25519-secret:` followed by the 32-byte seed in
//!   lowercase hex (64 digits); written with mode 0600.
//! - public key `KEY.pub`: one line `edge-ed25519-public:` followed by the 32-byte public
//!   key in hex.
//!
//! The public key's hex is also what errors and `edgec verify` print to name a signer.

use std::io::Write;
use std::path::{Path, PathBuf};

use ed25519_dalek::{SigningKey, VerifyingKey};
use rand::TryRngCore;

use super::BundleError;

const SECRET_PREFIX: &str = "edge-ed25519-secret:";
const PUBLIC_PREFIX: &str = "edge-ed25519-public:";

/// Lowercase hex of bytes.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex32(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

fn key_error(path: &Path, msg: impl Into<String>) -> BundleError {
    BundleError::Key {
        path: path.display().to_string(),
        msg: msg.into(),
    }
}

/// A new random signing key (seed from the operating system's generator).
pub fn generate_key() -> Result<SigningKey, BundleError> {
    let mut seed = [0u8; 32];
    rand::rngs::OsRng
        .try_fill_bytes(&mut seed)
        .map_err(|e| BundleError::Key {
            path: "<os random generator>".into(),
            msg: e.to_string(),
        })?;
    Ok(SigningKey::from_bytes(&seed))
}

/// The public key file next to a private key file: `KEY.pub`.
pub fn public_key_path(private: &Path) -> PathBuf {
    let mut s = private.as_os_str().to_owned();
    s.push(".pub");
    PathBuf::from(s)
}

/// Writes `key` to `path` (mode 0600) and its public half to `path.pub`. Refuses to
/// replace existing files unless `overwrite`.
pub fn write_key_pair(path: &Path, key: &SigningKey, overwrite: bool) -> Result<PathBuf, BundleError> {
    let public = public_key_path(path);
    if !overwrite {
        for p in [path, public.as_path()] {
            if p.exists() {
                return Err(key_error(p, "already exists (pass --force to replace it)"));
            }
        }
    }
    let io = |p: &Path| {
        let p = p.display().to_string();
        move |error| BundleError::Io { path: p, error }
    };
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path).map_err(io(path))?;
    #[cfg(unix)]
    {
        // An existing file keeps its mode on open: set it explicitly.
        use std::os::unix::fs::PermissionsExt;
        f.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(io(path))?;
    }
    writeln!(f, "{SECRET_PREFIX}{}", hex(&key.to_bytes())).map_err(io(path))?;
    f.sync_all().map_err(io(path))?;
    let text = format!("{PUBLIC_PREFIX}{}\n", hex(key.verifying_key().as_bytes()));
    std::fs::write(&public, text).map_err(io(&public))?;
    Ok(public)
}

fn read_line(path: &Path) -> Result<String, BundleError> {
    let text = std::fs::read(path).map_err(|error| BundleError::Io {
        path: path.display().to_string(),
        error,
    })?;
    let text = String::from_utf8(text).map_err(|_| key_error(path, "not a text file"))?;
    Ok(text.trim().to_string())
}

/// Reads a private key file written by [`write_key_pair`].
pub fn read_signing_key(path: &Path) -> Result<SigningKey, BundleError> {
    let line = read_line(path)?;
    if line.starts_with(PUBLIC_PREFIX) {
        return Err(key_error(
            path,
            "is a public key; signing needs the private key (the file without .pub)",
        ));
    }
    let seed = line
        .strip_prefix(SECRET_PREFIX)
        .and_then(unhex32)
        .ok_or_else(|| {
            key_error(
                path,
                format!("not an Edge-LLM private key (expected `{SECRET_PREFIX}` and 64 hex digits)"),
            )
        })?;
    Ok(SigningKey::from_bytes(&seed))
}

/// Reads a public key file written by [`write_key_pair`].
pub fn read_verifying_key(path: &Path) -> Result<VerifyingKey, BundleError> {
    let line = read_line(path)?;
    if line.starts_with(SECRET_PREFIX) {
        return Err(key_error(
            path,
            "is a private key; pass the public key (KEY.pub) to trust",
        ));
    }
    let bytes = line
        .strip_prefix(PUBLIC_PREFIX)
        .and_then(unhex32)
        .ok_or_else(|| {
            key_error(
                path,
                format!("not an Edge-LLM public key (expected `{PUBLIC_PREFIX}` and 64 hex digits)"),
            )
        })?;
    VerifyingKey::from_bytes(&bytes).map_err(|e| key_error(path, format!("invalid ed25519 public key: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_files_round_trip_and_are_private() {
        let dir = std::env::temp_dir().join(format!("edge-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("k");
        let key = generate_key().unwrap();
        let public = write_key_pair(&path, &key, true).unwrap();
        assert_eq!(read_signing_key(&path).unwrap().to_bytes(), key.to_bytes());
        assert_eq!(read_verifying_key(&public).unwrap(), key.verifying_key());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let e = write_key_pair(&path, &key, false).unwrap_err().to_string();
        assert!(e.contains("already exists"), "{e}");
        let e = read_verifying_key(&path).unwrap_err().to_string();
        assert!(e.contains("private key"), "{e}");
        let e = read_signing_key(&public).unwrap_err().to_string();
        assert!(e.contains("public key"), "{e}");
        std::fs::write(&public, "hello").unwrap();
        let e = read_verifying_key(&public).unwrap_err().to_string();
        assert!(e.contains("not an Edge-LLM public key"), "{e}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
