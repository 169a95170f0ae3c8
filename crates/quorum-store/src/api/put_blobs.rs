//! `POST /api/v1/blobs`, upload token: a batch of blobs in one streamed request, so that a tree
//! of many small files costs one request, one metadata transaction and one sync per directory
//! per batch rather than all of that per file. The body is frames of `sha256:<hex> <size>\n`
//! and exactly `size` bytes (`quorum_api::v1::store::batch_frame_header`).
//!
//! All or none: each frame is hashed into a temporary file as it arrives, and only when the
//! whole body has arrived and every frame matched does one transaction count the batch against
//! the token (one file per frame, and its bytes) and the tenant's quota, place every blob and
//! link them. A frame that does not match its digest, a body that ends inside a frame, bytes
//! after a frame that do not form the next frame's header, or a batch over a limit leaves
//! nothing of the batch behind, and counts nothing but the call. Limits are also checked as
//! frames arrive, against the counters at the start, so a batch that cannot fit is cut off
//! early; the transaction has the last word.

use std::io;
use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use bytes::Bytes;
use futures::{StreamExt as _, TryStreamExt as _};
use quorum_api::v1::store::{BlobsStored, MAX_BATCH_BLOBS, MAX_BATCH_BYTES, MAX_FRAME_HEADER};
use quorum_core::Digest;
use quorum_service::ApiError;
use tokio::io::{AsyncBufRead, AsyncBufReadExt as _, AsyncReadExt as _};

use crate::Store;
use crate::auth::Upload;
use crate::blobs::{BlobError, ByteStream};
use crate::error::Error;

pub async fn put_blobs(
    State(store): State<Arc<Store>>,
    Upload { slot, limits }: Upload,
    body: Body,
) -> Result<Json<BlobsStored>, Error> {
    let started = std::time::Instant::now();
    let (used_files, used_bytes) = {
        let mut conn = store.db.pool().acquire().await?;
        crate::usage::counts(&mut conn, &limits.jti).await?
    };
    let mut reader =
        tokio_util::io::StreamReader::new(body.into_data_stream().map_err(io::Error::other));
    let mut items = Vec::new();
    let mut total = 0u64;
    while let Some((digest, size)) = read_header(&mut reader, items.len()).await? {
        let frame = items.len();
        if frame == MAX_BATCH_BLOBS {
            return Err(ApiError::bad_request(format!(
                "frame {frame}: a batch holds at most {MAX_BATCH_BLOBS} blobs; nothing of the batch was stored"
            ))
            .into());
        }
        if size > store.max_blob_bytes {
            return Err(in_frame(
                frame,
                BlobError::TooLarge {
                    max: store.max_blob_bytes,
                }
                .into(),
            ));
        }
        total = total.saturating_add(size);
        if total > MAX_BATCH_BYTES {
            return Err(ApiError::bad_request(format!(
                "frame {frame} ({digest}): a batch holds at most {MAX_BATCH_BYTES} bytes; send larger blobs one per PUT /api/v1/blobs/{{digest}}; nothing of the batch was stored"
            ))
            .into());
        }
        let files = frame as u64 + 1;
        let over_files = limits
            .max_files
            .is_some_and(|max| used_files.saturating_add(files) > max);
        let over_bytes = limits
            .max_bytes
            .is_some_and(|max| used_bytes.saturating_add(total) > max);
        if over_files || over_bytes {
            return Err(crate::usage::batch_over(
                &limits, used_files, used_bytes, files, total,
            ));
        }
        let received = store
            .blobs
            .receive(digest, frame_body(&mut reader, size), size)
            .await
            .map_err(|e| in_frame(frame, e.into()))?;
        items.push((digest, received));
    }
    let blobs = items.len() as u64;
    let received = started.elapsed();
    let bytes = crate::ingest::store_blobs(&store, &slot.tenant, &limits, items).await?;
    tracing::info!(
        tenant = %slot.tenant, build = %slot.build, blobs, bytes, ?received,
        elapsed = ?started.elapsed(), "blob batch stored"
    );
    Ok(Json(BlobsStored { blobs, bytes }))
}

/// Reads the header of frame `frame`; `None` at the end of the body.
async fn read_header<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    frame: usize,
) -> Result<Option<(Digest, u64)>, Error> {
    let mut line = Vec::new();
    reader
        .take(MAX_FRAME_HEADER as u64)
        .read_until(b'\n', &mut line)
        .await
        .map_err(|e| {
            ApiError::bad_request(format!(
                "frame {frame}: the body broke off ({e}); nothing of the batch was stored"
            ))
        })?;
    if line.is_empty() {
        return Ok(None);
    }
    let bad = |why: &str| -> Error {
        let shown = String::from_utf8_lossy(&line[..line.len().min(80)])
            .escape_debug()
            .to_string();
        ApiError::bad_request(format!(
            "frame {frame}: header `{shown}` {why}; nothing of the batch was stored"
        ))
        .into()
    };
    let Some(text) = line.strip_suffix(b"\n") else {
        return Err(bad(if line.len() == MAX_FRAME_HEADER {
            "is too long"
        } else {
            "ends with the body, before its newline"
        }));
    };
    let parsed = std::str::from_utf8(text).ok().and_then(|t| {
        let (digest, size) = t.split_once(' ')?;
        Some((digest.parse::<Digest>().ok()?, size.parse::<u64>().ok()?))
    });
    parsed
        .map(Some)
        .ok_or_else(|| bad("is not `sha256:<hex> <size>`"))
}

/// Exactly the next `size` bytes of the body; an error if it ends first.
fn frame_body<R: AsyncBufRead + Unpin + Send>(reader: &mut R, size: u64) -> ByteStream<'_> {
    futures::stream::try_unfold((reader, size), |(reader, left)| async move {
        if left == 0 {
            return Ok(None);
        }
        let buf = reader.fill_buf().await?;
        if buf.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("the body ended {left} bytes before the frame did"),
            ));
        }
        let n = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let chunk = Bytes::copy_from_slice(&buf[..n]);
        reader.consume(n);
        Ok(Some((chunk, (reader, left - n as u64))))
    })
    .boxed()
}

/// Names the frame in a client error about it.
fn in_frame(frame: usize, e: Error) -> Error {
    let api = match e {
        Error::Api(api) => api,
        Error::Blob(
            e @ (BlobError::Mismatch { .. }
            | BlobError::Truncated { .. }
            | BlobError::TooLarge { .. }),
        ) => {
            let status = match e {
                BlobError::TooLarge { .. } => axum::http::StatusCode::PAYLOAD_TOO_LARGE,
                _ => axum::http::StatusCode::BAD_REQUEST,
            };
            ApiError::new(status, e.to_string())
        }
        e => return e,
    };
    ApiError::new(
        api.status,
        format!(
            "frame {frame}: {}; nothing of the batch was stored",
            api.message.trim_end_matches("; nothing was stored")
        ),
    )
    .into()
}
