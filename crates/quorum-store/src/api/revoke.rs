//! `POST /api/v1/revoke`, revoke token for a build: revokes tokens of that build and tenant,
//! seen here or not yet, so they are refused from then on even before `exp`. A controller calls
//! it when a job ends.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::extract::rejection::JsonRejection;
use quorum_api::v1::store::{RevokeRequest, RevokeResponse};
use quorum_service::ApiError;

use crate::Store;
use crate::auth::Revoke;
use crate::error::Error;

/// Most token ids one call may revoke.
pub const MAX_JTIS: usize = 10_000;

pub async fn revoke(
    State(store): State<Arc<Store>>,
    who: Revoke,
    body: Result<Json<RevokeRequest>, JsonRejection>,
) -> Result<Json<RevokeResponse>, Error> {
    let Json(req) = body.map_err(super::bad_json)?;
    if req.jtis.len() > MAX_JTIS {
        let n = req.jtis.len();
        return Err(ApiError::bad_request(format!(
            "asked to revoke {n} tokens; send at most {MAX_JTIS} per call"
        ))
        .into());
    }
    let keep_until = quorum_service::now_unix() + crate::auth::MAX_TOKEN_LIFETIME_SECS;
    let revoked = crate::usage::revoke(
        &store.db,
        &who.iss,
        &who.tenant,
        &who.build,
        &req.jtis,
        keep_until,
    )
    .await?;
    let unknown = req
        .jtis
        .into_iter()
        .filter(|j| !revoked.contains(j))
        .collect();
    tracing::info!(tenant = %who.tenant, build = %who.build, revoked = revoked.len(), "tokens revoked");
    Ok(Json(RevokeResponse { revoked, unknown }))
}
