//! LoRA gradients of the truncated training graph against PyTorch + PEFT autograd
//! (`tests/fixtures/tiny-llama/lora.safetensors` and `exit.safetensors`).

mod common;

use std::path::Path;

use common::{read_reference, tiny_llama};
use edge_runtime::train::{Grads, LoraConfig, Module, Params, TrainGraph, TrainRunner, WindowSpec};

/// Loads only the `…lora_A` / `…lora_B` tensors of the fixture file into `p`.
fn load_adapters(p: &mut Params, file: &Path) {
    let all = edge_runtime::train::lora::read_f32_safetensors(file).unwrap();
    for (name, (shape, data)) in all {
        if name.ends_with("lora_A") || name.ends_with("lora_B") {
            let id = p
                .lookup(&name)
                .unwrap_or_else(|| panic!("no parameter for {name}"));
            assert_eq!(p.tensors[id.0].shape, shape, "{name}");
            p.tensors[id.0].data = data;
        }
    }
}

fn check_grads(window: WindowSpec, file: &str, loss_key: &str) {
    let model = edgec::frontend::load(&tiny_llama(), &Default::default()).unwrap();
    let g = &model.graph;
    let lora = LoraConfig {
        rank: 4,
        alpha: 8.0,
        targets: Module::ALL.to_vec(),
    };
    let mut p = Params::new(g, lora, &[window.exit], false, false, 0).unwrap();
    let path = tiny_llama().join(file);
    load_adapters(&mut p, &tiny_llama().join("lora.safetensors"));
    let reference = read_reference(&path);
    let ids = &read_reference(&tiny_llama().join("reference.safetensors"))["input_ids"];
    let (b, s) = (ids.0[0], ids.0[1]);

    let tg = TrainGraph::build(g, &p, window.clone()).unwrap();
    let runner = TrainRunner::new(g, &p);
    let mut grads = Grads::zeros(&p, &tg.updates);
    let weight = 1.0 / (b * (s - 1)) as f32;
    let mut loss = 0.0;
    for seq in 0..b {
        let tokens: Vec<u32> = ids.1[seq * s..(seq + 1) * s].iter().map(|&x| x as u32).collect();
        loss += runner.step(&tg, &tokens, None, weight, &mut grads).unwrap().loss;
    }
    let want_loss = reference[loss_key].1[0] as f64;
    assert!(
        (loss - want_loss).abs() < 1e-4,
        "loss {loss} vs PyTorch {want_loss}"
    );

    let mut checked = 0;
    for (name, (_, want)) in &reference {
        let Some(base) = name.strip_suffix(".grad") else {
            continue;
        };
        let id = p.lookup(base).unwrap();
        let got = grads
            .tensors
            .get(&id)
            .unwrap_or_else(|| panic!("{base} got no gradient"));
        let max_ref = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let max_diff = got
            .iter()
            .zip(want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(
            max_diff <= 1e-4 * max_ref.max(1e-12),
            "{base}: max |diff| {max_diff:e} vs max |ref| {max_ref:e}"
        );
        checked += 1;
    }
    // Adapters outside the window must get no gradient at all.
    assert_eq!(
        checked,
        tg.updates.len(),
        "every updated tensor has a reference gradient"
    );
    assert!(checked > 0);
}

#[test]
fn full_depth_lora_gradients_match_peft() {
    check_grads(WindowSpec::new(0..=3, 3, 4).unwrap(), "lora.safetensors", "loss");
}

#[test]
fn truncated_window_gradients_at_an_exit_match_pytorch() {
    check_grads(
        WindowSpec::new(0..=1, 1, 4).unwrap(),
        "exit.safetensors",
        "lora.exit_loss",
    );
}

#[test]
fn fixture_adapters_load_by_either_name() {
    let model = edgec::frontend::load(&tiny_llama(), &Default::default()).unwrap();
    let mut p = Params::new(
        &model.graph,
        LoraConfig {
            rank: 4,
            alpha: 8.0,
            targets: Module::ALL.to_vec(),
        },
        &[3],
        false,
        false,
        0,
    )
    .unwrap();
    let loaded = p
        .load_safetensors(&tiny_llama().join("peft_adapter/adapter_model.safetensors"))
        .unwrap();
    assert_eq!(loaded.len(), 56);
}

/// The backward through compressed weights (the product with the transposed packed
/// weight) gives the gradients of the same model with those weights decoded to f32.
#[test]
fn gradients_through_packed_weights_equal_those_through_their_decoded_values() {
    use edge_runtime::format::{QuantScheme, QuantSpec};
    use edge_runtime::ir::{Weight, WeightData};
    use edge_runtime::packed::PackedWeight;
    use edge_runtime::tensor::Tensor;
    use std::sync::Arc;

    let model = edgec::frontend::load(&tiny_llama(), &Default::default()).unwrap();
    let mut packed = model.graph.clone();
    let mut decoded = model.graph.clone();
    let mut n = 0;
    for (i, w) in model.graph.weights.iter().enumerate() {
        let s = w.shape().to_vec();
        if !w.name.contains("layers.") || s.len() != 2 || s[1] % 32 != 0 {
            continue;
        }
        let spec = QuantSpec {
            bits: if n % 2 == 0 { 4 } else { 3 },
            group: 32,
            scheme: if n % 3 == 0 {
                QuantScheme::Sym
            } else {
                QuantScheme::Asym
            },
        };
        let p = PackedWeight::pack_quant(s[0], s[1], &w.data.to_f32_vec(), spec).unwrap();
        let values = p.to_f32_vec();
        packed.weights[i] = Weight {
            name: w.name.clone(),
            data: WeightData::Packed(Arc::new(p)),
        };
        decoded.weights[i] = Weight::new_dense(w.name.clone(), Tensor::from_f32(s, values).unwrap());
        n += 1;
    }
    assert!(n >= 20, "only {n} weights packed");
    let ids = &read_reference(&tiny_llama().join("reference.safetensors"))["input_ids"];
    let tokens: Vec<u32> = ids.1[..16].iter().map(|&x| x as u32).collect();
    let grads = |g: &edge_runtime::ir::Graph, kernels: Option<&edge_runtime::jit::KernelSet>| {
        let lora = LoraConfig {
            rank: 4,
            alpha: 8.0,
            targets: Module::ALL.to_vec(),
        };
        let mut p = Params::new(g, lora, &[2], true, false, 7).unwrap();
        // Non-zero B so that every path carries gradient.
        for t in p.tensors.iter_mut() {
            for (j, v) in t.data.iter_mut().enumerate() {
                *v += 0.01 * ((j % 7) as f32 - 3.0);
            }
        }
        let tg = TrainGraph::build(g, &p, WindowSpec::new(1..=2, 2, 4).unwrap()).unwrap();
        let mut gr = Grads::zeros(&p, &tg.updates);
        let loss = TrainRunner::new(g, &p)
            .with_kernels(kernels)
            .step(&tg, &tokens, None, 1.0 / 15.0, &mut gr)
            .unwrap()
            .loss;
        (loss, gr, p)
    };
    // The packed weights' products through the reference kernels and through the JIT
    // kernels a bundle carries (frozen linears forward, `dy W` backward) against the
    // dequantized dense weights.
    let (sources, skipped) = edgec::codegen::kernel_sources(&packed);
    assert!(skipped.is_empty(), "{skipped:?}");
    let set = edge_runtime::jit::KernelSet::compile(&sources).unwrap();
    let (lb, gb, p) = grads(&decoded, None);
    for (what, kernels) in [("reference", None), ("jit", Some(&set))] {
        let (la, ga, _) = grads(&packed, kernels);
        assert!((la - lb).abs() < 1e-5, "{what}: loss {la} vs {lb}");
        assert!(!ga.tensors.is_empty());
        for (id, a) in &ga.tensors {
            let b = &gb.tensors[id];
            let scale = b.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-6);
            let d = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
            assert!(
                d <= 1e-4 * scale,
                "{what} {}: {d:e} (max {scale:e})",
                p.get(*id).name
            );
        }
    }
}

/// Recomputing each window layer's activations before its backward gives the same
/// gradients as keeping them, and keeps fewer values alive.
#[test]
fn recomputed_window_gives_the_same_gradients_as_saved_activations() {
    let model = edgec::frontend::load(&tiny_llama(), &Default::default()).unwrap();
    let g = &model.graph;
    let lora = LoraConfig {
        rank: 4,
        alpha: 8.0,
        targets: Module::ALL.to_vec(),
    };
    let mut p = Params::new(g, lora, &[3], true, false, 0).unwrap();
    load_adapters(&mut p, &tiny_llama().join("lora.safetensors"));
    let ids = &read_reference(&tiny_llama().join("reference.safetensors"))["input_ids"];
    let tokens: Vec<u32> = ids.1[..16].iter().map(|&x| x as u32).collect();
    let run = |recompute: bool| {
        let spec = WindowSpec::new(1..=3, 3, 4).unwrap().with_recompute(recompute);
        let tg = TrainGraph::build(g, &p, spec).unwrap();
        let mut gr = Grads::zeros(&p, &tg.updates);
        let loss = TrainRunner::new(g, &p)
            .step(&tg, &tokens, None, 1.0 / 15.0, &mut gr)
            .unwrap()
            .loss;
        (loss, gr, tg.saved_values().len())
    };
    let (la, ga, saved_a) = run(false);
    let (lb, gb, saved_b) = run(true);
    assert_eq!(la, lb);
    assert!(
        saved_b < saved_a / 4,
        "recompute keeps {saved_b} values, saving keeps {saved_a}"
    );
    for (id, a) in &ga.tensors {
        let b = &gb.tensors[id];
        let d = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
        assert!(d <= 1e-6, "{}: {d:e}", p.get(*id).name);
    }
}

/// A device tuning job cancelled mid-way resumes from its checkpoint and finishes with
/// the same adapters as a job that ran through.
#[test]
fn a_cancelled_tuning_job_resumes_and_ends_like_an_uncancelled_one() {
    use edge_runtime::train::job::{JobEnd, JobSpec, run_job};
    use edge_runtime::train::tune::{TuneConfig, TuneMode};
    use std::sync::atomic::{AtomicBool, Ordering};

    let model = edgec::frontend::load(&tiny_llama(), &Default::default()).unwrap();
    let g = &model.graph;
    let tokens: Vec<u32> = (0..400u32).map(|i| (i * 37 + i / 7) % 256).collect();
    let spec = JobSpec {
        tune: TuneConfig {
            mode: TuneMode::Edge { stride: 2 },
            exits: None,
            steps: 6,
            seq: 16,
            batch: 1,
            grad_accum: 1,
            lr: 1e-2,
            weight_decay: 0.0,
            warmup: 0,
            min_lr_ratio: 0.1,
            clip: 1.0,
            seed: 3,
            cache_prefix: true,
            checkpoint_every: 1,
            max_samples: None,
            recompute: false,
            exit_lr: Some(0.05),
        },
        rank: 2,
        alpha: 4.0,
        targets: vec!["q_proj".into(), "down_proj".into()],
        train_exit_norms: true,
        dataset: "test".into(),
    };
    let tmp = tempfile::tempdir().unwrap();
    let never = AtomicBool::new(false);
    let whole = run_job(g, &spec, tokens.clone(), &tmp.path().join("a"), &never, |_| {}).unwrap();
    let JobEnd::Finished { adapters: a_dir } = whole else {
        panic!("{whole:?}")
    };

    let cancel = AtomicBool::new(false);
    let b = tmp.path().join("b");
    let end = run_job(g, &spec, tokens.clone(), &b, &cancel, |p| {
        if p.step == 3 {
            cancel.store(true, Ordering::Relaxed);
        }
    })
    .unwrap();
    assert_eq!(end, JobEnd::Cancelled { at_step: 3 });
    assert!(!b.join("adapters").exists());
    let mut other = spec.clone();
    other.rank = 3;
    let e = run_job(g, &other, tokens.clone(), &b, &never, |_| {}).unwrap_err();
    assert!(e.to_string().contains("other settings"), "{e}");
    let mut first_step = None;
    let end = run_job(g, &spec, tokens, &b, &never, |p| {
        first_step.get_or_insert(p.step);
    })
    .unwrap();
    assert_eq!(first_step, Some(4), "resumed after the 3 steps done");
    let JobEnd::Finished { adapters: b_dir } = end else {
        panic!()
    };
    for f in ["adapter_model.safetensors", "exit_heads.safetensors"] {
        let (x, y) = (read_reference(&a_dir.join(f)), read_reference(&b_dir.join(f)));
        assert_eq!(x.len(), y.len());
        for (n, (_, v)) in &x {
            let d = v
                .iter()
                .zip(&y[n].1)
                .map(|(p, q)| (p - q).abs())
                .fold(0.0f32, f32::max);
            assert!(d < 1e-6, "{f} {n}: {d}");
        }
    }
}
