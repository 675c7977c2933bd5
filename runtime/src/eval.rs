//! Perplexity, shared by the device (`edge-runtime eval`, the service's `Evaluate`) and
//! the compiler (`edgec eval` re-exports this module), so a bundle's loss and its source
//! model's come from the same code.
//!
//! - [`chunked_perplexity`], llama.cpp's `llama-perplexity`: the text's tokens are cut into
//!   non-overlapping chunks of `ctx` (the tail that does not fill a chunk is dropped), each
//!   chunk runs from an empty cache with its first token replaced by BOS when the vocabulary
//!   adds BOS, and only the second half is scored: logits at positions `ctx/2 .. ctx-2`
//!   predict tokens `ctx/2+1 .. ctx-1`.
//! - [`sequence_loss`], transformers' causal-LM loss with `labels = input_ids`: every
//!   position of every sequence predicts the next token; the mean is over all of them.

use serde::Serialize;

use crate::error::{Result, RuntimeError};
use crate::exec::{Executor, Rows};

/// The result of a perplexity run.
#[derive(Debug, Clone, Serialize)]
pub struct Perplexity {
    /// Mean negative log-likelihood per scored token (natural log).
    pub loss: f64,
    pub perplexity: f64,
    /// Standard error of the perplexity from the spread of the per-token losses.
    pub perplexity_stderr: f64,
    pub tokens_scored: usize,
    /// Tokens run through the model (scored or context).
    pub tokens_evaluated: usize,
    /// Chunks (llama.cpp protocol) or sequences (token-file protocol) evaluated.
    pub chunks: usize,
    /// Mean negative log-likelihood of each chunk (or sequence), in order: two models
    /// scored on the same text can be compared chunk by chunk (a paired test).
    pub chunk_losses: Vec<f64>,
}

#[derive(Default)]
struct Sums {
    sum: f64,
    sum_sq: f64,
    count: usize,
    evaluated: usize,
    chunk_losses: Vec<f64>,
    /// `(sum, count)` when the current chunk began.
    chunk_start: (f64, usize),
}

impl Sums {
    fn add(&mut self, logits: &[f32], target: u32) {
        let v = nll(logits, target);
        self.sum += v;
        self.sum_sq += v * v;
        self.count += 1;
    }

    /// Closes the current chunk (or sequence): records its mean loss.
    fn end_chunk(&mut self) {
        let (s0, c0) = self.chunk_start;
        let n = self.count - c0;
        if n > 0 {
            self.chunk_losses.push((self.sum - s0) / n as f64);
        }
        self.chunk_start = (self.sum, self.count);
    }

    fn result(self, chunks: usize) -> Perplexity {
        let n = self.count.max(1) as f64;
        let mean = self.sum / n;
        let var = (self.sum_sq / n - mean * mean).max(0.0);
        let se = if self.count > 1 {
            (var / (n - 1.0)).sqrt()
        } else {
            0.0
        };
        let perplexity = mean.exp();
        Perplexity {
            loss: mean,
            perplexity,
            perplexity_stderr: perplexity * se,
            tokens_scored: self.count,
            tokens_evaluated: self.evaluated,
            chunks,
            chunk_losses: self.chunk_losses,
        }
    }
}

/// `-log softmax(logits)[target]`, in f64.
pub fn nll(logits: &[f32], target: u32) -> f64 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let log_sum = max + logits.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln();
    log_sum - logits[target as usize] as f64
}

/// Chunks of `ctx` tokens the llama.cpp protocol evaluates.
pub fn chunk_count(n_tokens: usize, ctx: usize, max_chunks: Option<usize>) -> usize {
    let n = n_tokens.checked_div(ctx).unwrap_or(0);
    max_chunks.map_or(n, |m| n.min(m))
}

/// llama.cpp's protocol (module docs). `bos` is `Some` when the vocabulary adds BOS.
/// `progress(done, total)` is called after each chunk.
pub fn chunked_perplexity(
    exec: &Executor,
    tokens: &[u32],
    ctx: usize,
    max_chunks: Option<usize>,
    bos: Option<u32>,
    mut progress: impl FnMut(usize, usize),
) -> Result<Perplexity> {
    if ctx < 4 {
        return Err(RuntimeError::Invalid(format!(
            "--ctx must be at least 4 (got {ctx})"
        )));
    }
    let n_chunks = chunk_count(tokens.len(), ctx, max_chunks);
    if n_chunks == 0 {
        return Err(RuntimeError::Invalid(format!(
            "the text has {} tokens, fewer than one chunk of --ctx {ctx}",
            tokens.len()
        )));
    }
    let vocab = exec.graph().config.vocab_size;
    let half = ctx / 2;
    let mut sums = Sums::default();
    let mut session = exec.session(ctx);
    for (c, chunk) in tokens.chunks_exact(ctx).take(n_chunks).enumerate() {
        let mut chunk = chunk.to_vec();
        if let Some(b) = bos {
            chunk[0] = b;
        }
        session.reset();
        let out = exec.forward(&mut session, &chunk, Rows::Range(half..ctx - 1), &[])?;
        for (i, row) in out.logits.chunks_exact(vocab).enumerate() {
            sums.add(row, chunk[half + i + 1]);
        }
        sums.evaluated += ctx;
        sums.end_chunk();
        progress(c + 1, n_chunks);
    }
    Ok(sums.result(n_chunks))
}

/// transformers' loss with `labels = input_ids`, averaged over every position of every
/// sequence (sequences shorter than two tokens score nothing).
pub fn sequence_loss(
    exec: &Executor,
    sequences: &[Vec<u32>],
    mut progress: impl FnMut(usize, usize),
) -> Result<Perplexity> {
    let vocab = exec.graph().config.vocab_size;
    let longest = sequences.iter().map(Vec::len).max().unwrap_or(0);
    let mut session = exec.session(longest.max(1));
    let mut sums = Sums::default();
    for (i, seq) in sequences.iter().enumerate() {
        if seq.len() >= 2 {
            session.reset();
            let out = exec.forward(&mut session, seq, Rows::Range(0..seq.len() - 1), &[])?;
            for (t, row) in out.logits.chunks_exact(vocab).enumerate() {
                sums.add(row, seq[t + 1]);
            }
            sums.evaluated += seq.len();
            sums.end_chunk();
        }
        progress(i + 1, sequences.len());
    }
    if sums.count == 0 {
        return Err(RuntimeError::Invalid(
            "no sequence has two or more tokens: nothing to score".into(),
        ));
    }
    Ok(sums.result(sequences.len()))
}

/// Parses a token file: one sequence a line, ids separated by whitespace, empty lines
/// skipped. Errors name the line and the field.
pub fn parse_token_file(text: &str, vocab: usize) -> Result<Vec<Vec<u32>>> {
    let mut out = vec![];
    for (ln, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let seq = line
            .split_whitespace()
            .map(|field| {
                let id: u32 = field.parse().map_err(|_| {
                    RuntimeError::Invalid(format!("line {}: `{field}` is not a token id", ln + 1))
                })?;
                if id as usize >= vocab {
                    return Err(RuntimeError::Invalid(format!(
                        "line {}: token id {id} is outside the vocabulary (size {vocab})",
                        ln + 1
                    )));
                }
                Ok(id)
            })
            .collect::<Result<Vec<u32>>>()?;
        out.push(seq);
    }
    if out.is_empty() {
        return Err(RuntimeError::Invalid("the token file holds no sequence".into()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_logits_cost_log_vocab() {
        assert!((nll(&[0.0; 16], 5) - 16f64.ln()).abs() < 1e-12);
    }

    #[test]
    fn chunks_follow_llamacpp() {
        assert_eq!(chunk_count(51_300, 512, None), 100);
        assert_eq!(chunk_count(51_300, 512, Some(7)), 7);
        assert_eq!(chunk_count(10, 512, None), 0);
        assert_eq!(chunk_count(10, 0, None), 0);
    }

    #[test]
    fn token_file_errors_name_the_line() {
        let e = parse_token_file("1 2\n3 y\n", 10).unwrap_err().to_string();
        assert!(e.contains("line 2") && e.contains("`y`"), "{e}");
        let e = parse_token_file("11\n", 10).unwrap_err().to_string();
        assert!(e.contains("11") && e.contains("vocabulary"), "{e}");
        assert!(parse_token_file("\n\n", 10).is_err());
    }

    #[test]
    fn chunk_losses_are_each_chunks_mean_and_average_to_the_loss() {
        let mut s = Sums::default();
        let logits = [0.0f32, 1.0, 2.0, 3.0];
        for t in [0u32, 1] {
            s.add(&logits, t);
        }
        s.end_chunk();
        for t in [2u32, 3] {
            s.add(&logits, t);
        }
        s.end_chunk();
        s.end_chunk(); // an empty chunk records nothing
        let r = s.result(2);
        assert_eq!(r.chunk_losses.len(), 2);
        let first = (nll(&logits, 0) + nll(&logits, 1)) / 2.0;
        let second = (nll(&logits, 2) + nll(&logits, 3)) / 2.0;
        assert!((r.chunk_losses[0] - first).abs() < 1e-12);
        assert!((r.chunk_losses[1] - second).abs() < 1e-12);
        assert!(((first + second) / 2.0 - r.loss).abs() < 1e-12);
        assert!(first > second, "lower logits give higher losses");
    }
}
