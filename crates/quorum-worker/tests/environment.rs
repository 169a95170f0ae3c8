//! A step's environment is exactly the allow-list: a secret planted in the worker's own
//! environment is not passed on. A binary of its own because it sets a process environment
//! variable, which is only sound while no other thread can be reading the environment.

use std::collections::BTreeMap;
use std::time::Duration;

use quorum_worker::executor::{JobSpec, JobStatus, ProcessExecutor, run_job};
use tokio_util::sync::CancellationToken;

#[test]
#[allow(unsafe_code)] // std::env::set_var, see the SAFETY note
fn steps_see_only_the_allow_listed_environment() {
    let name = format!("QUORUM_PLANTED_SECRET_{}", std::process::id());
    let value = "correct-horse-battery-staple";
    // SAFETY: this is the binary's only test, and the tokio runtime is built only below, so no
    // other thread exists that could read the environment concurrently.
    unsafe { std::env::set_var(&name, value) };
    assert_eq!(std::env::var(&name).unwrap(), value);

    let dir = tempfile::tempdir().unwrap();
    let build_dir = dir.path().join("src");
    std::fs::create_dir_all(&build_dir).unwrap();
    let job = JobSpec {
        build_dir: build_dir.clone(),
        tmp_dir: dir.path().join("tmp"),
        source_date_epoch: 1_234_567_890,
        script: vec!["env".into()],
        timeout: Duration::from_secs(30),
        inputs: Vec::new(),
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (outcome, log) = rt.block_on(async {
        let (tx, mut rx) = tokio::sync::mpsc::channel(16);
        let outcome = tokio::time::timeout(
            Duration::from_secs(60),
            run_job(&ProcessExecutor, &job, tx, &CancellationToken::new()),
        )
        .await
        .unwrap()
        .unwrap();
        let mut log = Vec::new();
        while let Some(chunk) = rx.recv().await {
            log.extend(chunk);
        }
        (outcome, String::from_utf8(log).unwrap())
    });
    assert_eq!(outcome.status, JobStatus::Succeeded);
    assert!(!log.contains(value), "the secret leaked: {log}");

    let mut env: BTreeMap<String, String> = log
        .lines()
        .skip(1) // the `$ env` header
        .map(|l| {
            l.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .unwrap()
        })
        .collect();
    // dash exports PWD itself; it is the build directory, not something the worker passed.
    let pwd = env.remove("PWD").unwrap_or_default();
    assert_eq!(
        std::path::Path::new(&pwd).canonicalize().unwrap(),
        build_dir.canonicalize().unwrap()
    );
    let tmp = dir.path().join("tmp").display().to_string();
    let expected: BTreeMap<String, String> = [
        ("HOME", "/nonexistent"),
        ("LANG", "C.UTF-8"),
        ("LC_ALL", "C.UTF-8"),
        ("LOGNAME", "build"),
        ("PATH", "/usr/local/bin:/usr/bin:/bin"),
        ("PYTHONHASHSEED", "0"),
        ("SOURCE_DATE_EPOCH", "1234567890"),
        ("TMPDIR", tmp.as_str()),
        ("TZ", "UTC"),
        ("USER", "build"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    assert_eq!(env, expected);
    assert!(
        dir.path().join("tmp").is_dir(),
        "TMPDIR exists for the step"
    );
}
