//! ONNX files exported by torch.onnx from LlamaForCausalLM. (Being written.)

use std::path::Path;

use super::error::{FrontendError, Result};
use super::LoadedModel;

pub fn load(path: &Path) -> Result<LoadedModel> {
    Err(FrontendError::Unsupported {
        path: path.display().to_string(),
        msg: "ONNX reader not built yet".into(),
    })
}
