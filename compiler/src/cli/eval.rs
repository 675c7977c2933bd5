//! `edgec eval`.

use std::path::PathBuf;
use std::sync::Arc;

use clap::Args;
use edge_runtime::Executor;
use edgec::eval::{chunked_perplexity, parse_token_file, sequence_loss};

#[derive(Args)]
#[command(
    after_help = "PROTOCOLS\n  --text: llama.cpp's llama-perplexity protocol. The whole file is tokenized once \
(BOS prepended only if the vocabulary adds it) and cut into non-overlapping chunks of --ctx tokens; \
the tail that does not fill a chunk is dropped. Each chunk is evaluated from an empty cache, its first \
token replaced by BOS when the vocabulary adds BOS, and only the second half is scored: the logits at \
positions ctx/2 .. ctx-2 predict tokens ctx/2+1 .. ctx-1 (ctx/2 - 1 tokens per chunk).\n  \
--tokens: one sequence per line as space-separated token ids; every line is scored in full, the loss \
being the mean next-token cross-entropy over all positions of all lines (transformers with labels = input_ids)."
)]
pub struct EvalArgs {
    #[command(flatten)]
    model: super::ModelArgs,
    /// Text file to score (UTF-8), llama.cpp protocol.
    #[arg(long, conflicts_with = "tokens", required_unless_present = "tokens")]
    text: Option<PathBuf>,
    /// Token-id file to score (one sequence per line), transformers protocol.
    #[arg(long)]
    tokens: Option<PathBuf>,
    /// Context (chunk) length for --text.
    #[arg(long, default_value_t = 512)]
    ctx: usize,
    /// Score only the first N chunks (--text).
    #[arg(long)]
    chunks: Option<usize>,
    /// Tuned adapters (an `edgec tune` output directory): report perplexity and next-token
    /// accuracy of every exit and every voting mode (--text), or the final layer's loss
    /// (--tokens).
    #[arg(long)]
    adapters: Option<PathBuf>,
    /// Voting modes to report with --adapters: last, max-confidence, mean, weighted
    /// (weighted uses the weights `edgec tune` fitted on its validation text, voting.json).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "last,max-confidence,mean,weighted"
    )]
    vote: Vec<String>,
    /// Print a JSON object (loss, perplexity, tokens_scored, ...) instead of text.
    #[arg(long)]
    json: bool,
}

/// `edgec eval --adapters`: every exit and voting mode of a tuned model.
fn run_exits(
    a: &EvalArgs,
    model: &edgec::frontend::LoadedModel,
    dir: &std::path::Path,
) -> anyhow::Result<()> {
    use edge_runtime::train::vote::{Tuned, Vote, evaluate_exits};
    let tuned = Tuned::load(&model.graph, dir)?;
    let ex = &tuned.exits;
    let votes = a
        .vote
        .iter()
        .map(|v| Vote::load(v, dir))
        .collect::<Result<Vec<_>, _>>()?;
    let exec = Executor::new(Arc::new(tuned.graph.clone()))?;
    let text = super::read_text(a.text.as_ref().expect("clap: --adapters requires --text"))?;
    let tok = super::tokenizer(model, &a.model.model)?;
    let tokens = tok.encode(&text)?;
    let bos = if tok.add_bos { tok.bos } else { None };
    let n = edgec::eval::chunk_count(tokens.len(), a.ctx, a.chunks);
    let pb = super::progress_bar(n as u64, "perplexity per exit");
    let r = evaluate_exits(&exec, ex, &votes, &tokens, a.ctx, a.chunks, bos, |d, _| {
        pb.set_position(d as u64)
    });
    pb.finish_and_clear();
    let r = r?;
    if a.json {
        let row = |s: &edge_runtime::train::vote::Score| serde_json::json!({"name": s.name, "perplexity": s.perplexity(), "accuracy": s.accuracy(), "tokens": s.count});
        let v = serde_json::json!({
            "exits": r.exits.iter().map(row).collect::<Vec<_>>(),
            "votes": r.votes.iter().map(row).collect::<Vec<_>>(),
            "ctx": a.ctx,
            "chunks": n,
        });
        println!("{}", serde_json::to_string(&v)?);
    } else {
        super::tune::print_eval(&r);
    }
    Ok(())
}

impl EvalArgs {
    pub fn threads(&self) -> Option<usize> {
        self.model.threads
    }
}

pub fn run(a: EvalArgs) -> anyhow::Result<()> {
    let model = a.model.load()?;
    if let (Some(dir), Some(_)) = (&a.adapters, &a.text) {
        return run_exits(&a, &model, dir);
    }
    // With --tokens, adapters are scored at the final layer (the PEFT model's loss).
    let graph = match &a.adapters {
        Some(dir) => edge_runtime::train::vote::Tuned::load(&model.graph, dir)?.graph,
        None => model.graph.clone(),
    };
    let exec = Executor::new(Arc::new(graph))?;
    let started = std::time::Instant::now();
    let result = if let Some(text_path) = &a.text {
        let text = super::read_text(text_path)?;
        let tok = super::tokenizer(&model, &a.model.model)?;
        let tokens = tok.encode(&text)?;
        let bos = if tok.add_bos { tok.bos } else { None };
        let n = edgec::eval::chunk_count(tokens.len(), a.ctx, a.chunks);
        let pb = super::progress_bar(n as u64, "perplexity");
        let r = chunked_perplexity(&exec, &tokens, a.ctx, a.chunks, bos, |done, _| {
            pb.set_position(done as u64)
        });
        pb.finish_and_clear();
        r?
    } else {
        let path = a.tokens.as_ref().expect("clap requires --text or --tokens");
        let text = super::read_text(path)?;
        let seqs = parse_token_file(&text, exec.graph().config.vocab_size)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let pb = super::progress_bar(seqs.len() as u64, "sequences");
        let r = sequence_loss(&exec, &seqs, |done, _| pb.set_position(done as u64));
        pb.finish_and_clear();
        r?
    };
    let secs = started.elapsed().as_secs_f64();
    if a.json {
        let mut v = serde_json::to_value(&result)?;
        v["seconds"] = serde_json::json!(secs);
        v["protocol"] = serde_json::json!(if a.text.is_some() {
            "llama.cpp-chunks"
        } else {
            "sequences"
        });
        v["ctx"] = serde_json::json!(a.ctx);
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
