//! Kernel code generation: a CLIF function for every compressed-weight kernel
//! ([`edge_runtime::jit::spec::KernelSpec`]), and its ahead-of-time compilation for a
//! target ISA (so a bundle whose kernels cannot compile for its device is refused at
//! build time). The runtime JIT-compiles the same CLIF text on the device
//! (`edge_runtime::jit`).
//!
//! - [`generate_clif`]: the CLIF text of a spec (the bundle's kernel table entry).
//! - [`target_isa`]: a Cranelift ISA for a triple and feature list (`x86_64` with
//!   `has_avx2`, `has_avx512vnni`, ...; `aarch64` with `has_dotprod`, ...), or the host.
//! - [`compile_for_isa`]: machine code of one kernel (from a spec or CLIF text).
//! - [`object_file`]: an ELF object exporting a set of kernels by name (the aarch64 check
//!   links one with a C harness).

pub mod clif;

use cranelift_codegen::control::ControlPlane;
use cranelift_codegen::ir::Function;
use cranelift_codegen::isa::{self, OwnedTargetIsa};
use cranelift_codegen::settings::{self, Configurable};
use cranelift_module::{Linkage, Module, default_libcall_names};
use cranelift_object::{ObjectBuilder, ObjectModule};
use std::sync::Arc;

use edge_runtime::Executor;
use edge_runtime::ir::{Graph, Op, WeightData};
use edge_runtime::jit::spec::{KernelKind, KernelSpec, unsupported_reason};
use edge_runtime::jit::{KernelSet, KernelSource};
use edge_runtime::packed::PackedWeight;
use thiserror::Error;

pub use clif::{build_function, generate_clif};

/// Everything code generation can fail with.
#[derive(Debug, Error)]
pub enum CodegenError {
    #[error("unknown or unsupported ISA `{0}`")]
    UnknownIsa(String),
    #[error("ISA `{isa}`: bad setting `{setting}`: {msg}")]
    Setting {
        isa: String,
        setting: String,
        msg: String,
    },
    #[error("kernel CLIF does not parse: {0}")]
    Parse(String),
    #[error("kernel CLIF holds {0} functions, expected one")]
    FunctionCount(usize),
    #[error("kernel `{name}` does not compile for {isa}: {msg}")]
    Compile { name: String, isa: String, msg: String },
    #[error("object file: {0}")]
    Object(String),
}

/// A Cranelift ISA for `triple` (e.g. `x86_64-unknown-linux-gnu`, `aarch64-unknown-linux-gnu`)
/// with the ISA `features` enabled (Cranelift setting names such as `has_avx2`,
/// `has_avx512vnni`, `has_dotprod`); `triple = "host"` reads the running machine.
/// Code is optimised for speed.
pub fn target_isa(triple: &str, features: &[&str]) -> Result<OwnedTargetIsa, CodegenError> {
    let mut flags = settings::builder();
    let set = |f: &mut settings::Builder, k: &str, v: &str| {
        f.set(k, v).map_err(|e| CodegenError::Setting {
            isa: triple.into(),
            setting: k.into(),
            msg: e.to_string(),
        })
    };
    set(&mut flags, "opt_level", "speed")?;
    set(&mut flags, "is_pic", "false")?;
    let mut builder = if triple == "host" {
        cranelift_native::builder().map_err(|e| CodegenError::UnknownIsa(format!("host: {e}")))?
    } else {
        isa::lookup_by_name(triple).map_err(|e| CodegenError::UnknownIsa(format!("{triple}: {e}")))?
    };
    for f in features {
        builder.enable(f).map_err(|e| CodegenError::Setting {
            isa: triple.into(),
            setting: (*f).into(),
            msg: e.to_string(),
        })?;
    }
    builder
        .finish(settings::Flags::new(flags))
        .map_err(|e| CodegenError::UnknownIsa(format!("{triple}: {e}")))
}

/// Parses CLIF text holding exactly one function.
pub fn parse_clif(clif: &str) -> Result<Function, CodegenError> {
    let mut funcs =
        cranelift_reader::parse_functions(clif).map_err(|e| CodegenError::Parse(e.to_string()))?;
    if funcs.len() != 1 {
        return Err(CodegenError::FunctionCount(funcs.len()));
    }
    Ok(funcs.pop().expect("one function"))
}

fn compile_function(
    mut func: Function,
    name: &str,
    isa: &dyn isa::TargetIsa,
) -> Result<Vec<u8>, CodegenError> {
    func.signature.call_conv = isa.default_call_conv();
    let mut ctx = cranelift_codegen::Context::for_function(func);
    let code = ctx
        .compile(isa, &mut ControlPlane::default())
        .map_err(|e| CodegenError::Compile {
            name: name.into(),
            isa: isa.triple().to_string(),
            msg: format!("{:?}", e.inner),
        })?;
    Ok(code.code_buffer().to_vec())
}

/// Machine code of a kernel given as CLIF text, for `isa`.
pub fn compile_for_isa(clif: &str, isa: &dyn isa::TargetIsa) -> Result<Vec<u8>, CodegenError> {
    let func = parse_clif(clif)?;
    let name = func.name.to_string();
    compile_function(func, &name, isa)
}

/// Machine code of a kernel given by its spec, for `isa`.
pub fn compile_spec_for_isa(spec: &KernelSpec, isa: &dyn isa::TargetIsa) -> Result<Vec<u8>, CodegenError> {
    compile_function(build_function(spec), &spec.name(), isa)
}

/// A relocatable object file for `isa` exporting each `(symbol, clif)` kernel under its
/// symbol (with the platform's C calling convention).
pub fn object_file(isa: OwnedTargetIsa, kernels: &[(String, String)]) -> Result<Vec<u8>, CodegenError> {
    let obj = |e: &dyn std::fmt::Display| CodegenError::Object(e.to_string());
    let triple = isa.triple().to_string();
    let builder = ObjectBuilder::new(isa, "edge-kernels", default_libcall_names()).map_err(|e| obj(&e))?;
    let mut module = ObjectModule::new(builder);
    for (symbol, clif) in kernels {
        let mut func = parse_clif(clif)?;
        func.signature.call_conv = module.isa().default_call_conv();
        let id = module
            .declare_function(symbol, Linkage::Export, &func.signature)
            .map_err(|e| obj(&e))?;
        let mut ctx = cranelift_codegen::Context::for_function(func);
        module
            .define_function(id, &mut ctx)
            .map_err(|e| CodegenError::Compile {
                name: symbol.clone(),
                isa: triple.clone(),
                msg: e.to_string(),
            })?;
    }
    module.finish().emit().map_err(|e| obj(&e))
}

/// Which kernels run the products with compressed weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum KernelMode {
    /// Generated CLIF, JIT-compiled for this machine (formats without a generated kernel
    /// run the reference kernels).
    Jit,
    /// The runtime's plain Rust kernels.
    #[default]
    Reference,
}

/// The kernel sources for every compressed linear weight of `graph`, and the weights left
/// to the reference kernels with the reason.
pub fn kernel_sources(graph: &Graph) -> (Vec<KernelSource>, Vec<(String, String)>) {
    let mut sources: Vec<KernelSource> = vec![];
    let mut skipped = vec![];
    let mut seen = std::collections::HashSet::new();
    // CLIF text by kernel name: weights of one shape and format share their kernels.
    let mut texts: std::collections::HashMap<String, String> = std::collections::HashMap::new();
    for node in &graph.nodes {
        let Op::Linear { weight } = node.op else { continue };
        let w = graph.weight(weight);
        let WeightData::Packed(p) = &w.data else { continue };
        if !seen.insert(w.name.clone()) {
            continue;
        }
        match sources_for(&w.name, p, &mut texts) {
            Ok(s) => sources.extend(s),
            Err(why) => skipped.push((w.name.clone(), why)),
        }
    }
    (sources, skipped)
}

/// The kernel sources (every kind) of one packed weight, or why its format has none.
pub fn weight_sources(name: &str, p: &PackedWeight) -> Result<Vec<KernelSource>, String> {
    sources_for(name, p, &mut std::collections::HashMap::new())
}

/// [`weight_sources`] with CLIF texts reused from `texts` (by kernel name).
fn sources_for(
    name: &str,
    p: &PackedWeight,
    texts: &mut std::collections::HashMap<String, String>,
) -> Result<Vec<KernelSource>, String> {
    if let Some(why) = unsupported_reason(p.format()) {
        return Err(why);
    }
    KernelKind::ALL
        .iter()
        .map(|&kind| {
            let spec = KernelSpec::new(kind, p.rows(), p.cols(), p.format()).map_err(|e| e.to_string())?;
            let clif = texts
                .entry(spec.name())
                .or_insert_with(|| generate_clif(&spec))
                .clone();
            Ok(KernelSource {
                weight: name.into(),
                spec,
                clif,
            })
        })
        .collect()
}

/// The JIT kernels of every compressed linear of `graph`, compiled for this machine (weights
/// without a generated kernel are logged and run the reference kernels).
pub fn kernel_set(graph: &Graph) -> edge_runtime::Result<KernelSet> {
    let t = std::time::Instant::now();
    let (sources, skipped) = kernel_sources(graph);
    for (w, why) in &skipped {
        tracing::info!("{w}: reference kernel ({why})");
    }
    let set = KernelSet::compile(&sources)?;
    tracing::info!(
        "JIT: {} weights, {} functions compiled in {:.0} ms",
        set.len(),
        set.functions(),
        t.elapsed().as_secs_f64() * 1e3
    );
    Ok(set)
}

/// An executor for `graph` whose compressed linears run `mode`'s kernels.
pub fn executor(graph: Arc<Graph>, mode: KernelMode) -> edge_runtime::Result<Executor> {
    match mode {
        KernelMode::Reference => Executor::new(graph),
        KernelMode::Jit => {
            let set = kernel_set(&graph)?;
            Executor::with_kernels(graph, Arc::new(set))
        }
    }
}
