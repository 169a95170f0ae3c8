//! `GET /api/v1/builds/{build}/blobs/{digest}`, read token for the build, and
//! `GET /api/v1/public/{tenant}/builds/{build}/blobs/{digest}`, no token, for a public build: a
//! blob that a manifest of the build names, streamed from the backend, with range requests.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::Response;
use quorum_core::Digest;

use super::read::{Scope, serve_blob};
use crate::Store;
use crate::auth::Read;
use crate::error::Error;

pub async fn get_blob(
    State(store): State<Arc<Store>>,
    read: Read,
    Path((build, digest)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, Error> {
    let scope = Scope::token(read, &build, "blob", &digest)?;
    blob(&store, &scope, &digest, &headers).await
}

pub async fn get_public_blob(
    State(store): State<Arc<Store>>,
    Path((tenant, build, digest)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> Result<Response, Error> {
    let scope = Scope::public(&store, &tenant, &build, "blob", &digest).await?;
    blob(&store, &scope, &digest, &headers).await
}

async fn blob(
    store: &Store,
    scope: &Scope,
    digest: &str,
    headers: &HeaderMap,
) -> Result<Response, Error> {
    let not_found = || super::not_in_build("blob", &scope.build, digest);
    let parsed: Digest = digest.parse().map_err(|_| not_found())?;
    if !crate::db::build_names_blob(&store.db, &scope.tenant, &scope.build, parsed).await? {
        return Err(not_found().into());
    }
    let stored = if parsed == Digest::empty() {
        (0, None)
    } else {
        crate::db::stored_blob(&store.db, parsed)
            .await?
            .ok_or_else(not_found)?
    };
    serve_blob(store, scope, parsed, stored, headers).await
}
