//! The truncated training graph: a pass from the forward IR ([`Graph`]) and the
//! trainable parameters ([`Params`]) to the graph one tuning step runs for a window of
//! layers:
//!
//! 1. **prefix** — embedding and the layers below the window, forward only: nothing is
//!    saved and no gradient reaches them (their output is fixed within a phase, so it can
//!    be cached per sample and the prefix skipped);
//! 2. **window** — the window's layers with LoRA on the targeted projections, then the
//!    exit head (its RMSNorm and the LM head) and the loss; the values the backward reads
//!    stay alive;
//! 3. **backward** — the vector-Jacobian product of every window op, in reverse order,
//!    only where a gradient can flow (values that depend on a trainable parameter), with
//!    gradient sums where a value has several consumers;
//! 4. **update** — the optimizer step of the window's parameters.
//!
//! Nothing above the exit is in the graph at all. [`TrainGraph::verify`] checks it and
//! its `Display` is what `edgec inspect --train` prints.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::ops::{Range, RangeInclusive};

use super::lora::{Module, ParamId, Params, head_weights};
use crate::error::{Result, RuntimeError};
use crate::ir::{Graph, Op, ValueId, WeightId, names};

/// A value of the training graph.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TVal(pub usize);

#[derive(Debug, Clone)]
pub struct TValue {
    pub name: String,
    /// Numbers per token row (1 for the loss).
    pub width: usize,
}

/// A weight the op reads: a frozen one of the base graph or a trainable parameter.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum WeightRef {
    Frozen(WeightId),
    Param(ParamId),
}

#[derive(Debug, Clone, PartialEq)]
pub enum TOp {
    // Forward.
    Embedding {
        table: WeightId,
    },
    RmsNorm {
        weight: WeightRef,
        eps: f32,
    },
    Linear {
        weight: WeightId,
    },
    LoraDown {
        a: ParamId,
        rank: usize,
    },
    LoraUp {
        b: ParamId,
        rank: usize,
        scale: f32,
    },
    Rope {
        heads: usize,
        head_dim: usize,
        theta: f32,
    },
    Attention {
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
    },
    SwiGlu,
    Add,
    /// Logits of the exit head, shifted cross-entropy, and its gradient in one pass over
    /// row chunks (the `[rows, vocab]` logits are never held whole). Outputs: the loss
    /// (width 1) and `d loss / d input`.
    ExitLoss {
        head: WeightRef,
    },
    // Backward (vector-Jacobian products).
    RmsNormBack {
        weight: WeightRef,
        eps: f32,
        need_dx: bool,
    },
    LinearBack {
        weight: WeightId,
    },
    LoraDownBack {
        a: ParamId,
        rank: usize,
        need_dx: bool,
    },
    LoraUpBack {
        b: ParamId,
        rank: usize,
        scale: f32,
    },
    RopeBack {
        heads: usize,
        head_dim: usize,
        theta: f32,
    },
    AttentionBack {
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
    },
    SwiGluBack,
    /// Sum of gradient contributions.
    GradSum,
}

impl TOp {
    pub fn name(&self) -> &'static str {
        match self {
            TOp::Embedding { .. } => "Embedding",
            TOp::RmsNorm { .. } => "RmsNorm",
            TOp::Linear { .. } => "Linear",
            TOp::LoraDown { .. } => "LoraDown",
            TOp::LoraUp { .. } => "LoraUp",
            TOp::Rope { .. } => "Rope",
            TOp::Attention { .. } => "Attention",
            TOp::SwiGlu => "SwiGlu",
            TOp::Add => "Add",
            TOp::ExitLoss { .. } => "ExitLoss",
            TOp::RmsNormBack { .. } => "RmsNormBack",
            TOp::LinearBack { .. } => "LinearBack",
            TOp::LoraDownBack { .. } => "LoraDownBack",
            TOp::LoraUpBack { .. } => "LoraUpBack",
            TOp::RopeBack { .. } => "RopeBack",
            TOp::AttentionBack { .. } => "AttentionBack",
            TOp::SwiGluBack => "SwiGluBack",
            TOp::GradSum => "GradSum",
        }
    }
}

#[derive(Debug, Clone)]
pub struct TNode {
    pub name: String,
    pub op: TOp,
    pub inputs: Vec<TVal>,
    pub outputs: Vec<TVal>,
}

/// Which layers a step trains and where its loss is taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowSpec {
    /// Layers whose adapters train; the backward goes down to the first.
    pub layers: RangeInclusive<usize>,
    /// The exit layer (the window's last layer).
    pub exit: usize,
    /// Keep only each window layer's input through the forward and recompute the layer's
    /// activations just before its backward (activation memory of one layer instead of
    /// the whole window, for one more forward of the window).
    pub recompute: bool,
}

impl WindowSpec {
    pub fn new(layers: RangeInclusive<usize>, exit: usize, num_layers: usize) -> Result<Self> {
        if layers.is_empty() || *layers.end() >= num_layers {
            return Err(RuntimeError::Invalid(format!(
                "window {}..={} is empty or outside the model's layers 0..{}",
                layers.start(),
                layers.end(),
                num_layers - 1
            )));
        }
        if exit != *layers.end() {
            return Err(RuntimeError::Invalid(format!(
                "the window {}..={} must end at its exit layer {exit}",
                layers.start(),
                layers.end()
            )));
        }
        Ok(WindowSpec {
            layers,
            exit,
            recompute: false,
        })
    }

    /// The same window with recomputation on or off.
    pub fn with_recompute(mut self, on: bool) -> Self {
        self.recompute = on;
        self
    }
}

/// The graph of one tuning step (see the module docs).
#[derive(Debug, Clone)]
pub struct TrainGraph {
    pub window: WindowSpec,
    pub values: Vec<TValue>,
    pub nodes: Vec<TNode>,
    /// Node ranges of the sections.
    pub prefix: Range<usize>,
    pub forward: Range<usize>,
    pub backward: Range<usize>,
    /// The residual stream entering the window (the prefix's output).
    pub window_input: TVal,
    pub loss: TVal,
    /// Parameters the step updates, in order.
    pub updates: Vec<ParamId>,
    /// For each value, the index of the last node reading it.
    pub last_use: Vec<usize>,
}

struct Builder {
    values: Vec<TValue>,
    nodes: Vec<TNode>,
}

impl Builder {
    fn value(&mut self, name: String, width: usize) -> TVal {
        self.values.push(TValue { name, width });
        TVal(self.values.len() - 1)
    }
    fn node(&mut self, name: String, op: TOp, inputs: Vec<TVal>, outputs: Vec<TVal>) {
        self.nodes.push(TNode {
            name,
            op,
            inputs,
            outputs,
        });
    }
    fn unary(&mut self, name: String, op: TOp, inputs: Vec<TVal>, width: usize) -> TVal {
        let out = self.value(name.clone(), width);
        self.node(name, op, inputs, vec![out]);
        out
    }
}

fn module_of(g: &Graph, w: WeightId) -> Option<(usize, Module)> {
    let name = &g.weight(w).name;
    let rest = name.strip_prefix("model.layers.")?;
    let layer: usize = rest.split('.').next()?.parse().ok()?;
    Module::ALL
        .into_iter()
        .find(|m| name == &format!("{}.weight", m.path(layer)))
        .map(|m| (layer, m))
}

impl TrainGraph {
    /// Builds the training graph of `window` (the pass). The adapters of every layer up
    /// to the exit are applied; only those inside the window (and the exit's trainable
    /// norm/head) receive gradients.
    pub fn build(g: &Graph, params: &Params, window: WindowSpec) -> Result<TrainGraph> {
        g.verify()?;
        let layers = g.config.num_layers;
        let recompute = window.recompute;
        let window = WindowSpec::new(window.layers, window.exit, layers)?.with_recompute(recompute);
        let hw = head_weights(g)?;
        let exit = params.exit(window.exit);
        let trainable: HashSet<ParamId> = params.trainable_in(window.layers.clone()).into_iter().collect();
        let scale = params.lora.scale();
        let rank = params.lora.rank;

        let mut b = Builder {
            values: vec![],
            nodes: vec![],
        };
        // Forward: embedding, then layers 0..=exit.
        let mut map: HashMap<ValueId, TVal> = HashMap::new();
        let mut needs_grad: HashSet<TVal> = HashSet::new();
        let first_window = *window.layers.start();
        let mut window_input = None;
        let mut prefix_end = 0;
        let last = g
            .layer_span(window.exit)
            .ok_or_else(|| RuntimeError::InvalidGraph(format!("layer {} has no nodes", window.exit)))?;
        let first_span = g
            .layer_span(first_window)
            .ok_or_else(|| RuntimeError::InvalidGraph(format!("layer {first_window} has no nodes")))?;
        for (idx, node) in g.nodes[..last.end].iter().enumerate() {
            if idx == first_span.start {
                let input = node.inputs[0];
                window_input = Some(map[&input]);
                prefix_end = b.nodes.len();
            }
            let ins: Vec<TVal> = node.inputs.iter().map(|v| map[v]).collect();
            let grad_in = ins.iter().any(|v| needs_grad.contains(v));
            let width = g.values[node.output.0].width;
            let name = g.values[node.output.0].name.clone();
            let out = match &node.op {
                Op::Embedding { table } => b.unary(name, TOp::Embedding { table: *table }, ins, width),
                Op::RmsNorm { weight, eps } => b.unary(
                    name,
                    TOp::RmsNorm {
                        weight: WeightRef::Frozen(*weight),
                        eps: *eps,
                    },
                    ins,
                    width,
                ),
                Op::Linear { weight } => {
                    let base = b.unary(name.clone(), TOp::Linear { weight: *weight }, ins.clone(), width);
                    let adapter = module_of(g, *weight).and_then(|(l, m)| params.adapter(l, m));
                    match adapter {
                        None => base,
                        Some(ad) => {
                            let h = b.unary(
                                format!("{name}.lora_a"),
                                TOp::LoraDown { a: ad.a, rank },
                                ins,
                                rank,
                            );
                            let t = b.unary(
                                format!("{name}.lora_b"),
                                TOp::LoraUp { b: ad.b, rank, scale },
                                vec![h],
                                width,
                            );
                            if trainable.contains(&ad.a) || grad_in {
                                needs_grad.extend([h, t]);
                            }
                            if grad_in {
                                needs_grad.insert(base);
                            }
                            let y = b.unary(format!("{name}.lora"), TOp::Add, vec![base, t], width);
                            if grad_in || trainable.contains(&ad.a) {
                                needs_grad.insert(y);
                            }
                            map.insert(node.output, y);
                            continue;
                        }
                    }
                }
                Op::Rope {
                    heads,
                    head_dim,
                    theta,
                } => b.unary(
                    name,
                    TOp::Rope {
                        heads: *heads,
                        head_dim: *head_dim,
                        theta: *theta,
                    },
                    ins,
                    width,
                ),
                Op::Attention {
                    heads,
                    kv_heads,
                    head_dim,
                    ..
                } => b.unary(
                    name,
                    TOp::Attention {
                        heads: *heads,
                        kv_heads: *kv_heads,
                        head_dim: *head_dim,
                    },
                    ins,
                    width,
                ),
                Op::SwiGlu => b.unary(name, TOp::SwiGlu, ins, width),
                Op::Add => b.unary(name, TOp::Add, ins, width),
                Op::OutputRows => {
                    return Err(RuntimeError::InvalidGraph(format!(
                        "node `{}`: OutputRows inside the decoder layers",
                        node.name
                    )));
                }
            };
            if grad_in {
                needs_grad.insert(out);
            }
            map.insert(node.output, out);
        }
        let window_input = window_input.expect("the window's first layer has nodes");
        // Exit head: norm (own or the model's) and the fused head + loss.
        let h_exit = map[&g
            .value_id(&names::layer_out(window.exit))
            .expect("verified graph")];
        let norm_w = match exit.and_then(|e| e.norm) {
            Some(p) => WeightRef::Param(p),
            None => WeightRef::Frozen(hw.norm),
        };
        let d = g.config.hidden_size;
        let xn = b.unary(
            format!("exit.{}.norm", window.exit),
            TOp::RmsNorm {
                weight: norm_w,
                eps: hw.eps,
            },
            vec![h_exit],
            d,
        );
        if needs_grad.contains(&h_exit) {
            needs_grad.insert(xn);
        }
        let head_w = match exit.and_then(|e| e.head) {
            Some(p) => WeightRef::Param(p),
            None => WeightRef::Frozen(hw.head),
        };
        let loss = b.value(format!("exit.{}.loss", window.exit), 1);
        let dxn = b.value(format!("grad(exit.{}.norm)", window.exit), d);
        b.node(
            format!("exit.{}.loss", window.exit),
            TOp::ExitLoss { head: head_w },
            vec![xn],
            vec![loss, dxn],
        );
        let forward = prefix_end..b.nodes.len();

        // Backward: reverse over the window's forward nodes.
        let mut contrib: HashMap<TVal, Vec<TVal>> = HashMap::new();
        contrib.insert(xn, vec![dxn]);
        let fwd_nodes: Vec<TNode> = b.nodes[forward.start..forward.end - 1].to_vec();
        let is_param = |w: &WeightRef| matches!(w, WeightRef::Param(p) if trainable.contains(p));
        let layer_of =
            |n: &TNode| -> Option<usize> { n.name.strip_prefix("layers.")?.split('.').next()?.parse().ok() };
        // Recomputed copies of forward values (recompute mode), by original value.
        let mut again: HashMap<TVal, TVal> = HashMap::new();
        let mut recomputed_layer: Option<usize> = None;
        for node in fwd_nodes.iter().rev() {
            let out = node.outputs[0];
            let Some(parts) = contrib.remove(&out) else {
                continue;
            };
            let layer = layer_of(node);
            if window.recompute && layer.is_some() && layer != recomputed_layer {
                // Re-run this layer's forward from its (kept) input before its backward.
                recomputed_layer = layer;
                for f in fwd_nodes.iter().filter(|f| layer_of(f) == layer) {
                    let ins: Vec<TVal> = f.inputs.iter().map(|v| *again.get(v).unwrap_or(v)).collect();
                    let outs: Vec<TVal> = f
                        .outputs
                        .iter()
                        .map(|o| {
                            let (n, w) = (format!("{}'", b.values[o.0].name), b.values[o.0].width);
                            b.value(n, w)
                        })
                        .collect();
                    b.node(format!("recompute {}", f.name), f.op.clone(), ins, outs.clone());
                    for (o, n) in f.outputs.iter().zip(outs) {
                        again.insert(*o, n);
                    }
                }
            }
            // A saved forward value, or its recomputed copy.
            let r = |v: TVal| *again.get(&v).unwrap_or(&v);
            // The gradient of `out`: the sum of its consumers' contributions.
            let mut dy = parts[0];
            for &p in &parts[1..] {
                let w = b.values[out.0].width;
                dy = b.unary(
                    format!("grad({})", b.values[out.0].name),
                    TOp::GradSum,
                    vec![dy, p],
                    w,
                );
            }
            let wants = |v: &TVal| needs_grad.contains(v);
            let gname = |b: &Builder, v: TVal| format!("grad({})", b.values[v.0].name);
            let mut give = |v: TVal, g: TVal| contrib.entry(v).or_default().push(g);
            let x = node.inputs.first().copied();
            match &node.op {
                TOp::RmsNorm { weight, eps } => {
                    let x = x.expect("norm input");
                    let need_dx = wants(&x);
                    if !need_dx && !is_param(weight) {
                        continue;
                    }
                    let op = TOp::RmsNormBack {
                        weight: *weight,
                        eps: *eps,
                        need_dx,
                    };
                    if need_dx {
                        let dx = b.unary(gname(&b, x), op, vec![r(x), dy], b.values[x.0].width);
                        give(x, dx);
                    } else {
                        b.node(format!("grad({}).weight", node.name), op, vec![r(x), dy], vec![]);
                    }
                }
                TOp::Linear { weight } => {
                    let x = x.expect("linear input");
                    if wants(&x) {
                        let dx = b.unary(
                            gname(&b, x),
                            TOp::LinearBack { weight: *weight },
                            vec![dy],
                            b.values[x.0].width,
                        );
                        give(x, dx);
                    }
                }
                TOp::LoraUp { b: bp, rank, scale } => {
                    let h = x.expect("lora input");
                    if !trainable.contains(bp) && !wants(&h) {
                        continue;
                    }
                    let dh = b.unary(
                        gname(&b, h),
                        TOp::LoraUpBack {
                            b: *bp,
                            rank: *rank,
                            scale: *scale,
                        },
                        vec![r(h), dy],
                        *rank,
                    );
                    give(h, dh);
                }
                TOp::LoraDown { a, rank } => {
                    let x = x.expect("lora input");
                    let need_dx = wants(&x);
                    let op = TOp::LoraDownBack {
                        a: *a,
                        rank: *rank,
                        need_dx,
                    };
                    if need_dx {
                        let dx = b.unary(gname(&b, x), op, vec![r(x), dy], b.values[x.0].width);
                        give(x, dx);
                    } else {
                        b.node(format!("grad({}).A", node.name), op, vec![r(x), dy], vec![]);
                    }
                }
                TOp::Rope {
                    heads,
                    head_dim,
                    theta,
                } => {
                    let x = x.expect("rope input");
                    if wants(&x) {
                        let op = TOp::RopeBack {
                            heads: *heads,
                            head_dim: *head_dim,
                            theta: *theta,
                        };
                        let dx = b.unary(gname(&b, x), op, vec![dy], b.values[x.0].width);
                        give(x, dx);
                    }
                }
                TOp::Attention {
                    heads,
                    kv_heads,
                    head_dim,
                } => {
                    let (q, k, v) = (node.inputs[0], node.inputs[1], node.inputs[2]);
                    if !(wants(&q) || wants(&k) || wants(&v)) {
                        continue;
                    }
                    let outs: Vec<TVal> = [q, k, v]
                        .iter()
                        .map(|&i| {
                            let n = gname(&b, i);
                            let w = b.values[i.0].width;
                            b.value(n, w)
                        })
                        .collect();
                    b.node(
                        format!("grad({})", node.name),
                        TOp::AttentionBack {
                            heads: *heads,
                            kv_heads: *kv_heads,
                            head_dim: *head_dim,
                        },
                        vec![r(q), r(k), r(v), dy],
                        outs.clone(),
                    );
                    for (i, o) in [q, k, v].into_iter().zip(outs) {
                        if wants(&i) {
                            give(i, o);
                        }
                    }
                }
                TOp::SwiGlu => {
                    let (gate, up) = (node.inputs[0], node.inputs[1]);
                    if !(wants(&gate) || wants(&up)) {
                        continue;
                    }
                    let dg = b.value(gname(&b, gate), b.values[gate.0].width);
                    let du = b.value(gname(&b, up), b.values[up.0].width);
                    b.node(
                        format!("grad({})", node.name),
                        TOp::SwiGluBack,
                        vec![r(gate), r(up), dy],
                        vec![dg, du],
                    );
                    if wants(&gate) {
                        give(gate, dg);
                    }
                    if wants(&up) {
                        give(up, du);
                    }
                }
                TOp::Add => {
                    for &i in &node.inputs {
                        if wants(&i) {
                            give(i, dy);
                        }
                    }
                }
                op => {
                    return Err(RuntimeError::InvalidGraph(format!(
                        "no gradient rule for `{}` ({}) inside the window",
                        node.name,
                        op.name()
                    )));
                }
            }
        }
        let backward = forward.end..b.nodes.len();
        let mut updates: Vec<ParamId> = trainable.into_iter().collect();
        updates.sort();
        let mut last_use = vec![0usize; b.values.len()];
        for (i, n) in b.nodes.iter().enumerate() {
            for v in &n.inputs {
                last_use[v.0] = i;
            }
        }
        let tg = TrainGraph {
            window,
            values: b.values,
            nodes: b.nodes,
            prefix: 0..prefix_end,
            forward,
            backward,
            window_input,
            loss,
            updates,
            last_use,
        };
        tg.verify()?;
        Ok(tg)
    }

    /// Checks the graph: every value defined once before it is read, sections in order,
    /// the window input produced by the prefix (or the embedding), the loss by the window.
    pub fn verify(&self) -> Result<()> {
        let bad = |m: String| Err(RuntimeError::InvalidGraph(format!("training graph: {m}")));
        let mut defined = vec![false; self.values.len()];
        for (i, n) in self.nodes.iter().enumerate() {
            for v in &n.inputs {
                if v.0 >= self.values.len() || !defined[v.0] {
                    return bad(format!(
                        "node {i} `{}` reads a value not defined before it",
                        n.name
                    ));
                }
            }
            for v in &n.outputs {
                if v.0 >= self.values.len() || defined[v.0] {
                    return bad(format!("node {i} `{}` redefines or names a bad value", n.name));
                }
                defined[v.0] = true;
            }
            let section_ok = if self.backward.contains(&i) {
                n.op.name().ends_with("Back") || n.op == TOp::GradSum || n.name.starts_with("recompute ")
            } else {
                !n.op.name().ends_with("Back") && n.op != TOp::GradSum
            };
            if !section_ok {
                return bad(format!(
                    "node {i} `{}` ({}) is in the wrong section",
                    n.name,
                    n.op.name()
                ));
            }
        }
        if self.prefix.end != self.forward.start || self.forward.end != self.backward.start {
            return bad("sections are not contiguous".into());
        }
        if self.backward.end != self.nodes.len() {
            return bad("nodes after the backward section".into());
        }
        if !defined.get(self.loss.0).copied().unwrap_or(false) {
            return bad("the loss is not computed".into());
        }
        Ok(())
    }

    /// Values the backward reads that the forward produced: what a step keeps alive.
    pub fn saved_values(&self) -> Vec<TVal> {
        let fwd: HashSet<TVal> = self.nodes[self.forward.clone()]
            .iter()
            .flat_map(|n| n.outputs.clone())
            .collect();
        let mut saved: Vec<TVal> = self.nodes[self.backward.clone()]
            .iter()
            .flat_map(|n| n.inputs.clone())
            .filter(|v| fwd.contains(v) || *v == self.window_input)
            .collect();
        saved.sort();
        saved.dedup();
        saved
    }
}

impl fmt::Display for TrainGraph {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let w = &self.window;
        writeln!(
            f,
            "training graph: window layers {}..={}, loss at exit {}; {} nodes ({} prefix, {} forward, {} backward), {} parameters updated, {} saved activations",
            w.layers.start(),
            w.layers.end(),
            w.exit,
            self.nodes.len(),
            self.prefix.len(),
            self.forward.len(),
            self.backward.len(),
            self.updates.len(),
            self.saved_values().len()
        )?;
        let show = |v: &[TVal]| {
            v.iter()
                .map(|v| format!("%{}", self.values[v.0].name))
                .collect::<Vec<_>>()
                .join(", ")
        };
        for (title, range) in [
            ("prefix (forward, no grad)", &self.prefix),
            ("window (forward, saved for backward)", &self.forward),
            ("backward", &self.backward),
        ] {
            writeln!(f, "  {title}:")?;
            for n in &self.nodes[range.clone()] {
                writeln!(
                    f,
                    "    {} = {}({})",
                    show(&n.outputs),
                    n.op.name(),
                    show(&n.inputs)
                )?;
            }
        }
        writeln!(f, "  update (AdamW): {} tensors", self.updates.len())
    }
}
