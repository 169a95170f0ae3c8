//! Quorum's artifact store: content-addressed blobs hashed while they arrive and kept only when
//! the digest matches, per-tenant visibility, manifests recorded under the scope of an upload
//! token, and downloads with a read token.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

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
}

fn default_listen() -> String {
    "127.0.0.1:8102".into()
}
