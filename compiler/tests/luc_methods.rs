//! LUC compression methods on a real SmolLM2 decoder layer (weights from the Q4_1 GGUF,
//! calibration activations from data/austen/train.txt).

mod common;

use std::sync::{Arc, OnceLock};

use edge_runtime::Executor;
use edge_runtime::format::{QuantScheme, QuantSpec, SparsePattern};
use edgec::frontend::{LoadOptions, load};
use edgec::luc::calib::{LINEAR_INPUT, LayerIds, capture_layer, embed, token_samples, weight_f32};
use edgec::luc::candidate::Candidate;
use edgec::luc::prune::{Method, Pruner, Quantizer, compress, is_n_of_m};
use edgec::luc::quantize::{Prepared, gptq, rtn};

/// Layer profiled by these tests (a middle layer of the 30).
const LAYER: usize = 6;

struct Linear {
    name: &'static str,
    w: Vec<f32>,
    rows: usize,
    cols: usize,
    h: Arc<Prepared>,
}

/// The seven linears of layer [`LAYER`] with the statistics of their inputs over 4
/// calibration samples of 256 tokens.
fn layer() -> &'static [Linear] {
    static L: OnceLock<Vec<Linear>> = OnceLock::new();
    L.get_or_init(|| {
        let model = load(&common::smollm2(), &LoadOptions::default()).unwrap();
        let tok = model.tokenizer.clone().unwrap();
        let text = std::fs::read_to_string(common::repo().join("data/austen/train.txt")).unwrap();
        let samples = token_samples(&text, &tok, 4, 256).unwrap();
        let g = model.graph;
        let exec = Executor::new(Arc::new(g.clone())).unwrap();
        let mut x = embed(&g, &samples).unwrap();
        for i in 0..LAYER {
            x = capture_layer(&exec, &LayerIds::new(&g, i).unwrap(), &x, 256)
                .unwrap()
                .outputs;
        }
        let ids = LayerIds::new(&g, LAYER).unwrap();
        let cap = capture_layer(&exec, &ids, &x, 256).unwrap();
        let prepared: Vec<Arc<Prepared>> = cap.hessians.iter().map(|h| Arc::new(h.prepare())).collect();
        ids.weights
            .iter()
            .enumerate()
            .map(|(k, &id)| {
                let (w, rows, cols) = weight_f32(&g, id).unwrap();
                Linear {
                    name: edgec::luc::sensitivity::LINEARS[k],
                    w,
                    rows,
                    cols,
                    h: prepared[LINEAR_INPUT[k]].clone(),
                }
            })
            .collect()
    })
}

/// The linears the comparisons run on: one fed by a norm, one by the attention, and the
/// down projection (fed by SwiGLU, 1536 inputs).
fn picked() -> Vec<&'static Linear> {
    layer()
        .iter()
        .filter(|l| ["q_proj", "o_proj", "down_proj"].contains(&l.name))
        .collect()
}

fn err(l: &Linear, values: &[f32]) -> f64 {
    let base = l.h.quad(&l.w);
    l.h.output_nmse(&l.w, values, base)
}

fn cand(bits: u8, group: u32, sparsity: f64, pattern: SparsePattern) -> Candidate {
    Candidate {
        bits,
        group,
        scheme: QuantScheme::Asym,
        sparsity,
        pattern,
    }
}

#[test]
fn gptq_reduces_output_error_versus_rtn_at_3_and_4_bits() {
    for l in picked() {
        for bits in [3u8, 4] {
            // Group 128: the weights came from Q4_1 (4-bit groups of 32), which RTN at 4-bit
            // group 32 reproduces exactly.
            let spec = QuantSpec {
                bits,
                group: 128,
                scheme: QuantScheme::Asym,
            };
            let r = err(l, &rtn(&l.w, l.rows, l.cols, spec).values);
            let g = err(l, &gptq(&l.w, l.rows, l.cols, spec, &l.h).values);
            eprintln!("{} {bits}b: rtn {r:.3e} gptq {g:.3e}", l.name);
            assert!(
                g < 0.85 * r,
                "{} at {bits} bits: gptq {g:.3e} vs rtn {r:.3e}",
                l.name
            );
        }
    }
}

#[test]
fn asym_4bit_group_32_reproduces_the_q4_1_weights() {
    for l in layer() {
        let spec = QuantSpec {
            bits: 4,
            group: 32,
            scheme: QuantScheme::Asym,
        };
        let c = rtn(&l.w, l.rows, l.cols, spec);
        assert!(c.values == l.w, "{}: 4-bit g32 RTN changed a Q4_1 weight", l.name);
        assert_eq!(c.decode(), c.values);
    }
}

fn prune_only(l: &Linear, pruner: Pruner, sparsity: f64, pattern: SparsePattern) -> Vec<f32> {
    let method = Method {
        quantizer: Quantizer::Rtn,
        pruner,
    };
    let c = compress(
        &l.w,
        l.rows,
        l.cols,
        &cand(4, 32, sparsity, pattern),
        method,
        Some(&l.h),
        false,
    );
    if let SparsePattern::NofM { n, m } = pattern {
        assert!(is_n_of_m(
            c.mask.as_ref().unwrap(),
            l.cols,
            n as usize,
            m as usize
        ));
    }
    c.values
}

#[test]
fn sparsegpt_and_wanda_beat_magnitude_at_50_percent() {
    for l in picked() {
        let u = SparsePattern::Unstructured;
        let mag = err(l, &prune_only(l, Pruner::Magnitude, 0.5, u));
        let wanda = err(l, &prune_only(l, Pruner::Wanda, 0.5, u));
        let sgpt = err(l, &prune_only(l, Pruner::SparseGpt, 0.5, u));
        eprintln!(
            "{} 50%: magnitude {mag:.3e} wanda {wanda:.3e} sparsegpt {sgpt:.3e}",
            l.name
        );
        assert!(
            sgpt < 0.8 * mag,
            "{}: sparsegpt {sgpt:.3e} vs magnitude {mag:.3e}",
            l.name
        );
        assert!(
            wanda < mag,
            "{}: wanda {wanda:.3e} vs magnitude {mag:.3e}",
            l.name
        );
    }
}

#[test]
fn two_of_four_masks_are_exact_and_sparsegpt_wins_there_too() {
    for l in picked() {
        let p = SparsePattern::NofM { n: 2, m: 4 };
        let mag = err(l, &prune_only(l, Pruner::Magnitude, 0.5, p));
        let sgpt = err(l, &prune_only(l, Pruner::SparseGpt, 0.5, p));
        assert!(
            sgpt < mag,
            "{} 2:4: sparsegpt {sgpt:.3e} vs magnitude {mag:.3e}",
            l.name
        );
        // Jointly quantized: still exactly two of every four kept, codes reproduce values.
        let method = Method {
            quantizer: Quantizer::Gptq,
            pruner: Pruner::SparseGpt,
        };
        let c = compress(
            &l.w,
            l.rows,
            l.cols,
            &cand(3, 32, 0.5, p),
            method,
            Some(&l.h),
            true,
        );
        let mask = c.mask.as_ref().unwrap();
        assert!(is_n_of_m(mask, l.cols, 2, 4), "{}", l.name);
        for (v, k) in c.values.iter().zip(mask) {
            assert!(*k || *v == 0.0);
        }
        assert_eq!(c.decode(), c.values);
    }
}
