//! The measured loss of a whole compressed model, for the measured refinement
//! ([`super::refine`]).
//!
//! A measurement compresses every layer as `edgec compress` does (sequential GPTQ /
//! SparseGPT: each layer's statistics come from the calibration samples run through the
//! compressed layers below it) and takes the mean next-token loss of held-out samples.
//! Most policies the search measures differ from the best one so far in a layer or two,
//! often high in the stack, and everything below the first differing layer is then the
//! same computation: the same compressed layers, the same calibration and held-out hidden
//! states. [`PolicyMeter`] keeps those hidden states of the best policy measured so far at
//! every `checkpoint_every`-th layer boundary and starts a measurement from the highest
//! checkpoint at or below the first layer that differs. The result is bit-identical to a
//! measurement from layer 0 (tested); a move that departs at layer `l` of `n` costs about
//! `(n - l) / n` of a whole measurement.

use std::sync::Arc;

use edge_runtime::ir::Graph;

use super::calib;
use super::candidate::Candidate;
use super::compress::{LayerCompressor, layer_executor, policy_methods};
use super::policy::Policy;
use super::prune::Method;

/// Hidden states entering one layer: calibration samples (empty when no layer of the
/// policy needs statistics) and held-out samples.
#[derive(Clone)]
struct Checkpoint {
    calib: Arc<Vec<Vec<f32>>>,
    held_out: Arc<Vec<Vec<f32>>>,
}

/// A measured policy with its checkpoints (`checkpoints[i]`: entering layer `i`, for the
/// layers kept).
struct Trace {
    layers: Vec<(Candidate, Method)>,
    loss: f64,
    checkpoints: Vec<Option<Checkpoint>>,
}

/// Measures compressed models on held-out samples, reusing the work below the first layer
/// where a policy departs from the best one measured so far.
pub struct PolicyMeter<'g> {
    graph: &'g Graph,
    calib: Vec<Vec<u32>>,
    held_out: Vec<Vec<u32>>,
    seq: usize,
    checkpoint_every: usize,
    best: Option<Trace>,
}

/// What one measurement did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Measured {
    /// Mean next-token loss on the held-out samples.
    pub loss: f64,
    /// The layer compression started from (0: the whole model).
    pub resumed_at: usize,
}

impl<'g> PolicyMeter<'g> {
    /// `calib` and `held_out`: token samples of `seq` tokens each.
    pub fn new(
        graph: &'g Graph,
        calib: Vec<Vec<u32>>,
        held_out: Vec<Vec<u32>>,
        seq: usize,
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(!held_out.is_empty(), "no held-out samples to measure the loss on");
        anyhow::ensure!(
            calib.iter().chain(&held_out).all(|s| s.len() == seq),
            "every sample must hold {seq} tokens"
        );
        Ok(PolicyMeter {
            graph,
            calib,
            held_out,
            seq,
            checkpoint_every: 1,
            best: None,
        })
    }

    /// Keep hidden states at every `n`-th layer boundary only (less memory, less reuse).
    /// Each boundary holds (calibration + held-out samples) x seq x hidden f32 values.
    pub fn with_checkpoint_every(mut self, n: usize) -> Self {
        self.checkpoint_every = n.max(1);
        self
    }

    /// Loss of the best policy measured so far.
    pub fn best_loss(&self) -> Option<f64> {
        self.best.as_ref().map(|t| t.loss)
    }

    /// Compresses the model by `policy` and measures its held-out loss; `progress(i)` after
    /// each layer `i` compressed (layers skipped by a resume are reported at once).
    pub fn measure(&mut self, policy: &Policy, mut progress: impl FnMut(usize)) -> anyhow::Result<Measured> {
        let g = self.graph;
        let n = g.config.num_layers;
        let methods = policy_methods(policy, true)?;
        anyhow::ensure!(
            policy.layers.len() == n,
            "the policy has {} layers, the model {n}",
            policy.layers.len()
        );
        let layers: Vec<(Candidate, Method)> =
            policy.layers.iter().map(|l| l.candidate).zip(methods).collect();
        // The first layer where the policy departs from the best one, and the highest
        // checkpoint at or below it.
        let (start, from) = match &self.best {
            Some(best) => {
                let differs = (0..n).find(|&i| layers[i] != best.layers[i]);
                let Some(d) = differs else {
                    progress(n - 1);
                    return Ok(Measured {
                        loss: best.loss,
                        resumed_at: n,
                    });
                };
                let at = (0..=d)
                    .rev()
                    .find(|&i| best.checkpoints[i].is_some())
                    .unwrap_or(0);
                (at, best.checkpoints[at].clone())
            }
            None => (0, None),
        };
        let from = match from {
            Some(c) => c,
            None => Checkpoint {
                calib: Arc::new(vec![]),
                held_out: Arc::new(calib::embed(g, &self.held_out)?),
            },
        };
        let mut lc = LayerCompressor::new(g, policy, Some(&self.calib))?;
        if start > 0 {
            lc = lc.resume_at(start, from.calib.as_ref().clone())?;
        }
        // Below and at `start` the checkpoints are the best policy's (the same layers). At
        // layer 0 only the held-out embeddings are kept: a measurement from layer 0 starts a
        // new compressor, which embeds the calibration samples itself.
        let mut checkpoints: Vec<Option<Checkpoint>> = vec![None; n];
        match &self.best {
            Some(best) if start > 0 => {
                checkpoints[..=start].clone_from_slice(&best.checkpoints[..=start]);
                progress(start - 1);
            }
            _ => {
                checkpoints[0] = Some(Checkpoint {
                    calib: Arc::new(vec![]),
                    held_out: from.held_out.clone(),
                })
            }
        }
        // The held-out samples' hidden states entering the layer being compressed.
        let mut hidden = from.held_out.as_ref().clone();
        let mut loss = f64::NAN;
        for i in start..n {
            let layer = lc.next_layer()?;
            let exec = layer_executor(g, &layer.ids, &layer.weights)?;
            if i + 1 < n {
                hidden = calib::run_layer(&exec, &layer.ids, &hidden, self.seq)?;
                if (i + 1) % self.checkpoint_every == 0 {
                    checkpoints[i + 1] = Some(Checkpoint {
                        calib: Arc::new(lc.inputs().to_vec()),
                        held_out: Arc::new(hidden.clone()),
                    });
                }
            } else {
                loss = calib::loss_from(&exec, &layer.ids, &hidden, &self.held_out, self.seq)?;
            }
            progress(i);
        }
        if self.best.as_ref().is_none_or(|b| loss < b.loss) {
            self.best = Some(Trace {
                layers,
                loss,
                checkpoints,
            });
        }
        Ok(Measured {
            loss,
            resumed_at: start,
        })
    }
}
