use super::*;

/// A small deterministic generator (xorshift) for test data.
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// Uniform in [-1, 1).
    pub(crate) fn uniform(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    /// A weight-like value: never zero, magnitudes from about 0.01 to 1, a few outliers.
    pub(crate) fn weight(&mut self) -> f32 {
        let v = self.uniform();
        let v = if v.abs() < 0.01 { 0.01f32.copysign(v) } else { v };
        if self.next().is_multiple_of(50) {
            v * 4.0
        } else {
            v
        }
    }
}

pub(crate) fn weights(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.weight()).collect()
}

pub(crate) fn all_specs() -> Vec<QuantSpec> {
    let mut v = vec![];
    for bits in QuantSpec::BITS {
        for group in QuantSpec::GROUPS {
            for scheme in [QuantScheme::Asym, QuantScheme::Sym] {
                v.push(QuantSpec { bits, group, scheme });
            }
        }
    }
    v
}

/// An N:M mask keeping the `n` largest magnitudes of every block (ties by position).
pub(crate) fn nm_mask(vals: &[f32], n: usize, m: usize) -> Vec<bool> {
    let mut mask = vec![false; vals.len()];
    for (b, block) in vals.chunks_exact(m).enumerate() {
        let mut idx: Vec<usize> = (0..m).collect();
        idx.sort_by(|&a, &c| block[c].abs().total_cmp(&block[a].abs()).then(a.cmp(&c)));
        for &i in &idx[..n] {
            mask[b * m + i] = true;
        }
    }
    mask
}

pub(crate) fn random_mask(rng: &mut Rng, n: usize, keep_percent: u64) -> Vec<bool> {
    (0..n).map(|_| rng.next() % 100 < keep_percent).collect()
}

/// The analytic bound of round-to-nearest on one group of `vals` (computed from the
/// values alone): half a step, plus what the f16 rounding of the scale and min can add.
fn group_bound(vals: &[f32], q: &QuantSpec) -> f32 {
    let amax = vals.iter().fold(0.0f32, |a, v| a.max(v.abs()));
    let slop = 2e-6 * (1.0 + amax);
    match q.scheme {
        QuantScheme::Asym => {
            let qmax = ((1u32 << q.bits) - 1) as f32;
            let lo = vals.iter().copied().fold(f32::INFINITY, f32::min);
            let hi = vals.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let s = (hi - lo) / qmax;
            let (s16, m16) = (round_f16(s), round_f16(lo));
            s16 / 2.0 + (lo - m16).abs() + qmax * (s - s16).abs() + slop
        }
        QuantScheme::Sym => {
            let half1 = ((1u32 << (q.bits - 1)) - 1) as f32;
            let s = amax / half1;
            let s16 = round_f16(s);
            s16 / 2.0 + half1 * (s - s16).abs() + slop
        }
    }
}

fn decoded(w: &PackedWeight) -> Vec<f32> {
    let mut out = vec![f32::NAN; w.rows() * w.cols()];
    for (r, row) in out.chunks_exact_mut(w.cols()).enumerate() {
        w.decode_row(r, row).unwrap();
    }
    out
}

#[test]
fn every_quant_format_round_trips_within_its_bound() {
    let mut rng = Rng::new(1);
    // 200 columns: not a multiple of any group size, so the last group of a row is padded.
    let (rows, cols) = (5, 200);
    let vals = weights(&mut rng, rows * cols);
    for q in all_specs() {
        let w = PackedWeight::pack_quant(rows, cols, &vals, q).unwrap();
        assert_eq!(w.storage_bytes(), w.held_bytes(), "{q}");
        assert_eq!(
            w.storage_bytes(),
            rows * cols.div_ceil(q.group as usize) * q.group_bytes()
        );
        let got = decoded(&w);
        let g = q.group as usize;
        for (r, (vr, gr)) in vals.chunks_exact(cols).zip(got.chunks_exact(cols)).enumerate() {
            for (gi, (vg, gg)) in vr.chunks(g).zip(gr.chunks(g)).enumerate() {
                let bound = group_bound(vg, &q);
                for (a, b) in vg.iter().zip(gg) {
                    assert!(
                        (a - b).abs() <= bound,
                        "{q} row {r} group {gi}: {a} decoded as {b}, bound {bound}"
                    );
                }
            }
        }
        // More bits, smaller error: 8-bit error is far below the value range.
        if q.bits == 8 {
            let worst = vals
                .iter()
                .zip(&got)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max);
            assert!(worst < 0.03, "{q}: worst error {worst}");
        }
    }
}

#[test]
fn codes_decode_to_scale_times_code_plus_min() {
    let (rows, cols) = (3usize, 96usize);
    for q in all_specs() {
        let qmax = (1u32 << q.bits) - 1;
        let codes: Vec<u8> = (0..rows * cols)
            .map(|i| ((i * 7 + i / 5) as u32 % (qmax + 1)) as u8)
            .collect();
        let groups = rows * cols.div_ceil(q.group as usize);
        let scales: Vec<f32> = (0..groups).map(|i| 0.01 + i as f32 * 0.003).collect();
        let mins: Vec<f32> = (0..groups).map(|i| -0.5 + i as f32 * 0.01).collect();
        let mins = (q.scheme == QuantScheme::Asym).then_some(mins);
        let w = PackedWeight::pack_codes(rows, cols, &codes, &scales, mins.as_deref(), q).unwrap();
        let got = decoded(&w);
        let gpr = cols.div_ceil(q.group as usize);
        for (i, (&c, &y)) in codes.iter().zip(&got).enumerate() {
            let gi = i / cols * gpr + i % cols / q.group as usize;
            let s = round_f16(scales[gi]);
            let want = match &mins {
                Some(m) => s * c as f32 + round_f16(m[gi]),
                None => s * c as f32 - s * (1u32 << (q.bits - 1)) as f32,
            };
            assert_eq!(y, want, "{q} element {i} code {c}");
        }
    }
}

#[test]
fn sparse_formats_keep_exactly_the_mask_and_bound_the_kept_values() {
    let mut rng = Rng::new(2);
    let (rows, cols) = (6, 264);
    let vals = weights(&mut rng, rows * cols);
    let mut value_formats = vec![ValueFormat::F16];
    value_formats.extend(all_specs().into_iter().map(ValueFormat::Quant));
    let patterns = [
        SparsePattern::Unstructured,
        SparsePattern::NofM { n: 2, m: 4 },
        SparsePattern::NofM { n: 4, m: 8 },
    ];
    for pattern in patterns {
        let mask = match pattern {
            SparsePattern::Unstructured => random_mask(&mut rng, rows * cols, 45),
            SparsePattern::NofM { n, m } => nm_mask(&vals, n as usize, m as usize),
        };
        for vf in &value_formats {
            let w = PackedWeight::pack_sparse(rows, cols, &vals, &mask, pattern, *vf).unwrap();
            let label = w.format().to_string();
            // Bytes held equal the format's count for the real kept numbers, computed here
            // independently from the mask.
            let kept: Vec<usize> = mask
                .chunks_exact(cols)
                .map(|r| r.iter().filter(|k| **k).count())
                .collect();
            assert_eq!(w.kept_counts(), kept, "{label}");
            let index_bytes: usize = match pattern {
                SparsePattern::Unstructured => rows * cols.div_ceil(8),
                SparsePattern::NofM { m, .. } => kept
                    .iter()
                    .map(|k| (k * if m == 4 { 2 } else { 3 }).div_ceil(8))
                    .sum(),
            };
            let value_bytes: usize = kept
                .iter()
                .map(|&k| match vf {
                    ValueFormat::F16 => 2 * k,
                    ValueFormat::Quant(q) => k.div_ceil(q.group as usize) * q.group_bytes(),
                })
                .sum();
            assert_eq!(w.held_bytes(), index_bytes + value_bytes, "{label}");
            assert_eq!(w.storage_bytes(), w.held_bytes(), "{label}");
            if let SparsePattern::NofM { .. } = pattern {
                assert_eq!(
                    w.storage_bytes(),
                    w.format().estimated_bytes(rows, cols, 0.0),
                    "{label}"
                );
            }

            let got = decoded(&w);
            for (r, ((vr, mr), gr)) in vals
                .chunks_exact(cols)
                .zip(mask.chunks_exact(cols))
                .zip(got.chunks_exact(cols))
                .enumerate()
            {
                for (j, (&k, &y)) in mr.iter().zip(gr).enumerate() {
                    if !k {
                        assert_eq!(y.to_bits(), 0, "{label}: pruned ({r}, {j}) decoded as {y}");
                    }
                }
                let kv: Vec<f32> = vr.iter().zip(mr).filter(|(_, k)| **k).map(|(v, _)| *v).collect();
                let kd: Vec<f32> = gr.iter().zip(mr).filter(|(_, k)| **k).map(|(v, _)| *v).collect();
                match vf {
                    ValueFormat::F16 => {
                        for (a, b) in kv.iter().zip(&kd) {
                            assert_eq!(*b, round_f16(*a), "{label} row {r}");
                        }
                    }
                    ValueFormat::Quant(q) => {
                        let g = q.group as usize;
                        for (vg, dg) in kv.chunks(g).zip(kd.chunks(g)) {
                            let bound = group_bound(vg, q);
                            for (a, b) in vg.iter().zip(dg) {
                                assert!((a - b).abs() <= bound, "{label} row {r}: {a} -> {b} > {bound}");
                            }
                        }
                    }
                }
            }
            // N:M with f16 values (no kept weight is zero): exactly m - n zeros per block.
            if let (SparsePattern::NofM { n, m }, ValueFormat::F16) = (pattern, vf) {
                for block in got.chunks_exact(m as usize) {
                    let zeros = block.iter().filter(|v| **v == 0.0).count();
                    assert_eq!(zeros, (m - n) as usize, "{label}: block {block:?}");
                }
            }
        }
    }
}

#[test]
fn two_four_rows_have_two_zeros_in_every_four() {
    let mut rng = Rng::new(3);
    let (rows, cols) = (4, 64);
    let vals = weights(&mut rng, rows * cols);
    let mask = nm_mask(&vals, 2, 4);
    let w = PackedWeight::pack_sparse(
        rows,
        cols,
        &vals,
        &mask,
        SparsePattern::NofM { n: 2, m: 4 },
        ValueFormat::F16,
    )
    .unwrap();
    let mut row = vec![0.0; cols];
    for r in 0..rows {
        w.decode_row(r, &mut row).unwrap();
        for (b, block) in row.chunks_exact(4).enumerate() {
            assert_eq!(
                block.iter().filter(|v| **v == 0.0).count(),
                2,
                "row {r} block {b}: {block:?}"
            );
            // The two kept are the two largest magnitudes.
            let orig = &vals[r * cols + 4 * b..r * cols + 4 * b + 4];
            let kept_min = block
                .iter()
                .filter(|v| **v != 0.0)
                .map(|v| v.abs())
                .fold(f32::INFINITY, f32::min);
            let dropped_max = orig
                .iter()
                .zip(block)
                .filter(|(_, d)| **d == 0.0)
                .map(|(o, _)| o.abs())
                .fold(0.0, f32::max);
            assert!(kept_min >= round_f16(dropped_max), "row {r} block {b}");
        }
    }
}

#[test]
fn sparse_codes_pack_like_values() {
    let mut rng = Rng::new(4);
    let (rows, cols) = (3, 40);
    let mask = random_mask(&mut rng, rows * cols, 30);
    let q = QuantSpec {
        bits: 3,
        group: 32,
        scheme: QuantScheme::Sym,
    };
    let kept: Vec<usize> = mask
        .chunks_exact(cols)
        .map(|r| r.iter().filter(|k| **k).count())
        .collect();
    let total: usize = kept.iter().sum();
    let groups: usize = kept.iter().map(|k| k.div_ceil(32)).sum();
    let codes: Vec<u8> = (0..total).map(|i| (i % 8) as u8).collect();
    let scales = vec![0.5; groups];
    let w = PackedWeight::pack_sparse_codes(
        rows,
        cols,
        &mask,
        SparsePattern::Unstructured,
        &codes,
        &scales,
        None,
        q,
    )
    .unwrap();
    let got = decoded(&w);
    let kd: Vec<f32> = got
        .iter()
        .zip(&mask)
        .filter(|(_, k)| **k)
        .map(|(v, _)| *v)
        .collect();
    let want: Vec<f32> = codes.iter().map(|&c| 0.5 * (c as f32 - 4.0)).collect();
    assert_eq!(kd, want);
    assert!(got.iter().zip(&mask).all(|(v, k)| *k || *v == 0.0));
}

#[test]
fn bad_inputs_are_errors() {
    let q4 = QuantSpec {
        bits: 4,
        group: 32,
        scheme: QuantScheme::Asym,
    };
    let vals = vec![0.5f32; 2 * 64];
    let nm = SparsePattern::NofM { n: 2, m: 4 };
    let err = |r: Result<PackedWeight>| r.unwrap_err().to_string();

    // A 2:4 mask keeping three of a block.
    let mut mask = nm_mask(&vals, 2, 4);
    mask[4 * 3 + 2] = !mask[4 * 3 + 2];
    let e = err(PackedWeight::pack_sparse(
        2,
        64,
        &vals,
        &mask,
        nm,
        ValueFormat::F16,
    ));
    assert!(e.contains("row 0, columns 12..16 keep"), "{e}");
    // Columns not a multiple of m.
    let e = err(PackedWeight::pack_sparse(
        2,
        30,
        &vals[..60],
        &[true; 60],
        nm,
        ValueFormat::F16,
    ));
    assert!(e.contains("not a multiple of the block size 4"), "{e}");
    for (n, m) in [(1, 1), (0, 4), (5, 4)] {
        let p = SparsePattern::NofM { n, m };
        let e = err(PackedWeight::pack_sparse(
            2,
            64,
            &vals,
            &[true; 128],
            p,
            ValueFormat::F16,
        ));
        assert!(e.contains("needs 0 < n <= m"), "{e}");
    }
    // Shapes, bit-widths, non-finite values.
    assert!(err(PackedWeight::pack_quant(3, 64, &vals, q4)).contains("128 values for a [3, 64]"));
    let q5 = QuantSpec { bits: 5, ..q4 };
    assert!(err(PackedWeight::pack_quant(2, 64, &vals, q5)).contains("bit-width 5"));
    let mut nan = vals.clone();
    nan[7] = f32::NAN;
    assert!(err(PackedWeight::pack_quant(2, 64, &nan, q4)).contains("not finite"));
    assert!(err(PackedWeight::pack_quant(2, 64, &vec![1e6; 128], q4)).contains("f16"));
    let e = err(PackedWeight::pack_codes(
        2,
        64,
        &[16u8; 128],
        &[1.0; 4],
        Some(&[0.0; 4]),
        q4,
    ));
    assert!(e.contains("does not fit in 4 bits"), "{e}");
    let e = err(PackedWeight::pack_codes(2, 64, &[1u8; 128], &[1.0; 4], None, q4));
    assert!(e.contains("needs 4 mins"), "{e}");

    // Hand-made buffers: truncated, corrupt positions, mask padding.
    let good = PackedWeight::pack_quant(2, 64, &vals, q4).unwrap();
    let mut bufs = good.buffers().clone();
    bufs.qweight = Some(vec![0u8; 63].into());
    let e = err(PackedWeight::from_parts(WeightFormat::Quant(q4), 2, 64, bufs));
    assert!(e.contains("`qweight` has 63 bytes, expected 64"), "{e}");
    let mut bufs = good.buffers().clone();
    bufs.mins = None;
    assert!(
        err(PackedWeight::from_parts(WeightFormat::Quant(q4), 2, 64, bufs)).contains("`mins` is missing")
    );

    let f = WeightFormat::Sparse {
        pattern: nm,
        values: ValueFormat::F16,
    };
    let sp = PackedWeight::pack_sparse(2, 64, &vals, &nm_mask(&vals, 2, 4), nm, ValueFormat::F16).unwrap();
    let mut bufs = sp.buffers().clone();
    let mut index = bufs.index.as_ref().unwrap().as_slice().to_vec();
    index[0] = 0b0000_0101; // positions 1, 1 in block 0
    bufs.index = Some(index.into());
    let e = err(PackedWeight::from_parts(f.clone(), 2, 64, bufs));
    assert!(e.contains("index row 0, block 0"), "{e}");

    let fu = WeightFormat::Sparse {
        pattern: SparsePattern::Unstructured,
        values: ValueFormat::F16,
    };
    let un = PackedWeight::pack_sparse(
        1,
        10,
        &[1.0; 10],
        &[true; 10],
        SparsePattern::Unstructured,
        ValueFormat::F16,
    )
    .unwrap();
    let mut bufs = un.buffers().clone();
    bufs.mask = Some(vec![0xff, 0xff].into());
    assert!(err(PackedWeight::from_parts(fu, 1, 10, bufs)).contains("bits set past column 10"));

    let mut row = vec![0.0; 64];
    assert!(good.decode_row(2, &mut row).is_err());
    assert!(good.decode_row(0, &mut row[..63]).is_err());
    assert!(
        err(PackedWeight::from_parts(
            WeightFormat::Dense {
                dtype: crate::DType::F16
            },
            1,
            1,
            Buffers::default()
        ))
        .contains("dense")
    );
}
