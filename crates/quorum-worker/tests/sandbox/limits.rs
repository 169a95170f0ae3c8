//! The owner's limits that are not about cgroup kills: the CPU quota (conformance 9), the disk
//! and /tmp sizes (10), and the per-step wall-clock limit.

use std::time::Duration;

use quorum_worker::executor::{
    Executor as _, JobSpec, JobStatus, LimitHit, Limits, release_stale_mounts,
};
use tokio_util::sync::CancellationToken;

use super::{SHORT, assert_succeeded, run, run_spec, sandbox, wait_none_in};

/// Two spinning processes for `secs` of wall time (by the clock, so they end however little CPU
/// they get). Two, so that unheld they take well over the quota even on a busy machine.
fn spinner(secs: u32) -> String {
    format!("perl -e 'fork; $t = time + {secs}; 1 while time < $t; wait'")
}

/// CPU time over wall time of a two-second spinner under `limits`.
async fn spin_ratio(limits: Limits) -> Option<f64> {
    let state = tempfile::tempdir().unwrap();
    let sb = sandbox(state.path(), limits)?;
    let dir = tempfile::tempdir().unwrap();
    let ran = run(&sb, dir.path(), &[&spinner(2)], SHORT).await;
    assert_succeeded(&ran);
    Some(ran.outcome.cpu.as_secs_f64() / ran.outcome.wall.as_secs_f64())
}

#[tokio::test]
async fn a_cpu_spinner_is_held_to_its_quota() {
    let Some(held) = spin_ratio(Limits {
        cpu_quota: Some(0.2),
        ..Limits::default()
    })
    .await
    else {
        return;
    };
    // The control: the same spinners with two cores' quota (which also gives cgroup usage
    // figures) get far more than 0.2 of a core, even on a busy machine.
    let free = spin_ratio(Limits {
        cpu_quota: Some(2.0),
        ..Limits::default()
    })
    .await
    .unwrap();
    println!("cores used: held {held:.2}, control {free:.2}");
    assert!(
        held < 0.3,
        "a 0.2-core quota let the spinner use {held:.2} cores"
    );
    assert!(
        free > held * 1.8,
        "the control used {free:.2} cores, the held spinner {held:.2}"
    );
}

#[tokio::test]
async fn filling_the_build_directory_or_tmp_hits_enospc_and_the_worker_goes_on() {
    let state = tempfile::tempdir().unwrap();
    let limits = Limits {
        disk_bytes: Some(8 << 20),
        tmp_bytes: Some(4 << 20),
        ..Limits::default()
    };
    let Some(sb) = sandbox(state.path(), limits) else {
        return;
    };
    let job_dir = tempfile::tempdir().unwrap();
    let workspace = sb.workspace(job_dir.path()).unwrap();
    assert!(workspace.has_disk_limit());
    // The worker's own view of the build directory is the limited one: the source goes in there.
    std::fs::write(
        workspace.build_dir.join("source.c"),
        "int main(void) { return 0; }\n",
    )
    .unwrap();
    let job = JobSpec {
        build_dir: workspace.build_dir.clone(),
        tmp_dir: workspace.tmp_dir.clone(),
        source_date_epoch: 1_600_000_000,
        script: vec![
            "test -f source.c && echo SOURCE-SEEN".into(),
            "dd if=/dev/zero of=/tmp/fill bs=1M count=16 2>&1 || echo TMP-FULL".into(),
            "dd if=/dev/zero of=/build/fill bs=1M count=64 2>&1".into(),
        ],
        timeout: SHORT,
        inputs: Vec::new(),
    };
    let ran = run_spec(&sb, &job, CancellationToken::new()).await;
    assert!(ran.log.contains("SOURCE-SEEN"), "{}", ran.log);
    assert!(ran.log.contains("TMP-FULL"), "{}", ran.log);
    assert_eq!(
        ran.log.matches("No space left on device").count(),
        2,
        "{}",
        ran.log
    );
    assert!(
        matches!(ran.outcome.status, JobStatus::Failed { index: 3, .. }),
        "{:?}",
        ran.outcome.status
    );
    let filled = std::fs::metadata(workspace.build_dir.join("fill"))
        .unwrap()
        .len();
    assert!(filled <= 8 << 20, "the build directory took {filled} bytes");
    drop(workspace);

    // The worker goes on: the next job in the same executor runs.
    let next = tempfile::tempdir().unwrap();
    let workspace = sb.workspace(next.path()).unwrap();
    let ran = run_spec(
        &sb,
        &JobSpec {
            script: vec!["echo fine > /build/out".into()],
            build_dir: workspace.build_dir.clone(),
            tmp_dir: workspace.tmp_dir.clone(),
            ..job
        },
        CancellationToken::new(),
    )
    .await;
    assert_succeeded(&ran);
    assert!(workspace.build_dir.join("out").exists());
    drop(workspace);

    // A worker that died with a job running left its build directory mounted; the next start
    // unmounts it, so the stale job directory can be removed.
    let builds = tempfile::tempdir().unwrap();
    let stale = builds.path().join("a1");
    std::fs::create_dir(&stale).unwrap();
    std::mem::forget(sb.workspace(&stale).unwrap());
    assert_eq!(release_stale_mounts(builds.path()), 1);
    std::fs::remove_dir_all(&stale).unwrap();
}

#[tokio::test]
async fn a_step_past_its_own_time_limit_dies_whole_and_the_next_job_runs() {
    let state = tempfile::tempdir().unwrap();
    let limits = Limits {
        step_timeout_secs: Some(1),
        ..Limits::default()
    };
    let Some(sb) = sandbox(state.path(), limits) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // The job's own timeout is far away: only the step limit can stop this.
    let ran = run(
        &sb,
        dir.path(),
        &[
            "true",
            "sleep 300 & setsid sh -c 'sleep 300 & sleep 300' & sleep 300",
        ],
        Duration::from_secs(120),
    )
    .await;
    assert_eq!(
        ran.outcome.status,
        JobStatus::LimitExceeded {
            index: 2,
            step: "sleep 300 & setsid sh -c 'sleep 300 & sleep 300' & sleep 300".into(),
            limit: LimitHit::StepTime { secs: 1 },
        },
        "{}",
        ran.log
    );
    assert!(
        ran.log
            .contains("per-step time limit (step_timeout_secs = 1)"),
        "{}",
        ran.log
    );
    assert!(ran.outcome.wall < Duration::from_secs(30));
    assert!(
        wait_none_in(dir.path()).is_empty(),
        "processes of the step outlived it"
    );
    let again = tempfile::tempdir().unwrap();
    assert_succeeded(&run(&sb, again.path(), &["true"], SHORT).await);
}
