//! `edgec tune`: LoRA tuning on local text, by Edge-LLM's adaptive layer schedule or a
//! baseline, with checkpoints, resume and a validation report per exit and voting mode.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, ValueEnum};
use edge_runtime::Executor;
use edge_runtime::ir::Graph;
use edge_runtime::train::lora::parse_targets;
use edge_runtime::train::tune::{TuneConfig, TuneMode, Tuner, exit_layers, rss_bytes};
use edge_runtime::train::vote::{ExitEval, Tuned, Vote, evaluate_exits, fit_weights};
use edge_runtime::train::{LoraConfig, Params};

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum ModeArg {
    /// Edge-LLM: a window of --stride layers ending at each exit, shallow to deep.
    Edge,
    /// Full-depth LoRA: loss at the final layer, backward through every layer.
    Full,
    /// The last --k layers only, loss at the final layer.
    LastK,
}

#[derive(Args)]
#[command(after_help = "\
Edge mode puts an exit every --stride layers (or at --exits) and splits --steps evenly over the \
exits, shallow to deep (the remainder goes to the last). Phase p trains the LoRA adapters of the \
layers (previous exit, exit p] and the exit's own RMSNorm, with the loss at exit p: the backward \
goes only through those layers, and nothing above exit p runs. With the prefix cache (default) \
the frozen layers below the window run once per sample per phase.\n\n\
The output directory gets adapter_model.safetensors + adapter_config.json (PEFT's layout and \
names: PeftModel.from_pretrained loads them on the same base model), exit_heads.safetensors \
(the exits' norms), voting.json (weights fitted on --valid) and checkpoints/.\n\n\
With --device URL, tunes on a device instead: `edgec tune --device URL --help`.")]
pub struct TuneArgs {
    #[command(flatten)]
    model: super::ModelArgs,
    /// Compress the model by this LUC policy (round-to-nearest + magnitude) before tuning.
    /// A model already compressed by `edgec compress` is given as --model instead.
    #[arg(long)]
    policy: Option<PathBuf>,
    /// Training text (UTF-8).
    #[arg(long)]
    data: PathBuf,
    /// Validation text: perplexity per exit and per voting mode after tuning.
    #[arg(long)]
    valid: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = ModeArg::Edge)]
    mode: ModeArg,
    /// Layers per window (edge mode); must divide the number of layers unless --exits is given.
    #[arg(long, default_value_t = 6)]
    stride: usize,
    /// Exit layers, comma-separated (edge mode; default every --stride layers).
    #[arg(long, value_delimiter = ',')]
    exits: Option<Vec<usize>>,
    /// Layers trained by --mode last-k.
    #[arg(long, default_value_t = 6)]
    k: usize,
    #[arg(long, default_value_t = 8)]
    rank: usize,
    /// LoRA alpha (scale = alpha / rank); default 2 x rank.
    #[arg(long)]
    alpha: Option<f32>,
    /// Projections with adapters: `all` or a list of q,k,v,o,gate,up,down.
    #[arg(long, default_value = "all")]
    targets: String,
    #[arg(long, default_value_t = 100)]
    steps: usize,
    /// Tokens per training sequence.
    #[arg(long, default_value_t = 256)]
    seq: usize,
    /// Sequences per micro-batch.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 1)]
    grad_accum: usize,
    #[arg(long, default_value_t = 4e-4)]
    lr: f32,
    #[arg(long, default_value_t = 0.01)]
    weight_decay: f32,
    /// Warmup steps (per phase in edge mode).
    #[arg(long, default_value_t = 0)]
    warmup: usize,
    /// Cosine decay floor as a fraction of --lr.
    #[arg(long, default_value_t = 0.1)]
    min_lr_ratio: f32,
    /// Learning rate of the exits' norms (and heads): they start far from what an early
    /// layer needs, so they learn faster than the adapters. Follows the same schedule.
    #[arg(long, default_value_t = 0.1)]
    exit_lr: f32,
    /// Gradient clipping by global norm (0: off).
    #[arg(long, default_value_t = 1.0)]
    clip: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Train on the first N samples of --data only (a small local dataset seen for several
    /// epochs; the prefix cache then serves repeated samples within a phase).
    #[arg(long)]
    max_samples: Option<usize>,
    /// Keep only each window layer's input and recompute its activations before its
    /// backward (less memory, one more forward of the window).
    #[arg(long)]
    recompute: bool,
    /// Kernels for the frozen compressed weights (`--policy`): `jit` (generated CLIF
    /// compiled for this machine, forward and backward products) or `reference` (plain Rust).
    #[arg(long, value_enum, default_value = "reference")]
    kernels: edgec::codegen::KernelMode,
    /// Run the frozen prefix on every step instead of caching its output per sample.
    #[arg(long)]
    no_prefix_cache: bool,
    /// Keep the exits' RMSNorms frozen (the model's final norm).
    #[arg(long)]
    freeze_exit_norms: bool,
    /// Train a full copy of the LM head per exit (memory: vocab x hidden floats each).
    #[arg(long)]
    train_exit_heads: bool,
    /// Checkpoint every K steps (0: only at the end).
    #[arg(long, default_value_t = 20)]
    checkpoint_every: usize,
    /// Continue from the last checkpoint in the output directory.
    #[arg(long)]
    resume: bool,
    /// Validation chunks (llama.cpp protocol; default all).
    #[arg(long)]
    valid_chunks: Option<usize>,
    /// Validation context.
    #[arg(long, default_value_t = 256)]
    valid_ctx: usize,
    /// Output directory for adapters and checkpoints.
    #[arg(long, short = 'o')]
    output: PathBuf,
    /// Print one JSON object per step and a summary object at the end.
    #[arg(long)]
    json: bool,
}

impl TuneArgs {
    pub fn threads(&self) -> Option<usize> {
        self.model.threads
    }
}

fn compress(graph: &Graph, policy: &Path) -> anyhow::Result<Graph> {
    let policy = edgec::luc::policy::Policy::load(policy, Some(graph.config.num_layers))
        .map_err(|e| anyhow::anyhow!("{}: {e}", policy.display()))?;
    let pb = super::progress_bar(graph.config.num_layers as u64, "compressing layers");
    let (g, _) =
        edgec::luc::compress::compress_graph(graph, &policy, None, |d, _| pb.set_position(d as u64))?;
    pb.finish_and_clear();
    Ok(g)
}

pub fn run(a: TuneArgs) -> anyhow::Result<()> {
    let model = a.model.load()?;
    let tok = super::tokenizer(&model, &a.model.model)?;
    let mut graph = model.graph;
    if let Some(p) = &a.policy {
        graph = compress(&graph, p)?;
    }
    let layers = graph.config.num_layers;
    let text = super::read_text(&a.data)?;
    anyhow::ensure!(
        !text.trim().is_empty(),
        "{}: the training text is empty",
        a.data.display()
    );
    let tokens = tok.encode(&text)?;
    let valid_tokens = match &a.valid {
        Some(v) => {
            let t = super::read_text(v)?;
            anyhow::ensure!(
                !t.trim().is_empty(),
                "{}: the validation text is empty",
                v.display()
            );
            Some(tok.encode(&t)?)
        }
        None => None,
    };
    let mode = match a.mode {
        ModeArg::Edge => TuneMode::Edge { stride: a.stride },
        ModeArg::Full => TuneMode::Full,
        ModeArg::LastK => TuneMode::LastK { k: a.k },
    };
    let exits = exit_layers(mode, a.exits.as_deref(), layers)?;
    let lora = LoraConfig {
        rank: a.rank,
        alpha: a.alpha.unwrap_or(2.0 * a.rank as f32),
        targets: parse_targets(&a.targets)?,
    };
    let train_norms = a.mode == ModeArg::Edge && !a.freeze_exit_norms;
    let params = Params::new(&graph, lora, &exits, train_norms, a.train_exit_heads, a.seed)?;
    let cfg = TuneConfig {
        mode,
        exits: a.exits.clone(),
        steps: a.steps,
        seq: a.seq,
        batch: a.batch,
        grad_accum: a.grad_accum,
        lr: a.lr,
        weight_decay: a.weight_decay,
        warmup: a.warmup,
        min_lr_ratio: a.min_lr_ratio,
        clip: a.clip,
        seed: a.seed,
        cache_prefix: !a.no_prefix_cache,
        checkpoint_every: a.checkpoint_every,
        max_samples: a.max_samples,
        recompute: a.recompute,
        exit_lr: Some(a.exit_lr),
    };
    let (rss_loaded, _) = rss_bytes();
    crate::reset_heap_peak();
    let kernels = match a.kernels {
        edgec::codegen::KernelMode::Reference => None,
        edgec::codegen::KernelMode::Jit => Some(std::sync::Arc::new(edgec::codegen::kernel_set(&graph)?)),
    };
    let mut tuner = Tuner::new(&graph, cfg, params, tokens)?.with_kernels(kernels);
    let ckdir = a.output.join("checkpoints");
    if a.resume {
        match tuner.resume(&ckdir)? {
            Some(s) => eprintln!("resuming from the checkpoint at step {s}"),
            None => eprintln!("no checkpoint in {}: starting from step 0", ckdir.display()),
        }
    } else if ckdir.join("latest").exists() {
        anyhow::bail!(
            "{} already holds a checkpoint: pass --resume to continue it, or choose another --output",
            ckdir.display()
        );
    }
    let pb = super::progress_bar(tuner.total_steps() as u64, "tuning");
    pb.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:25}] {pos}/{len} eta {eta}")
            .expect("template")
            .progress_chars("=> "),
    );
    pb.set_position(tuner.step as u64);
    let mut times = vec![];
    let mut last_loss = f64::NAN;
    let mut peak_step_rss = 0u64;
    while !tuner.finished() {
        let r = tuner.run_step()?;
        times.push(r.seconds);
        last_loss = r.loss;
        peak_step_rss = peak_step_rss.max(r.rss_bytes);
        pb.set_position((r.step + 1) as u64);
        pb.set_message(format!(
            "exit {:>2} [{}..{}] loss {:.4} {:.0} tok/s rss {} MiB",
            r.exit,
            r.window.0,
            r.window.1,
            r.loss,
            r.tokens as f64 / r.seconds,
            r.rss_bytes >> 20
        ));
        if a.json {
            pb.suspend(|| println!("{}", serde_json::to_string(&r).expect("json")));
        }
        if a.checkpoint_every > 0 && tuner.step % a.checkpoint_every == 0 && !tuner.finished() {
            tuner.checkpoint(&ckdir)?;
        }
    }
    pb.finish_and_clear();
    let tuning_heap = crate::heap_peak();
    if edge_runtime::train::run::op_profile_enabled() {
        for (op, secs, calls) in edge_runtime::train::run::op_times() {
            eprintln!("{op:<16} {secs:>9.3} s  {calls:>6} calls");
        }
    }
    tuner.checkpoint(&ckdir)?;
    let params = tuner.params;
    params
        .save_peft(&a.output, &a.model.model.display().to_string())
        .with_context(|| format!("writing adapters to {}", a.output.display()))?;
    let (_, peak) = rss_bytes();

    // Validation: every exit, every voting mode (weights fitted on this text).
    let valid = match &valid_tokens {
        Some(vt) => Some(validate(
            &graph,
            params,
            vt,
            a.valid_ctx,
            a.valid_chunks,
            &a.output,
        )?),
        None => None,
    };
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted.get(sorted.len() / 2).copied().unwrap_or(f64::NAN);
    let tokens_per_step = (a.seq * a.batch * a.grad_accum) as f64;
    let summary = serde_json::json!({
        "mode": match a.mode { ModeArg::Edge => "edge", ModeArg::Full => "full", ModeArg::LastK => "last-k" },
        "steps": a.steps,
        "steps_run": times.len(),
        "seconds_per_step": median,
        "tokens_per_second": tokens_per_step / median,
        "peak_rss_bytes": peak,
        "rss_after_load_bytes": rss_loaded,
        "tuning_heap_peak_bytes": tuning_heap,
        "final_loss": last_loss,
        "exits": exits,
        "valid_perplexity": valid.as_ref().map(|v| {
            v.votes.iter().map(|s| (s.name.clone(), serde_json::json!(s.perplexity()))).collect::<serde_json::Map<_, _>>()
        }),
        "valid_perplexity_per_exit": valid.as_ref().map(|v| {
            v.exits.iter().map(|s| (s.name.clone(), serde_json::json!(s.perplexity()))).collect::<serde_json::Map<_, _>>()
        }),
        "output": a.output,
    });
    if a.json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        println!(
            "{} steps, median {:.3} s/step ({:.0} tokens/s), final loss {:.4}, peak RSS {} MiB, tuning heap peak {} MiB",
            times.len(),
            median,
            tokens_per_step / median,
            last_loss,
            peak >> 20,
            tuning_heap >> 20
        );
        if let Some(v) = &valid {
            print_eval(v);
        }
        println!("adapters: {}", a.output.display());
    }
    Ok(())
}

/// Evaluates the tuned model on `tokens` per exit and voting mode, fits the weighted
/// vote's weights and saves them as `voting.json` in `out`.
fn validate(
    graph: &Graph,
    params: Params,
    tokens: &[u32],
    ctx: usize,
    chunks: Option<usize>,
    out: &Path,
) -> anyhow::Result<ExitEval> {
    let Tuned {
        graph: tuned,
        exits: ex,
        ..
    } = Tuned::new(graph, params)?;
    let exits = ex.layers();
    let exec = Executor::new(std::sync::Arc::new(tuned))?;
    let bos = graph
        .config
        .add_bos_token
        .then_some(graph.config.bos_token_id)
        .flatten();
    let votes = [Vote::Last, Vote::MaxConfidence, Vote::Mean];
    let n = (tokens.len() / ctx).min(chunks.unwrap_or(usize::MAX));
    let pb = super::progress_bar(n as u64, "validation chunks");
    let mut e = evaluate_exits(&exec, &ex, &votes, tokens, ctx, chunks, bos, |d, _| {
        pb.set_position(d as u64)
    })?;
    pb.finish_and_clear();
    let w = fit_weights(&e.p_target, 100);
    let mut weighted = edge_runtime::train::vote::Score {
        name: "weighted".into(),
        ..Default::default()
    };
    for row in &e.p_target {
        let p: f64 = row.iter().zip(&w).map(|(&p, &wi)| p as f64 * wi as f64).sum();
        weighted.nll_sum -= p.max(1e-30).ln();
        weighted.count += 1;
    }
    // Accuracy of the weighted vote needs whole distributions: left out of the fit pass.
    weighted.correct = 0;
    e.votes.push(weighted);
    let voting = serde_json::json!({"exits": exits, "weights": w, "fitted_on_tokens": e.p_target.len()});
    edge_runtime::train::lora::write_atomic(
        &out.join("voting.json"),
        serde_json::to_string_pretty(&voting)?.as_bytes(),
    )?;
    Ok(e)
}

pub fn print_eval(v: &ExitEval) {
    println!("{:<16} {:>12} {:>10}", "exit / vote", "perplexity", "accuracy");
    for s in &v.exits {
        println!(
            "{:<16} {:>12.4} {:>9.2}%",
            s.name,
            s.perplexity(),
            100.0 * s.accuracy()
        );
    }
    for s in &v.votes {
        if s.name == "weighted" && s.correct == 0 {
            println!(
                "{:<16} {:>12.4} {:>10}",
                format!("vote {}", s.name),
                s.perplexity(),
                "-"
            );
        } else {
            println!(
                "{:<16} {:>12.4} {:>9.2}%",
                format!("vote {}", s.name),
                s.perplexity(),
                100.0 * s.accuracy()
            );
        }
    }
}
