//! Quorum's artifact store: content-addressed blobs hashed while they arrive and kept only when
//! the digest matches, per-tenant visibility, manifests recorded under the scope of an upload
//! token, and downloads with a read token. Every token's constraints (source addresses, calls,
//! files, bytes) are enforced here with durable per-`jti` counters, and tokens can be revoked.

mod api;
mod auth;
mod blobs;
mod db;
mod error;
mod usage;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use quorum_client::trust::TrustedIssuers;
use serde::{Deserialize, Serialize};
use sqlx::SqlitePool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::blobs::{BlobBackend, LocalDir};

/// `quorum store --config store.toml`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default = "default_listen")]
    pub listen: String,
    pub data_dir: PathBuf,
    /// The audience tokens must name to be accepted here, such as `store:bettina`.
    pub audience: String,
    /// The IdPs whose tokens this store accepts.
    pub trusted_issuers: Vec<quorum_client::trust::TrustedIssuer>,
    /// Largest blob accepted, in bytes.
    #[serde(default = "default_max_blob_bytes")]
    pub max_blob_bytes: u64,
}

/// The default of [`Config::max_blob_bytes`]: 4 GiB.
pub const DEFAULT_MAX_BLOB_BYTES: u64 = 4 << 30;

fn default_max_blob_bytes() -> u64 {
    DEFAULT_MAX_BLOB_BYTES
}

/// A config `run` would refuse.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("audience must not be empty")]
    Audience,
    #[error("trusted_issuers is empty; no token could ever be accepted")]
    NoIssuers,
    #[error("max_blob_bytes must be positive")]
    MaxBlobBytes,
}

impl Config {
    /// Everything `run` would refuse in this config, checked without starting anything (for
    /// `check-config`).
    pub fn check(&self) -> Result<(), ConfigError> {
        if self.audience.is_empty() {
            return Err(ConfigError::Audience);
        }
        if self.trusted_issuers.is_empty() {
            return Err(ConfigError::NoIssuers);
        }
        if self.max_blob_bytes == 0 {
            return Err(ConfigError::MaxBlobBytes);
        }
        Ok(())
    }
}

fn default_listen() -> String {
    "127.0.0.1:8102".into()
}

/// What every handler shares.
struct Store {
    db: SqlitePool,
    blobs: Box<dyn BlobBackend>,
    trust: TrustedIssuers,
    audience: String,
    max_blob_bytes: u64,
}

/// Serves the store on `listener` until `shutdown` is cancelled. Metadata lives in
/// `data_dir/store.db`, blobs under `data_dir/blobs`, uploads in progress under `data_dir/tmp`.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let addr = listener
        .local_addr()
        .context("cannot read the listener's address")?;
    config.check()?;
    let data = &config.data_dir;
    std::fs::create_dir_all(data)
        .with_context(|| format!("cannot create data_dir {}", data.display()))?;
    let blobs = LocalDir::open(data.join("blobs"), data.join("tmp"))
        .with_context(|| format!("cannot prepare the blob directories in {}", data.display()))?;
    let db_path = data.join("store.db");
    let db = db::open(&db_path)
        .await
        .with_context(|| format!("cannot open database {}", db_path.display()))?;
    // Expired tokens are refused on `exp` alone; their counters are no longer needed.
    let pruned = usage::prune(
        &db,
        quorum_service::now_unix() - 2 * quorum_token::LEEWAY_SECS as i64,
    )
    .await
    .context("cannot prune expired token counters")?;
    tracing::debug!(pruned, "pruned expired token counters");
    let issuers: Vec<&str> = config
        .trusted_issuers
        .iter()
        .map(|i| i.issuer.as_str())
        .collect();
    tracing::info!(%addr, audience = %config.audience, ?issuers, "artifact store listening");
    let store = Arc::new(Store {
        db: db.clone(),
        blobs: Box::new(blobs),
        trust: TrustedIssuers::new(config.trusted_issuers),
        audience: config.audience,
        max_blob_bytes: config.max_blob_bytes,
    });
    let served = quorum_service::serve(listener, api::router(store), shutdown).await;
    db.close().await;
    served
}
