//! Build logs as the controller keeps them: redacted on arrival, because the controller does not
//! trust the worker to have redacted them. Removed are the tokens minted for the assignment
//! (by their signatures, kept in `assignments.log_secrets`), the operator's `[project] redact`
//! strings, and anything shaped like a JWT (`quorum_core::redact`).
//!
//! Two streams, two offsets: the worker sends bytes at offsets of what it sent (`received`),
//! readers read the redacted bytes at offsets of what is stored (`logs`), so `logs -f` resumes
//! where it stopped however long the replacements are. Bytes that may be the start of a secret
//! the next chunk completes wait in `log_tails` until it comes, or until the assignment has
//! ended and a reader asks (then the tail is redacted as it stands and stored).

use axum::http::StatusCode;
use quorum_core::redact::{MIN_LITERAL, Redactor};
use quorum_service::ApiError;
use sqlx::Row as _;

use crate::State;
use crate::db::AssignmentRow;

/// Refuses `[project] redact` entries too short to redact (they would make every log
/// unreadable). The error names the entry by position, never by its text (a config parse error
/// would quote the line).
pub fn check_redact_list(list: &[String]) -> anyhow::Result<()> {
    if let Some(i) = list.iter().position(|s| s.len() < MIN_LITERAL) {
        anyhow::bail!(
            "`[project] redact`: entry {} is shorter than {MIN_LITERAL} bytes; list only whole secrets",
            i + 1
        );
    }
    Ok(())
}

/// Most bytes of log one assignment may send.
const MAX_LOG: i64 = 64 * 1024 * 1024;

/// What `assignments.log_secrets` keeps of the tokens minted for an assignment: each one's
/// signature, the part that makes it a token. A log is redacted of these wherever they
/// appear, and of whole tokens by their shape, so the database holds no token a reader of it
/// could present (the header and claims before the signature are no secret). Narrower rows
/// matter too: with the whole tokens an assignment row was over 2 KB, which PostgreSQL tries
/// to compress at every update.
pub fn kept_secrets(tokens: &[&str]) -> String {
    let signatures: Vec<&str> = tokens
        .iter()
        .map(|t| t.rsplit('.').next().unwrap_or(t))
        .collect();
    serde_json::to_string(&signatures).expect("a list of strings serializes")
}

/// What the controller redacts from a log: `secrets` is the assignment's `log_secrets` (token
/// signatures, or whole tokens in rows written before [`kept_secrets`]).
fn redactor(state: &State, secrets: Option<String>) -> Redactor {
    let minted: Vec<String> = secrets
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or_default();
    Redactor::new(minted.iter().chain(&state.project.redact), true)
}

/// Length of the redacted log stored so far.
async fn stored_len(tx: &mut sqlx::Transaction<'_, sqlx::Any>, id: &str) -> Result<i64, ApiError> {
    // Chunks are contiguous, so the last chunk's end is the length: one indexed row instead of
    // summing every chunk.
    Ok(sqlx::query_scalar(
        "SELECT \"offset\" + LENGTH(data) FROM logs WHERE assignment_id = $1 ORDER BY \"offset\" DESC LIMIT 1",
    )
    .bind(id)
    .fetch_optional(&mut **tx)
    .await
    .map_err(ApiError::internal)?
    .unwrap_or(0))
}

/// Appends `body`, the worker's log bytes from `offset` of what it sent, to `a`'s log. A chunk
/// already received is a harmless resend; a gap is refused.
pub async fn append(
    state: &State,
    a: &AssignmentRow,
    offset: u64,
    body: &[u8],
) -> Result<(), ApiError> {
    let _turn = state.write_gate.enter().await;
    let mut tx = state.pool.begin().await.map_err(ApiError::internal)?;
    // A write first, so the transaction holds the writer's lock (SQLite) or the row (PostgreSQL)
    // before it reads: two appends to one log take turns instead of failing to upgrade.
    sqlx::query("UPDATE log_tails SET received = received WHERE assignment_id = $1")
        .bind(&a.id)
        .execute(&mut *tx)
        .await
        .map_err(ApiError::internal)?;
    let stored = stored_len(&mut tx, &a.id).await?;
    let row = sqlx::query(
        "SELECT t.received, t.tail, a.log_secrets FROM assignments a \
         LEFT JOIN log_tails t ON t.assignment_id = a.id WHERE a.id = $1",
    )
    .bind(&a.id)
    .fetch_one(&mut *tx)
    .await
    .map_err(ApiError::internal)?;
    let tracked: Option<i64> = row.get("received");
    // Logs begun before redaction existed have no tail row: all they received is stored.
    let received = tracked.unwrap_or(stored);
    let tail: Vec<u8> = row.get::<Option<Vec<u8>>, _>("tail").unwrap_or_default();
    let offset = offset as i64;
    if offset + body.len() as i64 <= received {
        return Ok(());
    }
    if offset != received {
        return Err(ApiError::conflict(format!(
            "log offset {offset} does not follow the {received} bytes received"
        )));
    }
    if received + body.len() as i64 > MAX_LOG {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "a job's log is limited to 64 MiB",
        ));
    }
    let mut input = tail;
    input.extend_from_slice(body);
    let (redacted, decided) = redactor(state, row.get("log_secrets")).redact(&input, false);
    let now_received = received + body.len() as i64;
    let kept = sqlx::query(
        "INSERT INTO log_tails (assignment_id, received, tail) VALUES ($1, $2, $3) \
         ON CONFLICT (assignment_id) DO UPDATE SET received = excluded.received, tail = excluded.tail \
         WHERE log_tails.received = $4",
    )
    .bind(&a.id)
    .bind(now_received)
    .bind(&input[decided..])
    .bind(received)
    .execute(&mut *tx)
    .await
    .map_err(ApiError::internal)?;
    if kept.rows_affected() == 0 {
        return Err(ApiError::conflict(
            "another request appended to this log at the same time; send again from its offset",
        ));
    }
    if !redacted.is_empty() {
        sqlx::query("INSERT INTO logs (assignment_id, \"offset\", data) VALUES ($1, $2, $3)")
            .bind(&a.id)
            .bind(stored)
            .bind(&redacted)
            .execute(&mut *tx)
            .await
            .map_err(ApiError::internal)?;
    }
    tx.commit().await.map_err(ApiError::internal)?;
    Ok(())
}

/// Once `a` has ended no chunk will complete its held tail: redacts it as it stands and stores
/// it, so readers get the whole log.
pub async fn flush_ended(state: &State, a: &AssignmentRow) -> Result<(), ApiError> {
    if matches!(a.state.as_str(), "offered" | "running") {
        return Ok(());
    }
    // Cheap look first: almost always nothing is held.
    let held: Option<String> = sqlx::query_scalar(
        "SELECT assignment_id FROM log_tails WHERE assignment_id = $1 AND LENGTH(tail) > 0",
    )
    .bind(&a.id)
    .fetch_optional(&state.pool)
    .await
    .map_err(ApiError::internal)?;
    if held.is_none() {
        return Ok(());
    }
    let _turn = state.write_gate.enter().await;
    let mut tx = state.pool.begin().await.map_err(ApiError::internal)?;
    sqlx::query("UPDATE log_tails SET received = received WHERE assignment_id = $1")
        .bind(&a.id)
        .execute(&mut *tx)
        .await
        .map_err(ApiError::internal)?;
    let row = sqlx::query(
        "SELECT t.tail, a.log_secrets FROM log_tails t JOIN assignments a ON a.id = t.assignment_id \
         WHERE t.assignment_id = $1",
    )
    .bind(&a.id)
    .fetch_one(&mut *tx)
    .await
    .map_err(ApiError::internal)?;
    let tail: Vec<u8> = row.get("tail");
    if !tail.is_empty() {
        let stored = stored_len(&mut tx, &a.id).await?;
        let redacted = redactor(state, row.get("log_secrets")).redact_all(&tail);
        sqlx::query("INSERT INTO logs (assignment_id, \"offset\", data) VALUES ($1, $2, $3)")
            .bind(&a.id)
            .bind(stored)
            .bind(&redacted)
            .execute(&mut *tx)
            .await
            .map_err(ApiError::internal)?;
        sqlx::query("UPDATE log_tails SET tail = $1 WHERE assignment_id = $2")
            .bind(Vec::<u8>::new())
            .bind(&a.id)
            .execute(&mut *tx)
            .await
            .map_err(ApiError::internal)?;
    }
    tx.commit().await.map_err(ApiError::internal)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::check_redact_list;
    use crate::ProjectConfig;

    #[test]
    fn the_redact_list_is_checked_and_never_printed_back() {
        let config = ProjectConfig {
            redact: vec!["correct-horse-battery".into(), "pw".into()],
            ..Default::default()
        };
        assert!(!format!("{config:?}").contains("correct-horse"));
        let short = check_redact_list(&config.redact).unwrap_err().to_string();
        assert!(short.contains("entry 2 is shorter than 8 bytes"), "{short}");
        assert!(
            !short.contains("pw;") && !short.contains("correct"),
            "{short}"
        );
        check_redact_list(&config.redact[..1]).unwrap();
    }
}
