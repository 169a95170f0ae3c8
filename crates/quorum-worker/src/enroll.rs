//! Enrollment: the worker id each controller gave this worker, kept in `enrollments.json` so a
//! single-use enrollment token is spent once, on first start.

use std::collections::BTreeMap;

use anyhow::Context as _;
use base64::Engine as _;
use ed25519_dalek::SigningKey;
use quorum_api::v1::controller::EnrollRequest;
use quorum_client::controller::WorkerClient;
use serde::{Deserialize, Serialize};

use crate::Config;

const TOKEN_ENV: &str = "QUORUM_ENROLLMENT_TOKEN";

#[derive(Debug, Default, Serialize, Deserialize)]
struct Enrollments {
    /// Keyed by controller URL without a trailing slash.
    controllers: BTreeMap<String, Enrollment>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Enrollment {
    worker_id: String,
    owner: String,
}

/// Returns the worker id for each configured controller, in config order, enrolling with the
/// controllers that do not know this worker yet.
pub(crate) async fn ensure(config: &Config, key: &SigningKey) -> anyhow::Result<Vec<String>> {
    let path = config.data_dir.join("enrollments.json");
    let mut known: Enrollments = match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .with_context(|| format!("cannot parse {}", path.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Enrollments::default(),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let env_token = std::env::var(TOKEN_ENV)
        .ok()
        .filter(|t| !t.is_empty() && config.controllers.len() == 1);
    let public_key =
        base64::engine::general_purpose::STANDARD.encode(key.verifying_key().as_bytes());

    let mut ids = Vec::with_capacity(config.controllers.len());
    for controller in &config.controllers {
        let url = controller.url.trim_end_matches('/').to_string();
        if let Some(e) = known.controllers.get(&url) {
            ids.push(e.worker_id.clone());
            continue;
        }
        let Some(token) = env_token
            .clone()
            .or_else(|| controller.enrollment_token.clone())
        else {
            anyhow::bail!(
                "the worker is not enrolled with {url} and has no enrollment token; run `quorum controller enroll` \
                 there and put the token in enrollment_token or {TOKEN_ENV}"
            );
        };
        let req = EnrollRequest {
            enrollment_token: token,
            name: config.name.clone(),
            public_key: public_key.clone(),
        };
        // A controller that is still starting, or busy, is worth a few more tries; a refused
        // token is not.
        let never = tokio_util::sync::CancellationToken::new();
        let resp =
            crate::retry::with_retry("enroll", std::time::Duration::from_secs(30), &never, || {
                WorkerClient::enroll(&url, &req)
            })
            .await
            .with_context(|| format!("cannot enroll with controller {url}"))?;
        tracing::info!(controller = %url, worker_id = %resp.worker_id, owner = %resp.owner, "enrolled");
        ids.push(resp.worker_id.clone());
        known.controllers.insert(
            url,
            Enrollment {
                worker_id: resp.worker_id,
                owner: resp.owner,
            },
        );
        // Saved after each success: the token is spent now, even if a later controller fails.
        let json = serde_json::to_vec_pretty(&known).expect("enrollments serialize");
        quorum_service::write_private(&path, &json)?;
    }
    Ok(ids)
}
