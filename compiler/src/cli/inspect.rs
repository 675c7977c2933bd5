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
    #[command(flatten)]
    schedule: ScheduleArgs,
    /// Print a JSON document instead of text.
    #[arg(long)]
    json: bool,
}

/// `--schedule`: the scheduling pass's plan for a target (`docs/schedule.md`).
#[derive(Args)]
pub struct ScheduleArgs {
    /// Print the plan of the scheduling pass for --target: each op's cost, tile, threads,
    /// residency, predicted time and memory; the arena and the budget's split.
    #[arg(long)]
    schedule: bool,
    /// Target of the plan (a name or a .toml path; `host` is this machine).
    #[arg(long, requires = "schedule", default_value = "host")]
    target: String,
    /// Folder to look for target names in first.
    #[arg(long, requires = "schedule")]
    targets_dir: Option<std::path::PathBuf>,
    /// Memory the plan may use (e.g. 150MB, 1.5GiB); default: the target's budget.
    #[arg(long, requires = "schedule", value_parser = edgec::target::parse_size)]
    memory_budget: Option<u64>,
    /// Positions of the KV cache the plan holds.
    #[arg(long, requires = "schedule", default_value_t = 512)]
    ctx: usize,
    /// Token rows of the planned step (default: as `edgec build` plans, a prefill of the
    /// whole --ctx with logits for its second half); with --past, a step after that many
    /// cached positions (logits of its last row).
    #[arg(long, requires = "schedule")]
    rows: Option<usize>,
    /// Memory the runtime needs besides the plan (as `edgec build --runtime-memory`).
    #[arg(long, requires = "schedule", value_parser = edgec::target::parse_size)]
    runtime_memory: Option<u64>,
    /// Cached positions before the planned step.
    #[arg(long, requires = "schedule", default_value_t = 0)]
    past: usize,
    /// With --train: tokens of a tuning sample (plans keep vs recompute of the window).
    #[arg(long, requires = "schedule", default_value_t = 256)]
    seq: usize,
    /// Also time every op on this machine (the step of --rows/--past) and compare with the
    /// predictions: per op kind, Spearman rank correlation, total error.
    #[arg(long, requires = "schedule")]
    measure: bool,
    /// Repetitions of each timed op (the median is kept).
    #[arg(long, requires = "measure", default_value_t = 9)]
    reps: usize,
    /// Kernels of the measured run.
    #[arg(long, requires = "measure", value_enum, default_value = "jit")]
    kernels: edgec::codegen::KernelMode,
}

pub fn run(a: InspectArgs) -> anyhow::Result<()> {
    let m = super::load_model(&a.model, &LoadOptions::default())?;
    if a.schedule.schedule {
        return schedule(&a, m.graph);
    }
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

/// The window `A:B` of `--train`.
fn parse_window(w: &str) -> anyhow::Result<(usize, usize)> {
    let (s, e) = w
        .split_once(':')
        .ok_or_else(|| anyhow::anyhow!("--train takes A:B (got `{w}`)"))?;
    Ok((s.trim().parse()?, e.trim().parse()?))
}

/// `--schedule`: plans the graph, prints the plan, optionally times it here.
fn schedule(a: &InspectArgs, graph: edge_runtime::ir::Graph) -> anyhow::Result<()> {
    use edgec::schedule::{self, Options, cost::Workload, measure};
    let sa = &a.schedule;
    let t = edgec::target::resolve(&sa.target, sa.targets_dir.as_deref())?;
    anyhow::ensure!(sa.ctx > 0, "--ctx must be positive");
    let rows = sa.rows.unwrap_or(sa.ctx.saturating_sub(sa.past));
    anyhow::ensure!(
        rows > 0 && sa.past + rows <= sa.ctx,
        "--past {} + --rows {rows} must be within --ctx {}",
        sa.past,
        sa.ctx
    );
    let mut o = Options::for_context(sa.ctx);
    o.budget = sa.memory_budget;
    if sa.rows.is_some() || sa.past > 0 {
        o.workload = Workload {
            rows,
            past: sa.past,
            out_rows: 1,
        };
    }
    if let Some(r) = sa.runtime_memory {
        o.runtime_bytes = r;
    }
    if let Some(w) = &a.train {
        let (s, e) = parse_window(w)?;
        o.train = Some((s..=e, sa.seq));
    }
    let (graph, plan) = schedule::schedule(graph, &t, &o)?;
    let comparison = if sa.measure {
        let exec = edgec::codegen::executor(std::sync::Arc::new(graph), sa.kernels)?;
        let pb = super::progress_bar(sa.reps as u64, "timing the ops");
        let m = measure::measure(&exec, &o.workload, sa.reps, |d, _| pb.set_position(d as u64))?;
        pb.finish_and_clear();
        Some((measure::compare(&plan, &m), m))
    } else {
        None
    };
    if a.json {
        let doc = json!({
            "target": t,
            "schedule": plan,
            "measured": comparison.as_ref().map(|(c, m)| json!({"comparison": c, "node_seconds": m.node_seconds, "reps": m.reps})),
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(());
    }
    print!("{plan}");
    if let Some((c, _)) = comparison {
        println!(
            "\nmeasured on this machine ({} rows after {}), seconds summed per op kind:",
            c.workload.rows, c.workload.past
        );
        println!(
            "  {:<12} {:>12} {:>12} {:>8}",
            "op", "predicted ms", "measured ms", "ratio"
        );
        for (k, p, m) in &c.kinds {
            println!("  {k:<12} {:>12.3} {:>12.3} {:>8.2}", p * 1e3, m * 1e3, p / m);
        }
        println!(
            "  step: predicted {:.3} ms, measured {:.3} ms (ops alone {:.3} ms): total error {:+.1}%",
            c.predicted_seconds * 1e3,
            c.measured_step_seconds * 1e3,
            c.measured_nodes_seconds * 1e3,
            c.total_error * 100.0
        );
        println!(
            "  Spearman rank correlation: {:.3} over op kinds, {:.3} over ops",
            c.spearman_kinds, c.spearman_nodes
        );
    }
    Ok(())
}
