//! The request's voting mode, mapped onto the tuning module's voting
//! ([`crate::train::vote`], which combines the exits' distributions).

use edge_proto::runtime::VotingMode;

use super::ServiceError;
use crate::train::vote::Vote;

/// The voting of a request; `weights` are the tuned model's fitted exit weights (for
/// `weighted`).
pub fn to_vote(mode: VotingMode, weights: &[f32]) -> Vote {
    match mode {
        VotingMode::Last => Vote::Last,
        VotingMode::MaxConfidence => Vote::MaxConfidence,
        VotingMode::Mean => Vote::Mean,
        VotingMode::Weighted => Vote::Weighted(weights.to_vec()),
    }
}

/// The vote of `mode` on a model with `exits` exit heads and fitted `weights`
/// (`exits == 0`: the bundle as built, no tuned model named).
pub fn check_mode(mode: VotingMode, exits: usize, weights: &[f32]) -> Result<Vote, ServiceError> {
    let vote = to_vote(mode, weights);
    if mode != VotingMode::Last && exits == 0 {
        return Err(ServiceError::BadRequest(format!(
            "voting mode `{}` needs exit heads: name a finished tuning job in tune_job (or `latest`), \
             or use `last`",
            vote.name()
        )));
    }
    if mode == VotingMode::Weighted && weights.len() != exits {
        return Err(ServiceError::BadRequest(format!(
            "weighted voting needs fitted weights for the job's {exits} exits (voting.json); it has {}",
            weights.len()
        )));
    }
    Ok(vote)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_need_exits() {
        assert!(
            check_mode(VotingMode::Mean, 0, &[])
                .unwrap_err()
                .to_string()
                .contains("tune_job")
        );
        assert_eq!(check_mode(VotingMode::Last, 0, &[]).unwrap(), Vote::Last);
        assert_eq!(
            check_mode(VotingMode::MaxConfidence, 2, &[]).unwrap(),
            Vote::MaxConfidence
        );
        assert!(check_mode(VotingMode::Weighted, 2, &[1.0]).is_err());
        assert_eq!(
            check_mode(VotingMode::Weighted, 2, &[0.5, 0.5]).unwrap(),
            Vote::Weighted(vec![0.5, 0.5])
        );
    }
}
