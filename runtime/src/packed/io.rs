//! Safetensors layout for packed weights (see `docs/formats.md`).
