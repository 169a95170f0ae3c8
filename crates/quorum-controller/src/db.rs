//! The controller's database: opening SQLite with WAL, the schema, and the rows the rest of the
//! controller reads. Every state change goes through here, so a restarted controller picks up
//! exactly where the last one stopped.

use std::path::Path;
use std::str::FromStr as _;

use anyhow::Context as _;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row as _, SqlitePool};

pub type Pool = SqlitePool;

pub async fn open(data_dir: &Path) -> anyhow::Result<Pool> {
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("cannot create data dir {}", data_dir.display()))?;
    let path = data_dir.join("controller.db");
    let opts = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))?
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .foreign_keys(true)
        .busy_timeout(std::time::Duration::from_secs(10));
    // Switching a new file to WAL needs a lock that the busy timeout does not cover, so a second
    // process opening the same new file at the same moment (`controller enroll` beside a
    // starting controller) can be told "locked": try again shortly, a bounded number of times.
    let mut attempt = 0;
    let pool = loop {
        match SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(opts.clone())
            .await
        {
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
    let migrator = sqlx::migrate!("./migrations");
    if let Err(first) = migrator.run(&pool).await {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        migrator.run(&pool).await.with_context(|| {
            format!("cannot apply the database migrations (first attempt: {first})")
        })?;
    }
    Ok(pool)
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

pub fn worker_from_row(r: &sqlx::sqlite::SqliteRow) -> WorkerRow {
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
    let row = sqlx::query("SELECT * FROM workers WHERE id = ?")
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
}

pub fn assignment_from_row(r: &sqlx::sqlite::SqliteRow) -> AssignmentRow {
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
    }
}

pub async fn assignment(pool: &Pool, id: &str) -> anyhow::Result<Option<AssignmentRow>> {
    let row = sqlx::query("SELECT * FROM assignments WHERE id = ?")
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

pub fn build_from_row(r: &sqlx::sqlite::SqliteRow) -> BuildRow {
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
    let row = sqlx::query("SELECT * FROM builds WHERE id = ?")
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
}

pub async fn jobs(pool: &Pool, build_id: &str) -> anyhow::Result<Vec<JobRow>> {
    let rows = sqlx::query("SELECT * FROM jobs WHERE build_id = ? ORDER BY position")
        .bind(build_id)
        .fetch_all(pool)
        .await?;
    rows.iter()
        .map(|r| {
            Ok(JobRow {
                name: r.get("name"),
                spec: serde_json::from_str(&r.get::<String, _>("spec"))
                    .context("stored job spec")?,
                state: r.get("state"),
                detail: r.get("detail"),
                manifest: r.get("manifest"),
                differing_paths: serde_json::from_str(&r.get::<String, _>("differing_paths"))
                    .unwrap_or_default(),
            })
        })
        .collect()
}

pub async fn assignments_of_build(
    pool: &Pool,
    build_id: &str,
) -> anyhow::Result<Vec<AssignmentRow>> {
    let rows = sqlx::query("SELECT * FROM assignments WHERE build_id = ? ORDER BY created_at, id")
        .bind(build_id)
        .fetch_all(pool)
        .await?;
    Ok(rows.iter().map(assignment_from_row).collect())
}
