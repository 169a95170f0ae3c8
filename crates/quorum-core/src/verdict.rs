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

/// A disputed job's verdict once trusted workers rebuilt it to break the tie (an operator's
/// request). `results` are the round's results, the dispute's record, which stays as it was;
/// `rebuilds` are the rebuilds' results, of which only trusted workers' count. When every
/// trusted rebuild agrees with one side of the dispute and that side, counting them, meets the
/// policy, the job takes that side's verdict; otherwise it stays disputed, the rebuilds joining
/// the record. The minority is not marked: its result stays in the record as it was reported.
///
/// Without trusted rebuilds, or when `results` are not a dispute, this is `job_verdict` with
/// nothing outstanding, so the signer can call it for every job.
pub fn verdict_with_rebuilds(
    policy: Policy,
    results: &[ResultView],
    rebuilds: &[ResultView],
) -> JobVerdict {
    let base = job_verdict(policy, results, 0);
    let trusted: Vec<&ResultView> = rebuilds.iter().filter(|r| r.trusted).collect();
    let JobVerdict::Disputed { .. } = base else {
        return base;
    };
    let Some(first) = trusted.first() else {
        return base;
    };
    let unanimous = trusted.iter().all(|r| r.outcome == first.outcome);
    let side: Vec<ResultView> = results
        .iter()
        .filter(|r| r.outcome == first.outcome)
        .chain(trusted.iter().copied())
        .cloned()
        .collect();
    // The side must have been one of the dispute's: a trusted result agreeing with no one
    // explains nothing.
    if unanimous && side.len() > trusted.len() {
        match job_verdict(policy, &side, 0) {
            v @ (JobVerdict::Verified { .. } | JobVerdict::Failed { .. }) => return v,
            JobVerdict::Pending { .. } | JobVerdict::Disputed { .. } => {}
        }
    }
    let all: Vec<ResultView> = results
        .iter()
        .chain(trusted.iter().copied())
        .cloned()
        .collect();
    JobVerdict::Disputed {
        groups: groups(&all),
    }
}

/// Every distinct outcome and the workers that reported it, one worker per owner.
fn groups(results: &[ResultView]) -> Vec<(Outcome, Vec<String>)> {
    let mut groups: BTreeMap<&Outcome, Vec<&ResultView>> = BTreeMap::new();
    for r in results {
        let group = groups.entry(&r.outcome).or_default();
        if !group.iter().any(|g| g.owner == r.owner) {
            group.push(r);
        }
    }
    groups
        .into_iter()
        .map(|(o, m)| (o.clone(), m.iter().map(|r| r.worker.clone()).collect()))
        .collect()
}

/// The manifest every result so far agrees on, when there are results and all succeeded with
/// it: what a job accepting provisional inputs may start on before the policy is met.
pub fn provisional_manifest(results: &[ResultView]) -> Option<Digest> {
    let mut manifests = results.iter().map(|r| match r.outcome {
        Outcome::Success { manifest } => Some(manifest),
        Outcome::Failed => None,
    });
    let first = manifests.next()??;
    manifests.all(|m| m == Some(first)).then_some(first)
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

    #[test]
    fn a_trusted_rebuild_breaks_a_tie_toward_the_side_it_agrees_with() {
        let p = Policy {
            quorum: 2,
            trusted: 0,
        };
        let (good, evil) = (ok(b"good"), ok(b"evil"));
        let dispute = vec![r("w1", "o1", false, &good), r("w2", "o2", false, &evil)];
        assert!(matches!(
            verdict_with_rebuilds(p, &dispute, &[]),
            JobVerdict::Disputed { .. }
        ));
        let verified = verdict_with_rebuilds(p, &dispute, &[r("t", "us", true, &good)]);
        assert_eq!(
            verified,
            JobVerdict::Verified {
                manifest: Digest::of(b"good"),
                workers: vec!["w1".into(), "t".into()]
            }
        );
        // An untrusted "rebuild" counts for nothing, and a trusted one agreeing with neither
        // side joins the record without deciding anything.
        assert!(matches!(
            verdict_with_rebuilds(p, &dispute, &[r("u", "x", false, &good)]),
            JobVerdict::Disputed { .. }
        ));
        let JobVerdict::Disputed { groups } =
            verdict_with_rebuilds(p, &dispute, &[r("t", "us", true, &ok(b"third"))])
        else {
            panic!("a third answer does not decide")
        };
        assert_eq!(groups.len(), 3);
        // Trusted rebuilds that disagree among themselves decide nothing either.
        assert!(matches!(
            verdict_with_rebuilds(
                p,
                &dispute,
                &[r("t", "us", true, &good), r("t2", "them", true, &evil)]
            ),
            JobVerdict::Disputed { .. }
        ));
    }

    #[test]
    fn a_tie_break_must_still_meet_the_policy() {
        let p = Policy {
            quorum: 3,
            trusted: 0,
        };
        let (a, b) = (ok(b"a"), ok(b"b"));
        let dispute = vec![
            r("w1", "o1", false, &a),
            r("w2", "o2", false, &a),
            r("w3", "o3", false, &b),
        ];
        // Agreeing with the single `b` makes two, short of three: still disputed.
        assert!(matches!(
            verdict_with_rebuilds(p, &dispute, &[r("t", "us", true, &b)]),
            JobVerdict::Disputed { .. }
        ));
        assert!(matches!(
            verdict_with_rebuilds(p, &dispute, &[r("t", "us", true, &a)]),
            JobVerdict::Verified { .. }
        ));
        // The trusted worker's owner already on the side counts once.
        assert!(matches!(
            verdict_with_rebuilds(p, &dispute, &[r("t", "o3", true, &b)]),
            JobVerdict::Disputed { .. }
        ));
        // Agreeing with a failure side fails the job.
        let f = Outcome::Failed;
        let failing = vec![r("w1", "o1", false, &f), r("w2", "o2", false, &a)];
        let q2 = Policy {
            quorum: 2,
            trusted: 0,
        };
        assert!(matches!(
            verdict_with_rebuilds(q2, &failing, &[r("t", "us", true, &f)]),
            JobVerdict::Failed { .. }
        ));
    }

    #[test]
    fn provisional_inputs_need_agreeing_successes() {
        let a = ok(b"a");
        assert_eq!(provisional_manifest(&[]), None);
        assert_eq!(
            provisional_manifest(&[r("w1", "o1", false, &a)]),
            Some(Digest::of(b"a"))
        );
        assert_eq!(
            provisional_manifest(&[r("w1", "o1", false, &a), r("w2", "o2", false, &ok(b"b"))]),
            None
        );
        assert_eq!(
            provisional_manifest(&[r("w1", "o1", false, &Outcome::Failed)]),
            None
        );
    }
}
