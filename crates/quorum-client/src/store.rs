//! Client for an artifact store: what workers use to upload, and what consumers use to download.

use std::path::Path;

use quorum_api::v1::store::{
    ManifestStored, MissingRequest, MissingResponse, RevokeRequest, RevokeResponse,
};
use quorum_core::{Digest, Manifest};

use crate::{ClientError, check, json, transport};

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

    /// Which of `digests` the store lacks for this token's tenant.
    pub async fn missing(
        &self,
        token: &str,
        digests: Vec<Digest>,
    ) -> Result<Vec<Digest>, ClientError> {
        let url = format!("{}/api/v1/missing", self.base);
        let resp = self
            .http
            .post(&url)
            .bearer_auth(token)
            .json(&MissingRequest { digests })
            .send()
            .await
            .map_err(transport(&url))?;
        Ok(json::<MissingResponse>(&url, resp).await?.missing)
    }

    /// Uploads a blob from memory.
    pub async fn put_blob(
        &self,
        token: &str,
        digest: &Digest,
        body: Vec<u8>,
    ) -> Result<(), ClientError> {
        let url = format!("{}/api/v1/blobs/{digest}", self.base);
        let resp = self
            .http
            .put(&url)
            .bearer_auth(token)
            .body(body)
            .send()
            .await
            .map_err(transport(&url))?;
        check(&url, resp).await.map(drop)
    }

    /// Streams a file to the store as blob `digest`.
    pub async fn put_file(
        &self,
        token: &str,
        digest: &Digest,
        path: &Path,
    ) -> Result<(), ClientError> {
        let url = format!("{}/api/v1/blobs/{digest}", self.base);
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
        let resp = self
            .http
            .put(&url)
            .bearer_auth(token)
            .header(reqwest::header::CONTENT_LENGTH, len)
            .body(body)
            .send()
            .await
            .map_err(transport(&url))?;
        check(&url, resp).await.map(drop)
    }

    /// Records the assignment's manifest; returns the digest the store computed.
    pub async fn put_manifest(
        &self,
        token: &str,
        manifest: &Manifest,
    ) -> Result<Digest, ClientError> {
        let url = format!("{}/api/v1/manifest", self.base);
        let resp = self
            .http
            .put(&url)
            .bearer_auth(token)
            .json(manifest)
            .send()
            .await
            .map_err(transport(&url))?;
        Ok(json::<ManifestStored>(&url, resp).await?.digest)
    }

    pub async fn get_manifest(
        &self,
        token: &str,
        build: &str,
        digest: &Digest,
    ) -> Result<Manifest, ClientError> {
        let url = format!("{}/api/v1/builds/{build}/manifests/{digest}", self.base);
        let resp = self
            .http
            .get(&url)
            .bearer_auth(token)
            .send()
            .await
            .map_err(transport(&url))?;
        json(&url, resp).await
    }

    /// Downloads a blob of `build` into memory. Callers check the digest themselves.
    pub async fn get_blob(
        &self,
        token: &str,
        build: &str,
        digest: &Digest,
    ) -> Result<bytes::Bytes, ClientError> {
        let url = format!("{}/api/v1/builds/{build}/blobs/{digest}", self.base);
        let resp = self
            .http
            .get(&url)
            .bearer_auth(token)
            .send()
            .await
            .map_err(transport(&url))?;
        check(&url, resp)
            .await?
            .bytes()
            .await
            .map_err(transport(&url))
    }

    /// Revokes tokens of one build (a revoke token from the controller's IdP).
    pub async fn revoke(
        &self,
        token: &str,
        jtis: Vec<String>,
    ) -> Result<RevokeResponse, ClientError> {
        let url = format!("{}/api/v1/revoke", self.base);
        let resp = self
            .http
            .post(&url)
            .bearer_auth(token)
            .json(&RevokeRequest { jtis })
            .send()
            .await
            .map_err(transport(&url))?;
        json(&url, resp).await
    }
}
