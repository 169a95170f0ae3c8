//! Shared by the controller's tests and its benchmark harness: an IdP, a store and a controller
//! served in this process on 127.0.0.1:0, a database of its own per stack (SQLite in a temporary
//! directory, or a fresh PostgreSQL database), git repositories holding a pipeline, and simulated
//! workers that speak the real worker protocol (enrollment, signed long polls, signed reports).
//!
//! No build code runs here, so the controller's signing key sharing this process is harmless.

#![allow(dead_code)] // each test binary or example uses a different part of it

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use quorum_api::v1::controller::{
    Assignment, BuildStatus, EnrollRequest, EnvironmentFacts, PollRequest, ReportedResult,
    ResultReport, Usage,
};
use quorum_client::controller::WorkerClient;
use quorum_client::user::UserClient;
use quorum_core::{Digest, Manifest, ManifestEntry};
use tokio_util::sync::CancellationToken;

/// The tenant the stack's IdP issues the controller's tokens for.
pub const TENANT: &str = "acme";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// The controller's database for one stack: `url` is `None` for SQLite in the data dir.
/// A PostgreSQL database is created fresh and dropped when this is dropped.
pub struct TestDb {
    pub url: Option<String>,
    _pg: Option<quorum_testkit::PgDatabase>,
}

impl TestDb {
    pub async fn create(backend: Backend) -> TestDb {
        match backend {
            Backend::Sqlite => TestDb {
                url: None,
                _pg: None,
            },
            Backend::Postgres => {
                let pg = quorum_testkit::PgDatabase::create("quorum_ctl").await;
                TestDb {
                    url: Some(pg.url.clone()),
                    _pg: Some(pg),
                }
            }
        }
    }
}

struct Served {
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

/// Stops the role in `slot`, if it runs.
async fn stop(slot: &mut Option<Served>) {
    if let Some(s) = slot.take() {
        s.stop().await;
    }
}

impl Served {
    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("a role stops within 30 s of being cancelled")
            .expect("the role's task does not panic")
            .expect("the role stops cleanly");
    }
}

async fn serve<F, Fut>(listen: &str, run: F) -> (String, Served)
where
    F: FnOnce(tokio::net::TcpListener, CancellationToken) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind(listen).await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(run(listener, shutdown.clone()));
    (url, Served { shutdown, task })
}

/// Serves a role again at `url`, the address it had.
async fn serve_again<F, Fut>(url: &str, run: F) -> Served
where
    F: FnOnce(tokio::net::TcpListener, CancellationToken) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
{
    serve(url.trim_start_matches("http://"), run).await.1
}

/// An IdP, a store and a controller on loopback, each with its own data directory.
pub struct Stack {
    pub db: TestDb,
    pub idp_url: String,
    pub store_url: String,
    pub controller_url: String,
    pub api_token: String,
    pub config: quorum_controller::Config,
    idp: Option<Served>,
    idp_config: quorum_idp::Config,
    store: Option<Served>,
    store_config: quorum_store::Config,
    controller: Option<Served>,
    pub dir: tempfile::TempDir,
}

impl Stack {
    pub async fn start(backend: Backend, lease_secs: u64) -> Stack {
        Stack::start_with(backend, lease_secs, Default::default()).await
    }

    /// A stack whose controller serves a project configured as `project`.
    pub async fn start_with(
        backend: Backend,
        lease_secs: u64,
        project: quorum_controller::ProjectConfig,
    ) -> Stack {
        let dir = tempfile::tempdir().unwrap();
        let db = TestDb::create(backend).await;
        let secret = format!("secret-{}", uuid::Uuid::new_v4().simple());
        let idp_config = quorum_idp::Config {
            listen: "127.0.0.1:0".into(),
            data_dir: dir.path().join("idp"),
            issuer: None,
            max_token_lifetime_secs: 24 * 3600,
            clients: vec![quorum_idp::ClientConfig {
                id: "controller".into(),
                tenant: TENANT.into(),
                secret_hash: quorum_idp::hash_secret(&secret),
            }],
        };
        let (idp_url, idp) = serve("127.0.0.1:0", |l, s| {
            quorum_idp::run(l, idp_config.clone(), s)
        })
        .await;
        let store_config = quorum_store::Config {
            listen: "127.0.0.1:0".into(),
            data_dir: dir.path().join("store"),
            audience: "store:test".into(),
            trusted_issuers: vec![quorum_client::trust::TrustedIssuer::any_tenant(
                idp_url.clone(),
            )],
            ..Default::default()
        };
        let (store_url, store) = serve("127.0.0.1:0", |l, s| {
            quorum_store::run(l, store_config.clone(), s)
        })
        .await;
        let api_token = format!("api-{}", uuid::Uuid::new_v4().simple());
        let config = quorum_controller::Config {
            listen: "127.0.0.1:0".into(),
            data_dir: dir.path().join("controller"),
            database_url: db.url.clone(),
            name: None,
            api_token: Some(api_token.clone()),
            idp: quorum_controller::IdpConfig {
                url: idp_url.clone(),
                client_id: "controller".into(),
                client_secret: Some(secret),
            },
            store: quorum_controller::StoreConfig {
                url: store_url.clone(),
                audience: "store:test".into(),
            },
            lease_secs,
            upload_max_files: 1000,
            upload_max_bytes: 1 << 30,
            project,
        };
        let mut stack = Stack {
            db,
            idp_url,
            store_url,
            controller_url: String::new(),
            api_token,
            config,
            idp: Some(idp),
            idp_config,
            store: Some(store),
            store_config,
            controller: None,
            dir,
        };
        stack.start_controller().await;
        stack
    }

    /// Starts the controller, on the address it had before if it ran already, and waits until
    /// it answers.
    pub async fn start_controller(&mut self) {
        let listen = self
            .controller_url
            .strip_prefix("http://")
            .unwrap_or("127.0.0.1:0")
            .to_string();
        let config = self.config.clone();
        let (url, served) = serve(&listen, |l, s| quorum_controller::run(l, config, s)).await;
        self.controller_url = url;
        self.controller = Some(served);
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let health = http
                .get(format!("{}/healthz", self.controller_url))
                .timeout(Duration::from_secs(5))
                .send()
                .await;
            if health.is_ok_and(|r| r.status().is_success()) {
                return;
            }
            let served = self.controller.as_mut().expect("just started");
            if served.task.is_finished() {
                let result = (&mut served.task).await;
                panic!("the controller stopped at start: {result:?}");
            }
            assert!(Instant::now() < deadline, "the controller did not start");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops the IdP, as an outage would look to the controller (its data and keys stay).
    pub async fn stop_idp(&mut self) {
        stop(&mut self.idp).await
    }

    /// Starts the IdP again on the address it had.
    pub async fn start_idp(&mut self) {
        let config = self.idp_config.clone();
        self.idp = Some(serve_again(&self.idp_url, |l, s| quorum_idp::run(l, config, s)).await);
    }

    /// Stops the store, as an outage would look to the controller (its data stays).
    pub async fn stop_store(&mut self) {
        stop(&mut self.store).await
    }

    /// Starts the store again on the address it had.
    pub async fn start_store(&mut self) {
        let config = self.store_config.clone();
        self.store =
            Some(serve_again(&self.store_url, |l, s| quorum_store::run(l, config, s)).await);
    }

    /// Stops the controller gracefully (its state stays in the database).
    pub async fn stop_controller(&mut self) {
        stop(&mut self.controller).await
    }

    pub async fn stop(mut self) {
        self.stop_controller().await;
        self.stop_store().await;
        self.stop_idp().await;
    }

    /// A connection pool on the controller's database, to check what it stored.
    pub async fn database(&self) -> sqlx::AnyPool {
        sqlx::any::install_default_drivers();
        let url = self.config.database_url.clone().unwrap_or_else(|| {
            format!(
                "sqlite://{}",
                self.config.data_dir.join("controller.db").display()
            )
        });
        sqlx::AnyPool::connect(&url).await.unwrap()
    }

    pub fn user(&self) -> UserClient {
        UserClient::new(&self.controller_url, &self.api_token)
    }

    /// An enrollment token from the operator, as `quorum controller enroll` makes it.
    pub async fn enrollment(
        &self,
        owner: &str,
        trusted: bool,
        labels: &BTreeMap<String, String>,
    ) -> String {
        quorum_controller::create_enrollment(
            &self.config.data_dir,
            self.config.database_url.as_deref(),
            owner,
            trusted,
            labels,
        )
        .await
        .unwrap()
    }

    /// Enrolls a simulated worker of `owner` named `name`.
    pub async fn worker(&self, name: &str, owner: &str, trusted: bool) -> SimWorker {
        let token = self.enrollment(owner, trusted, &BTreeMap::new()).await;
        SimWorker::enroll(&self.controller_url, name, &token).await
    }

    /// Enrolls a simulated worker of `owner` named `name` carrying the operator's `labels`.
    pub async fn labelled_worker(
        &self,
        name: &str,
        owner: &str,
        trusted: bool,
        labels: &[(&str, &str)],
    ) -> SimWorker {
        let labels = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let token = self.enrollment(owner, trusted, &labels).await;
        SimWorker::enroll(&self.controller_url, name, &token).await
    }

    /// Submits a build of a fresh repository whose `.quorum.yml` is `pipeline`.
    pub async fn submit(&self, pipeline: &str) -> String {
        let repo = repo_with_pipeline(&self.dir.path().join("repos"), pipeline);
        self.user()
            .submit(repo.to_str().unwrap(), "HEAD")
            .await
            .unwrap()
            .build_id
    }

    /// Waits (bounded) until `pred` holds for the build.
    pub async fn wait_build(
        &self,
        build: &str,
        what: &str,
        pred: impl Fn(&BuildStatus) -> bool,
    ) -> BuildStatus {
        let user = self.user();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let s = user.status(build).await.unwrap();
            if pred(&s) {
                return s;
            }
            assert!(Instant::now() < deadline, "{what} did not happen: {s:#?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Makes a git repository under `parent` holding `.quorum.yml`, committed once.
pub fn repo_with_pipeline(parent: &Path, pipeline: &str) -> std::path::PathBuf {
    let dir = parent.join(uuid::Uuid::new_v4().simple().to_string());
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(".quorum.yml"), pipeline).unwrap();
    #[allow(clippy::disallowed_methods)] // test fixture: a real git repository to build
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(
            "git init -q -b main && git add -A && \
             git -c user.name=t -c user.email=t@example.invalid commit -qm pipeline",
        )
        .current_dir(&dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "git: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    dir
}

/// A worker without an executor: it takes assignments through the real protocol and reports
/// whatever result the test tells it to, signed with its own enrolled key.
pub struct SimWorker {
    pub name: String,
    pub client: WorkerClient,
    /// The key it enrolled with, for tests that sign requests by hand.
    pub key: ed25519_dalek::SigningKey,
}

impl SimWorker {
    pub async fn enroll(controller_url: &str, name: &str, token: &str) -> SimWorker {
        use base64::Engine as _;
        use rand::RngCore as _;
        let mut seed = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut seed);
        let key = ed25519_dalek::SigningKey::from_bytes(&seed);
        WorkerClient::enroll(
            controller_url,
            &EnrollRequest {
                enrollment_token: token.into(),
                name: name.into(),
                public_key: base64::engine::general_purpose::STANDARD
                    .encode(key.verifying_key().as_bytes()),
            },
        )
        .await
        .unwrap();
        SimWorker {
            name: name.into(),
            client: WorkerClient::new(controller_url, name, key.clone()),
            key,
        }
    }

    /// Long-polls once for up to `wait_ms`.
    pub async fn poll(&self, wait_ms: u64) -> Option<Assignment> {
        self.client
            .poll(&PollRequest {
                wait_ms,
                capacity: 1,
            })
            .await
            .unwrap()
    }

    /// Polls until an assignment comes (bounded).
    pub async fn take(&self) -> Assignment {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(a) = self.poll(1000).await {
                return a;
            }
            assert!(
                Instant::now() < deadline,
                "{} was offered nothing",
                self.name
            );
        }
    }

    pub fn report(&self, a: &Assignment, result: ReportedResult, usage: Usage) -> ResultReport {
        ResultReport {
            assignment: a.id.clone(),
            build_id: a.build_id.clone(),
            job: a.job.clone(),
            worker: self.name.clone(),
            result,
            usage,
            environment: EnvironmentFacts::default(),
        }
    }

    /// Reports success with one output file holding `content`.
    pub async fn succeed(&self, a: &Assignment, content: &[u8], usage: Usage) {
        let report = self.report(a, success(content), usage);
        self.client
            .result(&a.id, &self.client.sign_report(&report))
            .await
            .unwrap();
    }

    /// Like [`SimWorker::succeed`], taking the worker's next waiting offer with the report
    /// (`?take=1`), as a worker with a slot free again does.
    pub async fn succeed_and_take(
        &self,
        a: &Assignment,
        content: &[u8],
        usage: Usage,
    ) -> Option<Assignment> {
        let report = self.report(a, success(content), usage);
        self.client
            .result_and_take(&a.id, &self.client.sign_report(&report))
            .await
            .unwrap()
    }

    /// Uploads `content` as the assignment's `out.txt` to the store and records the manifest,
    /// with the upload token the controller handed over, as a worker does before it reports.
    pub async fn upload(&self, a: &Assignment, content: &[u8]) {
        let store = quorum_client::store::StoreClient::new(&a.store_url);
        store
            .put_blob(&a.upload_token, &Digest::of(content), content.to_vec())
            .await
            .unwrap();
        let ReportedResult::Success { manifest, .. } = success(content) else {
            unreachable!("success() is a success")
        };
        store
            .put_manifest(&a.upload_token, &manifest)
            .await
            .unwrap();
    }

    pub async fn fail(&self, a: &Assignment, reason: &str) {
        let report = self.report(
            a,
            ReportedResult::Failed {
                reason: reason.into(),
            },
            Usage::default(),
        );
        self.client
            .result(&a.id, &self.client.sign_report(&report))
            .await
            .unwrap();
    }
}

/// A successful result whose only output, `out.txt`, holds `content`.
pub fn success(content: &[u8]) -> ReportedResult {
    let manifest = Manifest::new(vec![ManifestEntry {
        path: "out.txt".into(),
        mode: 0o644,
        size: content.len() as u64,
        digest: Digest::of(content),
    }])
    .unwrap();
    ReportedResult::Success {
        manifest_digest: manifest.digest(),
        manifest,
    }
}

impl SimWorker {
    /// Uploads `files` (path, contents) to the store with the assignment's upload token, records
    /// their manifest there, and reports success with it: a result whose files the controller
    /// can fetch back (to explain a dispute, say).
    pub async fn succeed_with_files(&self, a: &Assignment, files: &[(&str, &[u8])]) {
        let store = quorum_client::store::StoreClient::new(&a.store_url);
        let mut entries = Vec::new();
        for (path, content) in files {
            let digest = Digest::of(content);
            store
                .put_blob(&a.upload_token, &digest, content.to_vec())
                .await
                .unwrap();
            entries.push(ManifestEntry {
                path: path.to_string(),
                mode: 0o644,
                size: content.len() as u64,
                digest,
            });
        }
        let manifest = Manifest::new(entries).unwrap();
        store
            .put_manifest(&a.upload_token, &manifest)
            .await
            .unwrap();
        let result = ReportedResult::Success {
            manifest_digest: manifest.digest(),
            manifest,
        };
        let report = self.report(a, result, Usage::default());
        self.client
            .result(&a.id, &self.client.sign_report(&report))
            .await
            .unwrap();
    }
}
