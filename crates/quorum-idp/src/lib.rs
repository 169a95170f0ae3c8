//! Quorum's identity provider: registered clients with hashed secrets, the OAuth 2.0 client
//! credentials grant, RFC 8693 token exchange for job, upload and read tokens, OIDC discovery and
//! JWKS.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// `quorum idp --config idp.toml`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Address to listen on, such as `127.0.0.1:8101`; `--listen` overrides it.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Where the signing key and database live.
    pub data_dir: PathBuf,
    /// The issuer URL put in tokens and discovery. Defaults to `http://<bound address>`.
    #[serde(default)]
    pub issuer: Option<String>,
    /// Longest lifetime of any token this IdP issues, in seconds.
    #[serde(default = "default_max_lifetime")]
    pub max_token_lifetime_secs: i64,
    /// Clients registered in the config file (the admin CLI of a later issue adds database ones).
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
