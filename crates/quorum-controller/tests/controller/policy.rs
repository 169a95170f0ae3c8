//! Issue 6's policy features through the controller's real HTTP boundary, on SQLite and on a
//! fresh PostgreSQL database (QUORUM_TEST_POSTGRES_URL, from `source .ci/services.sh`): spot
//! checks by a trusted worker and the review flags a mismatch raises, a trusted rebuild that
//! breaks a tie, and jobs that run on provisional inputs. Workers are simulated through the real
//! worker protocol; the colluding ones are adversaries that report a backdoored manifest.

use std::time::Duration;

use crate::bounded;
use crate::support::{Backend, SimWorker, Stack, success};
use quorum_api::v1::controller::{
    AssignmentPurpose, BuildState, BuildStatus, JobState, ReportedResult, Usage,
};
use quorum_core::Digest;
use quorum_core::verdict::{JobVerdict, Outcome, ResultView, verdict_with_rebuilds};

on_both_backends!(
    a_spot_check_catches_colluders_and_flags_what_they_verified_since,
    a_trusted_rebuild_breaks_a_tie_and_the_build_goes_on_to_be_signed,
    results_on_provisional_inputs_are_promoted_or_discarded_with_them,
);

/// A one-job pipeline whose job runs only on workers labelled `<label>: y`.
fn pinned(label: &str, policy: &str) -> String {
    format!(
        "policy: {policy}\njobs:\n  build:\n    labels: {{{label}: y}}\n    script: [make]\n    artifacts: [out.txt]\n"
    )
}

fn manifest_of(content: &[u8]) -> Digest {
    let ReportedResult::Success {
        manifest_digest, ..
    } = success(content)
    else {
        unreachable!("success() is a success")
    };
    manifest_digest
}

/// Two workers take the build's one job and report `content`; the build must verify.
async fn verify_with(stack: &Stack, build: &str, workers: [&SimWorker; 2], content: &[u8]) {
    let (x, y) = tokio::join!(workers[0].take(), workers[1].take());
    assert_eq!((x.build_id.as_str(), y.build_id.as_str()), (build, build));
    workers[0].succeed(&x, content, Usage::default()).await;
    workers[1].succeed(&y, content, Usage::default()).await;
    let done = stack
        .wait_build(build, "verification", |s| s.state.is_final())
        .await;
    assert_eq!(done.state, BuildState::Verified, "{done:#?}");
    assert!(done.signed);
}

async fn a_spot_check_catches_colluders_and_flags_what_they_verified_since(backend: Backend) {
    let stack = Stack::start(backend, 30).await;
    // Labels steer each build to the workers the scenario needs; the trusted worker polls only
    // once the three builds are verified, so it can be in none of their quorums.
    let mallory = stack
        .labelled_worker("m1", "mallory", false, &[("one", "y"), ("two", "y")])
        .await;
    let nancy = stack
        .labelled_worker("n1", "nancy", false, &[("one", "y")])
        .await;
    let oscar = stack
        .labelled_worker("o1", "oscar", false, &[("two", "y"), ("three", "y")])
        .await;
    let peggy = stack
        .labelled_worker("p1", "peggy", false, &[("three", "y")])
        .await;
    let trent = stack
        .labelled_worker("t1", "trent", true, &[("one", "y")])
        .await;

    // Two colluders of different owners return the same backdoored output: it verifies.
    let first = stack
        .submit(&pinned("one", "{quorum: 2, spot_check: 1}"))
        .await;
    verify_with(&stack, &first, [&mallory, &nancy], b"backdoored").await;
    // Later, one of them verifies another build with an honest worker; other workers verify a
    // third. Neither asks for spot checks.
    let second = stack.submit(&pinned("two", "{quorum: 2}")).await;
    verify_with(&stack, &second, [&mallory, &oscar], b"second").await;
    let third = stack.submit(&pinned("three", "{quorum: 2}")).await;
    verify_with(&stack, &third, [&oscar, &peggy], b"third").await;

    let status = stack.user().status(&first).await.unwrap();
    assert_eq!(status.spot_checks.len(), 1, "{status:#?}");
    let check = &status.spot_checks[0];
    assert_eq!((check.rate_ppm, check.state.as_str()), (1_000_000, "due"));
    assert!(check.draw < check.rate_ppm, "the draw is recorded");
    for b in [&second, &third] {
        let s = stack.user().status(b).await.unwrap();
        assert!(s.spot_checks.is_empty(), "rate 0 draws nothing: {s:#?}");
    }

    // A trusted worker comes online and is free: it gets the spot check, and builds honestly.
    let check = trent.take().await;
    assert_eq!(
        (check.build_id.as_str(), check.job.as_str()),
        (&*first, "build")
    );
    trent.succeed(&check, b"honest", Usage::default()).await;
    let flagged = stack
        .wait_build(&first, "the flag", |s| !s.flags.is_empty())
        .await;
    assert_eq!(
        flagged.state,
        BuildState::Verified,
        "a flag changes no verdict"
    );
    assert_eq!(flagged.spot_checks[0].state, "mismatched", "{flagged:#?}");
    let spot = flagged.jobs[0]
        .assignments
        .iter()
        .find(|a| a.id == check.id)
        .unwrap();
    assert_eq!(spot.purpose, AssignmentPurpose::SpotCheck);
    let flag = &flagged.flags[0];
    assert!(
        flag.reason.contains("spot check by trusted worker t1"),
        "{}",
        flag.reason
    );
    assert_eq!(flag.evidence.checked_manifest, manifest_of(b"backdoored"));
    assert_eq!(
        flag.evidence.trusted_outcome,
        Outcome::Success {
            manifest: manifest_of(b"honest")
        }
    );
    assert_eq!(flag.evidence.checked_workers, ["m1", "n1"]);

    let later = stack.user().status(&second).await.unwrap();
    assert_eq!(later.flags.len(), 1, "{later:#?}");
    assert_eq!(later.flags[0].evidence.workers, ["m1"]);
    assert_eq!(later.flags[0].evidence.manifest, manifest_of(b"second"));
    assert!(
        later.flags[0]
            .reason
            .contains("verified with results from m1"),
        "{}",
        later.flags[0].reason
    );
    let others = stack.user().status(&third).await.unwrap();
    assert!(
        others.flags.is_empty(),
        "a build verified by other workers is not flagged: {others:#?}"
    );

    // The operator reviews: lists, clears one with a note, and bad clears are refused by name.
    let user = stack.user();
    let open = user.review_list(false).await.unwrap();
    assert_eq!(open.flags.len(), 2, "{open:#?}");
    let empty = user.review_clear(&flag.id, "  ").await.unwrap_err();
    assert!(empty.to_string().contains("a note"), "{empty}");
    user.review_clear(&flag.id, "rebuilt from source; m1 and n1 removed")
        .await
        .unwrap();
    let again = user.review_clear(&flag.id, "twice").await.unwrap_err();
    assert!(again.to_string().contains("already cleared"), "{again}");
    let unknown = user.review_clear("nope", "x").await.unwrap_err();
    assert!(
        unknown.to_string().contains("no review flag nope"),
        "{unknown}"
    );
    let open = user.review_list(false).await.unwrap();
    assert_eq!(open.flags.len(), 1);
    assert_eq!(open.flags[0].build_id, second);
    let all = user.review_list(true).await.unwrap();
    let cleared = all.flags.iter().find(|f| f.id == flag.id).unwrap();
    assert_eq!(
        cleared.cleared_note.as_deref(),
        Some("rebuilt from source; m1 and n1 removed")
    );
    stack.stop().await;
}

/// Polls each worker once for up to `wait_ms`; those offered something take it.
async fn offers(
    workers: &[&SimWorker],
    wait_ms: u64,
) -> Vec<(usize, quorum_api::v1::controller::Assignment)> {
    let mut out = Vec::new();
    for (i, w) in workers.iter().enumerate() {
        if let Some(a) = w.poll(wait_ms).await {
            out.push((i, a));
        }
    }
    out
}

/// The job's verdict recomputed from the controller's database alone.
async fn verdict_from_database(stack: &Stack, build: &str, job: &str) -> JobVerdict {
    use sqlx::Row as _;
    let pool = stack.database().await;
    let rows = sqlx::query(
        "SELECT a.purpose, a.outcome, w.id, w.owner, w.trusted FROM assignments a \
         JOIN workers w ON w.id = a.worker_id JOIN jobs j ON j.build_id = a.build_id AND j.name = a.job \
         WHERE a.build_id = $1 AND a.job = $2 AND a.round = j.round AND a.state = 'reported'",
    )
    .bind(build)
    .bind(job)
    .fetch_all(&pool)
    .await
    .unwrap();
    let (mut results, mut rebuilds) = (Vec::new(), Vec::new());
    for r in rows {
        let view = ResultView {
            worker: r.get("id"),
            owner: r.get("owner"),
            trusted: r.get::<i64, _>("trusted") != 0,
            outcome: serde_json::from_str(&r.get::<String, _>("outcome")).unwrap(),
        };
        match r.get::<String, _>("purpose").as_str() {
            "tie_break" => rebuilds.push(view),
            "quorum" => results.push(view),
            other => panic!("no {other} assignment belongs in this job"),
        }
    }
    pool.close().await;
    let status = stack.user().status(build).await.unwrap();
    let policy = status.jobs.iter().find(|j| j.name == job).unwrap().policy;
    verdict_with_rebuilds(policy, &results, &rebuilds)
}

async fn a_trusted_rebuild_breaks_a_tie_and_the_build_goes_on_to_be_signed(backend: Backend) {
    let stack = Stack::start(backend, 30).await;
    let alice = stack.worker("a1", "alice", false).await;
    let bob = stack.worker("b1", "bob", false).await;
    let trent = stack.worker("t1", "trent", true).await;
    let pipeline = "jobs:\n  build:\n    script: [make]\n    artifacts: [out.txt]\n  test:\n    needs: [build]\n    script: [check]\n";
    let build = stack.submit(pipeline).await;
    let (ta, tb) = tokio::join!(alice.take(), bob.take());
    alice.succeed(&ta, b"good", Usage::default()).await;
    bob.succeed(&tb, b"evil", Usage::default()).await;
    let disputed = stack
        .wait_build(&build, "the dispute", |s| s.state.is_final())
        .await;
    assert_eq!(disputed.state, BuildState::Disputed, "{disputed:#?}");
    assert_eq!(disputed.jobs[1].state, JobState::Skipped);

    let user = stack.user();
    let not_disputed = user.rebuild_trusted(&build, "test").await.unwrap_err();
    assert!(
        not_disputed
            .to_string()
            .contains("is skipped; only a disputed job"),
        "{not_disputed}"
    );
    let unknown = user.rebuild_trusted(&build, "deploy").await.unwrap_err();
    assert!(
        unknown.to_string().contains("has no job `deploy`"),
        "{unknown}"
    );
    let untrusted = reqwest::Client::new()
        .post(format!(
            "{}/api/v1/builds/{build}/jobs/build/rebuild",
            stack.controller_url
        ))
        .bearer_auth(&stack.api_token)
        .json(&serde_json::json!({"trusted": false}))
        .send()
        .await
        .unwrap();
    assert_eq!(untrusted.status(), reqwest::StatusCode::BAD_REQUEST);
    user.rebuild_trusted(&build, "build").await.unwrap();
    let twice = user.rebuild_trusted(&build, "build").await.unwrap_err();
    assert!(twice.to_string().contains("already requested"), "{twice}");

    // The trusted worker comes online and gets the rebuild; it agrees with alice's side.
    let tt = trent.take().await;
    assert_eq!((tt.build_id.as_str(), tt.job.as_str()), (&*build, "build"));
    trent.succeed(&tt, b"good", Usage::default()).await;
    let reopened = stack
        .wait_build(&build, "the tie broken", |s| {
            s.jobs[0].state == JobState::Verified
        })
        .await;
    assert!(
        reopened.jobs[0].detail.contains("trusted rebuild")
            && reopened.jobs[0].detail.contains("results differ"),
        "the verdict names the rebuild and the dispute stays on record: {}",
        reopened.jobs[0].detail
    );
    assert_eq!(reopened.jobs[0].differing_paths, ["out.txt"]);
    assert_eq!(reopened.jobs[0].manifest, Some(manifest_of(b"good")));

    // The job the dispute had skipped runs now (any two of the three online workers).
    let mut taken = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let all = [&alice, &bob, &trent];
    while taken.len() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "the test job was offered"
        );
        for (i, a) in offers(&all, 200).await {
            assert_eq!(a.job, "test");
            all[i].succeed(&a, b"tested", Usage::default()).await;
            taken.push(i);
        }
    }
    let done = stack
        .wait_build(&build, "the signature", |s| s.state.is_final())
        .await;
    assert_eq!(done.state, BuildState::Verified, "{done:#?}");
    assert!(done.signed);
    let statement = stack.user().statement(&build).await.unwrap();
    let payload = String::from_utf8(
        base64::Engine::decode(
            &base64::engine::general_purpose::STANDARD,
            &statement.payload,
        )
        .unwrap(),
    )
    .unwrap();
    assert!(
        payload.contains("\"t1\""),
        "the rebuilder is a named builder: {payload}"
    );
    // The minority is not marked: no flag, and bob's result stays as he reported it.
    assert!(done.flags.is_empty(), "{done:#?}");
    let bobs = done.jobs[0]
        .assignments
        .iter()
        .find(|a| a.worker == "b1")
        .unwrap();
    assert_eq!(
        bobs.outcome,
        Some(Outcome::Success {
            manifest: manifest_of(b"evil")
        })
    );
    assert_eq!(done.rebuilds.len(), 1);
    assert_eq!(done.rebuilds[0].state, "done");
    assert_eq!(
        verdict_from_database(&stack, &build, "build").await,
        JobVerdict::Verified {
            manifest: manifest_of(b"good"),
            workers: vec!["a1".into(), "t1".into()]
        },
        "recomputed from the database, the verdict is the same"
    );
    stack.stop().await;
}

const PROVISIONAL: &str = "jobs:\n  build:\n    labels: {role: build}\n    script: [make]\n  test:\n    needs: [build]\n    provisional: true\n    labels: {role: test}\n    policy: {quorum: 1}\n    script: [check]\n";

fn job<'a>(s: &'a BuildStatus, name: &str) -> &'a quorum_api::v1::controller::JobStatus {
    s.jobs.iter().find(|j| j.name == name).unwrap()
}

async fn results_on_provisional_inputs_are_promoted_or_discarded_with_them(backend: Backend) {
    let stack = Stack::start(backend, 30).await;
    let alice = stack
        .labelled_worker("a1", "alice", false, &[("role", "build")])
        .await;
    let bob = stack
        .labelled_worker("b1", "bob", false, &[("role", "build")])
        .await;
    let carol = stack
        .labelled_worker("c1", "carol", false, &[("role", "test")])
        .await;

    // Promotion: the test starts on one agreeing result, and verifies once its input does.
    let build = stack.submit(PROVISIONAL).await;
    let (ta, tb) = tokio::join!(alice.take(), bob.take());
    assert!(
        carol.poll(300).await.is_none(),
        "without any result of `build`, `test` waits"
    );
    alice.succeed(&ta, b"x", Usage::default()).await;
    let tc = carol.take().await;
    assert_eq!(tc.job, "test");
    carol.succeed(&tc, b"ok", Usage::default()).await;
    let held = stack
        .wait_build(&build, "the provisional result", |s| {
            job(s, "test").state == JobState::Provisional
        })
        .await;
    assert!(
        job(&held, "test")
            .detail
            .contains("provisional until `build` verifies"),
        "{held:#?}"
    );
    assert_eq!(job(&held, "build").state, JobState::Provisional);
    assert_eq!(held.state, BuildState::Running);
    assert!(!held.signed, "nothing provisional is signed");
    bob.succeed(&tb, b"x", Usage::default()).await;
    let done = stack
        .wait_build(&build, "verification", |s| s.state.is_final())
        .await;
    assert_eq!(done.state, BuildState::Verified, "{done:#?}");
    assert_eq!(job(&done, "test").state, JobState::Verified);
    assert!(done.signed);

    // Discarding: the input turns out disputed, so the result made on it is thrown away.
    let build = stack.submit(PROVISIONAL).await;
    let (ta, tb) = tokio::join!(alice.take(), bob.take());
    alice.succeed(&ta, b"x", Usage::default()).await;
    let tc = carol.take().await;
    carol.succeed(&tc, b"ok", Usage::default()).await;
    stack
        .wait_build(&build, "the provisional result", |s| {
            job(s, "test").state == JobState::Provisional
        })
        .await;
    bob.succeed(&tb, b"y", Usage::default()).await;
    let done = stack
        .wait_build(&build, "the dispute", |s| s.state.is_final())
        .await;
    assert_eq!(done.state, BuildState::Disputed, "{done:#?}");
    let test = job(&done, "test");
    assert_eq!(test.state, JobState::Failed);
    assert!(
        test.detail
            .contains("discarded: it ran on provisional results of `build`, which ended disputed"),
        "{}",
        test.detail
    );
    assert!(!done.signed);

    // A trusted rebuild settles the dispute on alice's side: the discarded test runs again,
    // in a new round, and the build goes on to be verified and signed.
    let trent = stack
        .labelled_worker("t1", "trent", true, &[("role", "build")])
        .await;
    stack.user().rebuild_trusted(&build, "build").await.unwrap();
    let tt = trent.take().await;
    assert_eq!(tt.job, "build");
    trent.succeed(&tt, b"x", Usage::default()).await;
    let again = carol.take().await;
    assert_eq!(
        (again.build_id.as_str(), again.job.as_str()),
        (&*build, "test")
    );
    assert_ne!(again.id, tc.id, "the discarded result is not reused");
    carol.succeed(&again, b"ok", Usage::default()).await;
    let settled = stack
        .wait_build(&build, "verification after the rebuild", |s| {
            s.state.is_final()
        })
        .await;
    assert_eq!(settled.state, BuildState::Verified, "{settled:#?}");
    assert_eq!(job(&settled, "test").state, JobState::Verified);
    assert!(settled.signed, "{settled:#?}");
    stack.stop().await;
}
