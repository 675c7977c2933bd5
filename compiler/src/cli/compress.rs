//! `edgec compress`.

use std::path::PathBuf;

use clap::Args;
use edgec::luc::compress::{compress_graph, write_model_dir};
use edgec::luc::policy::Policy;

#[derive(Args)]
#[command(
    after_help = "Each layer's quantizer and pruner come from the policy (`quantizer`, `pruner`); \
when absent they default to gptq + sparsegpt with --calib, rtn + magnitude without. \
The output directory is read back by every command that takes --model (edgec eval, generate, bench)."
)]
pub struct CompressArgs {
    #[command(flatten)]
    model: super::ModelArgs,
    /// The policy (policy.toml, as `edgec policy` writes it).
    #[arg(long)]
    policy: PathBuf,
    /// Calibration text for GPTQ / Wanda / SparseGPT (UTF-8).
    #[arg(long)]
    calib: Option<PathBuf>,
    /// Calibration samples.
    #[arg(long, default_value_t = 32)]
    samples: usize,
    /// Tokens per calibration sample.
    #[arg(long, default_value_t = 512)]
    seq: usize,
    /// Output model directory.
    #[arg(long, short = 'o')]
    output: PathBuf,
    /// Print a JSON report instead of text.
    #[arg(long)]
    json: bool,
}

impl CompressArgs {
    pub fn threads(&self) -> Option<usize> {
        self.model.threads
    }
}

pub fn run(a: CompressArgs) -> anyhow::Result<()> {
    let model = a.model.load()?;
    let n_layers = model.graph.config.num_layers;
    let policy = Policy::load(&a.policy, Some(n_layers))
        .map_err(|e| anyhow::anyhow!("{}: {e}", a.policy.display()))?;
    let samples = match &a.calib {
        Some(path) => {
            let text = super::read_text(path)?;
            let tok = super::tokenizer(&model, &a.model.model)?;
            Some(
                edgec::luc::calib::token_samples(&text, &tok, a.samples, a.seq)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?,
            )
        }
        None => None,
    };
    let pb = super::progress_bar(n_layers as u64, "compressing layers");
    let (graph, report) = compress_graph(&model.graph, &policy, samples.as_deref(), |done, _| {
        pb.set_position(done as u64)
    })?;
    pb.finish_and_clear();
    let source = a.model.model.display().to_string();
    write_model_dir(
        &a.output,
        &graph,
        model.tokenizer.as_ref(),
        &policy,
        &source,
        &report,
    )?;
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        for l in &report.layers {
            println!(
                "layer {:>3}  {:<24} {:<18} {:>10} bytes",
                l.layer, l.candidate, l.method, l.bytes
            );
        }
        println!(
            "linear weights: {} bytes for {} weights ({:.3} bits/weight, sparsity {:.3}) -> {}",
            report.linear_bytes,
            report.linear_params,
            report.bits_per_weight,
            report.sparsity,
            a.output.display()
        );
    }
    Ok(())
}
