//! The JIT host: compiles the compiler's kernel CLIF for this machine with cranelift-jit
//! and runs products with compressed weights through it.
//!
//! - [`spec`]: what each kernel computes and its function signature (shared with the
//!   compiler, which writes the CLIF).
//! - [`KernelSet::compile`]: parses `(weight, spec, clif)` triples (cranelift-reader),
//!   checks each signature against its kind, compiles them for the host ISA (one
//!   function per distinct spec) and binds them to weight names.
//! - [`WeightKernels::linear`] / [`WeightKernels::linear_transposed`]: the safe typed
//!   entry points (`y = x W^T`, `dx = dy W`); all `unsafe` of the JIT is in this file.
//!
//! Decode (one to three token rows) runs the matvec kernel: for quantized weights the
//! integer kernel on `x` quantized to int8 per weight group ([`QuantizedX`]), for sparse
//! weights an f32 kernel (`x` zero-padded, a scratch row per task, the weight's per-row
//! prefix sums of kept values and groups passed along). More rows decode tiles of weight
//! rows with the decode kernel and multiply them with the GEMM crate.

pub mod spec;

use std::collections::HashMap;

use cranelift_codegen::ir::types::I64;
use cranelift_codegen::settings::{self, Configurable};
use cranelift_jit::{JITBuilder, JITModule};
use cranelift_module::{FuncId, Linkage, Module, default_libcall_names};
use rayon::prelude::*;

use crate::error::{Result, RuntimeError};
use crate::format::{QuantScheme, QuantSpec, WeightFormat};
use crate::ir::WeightData;
use crate::kernels::matmul::{View, ViewMut, matmul};
use crate::packed::PackedWeight;
use spec::{KernelKind, KernelSpec};

/// One kernel for one weight: what the compiler hands to (or a bundle holds for) the
/// runtime.
#[derive(Debug, Clone)]
pub struct KernelSource {
    /// The weight's name in the graph.
    pub weight: String,
    pub spec: KernelSpec,
    /// The CLIF text of one function implementing `spec`.
    pub clif: String,
}

/// `x` prepared for the matvec kernel of a quantized format: quantized to int8 with one
/// scale per weight group (`xd[g] * xq ≈ x`), group sums `xs` (of the exact `x` for
/// asymmetric formats; of the int8 `x` times `xd` for symmetric ones), and the int8
/// values permuted inside each unit of `min(16, group * bits / 8)` code bytes the way the
/// kernel unpacks codes: position `k * unit + i` holds column `i * 8 / bits + k`
/// (3-bit codes are unpacked in column order, so their `x` is not permuted).
#[derive(Debug, Clone)]
pub struct QuantizedX {
    pub xq: Vec<i8>,
    pub xd: Vec<f32>,
    pub xs: Vec<f32>,
}

/// Code bytes a unit (one vector load of codes; 3-bit: 32 codes in 12 bytes).
pub fn unit_bytes(q: &QuantSpec) -> usize {
    if q.bits == 3 {
        return 12;
    }
    (q.group as usize * q.bits as usize / 8).min(16)
}

/// `(unit, fields)` of the permutation of `x` inside a unit (`fields = 1`: none).
fn x_permutation(q: &QuantSpec) -> (usize, usize) {
    match q.bits {
        3 => (q.group as usize, 1),
        b => (unit_bytes(q), 8 / b as usize),
    }
}

impl QuantizedX {
    pub fn new(x: &[f32], q: &QuantSpec) -> QuantizedX {
        let g = q.group as usize;
        let groups = x.len().div_ceil(g);
        let (unit, fields) = x_permutation(q);
        let per_unit = unit * fields;
        // 16 bytes of slack: a half unit's last field reads a whole vector.
        let mut xq = vec![0i8; groups * g + 16];
        let mut xd = Vec::with_capacity(groups);
        let mut xs = Vec::with_capacity(groups);
        let mut vals = vec![0i8; g];
        for (gi, xg) in x.chunks(g).enumerate() {
            let amax = xg.iter().fold(0.0f32, |a, v| a.max(v.abs()));
            let inv = if amax > 0.0 { 127.0 / amax } else { 0.0 };
            vals.fill(0);
            for (o, v) in vals.iter_mut().zip(xg) {
                *o = (v * inv).round().clamp(-127.0, 127.0) as i8;
            }
            let d = amax / 127.0;
            xd.push(d);
            xs.push(match q.scheme {
                QuantScheme::Asym => xg.iter().sum(),
                // The kernel's `min * xs` with `min = -scale * 2^(bits-1)` then subtracts the
                // offset from the codes against the same int8 x, so the rounding of x is
                // weighted by the weight itself, not by its offset code.
                QuantScheme::Sym => d * vals.iter().map(|&v| v as i32).sum::<i32>() as f32,
            });
            let dst = &mut xq[gi * g..(gi + 1) * g];
            for (du, vu) in dst.chunks_mut(per_unit).zip(vals.chunks(per_unit)) {
                for i in 0..unit {
                    for k in 0..fields {
                        du[k * unit + i] = vu[i * fields + k];
                    }
                }
            }
        }
        QuantizedX { xq, xd, xs }
    }
}

/// The matvec kernel's arithmetic in plain Rust (the reference its JIT code is tested
/// against): per group, `scale * xd * sum(code * xq) + min * xs`.
pub fn matvec_int_reference(w: &PackedWeight, x: &[f32], y: &mut [f32]) -> Result<()> {
    let WeightFormat::Quant(q) = *w.format() else {
        return Err(RuntimeError::Invalid(format!(
            "integer matvec of a {} weight",
            w.format()
        )));
    };
    if x.len() != w.cols() || y.len() != w.rows() {
        return Err(RuntimeError::Invalid(format!(
            "integer matvec: x {} / y {} for a {:?} weight",
            x.len(),
            y.len(),
            w.shape()
        )));
    }
    let qx = QuantizedX::new(x, &q);
    let (g, bits) = (q.group as usize, q.bits as usize);
    let groups = w.cols().div_ceil(g);
    let gb = g * bits / 8;
    let b = w.buffers();
    let codes = b.qweight.as_ref().expect("quant").as_slice();
    let half = |buf: &[u8], i: usize| half::f16::from_le_bytes([buf[2 * i], buf[2 * i + 1]]).to_f32();
    let scales = b.scales.as_ref().expect("quant").as_slice();
    let mins = b.mins.as_ref().map(|m| m.as_slice());
    // Undo the permutation: plain int8 x in column order.
    let mut xcol = vec![0i8; groups * g];
    let (unit, fields) = x_permutation(&q);
    for (dst, src) in xcol.chunks_mut(unit * fields).zip(qx.xq.chunks(unit * fields)) {
        for i in 0..unit {
            for k in 0..fields {
                dst[i * fields + k] = src[k * unit + i];
            }
        }
    }
    for (r, yr) in y.iter_mut().enumerate() {
        let mut acc = 0.0f32;
        for gi in 0..groups {
            let at = r * groups + gi;
            let gc = &codes[at * gb..(at + 1) * gb];
            let isum: i32 = (0..g)
                .map(|i| {
                    let (at, sh) = (i * bits / 8, i * bits % 8);
                    let two = gc[at] as i32 | (gc.get(at + 1).copied().unwrap_or(0) as i32) << 8;
                    let c = (two >> sh) & ((1 << bits) - 1);
                    c * xcol[gi * g + i] as i32
                })
                .sum();
            let s = half(scales, at);
            let m = match mins {
                Some(m) => half(m, at),
                None => -s * (1u32 << (bits - 1)) as f32,
            };
            acc += s * qx.xd[gi] * isum as f32 + m * qx.xs[gi];
        }
        *yr = acc;
    }
    Ok(())
}

type MatvecFn = unsafe extern "C" fn(
    *const i8,
    *const f32,
    *const f32,
    *const u8,
    *const u8,
    *const u8,
    *mut f32,
    u64,
    u64,
);
type DecodeFn = unsafe extern "C" fn(*const u8, *const u8, *const u8, *mut f32, u64, u64);
/// `matvec(x, vals, scales, mins, pos, kstart, gstart, scratch, y, r0, r1)` of a sparse weight.
type SparseMatvecFn = unsafe extern "C" fn(
    *const f32,
    *const u8,
    *const u8,
    *const u8,
    *const u8,
    *const usize,
    *const usize,
    *mut f32,
    *mut f32,
    u64,
    u64,
);
/// `decode(vals, scales, mins, pos, kstart, gstart, out, r0, r1)` of a sparse weight.
type SparseDecodeFn = unsafe extern "C" fn(
    *const u8,
    *const u8,
    *const u8,
    *const u8,
    *const usize,
    *const usize,
    *mut f32,
    u64,
    u64,
);

// The kernels read the prefix sums of kept values and groups as 64-bit integers.
const _: () = assert!(std::mem::size_of::<usize>() == 8);

/// Values a sparse decode kernel may write past its last output row (the padding of the
/// last quantized group and of the last eight-column step).
const SPARSE_SLACK: usize = 136;

#[derive(Clone, Copy)]
enum Matvec {
    Quant(MatvecFn),
    Sparse(SparseMatvecFn),
}

#[derive(Clone, Copy)]
enum Decode {
    Quant(DecodeFn),
    Sparse(SparseDecodeFn),
}

/// The compiled code; its memory lives as long as this value.
struct JitCode(Option<JITModule>);

// SAFETY: after `finalize_definitions` the module is never used again except to free its
// memory on drop; the code it owns is immutable, so sharing or sending it is sound.
unsafe impl Send for JitCode {}
unsafe impl Sync for JitCode {}

impl Drop for JitCode {
    fn drop(&mut self) {
        if let Some(m) = self.0.take() {
            // SAFETY: the function pointers into this module are held only by the
            // `WeightKernels` of the `KernelSet` owning this value, dropped with it.
            unsafe { m.free_memory() };
        }
    }
}

/// The kernels of one weight (either may be missing: that product then runs the
/// reference kernel).
pub struct WeightKernels {
    spec_rows: usize,
    spec_cols: usize,
    format: WeightFormat,
    /// The quantization of the weight or its kept values (`None`: f16 values).
    quant: Option<QuantSpec>,
    matvec: Option<Matvec>,
    decode: Option<Decode>,
}

/// Compiled kernels for the weights of a graph, by weight name.
pub struct KernelSet {
    weights: HashMap<String, WeightKernels>,
    functions: usize,
    _code: JitCode,
}

impl std::fmt::Debug for KernelSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "KernelSet({} weights, {} functions)",
            self.weights.len(),
            self.functions
        )
    }
}

fn jit_err(what: &str, e: impl std::fmt::Display) -> RuntimeError {
    RuntimeError::Invalid(format!("JIT: {what}: {e}"))
}

impl KernelSet {
    /// Compiles the kernels for the host ISA. Each source's CLIF must hold one function
    /// with the signature of its spec's kind; sources with the same spec name are
    /// compiled once.
    pub fn compile(sources: &[KernelSource]) -> Result<KernelSet> {
        let mut flags = settings::builder();
        flags.set("opt_level", "speed").map_err(|e| jit_err("flags", e))?;
        let isa = cranelift_native::builder()
            .map_err(|e| jit_err("host ISA", e))?
            .finish(settings::Flags::new(flags))
            .map_err(|e| jit_err("host ISA", e))?;
        let call_conv = isa.default_call_conv();
        let mut module = JITModule::new(JITBuilder::with_isa(isa, default_libcall_names()));
        let mut ids: HashMap<String, FuncId> = HashMap::new();
        for s in sources {
            let name = s.spec.name();
            if ids.contains_key(&name) {
                continue;
            }
            let mut funcs = cranelift_reader::parse_functions(&s.clif)
                .map_err(|e| jit_err(&format!("kernel {name}"), e))?;
            if funcs.len() != 1 {
                return Err(jit_err(
                    &format!("kernel {name}"),
                    format!("{} functions, expected 1", funcs.len()),
                ));
            }
            let mut func = funcs.pop().expect("one");
            let sig = &func.signature;
            if !sig.returns.is_empty()
                || sig.params.len() != s.spec.params()
                || sig.params.iter().any(|p| p.value_type != I64)
            {
                return Err(jit_err(
                    &format!("kernel {name}"),
                    format!("signature {sig} is not the {:?} kernel's", s.spec.kind),
                ));
            }
            func.signature.call_conv = call_conv;
            let id = module
                .declare_function(&name, Linkage::Local, &func.signature)
                .map_err(|e| jit_err(&name, e))?;
            let mut ctx = cranelift_codegen::Context::for_function(func);
            module
                .define_function(id, &mut ctx)
                .map_err(|e| jit_err(&name, e))?;
            ids.insert(name, id);
        }
        module
            .finalize_definitions()
            .map_err(|e| jit_err("finalize", e))?;
        let mut weights: HashMap<String, WeightKernels> = HashMap::new();
        for s in sources {
            let ptr = module.get_finalized_function(ids[&s.spec.name()]);
            let wk = weights.entry(s.weight.clone()).or_insert_with(|| WeightKernels {
                spec_rows: s.spec.rows,
                spec_cols: s.spec.cols,
                format: s.spec.format.clone(),
                quant: s.spec.quant(),
                matvec: None,
                decode: None,
            });
            if (wk.spec_rows, wk.spec_cols, &wk.format) != (s.spec.rows, s.spec.cols, &s.spec.format) {
                return Err(jit_err(&s.weight, "kernels for different shapes or formats"));
            }
            // SAFETY: the function was checked above to take exactly the kind's number of
            // i64 parameters (for its format: dense quantized or sparse) and return
            // nothing, with the host's C calling convention, which is the ABI of these fn
            // pointer types (pointers and u64 are i64).
            unsafe {
                let sparse = s.spec.pattern().is_some();
                match (s.spec.kind, sparse) {
                    (KernelKind::Matvec, false) => {
                        wk.matvec = Some(Matvec::Quant(std::mem::transmute::<*const u8, MatvecFn>(ptr)))
                    }
                    (KernelKind::Decode, false) => {
                        wk.decode = Some(Decode::Quant(std::mem::transmute::<*const u8, DecodeFn>(ptr)))
                    }
                    (KernelKind::Matvec, true) => {
                        wk.matvec = Some(Matvec::Sparse(std::mem::transmute::<*const u8, SparseMatvecFn>(
                            ptr,
                        )))
                    }
                    (KernelKind::Decode, true) => {
                        wk.decode = Some(Decode::Sparse(std::mem::transmute::<*const u8, SparseDecodeFn>(
                            ptr,
                        )))
                    }
                }
            }
        }
        Ok(KernelSet {
            weights,
            functions: ids.len(),
            _code: JitCode(Some(module)),
        })
    }

    /// The kernels of weight `name`.
    pub fn get(&self, name: &str) -> Option<&WeightKernels> {
        self.weights.get(name)
    }
    /// Weights with kernels.
    pub fn len(&self) -> usize {
        self.weights.len()
    }
    pub fn is_empty(&self) -> bool {
        self.weights.is_empty()
    }
    /// Distinct compiled functions.
    pub fn functions(&self) -> usize {
        self.functions
    }
}

/// Raw buffer addresses of a compressed weight (a `usize` each so closures on other
/// threads can carry them). Buffers a format lacks point at another buffer (never read).
#[derive(Clone, Copy)]
struct Ptrs {
    /// `qweight`, or a sparse weight's f16 `values`.
    codes: usize,
    scales: usize,
    mins: usize,
    /// `mask` or `index` (sparse).
    pos: usize,
    /// Prefix sums of kept values and groups per row (sparse).
    kstart: usize,
    gstart: usize,
}

/// Weight rows decoded per GEMM tile at most.
const TILE_N: usize = 256;

impl WeightKernels {
    fn check<'w>(&self, w: &'w WeightData) -> Result<(&'w PackedWeight, Ptrs)> {
        let WeightData::Packed(p) = w else {
            return Err(RuntimeError::Invalid(
                "JIT kernels run packed weights only".into(),
            ));
        };
        if p.format() != &self.format || p.shape() != [self.spec_rows, self.spec_cols] {
            return Err(RuntimeError::Invalid(format!(
                "JIT kernel for {} {:?} called with a {} {:?} weight",
                self.format,
                [self.spec_rows, self.spec_cols],
                p.format(),
                p.shape()
            )));
        }
        let b = p.buffers();
        let addr = |b: &crate::packed::Buf| b.as_slice().as_ptr() as usize;
        // `from_parts` checked that the format's buffers are present.
        let Some(codes) = b.qweight.as_ref().or(b.values.as_ref()).map(addr) else {
            return Err(RuntimeError::Invalid("compressed weight without values".into()));
        };
        // Symmetric kernels never read `mins`, f16 values neither scales nor mins.
        let scales = b.scales.as_ref().map_or(codes, addr);
        let ptrs = Ptrs {
            codes,
            scales,
            mins: b.mins.as_ref().map_or(scales, addr),
            pos: b.mask.as_ref().or(b.index.as_ref()).map_or(codes, addr),
            kstart: p.kept_starts().as_ptr() as usize,
            gstart: p.group_starts().as_ptr() as usize,
        };
        Ok((p, ptrs))
    }

    /// `out[rows, n] = x[rows, k] W^T`, as [`crate::kernels::linear`] computes it.
    pub fn linear(&self, x: &[f32], rows: usize, w: &WeightData, out: &mut [f32]) -> Result<()> {
        let (p, ptrs) = self.check(w)?;
        let (n, k) = (p.rows(), p.cols());
        if x.len() != rows * k || out.len() != rows * n {
            return Err(RuntimeError::Invalid(format!(
                "JIT linear: x {} / out {} values for {rows} rows of a [{n}, {k}] weight",
                x.len(),
                out.len()
            )));
        }
        match (self.matvec, self.decode) {
            (Some(f), _) if rows <= 3 => {
                for (xr, orow) in x.chunks_exact(k).zip(out.chunks_exact_mut(n)) {
                    self.matvec_row(f, ptrs, xr, orow);
                }
            }
            (_, Some(f)) => self.matmul(f, ptrs, x, rows, out),
            _ => crate::kernels::linear(x, rows, w, out),
        }
        Ok(())
    }

    fn matvec_row(&self, f: Matvec, ptrs: Ptrs, x: &[f32], y: &mut [f32]) {
        let f = match (f, self.quant) {
            (Matvec::Quant(f), Some(q)) if self.sparse_stride().is_none() => (f, q),
            (Matvec::Sparse(f), _) => return self.sparse_matvec_row(f, ptrs, x, y),
            _ => unreachable!("kernels are bound by their spec's format"),
        };
        let (f, q) = f;
        let qx = QuantizedX::new(x, &q);
        // Multiples of four rows: the kernel runs rows four at a time.
        let chunk = (y.len() / (16 * rayon::current_num_threads()))
            .clamp(16, 1024)
            .next_multiple_of(4);
        let (xq, xd, xs) = (
            qx.xq.as_ptr() as usize,
            qx.xd.as_ptr() as usize,
            qx.xs.as_ptr() as usize,
        );
        y.par_chunks_mut(chunk).enumerate().for_each(|(c, yc)| {
            let r0 = (c * chunk) as u64;
            // SAFETY: `check` matched the weight's format and shape with the spec the
            // kernel was generated for, so its buffers hold every row it reads; x was
            // quantized for that spec (`G * group + 16` int8, `G` scales and sums); the
            // kernel writes `yc[0 .. yc.len()]` only, rows r0 .. r0 + yc.len() < rows.
            unsafe {
                f(
                    xq as *const i8,
                    xd as *const f32,
                    xs as *const f32,
                    ptrs.codes as *const u8,
                    ptrs.scales as *const u8,
                    ptrs.mins as *const u8,
                    yc.as_mut_ptr(),
                    r0,
                    r0 + yc.len() as u64,
                )
            }
        });
    }

    /// `Some(cols)` for a sparse weight (its decoded rows are `cols` apart).
    fn sparse_stride(&self) -> Option<usize> {
        matches!(self.format, WeightFormat::Sparse { .. }).then_some(self.spec_cols)
    }

    /// The sparse matvec: `x` zero-padded to whole eight-column steps, rows split over
    /// the thread pool, a scratch row per task.
    fn sparse_matvec_row(&self, f: SparseMatvecFn, ptrs: Ptrs, x: &[f32], y: &mut [f32]) {
        let cols = self.spec_cols;
        let mut xp = vec![0.0f32; cols.next_multiple_of(8)];
        xp[..cols].copy_from_slice(x);
        let chunk = (y.len() / (16 * rayon::current_num_threads())).clamp(16, 1024);
        let xa = xp.as_ptr() as usize;
        y.par_chunks_mut(chunk).enumerate().for_each(|(c, yc)| {
            let r0 = (c * chunk) as u64;
            let mut scratch = vec![0.0f32; cols + SPARSE_SLACK];
            // SAFETY: `check` matched the weight's format and shape with the kernel's spec,
            // so its buffers and prefix sums (`rows + 1` each) hold every row it reads; x
            // has `ceil(cols / 8) * 8` values; the scratch row `cols + SPARSE_SLACK` (the
            // kernel writes at most `cols + group + 4`); the kernel writes `yc` only.
            unsafe {
                f(
                    xa as *const f32,
                    ptrs.codes as *const u8,
                    ptrs.scales as *const u8,
                    ptrs.mins as *const u8,
                    ptrs.pos as *const u8,
                    ptrs.kstart as *const usize,
                    ptrs.gstart as *const usize,
                    scratch.as_mut_ptr(),
                    yc.as_mut_ptr(),
                    r0,
                    r0 + yc.len() as u64,
                )
            }
        });
    }

    /// Weight rows `j0..j1` decoded into `scratch` (`(j1 - j0) * padded` f32, rows
    /// `padded` apart: `G * group` for quantized weights, `cols` for sparse ones).
    fn decode_rows(&self, f: Decode, ptrs: Ptrs, j0: usize, j1: usize, scratch: &mut Vec<f32>) -> usize {
        let f = match f {
            Decode::Quant(f) => f,
            Decode::Sparse(f) => {
                let cols = self.spec_cols;
                scratch.resize((j1 - j0) * cols + SPARSE_SLACK, 0.0);
                // SAFETY: j0 <= j1 <= rows of the weight checked against the spec (its
                // buffers and prefix sums hold those rows); the kernel writes rows
                // j0..j1, `cols` apart, and at most SPARSE_SLACK values past the last.
                unsafe {
                    f(
                        ptrs.codes as *const u8,
                        ptrs.scales as *const u8,
                        ptrs.mins as *const u8,
                        ptrs.pos as *const u8,
                        ptrs.kstart as *const usize,
                        ptrs.gstart as *const usize,
                        scratch.as_mut_ptr(),
                        j0 as u64,
                        j1 as u64,
                    )
                };
                return cols;
            }
        };
        let g = self.quant.expect("quantized").group as usize;
        let padded = self.spec_cols.div_ceil(g) * g;
        scratch.resize((j1 - j0) * padded, 0.0);
        // Bands of rows on the pool's threads: a tile's decode otherwise runs on one
        // thread while the others wait for its product.
        let band = crate::kernels::rows_per_thread(j1 - j0);
        scratch
            .par_chunks_mut(band * padded)
            .enumerate()
            .for_each(|(b, out)| {
                let r0 = j0 + b * band;
                let r1 = r0 + out.len() / padded;
                // SAFETY: j0 <= r0 < r1 <= j1 <= rows of the weight checked against the spec;
                // the kernel writes (r1 - r0) * padded f32, exactly this band of the scratch,
                // which no other band touches.
                unsafe {
                    f(
                        ptrs.codes as *const u8,
                        ptrs.scales as *const u8,
                        ptrs.mins as *const u8,
                        out.as_mut_ptr(),
                        r0 as u64,
                        r1 as u64,
                    )
                };
            });
        padded
    }

    /// `out = x W^T`: tiles of weight rows decoded once, each multiplied by GEMM (which
    /// runs on the thread pool).
    fn matmul(&self, f: Decode, ptrs: Ptrs, x: &[f32], rows: usize, out: &mut [f32]) {
        let (n, k) = (self.spec_rows, self.spec_cols);
        let mut scratch = Vec::new();
        for j0 in (0..n).step_by(TILE_N) {
            let j1 = (j0 + TILE_N).min(n);
            let padded = self.decode_rows(f, ptrs, j0, j1, &mut scratch);
            let wt = View::columns(&scratch, j1 - j0, padded, 0, k).t();
            let dst = ViewMut::columns(out, rows, n, j0, j1 - j0);
            matmul(dst, View::new(x, rows, k), wt, 1.0, false);
        }
    }

    /// `dx[rows, k] = dy[rows, n] W`, as [`crate::kernels::linear_transposed`] computes it.
    pub fn linear_transposed(&self, dy: &[f32], rows: usize, w: &WeightData, dx: &mut [f32]) -> Result<()> {
        let (p, ptrs) = self.check(w)?;
        let (n, k) = (p.rows(), p.cols());
        if dy.len() != rows * n || dx.len() != rows * k {
            return Err(RuntimeError::Invalid(format!(
                "JIT linear_transposed: dy {} / dx {} values for {rows} rows of a [{n}, {k}] weight",
                dy.len(),
                dx.len()
            )));
        }
        let Some(f) = self.decode else {
            crate::kernels::linear_transposed(dy, rows, w, dx);
            return Ok(());
        };
        dx.fill(0.0);
        let mut scratch = Vec::new();
        for j0 in (0..n).step_by(TILE_N) {
            let j1 = (j0 + TILE_N).min(n);
            let padded = self.decode_rows(f, ptrs, j0, j1, &mut scratch);
            let dyt = View::columns(dy, rows, n, j0, j1 - j0);
            let wt = View::columns(&scratch, j1 - j0, padded, 0, k);
            matmul(ViewMut::new(dx, rows, k), dyt, wt, 1.0, true);
        }
        Ok(())
    }
}

/// `dx = dy W` (the product with the transposed weight, the backward pass's) through the
/// weight's JIT kernels when `kernels` has them, else the reference kernels.
pub fn linear_transposed(
    kernels: Option<&KernelSet>,
    name: &str,
    dy: &[f32],
    rows: usize,
    w: &WeightData,
    dx: &mut [f32],
) -> Result<()> {
    match kernels.and_then(|k| k.get(name)) {
        Some(k) => k.linear_transposed(dy, rows, w, dx),
        None => {
            crate::kernels::linear_transposed(dy, rows, w, dx);
            Ok(())
        }
    }
}

/// `y = x W^T` through the weight's JIT kernels when `kernels` has them, else the
/// reference kernels.
pub fn linear(
    kernels: Option<&KernelSet>,
    name: &str,
    x: &[f32],
    rows: usize,
    w: &WeightData,
    out: &mut [f32],
) -> Result<()> {
    match kernels.and_then(|k| k.get(name)) {
        Some(k) => k.linear(x, rows, w, out),
        None => {
            crate::kernels::linear(x, rows, w, out);
            Ok(())
        }
    }
}
