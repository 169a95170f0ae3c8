//! Client for a controller's user API (bearer API token): what the `quorum` CLI uses.

use quorum_api::v1::controller::{
    ArtifactList, BuildCreated, BuildStatus, HEADER_LOG_COMPLETE, SignerKeys, SubmitBuild,
};
use quorum_core::attest::Envelope;

use crate::{ClientError, check, json, transport};

#[derive(Clone)]
pub struct UserClient {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl std::fmt::Debug for UserClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserClient")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

impl UserClient {
    pub fn new(base: &str, token: &str) -> UserClient {
        UserClient {
            http: crate::http_client(),
            base: base.trim_end_matches('/').to_string(),
            token: token.to_string(),
        }
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    async fn get<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let url = format!("{}{path}", self.base);
        let resp = self
            .http
            .get(&url)
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(transport(&url))?;
        json(&url, resp).await
    }

    pub async fn submit(&self, repository: &str, rev: &str) -> Result<BuildCreated, ClientError> {
        let url = format!("{}/api/v1/builds", self.base);
        let resp = self
            .http
            .post(&url)
            .bearer_auth(&self.token)
            .json(&SubmitBuild {
                repository: repository.to_string(),
                rev: rev.to_string(),
            })
            .send()
            .await
            .map_err(transport(&url))?;
        json(&url, resp).await
    }

    pub async fn status(&self, build: &str) -> Result<BuildStatus, ClientError> {
        self.get(&format!("/api/v1/builds/{build}")).await
    }

    pub async fn cancel(&self, build: &str) -> Result<(), ClientError> {
        let url = format!("{}/api/v1/builds/{build}/cancel", self.base);
        let resp = self
            .http
            .post(&url)
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(transport(&url))?;
        check(&url, resp).await.map(drop)
    }

    pub async fn statement(&self, build: &str) -> Result<Envelope, ClientError> {
        self.get(&format!("/api/v1/builds/{build}/statement")).await
    }

    pub async fn artifacts(&self, build: &str) -> Result<ArtifactList, ClientError> {
        self.get(&format!("/api/v1/builds/{build}/artifacts")).await
    }

    pub async fn signer_keys(&self) -> Result<SignerKeys, ClientError> {
        self.get("/api/v1/signer/keys").await
    }

    /// Log bytes of an assignment from `offset`, and whether the log is complete.
    pub async fn log(&self, assignment: &str, offset: u64) -> Result<(Vec<u8>, bool), ClientError> {
        let url = format!(
            "{}/api/v1/assignments/{assignment}/log?offset={offset}",
            self.base
        );
        let resp = self
            .http
            .get(&url)
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(transport(&url))?;
        let resp = check(&url, resp).await?;
        let complete = resp
            .headers()
            .get(HEADER_LOG_COMPLETE)
            .is_some_and(|v| v == "true");
        let bytes = resp.bytes().await.map_err(transport(&url))?;
        Ok((bytes.to_vec(), complete))
    }
}
