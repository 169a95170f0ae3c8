//! The signer's key ring and verification summaries through the controller's real HTTP
//! boundary, on both database backends: a rotation made while the controller runs signs the next
//! build with the new key, statements signed before it keep verifying with the published keys,
//! a revoked key leaves `/api/v1/signer/keys`, and every verified build has an SLSA
//! Verification Summary signed beside its provenance naming the policy and the builders.

use crate::bounded;
use crate::support::{Backend, SimWorker, Stack};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use quorum_api::v1::controller::{BuildState, SignerKeys, Usage};
use quorum_core::attest::{self, Envelope, VerifyError};
use quorum_core::{Digest, attest::VSA_TYPE};

#[tokio::test(flavor = "multi_thread")]
async fn sqlite() {
    bounded(rotation_revocation_and_summaries(Backend::Sqlite)).await
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres() {
    bounded(rotation_revocation_and_summaries(Backend::Postgres)).await
}

const ONE_JOB: &str = "jobs:\n  build:\n    script: [\"true\"]\n    artifacts: [out.txt]\n";

/// Submits a build and has two workers of distinct owners agree on it.
async fn verified_build(stack: &Stack, a: &SimWorker, b: &SimWorker) -> String {
    let build = stack.submit(ONE_JOB).await;
    let (ta, tb) = tokio::join!(a.take(), b.take());
    a.succeed(&ta, b"same bytes", Usage::default()).await;
    b.succeed(&tb, b"same bytes", Usage::default()).await;
    let done = stack
        .wait_build(&build, "verification", |s| s.state.is_final())
        .await;
    assert_eq!(done.state, BuildState::Verified, "{done:#?}");
    build
}

fn keys_of(published: &SignerKeys) -> Vec<ed25519_dalek::VerifyingKey> {
    published
        .keys
        .values()
        .map(|k| {
            let raw: [u8; 32] = B64.decode(k).unwrap().try_into().unwrap();
            ed25519_dalek::VerifyingKey::from_bytes(&raw).unwrap()
        })
        .collect()
}

/// `GET /api/v1/builds/{id}/summary` as any HTTP client sends it: (status, body).
async fn summary(stack: &Stack, build: &str) -> (u16, String) {
    let resp = reqwest::Client::new()
        .get(format!(
            "{}/api/v1/builds/{build}/summary",
            stack.controller_url
        ))
        .bearer_auth(&stack.api_token)
        .send()
        .await
        .unwrap();
    (resp.status().as_u16(), resp.text().await.unwrap())
}

async fn rotation_revocation_and_summaries(backend: Backend) {
    let stack = Stack::start(backend, 30).await;
    let user = stack.user();
    let a = stack.worker("a1", "alice", true).await;
    let b = stack.worker("b1", "bob", false).await;

    let first = verified_build(&stack, &a, &b).await;
    let first_statement = user.statement(&first).await.unwrap();
    let before = user.signer_keys().await.unwrap();
    assert_eq!(before.keys.len(), 1);
    let old_id = before
        .active
        .clone()
        .expect("the active key id is published");
    assert_eq!(first_statement.signatures[0].keyid, old_id);

    // The operator rotates while the controller runs; the next build is signed with the new key.
    let ring = quorum_controller::signer_key_ring(&stack.config.data_dir);
    let new = ring.rotate().unwrap();
    let after = user.signer_keys().await.unwrap();
    assert_eq!(after.active.as_deref(), Some(new.keyid.as_str()));
    assert_eq!(after.keys.len(), 2, "the retired key stays published");
    let second = verified_build(&stack, &a, &b).await;
    let second_statement = user.statement(&second).await.unwrap();
    assert_eq!(second_statement.signatures[0].keyid, new.keyid);
    let keys = keys_of(&after);
    attest::verify_envelope_with_any(&first_statement, &keys).unwrap();
    attest::verify_envelope_with_any(&second_statement, &keys).unwrap();

    // The summary is signed beside the provenance, by the same key, about the same subjects.
    let (status, body) = summary(&stack, &second).await;
    assert_eq!(status, 200, "{body}");
    let envelope: Envelope = serde_json::from_str(&body).unwrap();
    assert_eq!(envelope.signatures[0].keyid, new.keyid);
    let vsa = attest::verify_envelope_with_any(&envelope, &keys).unwrap();
    let provenance = attest::verify_envelope_with_any(&second_statement, &keys).unwrap();
    assert_eq!(vsa["predicateType"], VSA_TYPE);
    assert_eq!(vsa["subject"], provenance["subject"]);
    let p = &vsa["predicate"];
    assert_eq!(p["verificationResult"], "PASSED");
    assert_eq!(p["verifier"]["id"], stack.controller_url.as_str());
    assert_eq!(
        p["resourceUri"],
        format!("{}/api/v1/builds/{second}", stack.controller_url)
    );
    assert_eq!(p["policy"]["annotations"]["jobs"][0]["job"], "build");
    assert_eq!(p["policy"]["annotations"]["jobs"][0]["quorum"], 2);
    let payload = B64.decode(&second_statement.payload).unwrap();
    assert_eq!(
        p["inputAttestations"][0]["digest"]["sha256"],
        Digest::of(&payload).hex()
    );
    let mut owners: Vec<(String, String)> = p["agreement"][0]["builders"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["worker"].as_str().unwrap().to_string(),
                b["owner"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    owners.sort();
    assert_eq!(
        owners,
        [
            ("a1".to_string(), "alice".to_string()),
            ("b1".into(), "bob".into())
        ]
    );

    // A build without a verdict has no summary, and says why.
    let (status, body) = summary(&stack, "no-such-build").await;
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("no-such-build"), "{body}");

    // Revoking the old key (believed stolen) unpublishes it: what it signed stops verifying.
    ring.revoke(&old_id).unwrap();
    let revoked = user.signer_keys().await.unwrap();
    assert_eq!(revoked.keys.len(), 1);
    assert!(!revoked.keys.contains_key(&old_id));
    assert!(matches!(
        attest::verify_envelope_with_any(&first_statement, &keys_of(&revoked)),
        Err(VerifyError::NoSignatureByKey(id)) if id == old_id
    ));
    attest::verify_envelope_with_any(&second_statement, &keys_of(&revoked)).unwrap();
    stack.stop().await;
}
