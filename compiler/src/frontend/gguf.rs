//! GGUF files (v2/v3) of `llama` architecture. (Being written.)

use std::path::Path;

use super::error::{FrontendError, Result};
use super::LoadedModel;

pub fn load(path: &Path) -> Result<LoadedModel> {
    Err(FrontendError::Unsupported {
        path: path.display().to_string(),
        msg: "GGUF reader not built yet".into(),
    })
}
