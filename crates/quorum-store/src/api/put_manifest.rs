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
    let answer = match crate::db::record_manifest(&store.db, &slot, Some(&manifest), digest, None)
        .await?
    {
        Recorded::New | Recorded::Again => Json(ManifestStored { digest }),
        Recorded::Missing(missing) => {
            let (path, digest) = &missing[0];
            return Err(ApiError::bad_request(format!(
                "manifest entry `{path}` names blob {digest}, which this tenant has not uploaded; upload it first"
            ))
            .into());
        }
        refused => return Err(refusal(&slot, digest, refused).into()),
    };
    tracing::info!(
        tenant = %slot.tenant, build = %slot.build, job = %slot.job, assignment = %slot.assignment, %digest,
        entries = manifest.entries.len(), "manifest recorded"
    );
    Ok(answer)
}

/// The error for an outcome that records nothing and is not about missing blobs.
pub(super) fn refusal(
    slot: &crate::db::Slot,
    digest: quorum_core::Digest,
    r: Recorded,
) -> ApiError {
    match r {
        Recorded::Conflict(existing) => ApiError::conflict(format!(
            "assignment `{}` of job `{}` already recorded manifest {existing}; refusing a different one ({digest})",
            slot.assignment, slot.job
        )),
        Recorded::WrongSize {
            path,
            claimed,
            stored,
        } => ApiError::bad_request(format!(
            "manifest entry `{path}` says {claimed} bytes but its blob has {stored}"
        )),
        Recorded::BaseUnknown(base) => super::unknown_base(base),
        Recorded::New | Recorded::Again | Recorded::Missing(_) => {
            ApiError::internal(format!("manifest {digest}: {r:?} is not a refusal"))
        }
    }
}
