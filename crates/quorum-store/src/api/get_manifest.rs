//! `GET /api/v1/builds/{build}/manifests/{digest}`, read token for the build: a manifest that an
//! assignment of the build recorded, in canonical form.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use quorum_core::Digest;

use crate::Store;
use crate::auth::Read;
use crate::error::Error;

pub async fn get_manifest(
    State(store): State<Arc<Store>>,
    read: Read,
    Path((build, digest)): Path<(String, String)>,
) -> Result<Response, Error> {
    let not_found = || super::not_in_build("manifest", &build, &digest);
    let parsed: Digest = digest.parse().map_err(|_| not_found())?;
    if read.build != build {
        return Err(not_found().into());
    }
    let body = crate::db::manifest_body(&store.db, &read.tenant, &build, parsed)
        .await?
        .ok_or_else(not_found)?;
    Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
}
