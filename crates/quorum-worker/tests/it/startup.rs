//! Starting and stopping the agent: enrollment problems are startup errors, and an enrolled
//! worker whose controller is down keeps retrying until shutdown, then stops promptly.

use std::time::Duration;

use quorum_worker::{Config, ControllerConfig};
use tokio_util::sync::CancellationToken;

/// A URL nothing listens on: a port that was just free.
fn dead_url() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    format!("http://{}", listener.local_addr().unwrap())
}

fn config(data_dir: &std::path::Path, controllers: Vec<ControllerConfig>) -> Config {
    Config {
        name: "w1".into(),
        data_dir: data_dir.to_path_buf(),
        controllers,
        trusted_issuers: vec![],
        max_jobs: 2,
        allow_local_repositories: false,
        sandbox: Default::default(),
        allow_weaker_sandbox: false,
        limits: Default::default(),
    }
}

#[tokio::test]
async fn a_worker_without_enrollment_token_does_not_start() {
    let dir = tempfile::tempdir().unwrap();
    // Two controllers, so QUORUM_ENROLLMENT_TOKEN (if set around the tests) does not apply.
    let controllers = vec![
        ControllerConfig {
            url: dead_url(),
            enrollment_token: Some("tok".into()),
        },
        ControllerConfig {
            url: dead_url(),
            enrollment_token: None,
        },
    ];
    let run = quorum_worker::run(config(dir.path(), controllers), CancellationToken::new());
    let err = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .unwrap()
        .unwrap_err();
    // The first controller is unreachable: enrollment fails there, clearly.
    assert!(
        format!("{err:#}").starts_with("cannot enroll with controller http://127.0.0.1:"),
        "{err:#}"
    );

    let controllers = vec![
        ControllerConfig {
            url: dead_url(),
            enrollment_token: None,
        },
        ControllerConfig {
            url: dead_url(),
            enrollment_token: None,
        },
    ];
    let err = quorum_worker::run(config(dir.path(), controllers), CancellationToken::new())
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("has no enrollment token"),
        "{err:#}"
    );
}

#[tokio::test]
async fn an_enrolled_worker_retries_until_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let url = dead_url();
    let enrollments =
        serde_json::json!({ "controllers": { url.clone(): { "worker_id": "w-1", "owner": "o" } } });
    std::fs::write(dir.path().join("enrollments.json"), enrollments.to_string()).unwrap();
    std::fs::create_dir_all(dir.path().join("builds/stale")).unwrap();

    let shutdown = CancellationToken::new();
    let controllers = vec![ControllerConfig {
        url: format!("{url}/"),
        enrollment_token: None,
    }];
    let worker = tokio::spawn(quorum_worker::run(
        config(dir.path(), controllers),
        shutdown.clone(),
    ));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        !worker.is_finished(),
        "an unreachable controller is not a reason to exit"
    );
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), worker)
        .await
        .expect("stops promptly")
        .unwrap()
        .unwrap();

    use std::os::unix::fs::PermissionsExt as _;
    let key = std::fs::metadata(dir.path().join("worker.key")).unwrap();
    assert_eq!(key.len(), 32);
    assert_eq!(key.permissions().mode() & 0o777, 0o600);
    assert!(
        !dir.path().join("builds/stale").exists(),
        "leftovers of a previous run are removed"
    );
}
