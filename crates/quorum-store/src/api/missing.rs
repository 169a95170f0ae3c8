//! `POST /api/v1/missing`, upload token: which of the listed blobs this tenant must upload. A
//! blob stored only for other tenants is missing for this one. A blob reported present is kept
//! at least `gc.provisional_secs` from then on, for the manifest that will name it.

use std::collections::HashSet;
use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::extract::rejection::JsonRejection;
use quorum_api::v1::store::{MissingRequest, MissingResponse};
use quorum_core::Digest;
use quorum_service::ApiError;

use crate::Store;
use crate::auth::Upload;
use crate::error::Error;

/// Most digests one call may ask about.
pub const MAX_DIGESTS: usize = 10_000;

pub async fn missing(
    State(store): State<Arc<Store>>,
    Upload { slot, .. }: Upload,
    body: Result<Json<MissingRequest>, JsonRejection>,
) -> Result<Json<MissingResponse>, Error> {
    let Json(req) = body.map_err(super::bad_json)?;
    if req.digests.len() > MAX_DIGESTS {
        let n = req.digests.len();
        return Err(ApiError::bad_request(format!(
            "asked about {n} digests; ask about at most {MAX_DIGESTS} per call"
        ))
        .into());
    }
    // A first look without the write lock: what it finds missing may be reported so (at worst
    // the blob is sent again), and a first upload, where nearly everything is missing, does not
    // wait behind the batches being placed.
    let mut stored = {
        let mut conn = store.db.pool().acquire().await?;
        crate::db::tenant_blobs(&mut conn, &slot.tenant, &req.digests).await?
    };
    if !stored.is_empty() {
        // What is reported present is looked at again in one serialized transaction that
        // restarts its provisional lifetime before garbage collection can look at it again, so
        // it stays for the manifest.
        let seen: Vec<Digest> = stored.keys().copied().collect();
        let mut tx = store.db.write().await?;
        stored = crate::db::tenant_blobs(&mut tx, &slot.tenant, &seen).await?;
        let present: Vec<Digest> = stored.keys().copied().collect();
        crate::db::touch_links(&mut tx, &slot.tenant, &present, quorum_service::now_unix()).await?;
        tx.commit().await?;
    }
    let empty = Digest::empty();
    let mut seen = HashSet::new();
    let missing: Vec<Digest> = req
        .digests
        .into_iter()
        .filter(|d| *d != empty && !stored.contains_key(d) && seen.insert(*d))
        .collect();
    tracing::debug!(tenant = %slot.tenant, build = %slot.build, missing = missing.len(), "answered missing");
    Ok(Json(MissingResponse { missing }))
}
