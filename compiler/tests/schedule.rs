//! The scheduling pass on the tiny-llama fixture: plans for every target verify; a budget
//! that forces streaming streams and fits; one no plan meets fails saying by how much;
//! keep vs recompute follows the budget; a streamed bundle runs with the same loss and its
//! measured peak RSS stays under the budget.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use edge_runtime::bundle::{Bundle, TrustPolicy};
use edgec::frontend::{LoadOptions, load};
use edgec::schedule::cost::Machine;
use edgec::schedule::{self, Options, Residence, ScheduleError, recompute};
use edgec::target;

fn fixture_graph() -> edge_runtime::ir::Graph {
    load(&common::tiny_llama(), &LoadOptions::default())
        .unwrap()
        .graph
}

fn host() -> target::Target {
    target::resolve("host", Some(&common::repo().join("targets"))).unwrap()
}

fn edgec(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_edgec"))
        .args(args)
        .output()
        .expect("run edgec")
}

/// The `edge-runtime` binary beside `edgec` (`EDGE_RUNTIME_BIN` overrides it); built with
/// the workspace's features when this test runs alone.
fn runtime_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("EDGE_RUNTIME_BIN") {
        return p.into();
    }
    let edgec = PathBuf::from(env!("CARGO_BIN_EXE_edgec"));
    let bin = edgec.with_file_name("edge-runtime");
    if !bin.exists() {
        let mut cmd = Command::new(env!("CARGO"));
        cmd.args(["build", "-q", "--workspace", "--bins"]);
        if edgec.parent().is_some_and(|p| p.ends_with("release")) {
            cmd.arg("--release");
        }
        assert!(cmd.status().unwrap().success(), "building edge-runtime failed");
    }
    bin
}

#[test]
fn every_target_plans_the_fixture_and_the_plan_verifies() {
    let dir = common::repo().join("targets");
    for path in target::list(&dir).unwrap() {
        let t = target::load(&path).unwrap();
        let (g, plan) = schedule::schedule(fixture_graph(), &t, &Options::for_context(64)).unwrap();
        plan.verify(&g).unwrap();
        assert_eq!(plan.ops.len(), g.nodes.len());
        assert!(plan.streamed_weights().is_empty(), "{}: the fixture fits", t.name);
        assert!(plan.decode_seconds > 0.0 && plan.memory.total() <= plan.memory.budget);
        // Every linear op has a tile that fits a named level of the target.
        for p in plan.ops.iter().filter(|p| p.op == "Linear") {
            let tile = p.exec.tile.as_ref().unwrap();
            assert!(
                t.memory.iter().any(|l| l.name == tile.level),
                "{}: {}",
                t.name,
                tile.level
            );
        }
        // The plan round-trips through its JSON form (what the bundle carries).
        let back: schedule::Schedule = serde_json::from_str(&serde_json::to_string(&plan).unwrap()).unwrap();
        assert_eq!(
            (&back.residency, &back.arena, &back.memory, back.ops.len()),
            (&plan.residency, &plan.arena, &plan.memory, plan.ops.len())
        );
        // A plan whose arena overlaps two live buffers does not verify.
        let mut bad = plan.clone();
        if let Some(b) = bad.arena.buffers.iter().position(|b| b.offset > 0) {
            bad.arena.buffers[b].offset = 0;
            assert!(bad.verify(&g).is_err(), "{}", t.name);
        }
    }
}

#[test]
fn a_budget_below_the_weights_streams_and_one_below_any_plan_fails_by_how_much() {
    let t = host();
    let o = Options::for_context(64);
    let (g, full) = schedule::schedule(fixture_graph(), &t, &o).unwrap();
    let weights = g.weight_bytes() as u64;
    assert_eq!(full.memory.weights_resident, weights);
    // Half the weights' bytes less than everything: some must be streamed.
    let mut tight = o.clone();
    tight.budget = Some(full.memory.fixed() + weights / 2);
    let (g, plan) = schedule::schedule(g, &t, &tight).unwrap();
    assert!(!plan.streamed_weights().is_empty());
    assert!(plan.memory.total() <= tight.budget.unwrap());
    assert!(plan.memory.weights_resident < weights);
    for p in &plan.ops {
        assert_eq!(
            p.weight == Residence::Streamed,
            !p.release.is_empty(),
            "{}",
            p.exec.name
        );
    }
    // Fewer bytes than the fixed part and one weight: an error that says by how much.
    let mut impossible = o.clone();
    let budget = full.memory.fixed();
    impossible.budget = Some(budget);
    match schedule::schedule(g, &t, &impossible) {
        Err(ScheduleError::OverBudget { need, budget: b, .. }) => {
            assert_eq!(b, budget);
            assert!(need > budget);
            let msg = schedule::schedule(fixture_graph(), &t, &impossible)
                .unwrap_err()
                .to_string();
            assert!(msg.contains(&format!("over by {} bytes", need - budget)), "{msg}");
        }
        other => panic!("expected OverBudget, got {other:?}"),
    }
}

#[test]
fn the_tuning_window_keeps_activations_when_they_fit_and_recomputes_when_not() {
    let t = host();
    let mut o = Options::for_context(64);
    o.train = Some((0..=1, 64));
    let (g, roomy) = schedule::schedule(fixture_graph(), &t, &o).unwrap();
    let r = roomy.recompute.clone().unwrap();
    assert!(!r.recompute);
    assert!(
        r.recompute_peak_bytes < r.keep_peak_bytes,
        "recompute keeps less: {} vs {}",
        r.recompute_peak_bytes,
        r.keep_peak_bytes
    );
    assert!(r.kept_values_recompute < r.kept_values);
    // Room for the recomputing step's activations but not the keeping one's, for neither.
    let m = Machine::of(&t);
    let between = (r.keep_peak_bytes + r.recompute_peak_bytes) / 2;
    let p = recompute::plan(&g, 0..=1, 64, between, &m).unwrap().unwrap();
    assert!(p.recompute);
    let p = recompute::plan(&g, 0..=1, 64, r.keep_peak_bytes, &m)
        .unwrap()
        .unwrap();
    assert!(!p.recompute);
    let e = recompute::plan(&g, 0..=1, 64, r.recompute_peak_bytes - 1, &m)
        .unwrap()
        .unwrap_err();
    assert_eq!(e.need, r.recompute_peak_bytes);
}

/// Peak RSS (KiB) of a command, from GNU time.
fn peak_rss_kib(cmd: &mut Command) -> (Output, u64) {
    let mut timed = Command::new("/usr/bin/time");
    timed
        .arg("-f")
        .arg("RSS %M")
        .arg(cmd.get_program())
        .args(cmd.get_args());
    let o = timed.output().expect("run /usr/bin/time (GNU time)");
    let err = String::from_utf8_lossy(&o.stderr);
    let rss = err
        .lines()
        .filter_map(|l| l.strip_prefix("RSS "))
        .next_back()
        .unwrap_or_else(|| panic!("no RSS line: {err}"))
        .trim()
        .parse()
        .unwrap();
    (o, rss)
}

fn eval_loss(bundle: &Path, tokens: &Path) -> (f64, u64) {
    let mut cmd = Command::new(runtime_bin());
    cmd.args([
        "eval",
        "--allow-unsigned",
        "--kernels",
        "reference",
        "--json",
        "--bundle",
    ])
    .arg(bundle)
    .arg("--tokens")
    .arg(tokens);
    let (o, rss) = peak_rss_kib(&mut cmd);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    (v["loss"].as_f64().unwrap(), rss)
}

#[test]
fn a_streamed_bundle_gives_the_same_loss_under_its_budget() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens.txt");
    std::fs::write(
        &tokens,
        "1 17 204 9 33 250 4 81 120 7 66 3 199 42 5 18\n1 90 91 92 13 200 201 7\n",
    )
    .unwrap();
    let fixture = common::tiny_llama();
    let model = fixture.to_str().unwrap();
    // What the runtime needs besides the plan on the fixture: the debug binary's own RSS.
    let runtime = "24MiB";
    let mut o = Options::for_context(64);
    o.runtime_bytes = target::parse_size(runtime).unwrap();
    let (g, full) = schedule::schedule(fixture_graph(), &host(), &o).unwrap();
    let budget = full.memory.fixed() + g.weight_bytes() as u64 / 4;
    let (full_path, small_path) = (dir.path().join("full.edgeb"), dir.path().join("small.edgeb"));
    let common_args = [
        "--target",
        "host",
        "--unsigned",
        "--ctx",
        "64",
        "--runtime-memory",
        runtime,
    ];
    let b = |out: &Path, extra: &[&str]| {
        let mut args = vec!["build", "--model", model, "-o", out.to_str().unwrap()];
        args.extend_from_slice(&common_args);
        args.extend_from_slice(extra);
        edgec(&args)
    };
    let ok = b(&full_path, &[]);
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    let budget_arg = budget.to_string();
    let ok = b(&small_path, &["--memory-budget", &budget_arg]);
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    // The schedule is in the manifest and streams weights.
    let opened = Bundle::open(&small_path, &TrustPolicy::from_key_files(&[], true).unwrap()).unwrap();
    let sched = opened
        .manifest()
        .schedule
        .clone()
        .expect("a schedule in the manifest");
    assert_eq!(sched.memory_budget, budget);
    assert!(!opened.streamed_weights().is_empty());
    let plan: schedule::Schedule = serde_json::from_str(&sched.plan_json).unwrap();
    assert_eq!(plan.streamed_weights().len(), sched.streamed_weights.len());
    // Same loss, and the process stays under the budget.
    let (want, _) = eval_loss(&full_path, &tokens);
    let (got, rss_kib) = eval_loss(&small_path, &tokens);
    assert_eq!(got, want, "streaming changes no number");
    assert!(
        rss_kib * 1024 <= budget,
        "peak RSS {rss_kib} KiB over the budget of {budget} bytes"
    );
    // A budget below any plan: the build fails saying by how much and writes nothing.
    let none = dir.path().join("none.edgeb");
    let fail = b(&none, &["--memory-budget", "1MiB"]);
    assert!(!fail.status.success());
    let e = String::from_utf8_lossy(&fail.stderr);
    assert!(e.contains("over by") && e.contains("1048576"), "{e}");
    assert!(!none.exists());
}

#[test]
fn inspect_prints_the_schedule_as_text_and_json() {
    let fixture = common::tiny_llama();
    let m = fixture.to_str().unwrap();
    let o = edgec(&[
        "inspect",
        m,
        "--schedule",
        "--target",
        "raspberry-pi-5",
        "--ctx",
        "32",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("schedule for target `raspberry-pi-5`") && text.contains("layers.0.q"),
        "{text}"
    );
    let o = edgec(&[
        "inspect",
        m,
        "--schedule",
        "--target",
        "edge-accelerator",
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let ops = v["schedule"]["ops"].as_array().unwrap();
    assert!(ops.iter().all(|p| p["seconds"].as_f64().unwrap() > 0.0));
    // The accelerator's on-chip SRAM holds the linear tiles.
    assert!(
        ops.iter()
            .filter(|p| p["op"] == "Linear")
            .all(|p| p["tile"]["level"] == "SRAM")
    );
}

#[test]
fn a_target_efficiency_out_of_range_is_an_error_naming_the_key_and_line() {
    let src = std::fs::read_to_string(common::repo().join("targets/raspberry-pi-5.toml")).unwrap();
    let bad = format!("{src}\n[efficiency]\ncompute = 1.5\n");
    let e = target::parse(Path::new("targets/raspberry-pi-5.toml"), &bad)
        .unwrap_err()
        .to_string();
    assert!(e.contains("efficiency.compute") && e.contains("1.5"), "{e}");
    let line = bad.lines().position(|l| l.starts_with("compute = 1.5")).unwrap() + 1;
    assert!(e.contains(&format!(":{line}:")), "{e}");
    let ok = format!("{src}\n[efficiency]\ncompute = 0.25\nop_overhead_us = 0\n");
    let t = target::parse(Path::new("targets/raspberry-pi-5.toml"), &ok).unwrap();
    assert_eq!((t.efficiency.compute, t.efficiency.op_overhead_us), (0.25, 0.0));
    assert_eq!(t.efficiency.bandwidth, target::Efficiency::default().bandwidth);
}
