//! Attestation formats: the DSSE envelope, in-toto Statements v1 whose predicates are SLSA
//! Provenance v1 and SLSA Verification Summary v1, and checking an envelope's signature against
//! one key or a set of keys (a signer's key ring). Signing itself happens only in
//! `quorum-signer`; this module builds the bytes and verifies them.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use ed25519_dalek::{Signature, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::digest::Digest;
use crate::pipeline::Policy;

pub const PAYLOAD_TYPE: &str = "application/vnd.in-toto+json";
pub const STATEMENT_TYPE: &str = "https://in-toto.io/Statement/v1";
pub const PROVENANCE_TYPE: &str = "https://slsa.dev/provenance/v1";
pub const BUILD_TYPE: &str = "https://quorum.invalid/build/v1";
pub const VSA_TYPE: &str = "https://slsa.dev/verification_summary/v1";
/// The policy a summary names: at least `quorum` identical results from distinct owners, at
/// least `trusted` of them from trusted workers, per job (the numbers are in its annotations).
pub const POLICY_URI: &str = "https://quorum.invalid/policy/identical-results/v1";
/// The level a summary claims: provenance made and signed by the signer, from results it
/// re-checked, never by build code (SLSA Build L2: hosted platform, signed provenance).
pub const VERIFIED_LEVEL: &str = "SLSA_BUILD_LEVEL_2";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// Base64 of the statement's JSON.
    pub payload: String,
    #[serde(rename = "payloadType")]
    pub payload_type: String,
    pub signatures: Vec<EnvelopeSignature>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvelopeSignature {
    pub keyid: String,
    pub sig: String,
}

/// DSSE pre-authentication encoding: what a signature actually covers.
pub fn pae(payload_type: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "DSSEv1 {} {} {} ",
        payload_type.len(),
        payload_type,
        payload.len()
    )
    .into_bytes();
    out.extend_from_slice(payload);
    out
}

/// The key id used in envelopes: the SHA-256 of the raw public key.
pub fn key_id(key: &VerifyingKey) -> String {
    Digest::of(key.as_bytes()).to_string()
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VerifyError {
    #[error("envelope payload type is `{0}`, expected `{PAYLOAD_TYPE}`")]
    PayloadType(String),
    #[error("envelope payload is not valid base64")]
    PayloadEncoding,
    #[error("no signature in the envelope was made by key {0}")]
    NoSignatureByKey(String),
    #[error(
        "the signature by key {0} does not verify: the statement was altered or signed by another key"
    )]
    BadSignature(String),
    #[error("statement is not an in-toto Statement v1: {0}")]
    Statement(String),
    #[error("digest {digest} is not among the statement's subjects")]
    NotASubject { digest: String },
}

/// One artifact named in a statement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subject {
    pub name: String,
    pub digest: SubjectDigest,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubjectDigest {
    pub sha256: String,
}

/// Checks the envelope's signature with `key` and returns the statement it carries.
pub fn verify_envelope(envelope: &Envelope, key: &VerifyingKey) -> Result<Value, VerifyError> {
    if envelope.payload_type != PAYLOAD_TYPE {
        return Err(VerifyError::PayloadType(envelope.payload_type.clone()));
    }
    let payload = B64
        .decode(&envelope.payload)
        .map_err(|_| VerifyError::PayloadEncoding)?;
    let id = key_id(key);
    let sig = envelope
        .signatures
        .iter()
        .find(|s| s.keyid == id)
        .ok_or_else(|| VerifyError::NoSignatureByKey(id.clone()))?;
    let sig_bytes = B64
        .decode(&sig.sig)
        .map_err(|_| VerifyError::BadSignature(id.clone()))?;
    let sig =
        Signature::from_slice(&sig_bytes).map_err(|_| VerifyError::BadSignature(id.clone()))?;
    key.verify(&pae(&envelope.payload_type, &payload), &sig)
        .map_err(|_| VerifyError::BadSignature(id.clone()))?;
    let statement: Value =
        serde_json::from_slice(&payload).map_err(|e| VerifyError::Statement(e.to_string()))?;
    if statement.get("_type").and_then(Value::as_str) != Some(STATEMENT_TYPE) {
        return Err(VerifyError::Statement("`_type` is missing or wrong".into()));
    }
    Ok(statement)
}

/// Checks the envelope against a set of keys (a signer's published ring): the signature whose
/// `keyid` names one of `keys` must verify with it. Key ids are derived from the keys, so a
/// signature cannot claim another key's id and pass.
pub fn verify_envelope_with_any(
    envelope: &Envelope,
    keys: &[VerifyingKey],
) -> Result<Value, VerifyError> {
    let key = envelope
        .signatures
        .iter()
        .find_map(|s| keys.iter().find(|k| key_id(k) == s.keyid))
        .ok_or_else(|| {
            VerifyError::NoSignatureByKey(
                envelope
                    .signatures
                    .iter()
                    .map(|s| s.keyid.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            )
        })?;
    verify_envelope(envelope, key)
}

/// The subjects of a verified statement.
pub fn subjects(statement: &Value) -> Result<Vec<Subject>, VerifyError> {
    let subjects = statement
        .get("subject")
        .cloned()
        .ok_or_else(|| VerifyError::Statement("no `subject`".into()))?;
    serde_json::from_value(subjects).map_err(|e| VerifyError::Statement(format!("`subject`: {e}")))
}

/// Everything the provenance says about one verified build. Times are RFC 3339 strings chosen
/// by the caller: this crate has no clock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildFacts {
    pub controller: String,
    pub build_id: String,
    pub repository: String,
    pub commit: String,
    pub started_on: String,
    pub finished_on: String,
    pub jobs: Vec<JobFacts>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobFacts {
    pub name: String,
    pub policy: Policy,
    pub manifest: Digest,
    /// The workers whose identical results verified the job, with their key ids.
    pub builders: Vec<Builder>,
    pub artifacts: Vec<(String, Digest)>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Builder {
    pub worker: String,
    pub owner: String,
    pub key_id: String,
    pub trusted: bool,
}

/// An in-toto Statement v1 with predicate `P`, serialized straight from the facts it borrows:
/// a large build's statements run to megabytes, and building them as `serde_json::Value` trees
/// first took the signer about as long as re-checking the build's evidence.
#[derive(Serialize)]
struct Statement<'a, P> {
    #[serde(rename = "_type")]
    kind: &'static str,
    subject: Vec<SubjectOf<'a>>,
    #[serde(rename = "predicateType")]
    predicate_type: &'static str,
    predicate: P,
}

#[derive(Serialize)]
struct SubjectOf<'a> {
    name: JobPath<'a>,
    digest: Sha256,
}

/// A subject's name, `<job>/<path>`, written without building the string first.
struct JobPath<'a>(&'a str, &'a str);

impl Serialize for JobPath<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&format_args!("{}/{}", self.0, self.1))
    }
}

/// `{"sha256": "<hex>"}`, an in-toto digest set.
#[derive(Serialize)]
struct Sha256 {
    sha256: String,
}

impl From<Digest> for Sha256 {
    fn from(d: Digest) -> Sha256 {
        Sha256 { sha256: d.hex() }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Provenance<'a> {
    build_definition: BuildDefinition<'a>,
    run_details: RunDetails<'a>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct BuildDefinition<'a> {
    build_type: &'static str,
    external_parameters: ExternalParameters<'a>,
    internal_parameters: InternalParameters<'a>,
    resolved_dependencies: [GitSource<'a>; 1],
}

#[derive(Serialize)]
struct ExternalParameters<'a> {
    source: GitSource<'a>,
}

#[derive(Serialize, Clone, Copy)]
struct GitSource<'a> {
    uri: &'a str,
    digest: GitCommit<'a>,
}

#[derive(Serialize, Clone, Copy)]
#[serde(rename_all = "camelCase")]
struct GitCommit<'a> {
    git_commit: &'a str,
}

#[derive(Serialize)]
struct InternalParameters<'a> {
    jobs: Vec<ProvenanceJob<'a>>,
}

#[derive(Serialize)]
struct ProvenanceJob<'a> {
    name: &'a str,
    policy: Policy,
    manifest: Digest,
    builders: &'a [Builder],
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct RunDetails<'a> {
    builder: Id<'a>,
    metadata: Metadata<'a>,
}

#[derive(Serialize)]
struct Id<'a> {
    id: &'a str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Metadata<'a> {
    invocation_id: &'a str,
    started_on: &'a str,
    finished_on: &'a str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Summary<'a> {
    verifier: Id<'a>,
    time_verified: &'a str,
    resource_uri: String,
    policy: SummaryPolicy<'a>,
    input_attestations: [InputAttestation; 1],
    verification_result: &'static str,
    verified_levels: [&'static str; 1],
    slsa_version: &'static str,
    agreement: Vec<Agreement<'a>>,
}

#[derive(Serialize)]
struct SummaryPolicy<'a> {
    uri: &'static str,
    digest: Sha256,
    annotations: Annotations<'a>,
}

#[derive(Serialize)]
struct Annotations<'a> {
    jobs: Vec<JobPolicy<'a>>,
}

/// One job's policy in a summary. Its fields are in alphabetical order, as consumers recompute
/// the policy digest over this array parsed into `serde_json::Value`, which sorts keys.
#[derive(Serialize)]
struct JobPolicy<'a> {
    job: &'a str,
    quorum: u32,
    trusted: u32,
}

#[derive(Serialize)]
struct InputAttestation {
    uri: String,
    digest: Sha256,
}

#[derive(Serialize)]
struct Agreement<'a> {
    job: &'a str,
    manifest: Digest,
    builders: &'a [Builder],
}

/// The in-toto Statement with SLSA Provenance v1 for a verified build. Subject names are
/// `<job>/<path>`.
pub fn provenance_statement(facts: &BuildFacts) -> impl Serialize + '_ {
    let source = GitSource {
        uri: &facts.repository,
        digest: GitCommit {
            git_commit: &facts.commit,
        },
    };
    Statement {
        kind: STATEMENT_TYPE,
        subject: subjects_of(facts),
        predicate_type: PROVENANCE_TYPE,
        predicate: Provenance {
            build_definition: BuildDefinition {
                build_type: BUILD_TYPE,
                external_parameters: ExternalParameters { source },
                internal_parameters: InternalParameters {
                    jobs: facts
                        .jobs
                        .iter()
                        .map(|j| ProvenanceJob {
                            name: &j.name,
                            policy: j.policy,
                            manifest: j.manifest,
                            builders: &j.builders,
                        })
                        .collect(),
                },
                resolved_dependencies: [source],
            },
            run_details: RunDetails {
                builder: Id {
                    id: &facts.controller,
                },
                metadata: Metadata {
                    invocation_id: &facts.build_id,
                    started_on: &facts.started_on,
                    finished_on: &facts.finished_on,
                },
            },
        },
    }
}

/// The in-toto Statement with an SLSA Verification Summary v1 for a verified build whose
/// provenance is `provenance`: the same subjects, the policy (identical results required per
/// job), the provenance as the input attestation (by the SHA-256 of its statement bytes), and,
/// as an extension field, the builders whose identical results met the policy.
pub fn verification_summary<'a>(
    facts: &'a BuildFacts,
    provenance: &Envelope,
) -> impl Serialize + 'a {
    let policy: Vec<JobPolicy> = facts
        .jobs
        .iter()
        .map(|j| JobPolicy {
            job: &j.name,
            quorum: j.policy.quorum,
            trusted: j.policy.trusted,
        })
        .collect();
    let policy_bytes = serde_json::to_vec(&policy).expect("policies serialize");
    let provenance_bytes = B64.decode(&provenance.payload).unwrap_or_default();
    let build_uri = format!(
        "{}/api/v1/builds/{}",
        facts.controller.trim_end_matches('/'),
        facts.build_id
    );
    Statement {
        kind: STATEMENT_TYPE,
        subject: subjects_of(facts),
        predicate_type: VSA_TYPE,
        predicate: Summary {
            verifier: Id {
                id: &facts.controller,
            },
            time_verified: &facts.finished_on,
            input_attestations: [InputAttestation {
                uri: format!("{build_uri}/statement"),
                digest: Digest::of(&provenance_bytes).into(),
            }],
            resource_uri: build_uri,
            policy: SummaryPolicy {
                uri: POLICY_URI,
                digest: Digest::of(&policy_bytes).into(),
                annotations: Annotations { jobs: policy },
            },
            verification_result: "PASSED",
            verified_levels: [VERIFIED_LEVEL],
            slsa_version: "1.0",
            agreement: facts
                .jobs
                .iter()
                .map(|j| Agreement {
                    job: &j.name,
                    manifest: j.manifest,
                    builders: &j.builders,
                })
                .collect(),
        },
    }
}

fn subjects_of(facts: &BuildFacts) -> Vec<SubjectOf<'_>> {
    facts
        .jobs
        .iter()
        .flat_map(|j| {
            j.artifacts.iter().map(|(path, d)| SubjectOf {
                name: JobPath(&j.name, path),
                digest: (*d).into(),
            })
        })
        .collect()
}

/// Wraps a signature made elsewhere into an envelope. `sign` receives the PAE bytes.
pub fn envelope_with(
    statement: &impl Serialize,
    keyid: String,
    sign: impl FnOnce(&[u8]) -> [u8; 64],
) -> Envelope {
    let payload = serde_json::to_vec(statement).expect("statements serialize");
    let sig = sign(&pae(PAYLOAD_TYPE, &payload));
    Envelope {
        payload: B64.encode(&payload),
        payload_type: PAYLOAD_TYPE.to_string(),
        signatures: vec![EnvelopeSignature {
            keyid,
            sig: B64.encode(sig),
        }],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::{Signer, SigningKey};
    use serde_json::json;

    fn facts() -> BuildFacts {
        BuildFacts {
            controller: "http://127.0.0.1:1".into(),
            build_id: "b1".into(),
            repository: "file:///repo".into(),
            commit: "0".repeat(40),
            started_on: "2026-01-01T00:00:00Z".into(),
            finished_on: "2026-01-01T00:01:00Z".into(),
            jobs: vec![JobFacts {
                name: "build".into(),
                policy: Policy {
                    quorum: 2,
                    trusted: 0,
                },
                manifest: Digest::of(b"m"),
                builders: vec![],
                artifacts: vec![("out/a".into(), Digest::of(b"a"))],
            }],
        }
    }

    #[test]
    fn the_summary_names_the_policy_the_builders_and_the_provenance() {
        let key = SigningKey::from_bytes(&[7u8; 32]);
        let mut facts = facts();
        facts.jobs[0].builders = vec![
            Builder {
                worker: "w1".into(),
                owner: "alice".into(),
                key_id: "sha256:aa".into(),
                trusted: true,
            },
            Builder {
                worker: "w2".into(),
                owner: "bob".into(),
                key_id: "sha256:bb".into(),
                trusted: false,
            },
        ];
        let provenance = provenance_statement(&facts);
        let env = envelope_with(&provenance, key_id(&key.verifying_key()), |m| {
            key.sign(m).to_bytes()
        });
        let vsa = serde_json::to_value(verification_summary(&facts, &env)).unwrap();
        assert_eq!(vsa["_type"], STATEMENT_TYPE);
        assert_eq!(vsa["predicateType"], VSA_TYPE);
        let provenance = serde_json::to_value(&provenance).unwrap();
        assert_eq!(vsa["subject"], provenance["subject"]);
        assert_eq!(
            provenance["predicate"]["buildDefinition"]["internalParameters"]["jobs"][0]["builders"],
            vsa["predicate"]["agreement"][0]["builders"]
        );
        let p = &vsa["predicate"];
        assert_eq!(p["verificationResult"], "PASSED");
        assert_eq!(p["verifiedLevels"], json!([VERIFIED_LEVEL]));
        assert_eq!(p["slsaVersion"], "1.0");
        assert_eq!(p["timeVerified"], "2026-01-01T00:01:00Z");
        assert_eq!(
            p["inputAttestations"][0]["uri"],
            "http://127.0.0.1:1/api/v1/builds/b1/statement"
        );
        assert_eq!(p["verifier"]["id"], "http://127.0.0.1:1");
        assert_eq!(p["resourceUri"], "http://127.0.0.1:1/api/v1/builds/b1");
        assert_eq!(p["policy"]["uri"], POLICY_URI);
        assert_eq!(
            p["policy"]["annotations"]["jobs"],
            json!([{"job": "build", "quorum": 2, "trusted": 0}])
        );
        // The digest a consumer recomputes from the policy it reads (quorum_client::verify).
        let read = serde_json::to_vec(&p["policy"]["annotations"]["jobs"]).unwrap();
        assert_eq!(p["policy"]["digest"]["sha256"], Digest::of(&read).hex());
        let payload = B64.decode(&env.payload).unwrap();
        assert_eq!(
            p["inputAttestations"][0]["digest"]["sha256"],
            Digest::of(&payload).hex()
        );
        let builders = &p["agreement"][0]["builders"];
        assert_eq!(builders[0]["worker"], "w1");
        assert_eq!(builders[0]["owner"], "alice");
        assert_eq!(builders[1]["owner"], "bob");
        // Another policy is another digest.
        let mut stricter = facts.clone();
        stricter.jobs[0].policy.quorum = 3;
        let other = serde_json::to_value(verification_summary(&stricter, &env)).unwrap();
        assert_ne!(
            other["predicate"]["policy"]["digest"],
            p["policy"]["digest"]
        );
    }

    /// The whole provenance, field by field, as SLSA Provenance v1 lays it out (the statements
    /// are serialized from typed structs, so a renamed field would otherwise go unnoticed).
    #[test]
    fn the_provenance_is_slsa_provenance_v1() {
        let mut facts = facts();
        facts.jobs[0].builders = vec![Builder {
            worker: "w1".into(),
            owner: "alice".into(),
            key_id: "sha256:aa".into(),
            trusted: true,
        }];
        let source = json!({"uri": "file:///repo", "digest": {"gitCommit": "0".repeat(40)}});
        assert_eq!(
            serde_json::to_value(provenance_statement(&facts)).unwrap(),
            json!({
                "_type": STATEMENT_TYPE,
                "subject": [{"name": "build/out/a", "digest": {"sha256": Digest::of(b"a").hex()}}],
                "predicateType": PROVENANCE_TYPE,
                "predicate": {
                    "buildDefinition": {
                        "buildType": BUILD_TYPE,
                        "externalParameters": {"source": source},
                        "internalParameters": {"jobs": [{
                            "name": "build",
                            "policy": {"quorum": 2, "trusted": 0},
                            "manifest": Digest::of(b"m").to_string(),
                            "builders": [{
                                "worker": "w1", "owner": "alice", "key_id": "sha256:aa",
                                "trusted": true,
                            }],
                        }]},
                        "resolvedDependencies": [source],
                    },
                    "runDetails": {
                        "builder": {"id": "http://127.0.0.1:1"},
                        "metadata": {
                            "invocationId": "b1",
                            "startedOn": "2026-01-01T00:00:00Z",
                            "finishedOn": "2026-01-01T00:01:00Z",
                        },
                    },
                },
            })
        );
    }

    #[test]
    fn a_ring_verifies_by_key_id_and_a_borrowed_key_id_does_not_help() {
        let (old, new, thief) = (
            SigningKey::from_bytes(&[1u8; 32]),
            SigningKey::from_bytes(&[2u8; 32]),
            SigningKey::from_bytes(&[3u8; 32]),
        );
        let ring = [new.verifying_key(), old.verifying_key()];
        let facts = facts();
        let statement = provenance_statement(&facts);
        let by_old = envelope_with(&statement, key_id(&old.verifying_key()), |m| {
            old.sign(m).to_bytes()
        });
        assert!(verify_envelope_with_any(&by_old, &ring).is_ok());
        // Signed by a key outside the ring but claiming a ring key's id.
        let borrowed = envelope_with(&statement, key_id(&old.verifying_key()), |m| {
            thief.sign(m).to_bytes()
        });
        assert!(matches!(
            verify_envelope_with_any(&borrowed, &ring),
            Err(VerifyError::BadSignature(_))
        ));
        let outside = envelope_with(&statement, key_id(&thief.verifying_key()), |m| {
            thief.sign(m).to_bytes()
        });
        assert!(matches!(
            verify_envelope_with_any(&outside, &ring),
            Err(VerifyError::NoSignatureByKey(id)) if id == key_id(&thief.verifying_key())
        ));
    }

    #[test]
    fn pae_matches_the_dsse_spec_example() {
        // From the DSSE protocol document: PAE("http://example.com/HelloWorld", "hello world").
        assert_eq!(
            pae("http://example.com/HelloWorld", b"hello world"),
            b"DSSEv1 29 http://example.com/HelloWorld 11 hello world".to_vec()
        );
    }

    #[test]
    fn signed_statement_verifies_and_tampering_is_caught() {
        let key = SigningKey::from_bytes(&[7u8; 32]);
        let facts = facts();
        let statement = provenance_statement(&facts);
        let env = envelope_with(&statement, key_id(&key.verifying_key()), |m| {
            key.sign(m).to_bytes()
        });
        let back = verify_envelope(&env, &key.verifying_key()).unwrap();
        assert_eq!(subjects(&back).unwrap()[0].name, "build/out/a");
        assert_eq!(
            subjects(&back).unwrap()[0].digest.sha256,
            Digest::of(b"a").hex()
        );

        let mut tampered = env.clone();
        let mut s = serde_json::to_value(&statement).unwrap();
        s["subject"][0]["digest"]["sha256"] = json!(Digest::of(b"evil").hex());
        tampered.payload = B64.encode(serde_json::to_vec(&s).unwrap());
        assert!(matches!(
            verify_envelope(&tampered, &key.verifying_key()),
            Err(VerifyError::BadSignature(_))
        ));

        let other = SigningKey::from_bytes(&[8u8; 32]);
        assert!(matches!(
            verify_envelope(&env, &other.verifying_key()),
            Err(VerifyError::NoSignatureByKey(_))
        ));
    }
}
