//! End-to-end tests: real role processes on 127.0.0.1 port 0, real git, real HTTP, the `quorum`
//! CLI as a user runs it. The only test doubles are adversaries speaking the real protocol.

#![allow(clippy::disallowed_methods)] // tests run the binaries they build

mod federated;
mod invariants;
mod signing;
mod util;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use quorum::federation::WorkerSpec;
use quorum_api::v1::controller::{BuildState, JobState};
use quorum_core::verdict::Outcome;
use util::{Db, Fixture, example_repo, repo_with, stderr, stdout};

const LIMIT: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread")]
async fn reproducible_example_is_verified_signed_and_fetchable() {
    reproducible_example_is_verified_signed_and_fetchable_on(Db::Sqlite).await
}

#[tokio::test(flavor = "multi_thread")]
async fn reproducible_example_is_verified_signed_and_fetchable_on_postgres() {
    reproducible_example_is_verified_signed_and_fetchable_on(Db::Postgres).await
}

async fn reproducible_example_is_verified_signed_and_fetchable_on(db: Db) {
    let fx = Fixture::with_workers_on(db, 3).await;
    let repo = example_repo("reproducible");
    let out = fx.cli(&["submit", "--wait", "--json", repo.path().to_str().unwrap()]);
    assert!(
        out.status.success(),
        "submit --wait failed: {}\n{}\n{}",
        stdout(&out),
        stderr(&out),
        fx.logs()
    );
    let status: quorum_api::v1::controller::BuildStatus =
        serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(status.state, BuildState::Verified);
    assert!(status.signed);
    let build = status.jobs.iter().find(|j| j.name == "build").unwrap();
    assert_eq!(build.state, JobState::Verified);
    let workers: BTreeSet<&str> = build
        .assignments
        .iter()
        .filter(|a| a.state == "reported")
        .map(|a| a.worker.as_str())
        .collect();
    assert_eq!(
        workers.len(),
        3,
        "three distinct workers reported: {build:#?}"
    );

    // The usage view sums the three workers' signed reports for the federation's tenant.
    let out = fx.cli(&["usage", "--json"]);
    assert!(out.status.success(), "usage: {}", stderr(&out));
    let usage: quorum_api::v1::controller::UsageView = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(usage.tenants.len(), 1, "{usage:#?}");
    assert_eq!(usage.tenants[0].tenant, "local");
    assert_eq!(usage.builds[0].build_id, status.id);
    let reported = status
        .jobs
        .iter()
        .flat_map(|j| &j.assignments)
        .filter(|a| a.state == "reported")
        .count() as u64;
    assert_eq!(usage.builds[0].totals.results, reported);
    assert!(usage.builds[0].totals.wall_ms > 0, "{usage:#?}");
    let out = fx.cli(&["usage", "--tenant", "local"]);
    assert!(stdout(&out).contains(&status.id), "{}", stdout(&out));

    // A consumer fetches the artifacts; the CLI checks them against the signed statement.
    let dest = fx.dir.path().join("fetched");
    let out = fx.cli(&["fetch", &status.id, "--out", dest.to_str().unwrap()]);
    assert!(out.status.success(), "fetch: {}", stderr(&out));
    let hello = dest.join("build/dist/hello");
    let statement = dest.join("statement.intoto.json");
    let key = dest.join("signer.pub");
    assert!(hello.exists() && statement.exists());

    // The signer's key is the one the controller keeps; verify with it, independently of fetch.
    let published = fx.fed.signer_public_key().unwrap();
    assert_eq!(std::fs::read_to_string(&key).unwrap().trim(), published);
    let out = fx.cli(&[
        "verify",
        "--statement",
        statement.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
        "--name",
        "build/dist/hello",
        hello.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "verify: {}{}",
        stdout(&out),
        stderr(&out)
    );

    // The downloaded binary runs and is what the statement names.
    let run = std::process::Command::new(&hello)
        .arg("quorum")
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&run.stdout).trim(), "hello, quorum");

    // Every assignment's upload token was revoked at the store once the assignment ended.
    let jtis_query = "SELECT upload_jti FROM assignments WHERE build_id = $1";
    let jtis: Vec<String> = match fx.fed.database_url() {
        Some(url) => {
            let pool = sqlx::PgPool::connect(url).await.unwrap();
            sqlx::query_scalar(jtis_query)
                .bind(&status.id)
                .fetch_all(&pool)
                .await
                .unwrap()
        }
        None => {
            let path = fx.fed.role_dir("controller").join("controller.db");
            let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}?mode=ro", path.display()))
                .await
                .unwrap();
            sqlx::query_scalar(jtis_query)
                .bind(&status.id)
                .fetch_all(&pool)
                .await
                .unwrap()
        }
    };
    assert_eq!(jtis.len(), 6, "two jobs, three assignments each");
    let store_db = sqlx::SqlitePool::connect(&format!(
        "sqlite://{}?mode=ro",
        fx.fed.role_dir("store").join("store.db").display()
    ))
    .await
    .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let mut revoked = 0;
        for jti in &jtis {
            let r: Option<i64> =
                sqlx::query_scalar("SELECT revoked FROM token_usage WHERE jti = ?")
                    .bind(jti)
                    .fetch_optional(&store_db)
                    .await
                    .unwrap();
            revoked += (r == Some(1)) as usize;
        }
        if revoked == jtis.len() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "only {revoked} of {} upload tokens revoked\n{}",
            jtis.len(),
            fx.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // A tampered artifact, or the right artifact under another key, does not verify.
    let evil = fx.dir.path().join("evil");
    std::fs::copy(&hello, &evil).unwrap();
    std::fs::OpenOptions::new()
        .append(true)
        .open(&evil)
        .map(|mut f| std::io::Write::write_all(&mut f, b"\0"))
        .unwrap()
        .unwrap();
    let out = fx.cli(&[
        "verify",
        "--statement",
        statement.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
        evil.to_str().unwrap(),
    ]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "tampered artifact must not verify"
    );
    let other_key = fx.dir.path().join("other.pub");
    std::fs::write(&other_key, "O2onvM62pC1io6jQKm8Nc2UyFXcd4kOmOsBIoYtZ2ik=\n").unwrap();
    let out = fx.cli(&[
        "verify",
        "--statement",
        statement.to_str().unwrap(),
        "--key",
        other_key.to_str().unwrap(),
        hello.to_str().unwrap(),
    ]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "a statement checked with another key must not verify"
    );

    // Each worker's signed usage ledger has the two jobs it ran, billed to the project's tenant.
    for w in ["w1", "w2", "w3"] {
        let config = fx.dir.path().join(format!("{w}.toml"));
        let out = fx.cli(&[
            "worker",
            "usage",
            "--config",
            config.to_str().unwrap(),
            "--format",
            "json",
        ]);
        assert!(out.status.success(), "{}", stderr(&out));
        let records: Vec<serde_json::Value> = serde_json::from_str(&stdout(&out)).unwrap();
        let jobs: BTreeSet<&str> = records
            .iter()
            .filter(|r| r["build_id"] == status.id.as_str())
            .map(|r| r["job"].as_str().unwrap())
            .collect();
        assert_eq!(jobs, BTreeSet::from(["build", "test"]), "{w}: {records:#?}");
        assert!(
            records
                .iter()
                .all(|r| r["tenant"] == "local" && r["outcome"] == "success"),
            "{records:#?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn unreproducible_example_is_disputed_with_every_digest_recorded() {
    let fx = Fixture::with_workers(3).await;
    let repo = example_repo("unreproducible");
    let build = fx.submit(repo.path()).await;
    let status = fx.wait_final(&build, LIMIT).await;
    assert_eq!(status.state, BuildState::Disputed, "{status:#?}");
    assert!(!status.signed);
    let job = &status.jobs[0];
    assert_eq!(job.state, JobState::Disputed);
    let digests: BTreeMap<&str, &Outcome> = job
        .assignments
        .iter()
        .filter_map(|a| a.outcome.as_ref().map(|o| (a.worker.as_str(), o)))
        .collect();
    assert_eq!(
        digests.len(),
        3,
        "each worker's result is recorded: {job:#?}"
    );
    let distinct: BTreeSet<_> = digests.values().collect();
    assert_eq!(distinct.len(), 3, "every worker produced different bytes");
    assert_eq!(
        job.differing_paths,
        vec!["dist/stamp.txt".to_string()],
        "the diff names the differing file only"
    );
    // Nothing is signed for a dispute.
    assert!(fx.fed.user_client().statement(&build).await.is_err());
    // The human report names the workers and their digests.
    let out = fx.cli(&["status", &build]);
    let text = stdout(&out);
    assert!(
        text.contains("disputed")
            && text.contains("w1")
            && text.contains("w2")
            && text.contains("w3"),
        "{text}"
    );
}

/// A worker that runs the real protocol but appends a backdoor to every output before hashing.
struct Backdoor;

impl quorum_worker::Hooks for Backdoor {
    fn after_build(&self, build_dir: &Path) {
        for entry in walk(build_dir) {
            if entry.extension().is_none_or(|e| e != "c") && entry.is_file() {
                let mut bytes = std::fs::read(&entry).unwrap();
                bytes.extend_from_slice(b"#backdoor");
                std::fs::write(&entry, bytes).unwrap();
            }
        }
    }
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn malicious_worker_makes_the_build_disputed_and_nothing_is_signed() {
    let mut fx = Fixture::with_workers(2).await;
    let token = quorum_controller::create_enrollment(
        &fx.fed.role_dir("controller"),
        fx.fed.database_url(),
        "mallory",
        false,
        &BTreeMap::new(),
    )
    .await
    .unwrap();
    let config = in_process_worker(&fx, "mallory-1", "mallory", Some(token));
    let stop = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(quorum_worker::run_with_hooks(
        config,
        stop.clone(),
        Arc::new(Backdoor),
    ));

    let repo = example_repo("reproducible");
    let build = fx.submit(repo.path()).await;
    let status = fx.wait_final(&build, LIMIT).await;
    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), task).await;

    assert_eq!(status.state, BuildState::Disputed, "{status:#?}");
    assert!(!status.signed);
    let job = status.jobs.iter().find(|j| j.name == "build").unwrap();
    let mallory = job
        .assignments
        .iter()
        .find(|a| a.worker == "mallory-1")
        .expect("mallory took part");
    let honest: Vec<_> = job
        .assignments
        .iter()
        .filter(|a| a.worker != "mallory-1" && a.outcome.is_some())
        .collect();
    assert_eq!(honest.len(), 2);
    assert_eq!(
        honest[0].outcome, honest[1].outcome,
        "the honest workers agree"
    );
    assert_ne!(
        mallory.outcome, honest[0].outcome,
        "the backdoored result differs"
    );
    assert!(
        job.differing_paths.contains(&"dist/hello".to_string()),
        "{:?}",
        job.differing_paths
    );
    // The controller's metrics count what happened, and leak no names.
    let metrics = fx.metrics().await;
    assert!(
        metrics.contains("quorum_builds{state=\"disputed\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("quorum_jobs{state=\"skipped\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("quorum_workers_enrolled 3"), "{metrics}");
    assert!(metrics.contains("quorum_statements_signed 0"), "{metrics}");
    assert!(
        !metrics.contains("mallory") && !metrics.contains(&build),
        "{metrics}"
    );
    let test_job = status.jobs.iter().find(|j| j.name == "test").unwrap();
    assert_eq!(
        test_job.state,
        JobState::Skipped,
        "a job needing a disputed one does not run"
    );
    assert!(
        fx.fed.user_client().statement(&build).await.is_err(),
        "nothing is signed"
    );

    // The operator's side, through the CLI: the report explaining the dispute names the
    // differing file, a rebuild must be asked for as trusted, and the trusted worker's rebuild
    // (mallory has stopped) agrees with the honest pair, which verifies the job, runs the
    // job that was skipped and signs the build.
    let diff = fx.cli(&["diff", &build, "build"]);
    assert!(diff.status.success(), "{}", stderr(&diff));
    assert!(stdout(&diff).contains("dist/hello"), "{}", stdout(&diff));
    let untrusted = fx.cli(&["rebuild", &build, "build"]);
    assert!(!untrusted.status.success());
    assert!(
        stderr(&untrusted).contains("--trusted"),
        "{}",
        stderr(&untrusted)
    );
    let rebuild = fx.cli(&["rebuild", "--trusted", &build, "build"]);
    assert!(rebuild.status.success(), "{}", stderr(&rebuild));
    // Only a trusted worker of an owner not in the dispute may settle it: w1 took part.
    let waiting = fx
        .wait_until(&build, LIMIT, "the rebuild waiting", |s| {
            s.rebuilds
                .iter()
                .any(|r| r.detail.contains("waiting for an online trusted worker"))
        })
        .await;
    assert!(!waiting.signed);
    fx.fed
        .start_worker(&WorkerSpec::new("w3", "owner3", true))
        .await
        .unwrap();
    let status = fx
        .wait_until(&build, LIMIT, "the tie-break", |s| {
            s.state.is_final() && s.signed
        })
        .await;
    assert_eq!(status.state, BuildState::Verified, "{status:#?}");
    let test_job = status.jobs.iter().find(|j| j.name == "test").unwrap();
    assert_eq!(test_job.state, JobState::Verified, "{status:#?}");
    let job = status.jobs.iter().find(|j| j.name == "build").unwrap();
    assert!(
        job.differing_paths.contains(&"dist/hello".to_string()),
        "the dispute's record stays: {job:#?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn worker_refuses_a_token_from_an_idp_it_does_not_trust_and_the_job_moves_on() {
    // Only three workers at first, one of which trusts some other IdP: it must be picked, and
    // must refuse. A fourth worker started afterwards takes the job over.
    let mut picky = WorkerSpec::new("picky", "owner-p", false);
    picky.trusted_issuers = Some(vec!["http://127.0.0.1:9/untrusted-idp".into()]);
    let mut fx = Fixture::start(
        vec![
            WorkerSpec::new("w1", "o1", false),
            WorkerSpec::new("w2", "o2", false),
            picky,
        ],
        util::LEASE_SECS,
    )
    .await;
    let repo = repo_with(&[(".quorum.yml", QUICK)]);
    let build = fx.submit(repo.path()).await;
    let s = fx.wait_refused(&build, "picky", "not trusted").await;
    assert_ne!(s.state, BuildState::Verified);

    fx.fed
        .start_worker(&WorkerSpec::new("w4", "o4", false))
        .await
        .unwrap();
    let status = fx.wait_final(&build, LIMIT).await;
    assert_eq!(status.state, BuildState::Verified, "{status:#?}");
    let reported: BTreeSet<&str> = status.jobs[0]
        .assignments
        .iter()
        .filter(|a| a.state == "reported")
        .map(|a| a.worker.as_str())
        .collect();
    assert_eq!(reported, BTreeSet::from(["w1", "w2", "w4"]));
}

const SLOW: &str = "policy: {quorum: 3}\njobs:\n  build:\n    script: [\"sleep 4\", \"mkdir out && echo same > out/a\"]\n    artifacts: [out/a]\n";

#[tokio::test(flavor = "multi_thread")]
async fn killing_a_worker_mid_build_reassigns_its_job() {
    let mut fx = Fixture::with_workers(4).await;
    let repo = repo_with(&[(".quorum.yml", SLOW)]);
    let build = fx.submit(repo.path()).await;
    let s = fx
        .wait_until(&build, LIMIT, "three running", |s| {
            s.jobs[0]
                .assignments
                .iter()
                .filter(|a| a.state == "running")
                .count()
                == 3
        })
        .await;
    let victim = s.jobs[0]
        .assignments
        .iter()
        .find(|a| a.state == "running")
        .unwrap()
        .worker
        .clone();
    fx.fed.kill(&victim).unwrap();
    let status = fx.wait_final(&build, LIMIT).await;
    assert_eq!(
        status.state,
        BuildState::Verified,
        "{status:#?}\n{}",
        fx.logs()
    );
    let job = &status.jobs[0];
    let lost = job.assignments.iter().find(|a| a.worker == victim).unwrap();
    assert_eq!(lost.state, "lost");
    assert_eq!(
        job.assignments
            .iter()
            .filter(|a| a.state == "reported")
            .count(),
        3
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn restarting_the_controller_mid_build_completes_the_build() {
    restarting_the_controller_mid_build_completes_the_build_on(Db::Sqlite).await
}

#[tokio::test(flavor = "multi_thread")]
async fn restarting_the_controller_mid_build_completes_the_build_on_postgres() {
    restarting_the_controller_mid_build_completes_the_build_on(Db::Postgres).await
}

/// The controller is killed with SIGKILL while three workers run the job, then started again on
/// the same database.
async fn restarting_the_controller_mid_build_completes_the_build_on(db: Db) {
    let mut fx = Fixture::with_workers_on(db, 3).await;
    let repo = repo_with(&[(".quorum.yml", SLOW)]);
    let build = fx.submit(repo.path()).await;
    fx.wait_until(&build, LIMIT, "three running", |s| {
        s.jobs[0]
            .assignments
            .iter()
            .filter(|a| a.state == "running")
            .count()
            == 3
    })
    .await;
    fx.fed.kill("controller").unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    fx.fed.start_role("controller").await.unwrap();
    let status = fx.wait_final(&build, LIMIT).await;
    assert_eq!(
        status.state,
        BuildState::Verified,
        "{status:#?}\n{}",
        fx.logs()
    );
    assert_eq!(
        status.jobs[0].assignments.len(),
        3,
        "no assignment was lost or duplicated: {status:#?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn killing_the_controller_again_and_again_loses_duplicates_and_double_signs_nothing() {
    killing_the_controller_again_and_again_on(Db::Sqlite).await
}

#[tokio::test(flavor = "multi_thread")]
async fn killing_the_controller_again_and_again_on_postgres() {
    killing_the_controller_again_and_again_on(Db::Postgres).await
}

/// Issue 6's fault test: SIGKILL the controller at staggered moments while several builds are
/// scheduled, run, reported, verified and signed, restarting it each time on the same database.
/// The kills land in every phase (the exact one is not chosen); whichever they hit, every build
/// must end verified with one statement that verifies, and no worker's result may count twice.
async fn killing_the_controller_again_and_again_on(db: Db) {
    let mut fx = Fixture::with_workers_on(db, 3).await;
    let pipeline = "jobs:\n  build:\n    script: [\"echo same > out.txt\"]\n    artifacts: [out.txt]\n  test:\n    needs: [build]\n    script: [\"test -f out.txt || true\"]\n";
    let mut builds = Vec::new();
    for _ in 0..4 {
        let repo = repo_with(&[(".quorum.yml", pipeline)]);
        builds.push((fx.submit(repo.path()).await, repo));
    }
    for pause_ms in [300, 700, 1100, 500, 900] {
        tokio::time::sleep(Duration::from_millis(pause_ms)).await;
        fx.fed.kill("controller").unwrap();
        fx.fed.start_role("controller").await.unwrap();
    }
    let keys = fx.fed.user_client().signer_keys().await.unwrap();
    for (build, _repo) in &builds {
        let status = fx.wait_final(build, LIMIT).await;
        assert_eq!(
            status.state,
            BuildState::Verified,
            "{status:#?}\n{}",
            fx.logs()
        );
        assert!(status.signed);
        for job in &status.jobs {
            let reporters: Vec<&str> = job
                .assignments
                .iter()
                .filter(|a| a.state == "reported")
                .map(|a| a.worker.as_str())
                .collect();
            let distinct: BTreeSet<&str> = reporters.iter().copied().collect();
            assert_eq!(
                distinct.len(),
                reporters.len(),
                "no worker's result counts twice: {job:#?}"
            );
            assert!(reporters.len() >= 2, "{job:#?}");
        }
        let envelope = fx.fed.user_client().statement(build).await.unwrap();
        let verified = keys.keys.values().any(|k| {
            use base64::Engine as _;
            base64::engine::general_purpose::STANDARD
                .decode(k)
                .ok()
                .and_then(|b| <[u8; 32]>::try_from(b).ok())
                .and_then(|b| ed25519_dalek::VerifyingKey::from_bytes(&b).ok())
                .is_some_and(|key| quorum_core::attest::verify_envelope(&envelope, &key).is_ok())
        });
        assert!(verified, "the one statement of {build} verifies");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_pipelines_are_refused_with_the_problem_named_and_nothing_scheduled() {
    let fx = Fixture::with_workers(1).await;
    let cases: &[(&str, &str)] = &[
        ("jobs:\n  build: [unclosed\n", "line 2"),
        (
            "jobs:\n  build:\n    script: [make]\n    artefacts: [x]\n",
            "artefacts",
        ),
        ("jobs:\n  build:\n    artifacts: [x]\n", "has no `script`"),
        (
            "jobs:\n  a: {script: [x], needs: [b]}\n  b: {script: [x], needs: [a]}\n",
            "cycle: a -> b -> a",
        ),
    ];
    for (text, expected) in cases {
        let repo = repo_with(&[(".quorum.yml", text)]);
        let out = fx.cli(&["submit", repo.path().to_str().unwrap()]);
        assert!(!out.status.success(), "{text} was accepted");
        assert!(
            stderr(&out).contains(expected),
            "error for {text:?} should mention {expected:?}: {}",
            stderr(&out)
        );
    }
    let none = repo_with(&[("README", "no pipeline here")]);
    let out = fx.cli(&["submit", none.path().to_str().unwrap()]);
    assert!(
        stderr(&out).contains("has no .quorum.yml"),
        "{}",
        stderr(&out)
    );

    // Nothing was created: the controller's database has no builds, jobs or assignments.
    let db = fx.fed.role_dir("controller").join("controller.db");
    let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}?mode=ro", db.display()))
        .await
        .unwrap();
    for table in ["builds", "jobs", "assignments"] {
        let n: i64 = sqlx::query_scalar(&format!("SELECT COUNT(*) FROM {table}"))
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(n, 0, "{table} must be empty");
    }
}

const QUICK: &str = "policy: {quorum: 3}\njobs:\n  build:\n    script: [\"mkdir out && echo same > out/a\"]\n    artifacts: [out/a]\n";

fn in_process_worker(
    fx: &Fixture,
    name: &str,
    dir: &str,
    token: Option<String>,
) -> quorum_worker::Config {
    quorum_worker::Config {
        name: name.into(),
        data_dir: fx.dir.path().join(dir),
        controllers: vec![quorum_worker::ControllerConfig {
            url: fx.fed.controller_url.clone(),
            enrollment_token: token,
        }],
        trusted_issuers: vec![quorum_client::trust::TrustedIssuer::any_tenant(
            fx.fed.idp_url.clone(),
        )],
        max_jobs: 2,
        allow_local_repositories: true,
        sandbox: Default::default(),
        allow_weaker_sandbox: false,
        limits: Default::default(),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn worker_refuses_a_job_token_addressed_to_another_worker() {
    let fx = Fixture::with_workers(2).await;
    // Enroll as `victim`, then come back under another name with the same key and enrollment:
    // the controller still addresses job tokens to `worker:victim`, which `impostor` must refuse.
    let token = quorum_controller::create_enrollment(
        &fx.fed.role_dir("controller"),
        fx.fed.database_url(),
        "owner-v",
        false,
        &BTreeMap::new(),
    )
    .await
    .unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let first = tokio::spawn(quorum_worker::run(
        in_process_worker(&fx, "victim", "victim", Some(token)),
        stop.clone(),
    ));
    let enrolled = fx.dir.path().join("victim/enrollments.json");
    for _ in 0..200 {
        if enrolled.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(enrolled.exists(), "victim enrolled");
    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), first).await;

    let stop = tokio_util::sync::CancellationToken::new();
    let impostor = tokio::spawn(quorum_worker::run(
        in_process_worker(&fx, "impostor", "victim", None),
        stop.clone(),
    ));
    let repo = repo_with(&[(".quorum.yml", QUICK)]);
    let build = fx.submit(repo.path()).await;
    let s = fx.wait_refused(&build, "victim", "audience").await;
    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), impostor).await;
    assert_ne!(
        s.state,
        BuildState::Verified,
        "two results cannot verify a quorum of three"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn worker_refuses_local_repositories_unless_its_owner_allows_them() {
    let mut strict = WorkerSpec::new("strict", "owner-s", false);
    strict.allow_local_repositories = false;
    let fx = Fixture::start(
        vec![
            WorkerSpec::new("w1", "o1", false),
            WorkerSpec::new("w2", "o2", false),
            strict,
        ],
        util::LEASE_SECS,
    )
    .await;
    let repo = repo_with(&[(".quorum.yml", QUICK)]);
    let build = fx.submit(repo.path()).await;
    fx.wait_refused(&build, "strict", "allow_local_repositories")
        .await;
    // It ran nothing: no build directory, no mirror of the repository.
    assert!(
        !fx.fed.role_dir("strict").join("git").exists()
            || std::fs::read_dir(fx.fed.role_dir("strict").join("git"))
                .unwrap()
                .next()
                .is_none()
    );
}

/// The newcomer's command, exactly as the README gives it: a whole federation from one command.
#[test]
fn quorum_run_builds_the_examples_and_exits_by_verdict() {
    let out_dir = tempfile::tempdir().unwrap();
    let run = |example: &str| {
        std::process::Command::new(util::exe())
            .args([
                "run",
                util::examples().join(example).to_str().unwrap(),
                "--out",
                out_dir.path().to_str().unwrap(),
                "--timeout",
                "120",
            ])
            .env("RUST_LOG", "warn")
            .output()
            .unwrap()
    };
    let ok = run("reproducible");
    assert_eq!(
        ok.status.code(),
        Some(0),
        "{}\n{}",
        stdout(&ok),
        stderr(&ok)
    );
    let text = stdout(&ok);
    assert!(
        text.contains(": verified") && text.contains("signed: 2 verified artifacts"),
        "{text}"
    );
    let build_dir = std::fs::read_dir(out_dir.path())
        .unwrap()
        .flatten()
        .next()
        .unwrap()
        .path();
    let verify = std::process::Command::new(util::exe())
        .args(["verify", "--statement"])
        .arg(build_dir.join("statement.intoto.json"))
        .arg("--key")
        .arg(build_dir.join("signer.pub"))
        .arg(build_dir.join("build/dist/hello-src.tar.gz"))
        .output()
        .unwrap();
    assert!(verify.status.success(), "{}", stderr(&verify));

    let disputed = run("unreproducible");
    assert_eq!(
        disputed.status.code(),
        Some(1),
        "{}\n{}",
        stdout(&disputed),
        stderr(&disputed)
    );
    let text = stdout(&disputed);
    assert!(
        text.contains(": disputed")
            && text.contains("differing files: dist/stamp.txt")
            && text.contains("nothing was signed"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_step_fails_the_build_when_the_workers_agree_and_logs_are_kept() {
    let fx = Fixture::with_workers(2).await;
    let pipeline = "policy: {quorum: 2}\njobs:\n  build:\n    script: [\"echo compiling\", \"echo oops >&2; exit 3\", \"echo never\"]\n  after:\n    needs: [build]\n    script: [\"true\"]\n";
    let repo = repo_with(&[(".quorum.yml", pipeline)]);
    let build = fx.submit(repo.path()).await;
    let status = fx.wait_final(&build, LIMIT).await;
    assert_eq!(status.state, BuildState::Failed, "{status:#?}");
    let job = &status.jobs[0];
    assert_eq!(job.state, JobState::Failed);
    assert!(
        job.detail.contains("exited with status 3"),
        "{}",
        job.detail
    );
    assert_eq!(status.jobs[1].state, JobState::Skipped);
    let out = fx.cli(&["logs", &build, "build"]);
    let text = stdout(&out);
    assert!(
        text.contains("compiling") && text.contains("oops") && !text.contains("never"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn cancelling_a_build_stops_its_workers_and_frees_them() {
    let fx = Fixture::with_workers(2).await;
    let endless =
        "policy: {quorum: 2}\njobs:\n  build:\n    script: [\"sleep 600\"]\n    timeout: 20m\n";
    let repo = repo_with(&[(".quorum.yml", endless)]);
    let build = fx.submit(repo.path()).await;
    fx.wait_until(&build, LIMIT, "both running", |s| {
        s.jobs[0]
            .assignments
            .iter()
            .filter(|a| a.state == "running")
            .count()
            == 2
    })
    .await;
    let out = fx.cli(&["cancel", &build]);
    assert!(out.status.success(), "{}", stderr(&out));
    let status = fx.wait_final(&build, LIMIT).await;
    assert_eq!(status.state, BuildState::Cancelled);
    assert!(
        status.jobs[0]
            .assignments
            .iter()
            .all(|a| a.state == "cancelled"),
        "{status:#?}"
    );
    let again = fx.cli(&["cancel", &build]);
    assert!(
        !again.status.success() && stderr(&again).contains("already cancelled"),
        "{}",
        stderr(&again)
    );

    // The workers hear of it at their next heartbeat, kill the step and clean up.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    for w in ["w1", "w2"] {
        let builds = fx.fed.role_dir(w).join("builds");
        while std::fs::read_dir(&builds)
            .map(|mut d| d.next().is_some())
            .unwrap_or(false)
        {
            assert!(
                std::time::Instant::now() < deadline,
                "{w} still has a build directory after cancel\n{}",
                fx.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    // The workers let go of the cancelled job: a new build gets both of them promptly.
    let quick = repo_with(&[(
        ".quorum.yml",
        "policy: {quorum: 2}\njobs:\n  build:\n    script: [\"true\"]\n",
    )]);
    let next = fx.submit(quick.path()).await;
    let status = fx.wait_final(&next, Duration::from_secs(60)).await;
    assert_eq!(status.state, BuildState::Verified, "{status:#?}");
}

/// Serves `body` at `/tool.txt` on a loopback port until the returned task is dropped.
async fn serve_input(body: &'static str) -> (String, tokio::task::JoinHandle<()>) {
    let app =
        axum::Router::new().route("/tool.txt", axum::routing::get(move || async move { body }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/tool.txt", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    (url, task)
}

#[tokio::test(flavor = "multi_thread")]
async fn declared_inputs_reach_the_build_and_a_wrong_digest_fails_it_by_name() {
    let body = "input bytes the build has no network to fetch\n";
    let (url, server) = serve_input(body).await;
    let good = quorum_core::Digest::of(body.as_bytes()).hex();
    let wrong = quorum_core::Digest::of(b"something else").hex();
    let pipeline = |digest: &str| {
        format!(
            "policy: {{quorum: 2}}\njobs:\n  build:\n    inputs:\n      - name: tool.txt\n        \
             url: \"{url}\"\n        sha256: \"{digest}\"\n    script: [\"mkdir -p out\", \
             \"cp /inputs/tool.txt out/copy.txt\", \"! touch /inputs/tool.txt 2>/dev/null\"]\n    \
             artifacts: [\"out/*\"]\n"
        )
    };
    let fx = Fixture::with_workers(2).await;

    let repo = repo_with(&[(".quorum.yml", &pipeline(&good))]);
    let build = fx.submit(repo.path()).await;
    let status = fx.wait_final(&build, LIMIT).await;
    assert_eq!(status.state, BuildState::Verified, "{status:#?}");
    let dest = tempfile::tempdir().unwrap();
    let out = fx.cli(&["fetch", &build, "--out", dest.path().to_str().unwrap()]);
    assert!(out.status.success(), "fetch: {}", stderr(&out));
    let copies: Vec<_> = walk(dest.path())
        .into_iter()
        .filter(|p| p.ends_with("out/copy.txt"))
        .collect();
    assert_eq!(copies.len(), 1, "{copies:?}");
    assert_eq!(std::fs::read_to_string(&copies[0]).unwrap(), body);

    let repo = repo_with(&[(".quorum.yml", &pipeline(&wrong))]);
    let build = fx.submit(repo.path()).await;
    let status = fx.wait_final(&build, LIMIT).await;
    assert_eq!(status.state, BuildState::Failed, "{status:#?}");
    let detail = &status.jobs[0].detail;
    assert!(
        detail.contains("input `tool.txt`")
            && detail.contains(&url)
            && detail.contains(&format!("expected sha256:{wrong}"))
            && detail.contains(&format!("got sha256:{good}")),
        "{detail}"
    );
    server.abort();
}

/// A real worker that finishes a job while it has more offers waiting takes the next one with
/// its report, without polling: one worker with two job slots and four independent jobs takes
/// two by polls and the other two as its slots free up.
#[tokio::test(flavor = "multi_thread")]
async fn a_worker_takes_its_next_offer_with_its_report() {
    let fx = Fixture::with_workers(1).await;
    let mut pipeline = String::from("policy: {quorum: 1, trusted: 1}\njobs:\n");
    for j in 0..4 {
        pipeline.push_str(&format!(
            "  j{j}:\n    script: [\"echo {j} > out.txt\"]\n    artifacts: [out.txt]\n"
        ));
    }
    let repo = repo_with(&[(".quorum.yml", &pipeline)]);
    let build = fx.submit(repo.path()).await;
    let status = fx.wait_final(&build, Duration::from_secs(120)).await;
    assert_eq!(
        status.state,
        BuildState::Verified,
        "{status:#?}\n{}",
        fx.logs()
    );
    let metrics = fx.metrics().await;
    let taken = |with: &str| {
        let line = format!("quorum_assignments_taken_total{{with=\"{with}\"}} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(line.as_str()))
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no {line} in {metrics}"))
    };
    assert_eq!(
        (taken("poll"), taken("report")),
        (2, 2),
        "two slots' worth by polls, the rest with reports\n{metrics}"
    );
}
