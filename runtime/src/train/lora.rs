//! LoRA adapters and exit heads: the trainable parameters of tuning, with PEFT's
//! conventions (`A`: `[r, in]`, `B`: `[out, r]`, `ΔW = B·A·alpha/r`, `B` starts at zero,
//! `A` Kaiming-uniform like `nn.Linear`) and PEFT's file layout
//! (`adapter_model.safetensors` + `adapter_config.json`).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::Path;
use std::str::FromStr;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use safetensors::tensor::TensorView;

use crate::error::{Result, RuntimeError};
use crate::ir::{Graph, Op, WeightId};

/// A projection of a LLaMA decoder layer that can carry an adapter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Module {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Module {
    pub const ALL: [Module; 7] = [
        Module::Q,
        Module::K,
        Module::V,
        Module::O,
        Module::Gate,
        Module::Up,
        Module::Down,
    ];

    /// PEFT's (and Hugging Face's) module name.
    pub fn peft_name(self) -> &'static str {
        match self {
            Module::Q => "q_proj",
            Module::K => "k_proj",
            Module::V => "v_proj",
            Module::O => "o_proj",
            Module::Gate => "gate_proj",
            Module::Up => "up_proj",
            Module::Down => "down_proj",
        }
    }

    fn parent(self) -> &'static str {
        match self {
            Module::Q | Module::K | Module::V | Module::O => "self_attn",
            _ => "mlp",
        }
    }

    /// The Hugging Face module path of this projection in layer `layer`.
    pub fn path(self, layer: usize) -> String {
        format!("model.layers.{layer}.{}.{}", self.parent(), self.peft_name())
    }
}

impl fmt::Display for Module {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.peft_name())
    }
}

impl FromStr for Module {
    type Err = RuntimeError;
    fn from_str(s: &str) -> Result<Self> {
        let short = s.trim().trim_end_matches("_proj");
        Ok(match short {
            "q" => Module::Q,
            "k" => Module::K,
            "v" => Module::V,
            "o" => Module::O,
            "gate" => Module::Gate,
            "up" => Module::Up,
            "down" => Module::Down,
            _ => {
                return Err(RuntimeError::Invalid(format!(
                    "unknown LoRA target `{s}` (expected one of q,k,v,o,gate,up,down or their *_proj names)"
                )));
            }
        })
    }
}

/// Rank, alpha and the projections that carry adapters.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f32,
    pub targets: Vec<Module>,
}

impl LoraConfig {
    pub fn validate(&self) -> Result<()> {
        if self.rank == 0 {
            return Err(RuntimeError::Invalid(
                "LoRA rank must be at least 1 (got 0)".into(),
            ));
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return Err(RuntimeError::Invalid(format!(
                "LoRA alpha must be positive (got {})",
                self.alpha
            )));
        }
        if self.targets.is_empty() {
            return Err(RuntimeError::Invalid(
                "LoRA needs at least one target module".into(),
            ));
        }
        Ok(())
    }
    pub fn scale(&self) -> f32 {
        self.alpha / self.rank as f32
    }
}

/// Parses a comma-separated target list (`q,k,v,o,gate,up,down` or `all`).
pub fn parse_targets(s: &str) -> Result<Vec<Module>> {
    if s.trim() == "all" {
        return Ok(Module::ALL.to_vec());
    }
    let mut t: Vec<Module> = s.split(',').map(str::parse).collect::<Result<_>>()?;
    t.sort();
    t.dedup();
    Ok(t)
}

/// Index of a trainable tensor in [`Params`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ParamId(pub usize);

/// A trainable f32 tensor.
#[derive(Debug, Clone)]
pub struct Param {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// One adapter: the pair (A, B) on one projection.
#[derive(Debug, Clone)]
pub struct Adapter {
    pub layer: usize,
    pub module: Module,
    /// The frozen weight of the projection in the base graph.
    pub weight: WeightId,
    pub a: ParamId,
    pub b: ParamId,
}

/// An exit head: an RMSNorm of its own (initialised from the model's final norm) and
/// the LM head, shared and frozen unless `head` is set.
#[derive(Debug, Clone)]
pub struct ExitHead {
    pub layer: usize,
    /// `None`: the model's own final norm weight, frozen.
    pub norm: Option<ParamId>,
    /// `None`: the model's LM head, frozen.
    pub head: Option<ParamId>,
}

/// Every trainable parameter of a tuning run: adapters of all layers and the exit heads.
#[derive(Debug, Clone)]
pub struct Params {
    pub lora: LoraConfig,
    pub tensors: Vec<Param>,
    pub adapters: Vec<Adapter>,
    pub exits: Vec<ExitHead>,
}

/// Where the final norm and LM head of a graph are.
#[derive(Debug, Clone, Copy)]
pub struct HeadWeights {
    pub norm: WeightId,
    pub eps: f32,
    pub head: WeightId,
}

/// Finds the final RMSNorm (the node producing `norm.out`) and the LM head (the linear
/// producing the logits) of a LLaMA graph.
pub fn head_weights(g: &Graph) -> Result<HeadWeights> {
    let missing = |what: &str| RuntimeError::InvalidGraph(format!("the graph has no {what}"));
    let (norm, eps) = g
        .nodes
        .iter()
        .find_map(|n| match n.op {
            Op::RmsNorm { weight, eps } if g.values[n.output.0].name == crate::ir::names::FINAL_NORM => {
                Some((weight, eps))
            }
            _ => None,
        })
        .ok_or_else(|| missing("final norm (`norm.out`)"))?;
    let head = g
        .nodes
        .iter()
        .find_map(|n| match n.op {
            Op::Linear { weight } if n.output == g.logits => Some(weight),
            _ => None,
        })
        .ok_or_else(|| missing("LM head producing the logits"))?;
    Ok(HeadWeights { norm, eps, head })
}

impl Params {
    /// Fresh adapters on every layer (A Kaiming-uniform from `seed`, B zero, as PEFT
    /// initialises them) and exit heads at `exits` (norm trainable when `train_norm` and
    /// the exit is not the last layer; head trainable when `train_head`).
    pub fn new(
        g: &Graph,
        lora: LoraConfig,
        exits: &[usize],
        train_norm: bool,
        train_head: bool,
        seed: u64,
    ) -> Result<Params> {
        lora.validate()?;
        let layers = g.config.num_layers;
        let hw = head_weights(g)?;
        let mut rng = StdRng::seed_from_u64(seed);
        let mut p = Params {
            lora: lora.clone(),
            tensors: vec![],
            adapters: vec![],
            exits: vec![],
        };
        for layer in 0..layers {
            for &m in &lora.targets {
                let wname = format!("{}.weight", m.path(layer));
                let weight = g.weight_id(&wname).ok_or_else(|| {
                    RuntimeError::InvalidGraph(format!("no weight `{wname}` for a LoRA adapter"))
                })?;
                let shape = g.weight(weight).shape().to_vec();
                let (out, inp) = (shape[0], shape[1]);
                let bound = 1.0 / (inp as f32).sqrt();
                let a: Vec<f32> = (0..lora.rank * inp)
                    .map(|_| rng.random_range(-bound..bound))
                    .collect();
                let path = m.path(layer);
                let a = p.push(
                    format!("base_model.model.{path}.lora_A.weight"),
                    vec![lora.rank, inp],
                    a,
                );
                let b = p.push(
                    format!("base_model.model.{path}.lora_B.weight"),
                    vec![out, lora.rank],
                    vec![0.0; out * lora.rank],
                );
                p.adapters.push(Adapter {
                    layer,
                    module: m,
                    weight,
                    a,
                    b,
                });
            }
        }
        for &e in exits {
            if e >= layers {
                return Err(RuntimeError::Invalid(format!(
                    "exit layer {e} is out of range: the model has layers 0..{}",
                    layers - 1
                )));
            }
            let norm = (train_norm && e + 1 < layers).then(|| {
                let w = g.weight(hw.norm).data.to_f32_vec();
                p.push(format!("exits.{e}.norm.weight"), vec![w.len()], w)
            });
            let head = train_head.then(|| {
                let w = g.weight(hw.head);
                let shape = w.shape().to_vec();
                p.push(format!("exits.{e}.head.weight"), shape, w.data.to_f32_vec())
            });
            p.exits.push(ExitHead { layer: e, norm, head });
        }
        Ok(p)
    }

    fn push(&mut self, name: String, shape: Vec<usize>, data: Vec<f32>) -> ParamId {
        self.tensors.push(Param { name, shape, data });
        ParamId(self.tensors.len() - 1)
    }

    pub fn get(&self, id: ParamId) -> &Param {
        &self.tensors[id.0]
    }

    /// The adapter of `module` in `layer`, if any.
    pub fn adapter(&self, layer: usize, module: Module) -> Option<&Adapter> {
        self.adapters
            .iter()
            .find(|a| a.layer == layer && a.module == module)
    }

    pub fn exit(&self, layer: usize) -> Option<&ExitHead> {
        self.exits.iter().find(|e| e.layer == layer)
    }

    /// The parameters that train when the window is `layers` (adapters inside it and the
    /// trainable parts of the exit at its top).
    pub fn trainable_in(&self, layers: std::ops::RangeInclusive<usize>) -> Vec<ParamId> {
        let mut ids: Vec<ParamId> = self
            .adapters
            .iter()
            .filter(|a| layers.contains(&a.layer))
            .flat_map(|a| [a.a, a.b])
            .collect();
        if let Some(e) = self.exit(*layers.end()) {
            ids.extend(e.norm);
            ids.extend(e.head);
        }
        ids
    }

    /// Number of trainable numbers in `ids`.
    pub fn count(&self, ids: &[ParamId]) -> usize {
        ids.iter().map(|i| self.tensors[i.0].data.len()).sum()
    }

    /// Maps a tensor name of an adapter file to an adapter tensor. Accepts PEFT's names
    /// (`base_model.model.model.layers.3.mlp.up_proj.lora_A.weight`, with or without the
    /// `.default` adapter name) and the short form `layers.3.up_proj.lora_A`.
    pub fn lookup(&self, name: &str) -> Option<ParamId> {
        let (layer, module, which) = parse_adapter_name(name)?;
        let a = self.adapter(layer, module)?;
        Some(if which == 'A' { a.a } else { a.b })
    }

    /// Loads adapter (and exit) tensors from a safetensors file; every tensor must match a
    /// parameter by name and shape. Returns the file's names in order of the parameters.
    pub fn load_safetensors(&mut self, path: &Path) -> Result<Vec<(String, ParamId)>> {
        let bytes = std::fs::read(path)?;
        let st = safetensors::SafeTensors::deserialize(&bytes)
            .map_err(|e| RuntimeError::Invalid(format!("{}: not a safetensors file: {e}", path.display())))?;
        let mut loaded = vec![];
        for (name, view) in st.tensors() {
            let id = self
                .lookup(&name)
                .or_else(|| self.tensors.iter().position(|p| p.name == name).map(ParamId))
                .ok_or_else(|| {
                    RuntimeError::Invalid(format!(
                        "{}: tensor `{name}` is not a parameter of this tuning setup (LoRA targets {:?}, rank {})",
                        path.display(),
                        self.lora.targets,
                        self.lora.rank
                    ))
                })?;
            let p = &mut self.tensors[id.0];
            if view.shape() != p.shape.as_slice() {
                return Err(RuntimeError::Invalid(format!(
                    "{}: tensor `{name}` has shape {:?}, expected {:?}",
                    path.display(),
                    view.shape(),
                    p.shape
                )));
            }
            if view.dtype() != safetensors::Dtype::F32 {
                return Err(RuntimeError::Invalid(format!(
                    "{}: tensor `{name}` is {:?}, expected F32",
                    path.display(),
                    view.dtype()
                )));
            }
            p.data = view
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            loaded.push((name.to_string(), id));
        }
        loaded.sort_by_key(|(_, id)| *id);
        Ok(loaded)
    }

    /// Writes the adapters as PEFT does (`adapter_model.safetensors` with PEFT's tensor
    /// names, `adapter_config.json`), plus `exit_heads.safetensors` for trained exit
    /// norms/heads (an Edge-LLM addition PEFT ignores). Files are written to temporary
    /// names and renamed, so a crash never leaves a half-written adapter.
    pub fn save_peft(&self, dir: &Path, base_model: &str) -> Result<()> {
        std::fs::create_dir_all(dir)?;
        let adapters: Vec<ParamId> = self.adapters.iter().flat_map(|a| [a.a, a.b]).collect();
        self.write_safetensors(&dir.join("adapter_model.safetensors"), &adapters)?;
        let exits: Vec<ParamId> = self
            .exits
            .iter()
            .flat_map(|e| e.norm.into_iter().chain(e.head))
            .collect();
        if !exits.is_empty() {
            self.write_safetensors(&dir.join("exit_heads.safetensors"), &exits)?;
        }
        let mut targets: Vec<&str> = self.lora.targets.iter().map(|m| m.peft_name()).collect();
        targets.sort();
        let config = serde_json::json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "r": self.lora.rank,
            "lora_alpha": self.lora.alpha,
            "lora_dropout": 0.0,
            "bias": "none",
            "target_modules": targets,
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_lora_weights": true,
            "use_rslora": false,
            "use_dora": false,
            "layers_to_transform": null,
            "modules_to_save": null,
            "edge_llm": {
                "exits": self.exits.iter().map(|e| e.layer).collect::<Vec<_>>(),
            },
        });
        write_atomic(
            &dir.join("adapter_config.json"),
            serde_json::to_string_pretty(&config).expect("json").as_bytes(),
        )
    }

    /// Writes `ids` to a safetensors file under their own names.
    pub fn write_safetensors(&self, path: &Path, ids: &[ParamId]) -> Result<()> {
        let named: Vec<(String, &[f32], &[usize])> = ids
            .iter()
            .map(|i| {
                let p = &self.tensors[i.0];
                (p.name.clone(), p.data.as_slice(), p.shape.as_slice())
            })
            .collect();
        write_f32_safetensors(path, &named, None)
    }
}

/// Writes f32 tensors `(name, data, shape)` as a safetensors file, atomically.
pub fn write_f32_safetensors(
    path: &Path,
    tensors: &[(String, &[f32], &[usize])],
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(n, d, s)| {
            let v = TensorView::new(safetensors::Dtype::F32, s.to_vec(), bytemuck::cast_slice(d))
                .map_err(|e| RuntimeError::Invalid(format!("tensor `{n}`: {e}")))?;
            Ok((n.clone(), v))
        })
        .collect::<Result<_>>()?;
    let bytes = safetensors::serialize(views, metadata)
        .map_err(|e| RuntimeError::Invalid(format!("{}: {e}", path.display())))?;
    write_atomic(path, &bytes)
}

/// Writes `bytes` to `path` through a temporary file in the same directory, fsynced and
/// renamed, so readers see the old file or the new one, never a mix.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// `(layer, module, 'A' | 'B')` of an adapter tensor name (see [`Params::lookup`]).
pub fn parse_adapter_name(name: &str) -> Option<(usize, Module, char)> {
    let rest = name.split("layers.").nth(1)?;
    let mut parts = rest.split('.');
    let layer: usize = parts.next()?.parse().ok()?;
    let parts: Vec<&str> = parts.collect();
    let module = parts
        .iter()
        .find_map(|p| p.parse::<Module>().ok().filter(|_| p.ends_with("_proj")))?;
    let which = parts.iter().find_map(|p| match *p {
        "lora_A" => Some('A'),
        "lora_B" => Some('B'),
        _ => None,
    })?;
    Some((layer, module, which))
}

/// f32 tensors by name: `(shape, values)`.
pub type F32Tensors = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

/// Reads every f32 tensor of a safetensors file (small files: adapters, gradients).
pub fn read_f32_safetensors(path: &Path) -> Result<F32Tensors> {
    let bytes = std::fs::read(path)?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| RuntimeError::Invalid(format!("{}: not a safetensors file: {e}", path.display())))?;
    let mut out = BTreeMap::new();
    for (name, v) in st.tensors() {
        if v.dtype() != safetensors::Dtype::F32 {
            continue;
        }
        let data = v
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        out.insert(name.to_string(), (v.shape().to_vec(), data));
    }
    Ok(out)
}

impl Params {
    /// Loads adapters saved by [`Params::save_peft`] (or by PEFT itself) for graph `g`:
    /// rank, alpha and targets from `adapter_config.json`, tensors from
    /// `adapter_model.safetensors`, exit heads (if any) from `exit_heads.safetensors`.
    pub fn load_peft_dir(g: &Graph, dir: &Path) -> Result<Params> {
        let bad = |m: String| RuntimeError::Invalid(format!("{}: {m}", dir.display()));
        let cfg_path = dir.join("adapter_config.json");
        let text =
            std::fs::read_to_string(&cfg_path).map_err(|e| bad(format!("adapter_config.json: {e}")))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| bad(format!("adapter_config.json is not JSON: {e}")))?;
        let rank = v["r"]
            .as_u64()
            .ok_or_else(|| bad("adapter_config.json has no integer `r`".into()))? as usize;
        let alpha = v["lora_alpha"]
            .as_f64()
            .ok_or_else(|| bad("adapter_config.json has no `lora_alpha`".into()))?;
        let targets = match &v["target_modules"] {
            serde_json::Value::Array(a) => a
                .iter()
                .map(|t| t.as_str().unwrap_or("").parse::<Module>())
                .collect::<Result<Vec<_>>>()?,
            serde_json::Value::String(s) => parse_targets(s)?,
            _ => return Err(bad("adapter_config.json has no `target_modules`".into())),
        };
        let exits: Vec<usize> = v["edge_llm"]["exits"]
            .as_array()
            .map(|a| a.iter().filter_map(|x| x.as_u64().map(|x| x as usize)).collect())
            .unwrap_or_default();
        let exit_file = dir.join("exit_heads.safetensors");
        let (mut has_norm, mut has_head) = (false, false);
        if exit_file.exists() {
            for name in read_f32_safetensors(&exit_file)?.keys() {
                has_norm |= name.ends_with(".norm.weight");
                has_head |= name.ends_with(".head.weight");
            }
        }
        let lora = LoraConfig {
            rank,
            alpha: alpha as f32,
            targets,
        };
        let mut p = Params::new(g, lora, &exits, has_norm, has_head, 0)?;
        p.load_safetensors(&dir.join("adapter_model.safetensors"))?;
        if exit_file.exists() {
            p.load_safetensors(&exit_file)?;
        }
        Ok(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adapter_names_in_both_layouts_parse() {
        assert_eq!(
            parse_adapter_name("base_model.model.model.layers.3.mlp.up_proj.lora_A.weight"),
            Some((3, Module::Up, 'A'))
        );
        assert_eq!(
            parse_adapter_name("base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight"),
            Some((0, Module::Q, 'B'))
        );
        assert_eq!(
            parse_adapter_name("layers.12.down_proj.lora_B"),
            Some((12, Module::Down, 'B'))
        );
        assert_eq!(parse_adapter_name("layers.1.down_proj.weight"), None);
        assert!(parse_targets("q,k,nope").is_err());
        assert_eq!(parse_targets("all").unwrap().len(), 7);
    }
}
