//! What a consumer checks before it trusts a build's artifacts (`quorum fetch`, `quorum run`):
//! the provenance and the SLSA Verification Summary a controller signed for the build, both
//! against the keys that controller publishes. Pure: the caller fetches the envelopes and keys.
//!
//! The summary is what says the policy was met; the provenance says what was built. So the
//! summary must verify with a published key, say PASSED, be about this build, name the policy it
//! applied and builders enough to meet it, and cover this very provenance (by the SHA-256 of its
//! statement) with the same subjects.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use ed25519_dalek::VerifyingKey;
use quorum_core::Digest;
use quorum_core::attest::{self, Envelope, Subject};
use serde::Deserialize;
use serde_json::Value;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BuildCheckError {
    #[error("the provenance of build {build} does not verify: {source}")]
    Provenance {
        build: String,
        source: attest::VerifyError,
    },
    #[error("the provenance is about build `{found}`, not build {build}")]
    ProvenanceOfAnotherBuild { build: String, found: String },
    #[error(
        "the verification summary of build {build} does not verify with any key the controller publishes: {source}"
    )]
    Summary {
        build: String,
        source: attest::VerifyError,
    },
    #[error("the verification summary of build {build} is not valid: {why}")]
    SummaryInvalid { build: String, why: String },
    #[error("the verification summary says `{result}` for build {build}, not PASSED")]
    NotPassed { build: String, result: String },
    #[error("the verification summary is about `{found}`, not build {build}")]
    SummaryOfAnotherBuild { build: String, found: String },
    #[error(
        "the verification summary of build {build} covers provenance sha256:{covered}, not the provenance served (sha256:{served})"
    )]
    OtherProvenance {
        build: String,
        covered: String,
        served: String,
    },
    #[error(
        "the verification summary of build {build}: job `{job}` needs {needed} agreeing builders ({trusted} trusted), the summary names {named} ({named_trusted} trusted)"
    )]
    PolicyNotMet {
        build: String,
        job: String,
        needed: u64,
        trusted: u64,
        named: usize,
        named_trusted: usize,
    },
}

/// A build whose provenance and summary passed [`check_build`].
#[derive(Debug, Clone)]
pub struct CheckedBuild {
    /// The provenance statement.
    pub provenance: Value,
    /// The artifacts both statements name.
    pub subjects: Vec<Subject>,
    /// Per job: the policy the summary says was met and the builders who agreed.
    pub jobs: Vec<JobAgreement>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct JobAgreement {
    pub job: String,
    pub manifest: String,
    pub builders: Vec<AgreeingBuilder>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct AgreeingBuilder {
    pub worker: String,
    pub owner: String,
    pub trusted: bool,
}

#[derive(Deserialize)]
struct JobPolicy {
    job: String,
    quorum: u64,
    trusted: u64,
}

/// Checks build `build`'s `provenance` and `summary` against `keys` (every key the controller
/// publishes), as described in the module doc.
pub fn check_build(
    build: &str,
    provenance: &Envelope,
    summary: &Envelope,
    keys: &[VerifyingKey],
) -> Result<CheckedBuild, BuildCheckError> {
    let statement = attest::verify_envelope_with_any(provenance, keys).map_err(|source| {
        BuildCheckError::Provenance {
            build: build.to_string(),
            source,
        }
    })?;
    let invocation = statement
        .pointer("/predicate/runDetails/metadata/invocationId")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if invocation != build {
        return Err(BuildCheckError::ProvenanceOfAnotherBuild {
            build: build.to_string(),
            found: invocation.to_string(),
        });
    }
    let subjects = attest::subjects(&statement).map_err(|source| BuildCheckError::Provenance {
        build: build.to_string(),
        source,
    })?;

    let vsa = attest::verify_envelope_with_any(summary, keys).map_err(|source| {
        BuildCheckError::Summary {
            build: build.to_string(),
            source,
        }
    })?;
    let invalid = |why: &str| BuildCheckError::SummaryInvalid {
        build: build.to_string(),
        why: why.to_string(),
    };
    if vsa.get("predicateType").and_then(Value::as_str) != Some(attest::VSA_TYPE) {
        return Err(invalid(&format!(
            "its predicate type is not {}",
            attest::VSA_TYPE
        )));
    }
    let result = vsa
        .pointer("/predicate/verificationResult")
        .and_then(Value::as_str)
        .unwrap_or("(none)");
    if result != "PASSED" {
        return Err(BuildCheckError::NotPassed {
            build: build.to_string(),
            result: result.to_string(),
        });
    }
    let resource = vsa
        .pointer("/predicate/resourceUri")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if !resource.ends_with(&format!("/api/v1/builds/{build}")) {
        return Err(BuildCheckError::SummaryOfAnotherBuild {
            build: build.to_string(),
            found: resource.to_string(),
        });
    }
    let payload = B64
        .decode(&provenance.payload)
        .map_err(|_| invalid("the provenance payload is not base64"))?;
    let served = Digest::of(&payload).hex();
    let covered: Vec<&str> = vsa
        .pointer("/predicate/inputAttestations")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|i| i.pointer("/digest/sha256").and_then(Value::as_str))
                .collect()
        })
        .unwrap_or_default();
    if !covered.contains(&served.as_str()) {
        return Err(BuildCheckError::OtherProvenance {
            build: build.to_string(),
            covered: covered.join(", sha256:"),
            served,
        });
    }
    let vsa_subjects =
        attest::subjects(&vsa).map_err(|e| invalid(&format!("its subjects: {e}")))?;
    let key = |s: &Subject| (s.name.clone(), s.digest.sha256.clone());
    let mut a: Vec<_> = subjects.iter().map(key).collect();
    let mut b: Vec<_> = vsa_subjects.iter().map(key).collect();
    a.sort();
    b.sort();
    if a != b {
        return Err(invalid("its subjects differ from the provenance's"));
    }
    let policy = vsa
        .pointer("/predicate/policy")
        .ok_or_else(|| invalid("it names no policy"))?;
    if policy.get("uri").and_then(Value::as_str) != Some(attest::POLICY_URI) {
        return Err(invalid(&format!(
            "its policy is not {}",
            attest::POLICY_URI
        )));
    }
    let jobs_value = policy
        .pointer("/annotations/jobs")
        .ok_or_else(|| invalid("its policy names no jobs"))?;
    let policy_digest = Digest::of(&serde_json::to_vec(jobs_value).unwrap_or_default()).hex();
    if policy.pointer("/digest/sha256").and_then(Value::as_str) != Some(policy_digest.as_str()) {
        return Err(invalid(
            "its policy digest does not match the policy it names",
        ));
    }
    let policies: Vec<JobPolicy> = serde_json::from_value(jobs_value.clone())
        .map_err(|e| invalid(&format!("its policy: {e}")))?;
    if policies.is_empty() {
        return Err(invalid("its policy names no jobs"));
    }
    let jobs: Vec<JobAgreement> = vsa
        .pointer("/predicate/agreement")
        .cloned()
        .map(serde_json::from_value)
        .transpose()
        .map_err(|e| invalid(&format!("its agreeing builders: {e}")))?
        .unwrap_or_default();
    for p in &policies {
        let builders = jobs
            .iter()
            .find(|j| j.job == p.job)
            .map(|j| j.builders.as_slice())
            .unwrap_or_default();
        // One owner counts once, as in the verdict.
        let mut owners: Vec<&str> = builders.iter().map(|b| b.owner.as_str()).collect();
        owners.sort();
        owners.dedup();
        let mut trusted: Vec<&str> = builders
            .iter()
            .filter(|b| b.trusted)
            .map(|b| b.owner.as_str())
            .collect();
        trusted.sort();
        trusted.dedup();
        if (owners.len() as u64) < p.quorum || (trusted.len() as u64) < p.trusted {
            return Err(BuildCheckError::PolicyNotMet {
                build: build.to_string(),
                job: p.job.clone(),
                needed: p.quorum,
                trusted: p.trusted,
                named: owners.len(),
                named_trusted: trusted.len(),
            });
        }
    }
    Ok(CheckedBuild {
        provenance: statement,
        subjects,
        jobs,
    })
}
