//! Dot products of one weight row (f32, f16 or bf16) with an f32 vector.

use crate::tensor::DType;

/// A weight row in one of the dense storage types.
#[derive(Clone, Copy)]
pub enum Row<'a> {
    F32(&'a [f32]),
    F16(&'a [u16]),
    BF16(&'a [u16]),
}

impl Row<'_> {
    pub fn len(&self) -> usize {
        match self {
            Row::F32(r) => r.len(),
            Row::F16(r) | Row::BF16(r) => r.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn dtype(&self) -> DType {
        match self {
            Row::F32(_) => DType::F32,
            Row::F16(_) => DType::F16,
            Row::BF16(_) => DType::BF16,
        }
    }
}

/// Which dot-product implementation this CPU uses.
pub fn simd_name() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        if simd::available() {
            return "x86-64 AVX2+FMA+F16C";
        }
    }
    "portable scalar"
}

/// `sum_i row[i] * x[i]`. Panics if the lengths differ (a caller bug, checked by the
/// graph verifier upstream).
#[inline]
pub fn dot(row: Row<'_>, x: &[f32]) -> f32 {
    assert_eq!(row.len(), x.len(), "dot: length mismatch");
    #[cfg(target_arch = "x86_64")]
    {
        if simd::available() {
            // SAFETY: `available()` checked at runtime that the CPU has AVX2, FMA and F16C,
            // the features the functions are compiled for; lengths are equal (asserted).
            return unsafe {
                match row {
                    Row::F32(r) => simd::dot_f32(r, x),
                    Row::F16(r) => simd::dot_f16(r, x),
                    Row::BF16(r) => simd::dot_bf16(r, x),
                }
            };
        }
    }
    dot_scalar(row, x)
}

/// Portable reference implementation.
pub fn dot_scalar(row: Row<'_>, x: &[f32]) -> f32 {
    match row {
        Row::F32(r) => r.iter().zip(x).map(|(a, b)| a * b).sum(),
        Row::F16(r) => r
            .iter()
            .zip(x)
            .map(|(&a, b)| half::f16::from_bits(a).to_f32() * b)
            .sum(),
        Row::BF16(r) => r
            .iter()
            .zip(x)
            .map(|(&a, b)| half::bf16::from_bits(a).to_f32() * b)
            .sum(),
    }
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::*;
    use std::sync::OnceLock;

    pub fn available() -> bool {
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| {
            is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
        })
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps::<1>(v);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps::<0x55>(s, s));
        _mm_cvtss_f32(s)
    }

    /// Generic 4-accumulator loop over blocks of 8; `load(i)` converts weights i..i+8.
    #[inline(always)]
    unsafe fn dot_with(
        n: usize,
        x: &[f32],
        load: impl Fn(usize) -> __m256,
        tail: impl Fn(usize) -> f32,
    ) -> f32 {
        // SAFETY (whole body): callers guarantee the features are present and that
        // `x.len() == n`; every load reads indices < n.
        unsafe {
            let xp = x.as_ptr();
            let mut a0 = _mm256_setzero_ps();
            let mut a1 = _mm256_setzero_ps();
            let mut a2 = _mm256_setzero_ps();
            let mut a3 = _mm256_setzero_ps();
            let mut i = 0;
            while i + 32 <= n {
                a0 = _mm256_fmadd_ps(load(i), _mm256_loadu_ps(xp.add(i)), a0);
                a1 = _mm256_fmadd_ps(load(i + 8), _mm256_loadu_ps(xp.add(i + 8)), a1);
                a2 = _mm256_fmadd_ps(load(i + 16), _mm256_loadu_ps(xp.add(i + 16)), a2);
                a3 = _mm256_fmadd_ps(load(i + 24), _mm256_loadu_ps(xp.add(i + 24)), a3);
                i += 32;
            }
            while i + 8 <= n {
                a0 = _mm256_fmadd_ps(load(i), _mm256_loadu_ps(xp.add(i)), a0);
                i += 8;
            }
            let mut s = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
            while i < n {
                s += tail(i) * x[i];
                i += 1;
            }
            s
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_f32(w: &[f32], x: &[f32]) -> f32 {
        let p = w.as_ptr();
        // SAFETY: indices passed to the loaders are < w.len() == x.len().
        unsafe { dot_with(w.len(), x, |i| _mm256_loadu_ps(p.add(i)), |i| w[i]) }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_f16(w: &[u16], x: &[f32]) -> f32 {
        let p = w.as_ptr();
        // SAFETY: each load reads 8 u16 at i..i+8 <= w.len().
        unsafe {
            dot_with(
                w.len(),
                x,
                |i| _mm256_cvtph_ps(_mm_loadu_si128(p.add(i) as *const __m128i)),
                |i| half::f16::from_bits(w[i]).to_f32(),
            )
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_bf16(w: &[u16], x: &[f32]) -> f32 {
        let p = w.as_ptr();
        // SAFETY: each load reads 8 u16 at i..i+8 <= w.len(); bf16 -> f32 is a 16-bit shift.
        unsafe {
            dot_with(
                w.len(),
                x,
                |i| {
                    let h = _mm_loadu_si128(p.add(i) as *const __m128i);
                    _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
                },
                |i| half::bf16::from_bits(w[i]).to_f32(),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simd_matches_scalar_for_every_type_and_length() {
        for n in [1usize, 7, 8, 31, 32, 33, 100, 576, 1537] {
            let x: Vec<f32> = (0..n).map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0).collect();
            let w: Vec<f32> = (0..n).map(|i| ((i * 53 % 97) as f32 - 48.0) / 30.0).collect();
            let h16: Vec<u16> = w.iter().map(|&v| half::f16::from_f32(v).to_bits()).collect();
            let hb: Vec<u16> = w.iter().map(|&v| half::bf16::from_f32(v).to_bits()).collect();
            for row in [Row::F32(&w), Row::F16(&h16), Row::BF16(&hb)] {
                let (a, b) = (dot(row, &x), dot_scalar(row, &x));
                assert!(
                    (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                    "n={n} {:?}: {a} vs {b}",
                    row.dtype()
                );
            }
        }
    }
}
