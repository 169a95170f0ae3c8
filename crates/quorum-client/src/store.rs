//! Client for an artifact store: what workers use to upload, and what consumers use to download.

use std::path::Path;

use quorum_api::v1::store::{
    ManifestStored, MissingRequest, MissingResponse, RevokeRequest, RevokeResponse,
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
