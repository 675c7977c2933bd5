//! `edgec inspect`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use clap::Args;
use edgec::frontend::LoadOptions;
use serde_json::json;

#[derive(Args)]
pub struct InspectArgs {
    /// Model: a HF safetensors directory, a .gguf file or a .onnx file.
    model: PathBuf,
    /// Also print the IR graph, node by node.
    #[arg(long)]
    graph: bool,
    /// List every tensor of the source file.
    #[arg(long)]
    tensors: bool,
    /// Print the truncated training graph of a window `A:B` (loss at exit B, LoRA rank 8
    /// on every projection): prefix, window forward, backward, update.
    #[arg(long, value_name = "A:B")]
    train: Option<String>,
    /// With --train: recompute each window layer's activations before its backward.
    #[arg(long, requires = "train")]
    recompute: bool,
    /// Print a JSON document instead of text.
    #[arg(long)]
    json: bool,
}

pub fn run(a: InspectArgs) -> anyhow::Result<()> {
    let m = super::load_model(&a.model, &LoadOptions::default())?;
    let g = &m.graph;
    let c = &g.config;
    let mut by_type: BTreeMap<String, (usize, u64)> = BTreeMap::new();
    for t in &m.source_tensors {
        let e = by_type.entry(t.dtype.clone()).or_default();
        e.0 += 1;
        e.1 += t.bytes;
    }
    let file_bytes: u64 = m.source_tensors.iter().map(|t| t.bytes).sum();
    let params: usize = g.weights.iter().map(|w| w.data.numel()).sum();
    let mapped = g.weights.iter().filter(|w| w.data.is_mapped()).count();
    if a.json {
        let doc = json!({
            "path": a.model.display().to_string(),
            "format": m.format,
            "config": c,
            "parameters": params,
            "tensor_bytes_in_file": file_bytes,
            "weight_bytes_loaded": g.weight_bytes(),
            "weights_mapped": mapped,
            "weights": g.weights.len(),
            "tensor_types": by_type.iter().map(|(k, (n, b))| json!({"type": k, "tensors": n, "bytes": b})).collect::<Vec<_>>(),
            "tensors": if a.tensors { json!(m.source_tensors) } else { json!(null) },
            "metadata": m.metadata.iter().map(|(k, v)| (k.clone(), json!(v))).collect::<serde_json::Map<_, _>>(),
            "tokenizer": m.tokenizer.as_ref().map(|t| json!({"vocab": t.vocab_size(), "add_bos": t.add_bos, "bos": t.bos, "eos": t.eos})),
            "graph": if a.graph { json!(g.to_string().lines().collect::<Vec<_>>()) } else { json!(null) },
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(());
    }
    println!("model      {} ({:?})", a.model.display(), m.format);
    println!(
        "config     llama: {} layers, hidden {}, ffn {}, heads {}/{} kv (head dim {}), vocab {}",
        c.num_layers,
        c.hidden_size,
        c.intermediate_size,
        c.num_heads,
        c.num_kv_heads,
        c.head_dim,
        c.vocab_size
    );
    println!(
        "           rope theta {}, rms eps {:e}, max positions {}, tied embeddings {}",
        c.rope_theta, c.rms_norm_eps, c.max_position_embeddings, c.tie_word_embeddings
    );
    println!("parameters {params} ({:.1} M)", params as f64 / 1e6);
    println!(
        "bytes      {file_bytes} in the file's tensors; {} as loaded ({mapped} of {} weights mapped without copy)",
        g.weight_bytes(),
        g.weights.len()
    );
    for (t, (n, b)) in &by_type {
        println!("  {t:<6} {n:>4} tensors {b:>12} bytes");
    }
    if let Some(t) = &m.tokenizer {
        println!(
            "tokenizer  vocab {}, add_bos {}, bos {:?}, eos {:?}",
            t.vocab_size(),
            t.add_bos,
            t.bos,
            t.eos
        );
    } else {
        println!("tokenizer  none");
    }
    for (k, v) in &m.metadata {
        println!("  {k} = {v}");
    }
    if a.tensors {
        for t in &m.source_tensors {
            println!("  {:<50} {:<6} {:?} {}", t.name, t.dtype, t.shape, t.bytes);
        }
    }
    if a.graph {
        print!("{g}");
    }
    if let Some(w) = &a.train {
        use edge_runtime::train::{LoraConfig, Module, Params, TrainGraph, WindowSpec};
        let (s, e) = w
            .split_once(':')
            .ok_or_else(|| anyhow::anyhow!("--train takes A:B (got `{w}`)"))?;
        let (s, e): (usize, usize) = (s.trim().parse()?, e.trim().parse()?);
        let lora = LoraConfig {
            rank: 8,
            alpha: 16.0,
            targets: Module::ALL.to_vec(),
        };
        let p = Params::new(g, lora, &[e], e + 1 < c.num_layers, false, 0)?;
        let tg = TrainGraph::build(
            g,
            &p,
            WindowSpec::new(s..=e, e, c.num_layers)?.with_recompute(a.recompute),
        )?;
        print!("{tg}");
    }
    Ok(())
}
