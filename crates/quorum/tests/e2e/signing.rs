//! Issue 6's fault test at the signing moment, and what a consumer gets from a signed build: the
//! controller is SIGKILLed exactly between signing a build and committing the statement with the
//! verified state (a failpoint of debug builds, `quorum_controller::failpoint`), restarted, and
//! must end with the build verified once, its statement and summary consistent and verifying,
//! pushed to the store, and the log's JWT-shaped output redacted.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use quorum_api::v1::controller::BuildState;

use crate::util::{Db, Fixture, repo_with, stderr, stdout};

const LIMIT: Duration = Duration::from_secs(120);

/// The step prints a JWT-shaped string that does not appear in the pipeline itself (the shell
/// joins its parts), so only redaction of the output can hide it.
const PIPELINE: &str = "jobs:\n  build:\n    script:\n      - \"printf 'token=%s.%s.%s\\\\n' eyJhbGciOiJIUzI1NiJ9 eyJzdWIiOiJtZSJ9 c2lnbmF0dXJlLWJ5dGVz\"\n      - \"echo same > out.txt\"\n    artifacts: [out.txt]\n";
const JWT: &str = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJtZSJ9.c2lnbmF0dXJlLWJ5dGVz";

#[tokio::test(flavor = "multi_thread")]
async fn killed_between_signing_and_commit_the_build_is_verified_once() {
    killed_between_signing_and_commit_on(Db::Sqlite).await
}

#[tokio::test(flavor = "multi_thread")]
async fn killed_between_signing_and_commit_on_postgres() {
    killed_between_signing_and_commit_on(Db::Postgres).await
}

async fn killed_between_signing_and_commit_on(db: Db) {
    let mut fx = Fixture::with_workers_on(db, 2).await;
    let failpoints = fx.fed.role_dir("controller").join("failpoints");
    std::fs::create_dir_all(&failpoints).unwrap();
    let armed = failpoints.join("after-signing");
    std::fs::write(&armed, "").unwrap();

    let repo = repo_with(&[(".quorum.yml", PIPELINE)]);
    let build = fx.submit(repo.path()).await;
    wait_for_file(&failpoints.join("after-signing.reached"), &fx).await;
    // Signed, written, not committed: nobody sees a verdict yet.
    let status = fx.fed.user_client().status(&build).await.unwrap();
    assert_eq!(status.state, BuildState::Running, "{status:#?}");
    assert!(!status.signed, "{status:#?}");

    fx.fed.kill("controller").unwrap();
    std::fs::remove_file(&armed).unwrap();
    fx.fed.start_role("controller").await.unwrap();

    let status = fx.wait_final(&build, LIMIT).await;
    assert_eq!(
        status.state,
        BuildState::Verified,
        "{status:#?}\n{}",
        fx.logs()
    );
    assert!(status.signed);
    assert_eq!(statements(&fx, &build).await, 1, "exactly one statement");

    // The statement and the summary verify with the published keys and belong together.
    let user = fx.fed.user_client();
    let provenance = user.statement(&build).await.unwrap();
    let summary = user.summary(&build).await.unwrap();
    let published = user.signer_keys().await.unwrap();
    let keys: Vec<ed25519_dalek::VerifyingKey> = published
        .keys
        .values()
        .map(|k| {
            use base64::Engine as _;
            let raw = base64::engine::general_purpose::STANDARD.decode(k).unwrap();
            ed25519_dalek::VerifyingKey::from_bytes(&raw.try_into().unwrap()).unwrap()
        })
        .collect();
    quorum_client::verify::check_build(&build, &provenance, &summary, &keys)
        .expect("the statement and summary written after the restart verify together");

    // The outbox survived the kill: the store has the same statement.
    let at_store = statement_at_store(&fx, &build).await;
    assert_eq!(at_store, provenance);

    // A consumer fetches with every check, summary included.
    let dest = tempfile::tempdir().unwrap();
    let out = fx.cli(&["fetch", &build, "--out", dest.path().to_str().unwrap()]);
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    assert_eq!(
        std::fs::read_to_string(dest.path().join("build/out.txt")).unwrap(),
        "same\n"
    );

    // The step's JWT-shaped output is redacted in the stored log.
    let out = fx.cli(&["logs", &build]);
    assert!(out.status.success(), "{}", stderr(&out));
    let log = stdout(&out);
    assert!(log.contains("token=[redacted]"), "{log}");
    assert!(!log.contains(JWT), "{log}");
}

async fn wait_for_file(path: &Path, fx: &Fixture) {
    let start = Instant::now();
    while !path.exists() {
        assert!(
            start.elapsed() < LIMIT,
            "the controller never reached the failpoint\n{}",
            fx.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The statement rows of `build`, counted in the controller's own database.
async fn statements(fx: &Fixture, build: &str) -> i64 {
    use sqlx::Connection as _;
    const COUNT: &str = "SELECT COUNT(*) FROM statements WHERE build_id = $1";
    match fx.fed.database_url() {
        Some(url) => {
            let mut conn = sqlx::PgConnection::connect(url).await.unwrap();
            sqlx::query_scalar(COUNT)
                .bind(build)
                .fetch_one(&mut conn)
                .await
                .unwrap()
        }
        None => {
            let path: PathBuf = fx.fed.role_dir("controller").join("controller.db");
            let url = format!("sqlite://{}?mode=ro", path.display());
            let mut conn = sqlx::SqliteConnection::connect(&url).await.unwrap();
            sqlx::query_scalar(COUNT)
                .bind(build)
                .fetch_one(&mut conn)
                .await
                .unwrap()
        }
    }
}

/// The statement the store holds for `build`, read with the build's read token (bounded wait:
/// the controller pushes it in the background).
async fn statement_at_store(fx: &Fixture, build: &str) -> quorum_core::attest::Envelope {
    let list = fx.fed.user_client().artifacts(build).await.unwrap();
    let http = reqwest::Client::new();
    let url = format!("{}/api/v1/builds/{build}/statement", list.store_url);
    let start = Instant::now();
    loop {
        let resp = http
            .get(&url)
            .bearer_auth(&list.read_token)
            .send()
            .await
            .unwrap();
        if resp.status().is_success() {
            return resp.json().await.unwrap();
        }
        assert!(
            start.elapsed() < LIMIT,
            "the store never got the statement: {}\n{}",
            resp.status(),
            fx.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
