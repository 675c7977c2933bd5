//! Rotary position embedding, rotate-half layout (as Hugging Face LLaMA computes it).

/// Precomputed cos/sin for positions `0..capacity` and `head_dim / 2` frequencies.
#[derive(Debug, Clone)]
pub struct RopeTable {
    pub theta: f32,
    pub head_dim: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl RopeTable {
    /// Frequencies as transformers computes them in f32:
    /// `inv_freq[i] = 1 / theta^(2i / d)`, angle = `pos * inv_freq[i]`.
    pub fn new(theta: f32, head_dim: usize, capacity: usize) -> Self {
        let half = head_dim / 2;
        let inv: Vec<f32> = (0..half)
            .map(|i| 1.0 / theta.powf((2 * i) as f32 / head_dim as f32))
            .collect();
        let mut cos = Vec::with_capacity(capacity * half);
        let mut sin = Vec::with_capacity(capacity * half);
        for p in 0..capacity {
            for &f in &inv {
                let a = p as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        RopeTable {
            theta,
            head_dim,
            cos,
            sin,
        }
    }

    pub fn capacity(&self) -> usize {
        self.cos.len() / (self.head_dim / 2).max(1)
    }

    /// Rotates row `r` of `x` (`heads * head_dim` wide) for position `start + r`, in place.
    pub fn apply(&self, x: &mut [f32], heads: usize, start: usize) {
        self.rotate(x, heads, start, 1.0);
    }

    /// The inverse (transposed) rotation of [`apply`](Self::apply): the gradient of RoPE.
    pub fn apply_inverse(&self, x: &mut [f32], heads: usize, start: usize) {
        self.rotate(x, heads, start, -1.0);
    }

    fn rotate(&self, x: &mut [f32], heads: usize, start: usize, sign: f32) {
        let (d, half) = (self.head_dim, self.head_dim / 2);
        let width = heads * d;
        for (r, row) in x.chunks_exact_mut(width).enumerate() {
            let p = start + r;
            let (c, s) = (
                &self.cos[p * half..(p + 1) * half],
                &self.sin[p * half..(p + 1) * half],
            );
            for h in row.chunks_exact_mut(d) {
                let (a, b) = h.split_at_mut(half);
                for i in 0..half {
                    let (x0, x1) = (a[i], b[i]);
                    let si = sign * s[i];
                    a[i] = x0 * c[i] - x1 * si;
                    b[i] = x1 * c[i] + x0 * si;
                }
            }
        }
    }
}
