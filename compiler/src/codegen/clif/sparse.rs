//! Kernels of sparse weights (unstructured bitmask, `n:4`, `n:8`; kept values f16 or
//! quantized), specialised on the shape, the pattern and the values' format.
//!
//! A row is handled in two steps:
//!
//! 1. its kept values are decoded to f32, contiguously: quantized groups with the same
//!    vector code as dense quantized weights ([`Gen::decode_group`]), f16 values eight at a
//!    time (`i16x8` widened, converted with the exponent trick of [`Gen::load_f16`]);
//! 2. they are *expanded* to the row's columns, eight columns a step: the step's 8-bit
//!    keep mask (a mask byte, or built from the step's N:M positions) gives two 4-bit
//!    masks; each selects a 16-byte `swizzle` pattern from a 16-entry table (built on the
//!    stack at entry) that moves the next `popcount` values to the kept lanes of an `f32x4`
//!    and zeroes the others.
//!
//! The decode kernel stores the expanded vectors (a row's values are first decoded into
//! the tail of its own output row, then spread forward in place: the `t`-th kept value
//! lands at a column no later than where it was written, so nothing unread is
//! overwritten). The matvec kernel decodes the values into its scratch row and multiplies
//! each expanded vector with `x` as it goes (f32, no rounding of `x`).

use cranelift_codegen::ir::condcodes::IntCC;
use cranelift_codegen::ir::types::{F32X4, I8X16, I16X8, I64};
use cranelift_codegen::ir::{InstBuilder, StackSlotData, StackSlotKind, Value};
use cranelift_frontend::Variable;
use edge_runtime::format::SparsePattern;

use super::{Gen, mem};

/// What the expansion does with each `f32x4` of a row.
#[derive(Clone, Copy)]
enum Sink {
    /// Store it at the row's output (`row` pointer).
    Store(Value),
    /// Add its product with `x` to the accumulator variable of its half of the step
    /// (two chains of additions, not one).
    Dot { x: Value, acc: [Variable; 2] },
}

/// The buffers every sparse kernel reads.
#[derive(Clone, Copy)]
struct SparseArgs {
    vals: Value,
    scales: Value,
    mins: Value,
    pos: Value,
    kstart: Value,
    gstart: Value,
}

impl Gen<'_> {
    /// Emits `while var < end { body }` (unsigned); `body` must advance `var`.
    fn while_lt(&mut self, var: Variable, end: Value, body: impl FnOnce(&mut Self, Value)) {
        let head = self.b.create_block();
        let inner = self.b.create_block();
        let exit = self.b.create_block();
        self.b.ins().jump(head, &[]);
        self.b.switch_to_block(head);
        let cur = self.b.use_var(var);
        let more = self.b.ins().icmp(IntCC::UnsignedLessThan, cur, end);
        self.b.ins().brif(more, inner, &[], exit, &[]);
        self.b.switch_to_block(inner);
        body(self, cur);
        self.b.ins().jump(head, &[]);
        self.b.switch_to_block(exit);
    }

    /// The swizzle table on the stack: entry `nib` (16 bytes at `16 * nib`) moves the first
    /// `popcount(nib)` f32 of a vector to the lanes whose bit is set in `nib` and zeroes
    /// the other lanes (index `0x80` selects zero).
    /// 2:4 adds a second table at byte 256: entry `nib` is indexed by the block's two
    /// 2-bit positions `(nib & 3, nib >> 2)` themselves and puts the block's two values at
    /// those lanes, so the loop needs no mask.
    fn expand_table(&mut self, pattern: SparsePattern) -> Value {
        let pairs = pattern == (SparsePattern::NofM { n: 2, m: 4 });
        let size = if pairs { 512 } else { 256 };
        let ss = self
            .b
            .create_sized_stack_slot(StackSlotData::new(StackSlotKind::ExplicitSlot, size, 4));
        for nib in 0..16usize {
            let mut bytes = vec![0x80u8; 16];
            let mut p = 0u8;
            for j in 0..4 {
                if nib >> j & 1 == 1 {
                    for b in 0..4 {
                        bytes[4 * j + b] = 4 * p + b as u8;
                    }
                    p += 1;
                }
            }
            let c = self.vconst(I8X16, bytes);
            self.b.ins().stack_store(I64, c, ss, 16 * nib as i32);
            if pairs {
                let mut bytes = vec![0x80u8; 16];
                for (v, lane) in [nib & 3, nib >> 2].into_iter().enumerate() {
                    for b in 0..4 {
                        bytes[4 * lane + b] = 4 * v as u8 + b as u8;
                    }
                }
                let c = self.vconst(I8X16, bytes);
                self.b.ins().stack_store(I64, c, ss, 256 + 16 * nib as i32);
            }
        }
        self.b.ins().stack_addr(I64, ss, 0)
    }

    /// `(k0, k)`: the first kept value of row `r` and the row's kept count.
    fn kept_range(&mut self, kstart: Value, r: Value) -> (Value, Value) {
        let at = self.offset(kstart, r, 8);
        let k0 = self.b.ins().load(I64, mem(), at, 0);
        let k1 = self.b.ins().load(I64, mem(), at, 8);
        let k = self.b.ins().isub(k1, k0);
        (k0, k)
    }

    /// Decodes the `k` kept values of row `r` (the first is value `k0` of the weight) to
    /// f32 at `dst`; quantized values write whole groups (up to `group - 1` values past
    /// `k`).
    fn decode_values(&mut self, a: SparseArgs, r: Value, k0: Value, k: Value, dst: Value) {
        if self.bits == 0 {
            return self.decode_f16_values(a.vals, k0, k, dst);
        }
        let at = self.offset(a.gstart, r, 8);
        let g0 = self.b.ins().load(I64, mem(), at, 0);
        let g1 = self.b.ins().load(I64, mem(), at, 8);
        let cp = self.offset(a.vals, g0, self.gb as i64);
        let sp = self.offset(a.scales, g0, 2);
        let mp = self.offset(a.mins, g0, 2);
        let send = self.offset(a.scales, g1, 2);
        let v_cp = self.var(I64, cp);
        let v_sp = self.var(I64, sp);
        let v_mp = self.var(I64, mp);
        let v_op = self.var(I64, dst);
        self.while_lt(v_sp, send, |g, sp| {
            let (cp, mp, op) = (g.b.use_var(v_cp), g.b.use_var(v_mp), g.b.use_var(v_op));
            g.decode_group(cp, sp, mp, op);
            g.bump(v_cp, cp, g.gb);
            g.bump(v_sp, sp, 2);
            g.bump(v_mp, mp, 2);
            g.bump(v_op, op, 4 * g.group);
        });
    }

    /// f16 kept values: eight at a time as `i16x8`, the last `k % 8` one at a time (the
    /// kernel never reads past the row's values).
    fn decode_f16_values(&mut self, vals: Value, k0: Value, k: Value, dst: Value) {
        let vp = self.offset(vals, k0, 2);
        let vend = self.offset(vp, k, 2);
        let k8 = self.b.ins().band_imm_s(k, !7);
        let v8end = self.offset(vp, k8, 2);
        let v_vp = self.var(I64, vp);
        let v_op = self.var(I64, dst);
        self.while_lt(v_vp, v8end, |g, vp| {
            let op = g.b.use_var(v_op);
            let h = g.b.ins().load(I16X8, mem(), vp, 0);
            let lo = g.b.ins().swiden_low(h);
            let hi = g.b.ins().swiden_high(h);
            for (i, w) in [lo, hi].into_iter().enumerate() {
                let f = g.halves_to_f32x4(w);
                g.b.ins().store(mem(), f, op, 16 * i as i32);
            }
            g.bump(v_vp, vp, 16);
            g.bump(v_op, op, 32);
        });
        self.while_lt(v_vp, vend, |g, vp| {
            let op = g.b.use_var(v_op);
            let f = g.load_f16(vp);
            g.b.ins().store(mem(), f, op, 0);
            g.bump(v_vp, vp, 2);
            g.bump(v_op, op, 4);
        });
    }

    /// Bytes of positions (mask or index) a row.
    fn pos_row_bytes(&self, pattern: SparsePattern) -> usize {
        match pattern {
            SparsePattern::Unstructured => self.cols.div_ceil(8),
            SparsePattern::NofM { n, m } => {
                (self.cols / m as usize * n as usize * SparsePattern::index_bits(m)).div_ceil(8)
            }
        }
    }

    /// `1 << p` for each of `ps`, or-ed, shifted left by `by`.
    fn bit_union(&mut self, ps: &[Value], by: i64) -> Value {
        let one = self.b.ins().iconst(I64, 1 << by);
        let mut acc = None;
        for &p in ps {
            let bit = self.b.ins().ishl(one, p);
            acc = Some(match acc {
                None => bit,
                Some(a) => self.b.ins().bor(a, bit),
            });
        }
        acc.expect("at least one position")
    }

    /// The 8-bit keep mask of columns `8 * c8 .. 8 * c8 + 8` of the row whose positions
    /// start at `prow`.
    fn block_mask(&mut self, pattern: SparsePattern, prow: Value, c8: Value) -> Value {
        match pattern {
            SparsePattern::Unstructured => {
                let at = self.b.ins().iadd(prow, c8);
                self.b.ins().uload8(I64, mem(), at, 0)
            }
            SparsePattern::NofM { n: 2, m: 4 } => {
                // One index byte: two blocks of two 2-bit positions.
                let at = self.b.ins().iadd(prow, c8);
                let b = self.b.ins().uload8(I64, mem(), at, 0);
                let p: Vec<Value> = (0..4)
                    .map(|i| {
                        let s = self.b.ins().ushr_imm_s(b, 2 * i);
                        self.b.ins().band_imm_s(s, 3)
                    })
                    .collect();
                let lo = self.bit_union(&p[..2], 0);
                let hi = self.bit_union(&p[2..], 4);
                self.b.ins().bor(lo, hi)
            }
            SparsePattern::NofM { n: 4, m: 8 } => {
                // Twelve index bits (four 3-bit positions) at bit 12 * c8.
                let c3 = self.b.ins().imul_imm_s(c8, 3);
                let byte = self.b.ins().ushr_imm_s(c3, 1);
                let at = self.b.ins().iadd(prow, byte);
                let v = self.b.ins().uload16(I64, mem(), at, 0);
                let odd = self.b.ins().band_imm_s(c8, 1);
                let sh = self.b.ins().ishl_imm_s(odd, 2);
                let v = self.b.ins().ushr(v, sh);
                let p: Vec<Value> = (0..4)
                    .map(|i| {
                        let s = self.b.ins().ushr_imm_s(v, 3 * i);
                        self.b.ins().band_imm_s(s, 7)
                    })
                    .collect();
                self.bit_union(&p, 0)
            }
            SparsePattern::NofM { n, m } => self.nofm_block_mask(n as i64, m as i64, prow, c8),
        }
    }

    /// The keep mask of step `c8` for any `n:m` with `m` 4 or 8: the step's `bits` index
    /// bits (at bit `bits * c8`) assembled from the bytes they span, each byte address
    /// clamped to the row's last index byte (a byte past the needed bits only adds bits
    /// that are shifted out or masked off), then one `1 << p` per position.
    fn nofm_block_mask(&mut self, n: i64, m: i64, prow: Value, c8: Value) -> Value {
        let ib = SparsePattern::index_bits(m as u8) as i64;
        let per_step = if m == 4 { 2 * n } else { n };
        let bits = per_step * ib;
        // The step's bits start at most `8 - gcd(bits, 8)` bits into their first byte.
        let gcd = (bits & -bits).min(8);
        let nbytes = (8 - gcd + bits + 7) / 8;
        let last = self.pos_row_bytes(SparsePattern::NofM {
            n: n as u8,
            m: m as u8,
        }) as i64
            - 1;
        let bitpos = self.b.ins().imul_imm_s(c8, bits);
        let first = self.b.ins().ushr_imm_s(bitpos, 3);
        let shift = self.b.ins().band_imm_s(bitpos, 7);
        let lastc = self.b.ins().iconst(I64, last);
        let mut v = None;
        for i in 0..nbytes {
            let at = self.b.ins().iadd_imm_s(first, i);
            let at = self.b.ins().umin(at, lastc);
            let at = self.b.ins().iadd(prow, at);
            let byte = self.b.ins().uload8(I64, mem(), at, 0);
            let byte = self.b.ins().ishl_imm_s(byte, 8 * i);
            v = Some(match v {
                None => byte,
                Some(a) => self.b.ins().bor(a, byte),
            });
        }
        let v = self.b.ins().ushr(v.expect("at least one byte"), shift);
        let p: Vec<Value> = (0..per_step)
            .map(|j| {
                let s = self.b.ins().ushr_imm_s(v, ib * j);
                self.b.ins().band_imm_s(s, (1 << ib) - 1)
            })
            .collect();
        if m == 4 {
            let lo = self.bit_union(&p[..n as usize], 0);
            let hi = self.bit_union(&p[n as usize..], 4);
            self.b.ins().bor(lo, hi)
        } else {
            self.bit_union(&p, 0)
        }
    }

    /// Expands one 8-column step (`c8`) with keep mask `m8`: the values at `v_src` (a byte
    /// pointer, advanced past the values used) go to the kept lanes of two `f32x4`.
    /// For `n:4` each half of a step keeps exactly `n` values, so no popcount is needed.
    /// `m8` indexes the table at byte `base` (0: the keep-mask table; 256: the 2:4
    /// position table, `m8` then being the step's index byte).
    #[allow(clippy::too_many_arguments)]
    fn expand8(
        &mut self,
        pattern: SparsePattern,
        table: Value,
        base: i32,
        m8: Value,
        c8: Value,
        v_src: Variable,
        sink: Sink,
    ) {
        let lo = self.b.ins().band_imm_s(m8, 15);
        let hi = self.b.ins().ushr_imm_s(m8, 4);
        for (half, nib) in [lo, hi].into_iter().enumerate() {
            let at = self.offset(table, nib, 16);
            let idx = self.b.ins().load(I8X16, mem(), at, base);
            let src = self.b.use_var(v_src);
            let v = self.b.ins().load(I8X16, mem(), src, 0);
            let e = self.b.ins().swizzle(v, idx);
            let e = self.cast(F32X4, e);
            let off = 16 * half as i32;
            match sink {
                Sink::Store(row) => {
                    let at = self.offset(row, c8, 32);
                    self.b.ins().store(mem(), e, at, off);
                }
                Sink::Dot { x, acc } => {
                    let at = self.offset(x, c8, 32);
                    let xv = self.b.ins().load(F32X4, mem(), at, off);
                    let p = self.b.ins().fmul(e, xv);
                    let a = self.b.use_var(acc[half]);
                    let a = self.b.ins().fadd(a, p);
                    self.b.def_var(acc[half], a);
                }
            }
            let src = if let SparsePattern::NofM { n, m: 4 } = pattern {
                self.b.ins().iadd_imm_s(src, 4 * n as i64)
            } else {
                let cnt = self.b.ins().popcnt(nib);
                self.offset(src, cnt, 4)
            };
            self.b.def_var(v_src, src);
        }
    }

    /// Expands a whole row (positions at `prow`, values from `v_src`) into `sink`: the
    /// whole eight-column steps in a loop, then the last partial step (its mask limited to
    /// the row's columns).
    fn expand_row(&mut self, pattern: SparsePattern, table: Value, prow: Value, v_src: Variable, sink: Sink) {
        let steps = self.cols / 8;
        let zero = self.b.ins().iconst(I64, 0);
        let end = self.b.ins().iconst(I64, steps as i64);
        let v_c = self.var(I64, zero);
        self.while_lt(v_c, end, |g, c8| {
            if pattern == (SparsePattern::NofM { n: 2, m: 4 }) {
                let at = g.b.ins().iadd(prow, c8);
                let b = g.b.ins().uload8(I64, mem(), at, 0);
                g.expand8(pattern, table, 256, b, c8, v_src, sink);
            } else {
                let m8 = g.block_mask(pattern, prow, c8);
                g.expand8(pattern, table, 0, m8, c8, v_src, sink);
            }
            let next = g.b.ins().iadd_imm_s(c8, 1);
            g.b.def_var(v_c, next);
        });
        let tail = self.cols % 8;
        if tail > 0 {
            let m8 = self.block_mask(pattern, prow, end);
            let m8 = self.b.ins().band_imm_s(m8, (1 << tail) - 1);
            self.expand8(pattern, table, 0, m8, end, v_src, sink);
        }
    }

    fn sparse_args(p: &[Value]) -> SparseArgs {
        SparseArgs {
            vals: p[0],
            scales: p[1],
            mins: p[2],
            pos: p[3],
            kstart: p[4],
            gstart: p[5],
        }
    }

    /// `decode(vals, scales, mins, pos, kstart, gstart, out, r0, r1)`.
    pub(super) fn sparse_decode(&mut self, pattern: SparsePattern) {
        let entry = self.b.create_block();
        self.b.append_block_params_for_function_params(entry);
        self.b.switch_to_block(entry);
        let p = self.b.block_params(entry).to_vec();
        let (a, out, r0, r1) = (Self::sparse_args(&p[..6]), p[6], p[7], p[8]);
        let table = self.expand_table(pattern);
        let prb = self.pos_row_bytes(pattern) as i64;
        let v_r = self.var(I64, r0);
        let v_op = self.var(I64, out);
        let cols = self.cols as i64;
        self.while_lt(v_r, r1, |g, r| {
            let op = g.b.use_var(v_op);
            let (k0, k) = g.kept_range(a.kstart, r);
            // The values go to the row's last k columns first.
            let ck = g.b.ins().iconst(I64, cols);
            let base = g.b.ins().isub(ck, k);
            let dst = g.offset(op, base, 4);
            g.decode_values(a, r, k0, k, dst);
            let prow = g.offset(a.pos, r, prb);
            let v_src = g.var(I64, dst);
            g.expand_row(pattern, table, prow, v_src, Sink::Store(op));
            g.bump(v_op, op, 4 * cols as usize);
            let next = g.b.ins().iadd_imm_s(r, 1);
            g.b.def_var(v_r, next);
        });
        self.b.ins().return_(&[]);
    }

    /// `matvec(x, vals, scales, mins, pos, kstart, gstart, scratch, y, r0, r1)`.
    pub(super) fn sparse_matvec(&mut self, pattern: SparsePattern) {
        let entry = self.b.create_block();
        self.b.append_block_params_for_function_params(entry);
        self.b.switch_to_block(entry);
        let p = self.b.block_params(entry).to_vec();
        let x = p[0];
        let a = Self::sparse_args(&p[1..7]);
        let (scratch, y, r0, r1) = (p[7], p[8], p[9], p[10]);
        let table = self.expand_table(pattern);
        let prb = self.pos_row_bytes(pattern) as i64;
        let v_r = self.var(I64, r0);
        let v_yp = self.var(I64, y);
        let acc = [self.b.declare_var(F32X4), self.b.declare_var(F32X4)];
        self.while_lt(v_r, r1, |g, r| {
            let (k0, k) = g.kept_range(a.kstart, r);
            g.decode_values(a, r, k0, k, scratch);
            let prow = g.offset(a.pos, r, prb);
            let v_src = g.var(I64, scratch);
            let z = g.fconst(0.0);
            let z = g.b.ins().splat(F32X4, z);
            g.b.def_var(acc[0], z);
            g.b.def_var(acc[1], z);
            g.expand_row(pattern, table, prow, v_src, Sink::Dot { x, acc });
            let (a0, a1) = (g.b.use_var(acc[0]), g.b.use_var(acc[1]));
            let a = g.b.ins().fadd(a0, a1);
            let lanes: Vec<Value> = (0..4).map(|l| g.b.ins().extractlane(a, l)).collect();
            let s01 = g.b.ins().fadd(lanes[0], lanes[1]);
            let s23 = g.b.ins().fadd(lanes[2], lanes[3]);
            let sum = g.b.ins().fadd(s01, s23);
            let yp = g.b.use_var(v_yp);
            g.b.ins().store(mem(), sum, yp, 0);
            g.bump(v_yp, yp, 4);
            let next = g.b.ins().iadd_imm_s(r, 1);
            g.b.def_var(v_r, next);
        });
        self.b.ins().return_(&[]);
    }
}
