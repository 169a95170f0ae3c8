//! Quorum's worker agent: connects out to the controllers it serves, verifies each job token
//! against the IdPs it trusts, fetches the source, runs the steps in its executor, uploads the
//! outputs the store lacks, and reports a signed result.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

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
