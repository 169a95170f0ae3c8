//! Test helpers: git repositories made on the fly, a federation of real role processes in a
//! temporary directory, and the `quorum` CLI as a user runs it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use quorum::federation::{Federation, Spec, WorkerSpec};
use quorum_api::v1::controller::BuildStatus;

/// Leases in the tests: short, so lost workers are noticed quickly, yet long enough for a
/// loaded two-core machine to heartbeat in time.
pub const LEASE_SECS: u64 = 5;

pub fn exe() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_quorum"))
}

pub fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples")
}

fn sh(dir: &Path, script: &str) {
    let out = Command::new("sh")
        .arg("-c")
        .arg(script)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A git repository holding `files`, committed once.
pub fn repo_with(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (path, text) in files {
        let p = dir.path().join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }
    commit_all(dir.path());
    dir
}

/// A git repository holding a copy of `examples/<name>`.
pub fn example_repo(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let src = examples().join(name);
    sh(dir.path(), &format!("cp -a {}/. .", src.display()));
    sh(dir.path(), "rm -rf dist");
    commit_all(dir.path());
    dir
}

fn commit_all(dir: &Path) {
    sh(
        dir,
        "git init -q -b main && git add -A && git -c user.name=t -c user.email=t@example.invalid commit -qm test",
    );
}

/// Where a fixture's controller keeps its state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Db {
    Sqlite,
    Postgres,
}

pub struct Fixture {
    // Field order matters: the federation stops before its database is dropped and its
    // directory removed.
    pub fed: Federation,
    /// Held so the database outlives the federation, then is dropped.
    _db: Option<quorum_testkit::PgDatabase>,
    pub dir: tempfile::TempDir,
}

impl Fixture {
    pub async fn start(workers: Vec<WorkerSpec>, lease_secs: u64) -> Fixture {
        Fixture::start_on(Db::Sqlite, workers, lease_secs).await
    }

    pub async fn start_on(db: Db, workers: Vec<WorkerSpec>, lease_secs: u64) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let db = match db {
            Db::Sqlite => None,
            Db::Postgres => Some(quorum_testkit::PgDatabase::create("quorum_e2e").await),
        };
        let mut spec = Spec::local(dir.path(), &exe(), 0);
        spec.workers = workers;
        spec.lease_secs = lease_secs;
        spec.log_filter = "info,sqlx=warn".into();
        spec.database_url = db.as_ref().map(|d| d.url.clone());
        let fed = Federation::start(spec).await.unwrap();
        Fixture { fed, _db: db, dir }
    }

    pub async fn with_workers(n: usize) -> Fixture {
        Fixture::with_workers_on(Db::Sqlite, n).await
    }

    pub async fn with_workers_on(db: Db, n: usize) -> Fixture {
        Fixture::start_on(
            db,
            (1..=n)
                .map(|i| WorkerSpec::new(&format!("w{i}"), &format!("owner{i}"), i == 1))
                .collect(),
            LEASE_SECS,
        )
        .await
    }

    /// The controller's Prometheus metrics, as text.
    pub async fn metrics(&self) -> String {
        reqwest::get(format!("{}/metrics", self.fed.controller_url))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// Runs the CLI against this federation's controller.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(exe())
            .args(args)
            .env("QUORUM_CONTROLLER", &self.fed.controller_url)
            .env("QUORUM_API_TOKEN", &self.fed.api_token)
            .env("RUST_LOG", "warn")
            .output()
            .unwrap()
    }

    pub async fn submit(&self, repo: &Path) -> String {
        let created = self
            .fed
            .user_client()
            .submit(repo.to_str().unwrap(), "HEAD")
            .await
            .unwrap();
        created.build_id
    }

    /// Waits (bounded) for the build to reach a final state.
    pub async fn wait_final(&self, build: &str, limit: Duration) -> BuildStatus {
        let c = self.fed.user_client();
        let start = Instant::now();
        loop {
            let s = c.status(build).await.unwrap();
            if s.state.is_final() {
                return s;
            }
            assert!(
                start.elapsed() < limit,
                "build did not finish in {limit:?}: {s:#?}\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits (bounded) until `pred` holds for the build's status.
    pub async fn wait_until(
        &self,
        build: &str,
        limit: Duration,
        what: &str,
        pred: impl Fn(&BuildStatus) -> bool,
    ) -> BuildStatus {
        let c = self.fed.user_client();
        let start = Instant::now();
        loop {
            let s = c.status(build).await.unwrap();
            if pred(&s) {
                return s;
            }
            assert!(
                start.elapsed() < limit,
                "{what} did not happen in {limit:?}: {s:#?}\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits (bounded) until `worker` has refused its assignment of the build's first job, and
    /// checks that the reason it gave mentions `reason`.
    pub async fn wait_refused(&self, build: &str, worker: &str, reason: &str) -> BuildStatus {
        let what = format!("{worker} refusing");
        let s = self
            .wait_until(build, Duration::from_secs(120), &what, |s| {
                s.jobs[0]
                    .assignments
                    .iter()
                    .any(|a| a.worker == worker && a.state == "refused")
            })
            .await;
        let refused = s.jobs[0]
            .assignments
            .iter()
            .find(|a| a.worker == worker && a.state == "refused")
            .unwrap();
        assert!(
            refused
                .detail
                .as_deref()
                .unwrap_or_default()
                .contains(reason),
            "{refused:?}"
        );
        s
    }

    /// Every role's log, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for entry in std::fs::read_dir(self.dir.path()).unwrap().flatten() {
            let p = entry.path();
            if p.extension().is_some_and(|e| e == "log") {
                out.push_str(&format!(
                    "--- {} ---\n{}\n",
                    p.display(),
                    quorum::federation::tail(&p)
                ));
            }
        }
        out
    }
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}
