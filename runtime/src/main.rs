//! `edge-runtime`: the Edge-LLM device runtime's command line.
//!
//! `info` reports what the device offers the kernels; `eval` and `generate` run a signed
//! bundle (`.edgeb`) on this machine after checking it against the trusted keys.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use edge_runtime::bundle::{Bundle, TrustPolicy};
use edge_runtime::sampling::{Sampler, Sampling};
use edge_runtime::{Executor, Rows};

#[derive(Parser)]
#[command(name = "edge-runtime", version, about = "Edge-LLM device runtime")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the runtime version, the target, the worker threads and the CPU features the
    /// kernels use.
    Info {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Perplexity of a bundle on a text (llama.cpp protocol) or on token sequences.
    Eval(EvalArgs),
    /// Generate text from a prompt with a bundle (greedy, or temperature + top-p with a seed).
    Generate(GenerateArgs),
    /// Serve the device's gRPC service (bundles, generation, status; health and reflection).
    Serve(edge_runtime::service::ServeArgs),
}

fn main() -> ExitCode {
    edge_runtime::memory::retain_freed_memory();
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let threads = match &cli.command {
        Command::Eval(a) => a.bundle.threads,
        Command::Generate(a) => a.bundle.threads,
        _ => None,
    };
    let run_bundle = |f: &(dyn Fn() -> anyhow::Result<()> + Sync)| -> ExitCode {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads.map_or(0, usize::from))
            .build()
            .map_err(anyhow::Error::from);
        match pool.and_then(|p| p.install(f)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        }
    };
    match cli.command {
        Command::Eval(a) => return run_bundle(&|| eval(&a)),
        Command::Generate(a) => return run_bundle(&|| generate(&a)),
        Command::Serve(a) => {
            if let Err(e) = edge_runtime::service::run_cli(a) {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        }
        Command::Info { json } => {
            let info = serde_json::json!({
                "runtime_version": env!("CARGO_PKG_VERSION"),
                "arch": std::env::consts::ARCH,
                "os": std::env::consts::OS,
                "threads": rayon::current_num_threads(),
                "simd_dot_kernels": edge_runtime::kernels::dot::simd_name(),
            });
            if json {
                println!("{info}");
            } else {
                println!("edge-runtime {}", env!("CARGO_PKG_VERSION"));
                println!("target     {}-{}", std::env::consts::ARCH, std::env::consts::OS);
                println!("threads    {}", rayon::current_num_threads());
                println!("kernels    {}", edge_runtime::kernels::dot::simd_name());
            }
        }
    }
    ExitCode::SUCCESS
}

/// How to open a bundle.
#[derive(Args)]
struct BundleArgs {
    /// The bundle (.edgeb) to run.
    #[arg(long)]
    bundle: PathBuf,
    /// Public key(s) whose signatures are trusted (KEY.pub from `edgec keygen`); repeatable.
    #[arg(long = "trusted-key", required_unless_present = "allow_unsigned")]
    trusted_keys: Vec<PathBuf>,
    /// Development only: run an unsigned bundle or one signed by an untrusted key.
    #[arg(long)]
    allow_unsigned: bool,
    /// Worker threads (default: all cores).
    #[arg(long, short = 't', value_parser = clap::value_parser!(u16).range(1..))]
    threads: Option<u16>,
    /// Kernels for the compressed weights: `jit` compiles the bundle's generated kernels
    /// for this machine (weights without one run the reference kernels); `reference` runs
    /// the runtime's plain Rust kernels.
    #[arg(long, value_enum, default_value_t = Kernels::Jit)]
    kernels: Kernels,
    /// What of the bundle's schedule to follow: `all` (streamed weights, the arena and node
    /// order, the tiles and threads) or `residency` (streamed weights only; every value
    /// allocated, the kernels' default tiles), for comparison.
    #[arg(long, value_enum, default_value_t = FollowPlan::All)]
    follow: FollowPlan,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Kernels {
    Jit,
    Reference,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum FollowPlan {
    All,
    Residency,
}

impl BundleArgs {
    fn open(&self) -> anyhow::Result<Bundle> {
        let policy = TrustPolicy::from_key_files(&self.trusted_keys, self.allow_unsigned)?;
        let b = Bundle::open(&self.bundle, &policy)?;
        if b.signer().is_none() || !b.verification().trusted {
            eprintln!(
                "warning: {} is not signed by a trusted key; running it because of --allow-unsigned",
                self.bundle.display()
            );
        }
        Ok(b)
    }

    /// The executor for the bundle's graph with the chosen kernels, and how many kernels
    /// were JIT-compiled.
    fn executor(&self, b: &Bundle) -> anyhow::Result<(Executor, usize)> {
        let follow = edge_runtime::exec::Follow {
            memory: self.follow == FollowPlan::All,
            kernels: self.follow == FollowPlan::All,
        };
        b.executor_following(self.kernels == Kernels::Jit, follow)
            .with_context(|| {
                format!(
                    "{}: preparing its executor (kernels, schedule)",
                    b.path().display()
                )
            })
    }
}

#[derive(Args)]
#[command(
    after_help = "PROTOCOLS (the same as `edgec eval`)\n  --text: llama.cpp's llama-perplexity protocol: the file \
is tokenized once (BOS prepended only if the vocabulary adds it) and cut into non-overlapping chunks of --ctx \
tokens; each chunk runs from an empty cache with its first token replaced by BOS when the vocabulary adds BOS, \
and the second half is scored.\n  --tokens: one sequence a line as space-separated token ids; the loss is the \
mean next-token cross-entropy over all positions of all lines (transformers with labels = input_ids)."
)]
struct EvalArgs {
    #[command(flatten)]
    bundle: BundleArgs,
    /// Text file to score (UTF-8), llama.cpp protocol.
    #[arg(long, conflicts_with = "tokens", required_unless_present = "tokens")]
    text: Option<PathBuf>,
    /// Token-id file to score (one sequence a line), transformers protocol.
    #[arg(long)]
    tokens: Option<PathBuf>,
    /// Context (chunk) length for --text.
    #[arg(long, default_value_t = 512)]
    ctx: usize,
    /// Score only the first N chunks (--text).
    #[arg(long)]
    chunks: Option<usize>,
    /// Print a JSON object (loss, perplexity, tokens_scored, bundle hash, ...) instead of text.
    #[arg(long)]
    json: bool,
}

fn read_text(path: &Path) -> anyhow::Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    String::from_utf8(bytes).map_err(|e| {
        anyhow::anyhow!(
            "{}: not UTF-8 text (invalid byte sequence at byte offset {})",
            path.display(),
            e.utf8_error().valid_up_to()
        )
    })
}

fn tokenizer<'a>(b: &'a Bundle, what: &str) -> anyhow::Result<&'a edge_runtime::tokenizer::Tokenizer> {
    b.tokenizer()
        .ok_or_else(|| anyhow::anyhow!("{} carries no tokenizer; {what}", b.path().display()))
}

fn progress_bar(len: u64, what: &str) -> indicatif::ProgressBar {
    let pb = indicatif::ProgressBar::new(len);
    pb.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} eta {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    pb
}

fn eval(a: &EvalArgs) -> anyhow::Result<()> {
    let b = a.bundle.open()?;
    let (exec, jit) = a.bundle.executor(&b)?;
    let started = std::time::Instant::now();
    let result = if let Some(path) = &a.text {
        let text = read_text(path)?;
        let tok = tokenizer(&b, "score token ids with --tokens")?;
        let tokens = tok.encode(&text)?;
        let bos = if tok.add_bos { tok.bos } else { None };
        let n = edge_runtime::eval::chunk_count(tokens.len(), a.ctx, a.chunks);
        let pb = progress_bar(n as u64, "perplexity");
        let r = edge_runtime::eval::chunked_perplexity(&exec, &tokens, a.ctx, a.chunks, bos, |done, _| {
            pb.set_position(done as u64)
        });
        pb.finish_and_clear();
        r.with_context(|| path.display().to_string())?
    } else {
        let path = a.tokens.as_ref().expect("clap requires --text or --tokens");
        let seqs = edge_runtime::eval::parse_token_file(&read_text(path)?, exec.graph().config.vocab_size)
            .with_context(|| path.display().to_string())?;
        let pb = progress_bar(seqs.len() as u64, "sequences");
        let r = edge_runtime::eval::sequence_loss(&exec, &seqs, |done, _| pb.set_position(done as u64));
        pb.finish_and_clear();
        r?
    };
    let secs = started.elapsed().as_secs_f64();
    if a.json {
        let mut v = serde_json::to_value(&result)?;
        v["seconds"] = secs.into();
        v["protocol"] = if a.text.is_some() {
            "llama.cpp-chunks"
        } else {
            "sequences"
        }
        .into();
        v["ctx"] = a.ctx.into();
        v["bundle_sha256"] = b.sha256_hex().into();
        v["target"] = b.target().name.clone().into();
        v["jit_kernels"] = jit.into();
        println!("{}", serde_json::to_string(&v)?);
    } else {
        println!(
            "perplexity {:.4} +/- {:.4}  (loss {:.6}, {} tokens scored in {} {}, {:.1} s)",
            result.perplexity,
            result.perplexity_stderr,
            result.loss,
            result.tokens_scored,
            result.chunks,
            if a.text.is_some() { "chunks" } else { "sequences" },
            secs
        );
    }
    Ok(())
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    bundle: BundleArgs,
    /// The prompt text.
    #[arg(long, short = 'p')]
    prompt: String,
    /// Number of tokens to generate.
    #[arg(long, short = 'n', default_value_t = 64)]
    max_tokens: usize,
    /// Sampling temperature; 0 means greedy decoding.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches this.
    #[arg(long, default_value_t = 0.95)]
    top_p: f32,
    /// Seed of the sampler.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Keep generating past an end-of-sequence token.
    #[arg(long)]
    ignore_eos: bool,
    /// Print a JSON object (prompt and generated token ids, text, speeds) instead of text.
    #[arg(long)]
    json: bool,
}

fn generate(a: &GenerateArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        a.top_p > 0.0 && a.top_p <= 1.0,
        "--top-p must be in (0, 1], got {}",
        a.top_p
    );
    anyhow::ensure!(
        a.temperature >= 0.0,
        "--temperature must be >= 0, got {}",
        a.temperature
    );
    let b = a.bundle.open()?;
    let tok = tokenizer(&b, "it cannot encode a prompt")?;
    let (exec, _) = a.bundle.executor(&b)?;
    let prompt = tok.encode(&a.prompt)?;
    anyhow::ensure!(!prompt.is_empty(), "the prompt encodes to no tokens");
    let mode = if a.temperature == 0.0 {
        Sampling::Greedy
    } else {
        Sampling::TopP {
            temperature: a.temperature,
            top_p: a.top_p,
        }
    };
    let mut sampler = Sampler::new(mode, a.seed);
    let mut session = exec.session(prompt.len() + a.max_tokens);
    let t0 = std::time::Instant::now();
    let mut out = exec.forward(&mut session, &prompt, Rows::Last, &[])?;
    let prefill_s = t0.elapsed().as_secs_f64();
    let (mut generated, mut printed) = (vec![], String::new());
    let t1 = std::time::Instant::now();
    if !a.json {
        print!("{}", a.prompt);
    }
    while generated.len() < a.max_tokens {
        let next = sampler.sample(&out.logits);
        generated.push(next);
        if !a.json {
            // Print newly completed text; decoding the whole suffix keeps multi-byte
            // characters split across tokens intact.
            let text = tok.decode(&generated)?;
            if text.len() > printed.len() && text.is_char_boundary(printed.len()) {
                print!("{}", &text[printed.len()..]);
                std::io::stdout().flush().ok();
                printed = text;
            }
        }
        if (!a.ignore_eos && tok.is_eos(next)) || generated.len() == a.max_tokens {
            break;
        }
        out = exec.forward(&mut session, &[next], Rows::Last, &[])?;
    }
    let decode_s = t1.elapsed().as_secs_f64();
    let tps = generated.len().saturating_sub(1).max(1) as f64 / decode_s;
    if a.json {
        let v = serde_json::json!({
            "prompt_tokens": prompt,
            "tokens": generated,
            "text": tok.decode(&generated)?,
            "prefill_tokens_per_s": prompt.len() as f64 / prefill_s,
            "decode_tokens_per_s": tps,
            "bundle_sha256": b.sha256_hex(),
        });
        println!("{v}");
    } else {
        println!();
        eprintln!(
            "[{} prompt tokens at {:.1} tokens/s; {} generated at {:.1} tokens/s]",
            prompt.len(),
            prompt.len() as f64 / prefill_s,
            generated.len(),
            tps
        );
    }
    Ok(())
}
