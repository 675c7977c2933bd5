//! Subcommands of `edgec`.

mod adapters;
mod bench;
mod build;
mod compress;
mod deploy;
mod eval;
mod generate;
mod grad;
mod inspect;
mod keygen;
mod policy;
mod profile;
mod remote_generate;
mod status;
mod tune;
mod tune_device;
mod verify;

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use edgec::frontend::{self, LoadOptions, LoadedModel};

#[derive(Parser)]
#[command(
    name = "edgec",
    version,
    about = "Edge-LLM model compiler: read, inspect, evaluate and run LLaMA-family models"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show a model's config, tensors, formats, parameter count and bytes.
    Inspect(inspect::InspectArgs),
    /// Perplexity of a model on a text (llama.cpp protocol) or on token sequences.
    Eval(eval::EvalArgs),
    /// Generate text from a prompt (greedy, or temperature + top-p with a seed); with
    /// `--device URL`, on that device (the options of `remote-generate`).
    Generate(generate::GenerateArgs),
    /// Measure prefill and decode speed (tokens/s) and peak memory.
    Bench(bench::BenchArgs),
    /// Measure each decoder layer's sensitivity to quantization and pruning (sensitivity.json,
    /// SVG heatmap, table).
    Profile(profile::ProfileArgs),
    /// Choose a per-layer compression policy (bits, sparsity) from a sensitivity profile under a budget.
    Policy(policy::PolicyArgs),
    /// Compress a model by a policy (quantize and prune each layer) and write the compressed model.
    Compress(compress::CompressArgs),
    /// Tune LoRA adapters on local text (Edge-LLM's adaptive layer schedule, or full / last-k).
    Tune(tune::TuneArgs),
    /// LoRA gradients of the training graph for given adapters (to check against another framework).
    Grad(grad::GradArgs),
    /// Build a signed bundle (.edgeb) of a model, compressed by a policy, for one or more targets.
    Build(build::BuildArgs),
    /// Write an ed25519 key pair for signing bundles (KEY, KEY.pub).
    Keygen(keygen::KeygenArgs),
    /// Check a bundle's integrity and signature against trusted keys.
    Verify(verify::VerifyArgs),
    /// Upload a bundle to devices (parallel, resumable) and activate it once all verified it.
    Deploy(deploy::DeployArgs),
    /// Show what devices run: active bundle, bundles, memory, streams, uptime.
    Status(status::StatusArgs),
    /// Generate text on a device (streamed over gRPC).
    RemoteGenerate(remote_generate::RemoteGenerateArgs),
    /// Export a device's tuned adapters (PEFT's layout) to a directory.
    Adapters(adapters::AdaptersArgs),
    /// Tune on a device (run as `edgec tune --device URL ...`).
    #[command(
        name = "tune-device",
        hide = true,
        override_usage = "edgec tune --device <URL> --token-file <TOKEN_FILE> --data <DATA> [OPTIONS]"
    )]
    TuneDevice(tune_device::DeviceTuneArgs),
}

/// Parses the command line. `edgec tune --device URL ...` tunes on a device: it has its own
/// arguments (`tune_device`), so it is parsed as the hidden `tune-device` command; likewise
/// `edgec generate --device URL ...` is `edgec remote-generate`.
pub fn parse() -> Cli {
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let device = |a: &std::ffi::OsString| a == "--device" || a.to_string_lossy().starts_with("--device=");
    // A local command given `--device` runs on the device instead.
    const ON_DEVICE: [(&str, &str); 2] = [("tune", "tune-device"), ("generate", "remote-generate")];
    if args.iter().skip(2).any(device)
        && let Some((_, remote)) = ON_DEVICE
            .iter()
            .find(|(local, _)| args.get(1).is_some_and(|a| a == local))
    {
        args[1] = remote.into();
    }
    Cli::parse_from(args)
}

/// Runs the command inside a rayon pool of `--threads` workers (all cores by default), so
/// the calling thread is itself a worker and parallel kernels never hand work across threads
/// when one thread is asked for.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    let threads = match &cli.command {
        Command::Eval(a) => a.threads(),
        Command::Generate(a) => a.threads(),
        Command::Bench(a) => a.threads(),
        Command::Profile(a) => a.threads(),
        Command::Compress(a) => a.threads(),
        Command::Tune(a) => a.threads(),
        Command::Grad(a) => a.threads(),
        Command::Build(a) => a.threads(),
        Command::Keygen(_) | Command::Verify(_) => None,
        Command::Inspect(_) => None,
        Command::Policy(_) => None,
        Command::Deploy(_) | Command::Status(_) | Command::RemoteGenerate(_) => None,
        Command::Adapters(_) | Command::TuneDevice(_) => None,
    };
    if threads == Some(0) {
        anyhow::bail!("--threads must be at least 1");
    }
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads.unwrap_or(0))
        .build()
        .context("creating the thread pool")?;
    pool.install(|| run_command(cli))
}

fn run_command(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Inspect(a) => inspect::run(a),
        Command::Eval(a) => eval::run(a),
        Command::Generate(a) => generate::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Profile(a) => profile::run(a),
        Command::Policy(a) => policy::run(a),
        Command::Compress(a) => compress::run(a),
        Command::Tune(a) => tune::run(a),
        Command::Grad(a) => grad::run(a),
        Command::Build(a) => build::run(a),
        Command::Keygen(a) => keygen::run(a),
        Command::Verify(a) => verify::run(a),
        Command::Deploy(a) => deploy::run(a),
        Command::Status(a) => status::run(a),
        Command::RemoteGenerate(a) => remote_generate::run(a),
        Command::Adapters(a) => adapters::run(a),
        Command::TuneDevice(a) => tune_device::run(a),
    }
}

/// Element type to convert dense weights to after loading.
#[derive(Clone, Copy, ValueEnum)]
pub enum WeightType {
    F32,
    F16,
    Bf16,
}

/// Options shared by the commands that run a model.
#[derive(Args, Clone)]
pub struct ModelArgs {
    /// Model: a HF safetensors directory, a .gguf file or a .onnx file.
    #[arg(long, short = 'm')]
    pub model: PathBuf,
    /// Convert the weights to this type after loading (default: keep the file's dense
    /// types mapped as they are; packed GGUF types are dequantized to f32).
    #[arg(long, value_enum)]
    pub dtype: Option<WeightType>,
    /// Worker threads (default: all cores).
    #[arg(long, short = 't')]
    pub threads: Option<usize>,
}

impl ModelArgs {
    pub fn load(&self) -> anyhow::Result<LoadedModel> {
        let dtype = self.dtype.map(|d| match d {
            WeightType::F32 => edge_runtime::DType::F32,
            WeightType::F16 => edge_runtime::DType::F16,
            WeightType::Bf16 => edge_runtime::DType::BF16,
        });
        load_model(&self.model, &LoadOptions { dtype })
    }
}

pub fn load_model(path: &Path, opts: &LoadOptions) -> anyhow::Result<LoadedModel> {
    let spinner = indicatif::ProgressBar::new_spinner();
    spinner.set_message(format!("loading {}", path.display()));
    spinner.enable_steady_tick(std::time::Duration::from_millis(120));
    let result = frontend::load(path, opts);
    spinner.finish_and_clear();
    Ok(result?)
}

/// Reads a text file that must be UTF-8; the error names the file and the byte offset.
pub fn read_text(path: &Path) -> anyhow::Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    String::from_utf8(bytes).map_err(|e| {
        anyhow::anyhow!(
            "{}: not UTF-8 text (invalid byte sequence at byte offset {})",
            path.display(),
            e.utf8_error().valid_up_to()
        )
    })
}

/// A progress bar on stderr (hidden when stderr is not a terminal).
pub fn progress_bar(len: u64, what: &str) -> indicatif::ProgressBar {
    let pb = indicatif::ProgressBar::new(len);
    pb.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} {per_sec} eta {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    pb
}

/// The model's tokenizer, or an error saying the model carries none.
pub fn tokenizer(model: &LoadedModel, path: &Path) -> anyhow::Result<edge_runtime::tokenizer::Tokenizer> {
    model.tokenizer.clone().ok_or_else(|| {
        anyhow::anyhow!(
            "{} carries no tokenizer (a safetensors directory needs tokenizer.json; ONNX models need --tokens)",
            path.display()
        )
    })
}

/// Peak resident set size of this process in bytes (Linux: VmHWM), if known.
pub fn peak_rss_bytes() -> Option<u64> {
    Some(edge_runtime::memory::rss_bytes().1).filter(|&b| b > 0)
}
