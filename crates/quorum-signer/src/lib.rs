//! The only crate that touches the signing key. The signer does not take the controller's word
//! for a verdict: given the stored evidence (every worker's signed report and the worker keys
//! from enrollment) it re-checks each report's signature, recomputes each job's verdict, and
//! only then signs the build's provenance statement and, beside it, an SLSA Verification
//! Summary naming the policy and the agreeing builders.
//!
//! The signing key is a key ring (`ring.rs`): one active key, retired keys kept public so older
//! statements keep verifying, rotation and revocation by the operator's CLI.
//!
//! Nothing on the worker side may depend on this crate (a test checks `cargo tree`).

mod ring;

use std::path::Path;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use ed25519_dalek::{Signature, Signer as _, VerifyingKey, verify_batch};
use quorum_api::v1::controller::{ReportedResult, ResultReport};
use quorum_api::v1::worker_auth::report_message;
use quorum_core::attest::{self, BuildFacts, Builder, Envelope, JobFacts};
use quorum_core::pipeline::Policy;
use quorum_core::verdict::{JobVerdict, ResultView, verdict_with_rebuilds};

pub use ring::{KeyRing, RING_FILE, SignerKeyInfo, SignerKeyState};

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
    #[error("the signer has no key `{0}`")]
    UnknownKey(String),
    #[error("key `{0}` is the active signing key; rotate to a new key before revoking it")]
    RevokeActive(String),
    #[error("the active signing key `{0}` is revoked; rotate to a new key before signing")]
    ActiveRevoked(String),
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
    /// Trusted rebuilds an operator asked for to break a dispute among `results`: counted by
    /// `verdict_with_rebuilds`, which lets only trusted workers' results decide.
    pub rebuilds: Vec<ResultEvidence>,
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

/// What the signer signs for one verified build: the provenance and the verification summary,
/// by the same key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedBuild {
    pub provenance: Envelope,
    pub summary: Envelope,
}

/// Signs with the active key of its ring, read from disk at every signature so a rotation made
/// while the controller runs counts from the next build. No `Debug` of key material.
pub struct Signer {
    ring: KeyRing,
    /// The active key when the signer was loaded, for logs and the local federation's banner.
    loaded: VerifyingKey,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("key_id", &self.key_id())
            .finish_non_exhaustive()
    }
}

impl Signer {
    /// Opens the key ring whose active key is `path` (32 raw bytes, mode 0600), creating the
    /// key on first start and listing it in the ring (`signer-keys.json` beside it).
    pub fn load_or_create(path: &Path) -> Result<Signer, SignError> {
        let ring = KeyRing::new(path);
        let loaded = ring.active()?.verifying_key();
        Ok(Signer { ring, loaded })
    }

    /// The active key when the signer was loaded.
    pub fn public_key(&self) -> VerifyingKey {
        self.loaded
    }

    pub fn key_id(&self) -> String {
        attest::key_id(&self.loaded)
    }

    /// The public keys consumers may verify statements with: every key not revoked.
    pub fn published_keys(&self) -> Result<Vec<SignerKeyInfo>, SignError> {
        self.ring.published()
    }

    /// Re-checks the evidence and signs the build's provenance and its verification summary
    /// with the active key. Refuses unless every job is verified by its own evidence.
    pub fn sign_build(&self, evidence: &Evidence) -> Result<SignedBuild, SignError> {
        if evidence.jobs.is_empty() {
            return Err(SignError::Empty);
        }
        let jobs = check_jobs(&evidence.build_id, &evidence.jobs)?;
        let facts = BuildFacts {
            controller: evidence.controller.clone(),
            build_id: evidence.build_id.clone(),
            repository: evidence.repository.clone(),
            commit: evidence.commit.clone(),
            started_on: evidence.started_on.clone(),
            finished_on: evidence.finished_on.clone(),
            jobs,
        };
        let key = self.ring.active()?;
        let keyid = attest::key_id(&key.verifying_key());
        let sign = |m: &[u8]| key.sign(m).to_bytes();
        let provenance =
            attest::envelope_with(&attest::provenance_statement(&facts), keyid.clone(), sign);
        let summary = attest::envelope_with(
            &attest::verification_summary(&facts, &provenance),
            keyid,
            sign,
        );
        Ok(SignedBuild {
            provenance,
            summary,
        })
    }
}

/// Fewest jobs per thread when a build's evidence is checked on several cores: below that,
/// starting a thread costs more than the checks it takes over.
const JOBS_PER_THREAD: usize = 64;

/// Checks every job's evidence, in order; a large build's on every core, since each result's
/// check is a signature verification and a parse, independent of the others.
fn check_jobs(build_id: &str, jobs: &[JobEvidence]) -> Result<Vec<JobFacts>, SignError> {
    let threads = std::thread::available_parallelism()
        .map_or(1, usize::from)
        .min(jobs.len() / JOBS_PER_THREAD)
        .max(1);
    if threads == 1 {
        return check_part(build_id, jobs);
    }
    let chunk = jobs.len().div_ceil(threads);
    let checked: Vec<Result<Vec<JobFacts>, SignError>> = std::thread::scope(|scope| {
        let handles: Vec<_> = jobs
            .chunks(chunk)
            .map(|part| scope.spawn(move || check_part(build_id, part)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a checking thread does not panic"))
            .collect()
    });
    let mut facts = Vec::with_capacity(jobs.len());
    for part in checked {
        facts.extend(part?);
    }
    Ok(facts)
}

/// Checks consecutive jobs: their reports' signatures in one batch, then each job in order, so
/// the error is the one checking them one by one would give first.
fn check_part(build_id: &str, jobs: &[JobEvidence]) -> Result<Vec<JobFacts>, SignError> {
    let results: Vec<&ResultEvidence> = jobs
        .iter()
        .flat_map(|j| j.results.iter().chain(&j.rebuilds))
        .collect();
    let bad_signature = first_bad_signature(&results);
    let mut first = 0;
    jobs.iter()
        .map(|job| {
            let facts = check_job(build_id, job, |i| bad_signature != Some(first + i));
            first += job.results.len() + job.rebuilds.len();
            facts
        })
        .collect()
}

/// The index of the first of `results` whose report signature does not verify with its
/// worker's key, if any.
///
/// The signatures are checked together (`ed25519_dalek::verify_batch`, one multiscalar
/// multiplication for all; docs/benchmarks.md, "Signer") and, only when the batch fails, one by
/// one with `verify_strict` to name the culprit. Why the batch is enough: it passes only if
/// every signature satisfies the cofactored verification equation, but for a chance of about
/// 2^-128 (its coefficients are derived from all its inputs, so they cannot be aimed), so
/// nobody without a worker's private key, the controller included, gets a report past it. It
/// accepts more than single verification only signatures whose `R` or key has a component of
/// small order, which only the key's holder can make verify, so they prove no less that the
/// worker signed the report. Weak (small-order) keys, under which anyone can make signatures
/// verify and which `verify_strict` refuses, are refused before the batch.
fn first_bad_signature(results: &[&ResultEvidence]) -> Option<usize> {
    let mut decoded = Vec::with_capacity(results.len());
    for r in results {
        let sig = B64
            .decode(&r.signature)
            .ok()
            .and_then(|sig| Signature::from_slice(&sig).ok());
        match sig {
            Some(sig) if !r.worker_key.is_weak() => {
                decoded.push((report_message(r.report.as_bytes()), sig, r.worker_key));
            }
            _ => break,
        }
    }
    // Only the results before an undecodable signature can be an earlier culprit.
    let undecodable = (decoded.len() < results.len()).then_some(decoded.len());
    let messages: Vec<&[u8]> = decoded.iter().map(|(m, _, _)| m.as_slice()).collect();
    let signatures: Vec<Signature> = decoded.iter().map(|(_, s, _)| *s).collect();
    let keys: Vec<VerifyingKey> = decoded.iter().map(|(_, _, k)| *k).collect();
    if verify_batch(&messages, &signatures, &keys).is_ok() {
        return undecodable;
    }
    decoded
        .iter()
        .position(|(m, sig, key)| key.verify_strict(m, sig).is_err())
        .or(undecodable)
}

/// One job: each result's report checked (`signature_ok(i)` says whether the `i`th result's
/// signature, counting results then rebuilds, verified), and its verdict recomputed.
fn check_job(
    build_id: &str,
    job: &JobEvidence,
    signature_ok: impl Fn(usize) -> bool,
) -> Result<JobFacts, SignError> {
    let mut views = Vec::new();
    let mut rebuild_views = Vec::new();
    let mut reports = Vec::new();
    for (i, (r, rebuild)) in job
        .results
        .iter()
        .map(|r| (r, false))
        .chain(job.rebuilds.iter().map(|r| (r, true)))
        .enumerate()
    {
        let report = check_report(build_id, &job.name, r, signature_ok(i))?;
        let view = ResultView {
            worker: r.worker.clone(),
            owner: r.owner.clone(),
            trusted: r.trusted,
            outcome: report.result.outcome(),
        };
        if rebuild {
            rebuild_views.push(view);
        } else {
            views.push(view);
        }
        reports.push((r, report));
    }
    let verdict = verdict_with_rebuilds(job.policy, &views, &rebuild_views);
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

/// One signed report, checked: its signature with the enrolled worker key (verified beforehand,
/// `first_bad_signature`), that it is about this build, job, assignment and worker, and that
/// its manifest hashes to its digest.
fn check_report(
    build_id: &str,
    job: &str,
    r: &ResultEvidence,
    signature_ok: bool,
) -> Result<ResultReport, SignError> {
    if !signature_ok {
        return Err(SignError::BadReportSignature {
            job: job.to_string(),
            assignment: r.assignment.clone(),
            worker: r.worker.clone(),
        });
    }
    let report: ResultReport =
        serde_json::from_str(&r.report).map_err(|e| SignError::BadReport {
            job: job.to_string(),
            assignment: r.assignment.clone(),
            message: e.to_string(),
        })?;
    if report.build_id != build_id
        || report.job != job
        || report.assignment != r.assignment
        || report.worker != r.worker
    {
        return Err(SignError::ReportMismatch {
            job: job.to_string(),
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
            job: job.to_string(),
            assignment: r.assignment.clone(),
            message: "manifest does not match its digest".into(),
        });
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::SigningKey;
    use quorum_api::v1::controller::{EnvironmentFacts, Usage};
    use quorum_core::{Digest, Manifest, ManifestEntry};

    fn report(worker: &SigningKey, id: &str, assignment: &str, content: &[u8]) -> ResultEvidence {
        report_for(worker, id, assignment, "build", content)
    }

    fn report_for(
        worker: &SigningKey,
        id: &str,
        assignment: &str,
        job: &str,
        content: &[u8],
    ) -> ResultEvidence {
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
            job: job.into(),
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
                rebuilds: vec![],
            }],
        }
    }

    fn signer(dir: &Path) -> Signer {
        Signer::load_or_create(&dir.join("signer.key")).unwrap()
    }

    #[test]
    fn signs_agreeing_evidence() {
        let (w1, w2) = (
            SigningKey::from_bytes(&[1; 32]),
            SigningKey::from_bytes(&[2; 32]),
        );
        let dir = tempfile::tempdir().unwrap();
        let s = signer(dir.path());
        let signed = s
            .sign_build(&evidence(vec![
                report(&w1, "w1", "a1", b"x"),
                report(&w2, "w2", "a2", b"x"),
            ]))
            .unwrap();
        let statement = attest::verify_envelope(&signed.provenance, &s.public_key()).unwrap();
        let subjects = attest::subjects(&statement).unwrap();
        assert_eq!(subjects[0].digest.sha256, Digest::of(b"x").hex());
        let summary = attest::verify_envelope(&signed.summary, &s.public_key()).unwrap();
        assert_eq!(summary["predicateType"], attest::VSA_TYPE);
        assert_eq!(attest::subjects(&summary).unwrap(), subjects);
        let p = &summary["predicate"];
        assert_eq!(
            p["policy"]["annotations"]["jobs"][0],
            serde_json::json!({"job": "build", "quorum": 2, "trusted": 0})
        );
        let owners: Vec<&str> = p["agreement"][0]["builders"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["owner"].as_str().unwrap())
            .collect();
        assert_eq!(owners, ["owner-w1", "owner-w2"]);
    }

    #[test]
    fn a_signer_loaded_before_a_rotation_signs_with_the_new_key() {
        let (w1, w2) = (
            SigningKey::from_bytes(&[1; 32]),
            SigningKey::from_bytes(&[2; 32]),
        );
        let e = evidence(vec![
            report(&w1, "w1", "a1", b"x"),
            report(&w2, "w2", "a2", b"x"),
        ]);
        let dir = tempfile::tempdir().unwrap();
        let s = signer(dir.path());
        let before = s.sign_build(&e).unwrap();
        assert_eq!(before.provenance.signatures[0].keyid, s.key_id());
        let new = KeyRing::new(&dir.path().join("signer.key"))
            .rotate()
            .unwrap();
        let after = s.sign_build(&e).unwrap();
        for env in [&after.provenance, &after.summary] {
            assert_eq!(env.signatures[0].keyid, new.keyid);
        }
        let keys: Vec<VerifyingKey> = s
            .published_keys()
            .unwrap()
            .iter()
            .map(|k| {
                let raw: [u8; 32] = B64.decode(&k.public_key).unwrap().try_into().unwrap();
                VerifyingKey::from_bytes(&raw).unwrap()
            })
            .collect();
        for env in [
            &before.provenance,
            &before.summary,
            &after.provenance,
            &after.summary,
        ] {
            attest::verify_envelope_with_any(env, &keys).unwrap();
        }
    }

    #[test]
    fn refuses_disagreement_forged_reports_and_swapped_keys() {
        let (w1, w2) = (
            SigningKey::from_bytes(&[1; 32]),
            SigningKey::from_bytes(&[2; 32]),
        );
        let dir = tempfile::tempdir().unwrap();
        let s = signer(dir.path());
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

    /// A build large enough to be checked on several threads, each job built by `w1` (assignment
    /// `a<i>`) and `w2` (`b<i>`) with identical results.
    fn large_build(w1: &SigningKey, w2: &SigningKey) -> Evidence {
        let mut e = evidence(vec![]);
        e.jobs = (0..4 * JOBS_PER_THREAD + 3)
            .map(|i| {
                let (name, out) = (format!("j{i}"), format!("{i}"));
                JobEvidence {
                    results: vec![
                        report_for(w1, "w1", &format!("a{i}"), &name, out.as_bytes()),
                        report_for(w2, "w2", &format!("b{i}"), &name, out.as_bytes()),
                    ],
                    rebuilds: vec![],
                    name,
                    policy: Policy {
                        quorum: 2,
                        trusted: 0,
                    },
                }
            })
            .collect();
        e
    }

    fn refused_signature(s: &Signer, e: &Evidence) -> (String, String, String) {
        match s.sign_build(e) {
            Err(SignError::BadReportSignature {
                job,
                assignment,
                worker,
            }) => (job, assignment, worker),
            other => panic!("a bad report signature was not refused: {other:?}"),
        }
    }

    /// Its jobs come out in order, and one report signed with another worker's key in any part
    /// of it refuses the whole build, naming the job.
    #[test]
    fn a_large_build_is_checked_whole_and_in_order() {
        let (w1, w2) = (
            SigningKey::from_bytes(&[1; 32]),
            SigningKey::from_bytes(&[2; 32]),
        );
        let e = large_build(&w1, &w2);
        let jobs = e.jobs.len();
        let dir = tempfile::tempdir().unwrap();
        let s = signer(dir.path());
        let signed = s.sign_build(&e).unwrap();
        let statement = attest::verify_envelope(&signed.provenance, &s.public_key()).unwrap();
        assert_eq!(attest::subjects(&statement).unwrap().len(), jobs);
        let summary = attest::verify_envelope(&signed.summary, &s.public_key()).unwrap();
        let named: Vec<String> = summary["predicate"]["policy"]["annotations"]["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|j| j["job"].as_str().unwrap().to_string())
            .collect();
        let expected: Vec<String> = (0..jobs).map(|i| format!("j{i}")).collect();
        assert_eq!(named, expected);
        let key_ids: Vec<&str> = summary["predicate"]["agreement"][jobs - 1]["builders"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["key_id"].as_str().unwrap())
            .collect();
        let w2_id = attest::key_id(&w2.verifying_key());
        assert_eq!(key_ids, [attest::key_id(&w1.verifying_key()), w2_id]);

        for forged_at in [0, jobs / 2, jobs - 1] {
            let mut bad = e.clone();
            bad.jobs[forged_at].results[1].worker_key = w1.verifying_key();
            let (job, _, _) = refused_signature(&s, &bad);
            assert_eq!(job, format!("j{forged_at}"));
        }
    }

    /// However a signature in a large build is forged (made with another key, over a report
    /// changed after signing, or malleated to `s + ℓ`, which plain Ed25519 would also refuse),
    /// the batch check fails and the build is refused naming that very job, assignment and
    /// worker, wherever the report sits: first, middle, last, or either result of a job.
    #[test]
    fn a_forged_signature_in_a_large_build_is_refused_naming_its_report() {
        let (w1, w2, thief) = (
            SigningKey::from_bytes(&[1; 32]),
            SigningKey::from_bytes(&[2; 32]),
            SigningKey::from_bytes(&[9; 32]),
        );
        let e = large_build(&w1, &w2);
        let jobs = e.jobs.len();
        let dir = tempfile::tempdir().unwrap();
        let s = signer(dir.path());
        type Forgery = fn(&mut ResultEvidence, &SigningKey);
        let forgeries: [(&str, Forgery); 3] = [
            ("another key", |r, thief| {
                let sig = thief.sign(&report_message(r.report.as_bytes()));
                r.signature = B64.encode(sig.to_bytes());
            }),
            ("a changed report", |r, _| {
                assert!(r.report.contains(r#""wall_ms":0"#));
                r.report = r.report.replace(r#""wall_ms":0"#, r#""wall_ms":1"#);
            }),
            ("s + ℓ", |r, _| {
                // ℓ, the order of the base point, little-endian.
                const ELL: [u8; 32] = [
                    0xed, 0xd3, 0xf5, 0x5c, 0x1a, 0x63, 0x12, 0x58, 0xd6, 0x9c, 0xf7, 0xa2, 0xde,
                    0xf9, 0xde, 0x14, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
                ];
                let mut sig = B64.decode(&r.signature).unwrap();
                let mut carry = 0u16;
                for (b, l) in sig[32..].iter_mut().zip(ELL) {
                    let sum = u16::from(*b) + u16::from(l) + carry;
                    *b = sum as u8;
                    carry = sum >> 8;
                }
                assert_eq!(carry, 0, "s + ℓ fits in 32 bytes since s < ℓ");
                r.signature = B64.encode(sig);
            }),
        ];
        for (how, forge) in forgeries {
            for (at, result) in [(0, 0), (jobs / 2, 1), (jobs / 2 + 1, 0), (jobs - 1, 1)] {
                let mut bad = e.clone();
                forge(&mut bad.jobs[at].results[result], &thief);
                let refused = refused_signature(&s, &bad);
                let (assignment, worker) = if result == 0 {
                    (format!("a{at}"), "w1")
                } else {
                    (format!("b{at}"), "w2")
                };
                assert_eq!(
                    refused,
                    (format!("j{at}"), assignment, worker.to_string()),
                    "forged with {how}"
                );
            }
        }
    }

    /// With several bad reports the build is refused for the first in the build's order, as
    /// checking them one by one would: a batch does not change which report is named, whether
    /// the first is an unreadable signature, a forged one, or a report about something else.
    #[test]
    fn the_first_bad_report_in_a_large_build_is_the_one_named() {
        let (w1, w2, thief) = (
            SigningKey::from_bytes(&[1; 32]),
            SigningKey::from_bytes(&[2; 32]),
            SigningKey::from_bytes(&[9; 32]),
        );
        let mut e = large_build(&w1, &w2);
        let dir = tempfile::tempdir().unwrap();
        let s = signer(dir.path());
        let forged = |r: &mut ResultEvidence| {
            let sig = thief.sign(&report_message(r.report.as_bytes()));
            r.signature = B64.encode(sig.to_bytes());
        };
        forged(&mut e.jobs[40].results[1]);
        e.jobs[20].results[0].signature = "not base64!".into();
        e.jobs[10].results[1].assignment = "b11".into();
        forged(&mut e.jobs[5].results[1]);
        assert_eq!(
            refused_signature(&s, &e),
            ("j5".into(), "b5".into(), "w2".into())
        );
        e.jobs[5].results[1] = report_for(&w2, "w2", "b5", "j5", b"5");
        assert!(matches!(
            s.sign_build(&e),
            Err(SignError::ReportMismatch { job, assignment, .. }) if job == "j10" && assignment == "b11"
        ));
        e.jobs[10].results[1].assignment = "b10".into();
        assert_eq!(
            refused_signature(&s, &e),
            ("j20".into(), "a20".into(), "w1".into())
        );
        e.jobs[20].results[0] = report_for(&w1, "w1", "a20", "j20", b"20");
        assert_eq!(
            refused_signature(&s, &e),
            ("j40".into(), "b40".into(), "w2".into())
        );
    }

    /// A worker enrolled with a weak key (here the identity point) would let anyone, the
    /// controller included, forge its reports: `(R, s) = (identity, 0)` verifies under it for
    /// every message. Plain verification accepts that; the signer refuses it, in a batch or not.
    #[test]
    fn a_report_under_a_weak_worker_key_is_refused() {
        use ed25519_dalek::Verifier as _;
        let (w1, w2) = (
            SigningKey::from_bytes(&[1; 32]),
            SigningKey::from_bytes(&[2; 32]),
        );
        let mut identity = [0u8; 32];
        identity[0] = 1;
        let weak = VerifyingKey::from_bytes(&identity).unwrap();
        let mut forged_sig = [0u8; 64];
        forged_sig[..32].copy_from_slice(&identity);
        let dir = tempfile::tempdir().unwrap();
        let s = signer(dir.path());

        let mut small = evidence(vec![
            report(&w1, "w1", "a1", b"x"),
            report(&w2, "w2", "a2", b"x"),
        ]);
        let mut large = large_build(&w1, &w2);
        let at = large.jobs.len() / 2;
        for (e, at) in [(&mut small, 0), (&mut large, at)] {
            let r = &mut e.jobs[at].results[1];
            r.worker_key = weak;
            r.signature = B64.encode(forged_sig);
            let sig = Signature::from_bytes(&forged_sig);
            assert!(
                weak.verify(&report_message(r.report.as_bytes()), &sig)
                    .is_ok()
            );
            let (job, _, worker) = refused_signature(&s, e);
            assert_eq!((job, worker), (e.jobs[at].name.clone(), "w2".to_string()));
        }
    }

    #[test]
    fn a_trusted_rebuild_that_breaks_a_tie_is_signed_with_its_builder() {
        let (w1, w2, t) = (
            SigningKey::from_bytes(&[1; 32]),
            SigningKey::from_bytes(&[2; 32]),
            SigningKey::from_bytes(&[3; 32]),
        );
        let dir = tempfile::tempdir().unwrap();
        let s = signer(dir.path());
        let mut e = evidence(vec![
            report(&w1, "w1", "a1", b"x"),
            report(&w2, "w2", "a2", b"evil"),
        ]);
        let mut rebuild = report(&t, "t", "a3", b"x");
        e.jobs[0].rebuilds.push(rebuild.clone());
        // The controller's database calls the rebuilder trusted only if the operator enrolled it
        // so; an untrusted rebuild decides nothing.
        assert!(matches!(
            s.sign_build(&e),
            Err(SignError::NotVerified { .. })
        ));
        rebuild.trusted = true;
        e.jobs[0].rebuilds = vec![rebuild];
        let signed = s.sign_build(&e).unwrap();
        let summary = attest::verify_envelope(&signed.summary, &s.public_key()).unwrap();
        let builders: Vec<&str> = summary["predicate"]["agreement"][0]["builders"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["owner"].as_str().unwrap())
            .collect();
        assert_eq!(builders, ["owner-w1", "owner-t"]);
        // A rebuild's report is checked like any other.
        // Signed by w2, but t is the worker enrolled under that name.
        let mut forged = report(&w2, "t", "a3", b"x");
        forged.worker_key = t.verifying_key();
        forged.trusted = true;
        e.jobs[0].rebuilds = vec![forged];
        assert!(matches!(
            s.sign_build(&e),
            Err(SignError::BadReportSignature { .. })
        ));
    }
}
