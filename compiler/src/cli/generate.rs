//! `edgec generate`.

use std::io::Write;
use std::sync::Arc;

use clap::Args;
use edge_runtime::Rows;
use edge_runtime::sampling::{Sampler, Sampling};
use edge_runtime::train::vote::{Exits, Tuned, Vote, combine, probabilities};

#[derive(Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    model: super::ModelArgs,
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
    /// Print a JSON object (prompt and generated token ids, text, timings).
    #[arg(long)]
    json: bool,
    /// Kernels for compressed weights: `jit` (generated CLIF compiled for this machine)
    /// or `reference` (plain Rust).
    #[arg(long, value_enum, default_value = "reference")]
    kernels: edgec::codegen::KernelMode,
    /// Tuned adapters (an `edgec tune` output directory).
    #[arg(long)]
    adapters: Option<std::path::PathBuf>,
    /// How the exits' next-token distributions combine (with --adapters): last,
    /// max-confidence, mean, weighted (weights from the adapters' voting.json).
    #[arg(long, default_value = "last", requires = "adapters")]
    vote: String,
}

/// The tuned graph, its exits and the vote of `--adapters` / `--vote`.
fn tuned(
    a: &GenerateArgs,
    g: &edge_runtime::ir::Graph,
) -> anyhow::Result<Option<(edge_runtime::ir::Graph, Exits, Vote)>> {
    let Some(dir) = &a.adapters else { return Ok(None) };
    let t = Tuned::load(g, dir)?;
    Ok(Some((t.graph, t.exits, Vote::load(&a.vote, dir)?)))
}

/// The next-token scores of a step: the graph's logits, or the exits' vote (as log
/// probabilities, which the sampler treats like logits).
fn scores(out: &edge_runtime::StepOutput, voting: Option<&(Exits, Vote)>) -> anyhow::Result<Vec<f32>> {
    let Some((exits, vote)) = voting else {
        return Ok(out.logits.clone());
    };
    let probs: Vec<Vec<f32>> = out
        .taps
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let d = exits.heads[i].1.numel();
            probabilities(&exits.logits(i, &h[h.len() - d..]))
        })
        .collect();
    Ok(combine(vote, &probs)?
        .into_iter()
        .map(|p| p.max(1e-30).ln())
        .collect())
}

impl GenerateArgs {
    pub fn threads(&self) -> Option<usize> {
        self.model.threads
    }
}

pub fn run(a: GenerateArgs) -> anyhow::Result<()> {
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
    let model = a.model.load()?;
    let tok = super::tokenizer(&model, &a.model.model)?;
    let (graph, voting) = match tuned(&a, &model.graph)? {
        Some((g, exits, vote)) => (g, Some((exits, vote))),
        None => (model.graph.clone(), None),
    };
    let taps = voting.as_ref().map(|v| v.0.taps()).unwrap_or_default();
    let exec = edgec::codegen::executor(Arc::new(graph), a.kernels)?;
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
    let capacity = prompt.len() + a.max_tokens;
    let mut session = exec.session(capacity);

    let t0 = std::time::Instant::now();
    let mut out = exec.forward(&mut session, &prompt, Rows::Last, &taps)?;
    let prefill_s = t0.elapsed().as_secs_f64();
    let mut generated = vec![];
    let mut printed = String::new();
    let t1 = std::time::Instant::now();
    let stdout = std::io::stdout();
    if !a.json {
        print!("{}", a.prompt);
    }
    while generated.len() < a.max_tokens {
        let next = sampler.sample(&scores(&out, voting.as_ref())?);
        generated.push(next);
        if !a.json {
            // Print the newly completed text (decoding the whole suffix keeps multi-byte
            // characters split across tokens intact).
            let text = tok.decode(&generated)?;
            if text.len() > printed.len() && text.is_char_boundary(printed.len()) {
                print!("{}", &text[printed.len()..]);
                stdout.lock().flush().ok();
                printed = text;
            }
        }
        if !a.ignore_eos && tok.is_eos(next) {
            break;
        }
        if generated.len() == a.max_tokens {
            break;
        }
        out = exec.forward(&mut session, &[next], Rows::Last, &taps)?;
    }
    let decode_s = t1.elapsed().as_secs_f64();
    let decode_steps = generated.len().saturating_sub(1).max(1);
    let tps = decode_steps as f64 / decode_s;
    if a.json {
        let v = serde_json::json!({
            "prompt_tokens": prompt,
            "tokens": generated,
            "text": tok.decode(&generated)?,
            "prefill_tokens_per_s": prompt.len() as f64 / prefill_s,
            "decode_tokens_per_s": tps,
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
