//! The process executor: exit statuses, the job timeout killing a whole session, leftovers killed
//! at step end, cancellation, output order, umask and SOURCE_DATE_EPOCH.

use std::path::Path;
use std::time::{Duration, Instant};

use quorum_worker::executor::{JobStatus, StepExit};
use tokio_util::sync::CancellationToken;

use crate::run;

const SHORT: Duration = Duration::from_secs(30);

/// Waits up to 10 s for `pid` to be gone. A killed process whose parent died may linger as a
/// zombie until init reaps it; a zombie runs nothing, so it counts as gone.
fn wait_gone(pid: u32) -> bool {
    let until = Instant::now() + Duration::from_secs(10);
    while Instant::now() < until {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => return true,
            Ok(stat) => {
                let state = stat
                    .rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().next());
                if state == Some("Z") {
                    return true;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

fn read_pid(dir: &Path) -> u32 {
    std::fs::read_to_string(dir.join("bg.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

#[tokio::test]
async fn a_failing_step_ends_the_job_with_its_status() {
    let ran = run(
        &["true", "exit 3", "echo never"],
        SHORT,
        CancellationToken::new(),
    )
    .await;
    assert_eq!(
        ran.outcome.status,
        JobStatus::Failed {
            index: 2,
            step: "exit 3".into(),
            exit: StepExit::Exited(3)
        }
    );
    assert_eq!(
        ran.outcome.status.failure_reason().unwrap(),
        "step 2 (`exit 3`) exited with status 3"
    );
    assert!(!ran.log.contains("\nnever\n"), "{}", ran.log);
    assert!(
        ran.log
            .ends_with("[quorum: step 2 (`exit 3`) exited with status 3]\n"),
        "{}",
        ran.log
    );
}

#[tokio::test]
async fn sh_runs_with_errexit() {
    let ran = run(&["false; echo after"], SHORT, CancellationToken::new()).await;
    assert!(matches!(
        ran.outcome.status,
        JobStatus::Failed {
            exit: StepExit::Exited(1),
            ..
        }
    ));
    assert!(!ran.log.contains("\nafter\n"), "{}", ran.log);
}

#[tokio::test]
async fn timeout_kills_the_whole_session() {
    let started = Instant::now();
    let ran = run(
        &["sleep 300 & echo $! > bg.pid; sleep 300"],
        Duration::from_secs(1),
        CancellationToken::new(),
    )
    .await;
    assert_eq!(ran.outcome.status, JobStatus::TimedOut { secs: 1 });
    assert_eq!(
        ran.outcome.status.failure_reason().unwrap(),
        "timed out after 1 s"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
    let pid = read_pid(&ran.build_dir());
    assert!(
        wait_gone(pid),
        "background process {pid} survived the timeout"
    );
}

#[tokio::test]
async fn the_timeout_covers_all_steps_together() {
    let ran = run(
        &["sleep 0.6", "sleep 0.6", "echo third"],
        Duration::from_secs(1),
        CancellationToken::new(),
    )
    .await;
    assert_eq!(ran.outcome.status, JobStatus::TimedOut { secs: 1 });
    assert!(!ran.log.contains("$ echo third"), "{}", ran.log);
}

#[tokio::test]
async fn leftovers_of_a_step_are_killed_when_it_ends() {
    let started = Instant::now();
    let ran = run(
        &["sleep 300 & echo $! > bg.pid", "echo next"],
        SHORT,
        CancellationToken::new(),
    )
    .await;
    assert_eq!(ran.outcome.status, JobStatus::Succeeded);
    // The background sleep held the output pipe; the job must not have waited for it.
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
    assert!(wait_gone(read_pid(&ran.build_dir())));
    assert!(ran.log.contains("next\n"));
}

#[tokio::test]
async fn cancel_kills_the_step() {
    let cancel = CancellationToken::new();
    let trigger = cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        trigger.cancel();
    });
    let started = Instant::now();
    let ran = run(
        &["sleep 300 & echo $! > bg.pid; sleep 300", "echo never"],
        SHORT,
        cancel,
    )
    .await;
    assert_eq!(ran.outcome.status, JobStatus::Cancelled);
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(wait_gone(read_pid(&ran.build_dir())));
    assert!(!ran.log.contains("$ echo never"), "{}", ran.log);
}

#[tokio::test]
async fn output_is_one_stream_in_order() {
    let ran = run(
        &["echo one; echo two >&2; echo three", "printf 'four\\n' >&2"],
        SHORT,
        CancellationToken::new(),
    )
    .await;
    assert_eq!(ran.outcome.status, JobStatus::Succeeded);
    assert_eq!(
        ran.log,
        "$ echo one; echo two >&2; echo three\none\ntwo\nthree\n$ printf 'four\\n' >&2\nfour\n"
    );
}

#[tokio::test]
async fn umask_is_022_and_files_get_0644() {
    let ran = run(
        &["umask > umask.txt; echo x > made"],
        SHORT,
        CancellationToken::new(),
    )
    .await;
    assert_eq!(ran.outcome.status, JobStatus::Succeeded);
    assert_eq!(
        std::fs::read_to_string(ran.build_dir().join("umask.txt"))
            .unwrap()
            .trim(),
        "0022"
    );
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(ran.build_dir().join("made"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o644);
}

#[tokio::test]
async fn source_date_epoch_and_stdin() {
    // stdin is /dev/null: `cat` ends at once instead of waiting for input.
    let ran = run(
        &["echo \"$SOURCE_DATE_EPOCH\"; cat; echo done"],
        SHORT,
        CancellationToken::new(),
    )
    .await;
    assert_eq!(ran.outcome.status, JobStatus::Succeeded);
    assert!(ran.log.contains("\n1600000000\ndone\n"), "{}", ran.log);
}

#[tokio::test]
async fn usage_is_measured() {
    // A shell loop burns CPU in the step's own process, which wait4 accounts for.
    let ran = run(
        &["i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done"],
        SHORT,
        CancellationToken::new(),
    )
    .await;
    assert_eq!(ran.outcome.status, JobStatus::Succeeded);
    assert!(
        ran.outcome.cpu > Duration::from_millis(10),
        "{:?}",
        ran.outcome
    );
    assert!(ran.outcome.peak_rss_kib > 100, "{:?}", ran.outcome);
    assert!(ran.outcome.wall >= ran.outcome.cpu / 2, "{:?}", ran.outcome);
}

#[tokio::test]
async fn a_missing_build_dir_is_an_executor_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut job = crate::spec(dir.path(), &["true"], SHORT);
    job.build_dir = dir.path().join("absent");
    let (tx, _rx) = tokio::sync::mpsc::channel(16);
    let err = quorum_worker::executor::run_job(
        &quorum_worker::executor::ProcessExecutor,
        &job,
        tx,
        &CancellationToken::new(),
    )
    .await
    .unwrap_err();
    assert!(err.to_string().starts_with("cannot start step 1:"), "{err}");
}
