//! One `Generate` stream as an engine task: the prompt's prefill, then one token per step,
//! streamed to the client as it is chosen.

use std::sync::Arc;
use std::time::{Duration, Instant};

use edge_proto::runtime::{FinishReason, GenerateReply};
use tokio::sync::mpsc::UnboundedSender;
use tonic::Status;

use super::engine::{Slot, Step, Task};
use super::model::Model;
use crate::sampling::{Sampler, Sampling};
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
}

pub type ReplySender = UnboundedSender<Result<GenerateReply, Status>>;

pub struct Generation {
    model: Arc<Model>,
    session: Session,
    sampler: Sampler,
    prompt: Vec<u32>,
    generated: Vec<u32>,
    logits: Option<Vec<f32>>,
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
            sampler: Sampler::new(p.sampling, p.seed),
            prompt: p.prompt,
            generated: Vec::with_capacity(p.max_tokens),
            logits: None,
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
        };
        let _ = self.tx.send(Ok(reply));
        Step::Done
    }

    fn try_step(&mut self) -> Result<Step, Status> {
        let exec = &self.model.executor;
        let Some(logits) = self.logits.take() else {
            let out = exec
                .forward(&mut self.session, &self.prompt, Rows::Last, &[])
                .map_err(|e| Status::internal(format!("prefill: {e}")))?;
            self.logits = Some(out.logits);
            return Ok(Step::Continue);
        };
        let next = self.sampler.sample(&logits);
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
            return Ok(self.finish(FinishReason::Stop, String::new()));
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
            return Ok(self.finish(reason, rest));
        }
        let out = exec
            .forward(&mut self.session, &[next], Rows::Last, &[])
            .map_err(|e| Status::internal(format!("decode: {e}")))?;
        self.logits = Some(out.logits);
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
