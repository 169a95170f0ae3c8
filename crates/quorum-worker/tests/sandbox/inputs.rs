//! Declared inputs: downloaded from a loopback HTTP server this test starts, verified against
//! their pinned digests, cached by digest, and mounted read-only into the sandbox.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use quorum_core::Digest;
use quorum_core::pipeline::Input;
use quorum_worker::executor::Limits;
use quorum_worker::inputs::{InputCache, InputError};
use tokio_util::sync::CancellationToken;

use super::{SHORT, assert_succeeded, run_spec, sandbox, spec};

const GOOD: &[u8] = b"the pinned input, version 1\n";
const SWAPPED: &[u8] = b"the same URL, different bytes\n";

/// Serves `/good` and `/swapped` on 127.0.0.1 and counts the requests; 404 for anything else.
async fn server() -> (String, Arc<AtomicUsize>) {
    use axum::routing::get;
    let hits = Arc::new(AtomicUsize::new(0));
    let (h1, h2) = (hits.clone(), hits.clone());
    let app = axum::Router::new()
        .route(
            "/good",
            get(move || async move {
                h1.fetch_add(1, Ordering::SeqCst);
                GOOD
            }),
        )
        .route(
            "/swapped",
            get(move || async move {
                h2.fetch_add(1, Ordering::SeqCst);
                SWAPPED
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, hits)
}

fn input(name: &str, url: String, content: &[u8]) -> Input {
    Input {
        name: name.into(),
        url,
        sha256: Digest::of(content),
    }
}

#[tokio::test]
async fn a_verified_input_is_cached_and_mounted_read_only() {
    let state = tempfile::tempdir().unwrap();
    let Some(sb) = sandbox(state.path(), Limits::default()) else {
        return;
    };
    let (base, hits) = server().await;
    let cache_dir = tempfile::tempdir().unwrap();
    let cache = InputCache::new(cache_dir.path().join("inputs"));
    let inputs = [input("data.txt", format!("{base}/good"), GOOD)];
    let cancel = CancellationToken::new();

    let mounted = cache.fetch(&inputs, &cancel).await.unwrap();
    assert_eq!(mounted[0].path, cache.path_of(&Digest::of(GOOD)));
    assert_eq!(std::fs::read(&mounted[0].path).unwrap(), GOOD);
    // A second job with the same input is served from the cache.
    let again = cache.fetch(&inputs, &cancel).await.unwrap();
    assert_eq!(again, mounted);
    assert_eq!(hits.load(Ordering::SeqCst), 1);

    let dir = tempfile::tempdir().unwrap();
    let mut job = spec(
        dir.path(),
        &[
            "cat /inputs/data.txt",
            "if echo x > /inputs/data.txt 2>/dev/null; then echo OVERWROTE; else echo READ-ONLY; fi",
            "if rm /inputs/data.txt 2>/dev/null; then echo REMOVED; fi; ls /inputs",
        ],
        SHORT,
    );
    job.inputs = mounted;
    let ran = run_spec(&sb, &job, CancellationToken::new()).await;
    assert_succeeded(&ran);
    assert!(
        ran.log.contains(std::str::from_utf8(GOOD).unwrap()),
        "{}",
        ran.log
    );
    assert!(ran.log.contains("\nREAD-ONLY\n"), "{}", ran.log);
    assert!(!ran.log.contains("\nREMOVED\n"), "{}", ran.log);
    assert_eq!(
        std::fs::read(cache.path_of(&Digest::of(GOOD))).unwrap(),
        GOOD
    );
}

#[tokio::test]
async fn a_digest_mismatch_names_the_input_and_leaves_nothing_in_the_cache() {
    let (base, _) = server().await;
    let cache_dir = tempfile::tempdir().unwrap();
    let cache = InputCache::new(cache_dir.path().join("inputs"));
    let url = format!("{base}/swapped");
    let pinned = input("lib.tar.gz", url.clone(), GOOD);

    let err = cache
        .fetch(&[pinned], &CancellationToken::new())
        .await
        .unwrap_err();
    assert!(matches!(err, InputError::Mismatch { .. }), "{err:?}");
    let message = err.to_string();
    for part in [
        "lib.tar.gz".to_string(),
        url,
        Digest::of(GOOD).to_string(),
        Digest::of(SWAPPED).to_string(),
    ] {
        assert!(message.contains(&part), "{message} lacks {part}");
    }
    // Neither the swapped bytes nor a partial download stay behind.
    let left: Vec<_> = std::fs::read_dir(cache_dir.path().join("inputs"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "{left:?}");

    let missing = input("gone", format!("{base}/nothing-here"), GOOD);
    let err = cache
        .fetch(&[missing], &CancellationToken::new())
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("input `gone`") && err.contains("404"), "{err}");
}

#[tokio::test]
async fn the_process_tier_refuses_a_job_with_inputs_instead_of_running_without_them() {
    let dir = tempfile::tempdir().unwrap();
    let mut job = spec(dir.path(), &["true"], SHORT);
    job.inputs = vec![quorum_worker::executor::MountedInput {
        name: "data.txt".into(),
        path: dir.path().join("data.txt"),
    }];
    let (tx, _rx) = tokio::sync::mpsc::channel(16);
    let err = quorum_worker::executor::run_job(
        &quorum_worker::executor::ProcessExecutor,
        &job,
        tx,
        &CancellationToken::new(),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("declares inputs (`data.txt`)") && err.contains("namespace sandbox"),
        "{err}"
    );
}
