//! `PUT /api/v1/builds/{build}/statement[?public=true]`, revoke token of the build's controller:
//! records the build's signed statement (a DSSE envelope) and whether the build is public.
//! `GET /api/v1/builds/{build}/statement`, read token, and
//! `GET /api/v1/public/{tenant}/builds/{build}/statement`, no token: the envelope, served beside
//! the artifacts.
//!
//! Who may publish: only the build's controller, with a token of its own. The revoke token is
//! the one build-scoped token only a controller ever holds (workers get job and upload tokens,
//! consumers read tokens), and its tenant is the build's tenant, so no worker and no other
//! tenant can make anything public. The store does not hold the controller's signing key and
//! does not check the signature (consumers do); it checks that the envelope is a statement whose
//! every subject is a blob that the build's manifests name, so a statement cannot expose
//! anything outside the build.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use quorum_api::v1::store::{StatementQuery, StatementStored};
use quorum_core::Digest;
use quorum_core::attest::{Envelope, STATEMENT_TYPE};
use quorum_service::ApiError;

use super::read::Scope;
use crate::Store;
use crate::auth::{Read, Revoke};
use crate::error::Error;

pub async fn put_statement(
    State(store): State<Arc<Store>>,
    who: Revoke,
    Path(build): Path<String>,
    Query(query): Query<StatementQuery>,
    body: Bytes,
) -> Result<Json<StatementStored>, Error> {
    if who.build != build {
        return Err(ApiError::forbidden(format!(
            "this token is for build `{}`, not `{build}`",
            who.build
        ))
        .into());
    }
    let bad = |why: String| ApiError::bad_request(format!("invalid statement envelope: {why}"));
    let envelope: Envelope =
        serde_json::from_slice(&body).map_err(|e| bad(format!("not a DSSE envelope: {e}")))?;
    let payload = base64::engine::general_purpose::STANDARD
        .decode(&envelope.payload)
        .map_err(|_| bad("payload is not base64".into()))?;
    let statement: serde_json::Value =
        serde_json::from_slice(&payload).map_err(|e| bad(format!("payload is not JSON: {e}")))?;
    if statement.get("_type").and_then(|t| t.as_str()) != Some(STATEMENT_TYPE) {
        return Err(bad(format!("payload `_type` is not {STATEMENT_TYPE}")).into());
    }
    let subjects = quorum_core::attest::subjects(&statement).map_err(|e| bad(e.to_string()))?;
    for s in &subjects {
        let named = format!("sha256:{}", s.digest.sha256)
            .parse::<Digest>()
            .ok()
            .filter(|d| *d != Digest::empty());
        let ok = match named {
            Some(d) => crate::db::build_names_blob(&store.db, &who.tenant, &build, d).await?,
            None => s.digest.sha256 == Digest::empty().hex(),
        };
        if !ok {
            return Err(bad(format!(
                "subject `{}` (sha256 {}) is not an artifact of build `{build}`",
                s.name, s.digest.sha256
            ))
            .into());
        }
    }
    crate::db::record_statement(&store.db, &who.tenant, &build, &body, query.public).await?;
    tracing::info!(tenant = %who.tenant, %build, subjects = subjects.len(), public = query.public, "statement recorded");
    Ok(Json(StatementStored {
        subjects: subjects.len(),
        public: query.public,
    }))
}

pub async fn get_statement(
    State(store): State<Arc<Store>>,
    read: Read,
    Path(build): Path<String>,
) -> Result<Response, Error> {
    let scope = Scope::token(read, &build, "statement", "")?;
    statement(&store, &scope).await
}

pub async fn get_public_statement(
    State(store): State<Arc<Store>>,
    Path((tenant, build)): Path<(String, String)>,
) -> Result<Response, Error> {
    let scope = Scope::public(&store, &tenant, &build, "statement", "").await?;
    statement(&store, &scope).await
}

async fn statement(store: &Store, scope: &Scope) -> Result<Response, Error> {
    let (envelope, _) = crate::db::statement(&store.db, &scope.tenant, &scope.build)
        .await?
        .ok_or_else(|| super::not_in_build("statement", &scope.build, ""))?;
    Ok(([(header::CONTENT_TYPE, "application/json")], envelope).into_response())
}
