//! CLIF generation for the kernels of [`KernelSpec`]s, explicitly vectorised with 128-bit
//! vectors and specialised on the weight's shape, bits, group size and scheme.
//!
//! Codes are unpacked a *unit* at a time: `min(16, group * bits / 8)` bytes loaded as one
//! `i8x16`, split into its `8 / bits` bit fields with `band`/`ushr` (field `k` of byte `i`
//! is code `i * 8 / bits + k`). The matvec kernel never puts codes back in column order:
//! the runtime permutes the quantized `x` the same way (`QuantizedX`), so each field vector
//! meets its own `x` lanes. The decode kernel interleaves fields back with `shuffle`.
//!
//! The integer dot product of a field vector (unsigned codes) with int8 `x` is written as
//! the exact tree Cranelift's x86-64 lowering folds into one `vpdpbusd` (AVX-512 VNNI or
//! AVX-VNNI); on other ISAs the same tree is a correct widening sequence.

use cranelift_codegen::ir::condcodes::IntCC;
use cranelift_codegen::ir::immediates::Ieee32;
use cranelift_codegen::ir::types::{F32, F32X4, I8X16, I16X8, I32, I32X4, I64, I64X2};
use cranelift_codegen::ir::{
    AbiParam, Block, ConstantData, Endianness, Function, InstBuilder, MemFlagsData, Signature, Type,
    UserFuncName, Value,
};
use cranelift_codegen::isa::{CallConv, TargetFrontendConfig};
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext, Variable};
use edge_runtime::format::QuantScheme;
use edge_runtime::jit::spec::{KernelKind, KernelSpec};
use target_lexicon::PointerWidth;

mod sparse;

/// Loads and stores: kernel buffers are valid for the spec's shape (checked by the
/// runtime before every call) but not aligned.
fn mem() -> MemFlagsData {
    MemFlagsData::new().with_notrap()
}

/// The function of a kernel, named by [`KernelSpec::name`].
pub fn build_function(spec: &KernelSpec) -> Function {
    let nparams = spec.params();
    let mut sig = Signature::new(CallConv::SystemV);
    sig.params.extend((0..nparams).map(|_| AbiParam::new(I64)));
    let mut func = Function::with_name_signature(UserFuncName::testcase(spec.name()), sig);
    let mut fctx = FunctionBuilderContext::new();
    let b = FunctionBuilder::new(&mut func, &mut fctx);
    let mut g = Gen::new(spec, b);
    match (spec.kind, spec.pattern()) {
        (KernelKind::Matvec, None) => g.matvec(),
        (KernelKind::Decode, None) => g.decode(),
        (KernelKind::Matvec, Some(p)) => g.sparse_matvec(p),
        (KernelKind::Decode, Some(p)) => g.sparse_decode(p),
    }
    g.b.seal_all_blocks();
    g.b.finalize(TargetFrontendConfig {
        default_call_conv: CallConv::SystemV,
        pointer_width: PointerWidth::U64,
        page_size_align_log2: 12,
    });
    func
}

/// The CLIF text of a kernel (what the bundle's kernel table holds).
pub fn generate_clif(spec: &KernelSpec) -> String {
    build_function(spec).display().to_string()
}

/// The loop variables of the matvec kernel.
struct MatvecVars {
    cp: Variable,
    sp: Variable,
    mp: Variable,
    yp: Variable,
    xq: Variable,
    xd: Variable,
    xs: Variable,
    gend: Variable,
    accf: Variable,
}

struct Gen<'a> {
    b: FunctionBuilder<'a>,
    cols: usize,
    /// Bits and group of the (kept) values; zero for f16 sparse values.
    bits: usize,
    group: usize,
    /// Code bytes a group.
    gb: usize,
    /// Bytes a unit (one vector load of codes).
    unit: usize,
    groups: usize,
    sym: bool,
}

impl<'a> Gen<'a> {
    fn new(spec: &KernelSpec, b: FunctionBuilder<'a>) -> Self {
        let q = spec.quant();
        let (bits, group) = q.map_or((0, 0), |q| (q.bits as usize, q.group as usize));
        let gb = group * bits / 8;
        Gen {
            b,
            cols: spec.cols,
            bits,
            group,
            gb,
            // 3-bit: 32 codes in 12 bytes.
            unit: if bits == 3 { 12 } else { gb.min(16) },
            groups: spec.groups(),
            sym: q.is_some_and(|q| q.scheme == QuantScheme::Sym),
        }
    }

    /// A variable of type `ty` holding `init`.
    fn var(&mut self, ty: Type, init: Value) -> Variable {
        let v = self.b.declare_var(ty);
        self.b.def_var(v, init);
        v
    }

    /// Advances the pointer variable `v` (currently `cur`) by `by` bytes; returns the new value.
    fn bump(&mut self, v: Variable, cur: Value, by: usize) -> Value {
        let n = self.b.ins().iadd_imm_s(cur, by as i64);
        self.b.def_var(v, n);
        n
    }

    fn splat_i8(&mut self, v: i64) -> Value {
        let c = self.b.ins().iconst(cranelift_codegen::ir::types::I8, v);
        self.b.ins().splat(I8X16, c)
    }

    fn fconst(&mut self, v: f32) -> Value {
        self.b.ins().f32const(Ieee32::with_float(v))
    }

    fn shuffle(&mut self, a: Value, c: Value, lanes: [u8; 16]) -> Value {
        let imm = self
            .b
            .func
            .dfg
            .immediates
            .push(ConstantData::from(lanes.to_vec()));
        self.b.ins().shuffle(a, c, imm)
    }

    /// A vector constant of type `ty` from its little-endian bytes.
    fn vconst(&mut self, ty: Type, bytes: Vec<u8>) -> Value {
        let c = self.b.func.dfg.constants.insert(ConstantData::from(bytes));
        self.b.ins().vconst(ty, c)
    }

    /// The same 128 bits seen as another vector type.
    fn cast(&mut self, ty: Type, v: Value) -> Value {
        self.b
            .ins()
            .bitcast(ty, MemFlagsData::new().with_endianness(Endianness::Little), v)
    }

    /// The int8 `x` values one field vector of a unit meets (3-bit: sixteen codes a
    /// vector; otherwise one lane a byte of the unit).
    fn xstep(&self) -> i32 {
        if self.bits == 3 { 16 } else { self.unit as i32 }
    }

    /// 3-bit codes: the 32 codes of the 12-byte unit at `off` from `cp`, in column order,
    /// as two `i8x16`. Code `i` is bits `3i % 8 ..` of bytes `3i / 8` and `3i / 8 + 1`: a
    /// shuffle puts the two bytes in an `i16` lane, a multiply by `2^(8 - 3i % 8)` moves the
    /// code to bits 8..10, and a second shuffle gathers the high bytes of two such vectors.
    /// The last unit of a group is loaded as 8 + 4 bytes, so nothing past it is read.
    fn unit3(&mut self, cp: Value, off: i32) -> Vec<Value> {
        let v = if off as usize % self.gb + 12 == self.gb {
            let lo = self.b.ins().load(I64, mem(), cp, off);
            let v = self.b.ins().scalar_to_vector(I64X2, lo);
            let v = self.cast(I32X4, v);
            let hi = self.b.ins().load(I32, mem(), cp, off + 8);
            let v = self.b.ins().insertlane(v, hi, 2);
            self.cast(I8X16, v)
        } else {
            self.b.ins().load(I8X16, mem(), cp, off)
        };
        let mul: Vec<u8> = (0..8)
            .flat_map(|t| (1u16 << (8 - (3 * t) % 8)).to_le_bytes())
            .collect();
        let mulv = self.vconst(I16X8, mul);
        let mut odd = [0u8; 16];
        for (i, o) in odd.iter_mut().enumerate() {
            *o = 2 * i as u8 + 1;
        }
        let seven = self.splat_i8(7);
        (0..2)
            .map(|h| {
                let w: Vec<Value> = (0..2)
                    .map(|q| {
                        let mut idx = [0u8; 16];
                        for t in 0..8 {
                            let b = (3 * (16 * h + 8 * q + t) / 8) as u8;
                            idx[2 * t] = b;
                            idx[2 * t + 1] = b + 1;
                        }
                        let pairs = self.shuffle(v, v, idx);
                        let pairs = self.cast(I16X8, pairs);
                        let p = self.b.ins().imul(pairs, mulv);
                        self.cast(I8X16, p)
                    })
                    .collect();
                let c = self.shuffle(w[0], w[1], odd);
                self.b.ins().band(c, seven)
            })
            .collect()
    }

    /// `ptr + i * scale`.
    fn offset(&mut self, ptr: Value, i: Value, scale: i64) -> Value {
        let s = self.b.ins().imul_imm_s(i, scale);
        self.b.ins().iadd(ptr, s)
    }

    /// An f16 (little-endian at `ptr`) as f32: sign-extended and shifted so that its sign
    /// lands on the f32 sign bit and its exponent and mantissa 13 bits up, masked, then
    /// scaled by 2^112 (exact for normal and subnormal halves; scales are finite).
    fn load_f16(&mut self, ptr: Value) -> Value {
        let h = self.b.ins().sload16(I32, mem(), ptr, 0);
        let h = self.b.ins().ishl_imm_s(h, 13);
        let h = self.b.ins().band_imm_s(h, 0x8fff_e000u32 as i32 as i64);
        let f = self.b.ins().bitcast(F32, MemFlagsData::new(), h);
        let k = self.fconst(f32::from_bits((127 + 112) << 23));
        self.b.ins().fmul(f, k)
    }

    /// Loads unit `u` of the group at `cp` and splits it into its bit fields: field `k`
    /// lane `i` is code `i * 8 / bits + k` of the unit (lanes past `unit` are zero).
    fn unit_fields(&mut self, cp: Value, u: usize) -> Vec<Value> {
        self.unit_fields_at(cp, (u * self.unit) as i32)
    }

    /// [`unit_fields`](Self::unit_fields) of the unit at byte offset `off` from `cp`.
    fn unit_fields_at(&mut self, cp: Value, off: i32) -> Vec<Value> {
        if self.bits == 3 {
            return self.unit3(cp, off);
        }
        let v = if self.unit == 16 {
            self.b.ins().load(I8X16, mem(), cp, off)
        } else {
            // A half unit (2-bit codes, group 32): eight bytes into the low lanes.
            let s = self.b.ins().load(I64, mem(), cp, off);
            let v = self.b.ins().scalar_to_vector(I64X2, s);
            self.b
                .ins()
                .bitcast(I8X16, MemFlagsData::new().with_endianness(Endianness::Little), v)
        };
        let fields = 8 / self.bits;
        let mask = (1i64 << self.bits) - 1;
        let maskv = (fields > 1).then(|| self.splat_i8(mask));
        (0..fields)
            .map(|k| {
                let shifted = if k == 0 {
                    v
                } else {
                    self.b.ins().ushr_imm_s(v, (k * self.bits) as i64)
                };
                match maskv {
                    Some(m) if k + 1 < fields => self.b.ins().band(shifted, m),
                    _ => shifted,
                }
            })
            .collect()
    }

    /// `acc + dot(a, c)` per 32-bit lane (four products each) for signed `a` and unsigned
    /// `c`, in the form the x86-64 lowering folds into `vpdpbusd`.
    fn dot(&mut self, a: Value, c: Value, acc: Value) -> Value {
        let al = self.b.ins().swiden_low(a);
        let cl = self.b.ins().uwiden_low(c);
        let lo = self.b.ins().imul(al, cl);
        let ah = self.b.ins().swiden_high(a);
        let ch = self.b.ins().uwiden_high(c);
        let hi = self.b.ins().imul(ah, ch);
        let lol = self.b.ins().swiden_low(lo);
        let loh = self.b.ins().swiden_high(lo);
        let plo = self.b.ins().iadd_pairwise(lol, loh);
        let hil = self.b.ins().swiden_low(hi);
        let hih = self.b.ins().swiden_high(hi);
        let phi = self.b.ins().iadd_pairwise(hil, hih);
        let p = self.b.ins().iadd_pairwise(plo, phi);
        self.b.ins().iadd(p, acc)
    }

    /// The group's scale and min (symmetric: `-scale * 2^(bits-1)`).
    fn scale_min(&mut self, sp: Value, mp: Value) -> (Value, Value) {
        let s = self.load_f16(sp);
        let m = if self.sym {
            let off = self.fconst(-((1u32 << (self.bits - 1)) as f32));
            self.b.ins().fmul(s, off)
        } else {
            self.load_f16(mp)
        };
        (s, m)
    }

    /// Four f16 values `stride` bytes apart from `ptr` as f32x4 (see [`load_f16`](Self::load_f16)).
    fn load_f16x4(&mut self, ptr: Value, stride: i64) -> Value {
        let h0 = self.b.ins().sload16(I32, mem(), ptr, 0);
        let mut v = self.b.ins().scalar_to_vector(I32X4, h0);
        for i in 1..4u8 {
            let h = self.b.ins().sload16(I32, mem(), ptr, (stride * i as i64) as i32);
            v = self.b.ins().insertlane(v, h, i);
        }
        self.halves_to_f32x4(v)
    }

    /// Four sign-extended f16 bit patterns (`i32x4`) as f32x4 (see [`load_f16`](Self::load_f16)).
    fn halves_to_f32x4(&mut self, v: Value) -> Value {
        let sh = self.b.ins().iconst(I32, 13);
        let v = self.b.ins().ishl(v, sh);
        let m = self.b.ins().iconst(I32, 0x8fff_e000u32 as i32 as i64);
        let m = self.b.ins().splat(I32X4, m);
        let v = self.b.ins().band(v, m);
        let f = self.cast(F32X4, v);
        let k = self.fconst(f32::from_bits((127 + 112) << 23));
        let k = self.b.ins().splat(F32X4, k);
        self.b.ins().fmul(f, k)
    }

    /// The four-row loop of the matvec kernel: from `head` while `yp < y4end`, then `done`.
    /// Every group's codes of four consecutive rows meet the same x vectors; the four
    /// integer sums are reduced into one vector (a lane per row) and scaled together.
    fn matvec_quads(&mut self, head: Block, done: Block, v: &MatvecVars, x: [Value; 3], y4end: Value) {
        let row_codes = (self.groups * self.gb) as i64;
        let row_scales = 2 * self.groups as i64;
        let group = self.b.create_block();
        let end = self.b.create_block();
        self.b.switch_to_block(head);
        self.b.def_var(v.xq, x[0]);
        self.b.def_var(v.xd, x[1]);
        self.b.def_var(v.xs, x[2]);
        let sp = self.b.use_var(v.sp);
        let gend = self.b.ins().iadd_imm_s(sp, row_scales);
        self.b.def_var(v.gend, gend);
        let zf = self.fconst(0.0);
        let zf4 = self.b.ins().splat(F32X4, zf);
        self.b.def_var(v.accf, zf4);
        self.b.ins().jump(group, &[]);

        self.b.switch_to_block(group);
        let (cp, sp, mp) = (self.b.use_var(v.cp), self.b.use_var(v.sp), self.b.use_var(v.mp));
        let (xqp, xdp, xsp) = (self.b.use_var(v.xq), self.b.use_var(v.xd), self.b.use_var(v.xs));
        let zi = self.b.ins().iconst(I32, 0);
        let zi4 = self.b.ins().splat(I32X4, zi);
        let mut iacc = [zi4; 4];
        let mut xoff = 0i32;
        for u in 0..self.gb / self.unit {
            let fields: Vec<Vec<Value>> = (0..4)
                .map(|r| self.unit_fields_at(cp, (r * row_codes) as i32 + (u * self.unit) as i32))
                .collect();
            #[allow(clippy::needless_range_loop)] // fields[r][f]: row r, field f
            for f in 0..fields[0].len() {
                let xv = self.b.ins().load(I8X16, mem(), xqp, xoff);
                for r in 0..4 {
                    iacc[r] = self.dot(xv, fields[r][f], iacc[r]);
                }
                xoff += self.xstep();
            }
        }
        let p01 = self.b.ins().iadd_pairwise(iacc[0], iacc[1]);
        let p23 = self.b.ins().iadd_pairwise(iacc[2], iacc[3]);
        let isum = self.b.ins().iadd_pairwise(p01, p23);
        let sv = self.load_f16x4(sp, row_scales);
        let d = self.b.ins().load(F32, mem(), xdp, 0);
        let dv = self.b.ins().splat(F32X4, d);
        let sd = self.b.ins().fmul(sv, dv);
        let fi = self.b.ins().fcvt_from_sint(F32X4, isum);
        let t = self.b.ins().fmul(fi, sd);
        let accf = self.b.use_var(v.accf);
        let accf = self.b.ins().fadd(accf, t);
        let mv = if self.sym {
            let off = self.fconst(-((1u32 << (self.bits - 1)) as f32));
            let off = self.b.ins().splat(F32X4, off);
            self.b.ins().fmul(sv, off)
        } else {
            self.load_f16x4(mp, row_scales)
        };
        let xsum = self.b.ins().load(F32, mem(), xsp, 0);
        let xsv = self.b.ins().splat(F32X4, xsum);
        let mt = self.b.ins().fmul(mv, xsv);
        let accf = self.b.ins().fadd(accf, mt);
        self.b.def_var(v.accf, accf);
        self.bump(v.cp, cp, self.gb);
        let sp = self.bump(v.sp, sp, 2);
        self.bump(v.mp, mp, 2);
        self.bump(v.xq, xqp, self.group);
        self.bump(v.xd, xdp, 4);
        self.bump(v.xs, xsp, 4);
        let gend = self.b.use_var(v.gend);
        let more = self.b.ins().icmp(IntCC::UnsignedLessThan, sp, gend);
        self.b.ins().brif(more, group, &[], end, &[]);

        // Four rows done: store their lanes, skip the three rows walked alongside.
        self.b.switch_to_block(end);
        let accf = self.b.use_var(v.accf);
        let yp = self.b.use_var(v.yp);
        self.b.ins().store(mem(), accf, yp, 0);
        let yp = self.bump(v.yp, yp, 16);
        let (cp, sp, mp) = (self.b.use_var(v.cp), self.b.use_var(v.sp), self.b.use_var(v.mp));
        self.bump(v.cp, cp, 3 * row_codes as usize);
        self.bump(v.sp, sp, 3 * row_scales as usize);
        self.bump(v.mp, mp, 3 * row_scales as usize);
        let more = self.b.ins().icmp(IntCC::UnsignedLessThan, yp, y4end);
        self.b.ins().brif(more, head, &[], done, &[]);
    }

    fn matvec(&mut self) {
        let entry = self.b.create_block();
        self.b.append_block_params_for_function_params(entry);
        self.b.switch_to_block(entry);
        let p = self.b.block_params(entry).to_vec();
        let (xq, xd, xs, codes, scales, mins, y, r0, r1) =
            (p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7], p[8]);
        let row_codes = (self.groups * self.gb) as i64;
        let row_scales = 2 * self.groups as i64;

        let cp0 = self.offset(codes, r0, row_codes);
        let sp0 = self.offset(scales, r0, row_scales);
        let mp0 = self.offset(mins, r0, row_scales);
        let n = self.b.ins().isub(r1, r0);
        let yend = self.offset(y, n, 4);

        let row_head = self.b.create_block();
        let group = self.b.create_block();
        let row_end = self.b.create_block();
        let exit = self.b.create_block();
        let v_cp = self.var(I64, cp0);
        let v_sp = self.var(I64, sp0);
        let v_mp = self.var(I64, mp0);
        let v_yp = self.var(I64, y);
        let (v_xq, v_xd, v_xs, v_gend) = (
            self.b.declare_var(I64),
            self.b.declare_var(I64),
            self.b.declare_var(I64),
            self.b.declare_var(I64),
        );
        let v_accf = self.b.declare_var(F32X4);
        let v_accm = self.b.declare_var(F32);
        // Rows four at a time (one f32 lane each), then the rest one at a time.
        let n4 = self.b.ins().band_imm_s(n, !3);
        let y4end = self.offset(y, n4, 4);
        let tail = self.b.create_block();
        let quad_head = self.b.create_block();
        let more = self.b.ins().icmp(IntCC::UnsignedLessThan, y, y4end);
        self.b.ins().brif(more, quad_head, &[], tail, &[]);
        let vars = MatvecVars {
            cp: v_cp,
            sp: v_sp,
            mp: v_mp,
            yp: v_yp,
            xq: v_xq,
            xd: v_xd,
            xs: v_xs,
            gend: v_gend,
            accf: v_accf,
        };
        self.matvec_quads(quad_head, tail, &vars, [xq, xd, xs], y4end);

        self.b.switch_to_block(tail);
        let yp = self.b.use_var(v_yp);
        let more = self.b.ins().icmp(IntCC::UnsignedLessThan, yp, yend);
        self.b.ins().brif(more, row_head, &[], exit, &[]);

        // A row: reset the x pointers and accumulators.
        self.b.switch_to_block(row_head);
        self.b.def_var(v_xq, xq);
        self.b.def_var(v_xd, xd);
        self.b.def_var(v_xs, xs);
        let sp = self.b.use_var(v_sp);
        let gend = self.b.ins().iadd_imm_s(sp, row_scales);
        self.b.def_var(v_gend, gend);
        let zf = self.fconst(0.0);
        let zf4 = self.b.ins().splat(F32X4, zf);
        self.b.def_var(v_accf, zf4);
        self.b.def_var(v_accm, zf);
        self.b.ins().jump(group, &[]);

        // A group: integer dot of its codes with the int8 x, then the two float terms.
        self.b.switch_to_block(group);
        let (cp, sp, mp) = (self.b.use_var(v_cp), self.b.use_var(v_sp), self.b.use_var(v_mp));
        let (xqp, xdp, xsp) = (self.b.use_var(v_xq), self.b.use_var(v_xd), self.b.use_var(v_xs));
        let zi = self.b.ins().iconst(I32, 0);
        let mut iacc = self.b.ins().splat(I32X4, zi);
        let units = self.gb / self.unit;
        let mut xoff = 0i32;
        for u in 0..units {
            for f in self.unit_fields(cp, u) {
                let xv = self.b.ins().load(I8X16, mem(), xqp, xoff);
                iacc = self.dot(xv, f, iacc);
                xoff += self.xstep();
            }
        }
        let (s, m) = self.scale_min(sp, mp);
        let d = self.b.ins().load(F32, mem(), xdp, 0);
        let sd = self.b.ins().fmul(s, d);
        let sdv = self.b.ins().splat(F32X4, sd);
        let fi = self.b.ins().fcvt_from_sint(F32X4, iacc);
        let t = self.b.ins().fmul(fi, sdv);
        let accf = self.b.use_var(v_accf);
        let accf = self.b.ins().fadd(accf, t);
        self.b.def_var(v_accf, accf);
        let xsum = self.b.ins().load(F32, mem(), xsp, 0);
        let mt = self.b.ins().fmul(m, xsum);
        let accm = self.b.use_var(v_accm);
        let accm = self.b.ins().fadd(accm, mt);
        self.b.def_var(v_accm, accm);
        self.bump(v_cp, cp, self.gb);
        let sp = self.bump(v_sp, sp, 2);
        self.bump(v_mp, mp, 2);
        self.bump(v_xq, xqp, self.group);
        self.bump(v_xd, xdp, 4);
        self.bump(v_xs, xsp, 4);
        let gend = self.b.use_var(v_gend);
        let more = self.b.ins().icmp(IntCC::UnsignedLessThan, sp, gend);
        self.b.ins().brif(more, group, &[], row_end, &[]);

        // End of a row: horizontal sum, store, next row.
        self.b.switch_to_block(row_end);
        let accf = self.b.use_var(v_accf);
        let mut sum = self.b.use_var(v_accm);
        let lanes: Vec<Value> = (0..4).map(|l| self.b.ins().extractlane(accf, l)).collect();
        let pair0 = self.b.ins().fadd(lanes[0], lanes[1]);
        let pair1 = self.b.ins().fadd(lanes[2], lanes[3]);
        let h = self.b.ins().fadd(pair0, pair1);
        sum = self.b.ins().fadd(h, sum);
        let yp = self.b.use_var(v_yp);
        self.b.ins().store(mem(), sum, yp, 0);
        let yp = self.bump(v_yp, yp, 4);
        let more = self.b.ins().icmp(IntCC::UnsignedLessThan, yp, yend);
        self.b.ins().brif(more, row_head, &[], exit, &[]);

        self.b.switch_to_block(exit);
        self.b.ins().return_(&[]);
    }

    /// The codes of unit `u` in column order, sixteen a vector (the last one partial
    /// for a half unit: only its low `unit * 8 / bits` codes count).
    fn unit_in_order(&mut self, cp: Value, u: usize) -> Vec<Value> {
        let f = self.unit_fields(cp, u);
        const LO: [u8; 16] = [0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23];
        const HI: [u8; 16] = [8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31];
        const LO16: [u8; 16] = [0, 1, 16, 17, 2, 3, 18, 19, 4, 5, 20, 21, 6, 7, 22, 23];
        const HI16: [u8; 16] = [8, 9, 24, 25, 10, 11, 26, 27, 12, 13, 28, 29, 14, 15, 30, 31];
        match self.bits {
            8 | 3 => f,
            4 => vec![self.shuffle(f[0], f[1], LO), self.shuffle(f[0], f[1], HI)],
            _ => {
                // Pairs (4i, 4i+1) and (4i+2, 4i+3), then the pairs interleaved.
                let mut out = vec![];
                let halves: &[[u8; 16]] = if self.unit == 16 { &[LO, HI] } else { &[LO] };
                for &h in halves {
                    let t0 = self.shuffle(f[0], f[1], h);
                    let t1 = self.shuffle(f[2], f[3], h);
                    out.push(self.shuffle(t0, t1, LO16));
                    out.push(self.shuffle(t0, t1, HI16));
                }
                out
            }
        }
    }

    /// Stores the `group` values of the group at `cp` (scale at `sp`, min at `mp`) as f32
    /// at `op`.
    fn decode_group(&mut self, cp: Value, sp: Value, mp: Value, op: Value) {
        let (s, m) = self.scale_min(sp, mp);
        let sv = self.b.ins().splat(F32X4, s);
        let mv = self.b.ins().splat(F32X4, m);
        let units = self.gb / self.unit;
        let codes_per_unit = (self.unit * 8 / self.bits) as i32;
        for u in 0..units {
            let vecs = self.unit_in_order(cp, u);
            let mut off = u as i32 * codes_per_unit * 4;
            let end = (u as i32 + 1) * codes_per_unit * 4;
            for v in vecs {
                let lo = self.b.ins().uwiden_low(v);
                let hi = self.b.ins().uwiden_high(v);
                for h in [lo, hi] {
                    for w in [self.b.ins().uwiden_low(h), self.b.ins().uwiden_high(h)] {
                        if off >= end {
                            continue;
                        }
                        let f = self.b.ins().fcvt_from_sint(F32X4, w);
                        let f = self.b.ins().fmul(f, sv);
                        let f = self.b.ins().fadd(f, mv);
                        self.b.ins().store(mem(), f, op, off);
                        off += 16;
                    }
                }
            }
        }
    }

    fn decode(&mut self) {
        let entry = self.b.create_block();
        self.b.append_block_params_for_function_params(entry);
        self.b.switch_to_block(entry);
        let p = self.b.block_params(entry).to_vec();
        let (codes, scales, mins, out, r0, r1) = (p[0], p[1], p[2], p[3], p[4], p[5]);
        let row_codes = (self.groups * self.gb) as i64;
        let row_scales = 2 * self.groups as i64;
        let cp0 = self.offset(codes, r0, row_codes);
        let sp0 = self.offset(scales, r0, row_scales);
        let mp0 = self.offset(mins, r0, row_scales);
        let send = self.offset(scales, r1, row_scales);

        let group = self.b.create_block();
        let exit = self.b.create_block();
        let v_cp = self.var(I64, cp0);
        let v_sp = self.var(I64, sp0);
        let v_mp = self.var(I64, mp0);
        let v_op = self.var(I64, out);
        let more = self.b.ins().icmp(IntCC::UnsignedLessThan, sp0, send);
        self.b.ins().brif(more, group, &[], exit, &[]);

        // Groups of all rows in turn: the output rows are whole groups long.
        self.b.switch_to_block(group);
        let (cp, sp, mp, op) = (
            self.b.use_var(v_cp),
            self.b.use_var(v_sp),
            self.b.use_var(v_mp),
            self.b.use_var(v_op),
        );
        self.decode_group(cp, sp, mp, op);
        self.bump(v_cp, cp, self.gb);
        let sp = self.bump(v_sp, sp, 2);
        self.bump(v_mp, mp, 2);
        self.bump(v_op, op, 4 * self.group);
        let more = self.b.ins().icmp(IntCC::UnsignedLessThan, sp, send);
        self.b.ins().brif(more, group, &[], exit, &[]);

        self.b.switch_to_block(exit);
        self.b.ins().return_(&[]);
    }
}
