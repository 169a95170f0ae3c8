//! Taking in blobs for a tenant: the two functions the upload endpoints call, one blob
//! ([`store_blob`]) or a batch ([`store_blobs`]). The bytes are received, verified and synced by
//! the backend first, without any lock; then one serialized metadata transaction checks the
//! tenant's quota (and, for a batch, the token's file and byte counters), places the bytes, and
//! links the blobs to the tenant. Garbage collection deletes bytes inside the same kind of
//! transaction, so it can never delete bytes that an upload has just linked.

use axum::http::StatusCode;
use quorum_core::Digest;
use quorum_service::ApiError;

use crate::Store;
use crate::auth::Limits;
use crate::blobs::{ByteStream, Received};
use crate::db;
use crate::error::Error;

/// Receives `body` as blob `digest` for `tenant`; returns its size. `declared` is the size the
/// sender announced, if any: a blob that cannot fit the tenant's quota is refused before a byte
/// is read. On any error nothing is stored and nothing is linked.
pub async fn store_blob(
    store: &Store,
    tenant: &str,
    digest: Digest,
    body: ByteStream<'_>,
    declared: Option<u64>,
) -> Result<u64, Error> {
    let limit = store.quota.limit(tenant);
    if let (Some(limit), Some(n)) = (limit, declared) {
        let mut conn = store.db.pool().acquire().await?;
        let linked = db::is_linked(&mut conn, tenant, digest).await?;
        let stored = db::stored_bytes(&mut conn, tenant).await?;
        if !linked && stored.saturating_add(n) > limit {
            return Err(over_quota(tenant, stored, n, limit));
        }
    }
    let received = store
        .blobs
        .receive(digest, body, store.max_blob_bytes)
        .await?;
    let size = received.size();
    let received = vec![received];
    store.blobs.sync_all(&received).await?;
    let mut tx = store.db.write().await?;
    let linked = db::is_linked(&mut tx, tenant, digest).await?;
    if let Some(limit) = limit.filter(|_| !linked) {
        let stored = db::stored_bytes(&mut tx, tenant).await?;
        if stored.saturating_add(size) > limit {
            return Err(over_quota(tenant, stored, size, limit));
        }
    }
    // Placed even when the store holds the blob already: the bytes are identical, and a copy
    // lost from the backend behind the store's back comes back this way.
    store.blobs.place_all(received).await?;
    db::link_blob(&mut tx, tenant, digest, size, size).await?;
    tx.commit().await?;
    Ok(size)
}

/// Keeps a batch of blobs received and verified (digest, bytes) for `tenant`, all or none: one
/// transaction counts them against the token (`limits`: one file per blob, their bytes), checks
/// the tenant's quota once for the batch, places every blob (bytes synced in parallel before the
/// lock, each directory synced once) and links them. Returns the bytes kept.
pub async fn store_blobs(
    store: &Store,
    tenant: &str,
    limits: &Limits,
    items: Vec<(Digest, Box<dyn Received>)>,
) -> Result<u64, Error> {
    let sizes: Vec<(Digest, u64)> = items.iter().map(|(d, r)| (*d, r.size())).collect();
    let received: u64 = sizes.iter().map(|(_, n)| n).sum();
    let items: Vec<Box<dyn Received>> = items.into_iter().map(|(_, r)| r).collect();
    store.blobs.sync_all(&items).await?;
    let mut tx = store.db.write().await?;
    crate::usage::count_batch(&mut tx, limits, sizes.len() as u64, received).await?;
    let digests: Vec<Digest> = sizes.iter().map(|(d, _)| *d).collect();
    let linked = db::tenant_blobs(&mut tx, tenant, &digests).await?;
    if let Some(limit) = store.quota.limit(tenant) {
        let mut new = std::collections::HashMap::new();
        for (d, n) in &sizes {
            if !linked.contains_key(d) {
                new.insert(*d, *n);
            }
        }
        let adding: u64 = new.values().sum();
        let stored = db::stored_bytes(&mut tx, tenant).await?;
        if adding > 0 && stored.saturating_add(adding) > limit {
            return Err(over_quota(tenant, stored, adding, limit));
        }
    }
    store.blobs.place_all(items).await?;
    db::link_blobs(&mut tx, tenant, &sizes, &linked, received).await?;
    tx.commit().await?;
    Ok(received)
}

fn over_quota(tenant: &str, stored: u64, size: u64, limit: u64) -> Error {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!(
            "tenant `{tenant}` stores {stored} bytes; {size} more would exceed its quota of {limit} bytes; nothing was stored"
        ),
    )
    .into()
}
