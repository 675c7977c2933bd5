//! The runtime following the scheduling pass's plan on the tiny-llama fixture: the arena
//! and the order (same logits to the bit, no two live values sharing bytes, a plan unlike
//! the graph refused naming the node), and a bundle built with a plan runs through it.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use edge_runtime::bundle::{Bundle, TrustPolicy};
use edge_runtime::exec::Follow;
use edge_runtime::ir::{Graph, Op};
use edge_runtime::plan::{Arena, ExecPlan, lifetimes};
use edge_runtime::{Executor, Rows};
use edgec::frontend::{LoadOptions, load};
use edgec::schedule::{self, Options};
use edgec::target;

const CTX: usize = 32;

fn fixture_graph() -> Graph {
    load(&common::tiny_llama(), &LoadOptions::default())
        .unwrap()
        .graph
}

fn host() -> target::Target {
    target::resolve("host", Some(&common::repo().join("targets"))).unwrap()
}

/// The fixture's graph and its plan as a bundle carries it (JSON), read back by the runtime.
fn planned() -> (Arc<Graph>, ExecPlan) {
    let (g, plan) = schedule::schedule(fixture_graph(), &host(), &Options::for_context(CTX)).unwrap();
    let plan = ExecPlan::from_json(&serde_json::to_string(&plan).unwrap()).unwrap();
    (Arc::new(g), plan)
}

const MEMORY: Follow = Follow {
    memory: true,
    kernels: false,
};

fn tokens(n: usize, seed: u32) -> Vec<u32> {
    (0..n as u32).map(|i| (i * 37 + seed * 11 + 1) % 256).collect()
}

/// Logits of the steps a runtime command takes: an evaluation chunk (the plan's own step:
/// the whole context, logits of its second half), a prefill with every row's logits (more
/// output rows than planned: those values are allocated), and decoding after a prefill.
fn steps(e: &Executor) -> Vec<Vec<f32>> {
    let mut out = vec![];
    let mut s = e.session(CTX);
    let t = tokens(CTX, 1);
    out.push(
        e.forward(&mut s, &t, Rows::Range(CTX / 2..CTX), &[])
            .unwrap()
            .logits,
    );
    s.reset();
    out.push(e.forward(&mut s, &t[..20], Rows::All, &[]).unwrap().logits);
    for &tok in &t[20..24] {
        out.push(e.forward(&mut s, &[tok], Rows::Last, &[]).unwrap().logits);
    }
    // A tapped hidden state is copied out of the arena.
    s.reset();
    let tap = e.graph().value_id("layers.0.out").unwrap();
    let o = e.forward(&mut s, &t[..8], Rows::Last, &[tap]).unwrap();
    out.push(o.taps[0].clone());
    out.push(o.logits);
    out
}

fn assert_bit_identical(a: &[Vec<f32>], b: &[Vec<f32>]) {
    assert_eq!(a.len(), b.len());
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert_eq!(x.len(), y.len(), "step {i}");
        assert!(
            x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits()),
            "step {i}: the logits differ"
        );
    }
}

fn assert_close(a: &[Vec<f32>], b: &[Vec<f32>]) {
    for (x, y) in a.iter().zip(b) {
        assert_eq!(x.len(), y.len());
        for (p, q) in x.iter().zip(y) {
            assert!((p - q).abs() <= 1e-5 * (1.0 + p.abs()), "{p} vs {q}");
        }
    }
}

#[test]
fn following_the_arena_gives_bit_identical_logits() {
    let (g, plan) = planned();
    assert!(plan.uncovered(&g).is_empty(), "the plan places every value");
    let free = Executor::new(g.clone()).unwrap();
    let arena = Executor::new(g.clone())
        .unwrap()
        .with_plan(&plan, MEMORY)
        .unwrap();
    assert_eq!(arena.arena_bytes() as u64, plan.arena.size.div_ceil(4) * 4);
    assert!(arena.arena_slots().iter().flatten().count() > 0);
    assert_bit_identical(&steps(&free), &steps(&arena));
    // Following everything (tiles and threads too) gives the same numbers within rounding.
    let all = Executor::new(g).unwrap().with_plan(&plan, Follow::ALL).unwrap();
    assert_close(&steps(&free), &steps(&all));
}

/// Pairs of values live at the same step whose byte ranges in the executor's arena overlap.
fn live_overlaps(g: &Graph, order: &[usize], slots: &[Option<(usize, usize)>]) -> Vec<(usize, usize)> {
    let life = lifetimes(g, order);
    let mut bad = vec![];
    for a in 0..slots.len() {
        for b in a + 1..slots.len() {
            let (Some((oa, ca)), Some((ob, cb))) = (slots[a], slots[b]) else {
                continue;
            };
            let (Some(la), Some(lb)) = (life[a], life[b]) else {
                continue;
            };
            if la.0 <= lb.1 && lb.0 <= la.1 && oa < ob + cb && ob < oa + ca {
                bad.push((a, b));
            }
        }
    }
    bad
}

/// The error of an executor given `plan`.
fn refused(g: &Arc<Graph>, plan: &ExecPlan) -> String {
    match Executor::new(g.clone()).unwrap().with_plan(plan, MEMORY) {
        Ok(_) => panic!("the plan was accepted"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn arena_buffers_never_overlap_while_live() {
    let (g, plan) = planned();
    let e = Executor::new(g.clone())
        .unwrap()
        .with_plan(&plan, MEMORY)
        .unwrap();
    let slots = e.arena_slots();
    assert!(live_overlaps(&g, &plan.order(), &slots).is_empty());
    // Every placed value fits the arena and is aligned, and the plan shares bytes.
    for (off, cap) in slots.iter().flatten() {
        assert!(off % 64 == 0 && off + cap <= e.arena_bytes());
    }
    assert!(plan.arena.size < plan.arena.unshared);
    // The check can fail: a buffer moved onto a live neighbour is seen, and the runtime
    // refuses such a plan.
    let mut bad = plan.clone();
    let b = bad
        .arena
        .buffers
        .iter()
        .position(|b| b.offset > 0 && b.first < b.last)
        .unwrap();
    bad.arena.buffers[b].offset = 0;
    let mut moved = slots.clone();
    let v = bad.arena.buffers[b].value;
    moved[v] = Some((0, moved[v].unwrap().1));
    assert!(!live_overlaps(&g, &plan.order(), &moved).is_empty());
    let err = refused(&g, &bad);
    assert!(err.contains("live together"), "{err}");
}

#[test]
fn the_executor_runs_the_plans_order() {
    let (g, plan) = planned();
    // Layer 0's k and v projections before its q projection: another valid order, with
    // the arena planned for it, gives the same logits.
    let pos = |name: &str| plan.ops.iter().position(|p| p.name == name).unwrap();
    let (q, k, v) = (pos("layers.0.q"), pos("layers.0.k"), pos("layers.0.v"));
    assert!(q < k && k < v);
    let mut swapped = plan.clone();
    let moved = swapped.ops.remove(q);
    swapped.ops.insert(v, moved);
    swapped.arena = Arena::for_graph(&g, &swapped.workload, &swapped.order());
    assert_ne!(swapped.order(), plan.order());
    let free = Executor::new(g.clone()).unwrap();
    let e = Executor::new(g.clone())
        .unwrap()
        .with_plan(&swapped, MEMORY)
        .unwrap();
    assert_bit_identical(&steps(&free), &steps(&e));
    // The q projection after the RoPE that reads it: refused, naming the node.
    let rope = swapped
        .ops
        .iter()
        .position(|p| matches!(g.nodes[p.node].op, Op::Rope { .. }))
        .unwrap();
    let mut bad = plan.clone();
    let moved = bad.ops.remove(rope);
    bad.ops.insert(0, moved);
    let err = refused(&g, &bad);
    assert!(err.contains("is planned before"), "{err}");
}

#[test]
fn a_plan_unlike_the_graph_is_refused_naming_the_node() {
    let (g, plan) = planned();
    let refuse = |p: &ExecPlan| refused(&g, p);
    let mut fewer = plan.clone();
    fewer.ops.pop();
    let e = refuse(&fewer);
    assert!(e.contains(&format!("{} nodes", g.nodes.len())), "{e}");
    // A value planned smaller than the graph makes it (a plan for another model).
    let mut small = plan.clone();
    let b = small
        .arena
        .buffers
        .iter_mut()
        .find(|b| g.values[b.value].name.contains("layers.1.mlp"))
        .unwrap();
    b.size -= 4;
    let v = b.value;
    let node = g.nodes.iter().find(|n| n.output.0 == v).unwrap();
    let e = refuse(&small);
    assert!(
        e.contains(&format!("node `{}`", node.name)) && e.contains("bytes"),
        "{e}"
    );
    let mut renamed = plan.clone();
    renamed.ops[3].name = "elsewhere".into();
    let e = refuse(&renamed);
    assert!(e.contains("elsewhere") && e.contains(&g.nodes[3].name), "{e}");
    // A lifetime that ends before the value's last reader.
    let mut short = plan.clone();
    let b = short.arena.buffers.iter_mut().find(|b| b.first < b.last).unwrap();
    b.last -= 1;
    assert!(refuse(&short).contains("live over steps"));
}

#[test]
fn a_bundle_with_a_plan_runs_it_and_checks_it_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("b.edgeb");
    let o = build(&out, &CTX.to_string(), &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let trust = TrustPolicy::from_key_files(&[], true).unwrap();
    let b = Bundle::open(&out, &trust).unwrap();
    let plan = b.plan().expect("the bundle carries a plan");
    assert_eq!(plan.ops.len(), b.graph().nodes.len());
    let (followed, _) = b.executor(false).unwrap();
    assert!(followed.arena_bytes() > 0);
    let (free, _) = b
        .executor_following(
            false,
            Follow {
                memory: false,
                kernels: false,
            },
        )
        .unwrap();
    assert_eq!(free.arena_bytes(), 0);
    assert_close(&steps(&free), &steps(&followed));
}

/// `edgec build` of the fixture for the host at context `ctx`.
fn build(out: &Path, ctx: &str, extra: &[&str]) -> std::process::Output {
    let fixture = common::tiny_llama();
    Command::new(env!("CARGO_BIN_EXE_edgec"))
        .args([
            "build",
            "--model",
            fixture.to_str().unwrap(),
            "--target",
            "host",
            "--unsigned",
        ])
        .args([
            "--ctx",
            ctx,
            "--runtime-memory",
            "24MiB",
            "-o",
            out.to_str().unwrap(),
        ])
        .args(extra)
        .output()
        .unwrap()
}

/// The decision a built bundle carries, and the one the device's Tune path takes from it.
fn decision(path: &Path) -> (bool, bool) {
    let trust = TrustPolicy::from_key_files(&[], true).unwrap();
    let model = edge_runtime::service::model::Model::load(path, "test", &trust).unwrap();
    let req = edge_proto::runtime::TuneRequest {
        steps: 1,
        lora_rank: 2,
        seq_len: 16,
        stride: 1,
        ..Default::default()
    };
    let spec = edge_runtime::service::tuning::job_spec(&req, &model).unwrap();
    let d = model.bundle.recompute().expect("a tuning decision in the bundle");
    assert_eq!((d.first, d.exit, d.seq), (0, 1, 64));
    (d.recompute, spec.tune.recompute)
}

#[test]
fn build_train_puts_keep_or_recompute_in_the_bundle_and_tuning_follows_it() {
    let dir = tempfile::tempdir().unwrap();
    // What the plan needs, from the library with the options the builds below use.
    let mut o = Options::for_context(2);
    o.runtime_bytes = 24 << 20;
    o.train = Some((0..=1, 64));
    let (g, plan) = schedule::schedule(fixture_graph(), &host(), &o).unwrap();
    let r = plan.recompute.clone().unwrap();
    let base = g.weight_bytes() as u64 + o.runtime_bytes;
    assert!(
        r.recompute_peak_bytes > plan.memory.fixed() - o.runtime_bytes,
        "the tuning activations dominate the fixed buffers at --ctx 2"
    );
    let train = ["--train", "0:1", "--seq", "64"];
    fn with<'a>(train: &[&'a str], extra: &[&'a str]) -> Vec<&'a str> {
        [train, extra].concat()
    }
    let path = dir.path().join("b.edgeb");
    // Room for everything: auto keeps; forced recompute recomputes.
    let ok = build(&path, "2", &with(&train, &[]));
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    assert_eq!(decision(&path), (false, false));
    let ok = build(&path, "2", &with(&train, &["--recompute", "recompute"]));
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    assert_eq!(decision(&path), (true, true));
    // Between the two: auto recomputes, forced keep fails by how much.
    let between = base + (r.keep_peak_bytes + r.recompute_peak_bytes) / 2;
    let b = between.to_string();
    let ok = build(&path, "2", &with(&train, &["--memory-budget", &b]));
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    assert_eq!(decision(&path), (true, true));
    let fail = build(
        &path,
        "2",
        &with(&train, &["--memory-budget", &b, "--recompute", "keep"]),
    );
    let e = String::from_utf8_lossy(&fail.stderr);
    let over = r.keep_peak_bytes + base - between;
    assert!(
        !fail.status.success() && e.contains(&format!("over by {over} bytes")),
        "{e}"
    );
    // Below the recomputing step: neither fits, by exactly one byte.
    let b = (base + r.recompute_peak_bytes - 1).to_string();
    let fail = build(&path, "2", &with(&train, &["--memory-budget", &b]));
    let e = String::from_utf8_lossy(&fail.stderr);
    assert!(!fail.status.success() && e.contains("over by 1 bytes"), "{e}");
    let bad = build(&path, "2", &["--train", "1:0"]);
    assert!(!bad.status.success());
}
