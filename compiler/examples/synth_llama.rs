//! Writes a synthetic LLaMA model (Hugging Face layout: `config.json` + one f16
//! `model.safetensors`) with small random weights, by default of LLaMA-7B's shapes (hidden
//! 4096, intermediate 11008, 32 layers, 32 heads, 32 KV heads, vocabulary 32000; 13.5 GB).
//! The tensors are generated and written one chunk at a time, so the generator needs a few
//! MB whatever the model's size. No tokenizer is written (`edgec build` does not need one).
//!
//! `cargo run --release -p edgec --example synth_llama -- OUT_DIR [--layers 2 ...]`
//! (used by `scripts/bench-build-7b.sh`).

use std::io::{BufWriter, Write};
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use half::f16;

#[derive(Parser)]
#[command(about = "Write a synthetic LLaMA model (f16 safetensors + config.json) with small random weights")]
struct Args {
    /// Output directory (created).
    out: PathBuf,
    #[arg(long, default_value_t = 4096)]
    hidden: usize,
    #[arg(long, default_value_t = 11008)]
    intermediate: usize,
    #[arg(long, default_value_t = 32)]
    layers: usize,
    #[arg(long, default_value_t = 32)]
    heads: usize,
    #[arg(long, default_value_t = 32)]
    kv_heads: usize,
    #[arg(long, default_value_t = 32000)]
    vocab: usize,
    #[arg(long, default_value_t = 7)]
    seed: u64,
}

/// xorshift64*: a small, fast generator (the weights only need to look random).
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// The tensors in the order written: (name, shape, is a norm weight).
fn tensors(a: &Args) -> Vec<(String, Vec<usize>, bool)> {
    let (h, i, kv) = (a.hidden, a.intermediate, a.kv_heads * (a.hidden / a.heads));
    let mut t = vec![("model.embed_tokens.weight".to_string(), vec![a.vocab, h], false)];
    for l in 0..a.layers {
        let p = format!("model.layers.{l}");
        t.push((format!("{p}.input_layernorm.weight"), vec![h], true));
        t.push((format!("{p}.self_attn.q_proj.weight"), vec![h, h], false));
        t.push((format!("{p}.self_attn.k_proj.weight"), vec![kv, h], false));
        t.push((format!("{p}.self_attn.v_proj.weight"), vec![kv, h], false));
        t.push((format!("{p}.self_attn.o_proj.weight"), vec![h, h], false));
        t.push((format!("{p}.post_attention_layernorm.weight"), vec![h], true));
        t.push((format!("{p}.mlp.gate_proj.weight"), vec![i, h], false));
        t.push((format!("{p}.mlp.up_proj.weight"), vec![i, h], false));
        t.push((format!("{p}.mlp.down_proj.weight"), vec![h, i], false));
    }
    t.push(("model.norm.weight".into(), vec![h], true));
    t.push(("lm_head.weight".into(), vec![a.vocab, h], false));
    t
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    anyhow::ensure!(
        a.heads > 0
            && a.hidden.is_multiple_of(a.heads)
            && a.kv_heads > 0
            && a.heads.is_multiple_of(a.kv_heads),
        "hidden {} / heads {} / kv heads {} do not divide",
        a.hidden,
        a.heads,
        a.kv_heads
    );
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": a.hidden,
        "intermediate_size": a.intermediate,
        "num_hidden_layers": a.layers,
        "num_attention_heads": a.heads,
        "num_key_value_heads": a.kv_heads,
        "vocab_size": a.vocab,
        "hidden_act": "silu",
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "tie_word_embeddings": false,
        "torch_dtype": "float16",
    });
    std::fs::write(a.out.join("config.json"), serde_json::to_string_pretty(&config)?)?;

    // The safetensors header: tensors back to back in the order above.
    let list = tensors(&a);
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (name, shape, _) in &list {
        let n = 2 * shape.iter().product::<usize>();
        header.insert(
            name.clone(),
            serde_json::json!({ "dtype": "F16", "shape": shape, "data_offsets": [offset, offset + n] }),
        );
        offset += n;
    }
    let mut text = serde_json::to_string(&header)?;
    // Pad the header with spaces so the data starts 8-byte aligned.
    while !(8 + text.len()).is_multiple_of(8) {
        text.push(' ');
    }
    let path = a.out.join("model.safetensors");
    let file = std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
    let mut w = BufWriter::with_capacity(8 << 20, file);
    w.write_all(&(text.len() as u64).to_le_bytes())?;
    w.write_all(text.as_bytes())?;

    // A table of 4096 values ~ N(0, 0.02) (sums of uniforms), indexed by 12 random bits.
    let mut rng = Rng::new(a.seed);
    let table: Vec<[u8; 2]> = (0..4096)
        .map(|_| {
            let s: f32 = (0..4)
                .map(|_| (rng.next() >> 40) as f32 / (1u64 << 24) as f32 - 0.5)
                .sum();
            f16::from_f32(s * 0.04).to_le_bytes()
        })
        .collect();
    let one = f16::from_f32(1.0).to_le_bytes();
    let mut chunk = vec![0u8; 1 << 21];
    for (name, shape, norm) in &list {
        let mut left = 2 * shape.iter().product::<usize>();
        while left > 0 {
            let n = left.min(chunk.len());
            for pair in chunk[..n].chunks_exact_mut(10) {
                let r = rng.next();
                for (k, v) in pair.chunks_exact_mut(2).enumerate() {
                    v.copy_from_slice(if *norm {
                        &one
                    } else {
                        &table[(r >> (12 * k)) as usize & 4095]
                    });
                }
            }
            // A tail shorter than 10 bytes.
            let tail = n - n % 10;
            for v in chunk[tail..n].chunks_exact_mut(2) {
                v.copy_from_slice(if *norm {
                    &one
                } else {
                    &table[rng.next() as usize & 4095]
                });
            }
            w.write_all(&chunk[..n])
                .with_context(|| format!("writing {name}"))?;
            left -= n;
        }
    }
    w.flush()?;
    let size = w.get_ref().metadata()?.len();
    println!("{} {size} bytes, {} tensors", path.display(), list.len());
    Ok(())
}
