//! The cost model checked against this machine: each node timed alone on the executor
//! (its inputs seeded with random values, the KV cache filled to the workload's position),
//! a whole step timed as the runtime runs it, and the predictions compared per op kind
//! (Spearman rank correlation, total error).

use std::collections::BTreeMap;
use std::time::Instant;

use edge_runtime::ir::Op;
use edge_runtime::{Executor, Rows};
use serde::{Deserialize, Serialize};

use super::Schedule;
use super::cost::{Workload, value_rows};

/// Seconds measured on this machine.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Measured {
    pub workload: Workload,
    /// Median seconds of each node run alone.
    pub node_seconds: Vec<f64>,
    /// Median seconds of a whole step (`Executor::forward`).
    pub step_seconds: f64,
    pub reps: usize,
}

/// Deterministic stand-ins for token ids and activations (timing does not depend on the
/// values): a Weyl sequence.
struct Seq(u64);

impl Seq {
    fn step(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9);
        self.0
    }
    fn below(&mut self, n: u32) -> u32 {
        (self.step() % n as u64) as u32
    }
    /// In [-1, 1).
    fn unit(&mut self) -> f32 {
        (self.step() % 2000) as f32 / 1000.0 - 1.0
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Times `g` on workload `w`: every node `reps` times alone, and the whole step.
pub fn measure(
    exec: &Executor,
    w: &Workload,
    reps: usize,
    mut progress: impl FnMut(usize, usize),
) -> anyhow::Result<Measured> {
    let reps = reps.max(1);
    let g = exec.graph();
    let c = &g.config;
    let mut rng = Seq(7);
    let mut s = exec.session(w.context());
    let tokens =
        |rng: &mut Seq, n: usize| -> Vec<u32> { (0..n).map(|_| rng.below(c.vocab_size as u32)).collect() };
    // Fill the cache up to the workload's position.
    let mut at = 0;
    while at < w.past {
        let n = (w.past - at).min(256);
        exec.forward(&mut s, &tokens(&mut rng, n), Rows::Last, &[])?;
        at += n;
    }
    // Sweeps over the nodes in order, as a step runs them (so each weight comes from where
    // a real step finds it, not from a cache warmed by the previous repetition), each
    // node's inputs being the values the sweep computed.
    let rows = value_rows(g, w);
    let mut times = vec![Vec::with_capacity(reps); g.nodes.len()];
    for rep in 0..reps {
        let mut vals: Vec<Option<Vec<f32>>> = vec![None; g.values.len()];
        for (i, node) in g.nodes.iter().enumerate() {
            let r = node.inputs.first().map_or(w.rows, |v| rows[v.0]);
            let width = g.values[node.output.0].width;
            let (out, dt) = if let Op::Embedding { table } = node.op {
                // A span cannot start at an embedding; time the executor's row reads.
                let t = &g.weight(table).data;
                let ids = tokens(&mut rng, r);
                let t0 = Instant::now();
                let mut o = vec![0.0f32; r * width];
                for (row, &tok) in o.chunks_exact_mut(width).zip(&ids) {
                    t.read_row_f32(tok as usize, row);
                }
                (o, t0.elapsed())
            } else {
                let seeds: Vec<_> = node
                    .inputs
                    .iter()
                    .map(|v| {
                        let data = vals[v.0]
                            .clone()
                            .unwrap_or_else(|| (0..r * g.values[v.0].width).map(|_| rng.unit()).collect());
                        (*v, data)
                    })
                    .collect();
                let t0 = Instant::now();
                let mut out = exec.run_span(&mut s, r, seeds, i..i + 1, &[node.output])?;
                let dt = t0.elapsed();
                s.truncate(w.past);
                let mut o = out.pop().expect("one output");
                if matches!(node.op, Op::OutputRows) {
                    let keep = rows[node.output.0];
                    o.drain(..(r - keep) * width);
                }
                (o, dt)
            };
            vals[node.output.0] = Some(out);
            times[i].push(dt.as_secs_f64());
        }
        progress(rep + 1, reps);
    }
    let node_seconds: Vec<f64> = times.into_iter().map(median).collect();
    let mut steps = Vec::with_capacity(reps);
    for _ in 0..reps {
        let ids = tokens(&mut rng, w.rows);
        let t0 = Instant::now();
        let rows = if w.out_rows >= w.rows {
            Rows::All
        } else {
            Rows::Range(w.rows - w.out_rows..w.rows)
        };
        std::hint::black_box(exec.forward(&mut s, &ids, rows, &[])?);
        steps.push(t0.elapsed().as_secs_f64());
        s.truncate(w.past);
    }
    Ok(Measured {
        workload: *w,
        node_seconds,
        step_seconds: median(steps),
        reps,
    })
}

/// Ranks with ties averaged (1-based).
fn ranks(v: &[f64]) -> Vec<f64> {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|&a, &b| v[a].total_cmp(&v[b]));
    let mut r = vec![0.0; v.len()];
    let mut i = 0;
    while i < idx.len() {
        let mut j = i;
        while j + 1 < idx.len() && v[idx[j + 1]] == v[idx[i]] {
            j += 1;
        }
        let avg = (i + j) as f64 / 2.0 + 1.0;
        for &k in &idx[i..=j] {
            r[k] = avg;
        }
        i = j + 1;
    }
    r
}

/// Spearman's rank correlation of two equally long series (NaN for fewer than 2).
pub fn spearman(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    if a.len() < 2 {
        return f64::NAN;
    }
    let (ra, rb) = (ranks(a), ranks(b));
    let n = a.len() as f64;
    let (ma, mb) = (ra.iter().sum::<f64>() / n, rb.iter().sum::<f64>() / n);
    let cov: f64 = ra.iter().zip(&rb).map(|(x, y)| (x - ma) * (y - mb)).sum();
    let va: f64 = ra.iter().map(|x| (x - ma).powi(2)).sum();
    let vb: f64 = rb.iter().map(|y| (y - mb).powi(2)).sum();
    cov / (va * vb).sqrt()
}

/// Predicted against measured seconds, per op kind and in total.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Comparison {
    pub workload: Workload,
    /// Per op kind: (kind, predicted, measured alone) seconds summed over its nodes.
    pub kinds: Vec<(String, f64, f64)>,
    /// Rank correlation over the op kinds and over the single nodes.
    pub spearman_kinds: f64,
    pub spearman_nodes: f64,
    pub predicted_seconds: f64,
    /// A whole step as the runtime runs it, and the sum of the nodes timed alone.
    pub measured_step_seconds: f64,
    pub measured_nodes_seconds: f64,
    /// (predicted - measured step) / measured step.
    pub total_error: f64,
}

/// Compares a schedule planned for `m.workload` with the measurement.
pub fn compare(s: &Schedule, m: &Measured) -> Comparison {
    let pred: Vec<f64> = s.ops.iter().map(|p| p.seconds).collect();
    let mut kinds: BTreeMap<String, (f64, f64)> = BTreeMap::new();
    for (p, t) in s.ops.iter().zip(&m.node_seconds) {
        let e = kinds.entry(p.op.clone()).or_default();
        e.0 += p.seconds;
        e.1 += t;
    }
    let kinds: Vec<(String, f64, f64)> = kinds.into_iter().map(|(k, (p, t))| (k, p, t)).collect();
    let kp: Vec<f64> = kinds.iter().map(|k| k.1).collect();
    let km: Vec<f64> = kinds.iter().map(|k| k.2).collect();
    let predicted: f64 = pred.iter().sum();
    Comparison {
        workload: m.workload,
        spearman_kinds: spearman(&kp, &km),
        spearman_nodes: spearman(&pred, &m.node_seconds),
        kinds,
        predicted_seconds: predicted,
        measured_step_seconds: m.step_seconds,
        measured_nodes_seconds: m.node_seconds.iter().sum(),
        total_error: (predicted - m.step_seconds) / m.step_seconds,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spearman_of_monotone_and_reversed_series() {
        let a = [1.0, 2.0, 3.0, 4.0];
        assert!((spearman(&a, &[10.0, 20.0, 30.0, 400.0]) - 1.0).abs() < 1e-12);
        assert!((spearman(&a, &[4.0, 3.0, 2.0, 1.0]) + 1.0).abs() < 1e-12);
        assert_eq!(ranks(&[5.0, 1.0, 5.0]), vec![2.5, 1.0, 2.5]);
    }
}
