//! Passes that weigh only the jobs a report or a refusal named (`scheduler::Wake`): they reach
//! the verdicts a full pass over the database reaches, move dependent jobs along, finish the
//! build; and the one-statement report path records a report only on the assignment, build and
//! job it names, for the worker that signed it.

use std::collections::BTreeMap;

use quorum_api::v1::controller::{
    BuildState, BuildStatus, JobState, JobStatus, ReportedResult, Usage,
};
use quorum_client::user::UserClient;
use quorum_core::verdict::{JobVerdict, ResultView, job_verdict};

use crate::bounded;
use crate::support::{Backend, SimWorker, Stack, success};

on_both_backends!(
    reports_decided_job_by_job_reach_the_verdicts_the_database_gives,
    a_report_is_recorded_only_on_the_assignment_build_and_job_it_names,
);

/// A diamond (`a`; `b`, `c` need `a`; `d` needs both), independent jobs, a job every worker
/// fails and one that needs it; `quorum: 2` of three owners.
const PIPELINE: &str = r#"policy: {quorum: 2}
jobs:
  a: {script: ["a"]}
  b: {script: ["b"], needs: [a]}
  c: {script: ["c"], needs: [a]}
  d: {script: ["d"], needs: [b, c]}
  x1: {script: ["x1"]}
  x2: {script: ["x2"]}
  x3: {script: ["x3"]}
  f: {script: ["f"]}
  g: {script: ["g"], needs: [f]}
"#;

/// Job states as the status shows them, by name.
fn states(s: &BuildStatus) -> BTreeMap<String, JobState> {
    s.jobs.iter().map(|j| (j.name.clone(), j.state)).collect()
}

/// A job's verdict recomputed by the pure rule from the rows of the controller's database.
async fn verdict_from_database(stack: &Stack, build: &str, job: &JobStatus) -> JobVerdict {
    use sqlx::Row as _;
    let pool = stack.database().await;
    let rows = sqlx::query(
        "SELECT a.outcome, w.id, w.owner, w.trusted FROM assignments a \
         JOIN workers w ON w.id = a.worker_id JOIN jobs j ON j.build_id = a.build_id AND j.name = a.job \
         WHERE a.build_id = $1 AND a.job = $2 AND a.round = j.round AND a.state = 'reported'",
    )
    .bind(build)
    .bind(&job.name)
    .fetch_all(&pool)
    .await
    .unwrap();
    pool.close().await;
    let results: Vec<ResultView> = rows
        .iter()
        .map(|r| ResultView {
            worker: r.get("id"),
            owner: r.get("owner"),
            trusted: r.get::<i64, _>("trusted") != 0,
            outcome: serde_json::from_str(&r.get::<String, _>("outcome")).unwrap(),
        })
        .collect();
    job_verdict(job.policy, &results, 0)
}

/// Takes and reports what `w` is offered until the build ends: success with the script as
/// output, failure for `f`; refuses the first offer when `refuse_first`, returning its job.
async fn work(
    w: &SimWorker,
    user: UserClient,
    build: String,
    refuse_first: bool,
) -> Option<String> {
    let mut refused = None;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        if user.status(&build).await.unwrap().state.is_final() {
            return refused;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the build ends in time"
        );
        let Some(a) = w.poll(200).await else { continue };
        if refuse_first && refused.is_none() {
            w.client.refuse(&a.id, "not this one", false).await.unwrap();
            refused = Some(a.job);
        } else if a.job == "f" {
            w.fail(&a, "f always fails").await;
        } else {
            w.succeed(&a, a.script[0].as_bytes(), Usage::default())
                .await;
        }
    }
}

async fn reports_decided_job_by_job_reach_the_verdicts_the_database_gives(backend: Backend) {
    let stack = Stack::start(backend, 30).await;
    let workers = [
        stack.worker("p1", "ann", false).await,
        stack.worker("p2", "ben", false).await,
        stack.worker("p3", "cat", false).await,
    ];
    let build = stack.submit(PIPELINE).await;
    // Each worker takes what it is offered and reports it, one at a time, so reports reach the
    // scheduler as passes over their own jobs; the first offer `p1` gets it refuses, and that
    // job must go to the third owner.
    let (refused, _, _) = tokio::join!(
        work(&workers[0], stack.user(), build.clone(), true),
        work(&workers[1], stack.user(), build.clone(), false),
        work(&workers[2], stack.user(), build.clone(), false)
    );
    let refused = refused.expect("p1 was offered a job");
    let done = stack
        .wait_build(&build, "the build's end", |s| s.state.is_final())
        .await;
    assert_eq!(done.state, BuildState::Failed, "{done:#?}");
    let expected: BTreeMap<String, JobState> = [
        ("a", JobState::Verified),
        ("b", JobState::Verified),
        ("c", JobState::Verified),
        ("d", JobState::Verified),
        ("x1", JobState::Verified),
        ("x2", JobState::Verified),
        ("x3", JobState::Verified),
        ("f", JobState::Failed),
        ("g", JobState::Skipped),
    ]
    .into_iter()
    .map(|(n, s)| (n.to_string(), s))
    .collect();
    assert_eq!(states(&done), expected, "{done:#?}");
    // The refused job was done by the two other owners, and nothing ran twice.
    let job = done.jobs.iter().find(|j| j.name == refused).unwrap();
    let reported: Vec<&str> = job
        .assignments
        .iter()
        .filter(|a| a.state == "reported")
        .map(|a| a.worker.as_str())
        .collect();
    assert!(reported.len() == 2 && !reported.contains(&"p1"), "{job:#?}");
    for job in &done.jobs {
        let mut workers: Vec<&str> = job.assignments.iter().map(|a| a.worker.as_str()).collect();
        workers.sort();
        workers.dedup();
        assert_eq!(workers.len(), job.assignments.len(), "{job:#?}");
        // The stored verdict is the one the rule gives from the stored results alone.
        let recomputed = verdict_from_database(&stack, &build, job).await;
        let agrees = match (&recomputed, job.state) {
            (JobVerdict::Verified { manifest, .. }, JobState::Verified) => {
                job.manifest.as_ref() == Some(manifest)
            }
            (JobVerdict::Failed { .. }, JobState::Failed) => true,
            // A skipped job never ran: no results.
            (JobVerdict::Pending { .. }, JobState::Skipped) => job.assignments.is_empty(),
            _ => false,
        };
        assert!(agrees, "{}: {recomputed:?} against {job:#?}", job.name);
    }
    stack.stop().await;
}

/// The status code a refused call got (`None` when it succeeded).
fn refused(r: Result<(), quorum_client::ClientError>) -> Option<u16> {
    r.err().map(|e| e.status().unwrap_or(0))
}

async fn a_report_is_recorded_only_on_the_assignment_build_and_job_it_names(backend: Backend) {
    let stack = Stack::start(backend, 30).await;
    // `a` alone is online when the build comes: both its jobs are offered to `a`.
    let a = stack.worker("r1", "rita", false).await;
    let build = stack
        .submit(
            "policy: {quorum: 1}\njobs:\n  j:\n    script: [\"j\"]\n  k:\n    script: [\"k\"]\n",
        )
        .await;
    let (first, second) = (a.take().await, a.take().await);
    assert_ne!(first.job, second.job);
    let b = stack.worker("r2", "rolf", false).await;
    let honest = a.report(&first, success(b"x"), Usage::default());
    // Signed by `a` on its own assignment's route, naming another build or another job.
    let mut forged = honest.clone();
    forged.build_id = "0".repeat(32);
    let sent = a
        .client
        .result(&first.id, &a.client.sign_report(&forged))
        .await;
    assert_eq!(refused(sent), Some(400));
    let mut forged = honest.clone();
    forged.job = second.job.clone();
    let sent = a
        .client
        .result(&first.id, &a.client.sign_report(&forged))
        .await;
    assert_eq!(refused(sent), Some(400));
    // The report of one assignment posted on the route of the other.
    let sent = a
        .client
        .result(&second.id, &a.client.sign_report(&honest))
        .await;
    assert_eq!(refused(sent), Some(400));
    // Another worker reporting `a`'s assignment, signed with its own key, naming itself or `a`.
    let mut by_b = b.report(&first, success(b"x"), Usage::default());
    let sent = b
        .client
        .result(&first.id, &b.client.sign_report(&by_b))
        .await;
    assert_eq!(refused(sent), Some(404));
    by_b.worker = a.name.clone();
    let sent = b
        .client
        .result(&first.id, &b.client.sign_report(&by_b))
        .await;
    assert_eq!(refused(sent), Some(404));
    // None of it was recorded: both assignments still run.
    let s = stack.user().status(&build).await.unwrap();
    for t in [&first, &second] {
        let job = s.jobs.iter().find(|j| j.name == t.job).unwrap();
        assert_eq!(job.assignments.len(), 1, "{job:#?}");
        assert_eq!(job.assignments[0].state, "running", "{job:#?}");
    }
    // The honest report is recorded once; the same again is fine, another one is not.
    for _ in 0..2 {
        let sent = a
            .client
            .result(&first.id, &a.client.sign_report(&honest))
            .await;
        assert_eq!(refused(sent), None);
    }
    let changed = a.report(&first, success(b"y"), Usage::default());
    let sent = a
        .client
        .result(&first.id, &a.client.sign_report(&changed))
        .await;
    assert_eq!(refused(sent), Some(409));
    let s = stack
        .wait_build(&build, "the job's verdict", |s| {
            s.jobs
                .iter()
                .any(|j| j.name == first.job && j.state == JobState::Verified)
        })
        .await;
    let job = s.jobs.iter().find(|j| j.name == first.job).unwrap();
    let ReportedResult::Success {
        manifest_digest, ..
    } = success(b"x")
    else {
        unreachable!("success() is a success")
    };
    assert_eq!(job.manifest, Some(manifest_digest), "{job:#?}");
    stack.stop().await;
}
