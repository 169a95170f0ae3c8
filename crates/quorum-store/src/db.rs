//! The store's metadata, in SQLite (the default, `data_dir/store.db`) or PostgreSQL
//! (`database_url = "postgres://..."`), through one code path over sqlx's `Any` driver: the SQL
//! is written once with `$N` parameters, which both accept, and each has its own migrations.
//! Every query is scoped by tenant.
//!
//! Writes that must see a consistent state go through [`Db::write`], which serializes them:
//! `BEGIN IMMEDIATE` in SQLite, a transaction-scoped advisory lock in PostgreSQL. Placing a
//! blob's bytes and deleting them in garbage collection both happen inside such a transaction,
//! so a row in `blobs` always means the bytes are there.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::Path;
use std::time::Duration;

use quorum_core::{Digest, Manifest, ManifestEntry};
use sqlx::any::AnyPoolOptions;
use sqlx::{Any, AnyConnection, AnyPool, Row as _, Transaction};

use crate::blobs::{PackId, Packed};

/// Digests per `IN (...)` query, well under SQLite's bound-parameter limit.
const CHUNK: usize = 500;
/// Rows per multi-row insert (up to five parameters each: a thousand, well under both
/// databases' bounds).
const INSERT_CHUNK: usize = 200;
/// The PostgreSQL advisory lock every serialized write takes (an arbitrary constant: "QRMS").
const WRITE_LOCK: i64 = 0x5152_4d53;

static SQLITE: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");
static POSTGRES: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Sqlite,
    Postgres,
}

/// A serialized write transaction (see [`Db::write`]).
pub type Tx = Transaction<'static, Any>;

/// The metadata database.
#[derive(Debug, Clone)]
pub struct Db {
    pool: AnyPool,
    kind: Kind,
}

impl Db {
    /// Opens the SQLite database at `path`, creating it if needed.
    pub async fn open_sqlite(path: &Path) -> Result<Db, sqlx::Error> {
        let url = format!("sqlite://{}?mode=rwc", path.display());
        let db = Db::connect(&url, Kind::Sqlite).await?;
        // WAL lets downloads read while an upload commits; it is a property of the file, set
        // once (switching needs the file to itself, which `quorum store gc` beside a running
        // store would not have).
        let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
            .fetch_one(&db.pool)
            .await?;
        if !mode.eq_ignore_ascii_case("wal") {
            sqlx::query("PRAGMA journal_mode = WAL")
                .execute(&db.pool)
                .await?;
        }
        Ok(db)
    }

    /// Opens the PostgreSQL database at `url` (`postgres://...`), which must exist.
    pub async fn open_postgres(url: &str) -> Result<Db, sqlx::Error> {
        Db::connect(url, Kind::Postgres).await
    }

    async fn connect(url: &str, kind: Kind) -> Result<Db, sqlx::Error> {
        sqlx::any::install_default_drivers();
        let mut options = AnyPoolOptions::new().acquire_timeout(Duration::from_secs(30));
        options = match kind {
            Kind::Sqlite => options.max_connections(4).after_connect(|conn, _| {
                Box::pin(async move {
                    sqlx::query("PRAGMA busy_timeout = 30000")
                        .execute(&mut *conn)
                        .await?;
                    sqlx::query("PRAGMA foreign_keys = ON")
                        .execute(conn)
                        .await
                        .map(drop)
                })
            }),
            Kind::Postgres => options.max_connections(16),
        };
        let pool = options.connect(url).await?;
        match kind {
            Kind::Sqlite => SQLITE.run(&pool).await?,
            Kind::Postgres => POSTGRES.run(&pool).await?,
        }
        Ok(Db { pool, kind })
    }

    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// Begins a write transaction that no other serialized write overlaps: what it reads stays
    /// true until it commits.
    pub async fn write(&self) -> Result<Tx, sqlx::Error> {
        match self.kind {
            Kind::Sqlite => quorum_service::begin_with(&self.pool, "BEGIN IMMEDIATE").await,
            Kind::Postgres => {
                let mut tx = self.pool.begin().await?;
                sqlx::query("SELECT pg_advisory_xact_lock($1)")
                    .bind(WRITE_LOCK)
                    .execute(&mut *tx)
                    .await?;
                Ok(tx)
            }
        }
    }

    pub async fn close(&self) {
        self.pool.close().await
    }
}

/// A statement's parameters, written in the order they are bound: `$1, $2, ...` in
/// PostgreSQL, `?` in SQLite. SQLite finds a numbered parameter by a search through the
/// statement's parameter names, when parsing and again when binding, which in a statement of
/// hundreds of them (a batch's rows) took a sixth of its thread's time; an anonymous one is
/// bound by its position.
struct Params {
    sqlite: bool,
    written: usize,
}

impl Params {
    fn for_conn(conn: &AnyConnection) -> Params {
        Params {
            sqlite: conn.backend_name() == "SQLite",
            written: 0,
        }
    }

    /// `n` parameters, comma-separated.
    fn list(&mut self, n: usize) -> String {
        let mut out = String::new();
        for i in 0..n {
            if i > 0 {
                out.push_str(", ");
            }
            self.written += 1;
            if self.sqlite {
                out.push('?');
            } else {
                out.push_str(&format!("${}", self.written));
            }
        }
        out
    }

    /// `rows` parenthesized rows of `columns` parameters each, for `VALUES`.
    fn rows(&mut self, rows: usize, columns: usize) -> String {
        (0..rows)
            .map(|_| format!("({})", self.list(columns)))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

fn parse_digest(s: &str) -> Result<Digest, sqlx::Error> {
    s.parse().map_err(|e| sqlx::Error::Decode(Box::new(e)))
}

/// Database integers are signed 64 bits; sizes beyond that do not occur.
pub fn int(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// `digests` once each, in order: rows keyed by digest are then visited and inserted in index
/// order, one page after the next, where random order touched a random page each time (a
/// manifest's 10,000 references went in 4.7 times faster sorted, measured on SQLite).
fn unique(digests: &[Digest]) -> Vec<String> {
    digests
        .iter()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .map(Digest::to_string)
        .collect()
}

/// The sizes of those of `digests` that `tenant` has uploaded.
pub async fn tenant_blobs(
    conn: &mut AnyConnection,
    tenant: &str,
    digests: &[Digest],
) -> Result<HashMap<Digest, u64>, sqlx::Error> {
    let mut found = HashMap::new();
    for chunk in unique(digests).chunks(CHUNK) {
        let mut p = Params::for_conn(conn);
        let sql = format!(
            "SELECT b.digest, b.size FROM tenant_blobs t JOIN blobs b ON b.digest = t.digest \
             WHERE t.tenant = {} AND t.digest IN ({})",
            p.list(1),
            p.list(chunk.len())
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

/// Restarts the provisional lifetime of `tenant`'s links to `digests`: a blob just reported
/// present must survive garbage collection long enough for the manifest that will name it.
pub async fn touch_links(
    tx: &mut Tx,
    tenant: &str,
    digests: &[Digest],
    now: i64,
) -> Result<(), sqlx::Error> {
    for chunk in unique(digests).chunks(CHUNK) {
        let mut p = Params::for_conn(tx);
        let sql = format!(
            "UPDATE tenant_blobs SET linked_at = {} WHERE tenant = {} AND digest IN ({})",
            p.list(1),
            p.list(1),
            p.list(chunk.len())
        );
        let mut query = sqlx::query(&sql).bind(now).bind(tenant);
        for d in chunk {
            query = query.bind(d);
        }
        query.execute(&mut **tx).await?;
    }
    Ok(())
}

/// Whether `tenant` has uploaded the blob itself.
pub async fn is_linked(
    conn: &mut AnyConnection,
    tenant: &str,
    digest: Digest,
) -> Result<bool, sqlx::Error> {
    let hit: Option<i64> =
        sqlx::query_scalar("SELECT 1 FROM tenant_blobs WHERE tenant = $1 AND digest = $2")
            .bind(tenant)
            .bind(digest.to_string())
            .fetch_optional(conn)
            .await?;
    Ok(hit.is_some())
}

/// Records that `tenant` uploaded a verified blob (whose bytes are in place), counting it in the
/// tenant's stored bytes if the link is new, and `received` bytes in.
pub async fn link_blob(
    tx: &mut Tx,
    tenant: &str,
    digest: Digest,
    size: u64,
    received: u64,
) -> Result<(), sqlx::Error> {
    let now = quorum_service::now_unix();
    let digest = digest.to_string();
    // A blob of its own: found there from now on, wherever its bytes were before.
    sqlx::query(
        "INSERT INTO blobs (digest, size, stored_at) VALUES ($1, $2, $3) \
         ON CONFLICT (digest) DO UPDATE SET pack = NULL, pack_offset = NULL",
    )
    .bind(&digest)
    .bind(int(size))
    .bind(now)
    .execute(&mut **tx)
    .await?;
    let new = sqlx::query(
        "INSERT INTO tenant_blobs (tenant, digest, linked_at) VALUES ($1, $2, $3) \
         ON CONFLICT (tenant, digest) DO NOTHING",
    )
    .bind(tenant)
    .bind(&digest)
    .bind(now)
    .execute(&mut **tx)
    .await?
    .rows_affected();
    if new == 0 {
        // Uploaded again: the link's provisional lifetime starts over.
        sqlx::query("UPDATE tenant_blobs SET linked_at = $1 WHERE tenant = $2 AND digest = $3")
            .bind(now)
            .bind(tenant)
            .bind(&digest)
            .execute(&mut **tx)
            .await?;
    }
    let stored = if new == 1 { int(size) } else { 0 };
    add_usage(tx, tenant, stored, int(received), 0).await
}

/// Records that `tenant` uploaded a batch of verified blobs (digest, size; bytes in place) in a
/// few multi-row statements, each blob where `packed` says (if it names it) or as a blob of its
/// own: a row names the copy placed last. `linked` are those of them the tenant had already, as
/// [`tenant_blobs`] answered inside the same transaction: their links' provisional lifetime
/// starts over, and only the others count toward the tenant's stored bytes. `received` bytes
/// count in.
pub async fn link_blobs(
    tx: &mut Tx,
    tenant: &str,
    blobs: &[(Digest, u64)],
    packed: &HashMap<Digest, Packed>,
    linked: &HashMap<Digest, u64>,
    received: u64,
) -> Result<(), sqlx::Error> {
    let now = quorum_service::now_unix();
    // In digest order, as `unique` gives them.
    let sizes: BTreeMap<Digest, u64> = blobs.iter().copied().collect();
    let all: Vec<(String, i64, Option<String>, Option<i64>)> = sizes
        .iter()
        .map(|(d, n)| {
            let at = packed.get(d);
            let pack = at.map(|p| p.pack.to_string());
            (d.to_string(), int(*n), pack, at.map(|p| int(p.offset)))
        })
        .collect();
    for chunk in all.chunks(INSERT_CHUNK) {
        let sql = format!(
            "INSERT INTO blobs (digest, size, stored_at, pack, pack_offset) VALUES {} \
             ON CONFLICT (digest) DO UPDATE SET pack = excluded.pack, pack_offset = excluded.pack_offset",
            Params::for_conn(tx).rows(chunk.len(), 5)
        );
        let mut query = sqlx::query(&sql);
        for (d, n, pack, offset) in chunk {
            query = query
                .bind(d)
                .bind(*n)
                .bind(now)
                .bind(pack.clone())
                .bind(*offset);
        }
        query.execute(&mut **tx).await?;
    }
    let (again, new): (Vec<Digest>, Vec<Digest>) =
        sizes.keys().partition(|d| linked.contains_key(*d));
    for chunk in new.chunks(INSERT_CHUNK) {
        let sql = format!(
            "INSERT INTO tenant_blobs (tenant, digest, linked_at) VALUES {} \
             ON CONFLICT (tenant, digest) DO NOTHING",
            Params::for_conn(tx).rows(chunk.len(), 3)
        );
        let mut query = sqlx::query(&sql);
        for d in chunk {
            query = query.bind(tenant).bind(d.to_string()).bind(now);
        }
        query.execute(&mut **tx).await?;
    }
    // Uploaded again: those links' provisional lifetime starts over.
    touch_links(tx, tenant, &again, now).await?;
    let stored: u64 = new.iter().map(|d| sizes[d]).sum();
    add_usage(tx, tenant, int(stored), int(received), 0).await
}

/// Adds to a tenant's usage counters.
pub async fn add_usage(
    conn: &mut AnyConnection,
    tenant: &str,
    stored: i64,
    bytes_in: i64,
    bytes_out: i64,
) -> Result<(), sqlx::Error> {
    if stored == 0 && bytes_in == 0 && bytes_out == 0 {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO tenant_usage (tenant, stored_bytes, bytes_in, bytes_out) VALUES ($1, $2, $3, $4) \
         ON CONFLICT (tenant) DO UPDATE SET stored_bytes = tenant_usage.stored_bytes + $2, \
         bytes_in = tenant_usage.bytes_in + $3, bytes_out = tenant_usage.bytes_out + $4",
    )
    .bind(tenant)
    .bind(stored)
    .bind(bytes_in)
    .bind(bytes_out)
    .execute(conn)
    .await?;
    Ok(())
}

/// One tenant's usage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Usage {
    pub tenant: String,
    pub stored_bytes: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

/// The usage of `tenant`, or of every tenant when `None`, by tenant name.
pub async fn usage(db: &Db, tenant: Option<&str>) -> Result<Vec<Usage>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT tenant, stored_bytes, bytes_in, bytes_out FROM tenant_usage \
         WHERE $1 IS NULL OR tenant = $1 ORDER BY tenant",
    )
    .bind(tenant)
    .fetch_all(db.pool())
    .await?;
    rows.iter()
        .map(|r| {
            let n = |i: usize| r.try_get::<i64, _>(i).map(|v| v.max(0) as u64);
            Ok(Usage {
                tenant: r.try_get(0)?,
                stored_bytes: n(1)?,
                bytes_in: n(2)?,
                bytes_out: n(3)?,
            })
        })
        .collect()
}

/// The bytes `tenant` stores now.
pub async fn stored_bytes(conn: &mut AnyConnection, tenant: &str) -> Result<u64, sqlx::Error> {
    let n: Option<i64> =
        sqlx::query_scalar("SELECT stored_bytes FROM tenant_usage WHERE tenant = $1")
            .bind(tenant)
            .fetch_optional(conn)
            .await?;
    Ok(n.unwrap_or(0).max(0) as u64)
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
    /// Entries name blobs the tenant has not uploaded: each such path and digest, in manifest
    /// order. Nothing was recorded; the links to the named blobs the tenant has were touched, so
    /// they stay for the manifest that is sent again once the rest arrived.
    Missing(Vec<(String, Digest)>),
    /// An entry's size differs from the size of the blob it names.
    WrongSize {
        path: String,
        claimed: u64,
        stored: u64,
    },
    /// The base of a relative manifest is not (or no longer) a manifest of the tenant.
    BaseUnknown(Digest),
}

/// A manifest given relative to an earlier one of the tenant (see [`crate::delta`]).
#[derive(Debug)]
pub struct Relative<'a> {
    pub base: Digest,
    /// The entries that differ from the base: the only ones whose blobs need checking, since
    /// the base's blobs stay linked to the tenant while the base is recorded.
    pub changed: &'a [ManifestEntry],
    /// The base's digests that the manifest no longer names.
    pub dropped: &'a [Digest],
}

/// The canonical body of a manifest `tenant` recorded in any build, to apply changes to.
pub async fn tenant_manifest_body(
    db: &Db,
    tenant: &str,
    digest: Digest,
) -> Result<Option<Vec<u8>>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT b.body FROM manifests m JOIN manifest_bodies b ON b.digest = m.digest \
         WHERE m.tenant = $1 AND m.digest = $2 LIMIT 1",
    )
    .bind(tenant)
    .bind(digest.to_string())
    .fetch_optional(db.pool())
    .await
}

/// Records `manifest` for `slot`, if every blob it names is the tenant's own. One serialized
/// transaction, so the check and the write see the same state, and garbage collection cannot
/// remove a checked blob before the manifest's references to it are written. With `relative`,
/// only the changed entries' blobs are checked (the base, recorded in the same transaction's
/// view, keeps its blobs linked), and the build's references are made relative to the base's.
/// `manifest` is `None` only for a base recorded again unchanged: its body is stored already,
/// and not even parsed.
pub async fn record_manifest(
    db: &Db,
    slot: &Slot,
    manifest: Option<&Manifest>,
    digest: Digest,
    relative: Option<Relative<'_>>,
) -> Result<Recorded, sqlx::Error> {
    let mut tx = db.write().await?;
    let existing: Option<String> = sqlx::query_scalar(
        "SELECT digest FROM manifests WHERE tenant = $1 AND build = $2 AND job = $3 AND assignment = $4",
    )
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
    // Where the base is recorded: the new manifest's references are made relative to it.
    let base_build = match &relative {
        Some(r) => {
            let build: Option<String> = sqlx::query_scalar(
                "SELECT build FROM manifests WHERE tenant = $1 AND digest = $2 LIMIT 1",
            )
            .bind(&slot.tenant)
            .bind(r.base.to_string())
            .fetch_optional(&mut *tx)
            .await?;
            match build {
                Some(b) => Some(b),
                None => return Ok(Recorded::BaseUnknown(r.base)),
            }
        }
        None => None,
    };
    let checked = match &relative {
        Some(r) => r.changed,
        None => manifest.map_or(&[][..], |m| m.entries.as_slice()),
    };
    let empty = Digest::empty();
    let named: Vec<Digest> = checked
        .iter()
        .map(|e| e.digest)
        .filter(|d| *d != empty)
        .collect();
    let stored = tenant_blobs(&mut tx, &slot.tenant, &named).await?;
    let mut missing = Vec::new();
    for e in checked {
        let size = if e.digest == empty {
            0
        } else {
            match stored.get(&e.digest) {
                Some(size) => *size,
                None => {
                    missing.push((e.path.clone(), e.digest));
                    continue;
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
    if !missing.is_empty() {
        let present: Vec<Digest> = stored.keys().copied().collect();
        touch_links(&mut tx, &slot.tenant, &present, quorum_service::now_unix()).await?;
        tx.commit().await?;
        return Ok(Recorded::Missing(missing));
    }
    let digest_text = digest.to_string();
    // Recorded in this build before (by another assignment): its body and the build's
    // references to its blobs are there already.
    let known: Option<i64> = sqlx::query_scalar(
        "SELECT 1 FROM manifests WHERE tenant = $1 AND build = $2 AND digest = $3 LIMIT 1",
    )
    .bind(&slot.tenant)
    .bind(&slot.build)
    .bind(&digest_text)
    .fetch_optional(&mut *tx)
    .await?;
    if known.is_none()
        && let Some(manifest) = manifest
    {
        sqlx::query(
            "INSERT INTO manifest_bodies (digest, body) VALUES ($1, $2) ON CONFLICT DO NOTHING",
        )
        .bind(&digest_text)
        .bind(manifest.canonical_bytes())
        .execute(&mut *tx)
        .await?;
    }
    sqlx::query(
        "INSERT INTO manifests (tenant, build, job, assignment, digest, recorded_at) \
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(&slot.tenant)
    .bind(&slot.build)
    .bind(&slot.job)
    .bind(&slot.assignment)
    .bind(&digest_text)
    .bind(quorum_service::now_unix())
    .execute(&mut *tx)
    .await?;
    if known.is_none() {
        if let (Some(r), Some(base_build)) = (&relative, &base_build) {
            refer_to_base(&mut tx, slot, &digest_text, manifest, r, base_build).await?;
        } else if let Some(manifest) = manifest {
            let digests: Vec<Digest> = manifest.entries.iter().map(|e| e.digest).collect();
            add_references(&mut tx, slot, &digest_text, &digests).await?;
        }
    }
    tx.commit().await?;
    Ok(Recorded::New)
}

/// Adds the build's references from manifest `manifest` to `digests`.
async fn add_references(
    tx: &mut Tx,
    slot: &Slot,
    manifest: &str,
    digests: &[Digest],
) -> Result<(), sqlx::Error> {
    for chunk in unique(digests).chunks(INSERT_CHUNK) {
        let sql = format!(
            "INSERT INTO build_blobs (tenant, build, digest, manifest) VALUES {} ON CONFLICT DO NOTHING",
            Params::for_conn(tx).rows(chunk.len(), 4)
        );
        let mut query = sqlx::query(&sql);
        for d in chunk {
            query = query
                .bind(&slot.tenant)
                .bind(&slot.build)
                .bind(d)
                .bind(manifest);
        }
        query.execute(&mut **tx).await?;
    }
    Ok(())
}

/// The build's references from manifest `manifest`, relative to its base's (see the
/// `manifest_bases` migration): a link to the base, or to the manifest the base itself is
/// relative to, plus the blobs this one adds and the base's it no longer names, so recording one
/// changed file writes a few rows rather than a copy of every reference. When the differences
/// from that root have grown past a quarter of the manifest's entries, the manifest gets its
/// own full set instead and becomes a root for later ones. `manifest` is `None` for the base
/// recorded again unchanged.
async fn refer_to_base(
    tx: &mut Tx,
    slot: &Slot,
    digest: &str,
    manifest: Option<&Manifest>,
    relative: &Relative<'_>,
    base_build: &str,
) -> Result<(), sqlx::Error> {
    let base = relative.base.to_string();
    let root = sqlx::query(
        "SELECT base_build, base FROM manifest_bases WHERE tenant = $1 AND build = $2 AND manifest = $3",
    )
    .bind(&slot.tenant)
    .bind(base_build)
    .bind(&base)
    .fetch_optional(&mut **tx)
    .await?;
    let changed: HashSet<Digest> = relative.changed.iter().map(|e| e.digest).collect();
    let dropped: HashSet<Digest> = relative.dropped.iter().copied().collect();
    let (root_build, root, added, excluded) = match root {
        // The base is a root: the differences are this manifest's own.
        None => (base_build.to_string(), base, changed, dropped),
        // The base is relative to a root: its differences and this one's, composed.
        Some(row) => {
            let (base_added, base_excluded) = differences(tx, slot, base_build, &base).await?;
            let added: HashSet<Digest> = base_added
                .into_iter()
                .filter(|d| !dropped.contains(d))
                .chain(changed)
                .collect();
            let excluded = base_excluded
                .into_iter()
                .chain(dropped)
                .filter(|d| !added.contains(d))
                .collect();
            (row.try_get(0)?, row.try_get(1)?, added, excluded)
        }
    };
    if let Some(manifest) = manifest
        && (added.len() + excluded.len()) * 4 > manifest.entries.len()
    {
        let digests: Vec<Digest> = manifest.entries.iter().map(|e| e.digest).collect();
        return add_references(tx, slot, digest, &digests).await;
    }
    sqlx::query(
        "INSERT INTO manifest_bases (tenant, build, manifest, base_build, base) \
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(&slot.tenant)
    .bind(&slot.build)
    .bind(digest)
    .bind(&root_build)
    .bind(&root)
    .execute(&mut **tx)
    .await?;
    let added: Vec<Digest> = added.into_iter().collect();
    add_references(tx, slot, digest, &added).await?;
    let excluded: Vec<Digest> = excluded.into_iter().collect();
    for chunk in unique(&excluded).chunks(INSERT_CHUNK) {
        let sql = format!(
            "INSERT INTO base_exclusions (tenant, build, manifest, digest) VALUES {}",
            Params::for_conn(tx).rows(chunk.len(), 4)
        );
        let mut query = sqlx::query(&sql);
        for d in chunk {
            query = query
                .bind(&slot.tenant)
                .bind(&slot.build)
                .bind(digest)
                .bind(d);
        }
        query.execute(&mut **tx).await?;
    }
    Ok(())
}

/// What a relative manifest recorded in `build` adds to its root (its own `build_blobs` rows)
/// and takes from it (its `base_exclusions`).
async fn differences(
    tx: &mut Tx,
    slot: &Slot,
    build: &str,
    manifest: &str,
) -> Result<(HashSet<Digest>, HashSet<Digest>), sqlx::Error> {
    let mut sets = [HashSet::new(), HashSet::new()];
    for (set, table) in sets.iter_mut().zip(["build_blobs", "base_exclusions"]) {
        let rows: Vec<String> = sqlx::query_scalar(&format!(
            "SELECT digest FROM {table} WHERE tenant = $1 AND build = $2 AND manifest = $3"
        ))
        .bind(&slot.tenant)
        .bind(build)
        .bind(manifest)
        .fetch_all(&mut **tx)
        .await?;
        for d in rows {
            set.insert(parse_digest(&d)?);
        }
    }
    let [added, excluded] = sets;
    Ok((added, excluded))
}

/// The canonical body of a manifest recorded in `build` of `tenant`.
pub async fn manifest_body(
    db: &Db,
    tenant: &str,
    build: &str,
    digest: Digest,
) -> Result<Option<Vec<u8>>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT b.body FROM manifests m JOIN manifest_bodies b ON b.digest = m.digest \
         WHERE m.tenant = $1 AND m.build = $2 AND m.digest = $3 LIMIT 1",
    )
    .bind(tenant)
    .bind(build)
    .bind(digest.to_string())
    .fetch_optional(db.pool())
    .await
}

/// The distinct manifests that the assignments of `job` in `build` of `tenant` recorded, as
/// canonical bodies.
pub async fn job_manifests(
    db: &Db,
    tenant: &str,
    build: &str,
    job: &str,
) -> Result<Vec<Vec<u8>>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT b.body FROM manifest_bodies b WHERE b.digest IN \
         (SELECT digest FROM manifests WHERE tenant = $1 AND build = $2 AND job = $3) \
         ORDER BY b.digest",
    )
    .bind(tenant)
    .bind(build)
    .bind(job)
    .fetch_all(db.pool())
    .await
}

/// Whether a manifest recorded in `build` of `tenant` names the blob: by a reference of its
/// own, or through its base (a reference of the base that it does not exclude). A reference
/// counts only while its manifest is recorded in the build: a base's references outlive it while
/// later manifests refer to them.
pub async fn build_names_blob(
    db: &Db,
    tenant: &str,
    build: &str,
    digest: Digest,
) -> Result<bool, sqlx::Error> {
    let hit: Option<i64> = sqlx::query_scalar(
        "SELECT 1 WHERE EXISTS (SELECT 1 FROM build_blobs bb JOIN manifests m \
         ON m.tenant = bb.tenant AND m.build = bb.build AND m.digest = bb.manifest \
         WHERE bb.tenant = $1 AND bb.build = $2 AND bb.digest = $3) \
         OR EXISTS (SELECT 1 FROM manifest_bases mb JOIN build_blobs bb \
         ON bb.tenant = mb.tenant AND bb.build = mb.base_build AND bb.manifest = mb.base \
         WHERE mb.tenant = $1 AND mb.build = $2 AND bb.digest = $3 \
         AND NOT EXISTS (SELECT 1 FROM base_exclusions x WHERE x.tenant = mb.tenant \
         AND x.build = mb.build AND x.manifest = mb.manifest AND x.digest = $3))",
    )
    .bind(tenant)
    .bind(build)
    .bind(digest.to_string())
    .fetch_optional(db.pool())
    .await?;
    Ok(hit.is_some())
}

/// Records (or replaces) the signed statement of `build`, and whether the build is public.
pub async fn record_statement(
    db: &Db,
    tenant: &str,
    build: &str,
    envelope: &[u8],
    public: bool,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO statements (tenant, build, envelope, public, recorded_at) VALUES ($1, $2, $3, $4, $5) \
         ON CONFLICT (tenant, build) DO UPDATE SET envelope = $3, public = $4, recorded_at = $5",
    )
    .bind(tenant)
    .bind(build)
    .bind(envelope)
    .bind(i64::from(public))
    .bind(quorum_service::now_unix())
    .execute(db.pool())
    .await?;
    Ok(())
}

/// The signed statement of `build` and whether the build is public.
pub async fn statement(
    db: &Db,
    tenant: &str,
    build: &str,
) -> Result<Option<(Vec<u8>, bool)>, sqlx::Error> {
    let row =
        sqlx::query("SELECT envelope, public FROM statements WHERE tenant = $1 AND build = $2")
            .bind(tenant)
            .bind(build)
            .fetch_optional(db.pool())
            .await?;
    row.map(|r| Ok((r.try_get(0)?, r.try_get::<i64, _>(1)? != 0)))
        .transpose()
}

/// What [`expire`] removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Expired {
    /// Manifests past the retention period.
    pub manifests: u64,
    /// Tenants' links to blobs that no manifest of theirs names, past the provisional period.
    pub links: u64,
}

/// Drops manifests recorded before `retain_after` (public builds keep theirs), then links that
/// no manifest of their tenant names and that were made or confirmed before `linked_before`:
/// all of them, or with `cache_bytes`, least recently used first and only until the blobs the
/// store holds fit in `cache_bytes`. Stored bytes of the tenants are lowered to match.
pub async fn expire(
    db: &Db,
    retain_after: Option<i64>,
    linked_before: i64,
    cache_bytes: Option<u64>,
) -> Result<Expired, sqlx::Error> {
    let mut collected = Expired::default();
    let mut tx = db.write().await?;
    if let Some(cutoff) = retain_after {
        collected.manifests = sqlx::query(
            "DELETE FROM manifests WHERE recorded_at < $1 AND NOT EXISTS (SELECT 1 FROM statements s \
             WHERE s.tenant = manifests.tenant AND s.build = manifests.build AND s.public = 1)",
        )
        .bind(cutoff)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        // A relative manifest's link to its base, and its exclusions, go with it; a base's
        // references stay while a recorded manifest still refers to them.
        sqlx::query(
            "DELETE FROM manifest_bases WHERE NOT EXISTS (SELECT 1 FROM manifests m \
             WHERE m.tenant = manifest_bases.tenant AND m.build = manifest_bases.build \
             AND m.digest = manifest_bases.manifest)",
        )
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "DELETE FROM base_exclusions WHERE NOT EXISTS (SELECT 1 FROM manifest_bases mb \
             WHERE mb.tenant = base_exclusions.tenant AND mb.build = base_exclusions.build \
             AND mb.manifest = base_exclusions.manifest)",
        )
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "DELETE FROM build_blobs WHERE NOT EXISTS (SELECT 1 FROM manifests m \
             WHERE m.tenant = build_blobs.tenant AND m.build = build_blobs.build \
             AND m.digest = build_blobs.manifest) \
             AND NOT EXISTS (SELECT 1 FROM manifest_bases mb WHERE mb.tenant = build_blobs.tenant \
             AND mb.base_build = build_blobs.build AND mb.base = build_blobs.manifest)",
        )
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "DELETE FROM manifest_bodies WHERE NOT EXISTS \
             (SELECT 1 FROM manifests m WHERE m.digest = manifest_bodies.digest)",
        )
        .execute(&mut *tx)
        .await?;
    }
    // Least recently used first: `linked_at` is renewed by every upload and by `missing`.
    let expired = sqlx::query(
        "SELECT t.tenant, t.digest, b.size FROM tenant_blobs t JOIN blobs b ON b.digest = t.digest \
         WHERE t.linked_at < $1 AND NOT EXISTS (SELECT 1 FROM build_blobs bb \
         WHERE bb.tenant = t.tenant AND bb.digest = t.digest) \
         ORDER BY t.linked_at, t.tenant, t.digest",
    )
    .bind(linked_before)
    .fetch_all(&mut *tx)
    .await?;
    let mut held: i64 =
        sqlx::query_scalar("SELECT CAST(COALESCE(SUM(size), 0) AS BIGINT) FROM blobs")
            .fetch_one(&mut *tx)
            .await?;
    let mut freed: HashMap<String, i64> = HashMap::new();
    let mut dropped = 0u64;
    for row in &expired {
        if cache_bytes.is_some_and(|budget| held <= int(budget)) {
            break;
        }
        let tenant: String = row.try_get(0)?;
        let digest: String = row.try_get(1)?;
        let size: i64 = row.try_get(2)?;
        sqlx::query("DELETE FROM tenant_blobs WHERE tenant = $1 AND digest = $2")
            .bind(&tenant)
            .bind(&digest)
            .execute(&mut *tx)
            .await?;
        let still_used: Option<i64> = sqlx::query_scalar(
            "SELECT 1 WHERE EXISTS (SELECT 1 FROM tenant_blobs WHERE digest = $1) \
             OR EXISTS (SELECT 1 FROM build_blobs WHERE digest = $1)",
        )
        .bind(&digest)
        .fetch_optional(&mut *tx)
        .await?;
        if still_used.is_none() {
            // The next step of the collection deletes these bytes.
            held -= size;
        }
        *freed.entry(tenant).or_default() += size;
        dropped += 1;
    }
    for (tenant, bytes) in freed {
        add_usage(&mut tx, &tenant, -bytes, 0, 0).await?;
    }
    collected.links = dropped;
    tx.commit().await?;
    Ok(collected)
}

/// Up to `limit` blobs that no tenant links and no manifest names: garbage. Call inside the
/// write transaction that deletes them, so none can be linked again in between.
/// Each with its place, if it is packed.
pub async fn unreferenced_blobs(
    tx: &mut Tx,
    limit: i64,
) -> Result<Vec<(Digest, Option<Packed>)>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT digest, pack, pack_offset FROM blobs b \
         WHERE NOT EXISTS (SELECT 1 FROM tenant_blobs t WHERE t.digest = b.digest) \
         AND NOT EXISTS (SELECT 1 FROM build_blobs bb WHERE bb.digest = b.digest) LIMIT $1",
    )
    .bind(limit)
    .fetch_all(&mut **tx)
    .await?;
    rows.iter()
        .map(|row| Ok((parse_digest(row.try_get(0)?)?, packed(row, 1)?)))
        .collect()
}

/// The place in columns `at` (pack) and `at + 1` (offset) of `row`, if the pack is not null.
fn packed(row: &sqlx::any::AnyRow, at: usize) -> Result<Option<Packed>, sqlx::Error> {
    let Some(pack) = row.try_get::<Option<String>, _>(at)? else {
        return Ok(None);
    };
    let pack = pack_id(&pack)?;
    let offset: i64 = row.try_get::<Option<i64>, _>(at + 1)?.unwrap_or(0);
    Ok(Some(Packed {
        pack,
        offset: offset.max(0) as u64,
    }))
}

/// A pack's name as a row holds it.
fn pack_id(text: &str) -> Result<PackId, sqlx::Error> {
    PackId::parse(text)
        .ok_or_else(|| sqlx::Error::Decode(format!("`{text}` is not the name of a pack").into()))
}

/// The bytes still recorded in each of `packs` (a pack missing from the answer holds none).
pub async fn pack_live(
    conn: &mut AnyConnection,
    packs: &[PackId],
) -> Result<HashMap<PackId, u64>, sqlx::Error> {
    let mut live = HashMap::new();
    for chunk in packs.chunks(CHUNK) {
        let sql = format!(
            "SELECT pack, CAST(SUM(size) AS BIGINT) FROM blobs WHERE pack IN ({}) GROUP BY pack",
            Params::for_conn(conn).list(chunk.len())
        );
        let mut query = sqlx::query(&sql);
        for p in chunk {
            query = query.bind(p.as_str());
        }
        for row in query.fetch_all(&mut *conn).await? {
            let bytes: i64 = row.try_get(1)?;
            live.insert(pack_id(row.try_get(0)?)?, bytes.max(0) as u64);
        }
    }
    Ok(live)
}

/// The blobs recorded in `pack`: digest, size and place.
pub async fn pack_blobs(
    conn: &mut AnyConnection,
    pack: &PackId,
) -> Result<Vec<(Digest, u64, Packed)>, sqlx::Error> {
    let rows = sqlx::query("SELECT digest, size, pack, pack_offset FROM blobs WHERE pack = $1")
        .bind(pack.as_str())
        .fetch_all(conn)
        .await?;
    rows.iter()
        .map(|row| {
            let size: i64 = row.try_get(1)?;
            let place = packed(row, 2)?.expect("the rows were selected by their pack");
            Ok((parse_digest(row.try_get(0)?)?, size.max(0) as u64, place))
        })
        .collect()
}

/// Moves blob `digest` from `from` to `to`, if its row still names `from` (else it was uploaded
/// again, or collected, meanwhile, and stays as it is).
pub async fn move_blob(
    tx: &mut Tx,
    digest: Digest,
    from: &Packed,
    to: &Packed,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE blobs SET pack = $1, pack_offset = $2 \
         WHERE digest = $3 AND pack = $4 AND pack_offset = $5",
    )
    .bind(to.pack.as_str())
    .bind(int(to.offset))
    .bind(digest.to_string())
    .bind(from.pack.as_str())
    .bind(int(from.offset))
    .execute(&mut **tx)
    .await?;
    Ok(())
}

pub async fn delete_blob_row(tx: &mut Tx, digest: Digest) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM blobs WHERE digest = $1")
        .bind(digest.to_string())
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Which of `digests` have a row in `blobs` that names a blob of its own (not one in a pack).
pub async fn known_blobs(tx: &mut Tx, digests: &[Digest]) -> Result<HashSet<Digest>, sqlx::Error> {
    let mut found = HashSet::new();
    for chunk in unique(digests).chunks(CHUNK) {
        let sql = format!(
            "SELECT digest FROM blobs WHERE pack IS NULL AND digest IN ({})",
            Params::for_conn(tx).list(chunk.len())
        );
        let mut query = sqlx::query_scalar::<_, String>(&sql);
        for d in chunk {
            query = query.bind(d);
        }
        for d in query.fetch_all(&mut **tx).await? {
            found.insert(parse_digest(&d)?);
        }
    }
    Ok(found)
}

/// A stored blob's size, and its place if it is in a pack; `None` if it is not stored.
pub async fn stored_blob(
    db: &Db,
    digest: Digest,
) -> Result<Option<(u64, Option<Packed>)>, sqlx::Error> {
    let row = sqlx::query("SELECT size, pack, pack_offset FROM blobs WHERE digest = $1")
        .bind(digest.to_string())
        .fetch_optional(db.pool())
        .await?;
    let Some(row) = row else { return Ok(None) };
    let size: i64 = row.try_get(0)?;
    Ok(Some((size.max(0) as u64, packed(&row, 1)?)))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{Db, Params};

    /// PostgreSQL's parameters are numbered on across a statement; SQLite's are anonymous,
    /// bound in the order they are written.
    #[tokio::test]
    async fn parameters_are_written_in_bind_order_for_each_backend() {
        let mut pg = Params {
            sqlite: false,
            written: 0,
        };
        assert_eq!(pg.list(1), "$1");
        assert_eq!(pg.rows(2, 2), "($2, $3), ($4, $5)");
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open_sqlite(&dir.path().join("store.db")).await.unwrap();
        let conn = db.pool().acquire().await.unwrap();
        let mut lite = Params::for_conn(&conn);
        assert_eq!(lite.list(2), "?, ?");
        assert_eq!(lite.rows(2, 1), "(?), (?)");
    }

    /// An HTTP handler may be dropped at any await point when its client hangs up. A write
    /// dropped while it begins must leave every pooled connection outside a transaction:
    /// one left inside would hold SQLite's write lock for good.
    #[tokio::test]
    async fn a_write_dropped_while_it_begins_leaves_no_transaction_behind() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open_sqlite(&dir.path().join("store.db")).await.unwrap();
        // Drop the write after 1, 2, ... polls, so that some drop lands in each of its await
        // points: taking a connection, the BEGIN itself, and what follows it.
        for polls in 1..=8 {
            let mut write = Box::pin(db.write());
            for _ in 0..polls {
                if futures::poll!(&mut write).is_ready() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            drop(write);
            // Let the pool take the connection back before the next round.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Sequential writes go round the pool's connections; each must begin and commit at
        // once (a leftover transaction would make them wait out the 30 s busy timeout, or
        // refuse to begin inside it).
        for round in 0..12 {
            let tx = tokio::time::timeout(Duration::from_secs(5), db.write())
                .await
                .unwrap_or_else(|_| panic!("write {round} still waits for the lock after 5 s"))
                .unwrap_or_else(|e| panic!("write {round} did not begin: {e}"));
            tx.commit().await.unwrap();
        }
    }
}
