//! Quorum's artifact store: content-addressed blobs hashed while they arrive and kept only when
//! the digest matches, per-tenant visibility, manifests recorded under the scope of an upload
//! token, and downloads with a read token. Every token's constraints (source addresses, calls,
//! files, bytes) are enforced here with durable per-`jti` counters, and tokens can be revoked.

mod api;
mod auth;
mod blobs;
mod db;
mod delta;
mod error;
mod gc;
mod ingest;
mod usage;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use quorum_client::trust::TrustedIssuers;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::blobs::{BlobBackend, LocalDir, S3};
pub use crate::blobs::{BlobsConfig, S3Config};
use crate::db::Db;
pub use crate::db::Usage;
pub use crate::gc::Collected;

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
    /// Where metadata lives: `postgres://...`, or SQLite in `data_dir/store.db` when absent.
    #[serde(default)]
    pub database_url: Option<String>,
    /// Where blob bytes live: `data_dir/blobs` unless `[blobs] kind = "s3"`.
    #[serde(default)]
    pub blobs: BlobsConfig,
    /// Bytes each tenant may store.
    #[serde(default)]
    pub quota: QuotaConfig,
    /// What garbage collection keeps, and how often the store runs it.
    #[serde(default)]
    pub gc: GcConfig,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            listen: default_listen(),
            data_dir: PathBuf::new(),
            audience: String::new(),
            trusted_issuers: Vec::new(),
            max_blob_bytes: DEFAULT_MAX_BLOB_BYTES,
            database_url: None,
            blobs: BlobsConfig::default(),
            quota: QuotaConfig::default(),
            gc: GcConfig::default(),
        }
    }
}

/// Per-tenant limits on bytes stored (a blob two tenants uploaded counts for each).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct QuotaConfig {
    /// The limit of every tenant not listed in `tenants`; none when absent.
    #[serde(default)]
    pub default_bytes: Option<u64>,
    /// Limits of particular tenants.
    #[serde(default)]
    pub tenants: BTreeMap<String, u64>,
}

impl QuotaConfig {
    pub fn limit(&self, tenant: &str) -> Option<u64> {
        self.tenants.get(tenant).copied().or(self.default_bytes)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct GcConfig {
    /// How long an uploaded blob stays without a manifest naming it (a provisional upload), and
    /// how long a blob reported present by `missing` stays for the manifest to come.
    #[serde(default = "default_provisional_secs")]
    pub provisional_secs: u64,
    /// Manifests older than this are dropped, unless their build is public; kept forever when
    /// absent.
    #[serde(default)]
    pub retention_secs: Option<u64>,
    /// Run garbage collection this often; only on `quorum store gc` when absent.
    #[serde(default)]
    pub interval_secs: Option<u64>,
    /// Cache mode: uploads no manifest names stay past `provisional_secs`, still usable by the
    /// tenants that uploaded them, as long as the store holds at most this many bytes; when it
    /// holds more, the least recently used go first (an upload or a `missing` answer is a use).
    #[serde(default)]
    pub cache_bytes: Option<u64>,
}

impl Default for GcConfig {
    fn default() -> GcConfig {
        GcConfig {
            provisional_secs: default_provisional_secs(),
            retention_secs: None,
            interval_secs: None,
            cache_bytes: None,
        }
    }
}

fn default_provisional_secs() -> u64 {
    24 * 3600
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
    #[error("database_url must start with postgres:// or postgresql:// (leave it out for SQLite)")]
    DatabaseUrl,
    #[error("blobs.bucket must not be empty")]
    Bucket,
    #[error("gc.interval_secs must be positive")]
    GcInterval,
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
        if let Some(url) = &self.database_url
            && !(url.starts_with("postgres://") || url.starts_with("postgresql://"))
        {
            return Err(ConfigError::DatabaseUrl);
        }
        if let BlobsConfig::S3(s3) = &self.blobs
            && s3.bucket.is_empty()
        {
            return Err(ConfigError::Bucket);
        }
        if self.gc.interval_secs == Some(0) {
            return Err(ConfigError::GcInterval);
        }
        Ok(())
    }
}

fn default_listen() -> String {
    "127.0.0.1:8102".into()
}

/// What every handler shares.
struct Store {
    db: Db,
    blobs: Box<dyn BlobBackend>,
    trust: TrustedIssuers,
    audience: String,
    max_blob_bytes: u64,
    quota: QuotaConfig,
    /// The manifest recorded last, parsed (`api::post_manifest`).
    last_recorded: api::LastRecorded,
}

/// The metadata database and the blob backend of `config`. Only the serving process (`serving`)
/// may clean the local directory's unfinished uploads.
async fn open_storage(
    config: &Config,
    serving: bool,
) -> anyhow::Result<(Db, Box<dyn BlobBackend>)> {
    let data = &config.data_dir;
    std::fs::create_dir_all(data)
        .with_context(|| format!("cannot create data_dir {}", data.display()))?;
    let blobs: Box<dyn BlobBackend> = match &config.blobs {
        BlobsConfig::Local => Box::new(
            LocalDir::open(data.join("blobs"), data.join("tmp"), serving).with_context(|| {
                format!("cannot prepare the blob directories in {}", data.display())
            })?,
        ),
        BlobsConfig::S3(s3) => Box::new(
            S3::open(s3).with_context(|| format!("cannot configure S3 bucket `{}`", s3.bucket))?,
        ),
    };
    let db = match &config.database_url {
        Some(url) => Db::open_postgres(url)
            .await
            .context("cannot open the PostgreSQL database of database_url")?,
        None => {
            let path = data.join("store.db");
            Db::open_sqlite(&path)
                .await
                .with_context(|| format!("cannot open database {}", path.display()))?
        }
    };
    Ok((db, blobs))
}

/// Serves the store on `listener` until `shutdown` is cancelled. Metadata lives in
/// `data_dir/store.db` (or PostgreSQL), blobs under `data_dir/blobs` (or S3), uploads in progress
/// in unnamed files beside them (or, where the file system makes none, under `data_dir/tmp`).
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let addr = listener
        .local_addr()
        .context("cannot read the listener's address")?;
    config.check()?;
    let (db, blobs) = open_storage(&config, true).await?;
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
        blobs,
        trust: TrustedIssuers::new(config.trusted_issuers),
        audience: config.audience,
        max_blob_bytes: config.max_blob_bytes,
        quota: config.quota,
        last_recorded: Default::default(),
    });
    let collector = config.gc.interval_secs.map(|secs| {
        let store = store.clone();
        let gc = config.gc.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(secs));
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tick.tick() => {}
                }
                match gc::collect(&store.db, store.blobs.as_ref(), &gc).await {
                    Ok(c) => tracing::info!(?c, "garbage collected"),
                    Err(e) => tracing::warn!(error = %e, "garbage collection failed"),
                }
            }
        })
    });
    let served = quorum_service::serve(listener, api::router(store), shutdown).await;
    if let Some(collector) = collector {
        let _ = collector.await;
    }
    db.close().await;
    served
}

/// One garbage collection pass over the store of `config` (`quorum store gc`); safe while the
/// store serves, since both sides serialize on the metadata database.
pub async fn collect_garbage(config: &Config) -> anyhow::Result<Collected> {
    config.check()?;
    let (db, blobs) = open_storage(config, false).await?;
    let collected = gc::collect(&db, blobs.as_ref(), &config.gc).await;
    db.close().await;
    Ok(collected?)
}

/// Bytes stored and transferred per tenant (`quorum store usage`), read from the store's
/// database.
pub async fn usage_of(config: &Config, tenant: Option<&str>) -> anyhow::Result<Vec<Usage>> {
    config.check()?;
    let (db, _) = open_storage(config, false).await?;
    let usage = db::usage(&db, tenant).await;
    db.close().await;
    usage.context("cannot read usage from the store's database")
}
