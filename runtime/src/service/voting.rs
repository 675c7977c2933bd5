//! The request's voting mode, mapped onto the tuning module's voting
//! ([`crate::train::vote`], which combines the exits' distributions).

use edge_proto::runtime::VotingMode;

use super::ServiceError;
use crate::train::vote::Vote;

/// The voting of a request; `weights` are the bundle's fitted exit weights (for `weighted`).
pub fn to_vote(mode: VotingMode, weights: &[f32]) -> Vote {
    match mode {
        VotingMode::Last => Vote::Last,
        VotingMode::MaxConfidence => Vote::MaxConfidence,
        VotingMode::Mean => Vote::Mean,
        VotingMode::Weighted => Vote::Weighted(weights.to_vec()),
    }
}

/// Checks that a bundle with `exits` exit heads can serve `mode`.
pub fn check_mode(mode: VotingMode, exits: u32) -> Result<Vote, ServiceError> {
    let vote = to_vote(mode, &[]);
    if mode != VotingMode::Last && exits == 0 {
        return Err(ServiceError::BadRequest(format!(
            "voting mode `{}` needs exit heads, and the active bundle has no exit heads; use `last`",
            vote.name()
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
            check_mode(VotingMode::Mean, 0)
                .unwrap_err()
                .to_string()
                .contains("no exit heads")
        );
        assert_eq!(check_mode(VotingMode::Last, 0).unwrap(), Vote::Last);
        assert_eq!(
            check_mode(VotingMode::MaxConfidence, 2).unwrap(),
            Vote::MaxConfidence
        );
        assert_eq!(
            to_vote(VotingMode::Weighted, &[0.5, 0.5]),
            Vote::Weighted(vec![0.5, 0.5])
        );
    }
}
