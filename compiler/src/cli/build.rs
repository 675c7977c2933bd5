//! `edgec build`: model (+ policy) -> one signed bundle per target.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use edge_runtime::bundle::{self, BundleContents, SigningKey, manifest};
use edge_runtime::ir::Graph;
use edgec::build_stream::{self, StreamedBuild};
use edgec::luc::compress::compress_graph;
use edgec::luc::policy::Policy;
use edgec::schedule::{self, Schedule};
use edgec::target::{self, Target};

#[derive(Args)]
#[command(
    after_help = "TARGETS\n  --target takes a name (NAME.toml in --targets-dir, ./targets or the repository's \
targets/) or a path to a .toml file; `host` describes this machine. With one --target, -o is the bundle \
file; with several, -o is a directory that receives <target>.edgeb for each.\n\nSTEPS\n  Load the model, \
compress it by --policy (as `edgec compress`), plan it for each target (the scheduling pass: cost, \
tiling, residency or streaming of each weight under --memory-budget or the target's budget, arena, \
threads; a budget no plan meets is an error saying by how much), generate the kernels of the compressed weights (each compiled for the target's ISA with Cranelift), \
and write each bundle (graph, tokenizer, policy, kernel table, weights, target, signature) to a temporary \
file that is renamed into place once complete.\n\nMEMORY\n  The build streams: the plan and the manifest come from the weights' formats and sizes (known \
from the policy), then each decoder layer is read from the (mapped) model, compressed and written, and its \
pages released, so the build holds about one layer rather than the model (with several targets, each \
bundle compresses the layers again). GPTQ, Wanda and SparseGPT layers take their statistics from the \
--calib samples carried through the compressed layers before them, as `edgec compress` does; --calib is \
text for a model with a tokenizer, whitespace-separated token ids for one without. --no-stream compresses \
the whole model in memory first; the bundle's bytes are the same either way."
)]
pub struct BuildArgs {
    #[command(flatten)]
    model: super::ModelArgs,
    /// Compression policy (policy.toml, as `edgec policy` writes it); without it the weights
    /// are bundled as the model holds them.
    #[arg(long)]
    policy: Option<PathBuf>,
    /// Calibration text for policies using GPTQ / Wanda / SparseGPT (UTF-8; token ids for
    /// a model without a tokenizer).
    #[arg(long)]
    calib: Option<PathBuf>,
    /// Calibration samples.
    #[arg(long, default_value_t = 32)]
    samples: usize,
    /// Tokens per calibration sample, and per tuning sample of --train.
    #[arg(long, default_value_t = 512)]
    seq: usize,
    /// Plan keep vs recompute for the tuning window `A:B` (layers A..=B, loss at exit B)
    /// on samples of --seq tokens; the decision goes into the bundle's schedule and the
    /// device's tuning of the bundle follows it. Neither fitting is an error.
    #[arg(long, value_name = "A:B")]
    train: Option<String>,
    /// With --train: keep the window's activations or recompute each layer's before its
    /// backward; `auto` keeps when they fit the budget.
    #[arg(long, requires = "train", value_name = "auto|keep|recompute")]
    recompute: Option<schedule::recompute::Mode>,
    /// Target device(s): a name or a .toml path; repeatable.
    #[arg(long = "target", required = true)]
    targets: Vec<String>,
    /// Folder to look for target names in first.
    #[arg(long)]
    targets_dir: Option<PathBuf>,
    /// Private key to sign with (from `edgec keygen`).
    #[arg(long, required_unless_present = "unsigned")]
    sign_key: Option<PathBuf>,
    /// Development: write unsigned bundles (devices refuse them unless started with --allow-unsigned).
    #[arg(long, conflicts_with = "sign_key")]
    unsigned: bool,
    /// Output: the bundle file (one target) or a directory (several).
    #[arg(long, short = 'o')]
    output: PathBuf,
    /// Memory the model may use on the device (e.g. 150MB, 1.5GiB), replacing each target's
    /// budget.model_memory. The scheduling pass streams weights (reads each per use and
    /// releases it after) when the model does not fit; a budget no plan meets is an error.
    #[arg(long, value_parser = edgec::target::parse_size)]
    memory_budget: Option<u64>,
    /// Positions of the KV cache the plan reserves memory for (the device's longest context).
    #[arg(long, default_value_t = 512)]
    ctx: usize,
    /// Memory the runtime process needs besides the plan's weights and buffers (code,
    /// tokenizer, allocator slack); default: measured for a SmolLM2-sized vocabulary.
    #[arg(long, value_parser = edgec::target::parse_size)]
    runtime_memory: Option<u64>,
    /// Compress the whole model in memory before writing, even when the policy could be
    /// streamed layer by layer (the same bytes, more memory; for comparison).
    #[arg(long)]
    no_stream: bool,
    /// Print a JSON report instead of text.
    #[arg(long)]
    json: bool,
}

impl BuildArgs {
    pub fn threads(&self) -> Option<usize> {
        self.model.threads
    }
}

/// The kernel table: one entry per generated kernel the graph's compressed weights use,
/// each compiled here for the target's ISA so that a bundle its device cannot compile is
/// refused before it ships.
fn kernel_table(t: &Target, graph: &Graph) -> anyhow::Result<Vec<manifest::Kernel>> {
    let (sources, skipped) = edgec::codegen::kernel_sources(graph);
    for (w, why) in &skipped {
        tracing::info!("{w}: no generated kernel ({why})");
    }
    let (triple, flags) = t.cranelift_isa();
    let isa = edgec::codegen::target_isa(&triple, &flags)
        .with_context(|| format!("target `{}`: Cranelift ISA {triple} {flags:?}", t.name))?;
    let mut table: Vec<manifest::Kernel> = vec![];
    for s in sources {
        let name = s.spec.name();
        if table.iter().any(|k| k.name == name) {
            continue;
        }
        edgec::codegen::compile_for_isa(&s.clif, &*isa)
            .with_context(|| format!("target `{}`: kernel {name}", t.name))?;
        table.push(manifest::Kernel {
            spec: format!(
                "{:?} [{}, {}] {}",
                s.spec.kind, s.spec.rows, s.spec.cols, s.spec.format
            ),
            name,
            clif: s.clif,
        });
    }
    Ok(table)
}

/// Where each target's bundle goes.
fn outputs(out: &Path, targets: &[Target]) -> anyhow::Result<Vec<PathBuf>> {
    if targets.len() == 1 {
        anyhow::ensure!(
            !out.is_dir(),
            "{} is a directory; with one --target, -o names the bundle file",
            out.display()
        );
        return Ok(vec![out.to_path_buf()]);
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    Ok(targets
        .iter()
        .map(|t| out.join(format!("{}.edgeb", t.name)))
        .collect())
}

pub fn run(a: BuildArgs) -> anyhow::Result<()> {
    // Everything that can be checked before the (long) compression is checked first.
    let mut targets: Vec<Target> = vec![];
    for spec in &a.targets {
        let t = target::resolve(spec, a.targets_dir.as_deref())?;
        anyhow::ensure!(
            !targets.iter().any(|o| o.name == t.name),
            "target `{}` is given twice",
            t.name
        );
        targets.push(t);
    }
    let key: Option<SigningKey> = match &a.sign_key {
        Some(p) => Some(bundle::read_signing_key(p)?),
        None => None,
    };
    let paths = outputs(&a.output, &targets)?;
    let model = a.model.load()?;
    let n_layers = model.graph.config.num_layers;
    let policy = match &a.policy {
        Some(path) => {
            let text = super::read_text(path)?;
            let policy = Policy::parse(&text, Some(n_layers))
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            Some((policy, text))
        }
        None => None,
    };
    // Calibration samples: text through the model's tokenizer, or token ids without one.
    let samples = match (&a.calib, &policy) {
        (Some(c), Some(_)) => {
            let text = super::read_text(c)?;
            let vocab = model.graph.config.vocab_size;
            Some(
                edgec::luc::calib::file_samples(&text, model.tokenizer.as_ref(), vocab, a.samples, a.seq)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", c.display()))?,
            )
        }
        _ => None,
    };
    let stream_check = match &policy {
        _ if a.no_stream => Err("--no-stream".to_string()),
        Some((p, _)) => build_stream::streamable(p, samples.is_some()),
        None => Ok(()),
    };
    let mut streamed: Option<StreamedBuild> = None;
    let (graph, policy_text) = match (policy, stream_check) {
        (policy, Ok(())) => {
            let s = StreamedBuild::new(&model.graph, policy.as_ref().map(|p| &p.0), samples.as_deref())?;
            let g = s.skeleton().clone();
            streamed = Some(s);
            (g, policy.map(|p| p.1).unwrap_or_default())
        }
        (Some((policy, text)), Err(why)) => {
            tracing::info!("compressing the whole model before writing: {why}");
            let pb = super::progress_bar(n_layers as u64, "compressing layers");
            let (g, _) = compress_graph(&model.graph, &policy, samples.as_deref(), |done, _| {
                pb.set_position(done as u64)
            })?;
            pb.finish_and_clear();
            (g, text)
        }
        (None, Err(_)) => (model.graph.clone(), String::new()),
    };
    let mut kernels = vec![];
    let mut plans: Vec<Schedule> = vec![];
    let mut opts = schedule::Options::for_context(a.ctx);
    opts.budget = a.memory_budget;
    if let Some(r) = a.runtime_memory {
        opts.runtime_bytes = r;
    }
    if let Some(w) = &a.train {
        let (first, exit) = w
            .split_once(':')
            .and_then(|(s, e)| Some((s.trim().parse().ok()?, e.trim().parse().ok()?)))
            .ok_or_else(|| anyhow::anyhow!("--train takes A:B, two layer numbers (got `{w}`)"))?;
        anyhow::ensure!(
            first <= exit && exit < n_layers,
            "--train {w}: the window must be layers A..=B within 0..{n_layers}"
        );
        opts.train = Some((first..=exit, a.seq));
        opts.recompute = a.recompute.unwrap_or_default();
    }
    let mut graph = graph;
    for t in &targets {
        let (g, plan) = schedule::schedule(graph, t, &opts)?;
        graph = g;
        tracing::info!(
            "target {}: {} weights streamed, planned peak {} bytes",
            t.name,
            plan.streamed_weights().len(),
            plan.memory.total()
        );
        plans.push(plan);
        kernels.push(kernel_table(t, &graph)?);
    }
    let source = a.model.model.display().to_string();
    let mut report = vec![];
    for (((t, path), kernels), plan) in targets.iter().zip(&paths).zip(kernels).zip(&plans) {
        let contents = BundleContents {
            graph: &graph,
            tokenizer: model.tokenizer.as_ref(),
            policy: policy_text.clone(),
            target: t.to_manifest(),
            kernels,
            compiler_version: format!("edgec {}", env!("CARGO_PKG_VERSION")),
            source: source.clone(),
        };
        let what = if streamed.is_some() {
            "compressing and writing"
        } else {
            "writing"
        };
        let pb = super::progress_bar(graph.weights.len() as u64, &format!("{what} {}", t.name));
        let sched = manifest::Schedule {
            plan_json: serde_json::to_string(plan)?,
            streamed_weights: plan.streamed_weights().iter().map(|&w| w as u32).collect(),
            memory_budget: plan.memory.budget,
            context: plan.context as u64,
        };
        let progress = |done, _| pb.set_position(done as u64);
        let written = match streamed.as_mut() {
            Some(s) => bundle::writer::write_streamed_bundle(
                path,
                &contents,
                Some(sched),
                key.as_ref(),
                |i| s.weight(i).map_err(|e| format!("{e:#}")),
                progress,
            )?,
            None => bundle::write_scheduled_bundle(path, &contents, Some(sched), key.as_ref(), progress)?,
        };
        pb.finish_and_clear();
        report.push(serde_json::json!({
            "target": t.name,
            "arch": t.arch,
            "path": written.path.display().to_string(),
            "size": written.size,
            "sha256": bundle::hex(&written.sha256),
            "signed": written.signed,
            "weight_bytes": graph.weight_bytes(),
            "budget_bytes": plan.memory.budget,
            "planned_bytes": plan.memory.total(),
            "streamed_weights": plan.streamed_weights().len(),
            "streamed_bytes": plan.residency.streamed_bytes,
            "predicted_decode_ms": plan.decode_seconds * 1e3,
            "kernels": contents.kernels.len(),
            "runs_on_this_machine": t.runs_here(),
            "streamed_build": streamed.is_some(),
            "recompute": plan.recompute.as_ref().map(|r| r.recompute),
        }));
        if !a.json {
            println!(
                "{}  {} bytes  {} kernels  plan {} of {} ({} weights streamed)  sha256 {}  target {} ({}){}",
                written.path.display(),
                written.size,
                contents.kernels.len(),
                schedule::mib(plan.memory.total()),
                schedule::mib(plan.memory.budget),
                plan.streamed_weights().len(),
                bundle::hex(&written.sha256),
                t.name,
                t.arch,
                if written.signed { "" } else { "  UNSIGNED" }
            );
            if let Some(r) = &plan.recompute {
                println!(
                    "  tuning window {}..={} on {} tokens: {} (keep {}, recompute {}, {} available)",
                    r.first,
                    r.exit,
                    r.seq,
                    if r.recompute { "recompute" } else { "keep" },
                    schedule::mib(r.keep_peak_bytes),
                    schedule::mib(r.recompute_peak_bytes),
                    schedule::mib(r.available_bytes)
                );
            }
        }
    }
    if a.json {
        println!("{}", serde_json::json!({ "bundles": report }));
    }
    Ok(())
}
