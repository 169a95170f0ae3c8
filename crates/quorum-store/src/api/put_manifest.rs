//! `PUT /api/v1/manifest`, upload token: records the assignment's manifest. Every blob it names
//! must already be stored for the tenant; an assignment records one manifest, idempotently.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::extract::rejection::JsonRejection;
use quorum_api::v1::store::ManifestStored;
use quorum_core::Manifest;
use quorum_service::ApiError;

use crate::Store;
use crate::auth::Upload;
use crate::db::Recorded;
use crate::error::Error;

pub async fn put_manifest(
    State(store): State<Arc<Store>>,
    Upload { slot, .. }: Upload,
    body: Result<Json<Manifest>, JsonRejection>,
) -> Result<Json<ManifestStored>, Error> {
    let Json(manifest) = body.map_err(super::bad_json)?;
    manifest
        .validate()
        .map_err(|e| ApiError::bad_request(format!("invalid manifest: {e}")))?;
    let digest = manifest.digest();
    let answer = match crate::db::record_manifest(&store.db, &slot, &manifest, digest).await? {
        Recorded::New | Recorded::Again => Json(ManifestStored { digest }),
        Recorded::Conflict(existing) => {
            return Err(ApiError::conflict(format!(
                "assignment `{}` of job `{}` already recorded manifest {existing}; refusing a different one ({digest})",
                slot.assignment, slot.job
            ))
            .into());
        }
        Recorded::MissingBlob { path, digest } => {
            return Err(ApiError::bad_request(format!(
                "manifest entry `{path}` names blob {digest}, which this tenant has not uploaded; upload it first"
            ))
            .into());
        }
        Recorded::WrongSize {
            path,
            claimed,
            stored,
        } => {
            return Err(ApiError::bad_request(format!(
                "manifest entry `{path}` says {claimed} bytes but its blob has {stored}"
            ))
            .into());
        }
    };
    tracing::info!(
        tenant = %slot.tenant, build = %slot.build, job = %slot.job, assignment = %slot.assignment, %digest,
        entries = manifest.entries.len(), "manifest recorded"
    );
    Ok(answer)
}
