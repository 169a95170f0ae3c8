//! Taking in blobs for a tenant: the two functions the upload endpoints call, one blob
//! ([`store_blob`]) or a batch ([`store_blobs`]). The bytes are received, verified, synced and
//! (in a local directory) staged under their digests by the backend first, without any lock;
//! then one serialized metadata transaction checks the tenant's quota (and, for a batch, the
//! token's file and byte counters), places the bytes, and links the blobs to the tenant.
//! Garbage collection deletes bytes inside the same kind of transaction, so it can never delete
//! bytes that an upload has just linked.

use std::collections::HashMap;

use axum::http::StatusCode;
use futures::future::BoxFuture;
use quorum_core::Digest;
use quorum_service::ApiError;

use crate::Store;
use crate::auth::Limits;
use crate::blobs::{BlobError, ByteStream, Packed, Received};
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
    let started = std::time::Instant::now();
    let unstage = store.blobs.unstage_all(&received);
    let unstage = sync(store, store.blobs.sync_all(&received), unstage).await?;
    let synced = started.elapsed();
    let mut tx = store.db.write().await?;
    let locked = started.elapsed();
    let linked = db::is_linked(&mut tx, tenant, digest).await?;
    if let Some(limit) = limit.filter(|_| !linked) {
        let stored = db::stored_bytes(&mut tx, tenant).await?;
        if stored.saturating_add(size) > limit {
            return Err(refuse(tx, unstage, over_quota(tenant, stored, size, limit)).await);
        }
    }
    // Placed even when the store holds the blob already: the bytes are identical, and a copy
    // lost from the backend behind the store's back comes back this way.
    store.blobs.place_all(received).await?;
    let placed = started.elapsed();
    db::link_blob(&mut tx, tenant, digest, size, size).await?;
    tx.commit().await?;
    tracing::debug!(
        %digest, size, ?synced, ?locked, ?placed, committed = ?started.elapsed(),
        "blob kept"
    );
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
    let packed: HashMap<Digest, Packed> = items
        .iter()
        .filter_map(|(d, r)| Some((*d, r.packed()?)))
        .collect();
    let received: u64 = sizes.iter().map(|(_, n)| n).sum();
    let items: Vec<Box<dyn Received>> = items.into_iter().map(|(_, r)| r).collect();
    let started = std::time::Instant::now();
    let unstage = store.blobs.unstage_all(&items);
    let unstage = sync(store, store.blobs.sync_all(&items), unstage).await?;
    let synced = started.elapsed();
    let mut tx = store.db.write().await?;
    let locked = started.elapsed();
    let linked = match admit(store, &mut tx, tenant, limits, &sizes, received).await {
        Ok(linked) => linked,
        Err(e) => return Err(refuse(tx, unstage, e).await),
    };
    store.blobs.place_all(items).await?;
    let placed = started.elapsed();
    db::link_blobs(&mut tx, tenant, &sizes, &packed, &linked, received).await?;
    tx.commit().await?;
    tracing::debug!(
        blobs = sizes.len(), ?synced, ?locked, ?placed, committed = ?started.elapsed(),
        "batch kept"
    );
    Ok(received)
}

/// What the transaction checks before a batch is kept: its counts against the token and the
/// tenant's quota. Returns which of the blobs the tenant had linked already.
async fn admit(
    store: &Store,
    tx: &mut db::Tx,
    tenant: &str,
    limits: &Limits,
    sizes: &[(Digest, u64)],
    received: u64,
) -> Result<HashMap<Digest, u64>, Error> {
    crate::usage::count_batch(tx, limits, sizes.len() as u64, received).await?;
    let digests: Vec<Digest> = sizes.iter().map(|(d, _)| *d).collect();
    let linked = db::tenant_blobs(tx, tenant, &digests).await?;
    if let Some(limit) = store.quota.limit(tenant) {
        let mut new = HashMap::new();
        for (d, n) in sizes {
            if !linked.contains_key(d) {
                new.insert(*d, *n);
            }
        }
        let adding: u64 = new.values().sum();
        let stored = db::stored_bytes(tx, tenant).await?;
        if adding > 0 && stored.saturating_add(adding) > limit {
            return Err(over_quota(tenant, stored, adding, limit));
        }
    }
    Ok(linked)
}

/// Work on a batch's blobs, prepared while they are at hand and run later (the blobs are `Send`
/// but not `Sync`, so no reference to them is held across an await).
type Pending = BoxFuture<'static, Result<(), BlobError>>;

/// Runs `synced` (the blobs' [`BlobBackend::sync_all`](crate::blobs::BlobBackend::sync_all),
/// before the lock) and hands back `unstage`, which removes what it staged should the blobs be
/// refused ([`refuse`]); on an error, removes it at once, under the lock.
async fn sync(store: &Store, synced: Pending, unstage: Pending) -> Result<Pending, Error> {
    let Err(e) = synced.await else {
        return Ok(unstage);
    };
    match store.db.write().await {
        Ok(tx) => Err(refuse(tx, unstage, e.into()).await),
        // Left to garbage collection, as bytes without metadata.
        Err(_) => Err(e.into()),
    }
}

/// Refuses blobs with `error`: `unstage` removes what was staged for them while `tx` still holds
/// the write lock (so no upload places the same digest meanwhile), then `tx` is rolled back.
async fn refuse(tx: db::Tx, unstage: Pending, error: Error) -> Error {
    if let Err(e) = unstage.await {
        tracing::warn!(error = %e, "cannot remove staged blobs; garbage collection will");
    }
    drop(tx);
    error
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
