//! Garbage collection: drops manifests past retention, then tenants' links to blobs that none of
//! their manifests name once the provisional period is over (in cache mode, only as many as
//! needed to fit the cache, least recently used first), then the bytes of blobs nobody links, then bytes without any metadata (left by a crash between placing and committing).
//! Bytes are deleted inside a serialized write transaction that first re-checks that nothing
//! references them, and uploads place bytes inside the same kind of transaction (`ingest.rs`):
//! a manifest being recorded, or an upload finishing, either commits before the check and keeps
//! the blob, or after the deletion and then finds it gone (and stores it again). A manifest
//! recorded relative to another names most of its blobs through that root's references
//! (`manifest_bases`); expiring a root keeps its references while any recorded manifest links to
//! it, so what they name through it is never garbage.

use quorum_core::Digest;

use crate::GcConfig;
use crate::blobs::BlobBackend;
use crate::db::{self, Db};
use crate::error::Error;

/// Blobs deleted per transaction, so uploads wait at most that long for the write lock.
const BATCH: usize = 100;

/// What one garbage collection pass removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Collected {
    /// Manifests past `gc.retention_secs`.
    pub manifests: u64,
    /// Tenants' links to blobs no manifest of theirs names, older than `gc.provisional_secs`.
    pub links: u64,
    /// Blobs whose bytes were deleted because nobody linked them any more.
    pub blobs: u64,
    /// Stored bytes that had no metadata at all.
    pub orphans: u64,
}

pub async fn collect(db: &Db, blobs: &dyn BlobBackend, gc: &GcConfig) -> Result<Collected, Error> {
    let now = quorum_service::now_unix();
    let retain_after = gc.retention_secs.map(|s| now - db::int(s));
    let expired = db::expire(
        db,
        retain_after,
        now - db::int(gc.provisional_secs),
        gc.cache_bytes,
    )
    .await?;
    let mut collected = Collected {
        manifests: expired.manifests,
        links: expired.links,
        ..Collected::default()
    };
    loop {
        let mut tx = db.write().await?;
        let garbage = db::unreferenced_blobs(&mut tx, BATCH as i64).await?;
        if garbage.is_empty() {
            break;
        }
        for digest in &garbage {
            blobs.delete(*digest).await?;
            db::delete_blob_row(&mut tx, *digest).await?;
        }
        tx.commit().await?;
        collected.blobs += garbage.len() as u64;
    }
    let stored: Vec<Digest> = blobs.list().await?;
    for chunk in stored.chunks(BATCH) {
        let mut tx = db.write().await?;
        let known = db::known_blobs(&mut tx, chunk).await?;
        for digest in chunk.iter().filter(|d| !known.contains(d)) {
            blobs.delete(*digest).await?;
            collected.orphans += 1;
        }
        tx.commit().await?;
    }
    Ok(collected)
}
