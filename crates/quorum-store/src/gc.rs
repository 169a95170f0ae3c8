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
//!
//! A pack (the blobs of one batch, `blobs.rs`) is deleted with the last of its blobs' rows, in
//! the transaction that deletes that row; a pack no row names at all is bytes without metadata.
//! A pack that is mostly dead is rewritten ([`repack`]): its live blobs are read, verified and
//! written into a new pack outside the lock, as an upload's are, then moved under it (each only
//! if its row still names the old place) before the old pack goes.

use std::collections::BTreeSet;

use futures::TryStreamExt as _;
use quorum_core::Digest;

use crate::GcConfig;
use crate::blobs::{BlobBackend, BlobError, PackId, Packed, Pieces, Received};
use crate::db::{self, Db};
use crate::error::Error;

/// Blobs deleted per transaction, so uploads wait at most that long for the write lock.
const BATCH: usize = 100;
/// A pack is rewritten when it is more than twice as long as its live bytes rounded up to
/// whole pages (a pack written with direct writes is padded to them).
const PAGE: u64 = 4096;
/// Live bytes gathered into one new pack by [`repack`].
const REPACK_BYTES: u64 = 64 << 20;
/// Live bytes handed to the pack writer at a time.
const REPACK_GROUP: u64 = 1 << 20;

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
    /// Packs deleted: their last blob went, or no row named them.
    pub packs: u64,
    /// Mostly dead packs rewritten.
    pub repacked: u64,
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
        let mut touched = BTreeSet::new();
        for (digest, packed) in &garbage {
            match packed {
                None => blobs.delete(*digest).await?,
                Some(p) => _ = touched.insert(p.pack.clone()),
            }
            db::delete_blob_row(&mut tx, *digest).await?;
        }
        // A pack goes with the last of its blobs.
        let touched: Vec<PackId> = touched.into_iter().collect();
        let live = db::pack_live(&mut tx, &touched).await?;
        for pack in touched.into_iter().filter(|p| !live.contains_key(p)) {
            blobs.delete_pack(pack).await?;
            collected.packs += 1;
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
    let mut sparse = Vec::new();
    for chunk in blobs.packs().await?.chunks(BATCH) {
        let mut tx = db.write().await?;
        let ids: Vec<PackId> = chunk.iter().map(|(p, _)| p.clone()).collect();
        let live = db::pack_live(&mut tx, &ids).await?;
        for (pack, len) in chunk {
            match live.get(pack) {
                // Bytes without metadata; a batch's pack staged and not yet recorded is
                // placed again when it is (`Received::reveal`).
                None => {
                    blobs.delete_pack(pack.clone()).await?;
                    collected.packs += 1;
                }
                Some(&bytes) if *len > 2 * bytes.next_multiple_of(PAGE) => {
                    sparse.push((pack.clone(), bytes));
                }
                Some(_) => {}
            }
        }
        tx.commit().await?;
    }
    let mut round: Vec<PackId> = Vec::new();
    let mut round_bytes = 0;
    for (pack, bytes) in sparse {
        if round_bytes + bytes > REPACK_BYTES && !round.is_empty() {
            collected.repacked += repack(db, blobs, std::mem::take(&mut round)).await?;
            round_bytes = 0;
        }
        round.push(pack);
        round_bytes += bytes;
    }
    if !round.is_empty() {
        collected.repacked += repack(db, blobs, round).await?;
    }
    Ok(collected)
}

/// Writes the live blobs of `packs` into one new pack and moves their rows there; deletes each
/// old pack left without rows. Returns how many went.
async fn repack(db: &Db, blobs: &dyn BlobBackend, packs: Vec<PackId>) -> Result<u64, Error> {
    let Some(mut writer) = blobs.pack() else {
        return Ok(0);
    };
    let mut moves: Vec<(Digest, Packed)> = Vec::new();
    let mut items: Vec<Box<dyn Received>> = Vec::new();
    let mut group: Vec<(Digest, Pieces)> = Vec::new();
    let mut group_bytes = 0;
    for pack in &packs {
        let rows = {
            let mut conn = db.pool().acquire().await?;
            db::pack_blobs(&mut conn, pack).await?
        };
        for (digest, size, from) in rows {
            let bytes = match read(blobs, digest, &from, size).await {
                Ok(bytes) => bytes,
                // Moved, or collected, since the rows were read.
                Err(BlobError::Gone(_)) => continue,
                Err(e) => return Err(e.into()),
            };
            group_bytes += size;
            group.push((digest, bytes));
            moves.push((digest, from));
            if group_bytes >= REPACK_GROUP {
                let written = writer.whole(std::mem::take(&mut group)).await;
                items.extend(written.map_err(|(_, e)| e)?);
                group_bytes = 0;
            }
        }
    }
    if !group.is_empty() {
        items.extend(writer.whole(group).await.map_err(|(_, e)| e)?);
    }
    let to: Vec<Packed> = items.iter().filter_map(|item| item.packed()).collect();
    blobs.sync_all(&items).await?;
    let mut tx = db.write().await?;
    blobs.place_all(items).await?;
    for ((digest, from), to) in moves.iter().zip(&to) {
        db::move_blob(&mut tx, *digest, from, to).await?;
    }
    tx.commit().await?;
    let mut tx = db.write().await?;
    let live = db::pack_live(&mut tx, &packs).await?;
    let mut gone = 0;
    for pack in packs.into_iter().filter(|p| !live.contains_key(p)) {
        blobs.delete_pack(pack).await?;
        gone += 1;
    }
    tx.commit().await?;
    Ok(gone)
}

/// A packed blob's bytes, whole.
async fn read(
    blobs: &dyn BlobBackend,
    digest: Digest,
    at: &Packed,
    size: u64,
) -> Result<Pieces, BlobError> {
    let stream = blobs.get(digest, Some(at.clone()), 0..size).await?;
    Ok(Pieces(stream.try_collect().await?))
}
