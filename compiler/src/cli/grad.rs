//! `edgec grad`: the LoRA gradients of the compiler's training graph for given adapters,
//! written under each adapter tensor's own name, to check against another framework.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use edge_runtime::train::lora::{parse_adapter_name, read_f32_safetensors, write_f32_safetensors};
use edge_runtime::train::{Grads, LoraConfig, Module, Params, TrainGraph, TrainRunner, WindowSpec};

#[derive(Args)]
#[command(after_help = "\
The loss is transformers' causal-LM loss with labels = input ids: the mean over every position of \
every sequence of the next-token cross-entropy. Without --exit it is taken at the final layer and \
the backward runs through every layer; with --exit E it is taken at layer E through the model's \
final norm and LM head, and the backward runs only through --window A:B (B = E). \
Adapter tensors may use PEFT's names (base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight) \
or the short form layers.0.q_proj.lora_A; other tensors in the file are ignored. Rank and targets come \
from the tensors; alpha from --alpha or the adapter_config.json beside the file.")]
pub struct GradArgs {
    #[command(flatten)]
    model: super::ModelArgs,
    /// Token sequences: one per line, space-separated ids.
    #[arg(long)]
    tokens: PathBuf,
    /// Adapter tensors (safetensors).
    #[arg(long)]
    adapters: PathBuf,
    /// LoRA alpha (default: adapter_config.json beside --adapters).
    #[arg(long)]
    alpha: Option<f32>,
    /// Take the loss at this layer's exit.
    #[arg(long)]
    exit: Option<usize>,
    /// Layers the backward goes through, `A:B` (default: all layers up to the exit).
    #[arg(long)]
    window: Option<String>,
    #[arg(long, short = 'o')]
    output: PathBuf,
    #[arg(long)]
    json: bool,
}

impl GradArgs {
    pub fn threads(&self) -> Option<usize> {
        self.model.threads
    }
}

/// An adapter tensor of the input file: name, (layer, module, A or B), shape.
type AdapterTensor = (String, (usize, Module, char), Vec<usize>);

pub fn run(a: GradArgs) -> anyhow::Result<()> {
    let model = a.model.load()?;
    let g = &model.graph;
    let layers = g.config.num_layers;
    let text = super::read_text(&a.tokens)?;
    let seqs = edgec::eval::parse_token_file(&text, g.config.vocab_size)
        .map_err(|e| anyhow::anyhow!("{}: {e}", a.tokens.display()))?;
    let file = read_f32_safetensors(&a.adapters)?;
    let named: Vec<AdapterTensor> = file
        .iter()
        .filter_map(|(n, (shape, _))| parse_adapter_name(n).map(|p| (n.clone(), p, shape.clone())))
        .filter(|(n, _, _)| !n.ends_with(".grad"))
        .collect();
    anyhow::ensure!(
        !named.is_empty(),
        "{}: no LoRA adapter tensors (lora_A / lora_B)",
        a.adapters.display()
    );
    let rank = named
        .iter()
        .find(|n| n.1.2 == 'A')
        .map(|n| n.2[0])
        .context("no lora_A tensor")?;
    let mut targets: Vec<Module> = named.iter().map(|n| n.1.1).collect();
    targets.sort();
    targets.dedup();
    let alpha = match a.alpha {
        Some(x) => x,
        None => {
            let cfg = a.adapters.with_file_name("adapter_config.json");
            let v: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(&cfg)
                    .with_context(|| format!("no --alpha and no {} to read it from", cfg.display()))?,
            )?;
            v["lora_alpha"]
                .as_f64()
                .context("adapter_config.json has no lora_alpha")? as f32
        }
    };
    let exit = a.exit.unwrap_or(layers - 1);
    let window = match &a.window {
        Some(w) => {
            let (s, e) = w.split_once(':').context("--window is A:B")?;
            let (s, e): (usize, usize) = (s.trim().parse()?, e.trim().parse()?);
            s..=e
        }
        None => 0..=exit,
    };
    let spec = WindowSpec::new(window, exit, layers)?;
    let mut p = Params::new(g, LoraConfig { rank, alpha, targets }, &[exit], false, false, 0)?;
    for (name, _, _) in &named {
        let id = p.lookup(name).expect("parsed names map to adapters");
        let (shape, data) = &file[name];
        anyhow::ensure!(
            &p.tensors[id.0].shape == shape,
            "{name}: shape {shape:?}, the model needs {:?}",
            p.tensors[id.0].shape
        );
        p.tensors[id.0].data = data.clone();
    }
    let tg = TrainGraph::build(g, &p, spec)?;
    let runner = TrainRunner::new(g, &p);
    let mut grads = Grads::zeros(&p, &tg.updates);
    let scored: usize = seqs.iter().map(|s| s.len().saturating_sub(1)).sum();
    anyhow::ensure!(scored > 0, "no sequence has two tokens");
    let mut loss = 0.0;
    for s in &seqs {
        loss += runner.step(&tg, s, None, 1.0 / scored as f32, &mut grads)?.loss;
    }
    // One gradient per adapter tensor of the file, under its own name (zeros outside the window).
    let out: Vec<(String, Vec<f32>, Vec<usize>)> = named
        .iter()
        .map(|(name, _, shape)| {
            let id = p.lookup(name).expect("mapped above");
            let g = grads
                .tensors
                .get(&id)
                .cloned()
                .unwrap_or_else(|| vec![0.0; shape.iter().product()]);
            (name.clone(), g, shape.clone())
        })
        .collect();
    let views: Vec<(String, &[f32], &[usize])> = out
        .iter()
        .map(|(n, g, s)| (n.clone(), g.as_slice(), s.as_slice()))
        .collect();
    write_f32_safetensors(&a.output, &views, None)?;
    if a.json {
        println!(
            "{}",
            serde_json::json!({"loss": loss, "tensors": out.len(), "in_window": tg.updates.len(), "output": a.output})
        );
    } else {
        println!(
            "loss {loss:.6}; {} gradient tensors ({} inside the window) -> {}",
            out.len(),
            tg.updates.len(),
            a.output.display()
        );
    }
    Ok(())
}
