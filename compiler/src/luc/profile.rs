//! Sensitivity profiling: for every decoder layer and every candidate, how much the layer's
//! output (and each linear's output) changes when its linears are compressed, plus the
//! end-to-end calibration-loss change for a coarse subset of (layer, candidate) pairs.
//!
//! Streaming: the hidden states entering layer `i` for all samples are the only activations
//! kept. For each layer, one reference pass captures the layer's outputs (the next layer's
//! inputs) and its linears' `X^T X`; then every candidate compresses the seven linears
//! (candidates run in parallel) and
//! - each linear's normalized output error comes exactly from the statistics:
//!   `tr(dW H dW^T) / tr(W H W^T)` with `H = X^T X` over all samples' tokens;
//! - the layer's normalized output error `|Y' - Y|^2 / |Y|^2` (`Y` = the residual stream
//!   after the layer, `layers.{i}.out`) is measured by running the compressed layer on the
//!   first `layer_samples` samples;
//! - for the chosen (layer, candidate) pairs, the model is run from that layer on (only it
//!   compressed) over the first `e2e_samples` samples, and the mean next-token loss over all
//!   their positions is compared with the uncompressed model's on the same samples
//!   (`base_loss`).

use edge_runtime::Executor;
use edge_runtime::format::{QuantScheme, QuantSpec, SparsePattern};
use edge_runtime::ir::Graph;
use rayon::prelude::*;

use super::calib::{
    LINEAR_INPUT, LayerIds, capture_layer, embed, executor_with, loss_from, nmse, run_layer, weight_f32,
};
use super::candidate::Candidate;
use super::prune::{Method, Pruner, Quantizer, compress};
use super::quantize::Prepared;
use super::sensitivity::{Calibration, EndToEnd, LINEARS, LayerSensitivity, LinearSensitivity, Sensitivity};

/// The candidate grid: every bit-width with every unstructured sparsity (0 = dense), then
/// every bit-width with every N:M pattern. Errors name the offending value.
pub fn grid(
    bits: &[u8],
    sparsity: &[f64],
    nm: &[(u8, u8)],
    group: u32,
    scheme: QuantScheme,
) -> Result<Vec<Candidate>, String> {
    if bits.is_empty() {
        return Err("--bits is empty".into());
    }
    for &b in bits {
        if !QuantSpec::BITS.contains(&b) {
            return Err(format!(
                "unsupported bit-width {b} in --bits (supported: 2, 3, 4, 8)"
            ));
        }
    }
    if !QuantSpec::GROUPS.contains(&group) {
        return Err(format!("unsupported group size {group} (supported: 32, 64, 128)"));
    }
    for &s in sparsity {
        if !(0.0..1.0).contains(&s) {
            return Err(format!("sparsity {s} in --sparsity must be in [0, 1)"));
        }
    }
    let mut out = vec![];
    for &b in bits {
        for &s in sparsity {
            out.push(Candidate {
                bits: b,
                group,
                scheme,
                sparsity: s,
                pattern: SparsePattern::Unstructured,
            });
        }
    }
    for &b in bits {
        for &(n, m) in nm {
            let c = Candidate {
                bits: b,
                group,
                scheme,
                sparsity: 1.0 - n as f64 / m as f64,
                pattern: SparsePattern::NofM { n, m },
            };
            c.validate().map_err(|e| format!("--nm {n}:{m}: {e}"))?;
            out.push(c);
        }
    }
    for c in &out {
        c.validate()?;
    }
    if out.is_empty() {
        return Err("the candidate grid is empty (--sparsity and --nm both empty)".into());
    }
    Ok(out)
}

/// What to profile and how.
#[derive(Debug, Clone)]
pub struct ProfileConfig {
    pub candidates: Vec<Candidate>,
    pub quantizer: Quantizer,
    pub pruner: Pruner,
    pub seq: usize,
    /// Samples the layer output error is measured on (the first ones).
    pub layer_samples: usize,
    /// End-to-end pairs: these layers × these candidate indices, on the first `e2e_samples`.
    pub e2e_layers: Vec<usize>,
    pub e2e_candidates: Vec<usize>,
    pub e2e_samples: usize,
    /// Measure the end-to-end deltas in this model instead (same architecture, typically
    /// the profiled model compressed at a base policy): the loss change of replacing one
    /// of its layers by the candidate, so that the deltas see the other layers' errors.
    pub context: Option<(std::sync::Arc<Graph>, String)>,
    /// Names recorded in the output.
    pub model: String,
    pub calib_file: String,
}

/// Profiles `g` on the token `samples`. `progress(done, total)` is called as work finishes.
pub fn profile(
    g: &Graph,
    samples: &[Vec<u32>],
    cfg: &ProfileConfig,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> anyhow::Result<Sensitivity> {
    let layers = g.config.num_layers;
    let nc = cfg.candidates.len();
    anyhow::ensure!(nc > 0, "no candidates");
    anyhow::ensure!(!samples.is_empty(), "no calibration samples");
    for &l in &cfg.e2e_layers {
        anyhow::ensure!(
            l < layers,
            "--e2e-layers: layer {l} does not exist (the model has {layers} layers)"
        );
    }
    for &c in &cfg.e2e_candidates {
        anyhow::ensure!(c < nc, "end-to-end candidate {c} is outside the grid of {nc}");
    }
    let seq = cfg.seq;
    let layer_samples = cfg.layer_samples.clamp(1, samples.len());
    let e2e_samples = cfg.e2e_samples.clamp(1, samples.len());
    let e2e_pairs = cfg.e2e_layers.len() * cfg.e2e_candidates.len();
    let total = (layers * nc + e2e_pairs) as u64 + 1;
    let done = std::sync::atomic::AtomicU64::new(0);
    let tick = |n: u64| {
        let d = done.fetch_add(n, std::sync::atomic::Ordering::Relaxed) + n;
        progress(d, total);
    };

    let exec = Executor::new(std::sync::Arc::new(g.clone()))?;
    let mut x = embed(g, samples)?;
    // The model the end-to-end deltas are measured in, and its hidden states entering the
    // current layer (the profiled model's own unless `context` is given).
    let mut context = match &cfg.context {
        Some((c, _)) => {
            anyhow::ensure!(
                c.config.num_layers == layers && c.config.hidden_size == g.config.hidden_size,
                "the context model's shape ({} layers x {}) is not the profiled model's ({layers} x {})",
                c.config.num_layers,
                c.config.hidden_size,
                g.config.hidden_size
            );
            let cx = embed(c, &samples[..e2e_samples])?;
            Some((c.clone(), Executor::new(c.clone())?, cx))
        }
        None => None,
    };
    let base_loss = match &context {
        Some((c, ce, cx)) => loss_from(ce, &LayerIds::new(c, 0)?, cx, &samples[..e2e_samples], seq)?,
        None => loss_from(
            &exec,
            &LayerIds::new(g, 0)?,
            &x[..e2e_samples],
            &samples[..e2e_samples],
            seq,
        )?,
    };
    tick(1);

    let mut out_layers = vec![];
    let mut end_to_end = vec![];
    for i in 0..layers {
        let ids = LayerIds::new(g, i)?;
        let cap = capture_layer(&exec, &ids, &x, seq)?;
        let prepared: Vec<Prepared> = cap.hessians.par_iter().map(|h| h.prepare()).collect();
        let lin: Vec<(Vec<f32>, usize, usize)> = ids
            .weights
            .iter()
            .map(|&w| weight_f32(g, w))
            .collect::<anyhow::Result<_>>()?;
        let base_out: Vec<f64> = lin
            .iter()
            .zip(LINEAR_INPUT)
            .map(|((w, _, _), k)| prepared[k].quad(w))
            .collect();
        let method = Method {
            quantizer: cfg.quantizer,
            pruner: cfg.pruner,
        };
        let compress_all = |c: &Candidate| -> Vec<Vec<f32>> {
            lin.iter()
                .zip(LINEAR_INPUT)
                .map(|((w, rows, cols), k)| {
                    compress(w, *rows, *cols, c, method, Some(&prepared[k]), true).values
                })
                .collect()
        };
        let reference = &cap.outputs[..layer_samples];
        let per_cand: Vec<(f64, Vec<f64>)> = cfg
            .candidates
            .par_iter()
            .map(|c| -> anyhow::Result<(f64, Vec<f64>)> {
                let comp = compress_all(c);
                let lin_nmse: Vec<f64> = lin
                    .iter()
                    .zip(&comp)
                    .zip(LINEAR_INPUT)
                    .zip(&base_out)
                    .map(|((((w, _, _), w2), k), base)| prepared[k].output_nmse(w, w2, *base))
                    .collect();
                let ex = executor_with(g, &ids, comp)?;
                let y = run_layer(&ex, &ids, &x[..layer_samples], seq)?;
                tick(1);
                Ok((nmse(&y, reference), lin_nmse))
            })
            .collect::<anyhow::Result<_>>()?;
        let context_ids = match &context {
            Some((c, _, _)) => Some(LayerIds::new(c, i)?),
            None => None,
        };
        if cfg.e2e_layers.contains(&i) {
            // The model the deltas are measured in, this layer's ids in it, and its inputs.
            let (e2e_graph, e2e_ids, e2e_x) = match (&context, &context_ids) {
                (Some((cg, _, cx)), Some(cids)) => (&**cg, cids, &cx[..]),
                _ => (g, &ids, &x[..e2e_samples]),
            };
            for &c in &cfg.e2e_candidates {
                let ex = executor_with(e2e_graph, e2e_ids, compress_all(&cfg.candidates[c]))?;
                let loss = loss_from(&ex, e2e_ids, e2e_x, &samples[..e2e_samples], seq)?;
                end_to_end.push(EndToEnd {
                    layer: i,
                    candidate: c,
                    loss_delta: loss - base_loss,
                });
                tick(1);
            }
        }
        out_layers.push(LayerSensitivity {
            layer: i,
            params: lin.iter().map(|(_, r, c)| r * c).sum(),
            nmse: per_cand.iter().map(|p| p.0).collect(),
            linears: LINEARS
                .iter()
                .enumerate()
                .map(|(k, name)| LinearSensitivity {
                    name: name.to_string(),
                    rows: lin[k].1,
                    cols: lin[k].2,
                    nmse: per_cand.iter().map(|p| p.1[k]).collect(),
                })
                .collect(),
        });
        x = cap.outputs;
        if let (Some((_, ce, cx)), Some(cids)) = (&mut context, &context_ids) {
            *cx = run_layer(ce, cids, cx, seq)?;
        }
    }
    Ok(Sensitivity {
        model: cfg.model.clone(),
        calibration: Calibration {
            file: cfg.calib_file.clone(),
            samples: samples.len(),
            seq,
        },
        quantizer: cfg.quantizer.name().into(),
        pruner: cfg.pruner.name().into(),
        candidates: cfg.candidates.clone(),
        layers: out_layers,
        base_loss,
        end_to_end,
        context: cfg.context.as_ref().map(|(_, name)| name.clone()),
    })
}
