//! The one place the service reads bundles: verification at install, loading at activation.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use crate::Executor;
use crate::bundle::{self, Bundle, BundleError, TrustPolicy};
use crate::tokenizer::Tokenizer;

use super::ServiceError;
use super::tuned::TunedModel;

/// What installing a bundle learned about it.
#[derive(Debug, Clone, PartialEq)]
pub struct BundleInfo {
    /// The bundle's own identity (SHA-256 of its bytes before the signature trailer).
    pub bundle_sha256: String,
    pub target: String,
    /// Exit heads the bundle carries (voting modes other than `last` need them).
    pub exits: u32,
    /// Hex public key of the signer.
    pub signer: String,
}

/// The accepted signers: the `--trusted-key` public key (and, for development, anyone).
pub fn trust_policy(key: &Path, allow_unsigned: bool) -> Result<TrustPolicy, ServiceError> {
    TrustPolicy::from_key_files(&[key.to_path_buf()], allow_unsigned)
        .map_err(|e| ServiceError::Config(format!("--trusted-key: {e}")))
}

fn bundle_error(e: BundleError) -> ServiceError {
    match e {
        BundleError::Unsigned { .. }
        | BundleError::UntrustedKey { .. }
        | BundleError::BadSignature { .. } => ServiceError::Untrusted(e.to_string()),
        BundleError::WrongArch { .. } | BundleError::MissingFeatures { .. } => {
            ServiceError::Precondition(e.to_string())
        }
        BundleError::Io { .. } => ServiceError::Io {
            what: "reading the bundle".into(),
            source: std::io::Error::other(e.to_string()),
        },
        _ => ServiceError::Corrupt(e.to_string()),
    }
}

/// Checks an uploaded file before it is installed: the bundle's hashes (every tensor's too),
/// the signature against `trust`, and that this machine can run it.
pub fn verify_bundle(path: &Path, trust: &TrustPolicy) -> Result<BundleInfo, ServiceError> {
    let v = bundle::verify_file(path, trust).map_err(bundle_error)?;
    bundle::check_host(path, &v.target).map_err(bundle_error)?;
    Ok(BundleInfo {
        bundle_sha256: v.sha256,
        target: v.target.name,
        exits: 0,
        signer: v.signer.unwrap_or_default(),
    })
}

/// A loaded bundle, ready to run.
pub struct Model {
    /// Content hash of the installed file (the store's name for it).
    pub sha256: String,
    pub bundle: Bundle,
    pub executor: Executor,
    pub tokenizer: Option<Tokenizer>,
    /// Tuned models of this bundle loaded so far, by job id (see [`super::tuned`]).
    pub tuned: Mutex<HashMap<String, Arc<TunedModel>>>,
}

impl Model {
    pub fn load(path: &Path, sha256: &str, trust: &TrustPolicy) -> Result<Arc<Model>, ServiceError> {
        let bundle = Bundle::open(path, trust).map_err(bundle_error)?;
        // The bundle's generated kernels, JIT-compiled, and its schedule's streaming.
        let (executor, _) = bundle.executor(true)?;
        let tokenizer = bundle.tokenizer().cloned();
        Ok(Arc::new(Model {
            sha256: sha256.to_string(),
            bundle,
            executor,
            tokenizer,
            tuned: Mutex::new(HashMap::new()),
        }))
    }

    /// Longest sequence a session may hold.
    pub fn max_positions(&self) -> usize {
        self.bundle.graph().config.max_position_embeddings
    }
}
