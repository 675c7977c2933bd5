//! Text <-> token ids, through the Hugging Face `tokenizers` crate.
//!
//! The compiler turns whatever a model file carries (a `tokenizer.json`, or the vocabulary
//! embedded in a GGUF file) into a `tokenizers::Tokenizer`; the runtime only wraps it with
//! the model's BOS/EOS conventions.

use crate::error::{Result, RuntimeError};

#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// Prepend BOS when encoding a text (llama.cpp's `add_bos_token`).
    pub add_bos: bool,
    pub bos: Option<u32>,
    pub eos: Vec<u32>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Tokenizer(vocab {}, add_bos {}, bos {:?}, eos {:?})",
            self.vocab_size(),
            self.add_bos,
            self.bos,
            self.eos
        )
    }
}

impl Tokenizer {
    pub fn new(inner: tokenizers::Tokenizer, add_bos: bool, bos: Option<u32>, eos: Vec<u32>) -> Self {
        Tokenizer {
            inner,
            add_bos,
            bos,
            eos,
        }
    }

    /// Loads a Hugging Face `tokenizer.json`.
    pub fn from_json_file(
        path: &std::path::Path,
        add_bos: bool,
        bos: Option<u32>,
        eos: Vec<u32>,
    ) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| RuntimeError::Tokenizer(format!("{}: {e}", path.display())))?;
        Ok(Tokenizer::new(inner, add_bos, bos, eos))
    }

    /// Parses a tokenizer from its JSON serialization (as stored in a bundle).
    pub fn from_json(json: &str, add_bos: bool, bos: Option<u32>, eos: Vec<u32>) -> Result<Self> {
        let inner: tokenizers::Tokenizer = json
            .parse()
            .map_err(|e| RuntimeError::Tokenizer(format!("invalid tokenizer JSON: {e}")))?;
        Ok(Tokenizer::new(inner, add_bos, bos, eos))
    }

    pub fn to_json(&self) -> Result<String> {
        self.inner
            .to_string(false)
            .map_err(|e| RuntimeError::Tokenizer(e.to_string()))
    }

    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Encodes a text, prepending BOS if the model's vocabulary asks for it.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| RuntimeError::Tokenizer(e.to_string()))?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if self.add_bos
            && let Some(b) = self.bos
        {
            ids.push(b);
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// Decodes ids to text (special tokens are kept as text).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, false)
            .map_err(|e| RuntimeError::Tokenizer(e.to_string()))
    }

    pub fn is_eos(&self, id: u32) -> bool {
        self.eos.contains(&id)
    }
}
