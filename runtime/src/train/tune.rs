//! The tuning loop: the adaptive layer tuning schedule of Edge-LLM (exits every `stride`
//! layers; phases from the first exit to the last, each training the LoRA adapters of the
//! `stride` layers ending at its exit with the loss at that exit), and the baselines in
//! the same code (full-depth LoRA; the last k layers). Steps draw fixed samples of the
//! dataset in a seeded order, accumulate gradients, clip, and update with AdamW;
//! checkpoints are written atomically every K steps and `resume` continues from the last.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

use super::graph::{TrainGraph, WindowSpec};
use super::lora::{ParamId, Params, read_f32_safetensors, write_atomic, write_f32_safetensors};
use super::optim::{AdamW, AdamWConfig, clip_grad_norm, lr_at};
use super::run::{Grads, TrainRunner};
use crate::error::{Result, RuntimeError};
use crate::ir::Graph;
pub use crate::memory::rss_bytes;

/// Which layers train.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "mode")]
pub enum TuneMode {
    /// Edge-LLM: windows of `stride` layers ending at each exit, shallow to deep.
    Edge { stride: usize },
    /// Full-depth LoRA: loss at the final layer, backward through the whole model.
    Full,
    /// The last `k` layers, loss at the final layer.
    LastK { k: usize },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TuneConfig {
    pub mode: TuneMode,
    /// Exit layers (edge mode; default every `stride` layers).
    pub exits: Option<Vec<usize>>,
    pub steps: usize,
    pub seq: usize,
    pub batch: usize,
    pub grad_accum: usize,
    pub lr: f32,
    pub weight_decay: f32,
    pub warmup: usize,
    pub min_lr_ratio: f32,
    pub clip: f32,
    pub seed: u64,
    /// Cache each sample's window input within a phase (the prefix is frozen).
    pub cache_prefix: bool,
    pub checkpoint_every: usize,
    /// Use only the first N samples of the data (a small local dataset, several epochs).
    #[serde(default)]
    pub max_samples: Option<usize>,
    /// Recompute each window layer's activations before its backward instead of keeping them.
    #[serde(default)]
    pub recompute: bool,
    /// Learning rate of the exit heads' own parameters (norms, heads); `None`: `lr`.
    #[serde(default)]
    pub exit_lr: Option<f32>,
}

/// One phase of the schedule: a window and the steps it trains for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Phase {
    pub window: WindowSpec,
    pub steps: std::ops::Range<usize>,
}

/// The exit layers of a mode on a model of `layers` layers.
pub fn exit_layers(mode: TuneMode, exits: Option<&[usize]>, layers: usize) -> Result<Vec<usize>> {
    match mode {
        TuneMode::Edge { stride } => {
            if let Some(e) = exits {
                let mut e = e.to_vec();
                e.sort();
                e.dedup();
                if let Some(&bad) = e.iter().find(|&&x| x >= layers) {
                    return Err(RuntimeError::Invalid(format!(
                        "exit layer {bad} is out of range: the model has layers 0..{}",
                        layers - 1
                    )));
                }
                if e.is_empty() {
                    return Err(RuntimeError::Invalid("no exit layers given".into()));
                }
                return Ok(e);
            }
            if stride == 0 || stride > layers || !layers.is_multiple_of(stride) {
                return Err(RuntimeError::Invalid(format!(
                    "stride {stride} does not divide the model's {layers} layers (use a divisor of {layers}, or give --exits)"
                )));
            }
            Ok((1..=layers / stride).map(|i| i * stride - 1).collect())
        }
        TuneMode::Full | TuneMode::LastK { .. } => Ok(vec![layers - 1]),
    }
}

/// The phases of a run of `steps` steps (edge: split evenly over the exits, the
/// remainder to the last, as the paper's code does).
pub fn plan(cfg: &TuneConfig, layers: usize) -> Result<Vec<Phase>> {
    let mut phases = plan_windows(cfg, layers)?;
    for p in &mut phases {
        p.window.recompute = cfg.recompute;
    }
    Ok(phases)
}

fn plan_windows(cfg: &TuneConfig, layers: usize) -> Result<Vec<Phase>> {
    let exits = exit_layers(cfg.mode, cfg.exits.as_deref(), layers)?;
    if cfg.steps == 0 {
        return Err(RuntimeError::Invalid(
            "the number of steps must be at least 1".into(),
        ));
    }
    match cfg.mode {
        TuneMode::Full => Ok(vec![Phase {
            window: WindowSpec::new(0..=layers - 1, layers - 1, layers)?,
            steps: 0..cfg.steps,
        }]),
        TuneMode::LastK { k } => {
            if k == 0 || k > layers {
                return Err(RuntimeError::Invalid(format!(
                    "last-k: k = {k} must be in 1..={layers}"
                )));
            }
            Ok(vec![Phase {
                window: WindowSpec::new(layers - k..=layers - 1, layers - 1, layers)?,
                steps: 0..cfg.steps,
            }])
        }
        TuneMode::Edge { stride } => {
            let n = exits.len();
            let per = cfg.steps / n;
            if per == 0 {
                return Err(RuntimeError::Invalid(format!(
                    "{} steps cannot be shared among {n} exits",
                    cfg.steps
                )));
            }
            let mut phases = vec![];
            let mut prev_end: Option<usize> = None;
            for (i, &e) in exits.iter().enumerate() {
                let start = match cfg.exits {
                    Some(_) => prev_end.map_or(0, |p| p + 1).max((e + 1).saturating_sub(stride)),
                    None => e + 1 - stride,
                };
                let s0 = i * per;
                let s1 = if i + 1 == n { cfg.steps } else { s0 + per };
                phases.push(Phase {
                    window: WindowSpec::new(start..=e, e, layers)?,
                    steps: s0..s1,
                });
                prev_end = Some(e);
            }
            Ok(phases)
        }
    }
}

/// Cuts a token stream into non-overlapping samples of `seq` tokens.
pub fn samples(tokens: &[u32], seq: usize) -> Result<Vec<std::ops::Range<usize>>> {
    if seq < 2 {
        return Err(RuntimeError::Invalid(format!(
            "sequence length {seq} is too short (at least 2)"
        )));
    }
    let n = tokens.len() / seq;
    if n == 0 {
        return Err(RuntimeError::Invalid(format!(
            "the dataset has {} tokens, fewer than one sequence of {seq}",
            tokens.len()
        )));
    }
    Ok((0..n).map(|i| i * seq..(i + 1) * seq).collect())
}

/// What one step did.
#[derive(Debug, Clone, Serialize)]
pub struct StepReport {
    pub step: usize,
    pub total_steps: usize,
    pub phase: usize,
    pub exit: usize,
    pub window: (usize, usize),
    pub loss: f64,
    pub lr: f32,
    pub grad_norm: f64,
    pub tokens: usize,
    pub seconds: f64,
    pub rss_bytes: u64,
    pub trainable: usize,
    pub cached_prefix: bool,
}

#[derive(Debug, Serialize, Deserialize)]
struct CheckpointState {
    step: usize,
    adam_t: u64,
    config: TuneConfig,
}

/// A tuning run in progress.
pub struct Tuner<'g> {
    pub graph: &'g Graph,
    pub cfg: TuneConfig,
    pub params: Params,
    pub phases: Vec<Phase>,
    tokens: Vec<u32>,
    samples: Vec<std::ops::Range<usize>>,
    order: Vec<usize>,
    opt: AdamW,
    /// The next step to run.
    pub step: usize,
    cache: HashMap<usize, Vec<f32>>,
    cache_phase: Option<usize>,
    current: Option<(usize, TrainGraph)>,
    kernels: Option<std::sync::Arc<crate::jit::KernelSet>>,
}

impl<'g> Tuner<'g> {
    /// Runs the frozen compressed weights' products (forward and `dy W`) through the JIT
    /// `kernels` (a bundle's, as its executor runs them); `None`: the reference kernels.
    pub fn with_kernels(mut self, kernels: Option<std::sync::Arc<crate::jit::KernelSet>>) -> Self {
        self.kernels = kernels;
        self
    }

    pub fn new(graph: &'g Graph, cfg: TuneConfig, params: Params, tokens: Vec<u32>) -> Result<Self> {
        let layers = graph.config.num_layers;
        let phases = plan(&cfg, layers)?;
        if cfg.batch == 0 || cfg.grad_accum == 0 {
            return Err(RuntimeError::Invalid(
                "batch and gradient accumulation must be at least 1".into(),
            ));
        }
        let positions = graph.config.max_position_embeddings;
        if positions > 0 && cfg.seq > positions {
            return Err(RuntimeError::Invalid(format!(
                "sequence length {} is longer than the model's {positions} positions",
                cfg.seq
            )));
        }
        let vocab = graph.config.vocab_size;
        if let Some((i, t)) = tokens.iter().enumerate().find(|(_, t)| **t as usize >= vocab) {
            return Err(RuntimeError::Invalid(format!(
                "token {t} at position {i} of the dataset is outside the model's vocabulary of {vocab}"
            )));
        }
        let mut samples = samples(&tokens, cfg.seq)?;
        if let Some(n) = cfg.max_samples {
            samples.truncate(n.max(1));
        }
        let mut order: Vec<usize> = (0..samples.len()).collect();
        order.shuffle(&mut StdRng::seed_from_u64(cfg.seed));
        let opt = AdamW::new(AdamWConfig {
            lr: cfg.lr,
            weight_decay: cfg.weight_decay,
            ..Default::default()
        });
        Ok(Tuner {
            graph,
            cfg,
            params,
            phases,
            tokens,
            samples,
            order,
            opt,
            step: 0,
            kernels: None,
            cache: HashMap::new(),
            cache_phase: None,
            current: None,
        })
    }

    pub fn total_steps(&self) -> usize {
        self.cfg.steps
    }

    fn phase_of(&self, step: usize) -> usize {
        self.phases
            .iter()
            .position(|p| p.steps.contains(&step))
            .unwrap_or(self.phases.len() - 1)
    }

    /// The training graph of the phase of `step` (built once per phase).
    pub fn graph_for(&mut self, phase: usize) -> Result<&TrainGraph> {
        if self.current.as_ref().map(|c| c.0) != Some(phase) {
            let tg = TrainGraph::build(self.graph, &self.params, self.phases[phase].window.clone())?;
            self.current = Some((phase, tg));
        }
        Ok(&self.current.as_ref().expect("just built").1)
    }

    /// Runs one step (all micro-batches, clip, update).
    pub fn run_step(&mut self) -> Result<StepReport> {
        let t0 = Instant::now();
        let step = self.step;
        let phase = self.phase_of(step);
        if self.cache_phase != Some(phase) {
            self.cache.clear();
            self.cache_phase = Some(phase);
            // A new window trains new parameters: fresh optimizer moments.
            if phase > 0 && self.phases[phase].steps.start == step {
                self.opt = AdamW::new(self.opt.config);
            }
        }
        self.graph_for(phase)?;
        let (_, tg) = self.current.as_ref().expect("built");
        let micro = self.cfg.batch * self.cfg.grad_accum;
        let picks: Vec<usize> = (0..micro)
            .map(|j| self.order[(step * micro + j) % self.order.len()])
            .collect();
        let scored = micro * (self.cfg.seq - 1);
        let weight = 1.0 / scored as f32;
        let mut grads = Grads::zeros(&self.params, &tg.updates);
        let runner = TrainRunner::new(self.graph, &self.params).with_kernels(self.kernels.as_deref());
        let mut loss = 0.0;
        let mut cached_any = false;
        for &s in &picks {
            let toks = &self.tokens[self.samples[s].clone()];
            let input = if self.cfg.cache_prefix && !tg.prefix.is_empty() {
                let x = match self.cache.get(&s) {
                    Some(x) => {
                        cached_any = true;
                        x.clone()
                    }
                    None => {
                        let x = runner.prefix(tg, toks)?;
                        self.cache.insert(s, x.clone());
                        x
                    }
                };
                Some(x)
            } else {
                None
            };
            loss += runner.step(tg, toks, input, weight, &mut grads)?.loss;
        }
        let grad_norm = clip_grad_norm(&mut grads, self.cfg.clip);
        let ph = &self.phases[phase];
        let local = step - ph.steps.start;
        let lr = lr_at(
            self.cfg.lr,
            local,
            ph.steps.len(),
            self.cfg.warmup.min(ph.steps.len() / 2),
            self.cfg.min_lr_ratio,
        );
        let trainable = self.params.count(&tg.updates);
        let window = (*ph.window.layers.start(), *ph.window.layers.end());
        let exit = ph.window.exit;
        let exit_lr = self.cfg.exit_lr.map(|e| e * lr / self.cfg.lr);
        let exit_params: Vec<ParamId> = self
            .params
            .exits
            .iter()
            .flat_map(|e| e.norm.into_iter().chain(e.head))
            .collect();
        self.opt.step_with(&mut self.params, &grads, |id| match exit_lr {
            Some(e) if exit_params.contains(&id) => e,
            _ => lr,
        });
        self.step += 1;
        Ok(StepReport {
            step,
            total_steps: self.cfg.steps,
            phase,
            exit,
            window,
            loss,
            lr,
            grad_norm,
            tokens: micro * self.cfg.seq,
            seconds: t0.elapsed().as_secs_f64(),
            rss_bytes: rss_bytes().0,
            trainable,
            cached_prefix: cached_any,
        })
    }

    pub fn finished(&self) -> bool {
        self.step >= self.cfg.steps
    }

    /// Writes a checkpoint of the parameters, the optimizer and the step counter into
    /// `dir/checkpoint-<step>/`, then points `dir/latest` at it (atomically) and removes
    /// older checkpoints. A crash at any moment leaves the previous checkpoint usable.
    pub fn checkpoint(&self, dir: &Path) -> Result<PathBuf> {
        std::fs::create_dir_all(dir)?;
        let name = format!("checkpoint-{}", self.step);
        let tmp = dir.join(format!(".{name}.tmp"));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp)?;
        }
        std::fs::create_dir_all(&tmp)?;
        let all: Vec<ParamId> = (0..self.params.tensors.len()).map(ParamId).collect();
        self.params
            .write_safetensors(&tmp.join("params.safetensors"), &all)?;
        let mut moments: Vec<(String, &[f32], Vec<usize>)> = vec![];
        for (which, map) in [("m", &self.opt.m), ("v", &self.opt.v)] {
            for (id, data) in map {
                moments.push((
                    format!("{which}/{}", self.params.get(*id).name),
                    data,
                    vec![data.len()],
                ));
            }
        }
        let views: Vec<(String, &[f32], &[usize])> = moments
            .iter()
            .map(|(n, d, s)| (n.clone(), *d, s.as_slice()))
            .collect();
        write_f32_safetensors(&tmp.join("optimizer.safetensors"), &views, None)?;
        let state = CheckpointState {
            step: self.step,
            adam_t: self.opt.t,
            config: self.cfg.clone(),
        };
        write_atomic(
            &tmp.join("state.json"),
            serde_json::to_string_pretty(&state).expect("json").as_bytes(),
        )?;
        let fin = dir.join(&name);
        if fin.exists() {
            std::fs::remove_dir_all(&fin)?;
        }
        std::fs::rename(&tmp, &fin)?;
        write_atomic(&dir.join("latest"), name.as_bytes())?;
        for e in std::fs::read_dir(dir)?.flatten() {
            let n = e.file_name().to_string_lossy().to_string();
            if n.starts_with("checkpoint-") && n != name {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
        Ok(fin)
    }

    /// Restores the last checkpoint in `dir` (if any); returns the step it resumes at.
    pub fn resume(&mut self, dir: &Path) -> Result<Option<usize>> {
        let latest = dir.join("latest");
        let Ok(name) = std::fs::read_to_string(&latest) else {
            return Ok(None);
        };
        let ck = dir.join(name.trim());
        let bad = |m: String| RuntimeError::Invalid(format!("checkpoint {}: {m}", ck.display()));
        let state: CheckpointState = serde_json::from_slice(&std::fs::read(ck.join("state.json"))?)
            .map_err(|e| bad(format!("state.json: {e}")))?;
        if state.config != self.cfg {
            return Err(bad(format!(
                "was made with different settings ({:?}); resume with the same options",
                state.config
            )));
        }
        self.params.load_safetensors(&ck.join("params.safetensors"))?;
        let moments = read_f32_safetensors(&ck.join("optimizer.safetensors"))?;
        let mut opt = AdamW::new(self.opt.config);
        opt.t = state.adam_t;
        for (name, (_, data)) in moments {
            let (which, pname) = name
                .split_once('/')
                .ok_or_else(|| bad(format!("bad moment name {name}")))?;
            let id = self
                .params
                .tensors
                .iter()
                .position(|p| p.name == pname)
                .map(ParamId)
                .ok_or_else(|| bad(format!("moment of unknown parameter {pname}")))?;
            match which {
                "m" => opt.m.insert(id, data),
                _ => opt.v.insert(id, data),
            };
        }
        self.opt = opt;
        self.step = state.step;
        self.current = None;
        // The next step decides, as an uninterrupted run would, whether a new phase
        // starts (fresh optimizer moments).
        self.cache_phase = None;
        self.cache.clear();
        Ok(Some(self.step))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(mode: TuneMode, steps: usize) -> TuneConfig {
        TuneConfig {
            mode,
            exits: None,
            steps,
            seq: 16,
            batch: 1,
            grad_accum: 1,
            lr: 1e-3,
            weight_decay: 0.0,
            warmup: 0,
            min_lr_ratio: 0.1,
            clip: 1.0,
            seed: 0,
            cache_prefix: true,
            checkpoint_every: 0,
            max_samples: None,
            recompute: false,
            exit_lr: None,
        }
    }

    #[test]
    fn edge_schedule_has_a_window_per_exit_shallow_to_deep() {
        let p = plan(&cfg(TuneMode::Edge { stride: 6 }, 32), 30).unwrap();
        let got: Vec<(usize, usize, usize, std::ops::Range<usize>)> = p
            .iter()
            .map(|p| {
                (
                    *p.window.layers.start(),
                    *p.window.layers.end(),
                    p.window.exit,
                    p.steps.clone(),
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                (0, 5, 5, 0..6),
                (6, 11, 11, 6..12),
                (12, 17, 17, 12..18),
                (18, 23, 23, 18..24),
                (24, 29, 29, 24..32)
            ]
        );
        assert!(
            plan(&cfg(TuneMode::Edge { stride: 7 }, 32), 30)
                .unwrap_err()
                .to_string()
                .contains("divide")
        );
        let mut c = cfg(TuneMode::Edge { stride: 6 }, 10);
        c.exits = Some(vec![3, 40]);
        assert!(plan(&c, 30).unwrap_err().to_string().contains("out of range"));
        assert_eq!(
            plan(&cfg(TuneMode::LastK { k: 4 }, 5), 30).unwrap()[0]
                .window
                .layers,
            26..=29
        );
        assert_eq!(
            plan(&cfg(TuneMode::Full, 5), 30).unwrap()[0].window.layers,
            0..=29
        );
    }
}
