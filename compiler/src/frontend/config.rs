//! Hugging Face `config.json` for LLaMA-family models, as transformers 4 and 5 write it.

use std::path::Path;

use edge_runtime::ir::ModelConfig;
use serde_json::Value;

use super::error::{FrontendError, Result};

/// Reads and validates a `config.json`.
pub fn read_hf_config(path: &Path) -> Result<ModelConfig> {
    let p = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| FrontendError::Io {
        path: p.clone(),
        source,
    })?;
    parse_hf_config(&text, &p)
}

/// Parses the text of a `config.json`. `path` is used in error messages.
pub fn parse_hf_config(text: &str, path: &str) -> Result<ModelConfig> {
    let cfg_err = |msg: String| FrontendError::Config {
        path: path.to_string(),
        msg,
    };
    let v: Value = serde_json::from_str(text).map_err(|e| cfg_err(format!("not JSON: {e}")))?;
    let obj = v.as_object().ok_or_else(|| cfg_err("not a JSON object".into()))?;

    let model_type = obj.get("model_type").and_then(Value::as_str).unwrap_or("");
    let archs: Vec<&str> = obj
        .get("architectures")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let is_llama = model_type == "llama" || archs.contains(&"LlamaForCausalLM");
    if !is_llama {
        return Err(FrontendError::Unsupported {
            path: path.to_string(),
            msg: format!(
                "model_type `{model_type}` (architectures {archs:?}) is not LLaMA; only LlamaForCausalLM is supported"
            ),
        });
    }

    let usize_field = |name: &str| -> Result<usize> {
        obj.get(name)
            .and_then(Value::as_u64)
            .map(|x| x as usize)
            .ok_or_else(|| cfg_err(format!("`{name}` is missing or not a non-negative integer")))
    };
    let opt_usize = |name: &str| obj.get(name).and_then(Value::as_u64).map(|x| x as usize);

    let hidden_size = usize_field("hidden_size")?;
    let num_heads = usize_field("num_attention_heads")?;
    let num_kv_heads = opt_usize("num_key_value_heads").unwrap_or(num_heads);
    let head_dim = match opt_usize("head_dim") {
        Some(h) => h,
        None => {
            if num_heads == 0 || hidden_size % num_heads != 0 {
                return Err(cfg_err(format!(
                    "hidden_size {hidden_size} is not divisible by num_attention_heads {num_heads}"
                )));
            }
            hidden_size / num_heads
        }
    };

    // transformers 5 moves RoPE settings under `rope_parameters`; 4.x writes `rope_theta`
    // and an optional `rope_scaling` at the top level.
    let rope_params = obj.get("rope_parameters").and_then(Value::as_object);
    let rope_theta = rope_params
        .and_then(|r| r.get("rope_theta"))
        .or_else(|| obj.get("rope_theta"))
        .and_then(Value::as_f64)
        .unwrap_or(10000.0);
    let rope_type = rope_params
        .and_then(|r| r.get("rope_type").or_else(|| r.get("type")))
        .or_else(|| {
            obj.get("rope_scaling")
                .and_then(Value::as_object)
                .and_then(|r| r.get("rope_type").or_else(|| r.get("type")))
        })
        .and_then(Value::as_str)
        .unwrap_or("default");
    if rope_type != "default" {
        return Err(FrontendError::Unsupported {
            path: path.to_string(),
            msg: format!("RoPE type `{rope_type}` is not supported (only `default`)"),
        });
    }
    for flag in ["attention_bias", "mlp_bias"] {
        if obj.get(flag).and_then(Value::as_bool) == Some(true) {
            return Err(FrontendError::Unsupported {
                path: path.to_string(),
                msg: format!("`{flag}: true` is not supported"),
            });
        }
    }
    if let Some(act) = obj.get("hidden_act").and_then(Value::as_str)
        && act != "silu"
    {
        return Err(FrontendError::Unsupported {
            path: path.to_string(),
            msg: format!("hidden_act `{act}` is not supported (only silu)"),
        });
    }

    let eos_token_ids = match obj.get("eos_token_id") {
        Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_u64).map(|x| x as u32).collect(),
        _ => vec![],
    };
    let config = ModelConfig {
        vocab_size: usize_field("vocab_size")?,
        hidden_size,
        intermediate_size: usize_field("intermediate_size")?,
        num_layers: usize_field("num_hidden_layers")?,
        num_heads,
        num_kv_heads,
        head_dim,
        rms_norm_eps: obj.get("rms_norm_eps").and_then(Value::as_f64).unwrap_or(1e-6) as f32,
        rope_theta: rope_theta as f32,
        max_position_embeddings: opt_usize("max_position_embeddings").unwrap_or(2048),
        tie_word_embeddings: obj
            .get("tie_word_embeddings")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        bos_token_id: obj.get("bos_token_id").and_then(Value::as_u64).map(|x| x as u32),
        eos_token_ids,
        add_bos_token: false,
    };
    config.validate().map_err(|e| cfg_err(e.to_string()))?;
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    const V5: &str = r#"{"architectures":["LlamaForCausalLM"],"model_type":"llama","vocab_size":256,
      "hidden_size":64,"intermediate_size":176,"num_hidden_layers":4,"num_attention_heads":4,
      "num_key_value_heads":2,"rms_norm_eps":1e-5,"rope_parameters":{"rope_theta":5000.0,"rope_type":"default"},
      "tie_word_embeddings":false}"#;

    #[test]
    fn reads_transformers5_rope_parameters() {
        let c = parse_hf_config(V5, "c").unwrap();
        assert_eq!(c.rope_theta, 5000.0);
        assert_eq!(c.head_dim, 16);
        assert_eq!(c.num_kv_heads, 2);
    }

    #[test]
    fn reads_transformers4_top_level_rope_theta() {
        let v4 = V5.replace(
            r#""rope_parameters":{"rope_theta":5000.0,"rope_type":"default"}"#,
            r#""rope_theta":100000.0,"rope_scaling":null"#,
        );
        assert_eq!(parse_hf_config(&v4, "c").unwrap().rope_theta, 100000.0);
    }

    #[test]
    fn rejects_non_llama() {
        let gpt2 = r#"{"model_type":"gpt2","architectures":["GPT2LMHeadModel"],"vocab_size":5}"#;
        let err = parse_hf_config(gpt2, "x/config.json").unwrap_err().to_string();
        assert!(err.contains("gpt2") && err.contains("not LLaMA"), "{err}");
    }

    #[test]
    fn rejects_unknown_rope_type() {
        let c = V5.replace(r#""rope_type":"default""#, r#""rope_type":"yarn""#);
        let err = parse_hf_config(&c, "c").unwrap_err().to_string();
        assert!(err.contains("yarn"), "{err}");
    }
}
