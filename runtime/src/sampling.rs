//! Choosing the next token from logits: greedy, or temperature + top-p (nucleus) with a
//! seeded generator so runs are reproducible.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sampling {
    Greedy,
    TopP { temperature: f32, top_p: f32 },
}

pub struct Sampler {
    mode: Sampling,
    rng: StdRng,
}

impl Sampler {
    pub fn new(mode: Sampling, seed: u64) -> Self {
        Sampler {
            mode,
            rng: StdRng::seed_from_u64(seed),
        }
    }

    /// Picks a token id from one row of logits.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        match self.mode {
            Sampling::Greedy => argmax(logits),
            Sampling::TopP { temperature, top_p } => {
                if temperature <= 0.0 {
                    return argmax(logits);
                }
                let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut probs: Vec<(u32, f32)> = logits
                    .iter()
                    .enumerate()
                    .map(|(i, &l)| (i as u32, ((l - m) / temperature).exp()))
                    .collect();
                let total: f32 = probs.iter().map(|p| p.1).sum();
                probs.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
                let mut kept = 0.0;
                let mut cut = probs.len();
                for (i, p) in probs.iter().enumerate() {
                    kept += p.1 / total;
                    if kept >= top_p {
                        cut = i + 1;
                        break;
                    }
                }
                let probs = &probs[..cut];
                let mass: f32 = probs.iter().map(|p| p.1).sum();
                let mut u = self.rng.random::<f32>() * mass;
                for p in probs {
                    u -= p.1;
                    if u <= 0.0 {
                        return p.0;
                    }
                }
                probs[probs.len() - 1].0
            }
        }
    }
}

/// Index of the largest logit (the first one on ties, as llama.cpp's greedy sampler does).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_first_maximum() {
        assert_eq!(argmax(&[0.0, 3.0, 1.0, 3.0]), 1);
    }

    #[test]
    fn top_p_is_seeded_and_stays_in_the_nucleus() {
        let logits = [5.0, 4.9, -10.0, -10.0, 4.8];
        let mode = Sampling::TopP {
            temperature: 1.0,
            top_p: 0.9,
        };
        let a: Vec<u32> = {
            let mut s = Sampler::new(mode, 7);
            (0..50).map(|_| s.sample(&logits)).collect()
        };
        let b: Vec<u32> = {
            let mut s = Sampler::new(mode, 7);
            (0..50).map(|_| s.sample(&logits)).collect()
        };
        assert_eq!(a, b);
        assert!(a.iter().all(|&t| t == 0 || t == 1 || t == 4));
        assert!(a.iter().any(|&t| t != a[0]), "sampling should vary: {a:?}");
    }
}
