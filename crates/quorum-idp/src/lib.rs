//! Quorum's identity provider: registered clients with hashed secrets, the OAuth 2.0 client
//! credentials grant, RFC 8693 token exchange for job, upload and read tokens, OIDC discovery and
//! JWKS.
//!
//! Clients come from two places: `[[clients]]` in the config file (read-only) and the SQLite
//! database in `data_dir` (`db.rs`), which the admin CLI manages through `ClientAdmin` and the
//! token endpoint reads on every request. The signing keys are a key ring in the same database
//! (`keys.rs`), rotated with `KeyAdmin` while the IdP runs.

mod clients;
mod db;
mod discovery;
mod keys;
mod take_ups;
mod token;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use axum::Router;
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use clients::{ClientsError, hash_secret};
pub use db::{AdminError, ClientAdmin, ClientInfo, ClientSource, DB_FILE};
pub use keys::{KeyAdmin, KeyInfo, KeyState, LEGACY_KEY_FILE, rfc3339};

/// `quorum idp --config idp.toml`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Address to listen on, such as `127.0.0.1:8101`; `--listen` overrides it.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Where the database (clients and signing keys, mode 0600) lives.
    pub data_dir: PathBuf,
    /// The issuer URL put in tokens and discovery. Defaults to `http://<bound address>`.
    #[serde(default)]
    pub issuer: Option<String>,
    /// Longest lifetime of any token this IdP issues, in seconds.
    #[serde(default = "default_max_lifetime")]
    pub max_token_lifetime_secs: i64,
    /// Clients registered in the config file (read-only); `quorum idp client add` adds database
    /// ones.
    #[serde(default)]
    pub clients: Vec<ClientConfig>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    pub id: String,
    /// The tenant every token of this client is issued for.
    pub tenant: String,
    /// Argon2id PHC string of the client secret (`quorum idp hash-secret`).
    pub secret_hash: String,
}

fn default_listen() -> String {
    "127.0.0.1:8101".into()
}

fn default_max_lifetime() -> i64 {
    24 * 3600
}

/// A config `run` would refuse.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("max_token_lifetime_secs is {0}; it must be positive")]
    Lifetime(i64),
    #[error("issuer `{0}` must be an http:// or https:// URL")]
    Issuer(String),
    #[error(transparent)]
    Clients(#[from] ClientsError),
}

impl Config {
    /// Everything `run` would refuse in this config, checked without starting anything (for
    /// `check-config`).
    pub fn check(&self) -> Result<(), ConfigError> {
        self.registry().map(drop)
    }

    fn registry(&self) -> Result<clients::Clients, ConfigError> {
        if self.max_token_lifetime_secs <= 0 {
            return Err(ConfigError::Lifetime(self.max_token_lifetime_secs));
        }
        if let Some(issuer) = &self.issuer
            && !(issuer.starts_with("http://") || issuer.starts_with("https://"))
        {
            return Err(ConfigError::Issuer(issuer.clone()));
        }
        Ok(clients::Clients::new(&self.clients)?)
    }
}

/// What every handler shares.
struct Idp {
    issuer: String,
    /// Read at most once a second, so `quorum idp key rotate` counts from a second later.
    keys: keys::KeyRing,
    clients: Arc<clients::Clients>,
    /// Read per request, so the admin CLI's changes count from the next one.
    db: db::ClientDb,
    max_lifetime_secs: i64,
    /// Recently verified credentials, so a controller's burst of token requests pays for one
    /// Argon2 run instead of one each.
    verified: clients::VerifiedCache,
}

/// Serves the IdP on `listener` until `shutdown` is cancelled. The first signing key is created
/// in the database on first start and kept until rotated, so tokens outlive a restart.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let addr = listener
        .local_addr()
        .context("cannot read the listener's address")?;
    let clients = config.registry()?;
    let issuer = config
        .issuer
        .clone()
        .unwrap_or_else(|| format!("http://{addr}"));
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create data_dir {}", config.data_dir.display()))?;
    let db = db::ClientDb::open(&config.data_dir).await?;
    let kid = keys::ensure_active(&db, &config.data_dir).await?;
    db.check_no_conflict(&clients).await?;
    let db_clients = db.list().await?.len();
    if clients.len() == 0 && db_clients == 0 {
        tracing::warn!(
            "no clients are registered yet; token requests are refused until `quorum idp client add` adds one"
        );
    }
    tracing::info!(%issuer, %kid, config_clients = clients.len(), db_clients, %addr, "identity provider listening");
    let idp = Arc::new(Idp {
        issuer,
        keys: keys::KeyRing::new(&db, config.max_token_lifetime_secs),
        clients: Arc::new(clients),
        db: db.clone(),
        max_lifetime_secs: config.max_token_lifetime_secs,
        verified: clients::VerifiedCache::default(),
    });
    let router = Router::new()
        .route(
            "/.well-known/openid-configuration",
            get(discovery::discovery),
        )
        .route("/jwks", get(discovery::jwks))
        .route("/token", post(token::token))
        .route("/take-ups", post(take_ups::take_ups))
        .with_state(idp);
    let served = quorum_service::serve(listener, router, shutdown).await;
    db.close().await;
    served
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_refuses_what_run_would_refuse() {
        let good = Config {
            listen: default_listen(),
            data_dir: "/nonexistent".into(),
            issuer: Some("https://idp.example".into()),
            max_token_lifetime_secs: 60,
            clients: vec![ClientConfig {
                id: "c".into(),
                tenant: "t".into(),
                secret_hash: hash_secret("s"),
            }],
        };
        assert_eq!(good.check(), Ok(()));
        let zero = Config {
            max_token_lifetime_secs: 0,
            ..good.clone()
        };
        assert_eq!(zero.check(), Err(ConfigError::Lifetime(0)));
        let bare = Config {
            issuer: Some("idp.example".into()),
            ..good.clone()
        };
        assert!(matches!(bare.check(), Err(ConfigError::Issuer(_))));
        let mut plain = good.clone();
        plain.clients[0].secret_hash = "s".into();
        assert!(matches!(
            plain.check(),
            Err(ConfigError::Clients(ClientsError::BadHash { .. }))
        ));
    }
}
