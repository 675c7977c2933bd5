//! `edgec profile`.

use std::path::PathBuf;

use clap::{Args, ValueEnum};
use edge_runtime::format::{QuantScheme, SparsePattern};
use edgec::luc::calib::file_samples;
use edgec::luc::heatmap;
use edgec::luc::profile::{ProfileConfig, grid, profile};
use edgec::luc::prune::{Pruner, Quantizer};
use edgec::luc::sensitivity::Sensitivity;

#[derive(Clone, Copy, ValueEnum)]
enum SchemeArg {
    Asym,
    Sym,
}

#[derive(Clone, Copy, ValueEnum)]
enum QuantizerArg {
    Gptq,
    Rtn,
}

#[derive(Clone, Copy, ValueEnum)]
enum PrunerArg {
    Sparsegpt,
    Wanda,
    Magnitude,
}

#[derive(Args)]
#[command(
    after_help = "OUTPUT\n  -o FILE.json gets the profile (the sensitivity.json that `edgec policy` reads); \
FILE.svg the heatmap (layers x candidates, colour = log10 of the layer's normalized output MSE) and \
FILE.md the same as a table with the end-to-end loss deltas.\n\nMEASURES\n  Per layer and candidate: \
|Y'-Y|^2/|Y|^2 of the layer output (residual stream after the layer) with its seven linears \
compressed, on the first --layer-samples samples; per linear: its own output error from X^T X of \
its input over all samples. End to end: calibration loss (all positions of the first --e2e-samples \
samples) with only one layer compressed, minus the uncompressed loss, for --e2e-layers x \
--e2e-candidates."
)]
pub struct ProfileArgs {
    #[command(flatten)]
    model: super::ModelArgs,
    /// Calibration text (UTF-8).
    #[arg(
        long,
        conflicts_with = "calib_tokens",
        required_unless_present = "calib_tokens"
    )]
    calib: Option<PathBuf>,
    /// Calibration token ids instead of text (for models without a tokenizer): one or more
    /// lines of space-separated ids, read as one stream.
    #[arg(long)]
    calib_tokens: Option<PathBuf>,
    /// Calibration samples (evenly spaced over the text's tokens).
    #[arg(long, default_value_t = 32)]
    samples: usize,
    /// Tokens per sample.
    #[arg(long, default_value_t = 512)]
    seq: usize,
    /// Bit-widths of the grid (2, 3, 4, 8).
    #[arg(long, value_delimiter = ',', default_value = "2,3,4,8")]
    bits: Vec<u8>,
    /// Unstructured sparsities of the grid (0 = dense).
    #[arg(long, value_delimiter = ',', default_value = "0,0.1,0.2,0.3,0.5,0.7")]
    sparsity: Vec<f64>,
    /// N:M patterns added to the grid for every bit-width (`none` for none).
    #[arg(long, value_delimiter = ',', default_value = "2:4,4:8")]
    nm: Vec<String>,
    /// Quantization group size (32, 64, 128).
    #[arg(long, default_value_t = 32)]
    group: u32,
    #[arg(long, value_enum, default_value = "asym")]
    scheme: SchemeArg,
    #[arg(long, value_enum, default_value = "gptq")]
    quantizer: QuantizerArg,
    #[arg(long, value_enum, default_value = "sparsegpt")]
    pruner: PrunerArg,
    /// Samples the layer output error is measured on.
    #[arg(long, default_value_t = 2)]
    layer_samples: usize,
    /// Layers for the end-to-end loss deltas: a list, or `all` (what `edgec policy
    /// --objective loss-fit` wants) (default: 0, L/3, 2L/3 and the last, e.g. 0,10,20,29 for
    /// 30 layers).
    #[arg(long)]
    e2e_layers: Option<String>,
    /// Candidates (labels, e.g. `4b-g32-asym`) for the end-to-end loss deltas (default: the
    /// dense candidates of each bit-width).
    #[arg(long, value_delimiter = ',')]
    e2e_candidates: Option<Vec<String>>,
    /// Measure the end-to-end deltas inside this model (e.g. the profiled model compressed at
    /// a base policy by `edgec compress`): each is the loss change of replacing one of its
    /// layers by the candidate, so the deltas see the other layers' errors (`edgec policy
    /// --objective loss-measured` reads them).
    #[arg(long, value_name = "MODEL")]
    context: Option<PathBuf>,
    /// Samples the end-to-end loss is computed on.
    #[arg(long, default_value_t = 2)]
    e2e_samples: usize,
    /// Output profile (JSON).
    #[arg(long, short = 'o')]
    output: PathBuf,
    /// Print a JSON summary instead of text.
    #[arg(long)]
    json: bool,
}

impl ProfileArgs {
    pub fn threads(&self) -> Option<usize> {
        self.model.threads
    }
}

fn parse_nm(v: &[String]) -> anyhow::Result<Vec<(u8, u8)>> {
    let mut out = vec![];
    for s in v {
        let s = s.trim();
        if s.is_empty() || s == "none" {
            continue;
        }
        let bad = || anyhow::anyhow!("--nm: `{s}` is not an N:M pattern such as 2:4");
        let (n, m) = s.split_once(':').ok_or_else(bad)?;
        out.push((n.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?));
    }
    Ok(out)
}

pub fn run(a: ProfileArgs) -> anyhow::Result<()> {
    let scheme = match a.scheme {
        SchemeArg::Asym => QuantScheme::Asym,
        SchemeArg::Sym => QuantScheme::Sym,
    };
    let candidates =
        grid(&a.bits, &a.sparsity, &parse_nm(&a.nm)?, a.group, scheme).map_err(|e| anyhow::anyhow!(e))?;
    anyhow::ensure!(a.samples > 0, "--samples must be at least 1");
    anyhow::ensure!(a.seq >= 2, "--seq must be at least 2 (got {})", a.seq);
    let calib = a
        .calib
        .clone()
        .or_else(|| a.calib_tokens.clone())
        .expect("clap requires one");
    let text = super::read_text(&calib)?;
    anyhow::ensure!(
        !text.trim().is_empty(),
        "{}: the calibration file is empty",
        calib.display()
    );
    let model = a.model.load()?;
    let g = &model.graph;
    let layers = g.config.num_layers;
    anyhow::ensure!(
        a.seq <= g.config.max_position_embeddings.max(a.seq.min(1 << 16)),
        "--seq {} is too long",
        a.seq
    );
    for c in &candidates {
        if let SparsePattern::NofM { m, .. } = c.pattern
            && c.sparsity > 0.0
        {
            let d = g.config.hidden_size;
            let f = g.config.intermediate_size;
            anyhow::ensure!(
                d.is_multiple_of(m as usize) && f.is_multiple_of(m as usize),
                "--nm: the model's widths ({d}, {f}) are not multiples of {m}"
            );
        }
    }
    let tok = match a.calib {
        Some(_) => Some(super::tokenizer(&model, &a.model.model)?),
        None => None,
    };
    let samples = file_samples(&text, tok.as_ref(), g.config.vocab_size, a.samples, a.seq)
        .map_err(|e| anyhow::anyhow!("{}: {e}", calib.display()))?;
    let e2e_layers = match a.e2e_layers.as_deref().map(str::trim) {
        Some("all") => (0..layers).collect(),
        Some(list) => list
            .split(',')
            .map(|s| {
                s.trim()
                    .parse::<usize>()
                    .map_err(|_| anyhow::anyhow!("--e2e-layers: `{s}` is not a layer index (or use `all`)"))
            })
            .collect::<anyhow::Result<Vec<_>>>()?,
        None => {
            let mut v: Vec<usize> = (0..4).map(|k| (k * layers / 3).min(layers - 1)).collect();
            v.dedup();
            v
        }
    };
    let e2e_candidates = match &a.e2e_candidates {
        Some(labels) => labels
            .iter()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                candidates
                    .iter()
                    .position(|c| c.label() == l.trim())
                    .ok_or_else(|| {
                        anyhow::anyhow!(
                            "--e2e-candidates: `{l}` is not in the grid ({})",
                            candidates
                                .iter()
                                .map(|c| c.label())
                                .collect::<Vec<_>>()
                                .join(", ")
                        )
                    })
            })
            .collect::<anyhow::Result<Vec<_>>>()?,
        None => (0..candidates.len())
            .filter(|&i| candidates[i].sparsity == 0.0)
            .collect(),
    };
    let cfg = ProfileConfig {
        candidates,
        quantizer: match a.quantizer {
            QuantizerArg::Gptq => Quantizer::Gptq,
            QuantizerArg::Rtn => Quantizer::Rtn,
        },
        pruner: match a.pruner {
            PrunerArg::Sparsegpt => Pruner::SparseGpt,
            PrunerArg::Wanda => Pruner::Wanda,
            PrunerArg::Magnitude => Pruner::Magnitude,
        },
        seq: a.seq,
        layer_samples: a.layer_samples,
        e2e_layers,
        e2e_candidates,
        e2e_samples: a.e2e_samples,
        context: match &a.context {
            Some(path) => Some((
                std::sync::Arc::new(super::load_model(path, &Default::default())?.graph),
                path.display().to_string(),
            )),
            None => None,
        },
        model: a.model.model.display().to_string(),
        calib_file: calib.display().to_string(),
    };
    let started = std::time::Instant::now();
    let pb = super::progress_bar(0, "profiling");
    // Without a terminal the bar is hidden: log every 5% instead.
    let logged = std::sync::atomic::AtomicU64::new(0);
    let s = profile(g, &samples, &cfg, &|done, total| {
        pb.set_length(total);
        pb.set_position(done);
        let step = done * 20 / total.max(1);
        if pb.is_hidden() && logged.fetch_max(step, std::sync::atomic::Ordering::Relaxed) < step {
            eprintln!(
                "profiling: {}% ({done}/{total}) after {:.0} s",
                step * 5,
                started.elapsed().as_secs_f64()
            );
        }
    });
    pb.finish_and_clear();
    let s = s?;
    let secs = started.elapsed().as_secs_f64();
    let json = serde_json::to_string_pretty(&s)?;
    Sensitivity::from_json(&json)
        .map_err(|e| anyhow::anyhow!("internal error, the profile does not validate: {e}"))?;
    let svg_path = a.output.with_extension("svg");
    let md_path = a.output.with_extension("md");
    let write = |p: &PathBuf, t: &str| {
        std::fs::write(p, t).map_err(|e| anyhow::anyhow!("writing {}: {e}", p.display()))
    };
    write(&a.output, &json)?;
    write(&svg_path, &heatmap::svg(&s))?;
    write(&md_path, &heatmap::table(&s))?;
    let rss = super::peak_rss_bytes();
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "output": a.output,
                "svg": svg_path,
                "table": md_path,
                "layers": s.layers.len(),
                "candidates": s.candidates.len(),
                "end_to_end_pairs": s.end_to_end.len(),
                "base_loss": s.base_loss,
                "seconds": secs,
                "peak_rss_bytes": rss,
            })
        );
    } else {
        println!(
            "profiled {} layers x {} candidates ({} end-to-end pairs) in {:.1} s, peak RSS {} MiB\n  {}\n  {}\n  {}",
            s.layers.len(),
            s.candidates.len(),
            s.end_to_end.len(),
            secs,
            rss.map_or("?".into(), |b| (b >> 20).to_string()),
            a.output.display(),
            svg_path.display(),
            md_path.display()
        );
    }
    Ok(())
}
