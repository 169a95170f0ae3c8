//! Quorum's controller: reads pipelines from git, keeps builds in its database, assigns jobs to
//! workers of distinct owners, collects signed results, computes verdicts and has the signer
//! sign what the quorum agrees on.
//!
//! The scheduler task is the only writer of job and build states and the only creator of
//! assignments; request handlers only move assignments along (taken, refused, reported) and wake
//! it. That keeps every decision in one place and makes it safe to re-run after a restart.

mod ahead;
mod api;
mod auth;
mod background;
mod commits;
mod db;
mod diff;
mod failpoint;
mod logs;
mod offers;
mod provisional;
mod publisher;
mod rebuild;
mod review;
mod revoker;
mod scheduler;
mod spot;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use quorum_client::idp::IdpClient;
use quorum_signer::Signer;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

pub use diff::DisputesConfig;

/// `quorum controller --config controller.toml`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default = "default_listen")]
    pub listen: String,
    pub data_dir: PathBuf,
    /// `postgres://user:password@host/db` to keep the controller's state in PostgreSQL; without
    /// it, SQLite in `data_dir`. Overridden by `QUORUM_DATABASE_URL` (it may hold a password).
    #[serde(default)]
    pub database_url: Option<String>,
    /// This controller's identity in provenance and tokens; defaults to `http://<bound address>`.
    #[serde(default)]
    pub name: Option<String>,
    /// Bearer token for the user API. Overridden by `QUORUM_API_TOKEN`.
    #[serde(default)]
    pub api_token: Option<String>,
    pub idp: IdpConfig,
    pub store: StoreConfig,
    /// A worker that does not heartbeat for this long loses its assignment.
    #[serde(default = "default_lease")]
    pub lease_secs: u64,
    /// Most files one assignment may upload to the store (enforced by the store per token).
    #[serde(default = "default_upload_max_files")]
    pub upload_max_files: u64,
    /// Most bytes one assignment may upload to the store.
    #[serde(default = "default_upload_max_bytes")]
    pub upload_max_bytes: u64,
    /// What the project this controller builds for asks of it.
    #[serde(default)]
    pub project: ProjectConfig,
}

/// `[project]`: the project's choices about what the controller publishes.
#[derive(Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProjectConfig {
    /// Make each verified build public at the store (its files, blobs and signed statement
    /// readable without a token) when the controller pushes the statement there.
    #[serde(default)]
    pub public: bool,
    /// Literal strings redacted from every build log (at least 8 bytes each). Never printed
    /// back.
    #[serde(default)]
    pub redact: Vec<String>,
    /// How disputes are explained (diffoscope in a sandbox, or the built-in diff).
    #[serde(default)]
    pub disputes: DisputesConfig,
}

impl std::fmt::Debug for ProjectConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProjectConfig")
            .field("public", &self.public)
            .field("redact", &format_args!("[{} strings]", self.redact.len()))
            .field("disputes", &self.disputes)
            .finish()
    }
}

impl Config {
    /// The PostgreSQL URL to use, if any: `QUORUM_DATABASE_URL`, else `database_url`.
    pub fn database_url(&self) -> Option<String> {
        std::env::var("QUORUM_DATABASE_URL")
            .ok()
            .filter(|u| !u.is_empty())
            .or_else(|| self.database_url.clone())
    }
}

fn default_upload_max_files() -> u64 {
    100_000
}

fn default_upload_max_bytes() -> u64 {
    16 << 30
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdpConfig {
    pub url: String,
    pub client_id: String,
    /// Overridden by `QUORUM_IDP_CLIENT_SECRET`.
    #[serde(default)]
    pub client_secret: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    pub url: String,
    /// The audience the store accepts, such as `store:bettina`.
    pub audience: String,
}

fn default_listen() -> String {
    "127.0.0.1:8100".into()
}

fn default_lease() -> u64 {
    30
}

/// Shared by the handlers and the scheduler.
pub(crate) struct State {
    pub pool: db::Pool,
    pub name: String,
    pub api_token: String,
    pub store_url: String,
    pub store_audience: String,
    pub lease_secs: u64,
    /// The constraints put on every upload token.
    pub upload_limits: quorum_api::v1::idp::TokenConstraints,
    pub idp: IdpClient,
    pub access: tokio::sync::Mutex<Option<(String, i64)>>,
    /// Access tokens this process fetched from its IdP (`renew_access`).
    pub access_tokens_fetched: std::sync::atomic::AtomicU64,
    /// Offers taken by a poll, and handed over with a report (`?take=1`).
    pub taken_with_poll: std::sync::atomic::AtomicU64,
    pub taken_with_report: std::sync::atomic::AtomicU64,
    pub signer: Signer,
    pub mirrors: quorum_git::Mirrors,
    pub project: ProjectConfig,
    /// Where the fault tests arm failpoints (`failpoint.rs`; debug builds only).
    #[cfg(debug_assertions)]
    pub failpoints: PathBuf,
    /// One writer at a time on SQLite (`db::WriteGate`).
    pub write_gate: Arc<db::WriteGate>,
    /// Claims and reports, committed together on SQLite (`commits.rs`).
    pub commits: commits::Commits,
    /// The parsed job specs of each running build, by build id: specs never change, so the
    /// scheduler parses them once per build instead of once per pass. Only a cache: a
    /// restarted controller reads them again.
    pub specs: std::sync::Mutex<HashMap<String, Arc<scheduler::BuildSpecs>>>,
    /// Wakes the scheduler, for a full pass or for the jobs named (`scheduler::Wake`).
    pub wake: scheduler::Wake,
    /// The enrolled workers authenticated so far (`auth::Workers`).
    pub workers: auth::Workers,
    /// The nonces of workers' requests taken within the clock-skew window (`auth.rs`).
    pub nonces: auth::Nonces,
    /// The offers made to each worker, and running builds' sources (`offers.rs`).
    pub offers: offers::Offers,
    /// Take-up tokens minted before the offers are taken (`ahead.rs`).
    pub ahead: ahead::Ahead,
    /// Wakes a worker's pending long poll when the scheduler offers it work.
    pub worker_wake: std::sync::Mutex<HashMap<String, Arc<Notify>>>,
}

impl State {
    pub fn worker_notify(&self, worker: &str) -> Arc<Notify> {
        self.worker_wake
            .lock()
            .expect("worker notify map")
            .entry(worker.to_string())
            .or_default()
            .clone()
    }

    /// The controller's own access token from its IdP. [`renew_access`] keeps a fresh one
    /// here; this fetches one itself only if that has not (the IdP was unreachable), or if it
    /// has less than a minute left.
    pub async fn access_token(&self) -> anyhow::Result<String> {
        let mut cached = self.access.lock().await;
        let now = quorum_service::now_unix();
        if let Some((token, exp)) = cached.as_ref()
            && *exp - now > 60
        {
            return Ok(token.clone());
        }
        let (token, lifetime) = self.fetch_access_token().await?;
        *cached = Some((token.clone(), now + lifetime));
        Ok(token)
    }

    /// A new access token from the IdP, and its lifetime in seconds.
    async fn fetch_access_token(&self) -> anyhow::Result<(String, i64)> {
        let resp = self
            .idp
            .access_token()
            .await
            .context("cannot get an access token from the IdP")?;
        self.access_tokens_fetched
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok((resp.access_token, resp.expires_in))
    }
}

/// Fetches the controller's access token at start and again when a quarter of its lifetime is
/// left, so that no take-up waits for one: the IdP checks the controller's secret against a
/// deliberately slow hash (Argon2), and the first take-ups after a start spent about 70 ms
/// waiting for it, as did the one that found the token about to expire, with every take-up
/// behind it. The old token serves while the new one is fetched.
async fn renew_access(state: Arc<State>, shutdown: CancellationToken) {
    let mut failures = 0;
    loop {
        let wait = match state.fetch_access_token().await {
            Ok((token, lifetime)) => {
                let now = quorum_service::now_unix();
                *state.access.lock().await = Some((token, now + lifetime));
                failures = 0;
                std::time::Duration::from_secs((lifetime.max(4) * 3 / 4) as u64)
            }
            Err(e) => {
                let wait =
                    std::time::Duration::from_secs(background::backoff_secs(failures) as u64);
                failures += 1;
                tracing::warn!(error = %format!("{e:#}"), retry_in = ?wait, "cannot renew the controller's access token");
                wait
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// Runs the controller on `listener` until `shutdown` is cancelled.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let addr = listener.local_addr()?;
    let name = config
        .name
        .clone()
        .unwrap_or_else(|| format!("http://{addr}"));
    let api_token = std::env::var("QUORUM_API_TOKEN")
        .ok()
        .or(config.api_token.clone())
        .filter(|t| !t.is_empty())
        .context("no API token: set `api_token` in the config or QUORUM_API_TOKEN")?;
    let secret = std::env::var("QUORUM_IDP_CLIENT_SECRET")
        .ok()
        .or(config.idp.client_secret.clone())
        .context("no IdP client secret: set `idp.client_secret` in the config or QUORUM_IDP_CLIENT_SECRET")?;
    logs::check_redact_list(&config.project.redact)?;
    let pool = db::open(&config.data_dir, config.database_url().as_deref()).await?;
    let signer = Signer::load_or_create(&config.data_dir.join("signer.key"))?;
    let write_gate = Arc::new(db::WriteGate::new(&pool));
    let commits = commits::Commits::start(&pool, write_gate.clone());
    let state = Arc::new(State {
        pool,
        name,
        api_token,
        store_url: config.store.url.trim_end_matches('/').to_string(),
        store_audience: config.store.audience.clone(),
        lease_secs: config.lease_secs.max(1),
        upload_limits: quorum_api::v1::idp::TokenConstraints {
            max_files: Some(config.upload_max_files),
            max_bytes: Some(config.upload_max_bytes),
            // One `missing` call per 10 000 files, one call per blob, the manifest, and slack.
            max_calls: Some(config.upload_max_files + config.upload_max_files / 10_000 + 16),
            source_cidrs: None,
        },
        idp: IdpClient::new(&config.idp.url, &config.idp.client_id, &secret),
        access: tokio::sync::Mutex::new(None),
        access_tokens_fetched: std::sync::atomic::AtomicU64::new(0),
        taken_with_poll: std::sync::atomic::AtomicU64::new(0),
        taken_with_report: std::sync::atomic::AtomicU64::new(0),
        signer,
        mirrors: quorum_git::Mirrors::new(config.data_dir.join("git")),
        project: config.project.clone(),
        #[cfg(debug_assertions)]
        failpoints: config.data_dir.join("failpoints"),
        write_gate,
        commits,
        specs: std::sync::Mutex::default(),
        workers: auth::Workers::default(),
        nonces: auth::Nonces::default(),
        wake: scheduler::Wake::default(),
        worker_wake: std::sync::Mutex::default(),
        offers: offers::Offers::default(),
        ahead: ahead::Ahead::default(),
    });
    scheduler::resume_after_restart(&state).await?;
    tracing::info!(%addr, controller = %state.name, signer_key = %state.signer.key_id(), "controller listening");
    let sched = tokio::spawn(scheduler::run(state.clone(), shutdown.clone()));
    let revoker = tokio::spawn(revoker::run(state.clone(), shutdown.clone()));
    let publisher = tokio::spawn(publisher::run(state.clone(), shutdown.clone()));
    let explainer = tokio::spawn(diff::run(state.clone(), shutdown.clone()));
    let minter = tokio::spawn(ahead::run(state.clone(), shutdown.clone()));
    let renewer = tokio::spawn(renew_access(state.clone(), shutdown.clone()));
    let result =
        quorum_service::serve(listener, api::router(state.clone()), shutdown.clone()).await;
    shutdown.cancel();
    let _ = sched.await;
    let _ = revoker.await;
    let _ = publisher.await;
    let _ = explainer.await;
    let _ = minter.await;
    let _ = renewer.await;
    result
}

/// Creates a single-use enrollment token for a worker of `owner` (the operator's statement of
/// who runs it, whether it is trusted, and its labels). Works on the database directly (the
/// data dir's SQLite file, or `database_url`), so the controller need not be running.
pub async fn create_enrollment(
    data_dir: &std::path::Path,
    database_url: Option<&str>,
    owner: &str,
    trusted: bool,
    labels: &BTreeMap<String, String>,
) -> anyhow::Result<String> {
    use base64::Engine as _;
    use rand::RngCore as _;
    anyhow::ensure!(!owner.trim().is_empty(), "the owner name must not be empty");
    let pool = db::open(data_dir, database_url).await?;
    let mut raw = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut raw);
    let token = format!(
        "qe_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
    );
    sqlx::query("INSERT INTO enrollments (token_hash, owner, trusted, labels, created_at) VALUES ($1, $2, $3, $4, $5)")
        .bind(quorum_core::Digest::of(token.as_bytes()).to_string())
        .bind(owner)
        .bind(trusted as i64)
        .bind(serde_json::to_string(labels)?)
        .bind(quorum_service::now_unix())
        .execute(&pool)
        .await?;
    pool.close().await;
    Ok(token)
}

/// The signer's public key for this data dir, creating the key if needed (for `up` to print).
pub fn signer_public_key(
    data_dir: &std::path::Path,
) -> anyhow::Result<ed25519_dalek::VerifyingKey> {
    Ok(Signer::load_or_create(&data_dir.join("signer.key"))?.public_key())
}

/// The signer's key ring of this data dir, for `quorum controller signer rotate|list|revoke`
/// (works whether or not the controller runs: it reads the ring at every signature).
pub fn signer_key_ring(data_dir: &std::path::Path) -> quorum_signer::KeyRing {
    quorum_signer::KeyRing::new(&data_dir.join("signer.key"))
}

pub(crate) fn rfc3339(t: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(t)
        .ok()
        .and_then(|d| {
            d.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}
