//! Quorum's worker agent: connects out to the controllers it serves, verifies each job token
//! against the IdPs it trusts, fetches the source, runs the steps in its executor, uploads the
//! outputs the store lacks, and reports a signed result.
//!
//! Layout of `data_dir`: `worker.key` (the worker's Ed25519 key, mode 0600), `enrollments.json`
//! (the worker id each controller gave it), `git/` (repository mirrors) and
//! `builds/<assignment>/{src,tmp}` (one job's tree and temporary files, removed after the report).
//! Nothing a build can see through its environment points into `data_dir` outside its own job.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

mod agent;
pub mod artifacts;
mod enroll;
pub mod executor;
pub mod facts;
pub mod inputs;
mod job;
pub mod ledger;
mod logship;
mod retry;

/// `quorum worker --config worker.toml`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The worker's name; job tokens must name `worker:<name>` as their audience.
    pub name: String,
    pub data_dir: PathBuf,
    pub controllers: Vec<ControllerConfig>,
    /// The IdPs whose job tokens this worker accepts.
    pub trusted_issuers: Vec<quorum_client::trust::TrustedIssuer>,
    /// Jobs run at once.
    #[serde(default = "default_max_jobs")]
    pub max_jobs: u32,
    /// Whether assignments may name repositories on this machine (paths, `file://` URLs). Off by
    /// default: a controller could otherwise have the worker read and upload any repository on
    /// its owner's disk. The local federation (`quorum up`, `quorum run`) turns it on.
    #[serde(default)]
    pub allow_local_repositories: bool,
    /// How builds are isolated: "namespaces" (bubblewrap; the default) or "process".
    #[serde(default)]
    pub sandbox: executor::SandboxTier,
    /// When "namespaces" is configured but the host cannot run it: run builds as plain
    /// processes (with a loud warning) instead of refusing to start.
    #[serde(default)]
    pub allow_weaker_sandbox: bool,
    /// What one build step may use; each limit is off when not set.
    #[serde(default)]
    pub limits: executor::Limits,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControllerConfig {
    pub url: String,
    /// Single-use token from `quorum controller enroll`; needed only until the first enrollment.
    /// Overridden by `QUORUM_ENROLLMENT_TOKEN` when there is one controller.
    #[serde(default)]
    pub enrollment_token: Option<String>,
}

fn default_max_jobs() -> u32 {
    2
}

/// Points where a test double may interfere with a job. The real worker uses none of them.
pub trait Hooks: Send + Sync {
    /// Called after every step succeeded and before the outputs are collected and hashed.
    #[allow(unused_variables)] // the default does nothing; the name documents the argument
    fn after_build(&self, build_dir: &Path) {}
}

struct NoHooks;

impl Hooks for NoHooks {}

/// Runs the worker until `shutdown` is cancelled; running builds are then killed.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    run_with_hooks(config, shutdown, Arc::new(NoHooks)).await
}

/// [`run`], with `hooks` called during each job (for test doubles of misbehaving workers).
pub async fn run_with_hooks(
    config: Config,
    shutdown: CancellationToken,
    hooks: Arc<dyn Hooks>,
) -> anyhow::Result<()> {
    anyhow::ensure!(config.max_jobs >= 1, "max_jobs is 0; set it to at least 1");
    anyhow::ensure!(
        !config.controllers.is_empty(),
        "no controllers configured; add a [[controllers]] entry"
    );
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create data_dir {}", config.data_dir.display()))?;
    let key = quorum_service::load_or_create_key(&config.data_dir.join("worker.key"))?;
    let worker_ids = enroll::ensure(&config, &key).await?;

    // Jobs never survive a restart: whatever a previous run left behind is stale.
    let builds = config.data_dir.join("builds");
    executor::release_stale_mounts(&builds);
    if builds.exists() {
        std::fs::remove_dir_all(&builds)
            .with_context(|| format!("cannot clear {}", builds.display()))?;
    }
    std::fs::create_dir_all(&builds)
        .with_context(|| format!("cannot create {}", builds.display()))?;

    let controllers: Vec<String> = config.controllers.iter().map(|c| c.url.clone()).collect();
    let worker = Arc::new(agent::Worker::new(config, key.clone(), hooks, shutdown)?);
    let mut loops = tokio::task::JoinSet::new();
    for (url, worker_id) in controllers.iter().zip(worker_ids) {
        let client = quorum_client::controller::WorkerClient::new(url, &worker_id, key.clone());
        loops.spawn(agent::serve(worker.clone(), Arc::new(client)));
    }
    tracing::info!(controllers = controllers.len(), "worker started");
    while let Some(joined) = loops.join_next().await {
        joined.context("a controller loop panicked")?;
    }
    worker.jobs.close();
    worker.jobs.wait().await;
    tracing::info!("worker stopped");
    Ok(())
}
