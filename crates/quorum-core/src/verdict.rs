//! The quorum rule: from the results stored for one job, decide whether it is verified, failed,
//! disputed, or still waiting. The verdict is a pure function of the stored results, so the
//! controller, the signer and anyone auditing the database compute the same answer.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::pipeline::Policy;

/// What one worker reported for one job.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Outcome {
    /// The steps succeeded and the outputs have this manifest digest.
    Success { manifest: Digest },
    /// A step exited non-zero or hit the job's timeout. Agreement on failure is also a verdict.
    Failed,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResultView {
    pub worker: String,
    pub owner: String,
    pub trusted: bool,
    pub outcome: Outcome,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum JobVerdict {
    /// Not enough results yet. `agreeing` is the size of the largest group of identical results.
    Pending { results: usize, agreeing: usize },
    /// `quorum` identical successful results with enough trusted workers among them.
    Verified {
        manifest: Digest,
        workers: Vec<String>,
    },
    /// `quorum` workers agree that the job fails.
    Failed { workers: Vec<String> },
    /// Results differ and every assignment has reported: the record shows who produced what.
    Disputed { groups: Vec<(Outcome, Vec<String>)> },
}

impl JobVerdict {
    pub fn is_final(&self) -> bool {
        !matches!(self, JobVerdict::Pending { .. })
    }
}

/// Decides one job. `outstanding` is the number of assignments still running; a dispute is
/// declared only once they have all reported, so the record holds every worker's result.
///
/// Results from one owner count once: two workers of the same owner are one witness.
pub fn job_verdict(policy: Policy, results: &[ResultView], outstanding: usize) -> JobVerdict {
    let mut groups: BTreeMap<&Outcome, Vec<&ResultView>> = BTreeMap::new();
    for r in results {
        let group = groups.entry(&r.outcome).or_default();
        if !group.iter().any(|g| g.owner == r.owner) {
            group.push(r);
        }
    }
    for (outcome, members) in &groups {
        let trusted = members.iter().filter(|m| m.trusted).count() as u32;
        if members.len() as u32 >= policy.quorum {
            let workers: Vec<String> = members.iter().map(|m| m.worker.clone()).collect();
            match outcome {
                Outcome::Success { manifest } if trusted >= policy.trusted => {
                    return JobVerdict::Verified {
                        manifest: *manifest,
                        workers,
                    };
                }
                Outcome::Failed => return JobVerdict::Failed { workers },
                Outcome::Success { .. } => {}
            }
        }
    }
    if groups.len() > 1 && outstanding == 0 {
        return JobVerdict::Disputed {
            groups: groups
                .into_iter()
                .map(|(o, m)| (o.clone(), m.iter().map(|r| r.worker.clone()).collect()))
                .collect(),
        };
    }
    JobVerdict::Pending {
        results: results.len(),
        agreeing: groups.values().map(Vec::len).max().unwrap_or(0),
    }
}

/// Whether a job whose `round` ended in failure (its workers agree it fails, or it used up its
/// attempts) runs again: while fewer than `retries` retries were made. Disputes are never
/// retried: another round could outvote a disagreement that has to be explained instead.
pub fn retry_after_failure(round: i64, retries: u32) -> bool {
    round < i64::from(retries)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(worker: &str, owner: &str, trusted: bool, outcome: &Outcome) -> ResultView {
        ResultView {
            worker: worker.into(),
            owner: owner.into(),
            trusted,
            outcome: outcome.clone(),
        }
    }

    fn ok(b: &[u8]) -> Outcome {
        Outcome::Success {
            manifest: Digest::of(b),
        }
    }

    #[test]
    fn identical_results_reach_quorum() {
        let p = Policy {
            quorum: 3,
            trusted: 0,
        };
        let a = ok(b"a");
        let rs = vec![r("w1", "o1", false, &a), r("w2", "o2", false, &a)];
        assert!(matches!(
            job_verdict(p, &rs, 1),
            JobVerdict::Pending { agreeing: 2, .. }
        ));
        let mut rs3 = rs.clone();
        rs3.push(r("w3", "o3", false, &a));
        assert_eq!(
            job_verdict(p, &rs3, 0),
            JobVerdict::Verified {
                manifest: Digest::of(b"a"),
                workers: vec!["w1".into(), "w2".into(), "w3".into()]
            }
        );
    }

    #[test]
    fn one_owner_is_one_witness() {
        let p = Policy {
            quorum: 2,
            trusted: 0,
        };
        let a = ok(b"a");
        let rs = vec![r("w1", "mallory", false, &a), r("w2", "mallory", false, &a)];
        assert!(matches!(job_verdict(p, &rs, 0), JobVerdict::Pending { .. }));
    }

    #[test]
    fn trusted_requirement_holds_back_verification() {
        let p = Policy {
            quorum: 2,
            trusted: 1,
        };
        let a = ok(b"a");
        let untrusted = vec![r("w1", "o1", false, &a), r("w2", "o2", false, &a)];
        assert!(matches!(
            job_verdict(p, &untrusted, 0),
            JobVerdict::Pending { .. }
        ));
        let with_trusted = vec![r("w1", "o1", false, &a), r("t", "us", true, &a)];
        assert!(matches!(
            job_verdict(p, &with_trusted, 0),
            JobVerdict::Verified { .. }
        ));
    }

    #[test]
    fn differing_results_are_disputed_once_all_reported() {
        let p = Policy {
            quorum: 3,
            trusted: 0,
        };
        let rs = vec![
            r("w1", "o1", false, &ok(b"a")),
            r("w2", "o2", false, &ok(b"a")),
            r("w3", "o3", false, &ok(b"evil")),
        ];
        assert!(matches!(
            job_verdict(p, &rs[..2], 1),
            JobVerdict::Pending { .. }
        ));
        let v = job_verdict(p, &rs, 0);
        let JobVerdict::Disputed { groups } = v else {
            panic!("expected dispute, got {v:?}")
        };
        assert_eq!(groups.len(), 2);
        assert!(
            groups
                .iter()
                .any(|(o, w)| *o == ok(b"evil") && w == &vec!["w3".to_string()])
        );
    }

    #[test]
    fn agreed_failure_fails_and_mixed_failure_disputes() {
        let p = Policy {
            quorum: 2,
            trusted: 0,
        };
        let f = Outcome::Failed;
        assert!(matches!(
            job_verdict(p, &[r("w1", "o1", false, &f), r("w2", "o2", false, &f)], 0),
            JobVerdict::Failed { .. }
        ));
        assert!(matches!(
            job_verdict(
                p,
                &[r("w1", "o1", false, &f), r("w2", "o2", false, &ok(b"a"))],
                0
            ),
            JobVerdict::Disputed { .. }
        ));
    }
}
