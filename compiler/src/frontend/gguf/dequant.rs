//! Dequantization of ggml's block formats to f32, written from ggml's block layouts.
//!
//! All multi-byte fields are little-endian; `d`, `m`, `dmin` are f16.
//!
//! | type | elems | bytes | layout |
//! |------|------:|------:|--------|
//! | q4_0 | 32  | 18  | `d, qs[16]`: `x = d * (q - 8)`, low nibbles are elements 0..16, high 16..32 |
//! | q4_1 | 32  | 20  | `d, m, qs[16]`: `x = d * q + m` |
//! | q5_0 | 32  | 22  | `d, qh: u32, qs[16]`: 5th bit of element `j` is bit `j` of `qh`, `x = d * (q - 16)` |
//! | q5_1 | 32  | 24  | `d, m, qh: u32, qs[16]`: `x = d * q + m` |
//! | q8_0 | 32  | 34  | `d, qs: i8[32]`: `x = d * q` |
//! | q4_k | 256 | 144 | `d, dmin, scales[12], qs[128]`: 8 sub-blocks of 32 with 6-bit scale and min |
//! | q5_k | 256 | 176 | `d, dmin, scales[12], qh[32], qs[128]` |
//! | q6_k | 256 | 210 | `ql[128], qh[64], scales: i8[16], d`: 16 sub-blocks of 16 |

use half::f16;

use super::reader::GgmlType;

/// Types this module can dequantize (besides the float types, which need no dequantizing).
pub const QUANTIZED: [GgmlType; 8] = [
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
];

/// Whether [`to_f32`] handles this type.
pub fn supported(t: GgmlType) -> bool {
    matches!(t, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16) || QUANTIZED.contains(&t)
}

/// Converts `numel` elements of type `t` stored in `data` to f32. Errors (with a message)
/// if the type is not one this module handles or if `data` is not exactly the right size.
pub fn to_f32(t: GgmlType, data: &[u8], numel: usize) -> Result<Vec<f32>, String> {
    if !supported(t) {
        return Err(format!("cannot dequantize type {t}"));
    }
    let (block, bytes) = t.block();
    if !numel.is_multiple_of(block) {
        return Err(format!("{numel} elements are not whole {t} blocks of {block}"));
    }
    let want = numel / block * bytes;
    if data.len() != want {
        return Err(format!(
            "{numel} {t} elements need {want} bytes, got {}",
            data.len()
        ));
    }
    let mut out = vec![0f32; numel];
    let blocks = data.chunks_exact(bytes).zip(out.chunks_exact_mut(block));
    match t {
        GgmlType::F32 => {
            for (b, y) in blocks {
                y[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        GgmlType::F16 => {
            for (b, y) in blocks {
                y[0] = f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
            }
        }
        GgmlType::BF16 => {
            for (b, y) in blocks {
                y[0] = f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16);
            }
        }
        GgmlType::Q4_0 => blocks.for_each(|(b, y)| q4_0(b, y)),
        GgmlType::Q4_1 => blocks.for_each(|(b, y)| q4_1(b, y)),
        GgmlType::Q5_0 => blocks.for_each(|(b, y)| q5_0(b, y)),
        GgmlType::Q5_1 => blocks.for_each(|(b, y)| q5_1(b, y)),
        GgmlType::Q8_0 => blocks.for_each(|(b, y)| q8_0(b, y)),
        GgmlType::Q4_K => blocks.for_each(|(b, y)| q4_k(b, y)),
        GgmlType::Q5_K => blocks.for_each(|(b, y)| q5_k(b, y)),
        GgmlType::Q6_K => blocks.for_each(|(b, y)| q6_k(b, y)),
        _ => unreachable!("checked by supported()"),
    }
    Ok(out)
}

#[inline]
fn half(b: &[u8], at: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]])).to_f32()
}

fn q4_0(b: &[u8], y: &mut [f32]) {
    let d = half(b, 0);
    let qs = &b[2..18];
    for j in 0..16 {
        y[j] = ((qs[j] & 0x0f) as i32 - 8) as f32 * d;
        y[j + 16] = ((qs[j] >> 4) as i32 - 8) as f32 * d;
    }
}

fn q4_1(b: &[u8], y: &mut [f32]) {
    let (d, m) = (half(b, 0), half(b, 2));
    let qs = &b[4..20];
    for j in 0..16 {
        y[j] = (qs[j] & 0x0f) as f32 * d + m;
        y[j + 16] = (qs[j] >> 4) as f32 * d + m;
    }
}

fn q5_0(b: &[u8], y: &mut [f32]) {
    let d = half(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    let qs = &b[6..22];
    for j in 0..16 {
        let h0 = ((qh >> j) & 1) << 4;
        let h1 = ((qh >> (j + 16)) & 1) << 4;
        y[j] = (((qs[j] & 0x0f) as u32 | h0) as i32 - 16) as f32 * d;
        y[j + 16] = (((qs[j] >> 4) as u32 | h1) as i32 - 16) as f32 * d;
    }
}

fn q5_1(b: &[u8], y: &mut [f32]) {
    let (d, m) = (half(b, 0), half(b, 2));
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    let qs = &b[8..24];
    for j in 0..16 {
        let h0 = ((qh >> j) & 1) << 4;
        let h1 = ((qh >> (j + 16)) & 1) << 4;
        y[j] = ((qs[j] & 0x0f) as u32 | h0) as f32 * d + m;
        y[j + 16] = ((qs[j] >> 4) as u32 | h1) as f32 * d + m;
    }
}

fn q8_0(b: &[u8], y: &mut [f32]) {
    let d = half(b, 0);
    for j in 0..32 {
        y[j] = (b[2 + j] as i8) as f32 * d;
    }
}

/// Scale and min of sub-block `j` (0..8) from the 12 packed bytes of q4_k / q5_k: sub-blocks
/// 0..4 keep theirs in the low 6 bits of bytes `j` and `j + 4`; sub-blocks 4..8 in the
/// nibbles of bytes `j + 4`, with the top two bits in the high bits of bytes `j - 4` / `j`.
#[inline]
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

fn q4_k(b: &[u8], y: &mut [f32]) {
    let (d, dmin) = (half(b, 0), half(b, 2));
    let scales = &b[4..16];
    let qs = &b[16..144];
    // Four chunks of 64 elements; each uses 32 bytes of qs: low nibbles for the first 32
    // elements (sub-block 2c), high nibbles for the next 32 (sub-block 2c + 1).
    for c in 0..4 {
        let q = &qs[32 * c..32 * c + 32];
        let (sc1, m1) = scale_min_k4(2 * c, scales);
        let (sc2, m2) = scale_min_k4(2 * c + 1, scales);
        let (d1, m1) = (d * sc1 as f32, dmin * m1 as f32);
        let (d2, m2) = (d * sc2 as f32, dmin * m2 as f32);
        let y = &mut y[64 * c..64 * c + 64];
        for l in 0..32 {
            y[l] = d1 * (q[l] & 0x0f) as f32 - m1;
            y[l + 32] = d2 * (q[l] >> 4) as f32 - m2;
        }
    }
}

fn q5_k(b: &[u8], y: &mut [f32]) {
    let (d, dmin) = (half(b, 0), half(b, 2));
    let scales = &b[4..16];
    let qh = &b[16..48];
    let qs = &b[48..176];
    // As q4_k, plus a 5th bit per element from qh: chunk c uses bit 2c (low nibbles) and
    // bit 2c + 1 (high nibbles) of qh[l].
    for c in 0..4 {
        let q = &qs[32 * c..32 * c + 32];
        let (sc1, m1) = scale_min_k4(2 * c, scales);
        let (sc2, m2) = scale_min_k4(2 * c + 1, scales);
        let (d1, m1) = (d * sc1 as f32, dmin * m1 as f32);
        let (d2, m2) = (d * sc2 as f32, dmin * m2 as f32);
        let (u1, u2) = (1u8 << (2 * c), 2u8 << (2 * c));
        let y = &mut y[64 * c..64 * c + 64];
        for l in 0..32 {
            let h1 = if qh[l] & u1 != 0 { 16 } else { 0 };
            let h2 = if qh[l] & u2 != 0 { 16 } else { 0 };
            y[l] = d1 * ((q[l] & 0x0f) + h1) as f32 - m1;
            y[l + 32] = d2 * ((q[l] >> 4) + h2) as f32 - m2;
        }
    }
}

fn q6_k(b: &[u8], y: &mut [f32]) {
    let ql = &b[0..128];
    let qh = &b[128..192];
    let sc = &b[192..208];
    let d = half(b, 208);
    // Two halves of 128 elements; each uses 64 bytes of ql, 32 of qh and 8 scales.
    for n in 0..2 {
        let (ql, qh, sc) = (&ql[64 * n..], &qh[32 * n..], &sc[8 * n..]);
        let y = &mut y[128 * n..128 * n + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0x0f) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            y[l] = d * (sc[is] as i8) as f32 * q1 as f32;
            y[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
            y[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
            y[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(x: f32) -> [u8; 2] {
        f16::from_f32(x).to_bits().to_le_bytes()
    }

    #[test]
    fn q8_0_and_q4_0_by_hand() {
        let mut b = h(0.5).to_vec();
        b.extend((0..32).map(|i| (i as i8 - 16) as u8));
        let y = to_f32(GgmlType::Q8_0, &b, 32).unwrap();
        assert_eq!(y[0], -8.0);
        assert_eq!(y[31], 7.5);

        let mut b = h(2.0).to_vec();
        b.extend((0..16).map(|j| (j as u8) | ((15 - j as u8) << 4)));
        let y = to_f32(GgmlType::Q4_0, &b, 32).unwrap();
        assert_eq!((y[0], y[15], y[16], y[31]), (-16.0, 14.0, 14.0, -16.0));
    }

    #[test]
    fn q4_k_scale_packing() {
        // Sub-block 5: scale = low nibble of byte 9 | top bits of byte 1 << 4,
        // min = high nibble of byte 9 | top bits of byte 5 << 4.
        let mut s = [0u8; 12];
        s[9] = 0x3a;
        s[1] = 0b1100_0000;
        s[5] = 0b0100_0000;
        assert_eq!(scale_min_k4(5, &s), (0x0a | (3 << 4), 0x03 | (1 << 4)));
        s[2] = 0b1011_0111;
        s[6] = 0b0000_0101;
        assert_eq!(scale_min_k4(2, &s), (0b11_0111, 0b00_0101));
    }

    #[test]
    fn size_and_type_errors() {
        assert!(
            to_f32(GgmlType::Q4_1, &[0; 19], 32)
                .unwrap_err()
                .contains("need 20 bytes")
        );
        assert!(
            to_f32(GgmlType::Q4_K, &[0; 144], 32)
                .unwrap_err()
                .contains("not whole")
        );
        assert!(
            to_f32(GgmlType::Q2_K, &[0; 84], 256)
                .unwrap_err()
                .contains("q2_k")
        );
    }
}
