//! AdamW (decoupled weight decay, as `torch.optim.AdamW`), a learning-rate schedule with
//! linear warmup and cosine decay, and gradient clipping by global norm.

use std::collections::HashMap;

use super::lora::{ParamId, Params};
use super::run::Grads;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
}

impl Default for AdamWConfig {
    /// PyTorch's defaults, with the learning rate of the Edge-LLM code (4e-4).
    fn default() -> Self {
        AdamWConfig {
            lr: 4e-4,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// First and second moments of each parameter it updates.
#[derive(Debug, Clone, Default)]
pub struct AdamW {
    pub config: AdamWConfig,
    /// Steps taken (for bias correction).
    pub t: u64,
    pub m: HashMap<ParamId, Vec<f32>>,
    pub v: HashMap<ParamId, Vec<f32>>,
}

impl AdamW {
    pub fn new(config: AdamWConfig) -> Self {
        AdamW {
            config,
            ..Default::default()
        }
    }

    /// One update of every parameter that has a gradient, at learning rate `lr`.
    pub fn step(&mut self, params: &mut Params, grads: &Grads, lr: f32) {
        self.step_with(params, grads, |_| lr);
    }

    /// One update with a learning rate per parameter (parameter groups).
    pub fn step_with(&mut self, params: &mut Params, grads: &Grads, lr_of: impl Fn(ParamId) -> f32) {
        self.t += 1;
        let c = self.config;
        let bc1 = 1.0 - c.beta1.powi(self.t as i32);
        let bc2 = 1.0 - c.beta2.powi(self.t as i32);
        for (&id, g) in &grads.tensors {
            let lr = lr_of(id);
            let p = &mut params.tensors[id.0].data;
            let m = self.m.entry(id).or_insert_with(|| vec![0.0; p.len()]);
            let v = self.v.entry(id).or_insert_with(|| vec![0.0; p.len()]);
            for i in 0..p.len() {
                p[i] *= 1.0 - lr * c.weight_decay;
                m[i] = c.beta1 * m[i] + (1.0 - c.beta1) * g[i];
                v[i] = c.beta2 * v[i] + (1.0 - c.beta2) * g[i] * g[i];
                let mh = m[i] / bc1;
                let vh = v[i] / bc2;
                p[i] -= lr * mh / (vh.sqrt() + c.eps);
            }
        }
    }

    /// Bytes of optimizer state.
    pub fn state_bytes(&self) -> usize {
        (self.m.values().map(Vec::len).sum::<usize>() + self.v.values().map(Vec::len).sum::<usize>()) * 4
    }
}

/// Learning rate at `step` (0-based) of `total`: linear warmup over `warmup` steps from
/// 0, then cosine decay to `min_ratio * peak`.
pub fn lr_at(peak: f32, step: usize, total: usize, warmup: usize, min_ratio: f32) -> f32 {
    if warmup > 0 && step < warmup {
        return peak * (step + 1) as f32 / warmup as f32;
    }
    let span = total.saturating_sub(warmup).max(1);
    let progress = ((step - warmup.min(step)) as f32 / span as f32).min(1.0);
    let cos = 0.5 * (1.0 + (std::f32::consts::PI * progress).cos());
    peak * (min_ratio + (1.0 - min_ratio) * cos)
}

/// Scales the gradients so that their global norm is at most `max_norm` (as
/// `torch.nn.utils.clip_grad_norm_`); returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut Grads, max_norm: f32) -> f64 {
    let norm = grads.norm();
    if max_norm > 0.0 && norm > max_norm as f64 {
        let s = (max_norm as f64 / (norm + 1e-6)) as f32;
        for g in grads.tensors.values_mut() {
            for x in g {
                *x *= s;
            }
        }
    }
    norm
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_then_decays_to_the_floor() {
        assert!((lr_at(1.0, 0, 100, 10, 0.1) - 0.1).abs() < 1e-6);
        assert!((lr_at(1.0, 9, 100, 10, 0.1) - 1.0).abs() < 1e-6);
        assert!((lr_at(1.0, 10, 100, 10, 0.1) - 1.0).abs() < 1e-6);
        assert!((lr_at(1.0, 100, 100, 10, 0.1) - 0.1).abs() < 1e-6);
        let mid = lr_at(1.0, 55, 100, 10, 0.0);
        assert!((mid - 0.5).abs() < 1e-5, "{mid}");
    }

    #[test]
    fn adamw_first_step_moves_each_weight_by_lr_against_its_gradient() {
        use crate::train::lora::{LoraConfig, Param};
        let mut params = Params {
            lora: LoraConfig {
                rank: 1,
                alpha: 1.0,
                targets: vec![],
            },
            tensors: vec![Param {
                name: "w".into(),
                shape: vec![3],
                data: vec![1.0, -2.0, 0.5],
            }],
            adapters: vec![],
            exits: vec![],
        };
        let mut grads = Grads::default();
        grads.tensors.insert(ParamId(0), vec![0.3, -4.0, 0.0]);
        let mut opt = AdamW::new(AdamWConfig {
            weight_decay: 0.0,
            ..Default::default()
        });
        opt.step(&mut params, &grads, 0.1);
        // Bias-corrected first step: m̂ = g, v̂ = g², update = lr * sign(g).
        let d = &params.tensors[0].data;
        assert!((d[0] - 0.9).abs() < 1e-5 && (d[1] + 1.9).abs() < 1e-5 && (d[2] - 0.5).abs() < 1e-6);
        let mut g = grads.clone();
        let n = clip_grad_norm(&mut g, 1.0);
        assert!((n - (0.09f64 + 16.0).sqrt()).abs() < 1e-5);
        assert!((g.norm() - 1.0).abs() < 1e-4);
    }
}
