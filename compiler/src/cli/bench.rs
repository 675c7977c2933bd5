//! `edgec bench`: prefill and decode speed, and peak memory, like llama-bench's pp/tg tests.

use std::sync::Arc;

use clap::Args;
use edge_runtime::Rows;

#[derive(Args)]
pub struct BenchArgs {
    #[command(flatten)]
    model: super::ModelArgs,
    /// Prompt length of the prefill test (llama-bench `-p`).
    #[arg(long, default_value_t = 512)]
    prompt_tokens: usize,
    /// Tokens generated one at a time in the decode test (llama-bench `-n`).
    #[arg(long, default_value_t = 128)]
    gen_tokens: usize,
    /// Repetitions of each test; the median is reported.
    #[arg(long, short = 'r', default_value_t = 5)]
    reps: usize,
    /// Print a JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// Kernels for compressed weights: `jit` (generated CLIF compiled for this machine)
    /// or `reference` (plain Rust).
    #[arg(long, value_enum, default_value = "reference")]
    kernels: edgec::codegen::KernelMode,
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

impl BenchArgs {
    pub fn threads(&self) -> Option<usize> {
        self.model.threads
    }
}

pub fn run(a: BenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(a.reps > 0, "--reps must be at least 1");
    let model = a.model.load()?;
    let exec = edgec::codegen::executor(Arc::new(model.graph.clone()), a.kernels)?;
    let vocab = exec.graph().config.vocab_size as u64;
    // Deterministic pseudo-random tokens (the content does not change the cost).
    let tokens: Vec<u32> = (0..a.prompt_tokens as u64)
        .map(|i| ((i.wrapping_mul(2654435761) + 12345) % vocab) as u32)
        .collect();
    let threads = rayon::current_num_threads();
    let pb = super::progress_bar((a.reps * 2 + 1) as u64, "bench");
    // Warm-up (page in the weights).
    let mut s = exec.session(a.prompt_tokens.max(a.gen_tokens).max(16));
    let warm: Vec<u32> = (0..16u64).map(|i| (i * 7919 % vocab) as u32).collect();
    exec.forward(&mut s, &warm, Rows::Last, &[])?;
    pb.inc(1);
    let mut pp = vec![];
    let mut tg = vec![];
    for _ in 0..a.reps {
        if a.prompt_tokens > 0 {
            s.reset();
            let t = std::time::Instant::now();
            exec.forward(&mut s, &tokens, Rows::Last, &[])?;
            pp.push(a.prompt_tokens as f64 / t.elapsed().as_secs_f64());
        }
        pb.inc(1);
        if a.gen_tokens > 0 {
            s.reset();
            let t = std::time::Instant::now();
            let mut next = tokens.first().copied().unwrap_or(1);
            for _ in 0..a.gen_tokens {
                let out = exec.forward(&mut s, &[next], Rows::Last, &[])?;
                next = edge_runtime::sampling::argmax(&out.logits);
            }
            tg.push(a.gen_tokens as f64 / t.elapsed().as_secs_f64());
        }
        pb.inc(1);
    }
    pb.finish_and_clear();
    let dtypes: std::collections::BTreeSet<String> = exec
        .graph()
        .weights
        .iter()
        .map(|w| w.data.format().to_string())
        .collect();
    let pp_m = if pp.is_empty() {
        None
    } else {
        Some(median(&mut pp))
    };
    let tg_m = if tg.is_empty() {
        None
    } else {
        Some(median(&mut tg))
    };
    let rss = super::peak_rss_bytes();
    if a.json {
        let v = serde_json::json!({
            "model": a.model.model.display().to_string(),
            "weight_types": dtypes,
            "weight_bytes": exec.graph().weight_bytes(),
            "threads": threads,
            "reps": a.reps,
            "prompt_tokens": a.prompt_tokens,
            "gen_tokens": a.gen_tokens,
            "prefill_tokens_per_s": pp_m,
            "prefill_samples": pp,
            "decode_tokens_per_s": tg_m,
            "decode_samples": tg,
            "peak_rss_bytes": rss,
        });
        println!("{v}");
    } else {
        println!(
            "{} threads, weights {:?} ({:.1} MiB)",
            threads,
            dtypes,
            exec.graph().weight_bytes() as f64 / 1048576.0
        );
        if let Some(p) = pp_m {
            println!(
                "pp{:<5} {:>8.1} tokens/s (median of {})",
                a.prompt_tokens, p, a.reps
            );
        }
        if let Some(t) = tg_m {
            println!("tg{:<5} {:>8.1} tokens/s (median of {})", a.gen_tokens, t, a.reps);
        }
        if let Some(r) = rss {
            println!("peak RSS {:.1} MiB", r as f64 / 1048576.0);
        }
    }
    Ok(())
}
