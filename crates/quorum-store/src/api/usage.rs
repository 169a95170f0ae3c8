//! `GET /api/v1/usage`, revoke token of the tenant's controller: the bytes the tenant stores
//! here and the bytes it has transferred in and out. A tenant sees only its own line; the store's
//! operator sees every tenant with `quorum store usage`.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use quorum_api::v1::store::TenantUsage;

use crate::Store;
use crate::auth::Revoke;
use crate::error::Error;

pub async fn usage(
    State(store): State<Arc<Store>>,
    who: Revoke,
) -> Result<Json<TenantUsage>, Error> {
    let line = crate::db::usage(&store.db, Some(&who.tenant))
        .await?
        .into_iter()
        .next();
    Ok(Json(match line {
        Some(u) => TenantUsage {
            tenant: u.tenant,
            stored_bytes: u.stored_bytes,
            bytes_in: u.bytes_in,
            bytes_out: u.bytes_out,
        },
        None => TenantUsage {
            tenant: who.tenant,
            stored_bytes: 0,
            bytes_in: 0,
            bytes_out: 0,
        },
    }))
}
