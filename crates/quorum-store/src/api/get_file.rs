//! `GET /api/v1/builds/{build}/files/{job}/{*path}`, read token for the build, and
//! `GET /api/v1/public/{tenant}/builds/{build}/files/{job}/{*path}`, no token, for a public
//! build: a file by the path a job's manifest gives it (the name it has as a subject of the
//! signed statement), with range requests. When the job's assignments recorded different bytes
//! at that path, none is picked: the answer is a conflict naming the path.

use std::collections::BTreeSet;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::Response;
use quorum_core::Manifest;
use quorum_core::names::check_relative_path;
use quorum_service::ApiError;

use super::read::{Scope, serve_blob};
use crate::Store;
use crate::auth::Read;
use crate::error::Error;

pub async fn get_file(
    State(store): State<Arc<Store>>,
    read: Read,
    Path((build, job, path)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> Result<Response, Error> {
    check(&job, &path)?;
    let scope = Scope::token(read, &build, "file", &format!("{job}/{path}"))?;
    file(&store, &scope, &job, &path, &headers).await
}

pub async fn get_public_file(
    State(store): State<Arc<Store>>,
    Path((tenant, build, job, path)): Path<(String, String, String, String)>,
    headers: HeaderMap,
) -> Result<Response, Error> {
    check(&job, &path)?;
    let scope = Scope::public(&store, &tenant, &build, "file", &format!("{job}/{path}")).await?;
    file(&store, &scope, &job, &path, &headers).await
}

/// Refuses paths no manifest can hold (`..`, `.`, empty segments, absolute, backslashes), so
/// that traversal attempts get an error saying so rather than a plain "not found".
fn check(job: &str, path: &str) -> Result<(), Error> {
    quorum_core::names::check_job_name(job)
        .map_err(|e| ApiError::bad_request(format!("invalid job name in the path: {e}")))?;
    check_relative_path(path)
        .map_err(|e| ApiError::bad_request(format!("invalid file path `{path}`: {e}")))?;
    Ok(())
}

async fn file(
    store: &Store,
    scope: &Scope,
    job: &str,
    path: &str,
    headers: &HeaderMap,
) -> Result<Response, Error> {
    let bodies = crate::db::job_manifests(&store.db, &scope.tenant, &scope.build, job).await?;
    let mut found = BTreeSet::new();
    for body in bodies {
        let manifest: Manifest = serde_json::from_slice(&body)
            .map_err(|e| ApiError::internal(format!("a stored manifest does not parse: {e}")))?;
        if let Ok(i) = manifest
            .entries
            .binary_search_by(|e| e.path.as_str().cmp(path))
        {
            let e = &manifest.entries[i];
            found.insert((e.digest.to_string(), e.digest, e.size));
        }
    }
    let mut found = found.into_iter();
    match (found.next(), found.next()) {
        (None, _) => {
            Err(super::not_in_build("file", &scope.build, &format!("{job}/{path}")).into())
        }
        (Some((_, digest, size)), None) => {
            // Where its row says it is; the manifest gives the size.
            let packed = crate::db::stored_blob(&store.db, digest)
                .await?
                .and_then(|(_, packed)| packed);
            serve_blob(store, scope, digest, (size, packed), headers).await
        }
        (Some(_), Some(_)) => Err(ApiError::conflict(format!(
            "the assignments of job `{job}` recorded different contents for `{path}`; fetch by digest instead"
        ))
        .into()),
    }
}
