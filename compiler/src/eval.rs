//! Perplexity evaluation with the runtime's executor.
//!
//! Two protocols:
//! - [`chunked_perplexity`], llama.cpp's `llama-perplexity`: the text is tokenized once,
//!   cut into non-overlapping chunks of `ctx` tokens (the tail that does not fill a chunk is
//!   dropped), each chunk is evaluated from an empty cache with its first token replaced by
//!   BOS when the vocabulary adds BOS, and only the second half of each chunk is scored
//!   (logits at positions `ctx/2 .. ctx-1` predict tokens `ctx/2+1 .. ctx`).
//! - [`sequence_loss`], transformers' causal-LM loss with `labels = input_ids`: every
//!   position of every sequence predicts the next token; the mean is over all of them.

use edge_runtime::{Executor, Rows};
use serde::Serialize;

/// The result of a perplexity run.
#[derive(Debug, Clone, Serialize)]
pub struct Perplexity {
    /// Mean negative log-likelihood per scored token (natural log).
    pub loss: f64,
    pub perplexity: f64,
    /// Standard error of the perplexity, from the spread of the per-token losses
    /// (as llama.cpp reports it).
    pub perplexity_stderr: f64,
    pub tokens_scored: usize,
    /// Tokens run through the model (scored or context).
    pub tokens_evaluated: usize,
    /// Chunks (llama.cpp protocol) or sequences (token-file protocol) evaluated.
    pub chunks: usize,
}

#[derive(Default)]
struct Accum {
    sum: f64,
    sum_sq: f64,
    count: usize,
    evaluated: usize,
}

impl Accum {
    fn add_row(&mut self, logits: &[f32], target: u32) {
        let nll = nll(logits, target);
        self.sum += nll;
        self.sum_sq += nll * nll;
        self.count += 1;
    }
    fn finish(self, chunks: usize) -> Perplexity {
        let n = self.count.max(1) as f64;
        let mean = self.sum / n;
        let var = (self.sum_sq / n - mean * mean).max(0.0);
        let se_mean = if self.count > 1 {
            (var / (n - 1.0)).sqrt()
        } else {
            0.0
        };
        let ppl = mean.exp();
        Perplexity {
            loss: mean,
            perplexity: ppl,
            perplexity_stderr: ppl * se_mean,
            tokens_scored: self.count,
            tokens_evaluated: self.evaluated,
            chunks,
        }
    }
}

/// `-log softmax(logits)[target]`, computed in f64.
pub fn nll(logits: &[f32], target: u32) -> f64 {
    let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = m + logits.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
    lse - logits[target as usize] as f64
}

/// How many chunks of `ctx` tokens the llama.cpp protocol evaluates.
pub fn chunk_count(n_tokens: usize, ctx: usize, max_chunks: Option<usize>) -> usize {
    let n = n_tokens / ctx;
    max_chunks.map_or(n, |m| n.min(m))
}

/// llama.cpp's protocol (see the module docs). `bos` is `Some` when the vocabulary adds
/// BOS. `progress(done, total)` is called after each chunk.
pub fn chunked_perplexity(
    exec: &Executor,
    tokens: &[u32],
    ctx: usize,
    max_chunks: Option<usize>,
    bos: Option<u32>,
    mut progress: impl FnMut(usize, usize),
) -> anyhow::Result<Perplexity> {
    anyhow::ensure!(ctx >= 4, "--ctx must be at least 4 (got {ctx})");
    let n_chunks = chunk_count(tokens.len(), ctx, max_chunks);
    anyhow::ensure!(
        n_chunks > 0,
        "the text has {} tokens, fewer than one chunk of --ctx {ctx}",
        tokens.len()
    );
    let vocab = exec.graph().config.vocab_size;
    let first = ctx / 2;
    let mut acc = Accum::default();
    let mut session = exec.session(ctx);
    for c in 0..n_chunks {
        let mut chunk = tokens[c * ctx..(c + 1) * ctx].to_vec();
        if let Some(b) = bos {
            chunk[0] = b;
        }
        session.reset();
        let out = exec.forward(&mut session, &chunk, Rows::Range(first..ctx - 1), &[])?;
        for (i, row) in out.logits.chunks_exact(vocab).enumerate() {
            acc.add_row(row, chunk[first + i + 1]);
        }
        acc.evaluated += ctx;
        progress(c + 1, n_chunks);
    }
    Ok(acc.finish(n_chunks))
}

/// transformers' loss with `labels = input_ids` over several sequences: the mean over all
/// positions of all sequences of the next-token cross-entropy.
pub fn sequence_loss(
    exec: &Executor,
    sequences: &[Vec<u32>],
    mut progress: impl FnMut(usize, usize),
) -> anyhow::Result<Perplexity> {
    let vocab = exec.graph().config.vocab_size;
    let longest = sequences.iter().map(Vec::len).max().unwrap_or(0);
    let mut session = exec.session(longest.max(1));
    let mut acc = Accum::default();
    for (i, seq) in sequences.iter().enumerate() {
        if seq.len() >= 2 {
            session.reset();
            let out = exec.forward(&mut session, seq, Rows::Range(0..seq.len() - 1), &[])?;
            for (t, row) in out.logits.chunks_exact(vocab).enumerate() {
                acc.add_row(row, seq[t + 1]);
            }
            acc.evaluated += seq.len();
        }
        progress(i + 1, sequences.len());
    }
    anyhow::ensure!(
        acc.count > 0,
        "no sequence has two or more tokens: nothing to score"
    );
    Ok(acc.finish(sequences.len()))
}

/// Parses a token file: one sequence per line, token ids separated by spaces. Empty lines
/// are skipped. Errors name the line and the bad field.
pub fn parse_token_file(text: &str, vocab: usize) -> anyhow::Result<Vec<Vec<u32>>> {
    let mut out = vec![];
    for (ln, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let mut seq = vec![];
        for field in line.split_whitespace() {
            let id: u32 = field
                .parse()
                .map_err(|_| anyhow::anyhow!("line {}: `{field}` is not a token id", ln + 1))?;
            anyhow::ensure!(
                (id as usize) < vocab,
                "line {}: token id {id} is outside the vocabulary (size {vocab})",
                ln + 1
            );
            seq.push(id);
        }
        out.push(seq);
    }
    anyhow::ensure!(!out.is_empty(), "the token file holds no sequence");
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nll_of_uniform_logits_is_log_vocab() {
        assert!((nll(&[0.0; 8], 3) - 8f64.ln()).abs() < 1e-12);
    }

    #[test]
    fn chunking_follows_llamacpp() {
        assert_eq!(chunk_count(51_300, 512, None), 100);
        assert_eq!(chunk_count(51_300, 512, Some(97)), 97);
        assert_eq!(chunk_count(100, 512, None), 0);
    }

    #[test]
    fn token_file_errors_name_the_line() {
        let e = parse_token_file("1 2 3\n4 x 5\n", 10).unwrap_err().to_string();
        assert!(e.contains("line 2") && e.contains("`x`"), "{e}");
        let e = parse_token_file("1 2 30\n", 10).unwrap_err().to_string();
        assert!(e.contains("30") && e.contains("vocabulary"), "{e}");
    }
}
