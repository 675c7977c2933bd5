//! `PolicyMeter` (the measured refinement's loss) resumes from the best policy's hidden
//! states below the first layer that differs, and gets the loss of compressing and
//! measuring the whole model from scratch, to the bit.

mod common;

use std::sync::Arc;

use edge_runtime::Executor;
use edgec::frontend::{LoadOptions, load};
use edgec::luc::calib::{self, LayerIds, samples_from_tokens};
use edgec::luc::compress::compress_graph;
use edgec::luc::measure::PolicyMeter;
use edgec::luc::policy::Policy;

/// A calibrated policy for the 4-layer fixture; `layers[i]` = (bits, sparsity, quantizer, pruner).
fn policy(layers: [(u8, f64, &str, &str); 4]) -> Policy {
    let mut s = String::from("model = \"tiny\"\nmethod = \"optimal\"\nbudget = \"bits=4\"\n");
    for (i, (bits, sparsity, q, p)) in layers.iter().enumerate() {
        s += &format!(
            "\n[[layer]]\nindex = {i}\nbits = {bits}\ngroup = 32\nscheme = \"asym\"\nsparsity = {sparsity}\n\
             pattern = \"unstructured\"\nquantizer = \"{q}\"\npruner = \"{p}\"\n"
        );
    }
    Policy::parse(&s, Some(4)).unwrap()
}

fn tokens(mul: u32) -> Vec<u32> {
    (0..900u32).map(|t| (t * mul + t / 7) % 256).collect()
}

/// The loss the slow way: `edgec compress`'s graph, run from the embeddings.
fn from_scratch(
    g: &edge_runtime::ir::Graph,
    p: &Policy,
    calib_s: &[Vec<u32>],
    held: &[Vec<u32>],
    seq: usize,
) -> f64 {
    let (cg, _) = compress_graph(g, p, Some(calib_s), |_, _| {}).unwrap();
    let cg = Arc::new(cg);
    let exec = Executor::new(cg.clone()).unwrap();
    let inputs = calib::embed(&cg, held).unwrap();
    calib::loss_from(&exec, &LayerIds::new(&cg, 0).unwrap(), &inputs, held, seq).unwrap()
}

#[test]
fn resumed_measurements_equal_measurements_from_scratch() {
    let model = load(&common::tiny_llama(), &LoadOptions::default()).unwrap();
    let g = &model.graph;
    let seq = 24;
    let calib_s = samples_from_tokens(&tokens(37), 3, seq, None).unwrap();
    let held = samples_from_tokens(&tokens(53), 4, seq, None).unwrap();
    let gs = (4, 0.45, "gptq", "sparsegpt");
    let base = policy([gs, gs, gs, gs]);
    // Departs at layer 2 (resumes there), then at layer 0 (from scratch), then the base again.
    let at2 = policy([gs, gs, (3, 0.0, "gptq", "magnitude"), (4, 0.3, "rtn", "wanda")]);
    let at0 = policy([(8, 0.0, "gptq", "magnitude"), gs, gs, gs]);
    let at3 = policy([gs, gs, gs, (2, 0.0, "gptq", "magnitude")]);

    for every in [1, 2] {
        let mut meter = PolicyMeter::new(g, calib_s.clone(), held.clone(), seq)
            .unwrap()
            .with_checkpoint_every(every);
        let mut seen = vec![];
        let mut resumed = vec![];
        for p in [&base, &at2, &at0, &at3, &base] {
            let mut last = None;
            let m = meter.measure(p, |i| last = Some(i)).unwrap();
            assert_eq!(last, Some(3), "progress ends at the last layer");
            seen.push(m.loss);
            resumed.push(m.resumed_at);
        }
        for (p, got) in [&base, &at2, &at0, &at3].iter().zip(&seen) {
            let want = from_scratch(g, p, &calib_s, &held, seq);
            assert!(want.is_finite());
            assert_eq!(
                *got, want,
                "every {every}: a resumed measurement differs from scratch"
            );
        }
        // The base is measured first; each later policy resumes below its first
        // different layer from the best so far (base, unless a later one measured lower).
        // Each policy resumes at the checkpoint at or below its first layer departing
        // from the best policy measured before it (a repeat of the best is not recomputed).
        let ps = [&base, &at2, &at0, &at3, &base];
        let mut best: Option<usize> = None;
        for (k, p) in ps.iter().enumerate() {
            let want = match best {
                None => 0,
                Some(b) => match (0..4).find(|&i| p.layers[i] != ps[b].layers[i]) {
                    Some(d) => d / every * every,
                    None => 4,
                },
            };
            assert_eq!(
                resumed[k], want,
                "every {every}: measurement {k} resumed at {}",
                resumed[k]
            );
            if best.is_none_or(|b| seen[k] < seen[b]) {
                best = Some(k);
            }
        }
        assert!(
            resumed.iter().any(|&r| r > 0 && r < 4),
            "no measurement resumed part-way: {resumed:?}"
        );
        let lowest = seen.iter().copied().fold(f64::INFINITY, f64::min);
        assert_eq!(meter.best_loss(), Some(lowest));
        assert_eq!(seen[4], seen[0], "the base measures the same again");
    }
}

#[test]
fn meter_rejects_bad_samples_and_policies() {
    let model = load(&common::tiny_llama(), &LoadOptions::default()).unwrap();
    let g = &model.graph;
    let s = samples_from_tokens(&tokens(37), 2, 16, None).unwrap();
    assert!(
        PolicyMeter::new(g, s.clone(), vec![], 16).is_err(),
        "no held-out samples"
    );
    assert!(
        PolicyMeter::new(g, s.clone(), s.clone(), 12).is_err(),
        "wrong sample length"
    );
    let mut meter = PolicyMeter::new(g, s.clone(), s, 16).unwrap();
    let gs = (4, 0.0, "gptq", "magnitude");
    let mut three = policy([gs, gs, gs, gs]);
    three.layers.pop();
    let e = meter.measure(&three, |_| {}).unwrap_err().to_string();
    assert!(e.contains("layers"), "{e}");
}
