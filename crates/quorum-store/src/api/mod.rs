//! The store's HTTP API (v1): one file per endpoint, each stating its method, route and token.

mod get_blob;
mod get_file;
mod get_manifest;
mod missing;
mod post_manifest;
mod put_blob;
mod put_blobs;
mod put_manifest;
mod read;
mod revoke;
mod statement;
mod usage;

pub(crate) use post_manifest::LastRecorded;

use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::extract::rejection::JsonRejection;
use axum::routing::{get, post, put};
use quorum_service::ApiError;

use crate::Store;

/// Largest manifest (or statement) body accepted: 100 000 entries with long paths fit.
const MANIFEST_MAX_BYTES: usize = 64 << 20;

pub fn router(store: Arc<Store>) -> Router {
    Router::new()
        .route("/api/v1/missing", post(missing::missing))
        // Blob bodies stream to disk and are capped by `max_blob_bytes` as they arrive.
        .route(
            "/api/v1/blobs/{digest}",
            put(put_blob::put_blob).layer(DefaultBodyLimit::disable()),
        )
        // Batches are capped by frame count and content bytes as they arrive.
        .route(
            "/api/v1/blobs",
            post(put_blobs::put_blobs).layer(DefaultBodyLimit::disable()),
        )
        .route(
            "/api/v1/manifest",
            put(put_manifest::put_manifest)
                .post(post_manifest::post_manifest)
                .layer(DefaultBodyLimit::max(MANIFEST_MAX_BYTES)),
        )
        .route(
            "/api/v1/builds/{build}/manifests/{digest}",
            get(get_manifest::get_manifest),
        )
        .route(
            "/api/v1/builds/{build}/blobs/{digest}",
            get(get_blob::get_blob),
        )
        .route(
            "/api/v1/builds/{build}/files/{job}/{*path}",
            get(get_file::get_file),
        )
        .route(
            "/api/v1/builds/{build}/statement",
            put(statement::put_statement)
                .get(statement::get_statement)
                .layer(DefaultBodyLimit::max(MANIFEST_MAX_BYTES)),
        )
        .route(
            "/api/v1/public/{tenant}/builds/{build}/blobs/{digest}",
            get(get_blob::get_public_blob),
        )
        .route(
            "/api/v1/public/{tenant}/builds/{build}/files/{job}/{*path}",
            get(get_file::get_public_file),
        )
        .route(
            "/api/v1/public/{tenant}/builds/{build}/statement",
            get(statement::get_public_statement),
        )
        .route("/api/v1/usage", get(usage::usage))
        .route("/api/v1/revoke", post(revoke::revoke))
        .with_state(store)
}

fn bad_json(e: JsonRejection) -> ApiError {
    ApiError::new(
        e.status(),
        format!("unreadable request body: {}", e.body_text()),
    )
}

/// The one answer for anything a read token cannot see, whether or not it exists for someone
/// else, so that probing reveals nothing.
fn not_in_build(what: &str, build: &str, digest: &str) -> ApiError {
    ApiError::not_found(format!("build `{build}` has no {what} {digest}"))
}

/// The one answer for a base manifest the tenant has not recorded, whether or not another
/// tenant has: a relative manifest reveals nothing of other tenants' manifests.
fn unknown_base(base: quorum_core::Digest) -> ApiError {
    ApiError::not_found(format!(
        "base manifest {base} is not a manifest of this tenant; send the manifest in full"
    ))
}
