//! Quorum's controller: reads pipelines from git, keeps builds in its database, assigns jobs to
//! workers of distinct owners, collects signed results, computes verdicts and has the signer
//! sign what the quorum agrees on.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// `quorum controller --config controller.toml`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default = "default_listen")]
    pub listen: String,
    pub data_dir: PathBuf,
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
