//! One `Generate` stream as an engine task: the prompt's prefill, then one token per step,
//! streamed to the client as it is chosen.

use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use edge_proto::runtime::{FinishReason, GenerateReply};
use tokio::sync::mpsc::UnboundedSender;
use tonic::Status;

use super::engine::{Slot, Step, Task};
use super::model::Model;
use super::tuned::Scorer;
use crate::exec::Executor;
use crate::ir::{Graph, Op, ValueId, WeightId};
use crate::sampling::{Sampler, Sampling};
use crate::train::lora::Params;
use crate::train::vote::Exits;
use crate::{Rows, Session};

/// Decides how much of the generated text can be sent: text that could still turn out to be
/// the start of a stop string, or an incomplete character (decoded as U+FFFD), is held back.
#[derive(Debug, Default)]
pub struct StopText {
    stops: Vec<String>,
    /// Bytes of the decoded text already sent.
    sent: usize,
}

impl StopText {
    pub fn new(stops: Vec<String>) -> StopText {
        StopText { stops, sent: 0 }
    }

    /// Given the whole decoded text so far, returns the newly final text and whether a stop
    /// string matched (then the text before it is all that is ever sent). `finished` releases
    /// everything held back.
    pub fn advance(&mut self, text: &str, finished: bool) -> (String, bool) {
        if self.sent > text.len() || !text.is_char_boundary(self.sent) {
            // The decoded text changed under what was sent (a tokenizer that rewrites
            // earlier text); send nothing more rather than something inconsistent.
            return (String::new(), false);
        }
        let from = self
            .sent
            .saturating_sub(self.stops.iter().map(|s| s.len()).max().unwrap_or(0));
        let from = (0..=from).rev().find(|&i| text.is_char_boundary(i)).unwrap_or(0);
        let hit = self
            .stops
            .iter()
            .filter_map(|s| text[from..].find(s.as_str()).map(|p| p + from))
            .min();
        if let Some(p) = hit {
            let delta = if p > self.sent {
                text[self.sent..p].to_string()
            } else {
                String::new()
            };
            self.sent = self.sent.max(p);
            return (delta, true);
        }
        let mut end = text.len();
        if !finished {
            // The longest tail of the text that begins some stop string.
            let hold = self
                .stops
                .iter()
                .flat_map(|s| s.char_indices().skip(1).map(move |(k, _)| &s[..k]))
                .filter(|prefix| text.ends_with(prefix))
                .map(str::len)
                .max()
                .unwrap_or(0);
            end -= hold;
            // An incomplete multi-byte character decodes to U+FFFD until its last byte comes.
            while text[..end].ends_with('\u{FFFD}') {
                end -= '\u{FFFD}'.len_utf8();
            }
        }
        if end <= self.sent {
            return (String::new(), false);
        }
        let delta = text[self.sent..end].to_string();
        self.sent = end;
        (delta, false)
    }
}

/// The `grpc-timeout` header (`<digits><unit>`, unit one of H M S m u n), as a duration.
pub fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (digits, unit) = v.split_at(v.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// What one request asks for, validated.
pub struct GenParams {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: Sampling,
    pub seed: u64,
    pub stop: Vec<String>,
    pub ignore_eos: bool,
    /// The bundle as built, or a tuned model with its vote.
    pub scorer: Scorer,
    /// Self-speculative decoding (greedy only).
    pub speculative: Option<Speculative>,
}

/// Self-speculative decoding: `k` tokens drafted per round by `draft`.
pub struct Speculative {
    pub k: usize,
    pub draft: Draft,
}

/// An early exit of the running model used as the draft model: the embedding and the
/// decoder layers up to `layer` (with the tuned adapters when the model has them), then
/// that exit's norm and the LM head. It writes the KV cache of its layers; the
/// verification pass rewrites those positions at full depth.
pub struct Draft {
    pub layer: usize,
    exits: Exits,
    table: WeightId,
    embed_out: ValueId,
    span: Range<usize>,
    out: ValueId,
    /// The nodes above the draft layer (the rest of the model, head included).
    upper: Range<usize>,
}

impl Draft {
    /// The exit after decoder layer `layer` of `g` (its trained norm when `params` has an
    /// exit there, the final norm otherwise).
    pub fn new(g: &Graph, params: Option<&Params>, layer: usize) -> crate::Result<Draft> {
        let last = g.config.num_layers - 1;
        if layer >= last {
            return Err(crate::RuntimeError::Invalid(format!(
                "draft_layer {layer} must be below the last layer ({last})"
            )));
        }
        let (e, table, embed_out) = g
            .nodes
            .iter()
            .enumerate()
            .find_map(|(i, n)| match n.op {
                Op::Embedding { table } => Some((i, table, n.output)),
                _ => None,
            })
            .ok_or_else(|| crate::RuntimeError::InvalidGraph("the graph has no embedding".into()))?;
        let end = g
            .layer_span(layer)
            .ok_or_else(|| crate::RuntimeError::InvalidGraph(format!("no decoder layer {layer}")))?
            .end;
        let exits = Exits::new(g, params, &[layer])?;
        let out = exits.taps()[0];
        Ok(Draft {
            layer,
            exits,
            table,
            embed_out,
            span: e + 1..end,
            out,
            upper: end..g.nodes.len(),
        })
    }

    /// Feeds `token` through the draft layers (one new cache position) and returns the
    /// hidden state after the draft layer.
    fn hidden(&self, exec: &Executor, s: &mut Session, token: u32) -> crate::Result<Vec<f32>> {
        let g = exec.graph();
        let mut row = vec![0.0; g.config.hidden_size];
        g.weight(self.table).data.read_row_f32(token as usize, &mut row);
        let mut h = exec.run_span(s, 1, vec![(self.embed_out, row)], self.span.clone(), &[self.out])?;
        Ok(h.pop().expect("one output"))
    }

    /// The exit's greedy next token from its hidden state.
    fn propose(&self, hidden: &[f32]) -> u32 {
        Sampler::new(Sampling::Greedy, 0).sample(&self.exits.logits(0, hidden))
    }
}

/// The executor of the model a request runs (the tuned graph, or the bundle's).
fn executor<'a>(model: &'a Model, scorer: &'a Scorer) -> &'a Executor {
    match scorer {
        Scorer::Base => &model.executor,
        Scorer::Tuned { model, .. } => &model.executor,
    }
}

pub type ReplySender = UnboundedSender<Result<GenerateReply, Status>>;

/// Counts of a speculative stream.
#[derive(Debug, Default, Clone, Copy)]
struct SpecStats {
    rounds: u32,
    drafted: u32,
    accepted: u32,
}

pub struct Generation {
    model: Arc<Model>,
    scorer: Scorer,
    taps: Vec<ValueId>,
    speculative: Option<Speculative>,
    stats: SpecStats,
    session: Session,
    sampler: Sampler,
    prompt: Vec<u32>,
    generated: Vec<u32>,
    /// The last token chosen (already streamed, not yet in the KV cache); `None` before
    /// the prefill.
    pending: Option<u32>,
    max_tokens: usize,
    ignore_eos: bool,
    stop: StopText,
    tx: ReplySender,
    deadline: Option<Instant>,
    admitted: Instant,
    first_token: Option<Instant>,
    _slot: Slot,
}

impl Generation {
    pub fn new(
        model: Arc<Model>,
        p: GenParams,
        tx: ReplySender,
        deadline: Option<Instant>,
        slot: Slot,
    ) -> Generation {
        let session = model.executor.session(p.prompt.len() + p.max_tokens);
        Generation {
            session,
            taps: p.scorer.taps(),
            scorer: p.scorer,
            speculative: p.speculative,
            stats: SpecStats::default(),
            sampler: Sampler::new(p.sampling, p.seed),
            prompt: p.prompt,
            generated: Vec::with_capacity(p.max_tokens),
            pending: None,
            max_tokens: p.max_tokens,
            ignore_eos: p.ignore_eos,
            stop: StopText::new(p.stop),
            tx,
            deadline,
            admitted: Instant::now(),
            first_token: None,
            model,
            _slot: slot,
        }
    }

    fn is_eos(&self, id: u32) -> bool {
        match &self.model.tokenizer {
            Some(t) => t.is_eos(id),
            None => self.model.bundle.graph().config.eos_token_ids.contains(&id),
        }
    }

    fn text(&self) -> Result<String, Status> {
        match &self.model.tokenizer {
            Some(t) => t
                .decode(&self.generated)
                .map_err(|e| Status::internal(e.to_string())),
            None => Ok(String::new()),
        }
    }

    fn fail(&self, status: Status) -> Step {
        let _ = self.tx.send(Err(status));
        Step::Done
    }

    fn finish(&mut self, reason: FinishReason, rest: String) -> Step {
        let now = Instant::now();
        let first = self.first_token.unwrap_or(now);
        let decode_steps = self.generated.len().saturating_sub(1);
        let decode_s = (now - first).as_secs_f64();
        let reply = GenerateReply {
            token: None,
            text: rest,
            done: true,
            finish_reason: reason as i32,
            prompt_tokens: self.prompt.len() as u32,
            generated_tokens: self.generated.len() as u32,
            first_token_seconds: (first - self.admitted).as_secs_f64(),
            decode_tokens_per_second: if decode_s > 0.0 {
                decode_steps as f64 / decode_s
            } else {
                0.0
            },
            bundle_sha256: self.model.sha256.clone(),
            tune_job: self.scorer.job(),
            speculative_rounds: self.stats.rounds,
            draft_tokens: self.stats.drafted,
            accepted_draft_tokens: self.stats.accepted,
        };
        let _ = self.tx.send(Ok(reply));
        Step::Done
    }

    /// Streams one chosen token; `Some` when the stream is finished by it.
    fn emit(&mut self, next: u32) -> Result<Option<Step>, Status> {
        self.generated.push(next);
        self.first_token.get_or_insert_with(Instant::now);
        let eos = !self.ignore_eos && self.is_eos(next);
        let full = self.generated.len() >= self.max_tokens;
        let text = self.text()?;
        let (delta, stopped) = self.stop.advance(&text, false);
        if stopped {
            if !delta.is_empty() {
                let _ = self.tx.send(Ok(GenerateReply {
                    token: Some(next),
                    text: delta,
                    ..Default::default()
                }));
            }
            return Ok(Some(self.finish(FinishReason::Stop, String::new())));
        }
        let _ = self.tx.send(Ok(GenerateReply {
            token: Some(next),
            text: delta,
            ..Default::default()
        }));
        if eos || full {
            let (rest, _) = self.stop.advance(&text, true);
            let reason = if eos {
                FinishReason::Eos
            } else {
                FinishReason::Length
            };
            return Ok(Some(self.finish(reason, rest)));
        }
        Ok(None)
    }

    /// Runs `tokens` at full depth and returns the scores of `rows`.
    fn forward(&mut self, tokens: &[u32], rows: Rows) -> Result<Vec<Vec<f32>>, Status> {
        let out = executor(&self.model, &self.scorer)
            .forward(&mut self.session, tokens, rows, &self.taps)
            .map_err(|e| Status::internal(format!("forward: {e}")))?;
        self.scorer
            .scores(&out)
            .map_err(|e| Status::internal(format!("scores: {e}")))
    }

    /// One speculative round from the pending token `t0`: `k` drafts by the early exit,
    /// then `t0` and the drafts at full depth in one pass. Returns the full model's tokens:
    /// the drafts it agrees with, then its own token at the first disagreement (or after
    /// the last draft). The cache keeps exactly the positions those tokens imply.
    fn speculate(&mut self, t0: u32, k: usize) -> Result<Vec<u32>, Status> {
        let p = self.session.position();
        let mut drafts = Vec::with_capacity(k);
        let sp = self.speculative.as_ref().expect("speculative");
        let exec = executor(&self.model, &self.scorer);
        let err = |e: crate::RuntimeError| Status::internal(format!("speculative round: {e}"));
        // The draft layers' hidden states of t0 and each draft, in order.
        let mut hidden = Vec::with_capacity((k + 1) * self.model.bundle.graph().config.hidden_size);
        let mut t = t0;
        for _ in 0..k {
            let h = sp.draft.hidden(exec, &mut self.session, t).map_err(err)?;
            t = sp.draft.propose(&h);
            hidden.extend_from_slice(&h);
            drafts.push(t);
        }
        // When every value the scores need lies above the draft layer, the verification
        // reuses the draft's work: the last draft goes through the draft layers too, then
        // only the layers above run on all k+1 rows, seeded with the draft layer's output
        // (the draft layers' cache already holds every position). Otherwise the k+1 tokens
        // run through the whole model.
        let layer_of = |v: &ValueId| exec.graph().nodes.iter().position(|n| n.output == *v);
        let reuse = self
            .taps
            .iter()
            .all(|v| layer_of(v).is_some_and(|i| i >= sp.draft.upper.start));
        let scores = if reuse {
            let h = sp.draft.hidden(exec, &mut self.session, t).map_err(err)?;
            hidden.extend_from_slice(&h);
            self.session.truncate(p);
            let mut keep = self.taps.clone();
            keep.push(exec.graph().logits);
            let mut outs = exec
                .run_span(
                    &mut self.session,
                    k + 1,
                    vec![(sp.draft.out, hidden)],
                    sp.draft.upper.clone(),
                    &keep,
                )
                .map_err(err)?;
            let logits = outs.pop().expect("logits kept");
            let out = crate::exec::StepOutput {
                logits,
                rows: 0..k + 1,
                taps: outs,
            };
            self.scorer
                .scores(&out)
                .map_err(|e| Status::internal(format!("scores: {e}")))?
        } else {
            self.session.truncate(p);
            let mut feed = Vec::with_capacity(k + 1);
            feed.push(t0);
            feed.extend(&drafts);
            self.forward(&feed, Rows::All)?
        };
        let mut out = Vec::with_capacity(k + 1);
        for (i, s) in scores.iter().enumerate() {
            let v = self.sampler.sample(s);
            out.push(v);
            if i == k || v != drafts[i] {
                break;
            }
        }
        let accepted = out.len() - 1;
        self.session.truncate(p + 1 + accepted);
        self.stats.rounds += 1;
        self.stats.drafted += k as u32;
        self.stats.accepted += accepted as u32;
        Ok(out)
    }

    fn try_step(&mut self) -> Result<Step, Status> {
        let tokens = match self.pending {
            None => {
                let prompt = std::mem::take(&mut self.prompt);
                let scores = self.forward(&prompt, Rows::Last);
                self.prompt = prompt;
                vec![self.sampler.sample(&scores?[0])]
            }
            Some(t0) => {
                // Drafts beyond the tokens still wanted would be thrown away.
                let left = self.max_tokens - self.generated.len();
                let k = self.speculative.as_ref().map_or(0, |s| s.k.min(left - 1));
                if k > 0 {
                    self.speculate(t0, k)?
                } else {
                    let scores = self.forward(&[t0], Rows::Last)?;
                    vec![self.sampler.sample(&scores[0])]
                }
            }
        };
        for t in tokens {
            if let Some(done) = self.emit(t)? {
                return Ok(done);
            }
            self.pending = Some(t);
        }
        Ok(Step::Continue)
    }
}

impl Task for Generation {
    fn step(&mut self) -> Step {
        if self.tx.is_closed() {
            // The client went away (cancelled or disconnected).
            return Step::Done;
        }
        if self.deadline.is_some_and(|d| Instant::now() >= d) {
            return self.fail(Status::deadline_exceeded(format!(
                "deadline exceeded after {} generated tokens",
                self.generated.len()
            )));
        }
        match self.try_step() {
            Ok(s) => s,
            Err(status) => self.fail(status),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (Vec<String>, bool) {
        let mut st = StopText::new(stops.iter().map(|s| s.to_string()).collect());
        let mut text = String::new();
        let mut out = vec![];
        for p in pieces {
            text.push_str(p);
            let (d, hit) = st.advance(&text, false);
            out.push(d);
            if hit {
                return (out, true);
            }
        }
        out.push(st.advance(&text, true).0);
        (out, false)
    }

    #[test]
    fn stop_strings_are_held_back_and_cut() {
        assert_eq!(
            run(&["\n\n"], &["ab", "c\n", "\nd"]),
            (vec!["ab".into(), "c".into(), "".into()], true)
        );
        // A partial match that does not complete is released.
        assert_eq!(
            run(&["END"], &["x E", "N", "o"]),
            (vec!["x ".into(), "".into(), "ENo".into(), "".into()], false)
        );
        // A stop string inside one piece.
        assert_eq!(run(&["stop"], &["go stop now"]), (vec!["go ".into()], true));
        // Without stop strings everything goes out at once; U+FFFD waits for its bytes.
        assert_eq!(
            run(&[], &["a", "b\u{FFFD}", "c"]),
            (vec!["a".into(), "b".into(), "\u{FFFD}c".into(), "".into()], false)
        );
        // Held-back text is released at the end.
        assert_eq!(run(&["END"], &["abE"]), (vec!["ab".into(), "E".into()], false));
    }

    #[test]
    fn grpc_timeouts() {
        assert_eq!(parse_grpc_timeout("100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse_grpc_timeout("3S"), Some(Duration::from_secs(3)));
        assert_eq!(parse_grpc_timeout("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_grpc_timeout("5u"), Some(Duration::from_micros(5)));
        assert_eq!(parse_grpc_timeout("S"), None);
        assert_eq!(parse_grpc_timeout("10x"), None);
        assert_eq!(parse_grpc_timeout("123456789S"), None);
    }
}
