//! What the controller publishes for consumers, through the real HTTP boundary: the signed
//! statement pushed to the real store (public when the project says so, pushed even across a
//! store outage and a controller restart), and the Verification Summary that `quorum fetch`
//! checks, tried against forged and substituted summaries.

use std::time::{Duration, Instant};

use crate::bounded;
use crate::support::{Backend, SimWorker, Stack, TENANT};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use ed25519_dalek::Signer as _;
use quorum_api::v1::controller::{BuildState, Usage};
use quorum_client::verify::{BuildCheckError, check_build};
use quorum_core::Digest;
use quorum_core::attest::{self, Envelope};

on_both_backends!(
    a_public_build_is_read_from_the_store_without_a_token,
    the_statement_reaches_the_store_after_an_outage_and_a_restart,
);

const ONE_JOB: &str = "jobs:\n  build:\n    script: [\"true\"]\n    artifacts: [out.txt]\n";
const CONTENT: &[u8] = b"the artifact\n";

fn public(public: bool) -> quorum_controller::ProjectConfig {
    quorum_controller::ProjectConfig {
        public,
        ..Default::default()
    }
}

/// Two workers of distinct owners.
async fn workers(stack: &Stack) -> (SimWorker, SimWorker) {
    (
        stack.worker("a1", "alice", true).await,
        stack.worker("b1", "bob", false).await,
    )
}

/// Runs one build to `verified` on `a` and `b`, which upload their output to the store.
async fn verified_build(stack: &Stack, (a, b): &(SimWorker, SimWorker)) -> String {
    let build = stack.submit(ONE_JOB).await;
    let (ta, tb) = tokio::join!(a.take(), b.take());
    a.upload(&ta, CONTENT).await;
    b.upload(&tb, CONTENT).await;
    a.succeed(&ta, CONTENT, Usage::default()).await;
    b.succeed(&tb, CONTENT, Usage::default()).await;
    let done = stack
        .wait_build(&build, "verification", |s| s.state.is_final())
        .await;
    assert_eq!(done.state, BuildState::Verified, "{done:#?}");
    build
}

/// GETs `url` without a token until it answers 200 (bounded), returning the body.
async fn get_when_there(url: &str) -> Vec<u8> {
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let resp = http.get(url).send().await;
        if let Ok(r) = resp
            && r.status().is_success()
        {
            return r.bytes().await.unwrap().to_vec();
        }
        assert!(Instant::now() < deadline, "{url} never answered 200");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn signer_keys(stack: &Stack) -> Vec<ed25519_dalek::VerifyingKey> {
    let published = stack.user().signer_keys().await.unwrap();
    published
        .keys
        .values()
        .map(|k| {
            let raw: [u8; 32] = B64.decode(k).unwrap().try_into().unwrap();
            ed25519_dalek::VerifyingKey::from_bytes(&raw).unwrap()
        })
        .collect()
}

/// A consumer with nothing but the store's address, the tenant and the controller's keys.
async fn read_public_build(stack: &Stack, build: &str) {
    let base = format!("{}/api/v1/public/{TENANT}/builds/{build}", stack.store_url);
    let envelope: Envelope =
        serde_json::from_slice(&get_when_there(&format!("{base}/statement")).await).unwrap();
    let statement = attest::verify_envelope_with_any(&envelope, &signer_keys(stack).await)
        .expect("the statement at the store verifies with the controller's keys");
    let subjects = attest::subjects(&statement).unwrap();
    let subject = subjects.iter().find(|s| s.name == "build/out.txt").unwrap();
    let file = get_when_there(&format!("{base}/files/build/out.txt")).await;
    assert_eq!(file, CONTENT);
    assert_eq!(subject.digest.sha256, Digest::of(&file).hex());
}

async fn a_public_build_is_read_from_the_store_without_a_token(backend: Backend) {
    let stack = Stack::start_with(backend, 30, public(true)).await;
    let build = verified_build(&stack, &workers(&stack).await).await;
    read_public_build(&stack, &build).await;
    stack.stop().await;
}

async fn the_statement_reaches_the_store_after_an_outage_and_a_restart(backend: Backend) {
    let mut stack = Stack::start_with(backend, 30, public(false)).await;
    let (a, b) = workers(&stack).await;
    let build = stack.submit(ONE_JOB).await;
    let (ta, tb) = tokio::join!(a.take(), b.take());
    a.upload(&ta, CONTENT).await;
    b.upload(&tb, CONTENT).await;
    // The store goes away before the build is verified: the first pushes fail.
    stack.stop_store().await;
    a.succeed(&ta, CONTENT, Usage::default()).await;
    b.succeed(&tb, CONTENT, Usage::default()).await;
    stack
        .wait_build(&build, "verification", |s| s.state == BuildState::Verified)
        .await;
    tokio::time::sleep(Duration::from_millis(1500)).await; // a failed push or two
    stack.stop_controller().await;
    stack.start_store().await;
    // Not public: nothing without a token, while the statement has not been pushed either.
    let public = format!(
        "{}/api/v1/public/{TENANT}/builds/{build}/statement",
        stack.store_url
    );
    let before = reqwest::get(&public).await.unwrap();
    assert_eq!(before.status(), 404);

    // The project goes public; the restarted controller pushes what is still in its outbox.
    stack.config.project.public = true;
    stack.start_controller().await;
    read_public_build(&stack, &build).await;
    stack.stop().await;
}

/// `quorum fetch` checks the summary with `check_build`; here it meets summaries a hostile
/// controller or a man in the middle could serve.
#[tokio::test(flavor = "multi_thread")]
async fn forged_or_substituted_summaries_are_refused() {
    bounded(async {
        let stack = Stack::start(Backend::Sqlite, 30).await;
        let workers = workers(&stack).await;
        let b1 = verified_build(&stack, &workers).await;
        let b2 = verified_build(&stack, &workers).await;
        let user = stack.user();
        let keys = signer_keys(&stack).await;
        let (p1, s1) = (
            user.statement(&b1).await.unwrap(),
            user.summary(&b1).await.unwrap(),
        );
        let (p2, s2) = (
            user.statement(&b2).await.unwrap(),
            user.summary(&b2).await.unwrap(),
        );

        let checked = check_build(&b1, &p1, &s1, &keys).expect("the real summary passes");
        assert_eq!(checked.jobs.len(), 1);
        assert_eq!(checked.jobs[0].builders.len(), 2);
        assert_eq!(checked.subjects.len(), 1);

        // Another build's summary, or another build's provenance.
        let e = check_build(&b1, &p1, &s2, &keys).unwrap_err();
        assert!(
            matches!(e, BuildCheckError::SummaryOfAnotherBuild { .. }),
            "{e}"
        );
        let e = check_build(&b1, &p2, &s1, &keys).unwrap_err();
        assert!(
            matches!(e, BuildCheckError::ProvenanceOfAnotherBuild { .. }),
            "{e}"
        );

        // The real summary, re-signed by a key the controller does not publish.
        let stranger = ed25519_dalek::SigningKey::from_bytes(&[7u8; 32]);
        let forged = resign(&s1, &stranger, |_| {});
        let e = check_build(&b1, &p1, &forged, &keys).unwrap_err();
        assert!(matches!(e, BuildCheckError::Summary { .. }), "{e}");
        assert!(e.to_string().contains("does not verify"), "{e}");

        // Signed by the controller's own key (read from its ring, as a compromised database
        // could not) but saying FAILED, or naming too few builders for the policy.
        let ring = quorum_controller::signer_key_ring(&stack.config.data_dir);
        let key = ring.active().unwrap();
        let failed = resign(&s1, &key, |v| {
            v["predicate"]["verificationResult"] = "FAILED".into();
        });
        let e = check_build(&b1, &p1, &failed, &keys).unwrap_err();
        assert!(matches!(e, BuildCheckError::NotPassed { .. }), "{e}");
        assert!(e.to_string().contains("FAILED"), "{e}");
        let thin = resign(&s1, &key, |v| {
            v["predicate"]["agreement"][0]["builders"]
                .as_array_mut()
                .unwrap()
                .truncate(1);
        });
        let e = check_build(&b1, &p1, &thin, &keys).unwrap_err();
        assert!(matches!(e, BuildCheckError::PolicyNotMet { .. }), "{e}");
        // A provenance of the same build signed another time: the summary does not cover it.
        let other = resign(&p1, &key, |v| {
            v["predicate"]["runDetails"]["metadata"]["finishedOn"] = "2000-01-01T00:00:00Z".into();
        });
        let e = check_build(&b1, &other, &s1, &keys).unwrap_err();
        assert!(matches!(e, BuildCheckError::OtherProvenance { .. }), "{e}");
        stack.stop().await;
    })
    .await
}

/// The envelope's statement, changed by `edit`, signed again by `key`.
fn resign(
    envelope: &Envelope,
    key: &ed25519_dalek::SigningKey,
    edit: impl FnOnce(&mut serde_json::Value),
) -> Envelope {
    let mut statement: serde_json::Value =
        serde_json::from_slice(&B64.decode(&envelope.payload).unwrap()).unwrap();
    edit(&mut statement);
    attest::envelope_with(&statement, attest::key_id(&key.verifying_key()), |m| {
        key.sign(m).to_bytes()
    })
}
