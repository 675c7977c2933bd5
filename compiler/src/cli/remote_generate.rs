//! `edgec remote-generate`: generate on a device (`Generate` over gRPC), printing the text
//! as the tokens stream in. (A separate command from `edgec generate`, which runs a model
//! locally and requires `--model`.)

use std::io::Write;
use std::path::PathBuf;

use clap::Args;
use edge_proto::runtime::{FinishReason, GenerateRequest, VotingMode};
use edgec::client;

use super::deploy::tokio_runtime;

#[derive(Args)]
pub struct RemoteGenerateArgs {
    /// Device URL, e.g. http://10.0.0.7:50051.
    #[arg(long)]
    device: String,
    /// File holding the device's bearer token.
    #[arg(long)]
    token_file: PathBuf,
    /// CA certificate (PEM) for an https:// device.
    #[arg(long)]
    ca_cert: Option<PathBuf>,
    /// The prompt text.
    #[arg(long, short = 'p', required_unless_present = "prompt_tokens")]
    prompt: Option<String>,
    /// The prompt as comma-separated token ids (for bundles without a tokenizer).
    #[arg(long, value_delimiter = ',', conflicts_with = "prompt")]
    prompt_tokens: Option<Vec<u32>>,
    /// Number of tokens to generate (0: the device's default).
    #[arg(long, short = 'n', default_value_t = 64)]
    max_tokens: u32,
    /// Sampling temperature; 0 means greedy decoding.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Nucleus sampling mass.
    #[arg(long, default_value_t = 0.95)]
    top_p: f32,
    /// Seed of the sampler.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// How the exits vote: last, max-confidence, mean, weighted.
    #[arg(long, default_value = "last", value_parser = ["last", "max-confidence", "mean", "weighted"])]
    voting: String,
    /// Stop when the text contains this (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Keep generating past an end-of-sequence token.
    #[arg(long)]
    ignore_eos: bool,
    /// Run a tuned model: a device tuning job's id (`edgec tune --device`), or `latest`.
    /// Voting modes other than `last` need one.
    #[arg(long)]
    tune_job: Option<String>,
    /// Self-speculative decoding: draft this many tokens per round with an early exit,
    /// verified at full depth in one pass (greedy only; same output as plain decoding).
    #[arg(long, default_value_t = 0)]
    draft_tokens: u32,
    /// The decoder layer (0-based) whose exit drafts (default: the tuned exit nearest half
    /// the depth).
    #[arg(long, requires = "draft_tokens")]
    draft_layer: Option<u32>,
    /// Print a JSON object (token ids, text, finish reason, timings).
    #[arg(long)]
    json: bool,
}

fn voting(name: &str) -> VotingMode {
    match name {
        "max-confidence" => VotingMode::MaxConfidence,
        "mean" => VotingMode::Mean,
        "weighted" => VotingMode::Weighted,
        _ => VotingMode::Last,
    }
}

pub fn run(a: RemoteGenerateArgs) -> anyhow::Result<()> {
    let ca_cert = a.ca_cert.as_ref().map(std::fs::read).transpose()?;
    let opts = client::DeviceOptions {
        token: client::read_token(&a.token_file)?,
        ca_cert,
        max_message_bytes: 4 << 20,
    };
    let req = GenerateRequest {
        prompt: a.prompt.clone().unwrap_or_default(),
        max_tokens: a.max_tokens,
        temperature: a.temperature,
        top_p: a.top_p,
        seed: a.seed,
        voting: voting(&a.voting) as i32,
        stop: a.stop.clone(),
        ignore_eos: a.ignore_eos,
        prompt_tokens: a.prompt_tokens.clone().unwrap_or_default(),
        tune_job: a.tune_job.clone().unwrap_or_default(),
        draft_tokens: a.draft_tokens,
        draft_layer: a.draft_layer,
    };
    let rt = tokio_runtime()?;
    rt.block_on(async {
        let mut c = client::connect(&a.device, &opts).await?;
        let mut stream = c
            .generate(req)
            .await
            .map_err(|s| client::ClientError::rpc(&a.device, s))?
            .into_inner();
        let mut tokens = vec![];
        // Arrival times of the first and the latest token, seen from this side of the
        // connection (the device's own figure leaves out the transport).
        let mut first_at = None;
        let mut last_at = std::time::Instant::now();
        let mut text = String::new();
        if !a.json
            && let Some(p) = &a.prompt
        {
            print!("{p}");
        }
        while let Some(msg) = stream
            .message()
            .await
            .map_err(|s| client::ClientError::rpc(&a.device, s))?
        {
            if let Some(t) = msg.token {
                tokens.push(t);
                last_at = std::time::Instant::now();
                first_at.get_or_insert(last_at);
            }
            text.push_str(&msg.text);
            if !a.json {
                print!("{}", msg.text);
                std::io::stdout().flush().ok();
            }
            if msg.done {
                let reason = match FinishReason::try_from(msg.finish_reason) {
                    Ok(FinishReason::Eos) => "eos",
                    Ok(FinishReason::Stop) => "stop",
                    Ok(FinishReason::Length) => "length",
                    _ => "unknown",
                };
                if a.json {
                    println!(
                        "{}",
                        serde_json::json!({
                            "device": a.device,
                            "bundle_sha256": msg.bundle_sha256,
                            "tokens": tokens,
                            "text": text,
                            "finish_reason": reason,
                            "prompt_tokens": msg.prompt_tokens,
                            "first_token_seconds": msg.first_token_seconds,
                            "decode_tokens_per_s": msg.decode_tokens_per_second,
                            "client_decode_tokens_per_s": first_at
                                .map(|f| (tokens.len().saturating_sub(1)) as f64
                                    / (last_at - f).as_secs_f64().max(1e-9)),
                            "tune_job": msg.tune_job,
                            "speculative_rounds": msg.speculative_rounds,
                            "draft_tokens": msg.draft_tokens,
                            "accepted_draft_tokens": msg.accepted_draft_tokens,
                        })
                    );
                } else {
                    println!();
                    eprintln!(
                        "[{} prompt tokens; {} generated at {:.1} tokens/s; finished: {reason}]",
                        msg.prompt_tokens, msg.generated_tokens, msg.decode_tokens_per_second
                    );
                    if msg.speculative_rounds > 0 {
                        eprintln!(
                            "[speculative: {} rounds, {} of {} drafts accepted, {:.2} per round]",
                            msg.speculative_rounds,
                            msg.accepted_draft_tokens,
                            msg.draft_tokens,
                            msg.accepted_draft_tokens as f64 / msg.speculative_rounds as f64
                        );
                    }
                }
                return Ok(());
            }
        }
        anyhow::bail!("{}: the stream ended without its final message", a.device)
    })
}
