//! RMSNorm.

use crate::tensor::Tensor;

/// `out[r] = x[r] / sqrt(mean(x[r]^2) + eps) * weight`, per row of width `weight.len()`.
pub fn rms_norm(x: &[f32], weight: &Tensor, eps: f32, out: &mut [f32]) {
    let w = weight.to_f32_vec();
    let d = w.len();
    for (xr, or) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        let ss: f32 = xr.iter().map(|v| v * v).sum::<f32>() / d as f32;
        let inv = 1.0 / (ss + eps).sqrt();
        for ((o, &v), &g) in or.iter_mut().zip(xr).zip(&w) {
            *o = v * inv * g;
        }
    }
}
