//! Client for an artifact store: what workers use to upload, and what consumers use to download.

use std::path::Path;

use quorum_api::v1::store::{
    BlobsStored, ManifestAnswer, ManifestProposal, ManifestStored, MissingRequest, MissingResponse,
    RevokeRequest, RevokeResponse, StatementStored, TenantUsage,
};
use quorum_core::{Digest, Manifest};

use crate::{ClientError, send_bytes, send_json, send_ok};

#[derive(Clone, Debug)]
pub struct StoreClient {
    http: reqwest::Client,
    base: String,
}

impl StoreClient {
    pub fn new(base: &str) -> StoreClient {
        StoreClient {
            http: crate::http_client(),
            base: base.trim_end_matches('/').to_string(),
        }
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Which of `digests` the store lacks for this token's tenant.
    pub async fn missing(
        &self,
        token: &str,
        digests: Vec<Digest>,
    ) -> Result<Vec<Digest>, ClientError> {
        let req = self
            .http
            .post(self.url("/api/v1/missing"))
            .bearer_auth(token)
            .json(&MissingRequest { digests });
        Ok(send_json::<MissingResponse>(req).await?.missing)
    }

    /// Uploads a blob from memory.
    pub async fn put_blob(
        &self,
        token: &str,
        digest: &Digest,
        body: Vec<u8>,
    ) -> Result<(), ClientError> {
        send_ok(
            self.http
                .put(self.url(&format!("/api/v1/blobs/{digest}")))
                .bearer_auth(token)
                .body(body),
        )
        .await
    }

    /// Uploads a batch of blobs in one request (`POST /api/v1/blobs`): `body` is their frames,
    /// each [`quorum_api::v1::store::batch_frame_header`] and the blob's bytes. The store keeps
    /// all of them or none.
    pub async fn put_blobs(
        &self,
        token: &str,
        body: impl Into<bytes::Bytes>,
    ) -> Result<BlobsStored, ClientError> {
        send_json(
            self.http
                .post(self.url("/api/v1/blobs"))
                .bearer_auth(token)
                .body(body.into()),
        )
        .await
    }

    /// Streams a file to the store as blob `digest`.
    pub async fn put_file(
        &self,
        token: &str,
        digest: &Digest,
        path: &Path,
    ) -> Result<(), ClientError> {
        let url = self.url(&format!("/api/v1/blobs/{digest}"));
        let file = tokio::fs::File::open(path)
            .await
            .map_err(|e| ClientError::Body {
                url: url.clone(),
                message: format!("cannot open {}: {e}", path.display()),
            })?;
        let len = file.metadata().await.map(|m| m.len()).unwrap_or(0);
        let body = reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::with_capacity(
            file,
            256 * 1024,
        ));
        send_ok(
            self.http
                .put(url)
                .bearer_auth(token)
                .header(reqwest::header::CONTENT_LENGTH, len)
                .body(body),
        )
        .await
    }

    /// Records the assignment's manifest; returns the digest the store computed.
    pub async fn put_manifest(
        &self,
        token: &str,
        manifest: &Manifest,
    ) -> Result<Digest, ClientError> {
        let req = self
            .http
            .put(self.url("/api/v1/manifest"))
            .bearer_auth(token)
            .json(manifest);
        Ok(send_json::<ManifestStored>(req).await?.digest)
    }

    /// Proposes the assignment's manifest, in full or relative to an earlier one of the tenant
    /// (`POST /api/v1/manifest`): recorded, or the blobs the store lacks for it. A base the
    /// store does not know for this tenant is answered 404.
    pub async fn record_manifest(
        &self,
        token: &str,
        proposal: &ManifestProposal,
    ) -> Result<ManifestAnswer, ClientError> {
        send_json(
            self.http
                .post(self.url("/api/v1/manifest"))
                .bearer_auth(token)
                .json(proposal),
        )
        .await
    }

    pub async fn get_manifest(
        &self,
        token: &str,
        build: &str,
        digest: &Digest,
    ) -> Result<Manifest, ClientError> {
        send_json(
            self.http
                .get(self.url(&format!("/api/v1/builds/{build}/manifests/{digest}")))
                .bearer_auth(token),
        )
        .await
    }

    /// Downloads a blob of `build` into memory. Callers check the digest themselves.
    pub async fn get_blob(
        &self,
        token: &str,
        build: &str,
        digest: &Digest,
    ) -> Result<bytes::Bytes, ClientError> {
        let req = self
            .http
            .get(self.url(&format!("/api/v1/builds/{build}/blobs/{digest}")))
            .bearer_auth(token);
        Ok(send_bytes(req).await?.1)
    }

    /// Downloads a file of `build` by the path job `job` gave it, whole or (`range` as
    /// `start..end`) in part. Callers check digests themselves.
    pub async fn get_file(
        &self,
        token: &str,
        build: &str,
        job: &str,
        path: &str,
        range: Option<std::ops::Range<u64>>,
    ) -> Result<bytes::Bytes, ClientError> {
        let mut req = self
            .http
            .get(self.url(&format!("/api/v1/builds/{build}/files/{job}/{path}")))
            .bearer_auth(token);
        if let Some(r) = range.filter(|r| r.end > r.start) {
            req = req.header(
                reqwest::header::RANGE,
                format!("bytes={}-{}", r.start, r.end - 1),
            );
        }
        Ok(send_bytes(req).await?.1)
    }

    /// Records the build's signed statement (its DSSE envelope, as JSON) beside its artifacts,
    /// and makes the build public if `public` (the controller's revoke token for the build).
    pub async fn put_statement(
        &self,
        token: &str,
        build: &str,
        envelope: &quorum_core::attest::Envelope,
        public: bool,
    ) -> Result<StatementStored, ClientError> {
        send_json(
            self.http
                .put(self.url(&format!("/api/v1/builds/{build}/statement?public={public}")))
                .bearer_auth(token)
                .json(envelope),
        )
        .await
    }

    /// The token's tenant's bytes stored and transferred here (a controller's revoke token).
    pub async fn usage(&self, token: &str) -> Result<TenantUsage, ClientError> {
        send_json(self.http.get(self.url("/api/v1/usage")).bearer_auth(token)).await
    }

    /// Revokes tokens of one build (a revoke token from the controller's IdP).
    pub async fn revoke(
        &self,
        token: &str,
        jtis: Vec<String>,
    ) -> Result<RevokeResponse, ClientError> {
        send_json(
            self.http
                .post(self.url("/api/v1/revoke"))
                .bearer_auth(token)
                .json(&RevokeRequest { jtis }),
        )
        .await
    }
}
