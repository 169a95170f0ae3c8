//! `GET /api/v1/builds/{build}/blobs/{digest}`, read token for the build: a blob that a manifest
//! of the build names, streamed from the backend.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use quorum_core::Digest;

use crate::Store;
use crate::auth::Read;
use crate::error::Error;

pub async fn get_blob(
    State(store): State<Arc<Store>>,
    read: Read,
    Path((build, digest)): Path<(String, String)>,
) -> Result<Response, Error> {
    let not_found = || super::not_in_build("blob", &build, &digest);
    let parsed: Digest = digest.parse().map_err(|_| not_found())?;
    if read.build != build
        || !crate::db::build_names_blob(&store.db, &read.tenant, &build, parsed).await?
    {
        return Err(not_found().into());
    }
    // The empty blob is never stored; every store holds it implicitly.
    let (size, body) = if parsed == Digest::empty() {
        (0, Body::empty())
    } else {
        let blob = store.blobs.get(parsed).await?;
        (blob.size, Body::from_stream(blob.body))
    };
    let headers = [
        (header::CONTENT_TYPE, "application/octet-stream".to_string()),
        (header::CONTENT_LENGTH, size.to_string()),
    ];
    Ok((headers, body).into_response())
}
