//! Calibration: token samples from a text, and per-layer capture of the activations the
//! compression methods need, one decoder layer at a time.
//!
//! The model is run layer by layer with [`Executor::run_span`]: the hidden states entering
//! layer `i` for every sample are kept (that is all the memory holds: one layer's
//! activations times the samples), layer `i` is run on them once to get its outputs (the
//! next layer's inputs) and the inputs of its seven linears, whose `X^T X` are accumulated.

use std::sync::Arc;

use edge_runtime::ir::{Graph, Op, ValueId, Weight, WeightId, names};
use edge_runtime::tokenizer::Tokenizer;
use edge_runtime::{Executor, Tensor};

use super::quantize::Hessian;
use super::sensitivity::LINEARS;
use crate::eval::{nll, parse_token_file};
use crate::frontend::llama::layer_weight_names;

/// `n` samples of `seq` tokens from `text`, evenly spaced over its tokens (overlapping when
/// the text holds fewer than `n * seq` tokens). When the vocabulary adds BOS, each
/// sample's first token is BOS (as in the perplexity protocol).
pub fn token_samples(text: &str, tok: &Tokenizer, n: usize, seq: usize) -> anyhow::Result<Vec<Vec<u32>>> {
    anyhow::ensure!(n > 0, "--samples must be at least 1");
    anyhow::ensure!(seq >= 2, "--seq must be at least 2 (got {seq})");
    anyhow::ensure!(!text.trim().is_empty(), "the calibration file is empty");
    let tokens = tok.encode(text)?;
    let bos = if tok.add_bos { tok.bos } else { None };
    samples_from_tokens(&tokens, n, seq, bos)
}

/// `n` samples of `seq` tokens from a calibration file's `text`: text encoded by `tok`, or,
/// without a tokenizer, whitespace-separated token ids below `vocab` (as `edgec profile
/// --calib-tokens` reads them; no BOS is inserted).
pub fn file_samples(
    text: &str,
    tok: Option<&Tokenizer>,
    vocab: usize,
    n: usize,
    seq: usize,
) -> anyhow::Result<Vec<Vec<u32>>> {
    match tok {
        Some(tok) => token_samples(text, tok, n, seq),
        None => {
            let seqs = parse_token_file(text, vocab)?;
            samples_from_tokens(&seqs.concat(), n, seq, None)
        }
    }
}

/// `n` samples of `seq` tokens evenly spaced over `tokens` (first token replaced by `bos`
/// when given).
pub fn samples_from_tokens(
    tokens: &[u32],
    n: usize,
    seq: usize,
    bos: Option<u32>,
) -> anyhow::Result<Vec<Vec<u32>>> {
    anyhow::ensure!(n > 0, "--samples must be at least 1");
    anyhow::ensure!(seq >= 2, "--seq must be at least 2 (got {seq})");
    anyhow::ensure!(
        tokens.len() >= seq,
        "the calibration text has {} tokens, fewer than one sample of --seq {seq}",
        tokens.len()
    );
    let span = tokens.len() - seq;
    Ok((0..n)
        .map(|k| {
            let start = if n == 1 { 0 } else { k * span / (n - 1) };
            let mut s = tokens[start..start + seq].to_vec();
            if let Some(b) = bos {
                s[0] = b;
            }
            s
        })
        .collect())
}

/// Which of the four captured inputs feeds each linear, in [`LINEARS`] order:
/// 0 = attention norm (q, k, v), 1 = attention output (o), 2 = MLP norm (gate, up),
/// 3 = SwiGLU output (down).
pub const LINEAR_INPUT: [usize; 7] = [0, 0, 0, 1, 2, 2, 3];

/// The values and weights of decoder layer `i`.
#[derive(Debug, Clone)]
pub struct LayerIds {
    pub layer: usize,
    pub span: std::ops::Range<usize>,
    /// The residual stream entering the layer.
    pub input: ValueId,
    /// `attn_norm`, `attn`, `mlp_norm`, `swiglu`: the inputs of the linears.
    pub linear_inputs: [ValueId; 4],
    pub output: ValueId,
    /// The seven linear weights in [`LINEARS`] order.
    pub weights: [WeightId; 7],
}

impl LayerIds {
    pub fn new(g: &Graph, i: usize) -> anyhow::Result<Self> {
        let v = |name: String| {
            g.value_id(&name)
                .ok_or_else(|| anyhow::anyhow!("the graph has no value `{name}`"))
        };
        let span = g
            .layer_span(i)
            .ok_or_else(|| anyhow::anyhow!("the graph has no decoder layer {i}"))?;
        let input = if i == 0 {
            v(names::EMBEDDINGS.into())?
        } else {
            v(names::layer_out(i - 1))?
        };
        let p = format!("layers.{i}");
        let wn = layer_weight_names(i);
        let mut weights = [WeightId(0); 7];
        for (k, name) in [&wn[1], &wn[2], &wn[3], &wn[4], &wn[6], &wn[7], &wn[8]]
            .into_iter()
            .enumerate()
        {
            weights[k] = g
                .weight_id(name)
                .ok_or_else(|| anyhow::anyhow!("the graph has no weight `{name}` ({})", LINEARS[k]))?;
        }
        Ok(LayerIds {
            layer: i,
            span,
            input,
            linear_inputs: [
                v(format!("{p}.attn_norm"))?,
                v(format!("{p}.attn"))?,
                v(format!("{p}.mlp_norm"))?,
                v(format!("{p}.swiglu"))?,
            ],
            output: v(names::layer_out(i))?,
            weights,
        })
    }
}

/// The dense f32 values and shape `[rows, cols]` of a weight.
pub fn weight_f32(g: &Graph, id: WeightId) -> anyhow::Result<(Vec<f32>, usize, usize)> {
    let w = g.weight(id);
    let shape = w.shape();
    anyhow::ensure!(shape.len() == 2, "weight `{}` is not a matrix", w.name);
    Ok((w.data.to_f32_vec(), shape[0], shape[1]))
}

/// A copy of `g` (tensors are shared, not copied) with some weights replaced by dense f32
/// values of the same shape.
pub fn with_weights(g: &Graph, repl: Vec<(WeightId, Vec<f32>)>) -> anyhow::Result<Graph> {
    let mut g2 = g.clone();
    for (id, values) in repl {
        let w = &mut g2.weights[id.0];
        *w = Weight::new_dense(w.name.clone(), Tensor::from_f32(w.shape().to_vec(), values)?);
    }
    Ok(g2)
}

/// The token embeddings of each sample (the input of layer 0), `[seq, hidden]` each.
pub fn embed(g: &Graph, samples: &[Vec<u32>]) -> anyhow::Result<Vec<Vec<f32>>> {
    let table = g
        .nodes
        .iter()
        .find_map(|n| match n.op {
            Op::Embedding { table } => Some(table),
            _ => None,
        })
        .ok_or_else(|| anyhow::anyhow!("the graph has no embedding"))?;
    let d = g.config.hidden_size;
    let t = &g.weight(table).data;
    Ok(samples
        .iter()
        .map(|s| {
            let mut out = vec![0.0; s.len() * d];
            for (row, &tok) in out.chunks_exact_mut(d).zip(s) {
                t.read_row_f32(tok as usize, row);
            }
            out
        })
        .collect())
}

/// What one pass of the reference layer over all samples yields.
pub struct LayerCapture {
    /// `X^T X` of the four linear inputs (see [`LINEAR_INPUT`]).
    pub hessians: [Hessian; 4],
    /// The layer's output for each sample (the next layer's input).
    pub outputs: Vec<Vec<f32>>,
}

/// Runs layer `ids.layer` of `exec` on every sample's input, accumulating the Hessians.
pub fn capture_layer(
    exec: &Executor,
    ids: &LayerIds,
    inputs: &[Vec<f32>],
    seq: usize,
) -> anyhow::Result<LayerCapture> {
    let g = exec.graph();
    let widths = ids.linear_inputs.map(|v| g.values[v.0].width);
    let mut hessians = widths.map(Hessian::new);
    let mut outputs = Vec::with_capacity(inputs.len());
    let mut session = exec.session(seq);
    let want = [
        ids.linear_inputs[0],
        ids.linear_inputs[1],
        ids.linear_inputs[2],
        ids.linear_inputs[3],
        ids.output,
    ];
    for x in inputs {
        session.reset();
        let mut out = exec.run_span(
            &mut session,
            seq,
            vec![(ids.input, x.clone())],
            ids.span.clone(),
            &want,
        )?;
        outputs.push(out.pop().expect("five outputs"));
        for (h, v) in hessians.iter_mut().zip(&out) {
            h.add(v);
        }
    }
    Ok(LayerCapture { hessians, outputs })
}

/// Runs layer `ids.layer` of `exec` on each input; returns the outputs.
pub fn run_layer(
    exec: &Executor,
    ids: &LayerIds,
    inputs: &[Vec<f32>],
    seq: usize,
) -> anyhow::Result<Vec<Vec<f32>>> {
    let mut session = exec.session(seq);
    inputs
        .iter()
        .map(|x| {
            session.reset();
            let mut o = exec.run_span(
                &mut session,
                seq,
                vec![(ids.input, x.clone())],
                ids.span.clone(),
                &[ids.output],
            )?;
            Ok(o.pop().expect("one output"))
        })
        .collect()
}

/// Mean next-token loss over all positions of `samples`, running the model from layer
/// `ids.layer` on (its inputs given for each sample).
pub fn loss_from(
    exec: &Executor,
    ids: &LayerIds,
    inputs: &[Vec<f32>],
    samples: &[Vec<u32>],
    seq: usize,
) -> anyhow::Result<f64> {
    let g = exec.graph();
    let vocab = g.config.vocab_size;
    let mut session = exec.session(seq);
    let (mut sum, mut count) = (0.0f64, 0usize);
    for (x, toks) in inputs.iter().zip(samples) {
        session.reset();
        let logits = exec
            .run_span(
                &mut session,
                seq,
                vec![(ids.input, x.clone())],
                ids.span.start..g.nodes.len(),
                &[g.logits],
            )?
            .pop()
            .expect("logits");
        for (t, row) in logits.chunks_exact(vocab).take(seq - 1).enumerate() {
            sum += nll(row, toks[t + 1]);
            count += 1;
        }
    }
    anyhow::ensure!(count > 0, "no positions to score");
    Ok(sum / count as f64)
}

/// `sum |a - b|^2 / sum |b|^2` over samples.
pub fn nmse(a: &[Vec<f32>], b: &[Vec<f32>]) -> f64 {
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (x, y) in a.iter().zip(b) {
        for (p, q) in x.iter().zip(y) {
            let d = (*p - *q) as f64;
            num += d * d;
            den += *q as f64 * *q as f64;
        }
    }
    num / den.max(f64::MIN_POSITIVE)
}

/// An executor for `g` with layer `ids`'s seven linears replaced.
pub fn executor_with(g: &Graph, ids: &LayerIds, linears: Vec<Vec<f32>>) -> anyhow::Result<Executor> {
    let repl = ids.weights.iter().copied().zip(linears).collect();
    Ok(Executor::new(Arc::new(with_weights(g, repl)?))?)
}
