//! Inference with the tuned adapters and exit heads: a pass that attaches LoRA to the
//! forward graph, the exit heads' next-token distributions, and voting across exits.
//!
//! Every exit sees the layers below it with all adapters active (single stream): since
//! tuning trains windows shallow to deep with the earlier windows' adapters applied,
//! each exit sees at inference exactly the model it was trained on — one forward pass,
//! unlike the paper code's two streams.

use std::fmt;
use std::str::FromStr;

use super::lora::{Params, head_weights};
use crate::error::{Result, RuntimeError};
use crate::ir::{Graph, Node, Op, ValueId, ValueInfo, Weight, WeightData, names};
use crate::kernels::linear::linear;
use crate::ops::norm::rms_norm;
use crate::tensor::Tensor;

/// How the exits' distributions combine into one.
#[derive(Debug, Clone, PartialEq)]
pub enum Vote {
    /// The final exit alone.
    Last,
    /// Per token, the exit whose top probability is highest (the paper's voting).
    MaxConfidence,
    /// The average of the exits' probabilities.
    Mean,
    /// A weighted average with weights fitted on validation text.
    Weighted(Vec<f32>),
}

impl Vote {
    pub fn name(&self) -> &'static str {
        match self {
            Vote::Last => "last",
            Vote::MaxConfidence => "max-confidence",
            Vote::Mean => "mean",
            Vote::Weighted(_) => "weighted",
        }
    }
}

impl fmt::Display for Vote {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Vote {
    type Err = RuntimeError;
    /// `weighted` parses to empty weights, to be filled from fitted ones.
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "last" => Vote::Last,
            "max-confidence" => Vote::MaxConfidence,
            "mean" => Vote::Mean,
            "weighted" => Vote::Weighted(vec![]),
            _ => {
                return Err(RuntimeError::Invalid(format!(
                    "unknown voting mode `{s}` (last, max-confidence, mean, weighted)"
                )));
            }
        })
    }
}

/// The pass: a copy of `g` where every projection with an adapter computes
/// `x W^T + scale * (x A^T) B^T` (two extra linears and an add; the base weight keeps
/// its compressed format). Verified before it is returned.
pub fn attach_adapters(g: &Graph, params: &Params) -> Result<Graph> {
    let scale = params.lora.scale();
    let mut out = Graph {
        config: g.config.clone(),
        weights: g.weights.clone(),
        values: g.values.clone(),
        nodes: Vec::with_capacity(g.nodes.len()),
        logits: g.logits,
    };
    for node in &g.nodes {
        let adapter = match node.op {
            Op::Linear { weight } => params.adapters.iter().find(|a| a.weight == weight),
            _ => None,
        };
        let Some(ad) = adapter else {
            out.nodes.push(node.clone());
            continue;
        };
        let a = params.get(ad.a);
        let b = params.get(ad.b);
        let a_id = crate::ir::WeightId(out.weights.len());
        out.weights.push(Weight::new_dense(
            a.name.clone(),
            Tensor::from_f32(a.shape.clone(), a.data.clone())?,
        ));
        let b_id = crate::ir::WeightId(out.weights.len());
        let scaled: Vec<f32> = b.data.iter().map(|v| v * scale).collect();
        out.weights.push(Weight::new_dense(
            b.name.clone(),
            Tensor::from_f32(b.shape.clone(), scaled)?,
        ));
        let name = &g.values[node.output.0].name;
        let width = g.values[node.output.0].width;
        let mut value = |n: String, w: usize| {
            out.values.push(ValueInfo { name: n, width: w });
            ValueId(out.values.len() - 1)
        };
        let base = value(format!("{name}.base"), width);
        let h = value(format!("{name}.lora_a"), params.lora.rank);
        let t = value(format!("{name}.lora_b"), width);
        let x = node.inputs[0];
        out.nodes.push(Node {
            name: format!("{}.base", node.name),
            op: node.op.clone(),
            inputs: vec![x],
            output: base,
        });
        out.nodes.push(Node {
            name: format!("{}.lora_a", node.name),
            op: Op::Linear { weight: a_id },
            inputs: vec![x],
            output: h,
        });
        out.nodes.push(Node {
            name: format!("{}.lora_b", node.name),
            op: Op::Linear { weight: b_id },
            inputs: vec![h],
            output: t,
        });
        out.nodes.push(Node {
            name: node.name.clone(),
            op: Op::Add,
            inputs: vec![base, t],
            output: node.output,
        });
    }
    out.verify()?;
    Ok(out)
}

/// The exit heads of a tuned model, ready to turn hidden states into distributions.
pub struct Exits {
    /// `(layer, norm weight, value tapped)` per exit, shallow to deep.
    pub heads: Vec<(usize, Tensor, ValueId)>,
    pub eps: f32,
    head: WeightData,
    own_heads: Vec<Option<WeightData>>,
}

impl Exits {
    /// The exits of `params` on graph `g` (usually the graph with adapters attached).
    /// Without exits in `params`, the final layer is the only exit.
    pub fn new(g: &Graph, params: Option<&Params>, layers: &[usize]) -> Result<Exits> {
        let hw = head_weights(g)?;
        let last = g.config.num_layers - 1;
        let mut heads = vec![];
        let mut own_heads = vec![];
        let mut ls = layers.to_vec();
        if ls.is_empty() {
            ls.push(last);
        }
        for &l in &ls {
            if l > last {
                return Err(RuntimeError::Invalid(format!(
                    "exit layer {l} is out of range (0..={last})"
                )));
            }
            let exit = params.and_then(|p| p.exit(l));
            let norm =
                match exit.and_then(|e| e.norm) {
                    Some(pid) => {
                        let p = params.expect("exit from params").get(pid);
                        Tensor::from_f32(p.shape.clone(), p.data.clone())?
                    }
                    None => g.weight(hw.norm).tensor().cloned().ok_or_else(|| {
                        RuntimeError::InvalidGraph("the final norm weight is not dense".into())
                    })?,
                };
            let own = match exit.and_then(|e| e.head) {
                Some(pid) => {
                    let p = params.expect("exit from params").get(pid);
                    Some(WeightData::Dense(Tensor::from_f32(
                        p.shape.clone(),
                        p.data.clone(),
                    )?))
                }
                None => None,
            };
            let v = g
                .value_id(&names::layer_out(l))
                .ok_or_else(|| RuntimeError::InvalidGraph(format!("no value for the output of layer {l}")))?;
            heads.push((l, norm, v));
            own_heads.push(own);
        }
        Ok(Exits {
            heads,
            eps: hw.eps,
            head: g.weight(hw.head).data.clone(),
            own_heads,
        })
    }

    pub fn layers(&self) -> Vec<usize> {
        self.heads.iter().map(|h| h.0).collect()
    }

    /// The values to tap in a forward pass, in exit order.
    pub fn taps(&self) -> Vec<ValueId> {
        self.heads.iter().map(|h| h.2).collect()
    }

    /// Logits `[rows, vocab]` of exit `i` from its tapped hidden state.
    pub fn logits(&self, i: usize, hidden: &[f32]) -> Vec<f32> {
        let d = self.heads[i].1.numel();
        let rows = hidden.len() / d;
        let mut xn = vec![0.0; hidden.len()];
        rms_norm(hidden, &self.heads[i].1, self.eps, &mut xn);
        let head = self.own_heads[i].as_ref().unwrap_or(&self.head);
        let vocab = head.shape()[0];
        let mut out = vec![0.0; rows * vocab];
        linear(&xn, rows, head, &mut out);
        out
    }
}

/// A tuned model ready for inference: the graph with adapters attached and its exits.
pub struct Tuned {
    pub graph: Graph,
    pub params: Params,
    pub exits: Exits,
}

impl Tuned {
    /// `params` attached to `g`, with the exits they carry.
    pub fn new(g: &Graph, params: Params) -> Result<Tuned> {
        let layers: Vec<usize> = params.exits.iter().map(|e| e.layer).collect();
        let graph = attach_adapters(g, &params)?;
        let exits = Exits::new(&graph, Some(&params), &layers)?;
        Ok(Tuned { graph, params, exits })
    }

    /// The adapters directory `dir` (written by `edgec tune`) on `g`.
    pub fn load(g: &Graph, dir: &std::path::Path) -> Result<Tuned> {
        Tuned::new(g, Params::load_peft_dir(g, dir)?)
    }
}

impl Vote {
    /// Parses a mode; `weighted` takes the weights `edgec tune` fitted and saved in
    /// `dir/voting.json`.
    pub fn load(name: &str, dir: &std::path::Path) -> Result<Vote> {
        let mut vote: Vote = name.parse()?;
        if let Vote::Weighted(w) = &mut vote {
            let path = dir.join("voting.json");
            let text = std::fs::read_to_string(&path).map_err(|e| {
                RuntimeError::Invalid(format!(
                    "weighted voting needs {} (written by `edgec tune --valid`): {e}",
                    path.display()
                ))
            })?;
            let j: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| RuntimeError::Invalid(format!("{}: {e}", path.display())))?;
            *w = j["weights"]
                .as_array()
                .map(|a| a.iter().filter_map(|x| x.as_f64()).map(|x| x as f32).collect())
                .unwrap_or_default();
        }
        Ok(vote)
    }
}

/// Softmax of a logit row (f64 accumulation).
pub fn probabilities(logits: &[f32]) -> Vec<f32> {
    let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut p: Vec<f32> = logits.iter().map(|&z| (z - m).exp()).collect();
    let s: f64 = p.iter().map(|&v| v as f64).sum();
    for v in &mut p {
        *v = (*v as f64 / s) as f32;
    }
    p
}

/// Combines the exits' distributions of one token (`probs[e]` = exit e's) by `vote`.
pub fn combine(vote: &Vote, probs: &[Vec<f32>]) -> Result<Vec<f32>> {
    let n = probs.len();
    Ok(match vote {
        Vote::Last => probs[n - 1].clone(),
        Vote::MaxConfidence => {
            let best = (0..n)
                .max_by(|&a, &b| {
                    let ma = probs[a].iter().copied().fold(0.0, f32::max);
                    let mb = probs[b].iter().copied().fold(0.0, f32::max);
                    ma.total_cmp(&mb).then(a.cmp(&b))
                })
                .expect("at least one exit");
            probs[best].clone()
        }
        Vote::Mean => mix(probs, &vec![1.0 / n as f32; n]),
        Vote::Weighted(w) => {
            if w.len() != n {
                return Err(RuntimeError::Invalid(format!(
                    "weighted voting has {} weights for {n} exits (fit them on validation text first)",
                    w.len()
                )));
            }
            mix(probs, w)
        }
    })
}

fn mix(probs: &[Vec<f32>], w: &[f32]) -> Vec<f32> {
    let mut out = vec![0.0; probs[0].len()];
    for (p, &wi) in probs.iter().zip(w) {
        for (o, &v) in out.iter_mut().zip(p) {
            *o += wi * v;
        }
    }
    out
}

/// Fits mixture weights over exits maximising the likelihood of the targets, by EM:
/// `p_target[t][e]` is exit e's probability of token t's target.
pub fn fit_weights(p_target: &[Vec<f32>], iterations: usize) -> Vec<f32> {
    let n = p_target.first().map_or(0, Vec::len);
    if n == 0 {
        return vec![];
    }
    let mut w = vec![1.0 / n as f64; n];
    for _ in 0..iterations {
        let mut acc = vec![0.0f64; n];
        for row in p_target {
            let z: f64 = row
                .iter()
                .zip(&w)
                .map(|(&p, &wi)| p as f64 * wi)
                .sum::<f64>()
                .max(1e-300);
            for (a, (&p, &wi)) in acc.iter_mut().zip(row.iter().zip(&w)) {
                *a += p as f64 * wi / z;
            }
        }
        let total = p_target.len() as f64;
        w = acc.iter().map(|a| a / total).collect();
    }
    w.into_iter().map(|x| x as f32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn voting_modes_combine_as_defined() {
        let a = vec![0.7, 0.2, 0.1];
        let b = vec![0.1, 0.1, 0.8];
        let probs = vec![a.clone(), b.clone()];
        assert_eq!(combine(&Vote::Last, &probs).unwrap(), b);
        assert_eq!(combine(&Vote::MaxConfidence, &probs).unwrap(), b);
        let m = combine(&Vote::Mean, &probs).unwrap();
        assert!((m[0] - 0.4).abs() < 1e-6 && (m[2] - 0.45).abs() < 1e-6);
        assert!(combine(&Vote::Weighted(vec![1.0]), &probs).is_err());
        let w = combine(&Vote::Weighted(vec![1.0, 0.0]), &probs).unwrap();
        assert_eq!(w, a);
    }

    #[test]
    fn em_weights_favour_the_exit_that_predicts_better() {
        // Exit 1 gives the target 0.9, exit 0 gives 0.1: the fit leans on exit 1.
        let rows: Vec<Vec<f32>> = (0..50).map(|_| vec![0.1, 0.9]).collect();
        let w = fit_weights(&rows, 200);
        assert!(w[1] > 0.95 && (w[0] + w[1] - 1.0).abs() < 1e-5, "{w:?}");
    }
}

/// Perplexity and next-token accuracy of one exit or voting mode.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Score {
    pub name: String,
    pub nll_sum: f64,
    pub correct: usize,
    pub count: usize,
}

impl Score {
    fn add(&mut self, p: &[f32], target: u32) {
        let pt = p[target as usize].max(1e-30) as f64;
        self.nll_sum -= pt.ln();
        let best = p
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, _)| i as u32)
            .unwrap_or(0);
        self.correct += (best == target) as usize;
        self.count += 1;
    }
    pub fn perplexity(&self) -> f64 {
        (self.nll_sum / self.count.max(1) as f64).exp()
    }
    pub fn accuracy(&self) -> f64 {
        self.correct as f64 / self.count.max(1) as f64
    }
}

/// Scores of every exit and every voting mode over a text, plus the exits' target
/// probabilities (to fit weights).
#[derive(Debug, Clone, Default)]
pub struct ExitEval {
    pub exits: Vec<Score>,
    pub votes: Vec<Score>,
    pub p_target: Vec<Vec<f32>>,
}

/// Evaluates `exits` and `votes` on `tokens` with llama.cpp's perplexity protocol
/// (non-overlapping chunks of `ctx`, BOS first when `bos`, the second half of each chunk
/// scored). `progress(done, total)` after each chunk.
#[allow(clippy::too_many_arguments)]
pub fn evaluate_exits(
    exec: &crate::exec::Executor,
    exits: &Exits,
    votes: &[Vote],
    tokens: &[u32],
    ctx: usize,
    max_chunks: Option<usize>,
    bos: Option<u32>,
    mut progress: impl FnMut(usize, usize),
) -> Result<ExitEval> {
    if ctx < 4 {
        return Err(RuntimeError::Invalid(format!(
            "ctx must be at least 4 (got {ctx})"
        )));
    }
    let n_chunks = (tokens.len() / ctx).min(max_chunks.unwrap_or(usize::MAX));
    if n_chunks == 0 {
        return Err(RuntimeError::Invalid(format!(
            "the text has {} tokens, fewer than one chunk of {ctx}",
            tokens.len()
        )));
    }
    let first = ctx / 2;
    let taps = exits.taps();
    let mut out = ExitEval {
        exits: exits
            .layers()
            .iter()
            .map(|l| Score {
                name: format!("exit {l}"),
                ..Default::default()
            })
            .collect(),
        votes: votes
            .iter()
            .map(|v| Score {
                name: v.name().into(),
                ..Default::default()
            })
            .collect(),
        p_target: vec![],
    };
    let mut session = exec.session(ctx);
    for c in 0..n_chunks {
        let mut chunk = tokens[c * ctx..(c + 1) * ctx].to_vec();
        if let Some(b) = bos {
            chunk[0] = b;
        }
        session.reset();
        let step = exec.forward(
            &mut session,
            &chunk,
            crate::exec::Rows::Range(first..ctx - 1),
            &taps,
        )?;
        let d = exec.graph().config.hidden_size;
        let scored = ctx - 1 - first;
        // Taps before the graph's row selection hold every row of the chunk.
        let logits: Vec<Vec<f32>> = (0..taps.len())
            .map(|i| {
                let h = &step.taps[i];
                let rows = if h.len() == ctx * d {
                    &h[first * d..(ctx - 1) * d]
                } else {
                    &h[..]
                };
                debug_assert_eq!(rows.len(), scored * d);
                exits.logits(i, rows)
            })
            .collect();
        let vocab = exits.head.shape()[0];
        for r in 0..ctx - 1 - first {
            let target = chunk[first + r + 1];
            let probs: Vec<Vec<f32>> = logits
                .iter()
                .map(|l| probabilities(&l[r * vocab..(r + 1) * vocab]))
                .collect();
            for (s, p) in out.exits.iter_mut().zip(&probs) {
                s.add(p, target);
            }
            for (s, v) in out.votes.iter_mut().zip(votes) {
                s.add(&combine(v, &probs)?, target);
            }
            out.p_target
                .push(probs.iter().map(|p| p[target as usize]).collect());
        }
        progress(c + 1, n_chunks);
    }
    Ok(out)
}
