//! Client for a controller's user API (bearer API token): what the `quorum` CLI uses.

use quorum_api::v1::controller::{
    ArtifactList, BuildCreated, BuildStatus, ClearFlag, HEADER_LOG_COMPLETE, RebuildRequest,
    ReviewList, SignerKeys, SubmitBuild, UsageView,
};
use quorum_core::attest::Envelope;

use crate::{ClientError, send_bytes, send_json, send_ok};

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

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn get<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        send_json(self.http.get(self.url(path)).bearer_auth(&self.token)).await
    }

    pub async fn submit(&self, repository: &str, rev: &str) -> Result<BuildCreated, ClientError> {
        let body = SubmitBuild {
            repository: repository.to_string(),
            rev: rev.to_string(),
        };
        send_json(
            self.http
                .post(self.url("/api/v1/builds"))
                .bearer_auth(&self.token)
                .json(&body),
        )
        .await
    }

    pub async fn status(&self, build: &str) -> Result<BuildStatus, ClientError> {
        self.get(&format!("/api/v1/builds/{build}")).await
    }

    pub async fn cancel(&self, build: &str) -> Result<(), ClientError> {
        send_ok(
            self.http
                .post(self.url(&format!("/api/v1/builds/{build}/cancel")))
                .bearer_auth(&self.token),
        )
        .await
    }

    pub async fn statement(&self, build: &str) -> Result<Envelope, ClientError> {
        self.get(&format!("/api/v1/builds/{build}/statement")).await
    }

    /// The build's SLSA Verification Summary (a DSSE envelope); check it with
    /// [`crate::verify::check_build`].
    pub async fn summary(&self, build: &str) -> Result<Envelope, ClientError> {
        self.get(&format!("/api/v1/builds/{build}/summary")).await
    }

    pub async fn artifacts(&self, build: &str) -> Result<ArtifactList, ClientError> {
        self.get(&format!("/api/v1/builds/{build}/artifacts")).await
    }

    /// Opens the approval gate of a manual job.
    pub async fn approve(&self, build: &str, job: &str) -> Result<(), ClientError> {
        send_ok(
            self.http
                .post(self.url(&format!("/api/v1/builds/{build}/jobs/{job}/approve")))
                .bearer_auth(&self.token),
        )
        .await
    }

    /// Asks for a trusted rebuild of a disputed job, to break the tie.
    pub async fn rebuild_trusted(&self, build: &str, job: &str) -> Result<(), ClientError> {
        send_ok(
            self.http
                .post(self.url(&format!("/api/v1/builds/{build}/jobs/{job}/rebuild")))
                .bearer_auth(&self.token)
                .json(&RebuildRequest { trusted: true }),
        )
        .await
    }

    /// Review flags, oldest first: the open ones, or all with `all`.
    pub async fn review_list(&self, all: bool) -> Result<ReviewList, ClientError> {
        self.get(&format!("/api/v1/review?all={all}")).await
    }

    /// Clears a review flag, saying why.
    pub async fn review_clear(&self, flag: &str, note: &str) -> Result<(), ClientError> {
        send_ok(
            self.http
                .post(self.url(&format!("/api/v1/review/{flag}/clear")))
                .bearer_auth(&self.token)
                .json(&ClearFlag {
                    note: note.to_string(),
                }),
        )
        .await
    }

    /// Usage per tenant and per build (the `limit` most recent), optionally for one tenant.
    pub async fn usage(&self, tenant: Option<&str>, limit: u32) -> Result<UsageView, ClientError> {
        let mut query = vec![("limit", limit.to_string())];
        if let Some(t) = tenant {
            query.push(("tenant", t.to_string()));
        }
        send_json(
            self.http
                .get(self.url("/api/v1/usage"))
                .query(&query)
                .bearer_auth(&self.token),
        )
        .await
    }

    pub async fn signer_keys(&self) -> Result<SignerKeys, ClientError> {
        self.get("/api/v1/signer/keys").await
    }

    /// Log bytes of an assignment from `offset`, and whether the log is complete.
    pub async fn log(&self, assignment: &str, offset: u64) -> Result<(Vec<u8>, bool), ClientError> {
        let path = format!("/api/v1/assignments/{assignment}/log?offset={offset}");
        let (headers, bytes) =
            send_bytes(self.http.get(self.url(&path)).bearer_auth(&self.token)).await?;
        let complete = headers
            .get(HEADER_LOG_COMPLETE)
            .is_some_and(|v| v == "true");
        Ok((bytes.to_vec(), complete))
    }

    /// The report explaining a disputed job (text, or HTML with `html`), and what produced it
    /// (`diffoscope` or `built-in`). A report still being prepared is answered `409`.
    pub async fn diff(
        &self,
        build: &str,
        job: &str,
        html: bool,
    ) -> Result<(String, String), ClientError> {
        let format = if html { "html" } else { "text" };
        let path = format!("/api/v1/builds/{build}/jobs/{job}/diff?format={format}");
        let (headers, bytes) =
            send_bytes(self.http.get(self.url(&path)).bearer_auth(&self.token)).await?;
        let tool = headers
            .get(quorum_api::v1::controller::HEADER_DIFF_TOOL)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        Ok((String::from_utf8_lossy(&bytes).into_owned(), tool))
    }
}
