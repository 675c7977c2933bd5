//! The sensitivity profile: what `edgec profile` measures and `edgec policy` reads.

use serde::{Deserialize, Serialize};

use super::candidate::Candidate;

/// Names of the seven linears of a LLaMA decoder layer, in a fixed order.
pub const LINEARS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sensitivity {
    /// The profiled model (path as given).
    pub model: String,
    pub calibration: Calibration,
    /// Quantizer and pruner used to make each candidate (e.g. "gptq", "sparsegpt").
    pub quantizer: String,
    pub pruner: String,
    /// The candidate grid; every `nmse` vector below is indexed like it.
    pub candidates: Vec<Candidate>,
    pub layers: Vec<LayerSensitivity>,
    /// Loss of the uncompressed model on the calibration tokens.
    pub base_loss: f64,
    /// End-to-end loss change for a coarse subset of (layer, candidate) pairs.
    pub end_to_end: Vec<EndToEnd>,
    /// The model the end-to-end deltas were measured in, when not the profiled model itself
    /// (`edgec profile --context`): each delta is then the change of replacing one layer of
    /// that (compressed) model by the candidate, and `base_loss` is that model's loss.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Calibration {
    pub file: String,
    pub samples: usize,
    pub seq: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LayerSensitivity {
    pub layer: usize,
    /// Weights in the layer's seven linears.
    pub params: usize,
    /// Normalized output MSE of the decoder layer, `|Y' - Y|^2 / |Y|^2`, with all seven
    /// linears compressed by each candidate (everything else unchanged), per candidate.
    pub nmse: Vec<f64>,
    /// The same for each linear alone (its own output), in [`LINEARS`] order.
    pub linears: Vec<LinearSensitivity>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LinearSensitivity {
    pub name: String,
    /// `[rows = out, cols = in]`.
    pub rows: usize,
    pub cols: usize,
    pub nmse: Vec<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EndToEnd {
    pub layer: usize,
    /// Index into `candidates`.
    pub candidate: usize,
    /// Calibration loss with only this layer compressed, minus `base_loss`.
    pub loss_delta: f64,
}

impl Sensitivity {
    /// Reads and checks a profile: every `nmse` vector has one entry per candidate, layers
    /// are 0..n in order, candidates are valid.
    pub fn from_json(text: &str) -> Result<Self, String> {
        let s: Sensitivity =
            serde_json::from_str(text).map_err(|e| format!("not a sensitivity profile: {e}"))?;
        let n = s.candidates.len();
        if n == 0 {
            return Err("the profile has no candidates".into());
        }
        for (i, c) in s.candidates.iter().enumerate() {
            c.validate().map_err(|e| format!("candidate {i}: {e}"))?;
        }
        for (i, l) in s.layers.iter().enumerate() {
            if l.layer != i {
                return Err(format!("layers out of order: entry {i} is layer {}", l.layer));
            }
            if l.nmse.len() != n {
                return Err(format!(
                    "layer {i}: {} nmse values for {n} candidates",
                    l.nmse.len()
                ));
            }
            for lin in &l.linears {
                if lin.nmse.len() != n {
                    return Err(format!(
                        "layer {i} {}: {} nmse values for {n} candidates",
                        lin.name,
                        lin.nmse.len()
                    ));
                }
            }
        }
        Ok(s)
    }

    /// Adds the end-to-end measurements of `other`, a profile of the same model on the same
    /// calibration samples (equal base loss), matching candidates by label; pairs whose
    /// candidate is not in this profile's grid are skipped. Returns how many were added.
    pub fn merge_end_to_end(&mut self, other: &Sensitivity) -> Result<usize, String> {
        if other.layers.len() != self.layers.len() {
            return Err(format!(
                "the other profile has {} layers, this one {}",
                other.layers.len(),
                self.layers.len()
            ));
        }
        let tolerance = 1e-9 * self.base_loss.abs().max(1.0);
        if (other.base_loss - self.base_loss).abs() > tolerance
            || other.calibration.seq != self.calibration.seq
        {
            return Err(format!(
                "the other profile was measured on other calibration samples (base loss {} vs {})",
                other.base_loss, self.base_loss
            ));
        }
        let labels: Vec<String> = self.candidates.iter().map(|c| c.label()).collect();
        let mut added = 0;
        for e in &other.end_to_end {
            let label = other.candidates.get(e.candidate).map(|c| c.label());
            if let Some(c) = label.and_then(|l| labels.iter().position(|x| *x == l)) {
                self.end_to_end.push(EndToEnd {
                    candidate: c,
                    ..e.clone()
                });
                added += 1;
            }
        }
        Ok(added)
    }
}
