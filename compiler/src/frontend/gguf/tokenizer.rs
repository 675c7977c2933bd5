//! The tokenizer embedded in a GGUF file, rebuilt as a Hugging Face `tokenizers::Tokenizer`.
//!
//! Supported: `tokenizer.ggml.model == "gpt2"` (byte-level BPE) with one of the
//! pre-tokenizers below, named by `tokenizer.ggml.pre`. Each splits the text the way
//! llama.cpp (`llm_tokenizer_bpe` in `src/llama-vocab.cpp`, build b11434) does for that name:
//! a list of regexes applied one after the other, every match and every gap between matches
//! becoming a piece of its own, then the GPT-2 byte-to-unicode mapping and BPE by merge rank.
//!
//! | `tokenizer.ggml.pre` | llama.cpp pre-type | regexes |
//! |---|---|---|
//! | `smollm`, `starcoder`, `refact`, `command-r`, `codeshell`, `exaone`, `minerva` | SMOLLM etc. | `\p{N}`, GPT-2 |
//! | `gpt-2`, `gpt2`, `phi-2`, `jina-es`, `jina-de`, `jina-v2-es`, `jina-v2-de`, `mpt`, `olmo`, `jais`, `trillion`, `granite-docling`, `gigachat`, `mellum`, `a.x-4.0`, `exaone4` | GPT2 | GPT-2 |
//! | `default` (or no `tokenizer.ggml.pre`) | DEFAULT | punctuation runs, GPT-2, `\p{N}+`, `[0-9][0-9][0-9]` |
//! | `llama-bpe`, `llama3`, `llama-v3`, `falcon3`, `pixtral`, `falcon-h1`, `midm-2.0`, `lfm2` | LLAMA3 | the LLaMA-3 regex; a piece that is a whole vocabulary entry is not merged (`ignore_merges`) |
//!
//! Any other name is rejected with an error naming it. Control, unknown and user-defined
//! tokens (`tokenizer.ggml.token_type` 3, 2, 4) become added tokens, matched whole in the
//! text (as llama.cpp does with special-token parsing on); control and unknown ones are
//! marked special.

use edge_runtime::tokenizer::Tokenizer;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior};

use super::super::error::{FrontendError, Result};
use super::reader::{Array, GgufFile};

/// GPT-2's pre-tokenizer regex as llama.cpp writes it. Text it does not match (a lone
/// whitespace character before a non-space) becomes a piece of its own, as in GPT-2's
/// `...|\s+(?!\S)|\s+`.
pub const GPT2_REGEX: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
/// LLaMA-3's pre-tokenizer regex (llama.cpp's case-insensitive contractions spelled out).
pub const LLAMA3_REGEX: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// llama.cpp's DEFAULT pre-type (used when a file names no pre-tokenizer).
pub const DEFAULT_REGEXES: [&str; 4] = [r"[\p{P}\$\+<=>\^~\|]+", GPT2_REGEX, r"\p{N}+", "[0-9][0-9][0-9]"];

/// How a `tokenizer.ggml.pre` name splits text.
#[derive(Debug, Clone, PartialEq)]
pub struct PreTokenizerSpec {
    pub regexes: Vec<&'static str>,
    /// Take a piece that is itself a vocabulary entry as one token (LLaMA-3).
    pub ignore_merges: bool,
    /// llama.cpp's default for `add_bos_token` when the file does not say.
    pub add_bos_default: bool,
}

/// The pre-tokenizer for a `tokenizer.ggml.pre` value, or `None` if it is not supported.
pub fn pre_tokenizer_spec(pre: Option<&str>) -> Option<PreTokenizerSpec> {
    let spec = |regexes: Vec<&'static str>, ignore_merges, add_bos_default| PreTokenizerSpec {
        regexes,
        ignore_merges,
        add_bos_default,
    };
    Some(match pre.unwrap_or("default") {
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva" => {
            spec(vec![r"\p{N}", GPT2_REGEX], false, false)
        }
        "gpt-2" | "gpt2" | "phi-2" | "jina-es" | "jina-de" | "jina-v2-es" | "jina-v2-de" | "mpt" | "olmo"
        | "jais" | "trillion" | "granite-docling" | "gigachat" | "mellum" | "a.x-4.0" | "exaone4" => {
            spec(vec![GPT2_REGEX], false, false)
        }
        "default" => spec(DEFAULT_REGEXES.to_vec(), false, false),
        "llama-bpe" | "llama3" | "llama-v3" | "falcon3" | "pixtral" | "falcon-h1" | "midm-2.0" | "lfm2" => {
            spec(vec![LLAMA3_REGEX], true, true)
        }
        _ => return None,
    })
}

/// llama.cpp's token types (`tokenizer.ggml.token_type`).
const TYPE_UNKNOWN: i64 = 2;
const TYPE_CONTROL: i64 = 3;
const TYPE_USER_DEFINED: i64 = 4;

/// What [`build`] needs from the model config.
pub struct SpecialIds {
    pub bos: Option<u32>,
    pub eos: Vec<u32>,
    /// `tokenizer.ggml.add_bos_token`, if the file has it.
    pub add_bos: Option<bool>,
}

/// Builds the file's tokenizer. `Ok(None)` when the file carries no vocabulary
/// (`tokenizer.ggml.model` absent or `none` / `no_vocab`). The tokenizer's `add_bos` is the
/// file's `tokenizer.ggml.add_bos_token`, else llama.cpp's default for the pre-tokenizer.
pub fn build(f: &GgufFile, ids: &SpecialIds) -> Result<Option<Tokenizer>> {
    build_with_pre(f, ids, None)
}

/// [`build`], with `pre` (if given) in place of the file's `tokenizer.ggml.pre`: the same
/// vocabulary split by another pre-tokenizer (used to test each pre-tokenizer against
/// llama.cpp with one vocabulary).
pub fn build_with_pre(
    f: &GgufFile,
    ids: &SpecialIds,
    pre_override: Option<&str>,
) -> Result<Option<Tokenizer>> {
    let err = |msg: String| FrontendError::Tokenizer {
        path: f.path.clone(),
        msg,
    };
    let model = match f.get("tokenizer.ggml.model") {
        None => return Ok(None),
        Some(v) => v.as_str().ok_or_else(|| {
            err(format!(
                "`tokenizer.ggml.model` is a {}, not a string",
                v.value_type()
            ))
        })?,
    };
    match model {
        "none" | "no_vocab" => return Ok(None),
        "gpt2" => {}
        "llama" => {
            return Err(FrontendError::Unsupported {
                path: f.path.clone(),
                msg: "the GGUF's tokenizer is SentencePiece (`tokenizer.ggml.model` = `llama`); \
                      only byte-level BPE (`gpt2`) tokenizers are supported so far"
                    .into(),
            });
        }
        other => {
            return Err(FrontendError::Unsupported {
                path: f.path.clone(),
                msg: format!("tokenizer model `{other}` is not supported (only byte-level BPE, `gpt2`)"),
            });
        }
    }
    let pre = match f.get("tokenizer.ggml.pre") {
        _ if pre_override.is_some() => pre_override,
        None => None,
        Some(v) => Some(v.as_str().ok_or_else(|| {
            err(format!(
                "`tokenizer.ggml.pre` is a {}, not a string",
                v.value_type()
            ))
        })?),
    };
    let spec = pre_tokenizer_spec(pre).ok_or_else(|| FrontendError::Unsupported {
        path: f.path.clone(),
        msg: format!(
            "pre-tokenizer `{}` (`tokenizer.ggml.pre`) is not supported; supported: smollm, gpt-2, default, \
             llama-bpe and the names llama.cpp treats as one of them",
            pre.unwrap_or("")
        ),
    })?;
    if pre.is_none() {
        tracing::warn!(
            "{}: no `tokenizer.ggml.pre`; using llama.cpp's `default` pre-tokenizer",
            f.path
        );
    }

    let tokens = match f.get("tokenizer.ggml.tokens").and_then(|v| v.as_array()) {
        Some(Array::String(t)) => t,
        _ => {
            return Err(err(
                "`tokenizer.ggml.tokens` is missing or not an array of strings".into(),
            ));
        }
    };
    if tokens.len() > u32::MAX as usize {
        return Err(err(format!("{} tokens do not fit u32 ids", tokens.len())));
    }
    let types: Vec<i64> = match f.get("tokenizer.ggml.token_type") {
        None => vec![1; tokens.len()],
        Some(v) => {
            let t = v
                .as_array()
                .and_then(Array::to_i64s)
                .ok_or_else(|| err("`tokenizer.ggml.token_type` is not an array of integers".into()))?;
            if t.len() != tokens.len() {
                return Err(err(format!(
                    "`tokenizer.ggml.token_type` has {} entries for {} tokens",
                    t.len(),
                    tokens.len()
                )));
            }
            t
        }
    };
    let merges_raw: &[String] = match f.get("tokenizer.ggml.merges").map(|v| v.as_array()) {
        None => &[],
        Some(Some(Array::String(m))) => m,
        Some(_) => {
            return Err(err("`tokenizer.ggml.merges` is not an array of strings".into()));
        }
    };

    // Vocabulary: like llama.cpp, a later duplicate of a token text takes the text's id.
    let mut vocab = Vocab::with_capacity(tokens.len());
    let mut duplicates = 0usize;
    for (id, t) in tokens.iter().enumerate() {
        if vocab.insert(t.clone(), id as u32).is_some() {
            duplicates += 1;
        }
    }
    if duplicates > 0 {
        tracing::warn!(
            "{}: {duplicates} token texts appear more than once in the vocabulary",
            f.path
        );
    }
    let mut merges = Vec::with_capacity(merges_raw.len());
    let mut skipped = 0usize;
    for (i, m) in merges_raw.iter().enumerate() {
        // llama.cpp splits at the first space after the first byte.
        let pos = m
            .char_indices()
            .skip(1)
            .find(|&(_, c)| c == ' ')
            .map(|(p, _)| p)
            .ok_or_else(|| err(format!("merge #{i} `{m}` has no space between its two parts")))?;
        let (a, b) = (&m[..pos], &m[pos + 1..]);
        if vocab.contains_key(a) && vocab.contains_key(b) && vocab.contains_key(&format!("{a}{b}")) {
            merges.push((a.to_string(), b.to_string()));
        } else {
            skipped += 1;
        }
    }
    if skipped > 0 {
        tracing::warn!(
            "{}: {skipped} merges name tokens outside the vocabulary; ignored",
            f.path
        );
    }

    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .ignore_merges(spec.ignore_merges)
        .build()
        .map_err(|e| err(format!("building the BPE model: {e}")))?;
    let mut inner = tokenizers::Tokenizer::new(bpe);
    let mut pre_tokenizers: Vec<PreTokenizerWrapper> = Vec::new();
    for r in &spec.regexes {
        let split = Split::new(
            SplitPattern::Regex(r.to_string()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| err(format!("pre-tokenizer regex `{r}`: {e}")))?;
        pre_tokenizers.push(split.into());
    }
    // The byte-to-unicode mapping only; the splitting was done above.
    pre_tokenizers.push(ByteLevel::new(false, false, false).into());
    inner.with_pre_tokenizer(Some(Sequence::new(pre_tokenizers)));
    inner.with_decoder(Some(ByteLevelDecoder::new(false, false, false)));

    let added: Vec<AddedToken> = tokens
        .iter()
        .zip(&types)
        .filter(|&(_, &ty)| matches!(ty, TYPE_CONTROL | TYPE_UNKNOWN | TYPE_USER_DEFINED))
        .map(|(t, &ty)| AddedToken::from(t.clone(), ty != TYPE_USER_DEFINED).normalized(false))
        .collect();
    let n_added = added.len();
    inner
        .add_tokens(added)
        .map_err(|e| err(format!("adding the special tokens: {e}")))?;
    tracing::debug!(
        "{}: tokenizer gpt2/{}: {} tokens, {} merges, {n_added} added tokens",
        f.path,
        pre.unwrap_or("default"),
        tokens.len(),
        merges_raw.len() - skipped
    );
    let add_bos = ids.add_bos.unwrap_or(spec.add_bos_default);
    Ok(Some(Tokenizer::new(inner, add_bos, ids.bos, ids.eos.clone())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_and_unknown_pre_tokenizers() {
        assert_eq!(
            pre_tokenizer_spec(Some("smollm")).unwrap().regexes,
            vec![r"\p{N}", GPT2_REGEX]
        );
        assert_eq!(
            pre_tokenizer_spec(Some("gpt-2")).unwrap().regexes,
            vec![GPT2_REGEX]
        );
        assert_eq!(pre_tokenizer_spec(None).unwrap().regexes.len(), 4);
        let l3 = pre_tokenizer_spec(Some("llama-bpe")).unwrap();
        assert!(l3.ignore_merges && l3.add_bos_default);
        assert!(pre_tokenizer_spec(Some("qwen2")).is_none());
    }

    #[test]
    fn regexes_compile() {
        for r in [GPT2_REGEX, LLAMA3_REGEX].iter().chain(DEFAULT_REGEXES.iter()) {
            Split::new(
                SplitPattern::Regex(r.to_string()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .unwrap();
        }
    }
}
