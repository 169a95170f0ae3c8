//! What every download shares: whose build a request may read (a read token for the build, or
//! no token at all for a build its controller made public), HTTP range requests, and streaming a
//! blob while counting the bytes served to the tenant.

use std::ops::Range;

use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use quorum_core::Digest;
use quorum_service::ApiError;

use crate::Store;
use crate::auth::Read;
use crate::blobs::{BlobError, ByteStream, Packed};
use crate::error::Error;

/// The build a download reads from.
pub struct Scope {
    pub tenant: String,
    pub build: String,
}

impl Scope {
    /// The build of a read token, if it is the build the path names.
    pub fn token(read: Read, build: &str, what: &str, name: &str) -> Result<Scope, Error> {
        if read.build != build {
            return Err(super::not_in_build(what, build, name).into());
        }
        Ok(Scope {
            tenant: read.tenant,
            build: build.to_string(),
        })
    }

    /// `build` of `tenant`, if its controller made it public; otherwise the same "not found" as
    /// for a build that does not exist.
    pub async fn public(
        store: &Store,
        tenant: &str,
        build: &str,
        what: &str,
        name: &str,
    ) -> Result<Scope, Error> {
        match crate::db::statement(&store.db, tenant, build).await? {
            Some((_, true)) => Ok(Scope {
                tenant: tenant.to_string(),
                build: build.to_string(),
            }),
            _ => Err(super::not_in_build(what, build, name).into()),
        }
    }
}

/// What a `Range` header asks of a blob of `size` bytes.
#[derive(Debug, PartialEq, Eq)]
enum Wanted {
    All,
    Part(Range<u64>),
    Unsatisfiable,
}

/// Reads one `bytes=` range (`a-b`, `a-`, `-n`). Anything else (other units, several ranges,
/// malformed) is ignored and the whole blob is sent, as RFC 9110 allows.
fn wanted(headers: &HeaderMap, size: u64) -> Wanted {
    let Some(spec) = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().strip_prefix("bytes="))
    else {
        return Wanted::All;
    };
    if spec.contains(',') {
        return Wanted::All;
    }
    let Some((first, last)) = spec.trim().split_once('-') else {
        return Wanted::All;
    };
    let parse = |s: &str| s.trim().parse::<u64>().ok();
    match (first.trim().is_empty(), parse(first), parse(last)) {
        // `-n`: the last n bytes.
        (true, _, Some(n)) => {
            if n == 0 || size == 0 {
                Wanted::Unsatisfiable
            } else {
                Wanted::Part(size.saturating_sub(n)..size)
            }
        }
        (false, Some(a), end) if last.trim().is_empty() || end.is_some() => {
            let end = end.map_or(size, |b| b.saturating_add(1).min(size));
            if a >= size {
                Wanted::Unsatisfiable
            } else if end <= a {
                Wanted::All
            } else {
                Wanted::Part(a..end)
            }
        }
        _ => Wanted::All,
    }
}

/// Streams blob `digest` of `size` bytes from `packed` (where its row said it is), or the range
/// the request asks for (206), counting the bytes sent as the tenant's traffic out.
pub async fn serve_blob(
    store: &Store,
    scope: &Scope,
    digest: Digest,
    (size, packed): (u64, Option<Packed>),
    headers: &HeaderMap,
) -> Result<Response, Error> {
    let (status, range) = match wanted(headers, size) {
        Wanted::All => (StatusCode::OK, 0..size),
        Wanted::Part(r) => (StatusCode::PARTIAL_CONTENT, r),
        Wanted::Unsatisfiable => {
            let mut response = ApiError::new(
                StatusCode::RANGE_NOT_SATISFIABLE,
                format!("blob {digest} has {size} bytes; the requested range lies outside it"),
            )
            .into_response();
            response.headers_mut().insert(
                header::CONTENT_RANGE,
                HeaderValue::from_str(&format!("bytes */{size}")).expect("ascii"),
            );
            return Ok(response);
        }
    };
    let len = range.end - range.start;
    // The empty blob is never fetched; every store holds it implicitly.
    let body = if len == 0 {
        Body::empty()
    } else {
        Body::from_stream(stream(store, digest, packed, range.clone()).await?)
    };
    let mut conn = store.db.pool().acquire().await?;
    crate::db::add_usage(&mut conn, &scope.tenant, 0, 0, crate::db::int(len)).await?;
    let mut response = (status, body).into_response();
    let h = response.headers_mut();
    let value = |s: String| HeaderValue::from_str(&s).expect("ascii");
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::CONTENT_LENGTH, value(len.to_string()));
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(header::ETAG, value(format!("\"{digest}\"")));
    if status == StatusCode::PARTIAL_CONTENT {
        h.insert(
            header::CONTENT_RANGE,
            value(format!("bytes {}-{}/{size}", range.start, range.end - 1)),
        );
    }
    Ok(response)
}

/// Streams `range` of blob `digest` from `packed`, where its row said it is. A blob uploaded
/// again since may have moved (a row names the copy placed last), and garbage collection may
/// have deleted the pack it was in: then it is looked up again, once.
async fn stream(
    store: &Store,
    digest: Digest,
    packed: Option<Packed>,
    range: Range<u64>,
) -> Result<ByteStream<'static>, Error> {
    match store.blobs.get(digest, packed.clone(), range.clone()).await {
        Err(BlobError::Gone(_)) => {
            let now = crate::db::stored_blob(&store.db, digest)
                .await?
                .and_then(|(_, packed)| packed);
            if now == packed {
                return Err(BlobError::Gone(digest).into());
            }
            Ok(store.blobs.get(digest, now, range).await?)
        }
        got => Ok(got?),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ask(range: &str, size: u64) -> Wanted {
        let mut h = HeaderMap::new();
        h.insert(header::RANGE, HeaderValue::from_str(range).unwrap());
        wanted(&h, size)
    }

    #[test]
    fn ranges() {
        assert_eq!(ask("bytes=0-9", 100), Wanted::Part(0..10));
        assert_eq!(ask("bytes=90-", 100), Wanted::Part(90..100));
        assert_eq!(ask("bytes=90-1000", 100), Wanted::Part(90..100));
        assert_eq!(ask("bytes=-10", 100), Wanted::Part(90..100));
        assert_eq!(ask("bytes=-1000", 100), Wanted::Part(0..100));
        assert_eq!(ask("bytes=100-", 100), Wanted::Unsatisfiable);
        assert_eq!(ask("bytes=-0", 100), Wanted::Unsatisfiable);
        assert_eq!(ask("bytes=0-", 0), Wanted::Unsatisfiable);
        assert_eq!(ask("bytes=5-2", 100), Wanted::All);
        assert_eq!(ask("bytes=0-1,5-6", 100), Wanted::All);
        assert_eq!(ask("items=0-1", 100), Wanted::All);
        assert_eq!(ask("bytes=x-1", 100), Wanted::All);
    }
}
