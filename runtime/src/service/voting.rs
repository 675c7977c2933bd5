//! Combining the exits' next-token predictions (the request's voting mode).
//!
//! Every exit (and the final head) gives logits over the vocabulary; [`combine`] turns them
//! into one distribution's log-probabilities, which the sampler treats as logits.

use edge_proto::runtime::VotingMode;

use super::ServiceError;

/// Checks that a bundle with `exits` exit heads can serve `mode`.
pub fn check_mode(mode: VotingMode, exits: u32) -> Result<(), ServiceError> {
    if mode != VotingMode::Last && exits == 0 {
        return Err(ServiceError::BadRequest(format!(
            "voting mode `{}` needs exit heads, and the active bundle has no exit heads; use `last`",
            mode_name(mode)
        )));
    }
    Ok(())
}

pub fn mode_name(mode: VotingMode) -> &'static str {
    match mode {
        VotingMode::Last => "last",
        VotingMode::MaxConfidence => "max-confidence",
        VotingMode::Mean => "mean",
        VotingMode::Weighted => "weighted",
    }
}

/// Parses the names `edgec` and docs use.
pub fn parse_mode(name: &str) -> Option<VotingMode> {
    Some(match name {
        "last" => VotingMode::Last,
        "max-confidence" => VotingMode::MaxConfidence,
        "mean" => VotingMode::Mean,
        "weighted" => VotingMode::Weighted,
        _ => return None,
    })
}

fn softmax(logits: &[f32]) -> Vec<f32> {
    let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut p: Vec<f32> = logits.iter().map(|&l| (l - m).exp()).collect();
    let s: f32 = p.iter().sum();
    p.iter_mut().for_each(|x| *x /= s);
    p
}

/// Combines the heads' logits (`heads[i]`, the final head last) by `mode`; `weights` are the
/// bundle's per-head weights for `Weighted`. Returns logits (log-probabilities for the
/// averaging modes, the chosen head's logits otherwise).
pub fn combine(mode: VotingMode, heads: &[&[f32]], weights: &[f32]) -> Vec<f32> {
    assert!(!heads.is_empty(), "combine: no heads");
    match mode {
        VotingMode::Last => heads[heads.len() - 1].to_vec(),
        VotingMode::MaxConfidence => {
            let conf = |h: &[f32]| softmax(h).into_iter().fold(0.0f32, f32::max);
            let best = heads
                .iter()
                .enumerate()
                .map(|(i, h)| (i, conf(h)))
                .fold((0, f32::NEG_INFINITY), |a, b| if b.1 > a.1 { b } else { a })
                .0;
            heads[best].to_vec()
        }
        VotingMode::Mean | VotingMode::Weighted => {
            let w: Vec<f32> = if mode == VotingMode::Mean || weights.len() != heads.len() {
                vec![1.0; heads.len()]
            } else {
                weights.to_vec()
            };
            let total: f32 = w.iter().sum();
            let mut p = vec![0.0f32; heads[0].len()];
            for (h, &wi) in heads.iter().zip(&w) {
                for (acc, x) in p.iter_mut().zip(softmax(h)) {
                    *acc += wi / total * x;
                }
            }
            p.into_iter().map(|x| x.max(f32::MIN_POSITIVE).ln()).collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampling::argmax;

    #[test]
    fn modes() {
        let early = [2.0f32, 0.0, 0.0]; // confident in token 0
        let last = [0.0f32, 0.4, 0.3]; // unsure, prefers token 1
        let heads: [&[f32]; 2] = [&early, &last];
        assert_eq!(argmax(&combine(VotingMode::Last, &heads, &[])), 1);
        assert_eq!(argmax(&combine(VotingMode::MaxConfidence, &heads, &[])), 0);
        assert_eq!(argmax(&combine(VotingMode::Mean, &heads, &[])), 0);
        // Weighting the last head heavily makes it decide.
        assert_eq!(argmax(&combine(VotingMode::Weighted, &heads, &[0.01, 0.99])), 1);
        let p: f32 = combine(VotingMode::Mean, &heads, &[])
            .iter()
            .map(|l| l.exp())
            .sum();
        assert!((p - 1.0).abs() < 1e-5);
        assert!(check_mode(VotingMode::Mean, 0).is_err());
        assert!(check_mode(VotingMode::Last, 0).is_ok());
        assert!(check_mode(VotingMode::Weighted, 2).is_ok());
        for name in ["last", "max-confidence", "mean", "weighted"] {
            assert_eq!(mode_name(parse_mode(name).unwrap()), name);
        }
        assert!(parse_mode("median").is_none());
    }
}
