//! Review flags: verified jobs an operator should look at again because a spot check by a
//! trusted worker contradicted them or a worker that produced them. A flag carries its reason
//! and the evidence (digests, workers); it is not a score, and it does not change a verdict or
//! a signed statement. Operators list and clear them (`quorum review list|clear`).

use quorum_api::v1::controller::{FlagEvidence, ReviewFlag};
use quorum_service::now_unix;
use sqlx::Row as _;
use sqlx::any::AnyRow;

use crate::db::Pool;
use crate::rfc3339;

/// Records a flag in `tx`.
pub async fn raise(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    build_id: &str,
    job: &str,
    reason: &str,
    evidence: &FlagEvidence,
) -> anyhow::Result<String> {
    let id = uuid::Uuid::new_v4().simple().to_string();
    sqlx::query("INSERT INTO review_flags (id, build_id, job, reason, evidence, created_at) VALUES ($1, $2, $3, $4, $5, $6)")
        .bind(&id)
        .bind(build_id)
        .bind(job)
        .bind(reason)
        .bind(serde_json::to_string(evidence)?)
        .bind(now_unix())
        .execute(&mut **tx)
        .await?;
    tracing::warn!(flag = %id, build = %build_id, %job, %reason, "flagged for review");
    Ok(id)
}

fn flag_from_row(r: &AnyRow) -> anyhow::Result<ReviewFlag> {
    Ok(ReviewFlag {
        id: r.get("id"),
        build_id: r.get("build_id"),
        job: r.get("job"),
        reason: r.get("reason"),
        evidence: serde_json::from_str(&r.get::<String, _>("evidence"))?,
        created_at: rfc3339(r.get("created_at")),
        cleared_at: r.get::<Option<i64>, _>("cleared_at").map(rfc3339),
        cleared_note: r.get("cleared_note"),
    })
}

/// Flags oldest first: the open ones, or all with `all`.
pub async fn list(pool: &Pool, all: bool) -> anyhow::Result<Vec<ReviewFlag>> {
    let sql = if all {
        "SELECT * FROM review_flags ORDER BY created_at, id"
    } else {
        "SELECT * FROM review_flags WHERE cleared_at IS NULL ORDER BY created_at, id"
    };
    sqlx::query(sql)
        .fetch_all(pool)
        .await?
        .iter()
        .map(flag_from_row)
        .collect()
}

/// Every flag on one build, cleared ones included.
pub async fn of_build(pool: &Pool, build_id: &str) -> anyhow::Result<Vec<ReviewFlag>> {
    sqlx::query("SELECT * FROM review_flags WHERE build_id = $1 ORDER BY created_at, id")
        .bind(build_id)
        .fetch_all(pool)
        .await?
        .iter()
        .map(flag_from_row)
        .collect()
}

pub enum Cleared {
    Done,
    Unknown,
    Already(String),
}

/// Clears flag `id` with the operator's `note`.
pub async fn clear(pool: &Pool, id: &str, note: &str) -> anyhow::Result<Cleared> {
    let done = sqlx::query(
        "UPDATE review_flags SET cleared_at = $1, cleared_note = $2 WHERE id = $3 AND cleared_at IS NULL",
    )
    .bind(now_unix())
    .bind(note)
    .bind(id)
    .execute(pool)
    .await?;
    if done.rows_affected() == 1 {
        tracing::info!(flag = %id, %note, "review flag cleared");
        return Ok(Cleared::Done);
    }
    let row = sqlx::query("SELECT cleared_at FROM review_flags WHERE id = $1")
        .bind(id)
        .fetch_optional(pool)
        .await?;
    Ok(match row {
        None => Cleared::Unknown,
        Some(r) => Cleared::Already(
            r.get::<Option<i64>, _>("cleared_at")
                .map(rfc3339)
                .unwrap_or_default(),
        ),
    })
}
