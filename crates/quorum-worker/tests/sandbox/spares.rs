//! Spare sandboxes: while a step runs, the executor starts the next step's sandbox, whose init
//! waits for the step's command and environment. Each step must still get a sandbox no earlier
//! step ran in, see exactly its own environment, and a spare no step used must die with its job
//! (at its end, on cancel, and when the worker drops the job) and take its cgroup along.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use quorum_worker::executor::{
    JobStart, JobStatus, Limits, run_job, run_started_job, sandbox_environment,
};
use tokio_util::sync::CancellationToken;

use super::{SHORT, assert_succeeded, processes_in, run, run_spec, sandbox, spec, wait_none_in};

/// With a process limit, so every sandbox has a cgroup of its own that the tests can find.
fn limits() -> Limits {
    Limits {
        pids: Some(128),
        ..Limits::default()
    }
}

/// The cgroups (their memory or unified-hierarchy directories) of the sandboxed processes
/// working in `dir`.
fn groups_in(dir: &Path) -> BTreeSet<PathBuf> {
    let mut groups = BTreeSet::new();
    for pid in processes_in(dir) {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/cgroup")) else {
            continue;
        };
        for line in text.lines() {
            let mut parts = line.splitn(3, ':');
            let (_, controllers, path) = match (parts.next(), parts.next(), parts.next()) {
                (Some(id), Some(c), Some(p)) => (id, c, p),
                _ => continue,
            };
            let base = if controllers.is_empty() {
                PathBuf::from("/sys/fs/cgroup")
            } else if controllers.split(',').any(|c| c == "memory") {
                PathBuf::from("/sys/fs/cgroup/memory")
            } else {
                continue;
            };
            if path.contains("/quorum/step-") && base.exists() {
                groups.insert(base.join(path.trim_start_matches('/')));
            }
        }
    }
    groups
}

/// Waits (at most 10 s) until `marker` exists and two sandboxes work in `dir`, the running step's
/// and the spare started for the next step, and returns their cgroups.
async fn running_and_spare(dir: &Path, marker: &Path) -> BTreeSet<PathBuf> {
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let groups = groups_in(dir);
        if (marker.exists() && groups.len() >= 2) || Instant::now() >= until {
            return groups;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// After a job: nothing works in `dir` any more and none of `groups` exists.
fn assert_all_gone(dir: &Path, groups: &BTreeSet<PathBuf>, after: &str) {
    let left = processes_in(dir);
    assert!(left.is_empty(), "processes outlived {after}: {left:?}");
    for group in groups {
        assert!(!group.exists(), "{} outlived {after}", group.display());
    }
}

/// The seconds since boot at which pid 1 of the step's pid namespace (its sandbox's bwrap)
/// started, and the step's shell's own time since boot: `START <pid 1> <now>`.
const WHEN: &str = "echo START $(awk -v t=$(getconf CLK_TCK) '{ print $22 / t }' /proc/1/stat) \
                    $(cut -d' ' -f1 /proc/uptime)";

#[tokio::test]
async fn each_step_gets_a_fresh_sandbox_started_before_it_was_asked_for() {
    let state = tempfile::tempdir().unwrap();
    let Some(sb) = sandbox(state.path(), limits()) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // Each step shows its namespaces and its /tmp, leaves a file in /tmp and a process behind,
    // and takes a moment, in which the next step's spare gets ready.
    let step = format!(
        "{WHEN}; echo NS $(readlink /proc/self/ns/pid /proc/self/ns/mnt /proc/self/ns/net); \
         echo TMP $(ls -A /tmp) END; touch /tmp/left-behind; sleep 30 & sleep 0.3"
    );
    let ran = run(&sb, dir.path(), &[&step, &step, &step], SHORT).await;
    assert_succeeded(&ran);
    let namespaces: Vec<&str> = ran
        .log
        .lines()
        .filter_map(|l| l.strip_prefix("NS "))
        .collect();
    assert_eq!(namespaces.len(), 3, "{}", ran.log);
    // Compared between neighbours only: each step's sandbox was started while the one before
    // it ran, so the two existed at once and their namespaces' inode numbers must differ. The
    // kernel reuses a freed namespace's number, so step 3 may get step 1's.
    for pair in namespaces.windows(2) {
        let distinct: BTreeSet<&str> = pair.iter().flat_map(|l| l.split_whitespace()).collect();
        assert_eq!(
            distinct.len(),
            6,
            "a pid, mount or network namespace served two steps: {}",
            ran.log
        );
    }
    let tmps: Vec<&str> = ran.log.lines().filter(|l| l.starts_with("TMP ")).collect();
    assert_eq!(tmps, ["TMP END"; 3], "{}", ran.log);
    // Steps 2 and 3 ran in sandboxes whose bwrap started while the step before them ran: the
    // spares, not sandboxes started on demand.
    let starts: Vec<(f64, f64)> = ran
        .log
        .lines()
        .filter_map(|l| l.strip_prefix("START "))
        .map(|l| {
            let (init, now) = l.split_once(' ').expect("two numbers");
            (init.parse().unwrap(), now.parse().unwrap())
        })
        .collect();
    assert_eq!(starts.len(), 3, "{}", ran.log);
    for i in 1..3 {
        let (sandbox_started, _) = starts[i];
        let (_, previous_step_running) = starts[i - 1];
        // The previous step still sleeps 0.3 s after it reads the clock; one clock tick of slack.
        assert!(
            sandbox_started < previous_step_running + 0.3 - 0.01,
            "step {}'s sandbox started at {sandbox_started}, after step {i} (running at \
             {previous_step_running}) was done: {}",
            i + 1,
            ran.log
        );
    }
    assert!(wait_none_in(dir.path()).is_empty());
}

#[tokio::test]
async fn a_step_from_a_spare_sees_exactly_its_own_environment() {
    let state = tempfile::tempdir().unwrap();
    let Some(sb) = sandbox(state.path(), limits()) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // The first step runs in a sandbox started for it, the second in the spare started while the
    // first ran; the first exports a variable, which must not reach the second.
    let ran = run(
        &sb,
        dir.path(),
        &[
            "export QUORUM_EARLIER_STEP=1; env | sort | sed 's/^/ENV1 /'; sleep 0.3",
            "env | sort | sed 's/^/ENV2 /'",
        ],
        SHORT,
    )
    .await;
    assert_succeeded(&ran);
    let job = spec(dir.path(), &[], SHORT);
    let mut expected: Vec<String> = sandbox_environment(&job)
        .into_iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    // The shell itself sets PWD.
    expected.push("PWD=/build".into());
    expected.sort();
    let env_of = |prefix: &str| -> Vec<String> {
        ran.log
            .lines()
            .filter_map(|l| l.strip_prefix(prefix))
            .map(str::to_string)
            .collect()
    };
    let mut first = expected.clone();
    first.push("QUORUM_EARLIER_STEP=1".into());
    first.sort();
    assert_eq!(env_of("ENV1 "), first, "{}", ran.log);
    assert_eq!(env_of("ENV2 "), expected, "{}", ran.log);
}

#[tokio::test]
async fn a_spare_left_when_a_step_fails_is_killed_with_its_cgroup() {
    let state = tempfile::tempdir().unwrap();
    let Some(sb) = sandbox(state.path(), limits()) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let job = spec(
        dir.path(),
        &["touch /build/started; sleep 1; exit 3", "echo NEVER"],
        SHORT,
    );
    let marker = dir.path().join("src/started");
    let (ran, seen) = tokio::join!(
        run_spec(&sb, &job, CancellationToken::new()),
        running_and_spare(dir.path(), &marker)
    );
    assert!(
        matches!(ran.outcome.status, JobStatus::Failed { index: 1, .. }),
        "{:?}: {}",
        ran.outcome.status,
        ran.log
    );
    assert!(!ran.log.contains("NEVER"), "{}", ran.log);
    assert_eq!(seen.len(), 2, "no spare was seen beside the step: {seen:?}");
    assert_all_gone(dir.path(), &seen, "the job");
}

#[tokio::test]
async fn a_spare_is_killed_with_its_cgroup_when_the_job_is_cancelled() {
    let state = tempfile::tempdir().unwrap();
    let Some(sb) = sandbox(state.path(), limits()) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let job = spec(
        dir.path(),
        &["touch /build/started; sleep 30", "echo NEVER"],
        SHORT,
    );
    let marker = dir.path().join("src/started");
    let cancel = CancellationToken::new();
    let watch = async {
        let seen = running_and_spare(dir.path(), &marker).await;
        cancel.cancel();
        seen
    };
    let (ran, seen) = tokio::join!(run_spec(&sb, &job, cancel.clone()), watch);
    assert_eq!(ran.outcome.status, JobStatus::Cancelled, "{}", ran.log);
    assert_eq!(seen.len(), 2, "no spare was seen beside the step: {seen:?}");
    assert_all_gone(dir.path(), &seen, "the cancelled job");
}

/// A worker that stops drops its jobs' futures: the step and the spare go with them.
#[tokio::test]
async fn a_spare_is_killed_with_its_cgroup_when_the_worker_drops_the_job() {
    let state = tempfile::tempdir().unwrap();
    let Some(sb) = sandbox(state.path(), limits()) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let job = spec(
        dir.path(),
        &["touch /build/started; sleep 30", "echo NEVER"],
        SHORT,
    );
    let marker = dir.path().join("src/started");
    let (tx, mut rx) = tokio::sync::mpsc::channel(16);
    let drain = tokio::spawn(async move { while rx.recv().await.is_some() {} });
    let cancel = CancellationToken::new();
    let seen = tokio::select! {
        outcome = run_job(&sb, &job, tx, &cancel) => panic!("the job ended: {outcome:?}"),
        seen = running_and_spare(dir.path(), &marker) => seen,
    };
    // The job's future is gone here; dropping kills without waiting for the reaping.
    assert_eq!(seen.len(), 2, "no spare was seen beside the step: {seen:?}");
    let left = wait_none_in(dir.path());
    assert!(left.is_empty(), "processes outlived the job: {left:?}");
    for group in &seen {
        assert!(!group.exists(), "{} outlived the job", group.display());
    }
    tokio::time::timeout(Duration::from_secs(10), drain)
        .await
        .expect("the log ends")
        .unwrap();
}

/// Seconds since boot, as the sandbox's `/proc/uptime` shows them too.
fn uptime() -> f64 {
    let text = std::fs::read_to_string("/proc/uptime").unwrap();
    text.split_whitespace().next().unwrap().parse().unwrap()
}

/// The first step's sandbox, started by `JobStart::prepare` before the source is in the build
/// directory (as the worker does while it exports the source), runs that step and sees files
/// that arrived after it was started.
#[tokio::test]
async fn the_first_steps_sandbox_started_before_the_source_arrived_runs_it() {
    let state = tempfile::tempdir().unwrap();
    let Some(sb) = sandbox(state.path(), limits()) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let job = spec(
        dir.path(),
        &[&format!("{WHEN}; cat /build/late.txt")],
        SHORT,
    );
    let start = JobStart::new().unwrap();
    start.prepare(&sb, &job).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    std::fs::write(job.build_dir.join("late.txt"), "ARRIVED-LATE").unwrap();
    let asked = uptime();
    let (tx, mut rx) = tokio::sync::mpsc::channel(16);
    let collector = tokio::spawn(async move {
        let mut log = Vec::new();
        while let Some(chunk) = rx.recv().await {
            log.extend(chunk);
        }
        String::from_utf8_lossy(&log).into_owned()
    });
    let outcome = tokio::time::timeout(
        SHORT,
        run_started_job(&sb, &job, start, tx, &CancellationToken::new()),
    )
    .await
    .expect("the job ends")
    .expect("the executor works");
    let log = tokio::time::timeout(Duration::from_secs(10), collector)
        .await
        .expect("the log ends")
        .unwrap();
    assert_eq!(outcome.status, JobStatus::Succeeded, "{log}");
    assert!(log.contains("ARRIVED-LATE"), "{log}");
    let sandbox_started: f64 = log
        .lines()
        .find_map(|l| l.strip_prefix("START "))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no start time in {log}"));
    // One clock tick of slack: the sandbox existed before the step was asked for.
    assert!(
        sandbox_started < asked - 0.01,
        "the sandbox started at {sandbox_started}, after the step was asked for at {asked}: {log}"
    );
    assert!(wait_none_in(dir.path()).is_empty());
}

/// A job that never runs (its source could not be fetched, or it was cancelled meanwhile)
/// discards its first step's sandbox, or drops it, and either way nothing is left.
#[tokio::test]
async fn a_first_steps_sandbox_is_killed_when_its_job_never_runs() {
    let state = tempfile::tempdir().unwrap();
    let Some(sb) = sandbox(state.path(), limits()) else {
        return;
    };
    for discard in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let job = spec(dir.path(), &["echo NEVER"], SHORT);
        let start = JobStart::new().unwrap();
        start.prepare(&sb, &job).await;
        let until = Instant::now() + Duration::from_secs(10);
        let mut seen = groups_in(dir.path());
        while seen.is_empty() && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(20)).await;
            seen = groups_in(dir.path());
        }
        assert_eq!(seen.len(), 1, "the prepared sandbox was not seen: {seen:?}");
        if discard {
            start.discard().await;
            assert_all_gone(dir.path(), &seen, "the discard");
        } else {
            drop(start);
            let left = wait_none_in(dir.path());
            assert!(left.is_empty(), "processes outlived the drop: {left:?}");
            for group in &seen {
                assert!(!group.exists(), "{} outlived the drop", group.display());
            }
        }
    }
}

/// Set for the child copy of this test binary that plays the worker in
/// `killing_the_worker_kills_its_spare_too`: the job directory.
const SPARE_WORKER_DIR_ENV: &str = "QUORUM_SPARE_TEST_WORKER_DIR";

/// Not a test of its own: the stand-in worker that `killing_the_worker_kills_its_spare_too`
/// starts (with `SPARE_WORKER_DIR_ENV` set) and SIGKILLs while its first step runs beside the
/// second step's spare. Without the variable it does nothing.
#[tokio::test]
async fn worker_stand_in_for_the_spare_kill_test() {
    let Some(dir) = std::env::var_os(SPARE_WORKER_DIR_ENV) else {
        return;
    };
    let dir = PathBuf::from(dir);
    let sb = sandbox(&dir.join("state"), limits()).expect("the parent checked the sandbox");
    run(
        &sb,
        &dir,
        &["touch /build/started; sleep 300", "true"],
        Duration::from_secs(120),
    )
    .await;
}

#[tokio::test]
async fn killing_the_worker_kills_its_spare_too() {
    let state = tempfile::tempdir().unwrap();
    if sandbox(state.path(), limits()).is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    #[allow(clippy::disallowed_methods)] // the stand-in worker is this test binary itself
    let mut worker = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "spares::worker_stand_in_for_the_spare_kill_test",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(SPARE_WORKER_DIR_ENV, dir.path())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let marker = dir.path().join("src/started");
    let seen = running_and_spare(dir.path(), &marker).await;
    if seen.len() < 2 {
        let _ = worker.kill();
        let _ = worker.wait();
        panic!("the stand-in worker's step and spare were not both seen: {seen:?}");
    }
    // SIGKILL: the worker gets no chance to clean up; the kernel's parent-death signals must.
    worker.kill().unwrap();
    worker.wait().unwrap();
    let left = wait_none_in(dir.path());
    assert!(
        left.is_empty(),
        "sandbox processes outlived the worker: {left:?}"
    );
}
