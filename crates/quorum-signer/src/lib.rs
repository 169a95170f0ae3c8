//! The only crate that touches the signing key. The signer does not take the controller's word
//! for a verdict: given the stored evidence (every worker's signed report and the worker keys
//! from enrollment) it re-checks each report's signature, recomputes each job's verdict, and
//! only then signs the build's provenance statement.
//!
//! Nothing on the worker side may depend on this crate (a test checks `cargo tree`).

use std::path::Path;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use ed25519_dalek::{Signature, Signer as _, SigningKey, Verifier as _, VerifyingKey};
use quorum_api::v1::controller::{ReportedResult, ResultReport};
use quorum_api::v1::worker_auth::report_message;
use quorum_core::attest::{self, BuildFacts, Builder, Envelope, JobFacts};
use quorum_core::pipeline::Policy;
use quorum_core::verdict::{JobVerdict, ResultView, job_verdict};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SignError {
    #[error("cannot read signing key {path}: {message}")]
    Key { path: String, message: String },
    #[error(
        "job `{job}`: the report of assignment {assignment} does not verify with worker {worker}'s key"
    )]
    BadReportSignature {
        job: String,
        assignment: String,
        worker: String,
    },
    #[error(
        "job `{job}`: the report of assignment {assignment} is about {about}, not this build and job"
    )]
    ReportMismatch {
        job: String,
        assignment: String,
        about: String,
    },
    #[error("job `{job}`: the report of assignment {assignment} is not valid: {message}")]
    BadReport {
        job: String,
        assignment: String,
        message: String,
    },
    #[error("job `{job}` is not verified by its evidence: {verdict}")]
    NotVerified { job: String, verdict: String },
    #[error("the build has no jobs")]
    Empty,
}

/// The stored evidence for one build.
#[derive(Debug, Clone)]
pub struct Evidence {
    pub controller: String,
    pub build_id: String,
    pub repository: String,
    pub commit: String,
    pub started_on: String,
    pub finished_on: String,
    pub jobs: Vec<JobEvidence>,
}

#[derive(Debug, Clone)]
pub struct JobEvidence {
    pub name: String,
    pub policy: Policy,
    pub results: Vec<ResultEvidence>,
}

/// One worker's signed report with what the controller's operator says about that worker.
#[derive(Debug, Clone)]
pub struct ResultEvidence {
    pub assignment: String,
    pub worker: String,
    pub owner: String,
    pub trusted: bool,
    pub worker_key: VerifyingKey,
    /// The report JSON exactly as the worker signed it.
    pub report: String,
    /// Base64 signature over `report_message(report)`.
    pub signature: String,
}

pub struct Signer {
    key: SigningKey,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("key_id", &self.key_id())
            .finish_non_exhaustive()
    }
}

impl Signer {
    /// Loads the signing key from `path` (32 raw bytes, mode 0600), creating it on first start.
    pub fn load_or_create(path: &Path) -> Result<Signer, SignError> {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let err = |message: String| SignError::Key {
            path: path.display().to_string(),
            message,
        };
        match std::fs::read(path) {
            Ok(bytes) => {
                let arr: [u8; 32] = bytes
                    .as_slice()
                    .try_into()
                    .map_err(|_| err("not a 32-byte key".into()))?;
                Ok(Signer {
                    key: SigningKey::from_bytes(&arr),
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = SigningKey::generate(&mut rand_core::OsRng);
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir).map_err(|e| err(e.to_string()))?;
                }
                let tmp = path.with_extension("tmp");
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o600)
                    .open(&tmp)
                    .map_err(|e| err(e.to_string()))?;
                f.write_all(key.as_bytes())
                    .and_then(|_| f.sync_all())
                    .map_err(|e| err(e.to_string()))?;
                std::fs::rename(&tmp, path).map_err(|e| err(e.to_string()))?;
                Ok(Signer { key })
            }
            Err(e) => Err(err(e.to_string())),
        }
    }

    pub fn public_key(&self) -> VerifyingKey {
        self.key.verifying_key()
    }

    pub fn key_id(&self) -> String {
        attest::key_id(&self.key.verifying_key())
    }

    /// Re-checks the evidence and signs the build's provenance. Refuses unless every job is
    /// verified by its own evidence.
    pub fn sign_build(&self, evidence: &Evidence) -> Result<Envelope, SignError> {
        if evidence.jobs.is_empty() {
            return Err(SignError::Empty);
        }
        let mut jobs = Vec::new();
        for job in &evidence.jobs {
            jobs.push(check_job(&evidence.build_id, job)?);
        }
        let facts = BuildFacts {
            controller: evidence.controller.clone(),
            build_id: evidence.build_id.clone(),
            repository: evidence.repository.clone(),
            commit: evidence.commit.clone(),
            started_on: evidence.started_on.clone(),
            finished_on: evidence.finished_on.clone(),
            jobs,
        };
        let statement = attest::provenance_statement(&facts);
        Ok(attest::envelope_with(&statement, self.key_id(), |m| {
            self.key.sign(m).to_bytes()
        }))
    }
}

fn check_job(build_id: &str, job: &JobEvidence) -> Result<JobFacts, SignError> {
    let mut views = Vec::new();
    let mut reports = Vec::new();
    for r in &job.results {
        let bad_sig = || SignError::BadReportSignature {
            job: job.name.clone(),
            assignment: r.assignment.clone(),
            worker: r.worker.clone(),
        };
        let sig = B64.decode(&r.signature).map_err(|_| bad_sig())?;
        let sig = Signature::from_slice(&sig).map_err(|_| bad_sig())?;
        r.worker_key
            .verify(&report_message(r.report.as_bytes()), &sig)
            .map_err(|_| bad_sig())?;
        let report: ResultReport =
            serde_json::from_str(&r.report).map_err(|e| SignError::BadReport {
                job: job.name.clone(),
                assignment: r.assignment.clone(),
                message: e.to_string(),
            })?;
        if report.build_id != build_id
            || report.job != job.name
            || report.assignment != r.assignment
            || report.worker != r.worker
        {
            return Err(SignError::ReportMismatch {
                job: job.name.clone(),
                assignment: r.assignment.clone(),
                about: format!(
                    "build {} job {} assignment {} worker {}",
                    report.build_id, report.job, report.assignment, report.worker
                ),
            });
        }
        if let ReportedResult::Success {
            manifest,
            manifest_digest,
        } = &report.result
            && (manifest.validate().is_err() || manifest.digest() != *manifest_digest)
        {
            return Err(SignError::BadReport {
                job: job.name.clone(),
                assignment: r.assignment.clone(),
                message: "manifest does not match its digest".into(),
            });
        }
        views.push(ResultView {
            worker: r.worker.clone(),
            owner: r.owner.clone(),
            trusted: r.trusted,
            outcome: report.result.outcome(),
        });
        reports.push((r, report));
    }
    let verdict = job_verdict(job.policy, &views, 0);
    let JobVerdict::Verified {
        manifest: digest,
        workers,
    } = verdict
    else {
        return Err(SignError::NotVerified {
            job: job.name.clone(),
            verdict: format!("{verdict:?}"),
        });
    };
    let (_, agreed) = reports
        .iter()
        .find(|(_, rep)| matches!(&rep.result, ReportedResult::Success { manifest_digest, .. } if *manifest_digest == digest))
        .expect("a verified digest comes from some report");
    let ReportedResult::Success { manifest, .. } = &agreed.result else {
        unreachable!("matched above")
    };
    let builders = reports
        .iter()
        .filter(|(_, rep)| workers.contains(&rep.worker))
        .map(|(r, _)| Builder {
            worker: r.worker.clone(),
            owner: r.owner.clone(),
            key_id: attest::key_id(&r.worker_key),
            trusted: r.trusted,
        })
        .collect();
    Ok(JobFacts {
        name: job.name.clone(),
        policy: job.policy,
        manifest: digest,
        builders,
        artifacts: manifest
            .entries
            .iter()
            .map(|e| (e.path.clone(), e.digest))
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use quorum_api::v1::controller::{EnvironmentFacts, Usage};
    use quorum_core::{Digest, Manifest, ManifestEntry};

    fn report(worker: &SigningKey, id: &str, assignment: &str, content: &[u8]) -> ResultEvidence {
        let manifest = Manifest::new(vec![ManifestEntry {
            path: "out/a".into(),
            mode: 0o644,
            size: content.len() as u64,
            digest: Digest::of(content),
        }])
        .unwrap();
        let rep = ResultReport {
            assignment: assignment.into(),
            build_id: "b1".into(),
            job: "build".into(),
            worker: id.into(),
            result: ReportedResult::Success {
                manifest_digest: manifest.digest(),
                manifest,
            },
            usage: Usage::default(),
            environment: EnvironmentFacts::default(),
        };
        let json = serde_json::to_string(&rep).unwrap();
        let sig = B64.encode(worker.sign(&report_message(json.as_bytes())).to_bytes());
        ResultEvidence {
            assignment: assignment.into(),
            worker: id.into(),
            owner: format!("owner-{id}"),
            trusted: false,
            worker_key: worker.verifying_key(),
            report: json,
            signature: sig,
        }
    }

    fn evidence(results: Vec<ResultEvidence>) -> Evidence {
        Evidence {
            controller: "c".into(),
            build_id: "b1".into(),
            repository: "r".into(),
            commit: "0".repeat(40),
            started_on: "t0".into(),
            finished_on: "t1".into(),
            jobs: vec![JobEvidence {
                name: "build".into(),
                policy: Policy {
                    quorum: 2,
                    trusted: 0,
                },
                results,
            }],
        }
    }

    fn signer() -> Signer {
        Signer {
            key: SigningKey::from_bytes(&[9; 32]),
        }
    }

    #[test]
    fn signs_agreeing_evidence() {
        let (w1, w2) = (
            SigningKey::from_bytes(&[1; 32]),
            SigningKey::from_bytes(&[2; 32]),
        );
        let s = signer();
        let env = s
            .sign_build(&evidence(vec![
                report(&w1, "w1", "a1", b"x"),
                report(&w2, "w2", "a2", b"x"),
            ]))
            .unwrap();
        let statement = attest::verify_envelope(&env, &s.public_key()).unwrap();
        let subjects = attest::subjects(&statement).unwrap();
        assert_eq!(subjects[0].digest.sha256, Digest::of(b"x").hex());
    }

    #[test]
    fn refuses_disagreement_forged_reports_and_swapped_keys() {
        let (w1, w2) = (
            SigningKey::from_bytes(&[1; 32]),
            SigningKey::from_bytes(&[2; 32]),
        );
        let s = signer();
        let differ = evidence(vec![
            report(&w1, "w1", "a1", b"x"),
            report(&w2, "w2", "a2", b"evil"),
        ]);
        assert!(matches!(
            s.sign_build(&differ),
            Err(SignError::NotVerified { .. })
        ));

        // The controller's database claims w2 agreed, but the report was signed by someone else.
        let mut forged = report(&w1, "w2", "a2", b"x");
        forged.worker_key = w2.verifying_key();
        let e = evidence(vec![report(&w1, "w1", "a1", b"x"), forged]);
        assert!(matches!(
            s.sign_build(&e),
            Err(SignError::BadReportSignature { .. })
        ));

        // A report for another assignment cannot be counted twice.
        let mut replayed = report(&w1, "w1", "a1", b"x");
        replayed.assignment = "a2".into();
        let e = evidence(vec![report(&w1, "w1", "a1", b"x"), replayed]);
        assert!(matches!(
            s.sign_build(&e),
            Err(SignError::ReportMismatch { .. })
        ));
    }
}
