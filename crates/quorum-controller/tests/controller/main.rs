//! The controller through its real HTTP boundary, on both database backends: every case runs
//! once on SQLite and once on a fresh PostgreSQL database (QUORUM_TEST_POSTGRES_URL, from
//! `source .ci/services.sh`). Workers are simulated through the real worker protocol (enrolled
//! keys, signed polls and reports); the IdP and store are the real services.

use std::collections::BTreeMap;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use quorum_api::v1::controller::{BuildState, JobState, ReportedResult, Usage};
use support::{Backend, SimWorker, Stack, success};

/// Runs `case` once per backend, as `case::sqlite` and `case::postgres`.
macro_rules! on_both_backends {
    ($($case:ident),* $(,)?) => {$(
        mod $case {
            #[tokio::test(flavor = "multi_thread")]
            async fn sqlite() {
                super::bounded(super::$case(super::Backend::Sqlite)).await
            }
            #[tokio::test(flavor = "multi_thread")]
            async fn postgres() {
                super::bounded(super::$case(super::Backend::Postgres)).await
            }
        }
    )*};
}

on_both_backends!(
    identical_results_from_distinct_owners_verify_and_sign,
    differing_results_are_disputed_with_every_digest_and_path,
    one_enrollment_token_enrolls_exactly_one_worker_when_raced,
    a_restarted_controller_resumes_from_its_database,
    logs_append_in_order_and_read_back,
    usage_is_summed_per_build_and_per_tenant_from_the_reports,
    failures_are_retried_in_a_new_round_but_disputes_never,
    a_build_of_many_jobs_runs_each_exactly_once,
    a_manual_job_waits_for_approval_after_its_matrix_needs,
    a_job_gives_up_after_its_policy_attempts,
    an_assignment_past_the_job_timeout_is_given_up,
    an_offer_not_taken_in_time_is_withdrawn_and_offered_again,
    a_known_worker_name_with_another_key_is_refused,
    tokens_minted_ahead_go_to_the_worker_and_assignment_they_name,
    an_offer_made_before_a_restart_is_taken_after_it,
    the_access_token_is_fetched_at_start_not_at_take_up,
    a_report_hands_over_the_workers_next_offer_and_only_its_own,
    a_report_is_recorded_when_its_next_offer_cannot_be_taken,
    a_captured_worker_request_cannot_be_sent_again,
);

async fn bounded(case: impl std::future::Future<Output = ()>) {
    tokio::time::timeout(Duration::from_secs(180), case)
        .await
        .expect("the case finished within its time bound")
}

// After the macro and `bounded`, which the modules' cases use.
mod disputes;
mod logs;
mod passes;
mod policy;
mod publisher;
mod signer_keys;
mod support;

const ONE_JOB: &str = "jobs:\n  build:\n    script: [\"true\"]\n    artifacts: [out.txt]\n";

async fn identical_results_from_distinct_owners_verify_and_sign(backend: Backend) {
    let stack = Stack::start(backend, 30).await;
    let a = stack.worker("a1", "alice", true).await;
    let b = stack.worker("b1", "bob", false).await;
    let build = stack.submit(ONE_JOB).await;
    let (ta, tb) = tokio::join!(a.take(), b.take());
    assert_eq!(
        (ta.build_id.as_str(), tb.build_id.as_str()),
        (&*build, &*build)
    );
    assert_ne!(ta.id, tb.id, "each worker gets an assignment of its own");
    assert_eq!(ta.tenant, support::TENANT);
    a.succeed(&ta, b"same bytes", Usage::default()).await;
    let pending = stack.user().status(&build).await.unwrap();
    assert_eq!(pending.state, BuildState::Running);
    assert!(!pending.signed, "one result is not a quorum");
    b.succeed(&tb, b"same bytes", Usage::default()).await;
    let done = stack
        .wait_build(&build, "verification", |s| s.state.is_final())
        .await;
    assert_eq!(done.state, BuildState::Verified, "{done:#?}");
    assert_eq!(done.jobs[0].state, JobState::Verified);
    assert!(done.signed);
    let envelope = stack.user().statement(&build).await.unwrap();
    let keys = stack.user().signer_keys().await.unwrap();
    let statement = keys
        .keys
        .values()
        .find_map(|k| {
            let raw: [u8; 32] = B64.decode(k).ok()?.try_into().ok()?;
            let key = ed25519_dalek::VerifyingKey::from_bytes(&raw).ok()?;
            quorum_core::attest::verify_envelope(&envelope, &key).ok()
        })
        .expect("a published signer key verifies the statement");
    assert!(
        statement.to_string().contains(&build),
        "the statement names the build: {statement}"
    );
    stack.stop().await;
}

async fn differing_results_are_disputed_with_every_digest_and_path(backend: Backend) {
    let stack = Stack::start(backend, 30).await;
    let a = stack.worker("a1", "alice", false).await;
    let b = stack.worker("b1", "bob", false).await;
    let build = stack.submit(ONE_JOB).await;
    let (ta, tb) = tokio::join!(a.take(), b.take());
    a.succeed(&ta, b"alice's bytes", Usage::default()).await;
    b.succeed(&tb, b"bob's bytes", Usage::default()).await;
    let done = stack
        .wait_build(&build, "the dispute", |s| s.state.is_final())
        .await;
    assert_eq!(done.state, BuildState::Disputed, "{done:#?}");
    let job = &done.jobs[0];
    assert_eq!(job.differing_paths, vec!["out.txt".to_string()]);
    for content in [&b"alice's bytes"[..], b"bob's bytes"] {
        let ReportedResult::Success {
            manifest_digest, ..
        } = success(content)
        else {
            unreachable!()
        };
        assert!(
            job.detail.contains(&manifest_digest.to_string()),
            "every digest is recorded: {}",
            job.detail
        );
    }
    assert!(
        stack.user().statement(&build).await.is_err(),
        "nothing is signed"
    );
    stack.stop().await;
}

async fn one_enrollment_token_enrolls_exactly_one_worker_when_raced(backend: Backend) {
    let stack = Stack::start(backend, 30).await;
    let token = stack.enrollment("alice", false, &BTreeMap::new()).await;
    let url = stack.controller_url.clone();
    let attempts: Vec<_> = (0..8)
        .map(|i| {
            let (url, token) = (url.clone(), token.clone());
            tokio::spawn(async move {
                let key = ed25519_dalek::SigningKey::from_bytes(&[i as u8 + 1; 32]);
                quorum_client::controller::WorkerClient::enroll(
                    &url,
                    &quorum_api::v1::controller::EnrollRequest {
                        enrollment_token: token,
                        name: format!("racer-{i}"),
                        public_key: B64.encode(key.verifying_key().as_bytes()),
                    },
                )
                .await
            })
        })
        .collect();
    let mut enrolled = Vec::new();
    for (i, a) in attempts.into_iter().enumerate() {
        match a.await.unwrap() {
            Ok(_) => enrolled.push(i),
            Err(e) => assert!(
                e.to_string().contains("already used"),
                "a losing racer is told the token was used: {e}"
            ),
        }
    }
    assert_eq!(
        enrolled.len(),
        1,
        "exactly one racer enrolled: {enrolled:?}"
    );
    // A worker name taken by another enrollment is refused, and that token stays unspent.
    let second = stack.enrollment("bob", false, &BTreeMap::new()).await;
    let taken = quorum_client::controller::WorkerClient::enroll(
        &url,
        &quorum_api::v1::controller::EnrollRequest {
            enrollment_token: second.clone(),
            name: format!("racer-{}", enrolled[0]),
            public_key: support_public_key(99),
        },
    )
    .await
    .unwrap_err();
    assert!(taken.to_string().contains("already enrolled"), "{taken}");
    SimWorker::enroll(&url, "bob-1", &second).await;
    stack.stop().await;
}

fn support_public_key(seed: u8) -> String {
    let key = ed25519_dalek::SigningKey::from_bytes(&[seed; 32]);
    B64.encode(key.verifying_key().as_bytes())
}

async fn a_restarted_controller_resumes_from_its_database(backend: Backend) {
    let mut stack = Stack::start(backend, 30).await;
    let a = stack.worker("a1", "alice", false).await;
    let b = stack.worker("b1", "bob", false).await;
    let build = stack.submit(ONE_JOB).await;
    let (ta, tb) = tokio::join!(a.take(), b.take());
    a.succeed(&ta, b"bytes", Usage::default()).await;
    stack.stop_controller().await;
    stack.start_controller().await;
    // The running assignment survived the restart: its report is accepted and completes the
    // quorum, and nothing was offered twice.
    b.succeed(&tb, b"bytes", Usage::default()).await;
    let done = stack
        .wait_build(&build, "verification after restart", |s| s.state.is_final())
        .await;
    assert_eq!(done.state, BuildState::Verified, "{done:#?}");
    assert_eq!(done.jobs[0].assignments.len(), 2, "{done:#?}");
    stack.stop().await;
}

async fn logs_append_in_order_and_read_back(backend: Backend) {
    let stack = Stack::start(backend, 30).await;
    let a = stack.worker("a1", "alice", false).await;
    stack.worker("b1", "bob", false).await;
    stack.submit(ONE_JOB).await;
    let ta = a.take().await;
    a.client.log(&ta.id, 0, b"hello ".to_vec()).await.unwrap();
    a.client.log(&ta.id, 6, b"world\n".to_vec()).await.unwrap();
    // A resend of a stored range is harmless; a gap is refused and stores nothing.
    a.client.log(&ta.id, 0, b"hello ".to_vec()).await.unwrap();
    let gap = a
        .client
        .log(&ta.id, 100, b"lost".to_vec())
        .await
        .unwrap_err();
    assert!(gap.to_string().contains("does not follow"), "{gap}");
    let (all, complete) = stack.user().log(&ta.id, 0).await.unwrap();
    assert_eq!(all, b"hello world\n");
    assert!(!complete, "the assignment still runs");
    let (tail, _) = stack.user().log(&ta.id, 8).await.unwrap();
    assert_eq!(tail, b"rld\n");
    stack.stop().await;
}

#[tokio::test]
async fn a_database_url_that_is_not_postgres_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let err = quorum_controller::create_enrollment(
        dir.path(),
        Some("mysql://root:hunter2@localhost/ci"),
        "alice",
        false,
        &BTreeMap::new(),
    )
    .await
    .unwrap_err();
    let message = format!("{err:#}");
    assert!(message.contains("not a postgres:// URL"), "{message}");
    assert!(
        !message.contains("hunter2"),
        "the password is not shown: {message}"
    );
    assert!(
        !dir.path().join("controller.db").exists(),
        "no SQLite file is made instead"
    );
}

fn usage(wall_ms: u64, cpu_ms: u64, peak_rss_kib: u64, bytes_uploaded: u64) -> Usage {
    Usage {
        wall_ms,
        cpu_ms,
        peak_rss_kib,
        bytes_uploaded,
    }
}

async fn usage_is_summed_per_build_and_per_tenant_from_the_reports(backend: Backend) {
    let stack = Stack::start(backend, 30).await;
    let a = stack.worker("a1", "alice", false).await;
    let b = stack.worker("b1", "bob", false).await;
    let first = stack.submit(ONE_JOB).await;
    let (ta, tb) = tokio::join!(a.take(), b.take());
    a.succeed(&ta, b"x", usage(1000, 800, 2048, 10)).await;
    b.succeed(&tb, b"x", usage(3000, 2500, 4096, 20)).await;
    stack
        .wait_build(&first, "first build", |s| s.state.is_final())
        .await;
    let second = stack.submit(ONE_JOB).await;
    let (ta, tb) = tokio::join!(a.take(), b.take());
    a.fail(&ta, "step 1 exited 1").await;
    // A report that is refused (it names another job) counts nothing.
    let forged = b.report(&tb, success(b"y"), usage(u64::MAX, 1, 1, 1));
    let mut wrong = forged.clone();
    wrong.job = "other".into();
    assert!(
        b.client
            .result(&tb.id, &b.client.sign_report(&wrong))
            .await
            .is_err()
    );
    b.fail(&tb, "step 1 exited 1").await;
    stack
        .wait_build(&second, "second build", |s| s.state.is_final())
        .await;

    let view = stack.user().usage(None, 10).await.unwrap();
    assert_eq!(view.tenants.len(), 1, "{view:#?}");
    let t = &view.tenants[0];
    assert_eq!(t.tenant, support::TENANT);
    assert_eq!(t.builds, 2);
    assert_eq!(
        t.totals,
        quorum_api::v1::controller::UsageTotals {
            results: 4,
            wall_ms: 4000,
            cpu_ms: 3300,
            peak_rss_kib: 4096,
            bytes_uploaded: 30,
        }
    );
    assert_eq!(view.builds.len(), 2);
    // Most recent first; these two were created within the same second or two.
    assert!(
        view.builds
            .windows(2)
            .all(|w| w[0].created_at >= w[1].created_at)
    );
    assert!(view.builds.iter().any(|u| u.build_id == second));
    let first_usage = view.builds.iter().find(|u| u.build_id == first).unwrap();
    assert_eq!(first_usage.state, BuildState::Verified);
    assert_eq!(
        (first_usage.totals.results, first_usage.totals.cpu_ms),
        (2, 3300)
    );
    let one = stack.user().usage(None, 1).await.unwrap();
    assert_eq!(one.builds.len(), 1, "the limit holds");
    let other = stack.user().usage(Some("someone-else"), 10).await.unwrap();
    assert!(
        other.tenants.is_empty() && other.builds.is_empty(),
        "{other:#?}"
    );
    let bad = stack.user().usage(None, 0).await.unwrap_err();
    assert!(bad.to_string().contains("limit must be between"), "{bad}");
    stack.stop().await;
}

async fn failures_are_retried_in_a_new_round_but_disputes_never(backend: Backend) {
    let stack = Stack::start(backend, 30).await;
    let a = stack.worker("a1", "alice", false).await;
    let b = stack.worker("b1", "bob", false).await;
    let pipeline = "jobs:\n  build:\n    script: [\"true\"]\n    retries: 1\n";
    let build = stack.submit(pipeline).await;
    let (ta, tb) = tokio::join!(a.take(), b.take());
    a.fail(&ta, "flaky").await;
    b.fail(&tb, "flaky").await;
    let retried = stack
        .wait_build(&build, "the retry", |s| {
            s.jobs[0].detail.contains("retry 1 of 1")
        })
        .await;
    assert_eq!(retried.state, BuildState::Running, "{retried:#?}");
    let (ta2, tb2) = tokio::join!(a.take(), b.take());
    assert!(
        ta2.id != ta.id && tb2.id != tb.id,
        "the retry is a new round of assignments"
    );
    a.succeed(&ta2, b"ok", Usage::default()).await;
    b.succeed(&tb2, b"ok", Usage::default()).await;
    let done = stack
        .wait_build(&build, "verification", |s| s.state.is_final())
        .await;
    assert_eq!(done.state, BuildState::Verified, "{done:#?}");
    assert_eq!(done.jobs[0].assignments.len(), 4);
    // The signer saw only the verifying round: the statement names the two agreeing results.
    assert!(done.signed);

    // A dispute is final even with retries left.
    let disputed = stack.submit(pipeline).await;
    let (ta, tb) = tokio::join!(a.take(), b.take());
    a.succeed(&ta, b"one", Usage::default()).await;
    b.succeed(&tb, b"two", Usage::default()).await;
    let done = stack
        .wait_build(&disputed, "the dispute", |s| s.state.is_final())
        .await;
    assert_eq!(done.state, BuildState::Disputed, "{done:#?}");
    assert!(a.poll(300).await.is_none(), "nothing is offered again");
    assert_eq!(done.jobs[0].assignments.len(), 2);
    stack.stop().await;
}

/// The scheduler writes a pass's offers and job states several rows per statement, and commits
/// them every 256 offers: a build larger than one such batch must still offer, run and verify
/// every job exactly once, the jobs of the second commit included.
async fn a_build_of_many_jobs_runs_each_exactly_once(backend: Backend) {
    const JOBS: usize = 260;
    let stack = Stack::start(backend, 30).await;
    let mut workers = Vec::new();
    for i in 0..10 {
        workers.push(
            stack
                .worker(&format!("w{i}"), &format!("owner-{i}"), false)
                .await,
        );
    }
    let mut pipeline = String::from("policy: {quorum: 1}\njobs:\n");
    for j in 0..JOBS {
        pipeline.push_str(&format!("  j{j}:\n    script: [\"echo {j}\"]\n"));
    }
    let build = stack.submit(&pipeline).await;
    let reported = std::sync::atomic::AtomicUsize::new(0);
    let run = |w: SimWorker| {
        let reported = &reported;
        async move {
            let mut taken = Vec::new();
            while reported.load(std::sync::atomic::Ordering::SeqCst) < JOBS {
                let Some(a) = w.poll(200).await else { continue };
                w.succeed(&a, a.script[0].as_bytes(), Usage::default())
                    .await;
                reported.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                taken.push(a.job);
            }
            taken
        }
    };
    let taken: Vec<String> = futures::future::join_all(workers.into_iter().map(run))
        .await
        .into_iter()
        .flatten()
        .collect();
    let mut distinct = taken.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(
        (taken.len(), distinct.len()),
        (JOBS, JOBS),
        "every job was handed out exactly once"
    );
    let done = stack
        .wait_build(&build, "verification", |s| s.state.is_final())
        .await;
    assert_eq!(done.state, BuildState::Verified);
    assert!(done.signed);
    assert_eq!(done.jobs.len(), JOBS);
    for job in &done.jobs {
        assert_eq!(job.state, JobState::Verified, "{job:#?}");
        // An offer left waiting past its lease behind a worker's other offers is withdrawn
        // (`declined`) and offered again; it never ran (each job was taken once, above).
        let results = job.assignments.iter().filter(|a| a.state == "reported");
        assert_eq!(results.count(), 1, "{job:#?}");
        let script = format!("echo {}", job.name.trim_start_matches('j'));
        assert_eq!(
            job.manifest,
            Some(success_manifest_digest(script.as_bytes())),
            "{} verified on its own result",
            job.name
        );
    }
    stack.stop().await;
}

fn success_manifest_digest(content: &[u8]) -> quorum_core::Digest {
    match success(content) {
        ReportedResult::Success {
            manifest_digest, ..
        } => manifest_digest,
        ReportedResult::Failed { .. } => unreachable!("success() reports success"),
    }
}

async fn a_manual_job_waits_for_approval_after_its_matrix_needs(backend: Backend) {
    let stack = Stack::start(backend, 30).await;
    let a = stack.worker("a1", "alice", false).await;
    let b = stack.worker("b1", "bob", false).await;
    let pipeline = "jobs:\n  build:\n    matrix: {arch: [x86_64, aarch64]}\n    script: [\"make ARCH=${{ matrix.arch }}\"]\n  release:\n    needs: [build]\n    manual: true\n    script: [publish]\n";
    let build = stack.submit(pipeline).await;
    let status = stack.user().status(&build).await.unwrap();
    let names: Vec<&str> = status.jobs.iter().map(|j| j.name.as_str()).collect();
    assert_eq!(names, ["build-aarch64", "build-x86_64", "release"]);
    for _ in 0..2 {
        let (ta, tb) = tokio::join!(a.take(), b.take());
        a.succeed(&ta, ta.script[0].as_bytes(), Usage::default())
            .await;
        b.succeed(&tb, tb.script[0].as_bytes(), Usage::default())
            .await;
    }
    let gated = stack
        .wait_build(&build, "the gate after the matrix jobs", |s| {
            s.jobs[2].detail.contains("waiting for approval")
        })
        .await;
    assert!(
        gated.jobs[..2]
            .iter()
            .all(|j| j.state == JobState::Verified),
        "the gate is reached only once the jobs it needs verified: {gated:#?}"
    );
    assert_eq!(gated.jobs[2].state, JobState::Queued);
    assert!(
        gated.jobs[2].detail.contains("waiting for approval"),
        "{gated:#?}"
    );
    assert!(
        a.poll(500).await.is_none(),
        "an unapproved job is offered to no one"
    );

    let user = stack.user();
    let not_manual = user.approve(&build, "build-x86_64").await.unwrap_err();
    assert!(
        not_manual.to_string().contains("no approval gate"),
        "{not_manual}"
    );
    let unknown = user.approve(&build, "deploy").await.unwrap_err();
    assert!(
        unknown.to_string().contains("has no job `deploy`"),
        "{unknown}"
    );
    user.approve(&build, "release").await.unwrap();
    let twice = user.approve(&build, "release").await.unwrap_err();
    assert!(twice.to_string().contains("already approved"), "{twice}");

    let (ta, tb) = tokio::join!(a.take(), b.take());
    assert_eq!(ta.job, "release");
    a.succeed(&ta, b"released", Usage::default()).await;
    b.succeed(&tb, b"released", Usage::default()).await;
    let done = stack
        .wait_build(&build, "verification", |s| s.state.is_final())
        .await;
    assert_eq!(done.state, BuildState::Verified, "{done:#?}");
    stack.stop().await;
}

async fn a_job_gives_up_after_its_policy_attempts(backend: Backend) {
    let stack = Stack::start(backend, 30).await;
    let mut workers = Vec::new();
    for (name, owner) in [("a1", "alice"), ("b1", "bob"), ("c1", "carol")] {
        workers.push(stack.worker(name, owner, false).await);
    }
    let pipeline = "policy: {quorum: 1, attempts: 2}\njobs:\n  build:\n    script: [\"true\"]\n";
    let build = stack.submit(pipeline).await;
    let mut refused = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while refused < 2 {
        assert!(std::time::Instant::now() < deadline, "two offers came");
        for w in &workers {
            if let Some(a) = w.poll(100).await {
                w.client.refuse(&a.id, "not this one", false).await.unwrap();
                refused += 1;
            }
        }
    }
    let done = stack
        .wait_build(&build, "giving up", |s| s.state.is_final())
        .await;
    assert_eq!(done.state, BuildState::Failed, "{done:#?}");
    assert!(
        done.jobs[0].detail.contains("gave up after 2 assignments"),
        "{done:#?}"
    );
    assert_eq!(
        done.jobs[0].assignments.len(),
        2,
        "no third worker was asked"
    );
    stack.stop().await;
}

async fn an_assignment_past_the_job_timeout_is_given_up(backend: Backend) {
    let stack = Stack::start(backend, 2).await;
    let a = stack.worker("a1", "alice", false).await;
    stack.worker("b1", "bob", false).await;
    let build = stack
        .submit("jobs:\n  build:\n    script: [\"sleep 1000\"]\n    timeout: 1\n")
        .await;
    let ta = a.take().await;
    // The worker keeps heartbeating (its lease never lapses) but never finishes: after the
    // job's timeout plus one lease the controller gives the assignment up and says stop.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let beat = a.client.heartbeat(&ta.id).await.unwrap();
        if beat.stop {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the assignment was never given up"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let s = stack.user().status(&build).await.unwrap();
    let mine = s.jobs[0]
        .assignments
        .iter()
        .find(|x| x.id == ta.id)
        .unwrap();
    assert_eq!(mine.state, "lost");
    assert_eq!(mine.detail.as_deref(), Some("ran past the job's timeout"));
    stack.stop().await;
}

/// A worker too busy to poll before its offer expires never had the job: the offer is
/// withdrawn as declined, costs no attempt, and the worker may get the job again. With only two
/// owners for a quorum of two, ruling it out would leave the job waiting for good.
async fn an_offer_not_taken_in_time_is_withdrawn_and_offered_again(backend: Backend) {
    let stack = Stack::start(backend, 2).await;
    let a = stack.worker("a1", "alice", false).await;
    let b = stack.worker("b1", "bob", false).await;
    // Both seen just now, so both are offered the job when it is submitted.
    assert!(a.poll(0).await.is_none() && b.poll(0).await.is_none());
    let build = stack.submit(ONE_JOB).await;
    let tb = b.take().await;
    b.succeed(&tb, b"same", Usage::default()).await;
    let withdrawn = stack
        .wait_build(&build, "the offer to a1 expiring", |s| {
            s.jobs[0]
                .assignments
                .iter()
                .any(|x| x.worker == "a1" && x.state == "declined")
        })
        .await;
    let expired = withdrawn.jobs[0]
        .assignments
        .iter()
        .find(|x| x.worker == "a1")
        .unwrap();
    assert_eq!(
        expired.detail.as_deref(),
        Some("not taken before the offer expired")
    );
    // a1 comes back: bounded well under `take`'s minute, since a worker ruled out would wait
    // for ever.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let ta = loop {
        if let Some(ta) = a.poll(1000).await {
            break ta;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "a1 was not offered the job again: {:#?}",
            stack.user().status(&build).await.unwrap()
        );
    };
    assert_eq!(ta.build_id, build);
    a.succeed(&ta, b"same", Usage::default()).await;
    let done = stack
        .wait_build(&build, "verification", |s| s.state.is_final())
        .await;
    assert_eq!(done.state, BuildState::Verified, "{done:#?}");
    assert_eq!(done.jobs[0].assignments.len(), 3, "{done:#?}");
    stack.stop().await;
}

/// The controller remembers the workers it has authenticated; that must never let a request
/// through on a worker's name alone. An impostor holding another key is refused on every route
/// (before and after the real worker's own requests), its report is not recorded, and an
/// unknown name is refused the same way.
async fn a_known_worker_name_with_another_key_is_refused(backend: Backend) {
    let stack = Stack::start(backend, 30).await;
    let a = stack.worker("a1", "alice", false).await;
    let impostor = SimWorker {
        name: "a1".into(),
        client: quorum_client::controller::WorkerClient::new(
            &stack.controller_url,
            "a1",
            ed25519_dalek::SigningKey::from_bytes(&[7; 32]),
        ),
        key: ed25519_dalek::SigningKey::from_bytes(&[7; 32]),
    };
    let refused = |what: &str, r: Result<(), quorum_client::ClientError>| {
        let e = r.expect_err(what);
        assert_eq!(e.status(), Some(401), "{what}: {e}");
        assert!(
            e.to_string().contains("unknown worker or bad signature"),
            "{what}: {e}"
        );
    };
    let poll = quorum_api::v1::controller::PollRequest {
        wait_ms: 0,
        capacity: 1,
    };
    refused(
        "an impostor's poll before the worker was ever seen",
        impostor.client.poll(&poll).await.map(drop),
    );
    let build = stack
        .submit("policy: {quorum: 1}\njobs:\n  build:\n    script: [\"true\"]\n")
        .await;
    let ta = a.take().await;
    refused(
        "an impostor's poll after the worker's own",
        impostor.client.poll(&poll).await.map(drop),
    );
    refused(
        "an impostor's heartbeat",
        impostor.client.heartbeat(&ta.id).await.map(drop),
    );
    let forged = impostor.report(&ta, success(b"backdoored"), Usage::default());
    refused(
        "an impostor's report",
        impostor
            .client
            .result(&ta.id, &impostor.client.sign_report(&forged))
            .await,
    );
    let ghost = quorum_client::controller::WorkerClient::new(
        &stack.controller_url,
        "ghost",
        ed25519_dalek::SigningKey::from_bytes(&[8; 32]),
    );
    refused(
        "an unknown worker's poll",
        ghost.poll(&poll).await.map(drop),
    );

    // The real worker's report is the one that counts.
    a.succeed(&ta, b"good", Usage::default()).await;
    let done = stack
        .wait_build(&build, "verification", |s| s.state.is_final())
        .await;
    assert_eq!(done.state, BuildState::Verified, "{done:#?}");
    let ReportedResult::Success {
        manifest_digest: good,
        ..
    } = success(b"good")
    else {
        unreachable!("success() is a success")
    };
    assert_eq!(done.jobs[0].manifest, Some(good), "{done:#?}");
    stack.stop().await;
}

/// A metric of the controller's `/metrics`, by its full name with labels.
async fn metric(stack: &Stack, name: &str) -> u64 {
    let text = reqwest::get(format!("{}/metrics", stack.controller_url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no metric {name} in\n{text}"))
}

/// The controller fetches its IdP access token when it starts, so a worker's first take-up
/// (whose tokens are minted as its offer is made, with that access token) does not wait for the
/// IdP to check the controller's secret. The take-up waits for those tokens instead of asking
/// the IdP itself.
async fn the_access_token_is_fetched_at_start_not_at_take_up(backend: Backend) {
    let stack = Stack::start(backend, 30).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while metric(&stack, "quorum_access_tokens_fetched_total").await == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the controller fetches its access token at start, with no build and no worker"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let w = stack.worker("w1", "owner-1", false).await;
    let build = stack
        .submit("policy: {quorum: 1}\njobs:\n  build:\n    script: [\"true\"]\n")
        .await;
    let a = w.take().await;
    assert_eq!(
        (
            metric(&stack, "quorum_take_up_tokens_total{minted=\"ahead\"}").await,
            metric(&stack, "quorum_take_up_tokens_total{minted=\"at_take_up\"}").await,
        ),
        (1, 0),
        "the first offer's tokens were minted ahead, as the offer was made"
    );
    assert_eq!(
        metric(&stack, "quorum_access_tokens_fetched_total").await,
        1,
        "with the access token fetched at start"
    );
    w.succeed(&a, b"ok", Usage::default()).await;
    let done = stack
        .wait_build(&build, "verification", |s| s.state.is_final())
        .await;
    assert_eq!(done.state, BuildState::Verified, "{done:#?}");
    stack.stop().await;
}

/// A worker offered several jobs in one pass gets the tokens of all of them minted ahead: its
/// first in a request of its own, which its take-up waits for, the others in one more. Each
/// one it takes carries tokens for exactly that worker and assignment, which the store
/// accepts; a second worker's offers never carry the first's.
async fn tokens_minted_ahead_go_to_the_worker_and_assignment_they_name(backend: Backend) {
    const JOBS: usize = 6;
    let stack = Stack::start(backend, 30).await;
    let w = stack.worker("w1", "owner-1", false).await;
    let mut pipeline = String::from("policy: {quorum: 1}\njobs:\n");
    for j in 0..JOBS {
        pipeline.push_str(&format!("  j{j}:\n    script: [\"echo {j}\"]\n"));
    }
    let build = stack.submit(&pipeline).await;
    let first = w.take().await;
    // The other five offers' tokens are minted while the first job runs.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while metric(&stack, "quorum_take_up_tokens_waiting").await < (JOBS - 1) as u64 {
        assert!(
            std::time::Instant::now() < deadline,
            "the other offers' tokens are minted ahead"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut taken = vec![first];
    for _ in 1..JOBS {
        taken.push(w.take().await);
    }
    let claims = |token: &str| quorum_token::peek(token).unwrap().claims;
    for a in &taken {
        let job = claims(&a.job_token);
        let upload = claims(&a.upload_token);
        assert_eq!(job["aud"], "worker:w1");
        for c in [&job, &upload] {
            assert_eq!(c["scope"]["assignment"], a.id.as_str(), "{c:?}");
            assert_eq!(c["scope"]["job"], a.job.as_str(), "{c:?}");
            assert_eq!(c["scope"]["build"], build.as_str(), "{c:?}");
        }
        // The store takes the upload token for this assignment's output.
        w.upload(a, a.script[0].as_bytes()).await;
        w.succeed(a, a.script[0].as_bytes(), Usage::default()).await;
    }
    let mut jobs: Vec<&str> = taken.iter().map(|a| a.job.as_str()).collect();
    jobs.sort();
    jobs.dedup();
    assert_eq!(jobs.len(), JOBS, "each job taken once");
    assert_eq!(
        (
            metric(&stack, "quorum_take_up_tokens_total{minted=\"ahead\"}").await,
            metric(&stack, "quorum_take_up_tokens_total{minted=\"at_take_up\"}").await,
            metric(&stack, "quorum_take_up_tokens_waiting").await,
        ),
        (JOBS as u64, 0, 0)
    );
    let done = stack
        .wait_build(&build, "verification", |s| s.state.is_final())
        .await;
    assert_eq!(done.state, BuildState::Verified);

    // Two workers now: each gets offers of its own, and every token it is handed names it.
    let w2 = stack.worker("w2", "owner-2", false).await;
    assert!(
        w2.poll(50).await.is_none(),
        "nothing to offer yet; now w2 is online"
    );
    // Two results per job, so that each worker is offered every job (with one, a random
    // draw gave all six to one worker now and then).
    let twice = pipeline
        .replace("echo", "printf")
        .replace("quorum: 1", "quorum: 2");
    let build = stack.submit(&twice).await;
    let mut by_worker: BTreeMap<String, usize> = BTreeMap::new();
    let mut done_jobs = 0;
    while done_jobs < 2 * JOBS {
        for worker in [&w, &w2] {
            let Some(a) = worker.poll(100).await else {
                continue;
            };
            assert_eq!(
                claims(&a.job_token)["aud"],
                format!("worker:{}", worker.name)
            );
            assert_eq!(
                claims(&a.upload_token)["scope"]["assignment"],
                a.id.as_str()
            );
            worker
                .succeed(&a, a.script[0].as_bytes(), Usage::default())
                .await;
            *by_worker.entry(worker.name.clone()).or_default() += 1;
            done_jobs += 1;
        }
    }
    assert_eq!(
        by_worker,
        BTreeMap::from([("w1".to_string(), JOBS), ("w2".to_string(), JOBS)]),
        "each worker ran every job once"
    );
    let done = stack
        .wait_build(&build, "verification", |s| s.state.is_final())
        .await;
    assert_eq!(done.state, BuildState::Verified);
    stack.stop().await;
}

/// Offers live in the database; the controller's memory of them (`offers.rs`) is only a
/// shortcut. An offer waiting when the controller stops is taken after the restart as it was
/// made, not withdrawn and made again.
async fn an_offer_made_before_a_restart_is_taken_after_it(backend: Backend) {
    let mut stack = Stack::start(backend, 30).await;
    let w = stack.worker("w1", "owner-1", false).await;
    let build = stack
        .submit("policy: {quorum: 1}\njobs:\n  one:\n    script: [\"echo 1\"]\n  two:\n    script: [\"echo 2\"]\n")
        .await;
    let first = w.take().await;
    stack.stop_controller().await;
    stack.start_controller().await;
    let second = tokio::time::timeout(Duration::from_secs(10), w.take())
        .await
        .expect("the offer made before the restart is taken at once");
    assert_ne!(first.job, second.job);
    for a in [&first, &second] {
        w.succeed(a, a.script[0].as_bytes(), Usage::default()).await;
    }
    let done = stack
        .wait_build(&build, "verification after restart", |s| s.state.is_final())
        .await;
    assert_eq!(done.state, BuildState::Verified, "{done:#?}");
    for job in &done.jobs {
        assert_eq!(job.assignments.len(), 1, "offered once: {job:#?}");
    }
    stack.stop().await;
}

/// A report with `take=1` hands the reporting worker its next waiting offer, with tokens for
/// exactly that worker and assignment, as a poll would; with none waiting it is a plain `204`.
/// A report that is refused (another worker's assignment) hands nothing over: the offers stay
/// waiting for their own worker.
async fn a_report_hands_over_the_workers_next_offer_and_only_its_own(backend: Backend) {
    const JOBS: usize = 4;
    let stack = Stack::start(backend, 30).await;
    let w1 = stack.worker("w1", "owner-1", false).await;
    let w2 = stack.worker("w2", "owner-2", false).await;
    for w in [&w1, &w2] {
        assert!(
            w.poll(50).await.is_none(),
            "nothing to offer yet; now it is online"
        );
    }
    // Two identical results per job: every job is offered to both workers.
    let mut pipeline = String::from("policy: {quorum: 2}\njobs:\n");
    for j in 0..JOBS {
        pipeline.push_str(&format!("  j{j}:\n    script: [\"echo {j}\"]\n"));
    }
    let build = stack.submit(&pipeline).await;
    let a1 = w1.take().await;
    let b1 = w2.take().await;

    // w2 reports on w1's assignment, asking for more: refused, and nothing is taken for it.
    let stolen = w2.report(&a1, success(a1.job.as_bytes()), Usage::default());
    let refused = w2
        .client
        .result_and_take(&a1.id, &w2.client.sign_report(&stolen))
        .await;
    assert!(refused.is_err(), "another worker's assignment: {refused:?}");

    // Each worker goes through its offers by reporting alone, each handed over with tokens
    // naming that worker and assignment, until none is left.
    let claims = |token: &str| quorum_token::peek(token).unwrap().claims;
    for (w, first) in [(&w1, a1), (&w2, b1)] {
        let mut jobs = vec![first.job.clone()];
        let mut a = first;
        while let Some(next) = w
            .succeed_and_take(&a, a.job.as_bytes(), Usage::default())
            .await
        {
            assert_eq!(next.build_id, build);
            assert_eq!(claims(&next.job_token)["aud"], format!("worker:{}", w.name));
            assert_eq!(
                claims(&next.upload_token)["scope"]["assignment"],
                next.id.as_str()
            );
            jobs.push(next.job.clone());
            a = next;
            assert!(
                jobs.len() <= JOBS,
                "{} was handed more than its offers",
                w.name
            );
        }
        jobs.sort();
        jobs.dedup();
        assert_eq!(jobs.len(), JOBS, "{} ran each job once: {jobs:?}", w.name);
    }
    let done = stack
        .wait_build(&build, "verification", |s| s.state.is_final())
        .await;
    assert_eq!(done.state, BuildState::Verified, "{done:#?}");
    assert!(
        done.jobs.iter().all(|j| j.assignments.len() == 2),
        "each job ran once on each worker: {done:#?}"
    );
    stack.stop().await;
}

/// With the IdP down, a report's next offer cannot get its tokens: the report is still
/// recorded and answered as such (so the worker does not think it lost), and the offer waits
/// for the worker's next poll, which takes it once the IdP is back.
async fn a_report_is_recorded_when_its_next_offer_cannot_be_taken(backend: Backend) {
    let mut stack = Stack::start(backend, 30).await;
    let w = stack.worker("w1", "owner-1", false).await;
    let one = "policy: {quorum: 1}\njobs:\n  only:\n    script: [\"echo 1\"]\n";
    let first = stack.submit(one).await;
    let a = w.take().await;
    stack.stop_idp().await;
    // A second build's offer, whose tokens cannot be minted ahead with the IdP gone.
    let second = stack.submit(&one.replace("echo 1", "echo 2")).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let next = w.succeed_and_take(&a, b"1", Usage::default()).await;
    assert!(
        next.is_none(),
        "no tokens, so nothing handed over: {next:?}"
    );
    let done = stack
        .wait_build(&first, "verification", |s| s.state.is_final())
        .await;
    assert_eq!(
        done.state,
        BuildState::Verified,
        "the report was recorded: {done:#?}"
    );
    stack.start_idp().await;
    let b = w.take().await;
    assert_eq!(b.build_id, second, "the offer waited for the worker's poll");
    w.succeed(&b, b"2", Usage::default()).await;
    let done = stack
        .wait_build(&second, "verification", |s| s.state.is_final())
        .await;
    assert_eq!(done.state, BuildState::Verified, "{done:#?}");
    stack.stop().await;
}

/// A worker's signed request, captured on the wire and sent again while its timestamp is still
/// accepted, is refused: here a poll that found no work, replayed once the worker has an offer,
/// would otherwise take that offer with its job and upload tokens. The worker's own next poll
/// (with a nonce of its own) takes it. A nonce of the wrong form is refused by name.
async fn a_captured_worker_request_cannot_be_sent_again(backend: Backend) {
    use ed25519_dalek::Signer as _;
    use quorum_api::v1::worker_auth::{
        HEADER_NONCE, HEADER_SIGNATURE, HEADER_TIMESTAMP, HEADER_WORKER, message,
    };
    let stack = Stack::start(backend, 30).await;
    let a = stack.worker("a1", "alice", false).await;
    stack.worker("b1", "bob", false).await;
    let path = "/api/v1/workers/poll";
    // A long poll: replayed, it would wait for the offer the submission below makes.
    let body = serde_json::to_vec(&quorum_api::v1::controller::PollRequest {
        wait_ms: 1000,
        capacity: 1,
    })
    .unwrap();
    let http = reqwest::Client::new();
    let send = |nonce: &str| {
        let timestamp = quorum_service::now_unix();
        let signature = a.key.sign(&message("POST", path, timestamp, nonce, &body));
        http.post(format!("{}{path}", stack.controller_url))
            .header("content-type", "application/json")
            .header(HEADER_WORKER, "a1")
            .header(HEADER_TIMESTAMP, timestamp)
            .header(HEADER_NONCE, nonce)
            .header(HEADER_SIGNATURE, B64.encode(signature.to_bytes()))
            .body(body.clone())
            .build()
            .unwrap()
    };
    let captured = send("0123456789abcdef0123456789abcdef");
    let replay = captured.try_clone().unwrap();
    let first = http.execute(captured).await.unwrap();
    assert_eq!(first.status(), 204, "no work within the poll's second");

    stack.submit(ONE_JOB).await;
    let replayed = http.execute(replay).await.unwrap();
    assert_eq!(replayed.status(), 401);
    let text = replayed.text().await.unwrap();
    assert!(text.contains("already received"), "{text}");
    assert!(!text.contains("eyJ"), "no token in the refusal: {text}");

    let bad = http
        .execute(send("not-a-nonce-at-all-not-a-nonce-!"))
        .await
        .unwrap();
    assert_eq!(bad.status(), 401);
    let text = bad.text().await.unwrap();
    assert!(text.contains(HEADER_NONCE), "{text}");

    // The offer is still the worker's own.
    let ta = a.take().await;
    assert_eq!(ta.job, "build");
    stack.stop().await;
}
