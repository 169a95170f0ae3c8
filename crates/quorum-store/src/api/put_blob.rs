//! `PUT /api/v1/blobs/{digest}`, upload token: receives a blob, hashing it as it streams in, and
//! keeps it for the token's tenant only if it matches the digest. Uploading a blob someone else
//! already stored still sends and checks every byte: that is what earns this tenant access.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use futures::TryStreamExt as _;
use quorum_core::Digest;
use quorum_service::ApiError;

use crate::Store;
use crate::auth::Upload;
use crate::blobs::BlobError;
use crate::error::Error;

pub async fn put_blob(
    State(store): State<Arc<Store>>,
    Upload(slot): Upload,
    Path(digest): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<StatusCode, Error> {
    let digest: Digest = digest
        .parse()
        .map_err(|e| ApiError::bad_request(format!("{e}")))?;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > store.max_blob_bytes) {
        return Err(BlobError::TooLarge {
            max: store.max_blob_bytes,
        }
        .into());
    }
    let stream = Box::pin(body.into_data_stream().map_err(std::io::Error::other));
    let size = store
        .blobs
        .put(digest, stream, store.max_blob_bytes)
        .await?;
    crate::db::link_blob(&store.db, &slot.tenant, digest, size).await?;
    tracing::info!(tenant = %slot.tenant, build = %slot.build, %digest, size, "blob stored");
    Ok(StatusCode::CREATED)
}
