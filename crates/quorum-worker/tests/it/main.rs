//! The worker's integration tests, one binary: the process executor, artifact collection, the
//! signing of worker requests, and starting and stopping the agent. (`environment.rs` is separate: it changes the process
//! environment, which is only sound with no other test running.)

mod artifacts;
mod client;
mod executor;
mod ledger;
mod startup;

use std::time::Duration;

use quorum_worker::executor::{JobOutcome, JobSpec, ProcessExecutor, run_job};
use tokio_util::sync::CancellationToken;

/// A job run by the process executor in a fresh directory.
pub struct Ran {
    pub outcome: JobOutcome,
    pub log: String,
    pub dir: tempfile::TempDir,
}

impl Ran {
    pub fn build_dir(&self) -> std::path::PathBuf {
        self.dir.path().join("src")
    }
}

pub fn spec(dir: &std::path::Path, script: &[&str], timeout: Duration) -> JobSpec {
    let build_dir = dir.join("src");
    std::fs::create_dir_all(&build_dir).unwrap();
    JobSpec {
        build_dir,
        tmp_dir: dir.join("tmp"),
        source_date_epoch: 1_600_000_000,
        script: script.iter().map(|s| s.to_string()).collect(),
        timeout,
        inputs: Vec::new(),
    }
}

/// Runs `script` and collects its whole log; every wait is bounded.
pub async fn run(script: &[&str], timeout: Duration, cancel: CancellationToken) -> Ran {
    let dir = tempfile::tempdir().unwrap();
    let job = spec(dir.path(), script, timeout);
    let (tx, mut rx) = tokio::sync::mpsc::channel(16);
    let collector = tokio::spawn(async move {
        let mut log = Vec::new();
        while let Some(chunk) = rx.recv().await {
            log.extend(chunk);
        }
        String::from_utf8(log).unwrap()
    });
    let outcome = tokio::time::timeout(
        timeout + Duration::from_secs(30),
        run_job(&ProcessExecutor, &job, tx, &cancel),
    )
    .await
    .expect("the job ends soon after its timeout")
    .expect("the executor works");
    let log = tokio::time::timeout(Duration::from_secs(10), collector)
        .await
        .expect("the log ends")
        .unwrap();
    Ran { outcome, log, dir }
}
