//! The store's metadata in SQLite: which blobs exist, which tenants uploaded them, and the
//! manifests recorded per assignment. Every query is scoped by tenant.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::Duration;

use quorum_core::{Digest, Manifest};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};
use sqlx::{Row as _, SqliteConnection};

/// Digests per `IN (...)` query, well under SQLite's bound-parameter limit.
const CHUNK: usize = 500;
/// Rows per multi-row insert into `build_blobs` (four parameters each).
const INSERT_CHUNK: usize = 200;

/// Opens (creating if needed) the database and brings its schema up to date.
pub async fn open(path: &Path) -> Result<SqlitePool, sqlx::Error> {
    let options = SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .foreign_keys(true)
        .busy_timeout(Duration::from_secs(30));
    let pool = SqlitePoolOptions::new()
        .max_connections(4)
        .connect_with(options)
        .await?;
    sqlx::migrate!("./migrations").run(&pool).await?;
    Ok(pool)
}

fn placeholders(n: usize) -> String {
    vec!["?"; n].join(", ")
}

fn parse_digest(s: &str) -> Result<Digest, sqlx::Error> {
    s.parse().map_err(|e| sqlx::Error::Decode(Box::new(e)))
}

/// The sizes of those of `digests` that `tenant` has uploaded.
pub async fn tenant_blobs(
    conn: &mut SqliteConnection,
    tenant: &str,
    digests: &[Digest],
) -> Result<HashMap<Digest, u64>, sqlx::Error> {
    let unique: Vec<String> = digests
        .iter()
        .collect::<HashSet<_>>()
        .into_iter()
        .map(Digest::to_string)
        .collect();
    let mut found = HashMap::new();
    for chunk in unique.chunks(CHUNK) {
        let sql = format!(
            "SELECT b.digest, b.size FROM tenant_blobs t JOIN blobs b ON b.digest = t.digest \
             WHERE t.tenant = ? AND t.digest IN ({})",
            placeholders(chunk.len())
        );
        let mut query = sqlx::query(&sql).bind(tenant);
        for d in chunk {
            query = query.bind(d);
        }
        for row in query.fetch_all(&mut *conn).await? {
            let size: i64 = row.try_get(1)?;
            found.insert(parse_digest(row.try_get(0)?)?, size as u64);
        }
    }
    Ok(found)
}

/// Records that `tenant` uploaded a verified blob.
pub async fn link_blob(
    pool: &SqlitePool,
    tenant: &str,
    digest: Digest,
    size: u64,
) -> Result<(), sqlx::Error> {
    let now = quorum_service::now_unix();
    let digest = digest.to_string();
    let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
    sqlx::query(
        "INSERT INTO blobs (digest, size, stored_at) VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
    )
    .bind(&digest)
    .bind(size as i64)
    .bind(now)
    .execute(&mut *tx)
    .await?;
    sqlx::query("INSERT INTO tenant_blobs (tenant, digest, linked_at) VALUES (?, ?, ?) ON CONFLICT DO NOTHING")
        .bind(tenant)
        .bind(&digest)
        .bind(now)
        .execute(&mut *tx)
        .await?;
    tx.commit().await
}

/// Where a manifest is recorded: one assignment of one job of one build of a tenant.
#[derive(Debug, Clone)]
pub struct Slot {
    pub tenant: String,
    pub build: String,
    pub job: String,
    pub assignment: String,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Recorded {
    New,
    /// The assignment had already recorded this very manifest.
    Again,
    /// The assignment had already recorded another manifest.
    Conflict(Digest),
    /// An entry names a blob the tenant has not uploaded.
    MissingBlob {
        path: String,
        digest: Digest,
    },
    /// An entry's size differs from the size of the blob it names.
    WrongSize {
        path: String,
        claimed: u64,
        stored: u64,
    },
}

/// Records `manifest` for `slot`, if every blob it names is the tenant's own. One immediate
/// transaction, so the check and the write see the same state and concurrent writers queue.
pub async fn record_manifest(
    pool: &SqlitePool,
    slot: &Slot,
    manifest: &Manifest,
    digest: Digest,
) -> Result<Recorded, sqlx::Error> {
    let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
    let existing: Option<String> =
        sqlx::query_scalar("SELECT digest FROM manifests WHERE tenant = ? AND build = ? AND job = ? AND assignment = ?")
            .bind(&slot.tenant)
            .bind(&slot.build)
            .bind(&slot.job)
            .bind(&slot.assignment)
            .fetch_optional(&mut *tx)
            .await?;
    if let Some(existing) = existing {
        let existing = parse_digest(&existing)?;
        return Ok(if existing == digest {
            Recorded::Again
        } else {
            Recorded::Conflict(existing)
        });
    }
    let empty = Digest::empty();
    let named: Vec<Digest> = manifest
        .entries
        .iter()
        .map(|e| e.digest)
        .filter(|d| *d != empty)
        .collect();
    let stored = tenant_blobs(&mut tx, &slot.tenant, &named).await?;
    for e in &manifest.entries {
        let size = if e.digest == empty {
            0
        } else {
            match stored.get(&e.digest) {
                Some(size) => *size,
                None => {
                    return Ok(Recorded::MissingBlob {
                        path: e.path.clone(),
                        digest: e.digest,
                    });
                }
            }
        };
        if size != e.size {
            return Ok(Recorded::WrongSize {
                path: e.path.clone(),
                claimed: e.size,
                stored: size,
            });
        }
    }
    let digest_text = digest.to_string();
    sqlx::query("INSERT INTO manifest_bodies (digest, body) VALUES (?, ?) ON CONFLICT DO NOTHING")
        .bind(&digest_text)
        .bind(manifest.canonical_bytes())
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "INSERT INTO manifests (tenant, build, job, assignment, digest, recorded_at) VALUES (?, ?, ?, ?, ?, ?)",
    )
    .bind(&slot.tenant)
    .bind(&slot.build)
    .bind(&slot.job)
    .bind(&slot.assignment)
    .bind(&digest_text)
    .bind(quorum_service::now_unix())
    .execute(&mut *tx)
    .await?;
    let unique: Vec<String> = manifest
        .entries
        .iter()
        .map(|e| e.digest)
        .collect::<HashSet<_>>()
        .iter()
        .map(Digest::to_string)
        .collect();
    for chunk in unique.chunks(INSERT_CHUNK) {
        let sql = format!(
            "INSERT INTO build_blobs (tenant, build, digest, manifest) VALUES {} ON CONFLICT DO NOTHING",
            vec!["(?, ?, ?, ?)"; chunk.len()].join(", ")
        );
        let mut query = sqlx::query(&sql);
        for d in chunk {
            query = query
                .bind(&slot.tenant)
                .bind(&slot.build)
                .bind(d)
                .bind(&digest_text);
        }
        query.execute(&mut *tx).await?;
    }
    tx.commit().await?;
    Ok(Recorded::New)
}

/// The canonical body of a manifest recorded in `build` of `tenant`.
pub async fn manifest_body(
    pool: &SqlitePool,
    tenant: &str,
    build: &str,
    digest: Digest,
) -> Result<Option<Vec<u8>>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT b.body FROM manifests m JOIN manifest_bodies b ON b.digest = m.digest \
         WHERE m.tenant = ? AND m.build = ? AND m.digest = ? LIMIT 1",
    )
    .bind(tenant)
    .bind(build)
    .bind(digest.to_string())
    .fetch_optional(pool)
    .await
}

/// Whether a manifest recorded in `build` of `tenant` names the blob.
pub async fn build_names_blob(
    pool: &SqlitePool,
    tenant: &str,
    build: &str,
    digest: Digest,
) -> Result<bool, sqlx::Error> {
    let hit: Option<i64> = sqlx::query_scalar(
        "SELECT 1 FROM build_blobs WHERE tenant = ? AND build = ? AND digest = ? LIMIT 1",
    )
    .bind(tenant)
    .bind(build)
    .bind(digest.to_string())
    .fetch_optional(pool)
    .await?;
    Ok(hit.is_some())
}
