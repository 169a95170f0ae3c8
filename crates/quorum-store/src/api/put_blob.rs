//! `PUT /api/v1/blobs/{digest}`, upload token: receives a blob, hashing it as it streams in, and
//! keeps it for the token's tenant only if it matches the digest. Uploading a blob someone else
//! already stored still sends and checks every byte: that is what earns this tenant access.
//!
//! The token's `max_files` is reserved before the body is read (a failed upload still counts),
//! and its `max_bytes` is reserved in blocks while the body streams: the upload is cut off at
//! the first chunk that would go over, and the backend then removes everything it received.

use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use futures::{StreamExt as _, TryStreamExt as _};
use quorum_core::Digest;
use quorum_service::ApiError;

use crate::Store;
use crate::auth::{Limits, Upload};
use crate::blobs::BlobError;
use crate::error::Error;

/// Bytes reserved per database round trip while a body streams, so a large upload costs a
/// handful of updates rather than one per chunk.
const BYTE_BLOCK: u64 = 1 << 20;

pub async fn put_blob(
    State(store): State<Arc<Store>>,
    Upload { slot, limits }: Upload,
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
    if !crate::usage::reserve_file(&store.db, &limits.jti, limits.max_files).await? {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!(
                "token has uploaded all of its max_files ({}) files",
                limits.max_files.unwrap_or_default()
            ),
        )
        .into());
    }
    let meter = Arc::new(Mutex::new(Meter::default()));
    if let (Some(max), Some(n)) = (limits.max_bytes, declared) {
        // Reserve the declared size up front: a body that cannot fit is refused before a byte
        // is read.
        if n > 0 && !crate::usage::reserve_bytes(&store.db, &limits.jti, n, max).await? {
            return Err(over_bytes(max));
        }
        meter.lock().expect("meter lock").reserved = n;
    }
    let stream = metered(body, store.clone(), limits.clone(), meter.clone());
    let put = crate::ingest::store_blob(&store, &slot.tenant, digest, stream, declared).await;
    let (received, reserved, over) = {
        let m = meter.lock().expect("meter lock");
        (m.received, m.reserved, m.over)
    };
    // Keep exactly the bytes received: give back what was reserved but not sent.
    crate::usage::adjust_bytes(&store.db, &limits.jti, received as i64 - reserved as i64).await?;
    if over {
        return Err(over_bytes(limits.max_bytes.unwrap_or_default()));
    }
    let size = put?;
    tracing::info!(tenant = %slot.tenant, build = %slot.build, %digest, size, "blob stored");
    Ok(StatusCode::CREATED)
}

fn over_bytes(max: u64) -> Error {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("upload goes over the token's max_bytes ({max} bytes); nothing was stored"),
    )
    .into()
}

/// Bytes of one upload: received so far, and reserved in the token's counter.
#[derive(Debug, Default)]
struct Meter {
    received: u64,
    reserved: u64,
    over: bool,
}

/// The body as a stream that counts every chunk and, under `max_bytes`, reserves room for it
/// before passing it on; a chunk that does not fit ends the stream with an error.
fn metered(
    body: Body,
    store: Arc<Store>,
    limits: Limits,
    meter: Arc<Mutex<Meter>>,
) -> crate::blobs::ByteStream<'static> {
    body.into_data_stream()
        .map_err(std::io::Error::other)
        .then(move |chunk| {
            let store = store.clone();
            let limits = limits.clone();
            let meter = meter.clone();
            async move {
                let chunk = chunk?;
                let len = chunk.len() as u64;
                let need = {
                    let mut m = meter.lock().expect("meter lock");
                    m.received += len;
                    m.received.saturating_sub(m.reserved)
                };
                if let (Some(max), true) = (limits.max_bytes, need > 0) {
                    // A full block when it fits, else exactly what this chunk needs.
                    let mut got = None;
                    for n in [need.max(BYTE_BLOCK), need] {
                        if crate::usage::reserve_bytes(&store.db, &limits.jti, n, max)
                            .await
                            .map_err(std::io::Error::other)?
                        {
                            got = Some(n);
                            break;
                        }
                    }
                    let mut m = meter.lock().expect("meter lock");
                    match got {
                        Some(n) => m.reserved += n,
                        None => {
                            m.received -= len;
                            m.over = true;
                            return Err(std::io::Error::other(format!(
                                "upload goes over the token's max_bytes ({max} bytes)"
                            )));
                        }
                    }
                }
                Ok(chunk)
            }
        })
        .boxed()
}
