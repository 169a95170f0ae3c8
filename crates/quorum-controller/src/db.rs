//! The controller's database: SQLite in the data dir by default, PostgreSQL when the config
//! gives a `postgres://` URL. One code path serves both through sqlx's `Any` driver: queries use
//! `$1` placeholders (which SQLite accepts too) and SQL both understand; each backend has its own
//! migrations (`migrations/sqlite`, `migrations/postgres`) creating the same tables and columns.
//! Every state change goes through here, so a restarted controller picks up exactly where the
//! last one stopped.

use std::path::Path;

use anyhow::Context as _;
use sqlx::Row as _;
use sqlx::any::{AnyPoolOptions, AnyRow};

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
    let pool = AnyPoolOptions::new()
        .max_connections(16)
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
    // each new connection: WAL, a full fsync per commit, foreign keys, and a busy timeout.
    let options = AnyPoolOptions::new()
        .max_connections(4)
        .after_connect(|conn, _meta| {
            Box::pin(async move {
                use sqlx::Executor as _;
                conn.execute(
                    "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; \
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
    pub spec: quorum_core::pipeline::JobSpec,
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
    Ok(JobRow {
        name: r.get("name"),
        spec: serde_json::from_str(&r.get::<String, _>("spec")).context("stored job spec")?,
        state: r.get("state"),
        detail: r.get("detail"),
        manifest: r.get("manifest"),
        differing_paths: serde_json::from_str(&r.get::<String, _>("differing_paths"))
            .unwrap_or_default(),
        round: r.get("round"),
        approved_at: r.get("approved_at"),
    })
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
