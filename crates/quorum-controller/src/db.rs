//! The controller's database: SQLite in the data dir by default, PostgreSQL when the config
//! gives a `postgres://` URL. One code path serves both through sqlx's `Any` driver: queries use
//! `$1` placeholders (which SQLite accepts too) and SQL both understand; each backend has its own
//! migrations (`migrations/sqlite`, `migrations/postgres`) creating the same tables and columns.
//! Every state change goes through here, so a restarted controller picks up exactly where the
//! last one stopped.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context as _;
use quorum_api::v1::controller::AssignmentPurpose;
use quorum_core::pipeline::JobSpec;
use sqlx::Row as _;
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::pool::PoolConnection;

pub type Pool = sqlx::AnyPool;

/// Where the controller keeps its state: `controller.db` in `data_dir`, or `database_url`.
pub async fn open(data_dir: &Path, database_url: Option<&str>) -> anyhow::Result<Pool> {
    sqlx::any::install_default_drivers();
    match database_url {
        Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
            open_postgres(url).await
        }
        Some(url) => anyhow::bail!(
            "database_url `{}` is not a postgres:// URL; leave it out to use SQLite in the data dir",
            redact(url)
        ),
        None => open_sqlite(data_dir).await,
    }
}

/// The URL without its password, for messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or_default();
            format!("{}{user}:***{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_string(),
    }
}

async fn open_postgres(url: &str) -> anyhow::Result<Pool> {
    // `synchronous_commit = off`, the counterpart of SQLite's `synchronous = NORMAL` (see
    // `open_sqlite`): a commit returns before its WAL record is flushed, so only a crash of the
    // database server can drop the last commits, which the protocol redoes.
    // No ping before each use of a pooled connection (sqlx's default): it doubled the round
    // trips of every statement. A connection the server dropped fails its next statement,
    // which the scheduler's next pass or the worker's retry repeats.
    let pool = AnyPoolOptions::new()
        .max_connections(16)
        .test_before_acquire(false)
        .after_connect(|conn, _meta| {
            Box::pin(async move {
                use sqlx::Executor as _;
                conn.execute("SET synchronous_commit = off").await?;
                Ok(())
            })
        })
        .acquire_timeout(std::time::Duration::from_secs(10))
        .connect(url)
        .await
        .with_context(|| format!("cannot connect to the database at {}", redact(url)))?;
    // Concurrent starts are safe: sqlx takes an advisory lock around PostgreSQL migrations.
    sqlx::migrate!("./migrations/postgres")
        .run(&pool)
        .await
        .with_context(|| format!("cannot apply the database migrations to {}", redact(url)))?;
    Ok(pool)
}

async fn open_sqlite(data_dir: &Path) -> anyhow::Result<Pool> {
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("cannot create data dir {}", data_dir.display()))?;
    let path = data_dir.join("controller.db");
    let url = format!("sqlite://{}?mode=rwc", path.display());
    // The `Any` driver takes SQLite's options from the URL only, so the pragmas are set on
    // each new connection: WAL, `synchronous = NORMAL` (a commit is in the WAL file when it
    // returns, so it survives a kill -9 of the controller; only a power loss or kernel crash
    // can drop the last commits, which the protocol redoes: see ARCHITECTURE.md, "Dispatch"),
    // foreign keys, and a busy timeout.
    // No ping before each use of a pooled connection: a round trip to the connection's thread
    // per statement, for a file that cannot go away.
    let options = AnyPoolOptions::new()
        .max_connections(4)
        .test_before_acquire(false)
        .after_connect(|conn, _meta| {
            Box::pin(async move {
                use sqlx::Executor as _;
                conn.execute(
                    "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; \
                     PRAGMA foreign_keys = ON; PRAGMA busy_timeout = 10000;",
                )
                .await?;
                Ok(())
            })
        });
    // Switching a new file to WAL needs a lock that the busy timeout does not cover, so a second
    // process opening the same new file at the same moment (`controller enroll` beside a
    // starting controller) can be told "locked": try again shortly, a bounded number of times.
    let mut attempt = 0;
    let pool = loop {
        match options.clone().connect(&url).await {
            Ok(pool) => break pool,
            Err(e) if attempt < 20 && e.to_string().contains("locked") => {
                attempt += 1;
                tokio::time::sleep(std::time::Duration::from_millis(50 * attempt)).await;
            }
            Err(e) => {
                return Err(e).with_context(|| format!("cannot open database {}", path.display()));
            }
        }
    };
    // Another process may be migrating the same file at this moment (the operator's
    // `controller enroll` next to a starting controller); its success is ours, so look again.
    let migrator = sqlx::migrate!("./migrations/sqlite");
    if let Err(first) = migrator.run(&pool).await {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        migrator.run(&pool).await.with_context(|| {
            format!("cannot apply the database migrations (first attempt: {first})")
        })?;
    }
    Ok(pool)
}

/// Lets this process's writers into SQLite one at a time, in the order they came. SQLite has
/// one writer at a time anyway; without the gate the others find the database locked and wait
/// in SQLite's busy handler, which sleeps in steps of up to 100 ms, so under load a write waited
/// far longer than the writes ahead of it took. PostgreSQL locks rows, not the database: there
/// the gate lets everyone through.
pub struct WriteGate {
    gate: Option<tokio::sync::Mutex<()>>,
    /// Writers waiting in [`WriteGate::enter`].
    waiting: std::sync::atomic::AtomicUsize,
}

impl WriteGate {
    pub fn new(pool: &Pool) -> WriteGate {
        WriteGate {
            gate: is_sqlite(pool).then(|| tokio::sync::Mutex::new(())),
            waiting: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    /// Waits for this writer's turn; the turn lasts while the guard lives. Take it before
    /// acquiring the connection or transaction that writes, never while holding one.
    pub async fn enter(&self) -> Option<tokio::sync::MutexGuard<'_, ()>> {
        let gate = self.gate.as_ref()?;
        self.waiting
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let turn = gate.lock().await;
        self.waiting
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        Some(turn)
    }

    /// A turn for a long writer that just had one and wants another: if others are waiting
    /// when it comes, they go first (the gate serves in order, so entering again queues behind
    /// them). Without this, a scheduler pass writing a large build in several commits held the
    /// gate from one commit to the next, and the workers it had just woken waited for all of
    /// them to record taking their offers.
    pub async fn enter_again(&self) -> Option<tokio::sync::MutexGuard<'_, ()>> {
        let gate = self.gate.as_ref()?;
        let turn = gate.lock().await;
        if self.waiting.load(std::sync::atomic::Ordering::SeqCst) == 0 {
            return Some(turn);
        }
        drop(turn);
        Some(gate.lock().await)
    }
}

pub fn is_sqlite(pool: &Pool) -> bool {
    pool.connect_options().database_url.scheme() == "sqlite"
}

/// A connection whose commits are on disk before they return, for the one commit that must
/// survive even a power loss: the build's signed statements. With unflushed commits (SQLite's
/// `synchronous = NORMAL`, PostgreSQL's `synchronous_commit = off`) a lost commit is only
/// redone work, but a signature redone after a power loss would be a second statement for the
/// same build. Begin the transaction with [`begin_durable`]. On SQLite the connection is
/// switched to `synchronous = FULL` and closed after use instead of returning to the pool (a
/// new one costs a file open); on PostgreSQL the transaction itself asks for the flush, so the
/// connection (whose replacement would cost a new authenticated session) stays pooled.
pub async fn durable_connection(pool: &Pool) -> anyhow::Result<PoolConnection<sqlx::Any>> {
    let mut conn = pool.acquire().await?;
    if is_sqlite(pool) {
        use sqlx::Executor as _;
        conn.execute("PRAGMA synchronous = FULL").await?;
        conn.close_on_drop();
    }
    Ok(conn)
}

/// Begins a transaction on a [`durable_connection`] whose commit is flushed before it returns.
pub async fn begin_durable<'c>(
    pool: &Pool,
    conn: &'c mut PoolConnection<sqlx::Any>,
) -> anyhow::Result<sqlx::Transaction<'c, sqlx::Any>> {
    let mut tx = sqlx::Connection::begin(&mut **conn).await?;
    if !is_sqlite(pool) {
        sqlx::query("SET LOCAL synchronous_commit = on")
            .execute(&mut *tx)
            .await?;
    }
    Ok(tx)
}

/// Whether `e` is a unique-key violation (a concurrent insert of the same key won).
pub fn is_unique_violation(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .is_some_and(|d| d.is_unique_violation())
}

#[derive(Debug, Clone)]
pub struct WorkerRow {
    pub id: String,
    pub owner: String,
    pub trusted: bool,
    pub labels: std::collections::BTreeMap<String, String>,
    pub public_key: String,
    pub last_seen: i64,
}

pub fn worker_from_row(r: &AnyRow) -> WorkerRow {
    WorkerRow {
        id: r.get("id"),
        owner: r.get("owner"),
        trusted: r.get::<i64, _>("trusted") != 0,
        labels: serde_json::from_str(&r.get::<String, _>("labels")).unwrap_or_default(),
        public_key: r.get("public_key"),
        last_seen: r.get("last_seen"),
    }
}

pub async fn worker(pool: &Pool, id: &str) -> anyhow::Result<Option<WorkerRow>> {
    let row = sqlx::query("SELECT * FROM workers WHERE id = $1")
        .bind(id)
        .fetch_optional(pool)
        .await?;
    Ok(row.as_ref().map(worker_from_row))
}

#[derive(Debug, Clone)]
pub struct AssignmentRow {
    pub id: String,
    pub build_id: String,
    pub job: String,
    pub worker_id: String,
    pub state: String,
    pub detail: Option<String>,
    pub report: Option<String>,
    pub signature: Option<String>,
    pub outcome: Option<String>,
    /// The job's round this assignment belongs to (a retry starts a new one).
    pub round: i64,
}

/// The columns [`assignment_from_row`] reads, prefixed `a.`: the scheduler's and signer's reads
/// name them instead of `a.*`, which also carried each assignment's tokens and usage.
const ASSIGNMENT_COLUMNS: &str = "a.id, a.build_id, a.job, a.worker_id, a.state, a.detail, \
     a.report, a.signature, a.outcome, a.round";

pub fn assignment_from_row(r: &AnyRow) -> AssignmentRow {
    AssignmentRow {
        id: r.get("id"),
        build_id: r.get("build_id"),
        job: r.get("job"),
        worker_id: r.get("worker_id"),
        state: r.get("state"),
        detail: r.get("detail"),
        report: r.get("report"),
        signature: r.get("signature"),
        outcome: r.get("outcome"),
        round: r.get("round"),
    }
}

pub async fn assignment(pool: &Pool, id: &str) -> anyhow::Result<Option<AssignmentRow>> {
    let row = sqlx::query("SELECT * FROM assignments WHERE id = $1")
        .bind(id)
        .fetch_optional(pool)
        .await?;
    Ok(row.as_ref().map(assignment_from_row))
}

#[derive(Debug, Clone)]
pub struct BuildRow {
    pub id: String,
    pub repository: String,
    pub commit_id: String,
    pub source_date_epoch: i64,
    pub state: String,
    pub created_at: i64,
    pub finished_at: Option<i64>,
}

pub fn build_from_row(r: &AnyRow) -> BuildRow {
    BuildRow {
        id: r.get("id"),
        repository: r.get("repository"),
        commit_id: r.get("commit_id"),
        source_date_epoch: r.get("source_date_epoch"),
        state: r.get("state"),
        created_at: r.get("created_at"),
        finished_at: r.get("finished_at"),
    }
}

pub async fn build(pool: &Pool, id: &str) -> anyhow::Result<Option<BuildRow>> {
    let row = sqlx::query("SELECT * FROM builds WHERE id = $1")
        .bind(id)
        .fetch_optional(pool)
        .await?;
    Ok(row.as_ref().map(build_from_row))
}

#[derive(Debug, Clone)]
pub struct JobRow {
    pub name: String,
    /// Shared: a spec never changes after its build is created, so the scheduler parses each
    /// once per build (`job_specs`), not once per pass.
    pub spec: Arc<JobSpec>,
    pub state: String,
    pub detail: String,
    pub manifest: Option<String>,
    pub differing_paths: Vec<String>,
    pub round: i64,
    pub approved_at: Option<i64>,
}

pub async fn jobs(pool: &Pool, build_id: &str) -> anyhow::Result<Vec<JobRow>> {
    let rows = sqlx::query("SELECT * FROM jobs WHERE build_id = $1 ORDER BY position")
        .bind(build_id)
        .fetch_all(pool)
        .await?;
    rows.iter().map(job_from_row).collect()
}

pub async fn job(pool: &Pool, build_id: &str, name: &str) -> anyhow::Result<Option<JobRow>> {
    let row = sqlx::query("SELECT * FROM jobs WHERE build_id = $1 AND name = $2")
        .bind(build_id)
        .bind(name)
        .fetch_optional(pool)
        .await?;
    row.as_ref().map(job_from_row).transpose()
}

fn job_from_row(r: &AnyRow) -> anyhow::Result<JobRow> {
    let spec = Arc::new(parse_spec(r)?);
    job_with_spec(r, spec)
}

fn parse_spec(r: &AnyRow) -> anyhow::Result<JobSpec> {
    let name: String = r.get("name");
    serde_json::from_str(&r.get::<String, _>("spec"))
        .with_context(|| format!("stored spec of job `{name}`"))
}

fn job_with_spec(r: &AnyRow, spec: Arc<JobSpec>) -> anyhow::Result<JobRow> {
    Ok(JobRow {
        name: r.get("name"),
        spec,
        state: r.get("state"),
        detail: r.get("detail"),
        manifest: r.get("manifest"),
        differing_paths: serde_json::from_str(&r.get::<String, _>("differing_paths"))
            .unwrap_or_default(),
        round: r.get("round"),
        approved_at: r.get("approved_at"),
    })
}

/// A build's reported results, the signer's evidence, in the order of [`assignments_of_build`],
/// and the purpose of those not run for the quorum, by id.
pub async fn reported_of_build(
    pool: &Pool,
    build_id: &str,
) -> anyhow::Result<(Vec<AssignmentRow>, HashMap<String, AssignmentPurpose>)> {
    let rows = sqlx::query(&format!(
        "SELECT {ASSIGNMENT_COLUMNS}, a.purpose FROM assignments a WHERE a.build_id = $1 \
         AND a.state = 'reported' ORDER BY a.created_at, a.id"
    ))
    .bind(build_id)
    .fetch_all(pool)
    .await?;
    let purposes = rows
        .iter()
        .map(|r| {
            (
                r.get("id"),
                crate::rebuild::purpose_of(&r.get::<String, _>("purpose")),
            )
        })
        .filter(|(_, purpose)| *purpose != AssignmentPurpose::Quorum)
        .collect();
    Ok((rows.iter().map(assignment_from_row).collect(), purposes))
}

pub async fn assignments_of_build(
    pool: &Pool,
    build_id: &str,
) -> anyhow::Result<Vec<AssignmentRow>> {
    let rows = sqlx::query("SELECT * FROM assignments WHERE build_id = $1 ORDER BY created_at, id")
        .bind(build_id)
        .fetch_all(pool)
        .await?;
    Ok(rows.iter().map(assignment_from_row).collect())
}

/// Every job's spec of a build, by job name.
pub async fn job_specs(
    pool: &Pool,
    build_id: &str,
) -> anyhow::Result<HashMap<String, Arc<JobSpec>>> {
    let rows = sqlx::query("SELECT name, spec FROM jobs WHERE build_id = $1")
        .bind(build_id)
        .fetch_all(pool)
        .await?;
    rows.iter()
        .map(|r| Ok((r.get("name"), Arc::new(parse_spec(r)?))))
        .collect()
}

/// A build's jobs like [`jobs`], with their specs taken from `specs` instead of parsed again.
pub async fn jobs_with_specs(
    pool: &Pool,
    build_id: &str,
    specs: &HashMap<String, Arc<JobSpec>>,
) -> anyhow::Result<Vec<JobRow>> {
    let rows = sqlx::query(
        "SELECT name, state, detail, manifest, differing_paths, round, approved_at FROM jobs \
         WHERE build_id = $1 ORDER BY position",
    )
    .bind(build_id)
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|r| {
            let name: String = r.get("name");
            let spec = specs
                .get(&name)
                .with_context(|| format!("job `{name}` of build {build_id} has no spec"))?;
            job_with_spec(r, spec.clone())
        })
        .collect()
}

/// The assignments a scheduler pass weighs: those of each unfinished job's current round. A
/// finished job's assignments (all of them, once a build has run long) are not read again.
pub async fn open_assignments(pool: &Pool, build_id: &str) -> anyhow::Result<Vec<AssignmentRow>> {
    let rows = sqlx::query(&format!(
        "SELECT {ASSIGNMENT_COLUMNS} FROM assignments a JOIN jobs j ON j.build_id = a.build_id \
         AND j.name = a.job AND j.round = a.round WHERE a.build_id = $1 \
         AND j.state NOT IN ('verified', 'disputed', 'failed', 'skipped', 'cancelled') \
         ORDER BY a.created_at, a.id"
    ))
    .bind(build_id)
    .fetch_all(pool)
    .await?;
    Ok(rows.iter().map(assignment_from_row).collect())
}

/// Most values bound in one `IN (...)` list: far below the parameter limits of both databases,
/// and a power of two, so that a full chunk needs no padding ([`padded_len`]).
const IN_CHUNK: usize = 512;

/// How many rows or values a statement is written for when `n` are needed: the next power of
/// two. Each distinct statement text is prepared once per connection and then cached, so with
/// one text per count the dispatch path's grouped writes and the scheduler's reads prepared a
/// new statement for most calls (4% of a 1,000-job benchmark's CPU went to
/// `sqlite3_prepare`). The extra places repeat the last value ([`padded`]), which changes
/// nothing in an `IN (...)` list or an `UPDATE ... FROM (VALUES ...)`.
pub fn padded_len(n: usize) -> usize {
    n.max(1).next_power_of_two()
}

/// `values`, then its last one again up to [`padded_len`]`(values.len())` in all.
pub fn padded<T: Copy>(values: &[T]) -> impl Iterator<Item = T> + '_ {
    let pad = padded_len(values.len()) - values.len();
    values
        .iter()
        .copied()
        .chain(values.last().copied().into_iter().cycle().take(pad))
}

/// `count` rows of a multi-row `VALUES`, joined: row `i` is `row(first + i * width)`, the
/// number of its first placeholder, for rows of `width` placeholders each.
pub fn value_rows(
    count: usize,
    first: usize,
    width: usize,
    row: impl Fn(usize) -> String,
) -> String {
    (0..count)
        .map(|i| row(first + i * width))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `sql` as the pool's database binds it fastest. SQLite looks a `$N` placeholder up by name in
/// a list of the statement's names, both when it prepares the statement and when sqlx binds
/// each value, so a statement of a thousand values did about a million string comparisons each
/// time: a 256-row flush of the scheduler took 8 to 15 ms where the same rows took 1 to 2 ms
/// with plain `?`. On SQLite, a statement whose placeholders are `$1, $2, ...` each once and
/// in that order (every multi-row statement here is written so) is given anonymous `?` ones,
/// which bind in the same order; any other statement, and every statement on PostgreSQL, is
/// left as it is.
pub fn for_pool(pool: &Pool, sql: String) -> String {
    for_sqlite(is_sqlite(pool), sql)
}

/// [`for_pool`] for a connection's statement: `sqlite` says which database it is.
pub fn for_sqlite(sqlite: bool, sql: String) -> String {
    match sqlite {
        true => anonymous(&sql).unwrap_or(sql),
        false => sql,
    }
}

/// `sql` with its placeholders `$1, $2, ...` made `?`, if they appear each once and in order
/// (outside quoted literals); otherwise `None`.
fn anonymous(sql: &str) -> Option<String> {
    let mut out = String::with_capacity(sql.len());
    let mut next = 1usize;
    let mut quoted = false;
    let mut chars = sql.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        if c == '\'' {
            quoted = !quoted;
        } else if c == '$' && !quoted {
            let digits: String = std::iter::from_fn(|| chars.next_if(|(_, d)| d.is_ascii_digit()))
                .map(|(_, d)| d)
                .collect();
            if digits.parse::<usize>().ok()? != next {
                return None;
            }
            next += 1;
            out.push('?');
            continue;
        }
        out.push_str(&sql[i..i + c.len_utf8()]);
    }
    Some(out)
}

/// `$first, $first + 1, ...`: `n` placeholders for an `IN (...)` list.
pub fn placeholders(first: usize, n: usize) -> String {
    (first..first + n)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The jobs of a build named in `names` (any order), like [`jobs_with_specs`].
pub async fn jobs_named(
    pool: &Pool,
    build_id: &str,
    names: &[&str],
    specs: &HashMap<String, Arc<JobSpec>>,
) -> anyhow::Result<Vec<JobRow>> {
    let mut out = Vec::with_capacity(names.len());
    for chunk in names.chunks(IN_CHUNK) {
        let sql = format!(
            "SELECT name, state, detail, manifest, differing_paths, round, approved_at FROM jobs \
             WHERE build_id = $1 AND name IN ({})",
            placeholders(2, padded_len(chunk.len()))
        );
        let sql = for_pool(pool, sql);
        let mut q = sqlx::query(&sql).bind(build_id);
        for name in padded(chunk) {
            q = q.bind(name);
        }
        for r in q.fetch_all(pool).await? {
            let name: String = r.get("name");
            let spec = specs
                .get(&name)
                .with_context(|| format!("job `{name}` of build {build_id} has no spec"))?;
            out.push(job_with_spec(&r, spec.clone())?);
        }
    }
    Ok(out)
}

/// The assignments of the current rounds of the jobs named in `names`, like
/// [`open_assignments`] for those jobs only.
pub async fn open_assignments_of(
    pool: &Pool,
    build_id: &str,
    names: &[&str],
) -> anyhow::Result<Vec<AssignmentRow>> {
    let mut out = Vec::new();
    for chunk in names.chunks(IN_CHUNK) {
        let sql = format!(
            "SELECT {ASSIGNMENT_COLUMNS} FROM assignments a JOIN jobs j ON j.build_id = a.build_id \
             AND j.name = a.job AND j.round = a.round WHERE a.build_id = $1 AND a.job IN ({}) \
             ORDER BY a.created_at, a.id",
            placeholders(2, padded_len(chunk.len()))
        );
        let sql = for_pool(pool, sql);
        let mut q = sqlx::query(&sql).bind(build_id);
        for name in padded(chunk) {
            q = q.bind(name);
        }
        out.extend(q.fetch_all(pool).await?.iter().map(assignment_from_row));
    }
    Ok(out)
}

/// The workers whose ids are in `ids`.
pub async fn workers_named(pool: &Pool, ids: &[&str]) -> anyhow::Result<Vec<WorkerRow>> {
    let mut out = Vec::with_capacity(ids.len());
    for chunk in ids.chunks(IN_CHUNK) {
        let sql = format!(
            "SELECT * FROM workers WHERE id IN ({})",
            placeholders(1, padded_len(chunk.len()))
        );
        let sql = for_pool(pool, sql);
        let mut q = sqlx::query(&sql);
        for id in padded(chunk) {
            q = q.bind(id);
        }
        out.extend(q.fetch_all(pool).await?.iter().map(worker_from_row));
    }
    Ok(out)
}

/// Whether any job of the build is not final yet.
pub async fn any_unfinished(pool: &Pool, build_id: &str) -> anyhow::Result<bool> {
    let row = sqlx::query(
        "SELECT 1 FROM jobs WHERE build_id = $1 \
         AND state NOT IN ('verified', 'disputed', 'failed', 'skipped', 'cancelled') LIMIT 1",
    )
    .bind(build_id)
    .fetch_optional(pool)
    .await?;
    Ok(row.is_some())
}

/// Sets `upload_revoked` to `mark` on the assignments in `ids` (1: the store revoked the
/// token; -1: it would not), a few statements for a whole batch.
pub async fn mark_revoked(
    conn: &mut sqlx::AnyConnection,
    ids: &[&str],
    mark: i64,
) -> anyhow::Result<()> {
    for chunk in ids.chunks(IN_CHUNK) {
        let sql = format!(
            "UPDATE assignments SET upload_revoked = $1 WHERE id IN ({})",
            placeholders(2, chunk.len())
        );
        let sql = for_sqlite(conn.backend_name() == "SQLite", sql);
        let mut q = sqlx::query(&sql).bind(mark);
        for id in chunk {
            q = q.bind(*id);
        }
        q.execute(&mut *conn).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_in_order_become_anonymous_and_others_stay() {
        assert_eq!(
            anonymous(
                "UPDATE t SET a = v.column2 FROM (VALUES ($1, $2), ($3, $4)) AS v WHERE x = $5"
            )
            .as_deref(),
            Some("UPDATE t SET a = v.column2 FROM (VALUES (?, ?), (?, ?)) AS v WHERE x = ?")
        );
        // Reused, out of order, or skipped: bound by number, so left alone.
        assert_eq!(anonymous("SELECT $1, $2, $1"), None);
        assert_eq!(anonymous("SELECT $2, $1"), None);
        assert_eq!(anonymous("SELECT $1, $3"), None);
        assert_eq!(anonymous("SELECT $"), None);
        // Inside a literal a `$` is text.
        assert_eq!(
            anonymous("SELECT '$2', $1, 'it''s $9'").as_deref(),
            Some("SELECT '$2', ?, 'it''s $9'")
        );
        assert_eq!(anonymous("SELECT 1").as_deref(), Some("SELECT 1"));
        assert_eq!(
            anonymous(&format!("SELECT {}", placeholders(1, 12))).as_deref(),
            Some("SELECT ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?")
        );
    }

    #[test]
    fn statements_are_padded_to_a_power_of_two_with_the_last_value() {
        assert_eq!(
            (0..10).map(padded_len).collect::<Vec<_>>(),
            [1, 1, 2, 4, 4, 8, 8, 8, 8, 16]
        );
        assert_eq!(padded(&[1, 2, 3]).collect::<Vec<_>>(), [1, 2, 3, 3]);
        assert_eq!(padded(&[7]).collect::<Vec<_>>(), [7]);
        let full: Vec<usize> = (0..IN_CHUNK).collect();
        assert_eq!(
            padded(&full).count(),
            IN_CHUNK,
            "a full chunk is not padded"
        );
        assert_eq!(padded::<u8>(&[]).count(), 0);
    }
}
