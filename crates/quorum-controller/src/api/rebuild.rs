//! `POST /api/v1/builds/{id}/jobs/{job}/rebuild`, API token: asks for a trusted rebuild of a
//! disputed job to break the tie. The handler only records the request; the scheduler offers it
//! to a trusted worker and recomputes the verdict when it reports (`crate::rebuild`).

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State as AxState};
use axum::http::{HeaderMap, StatusCode};
use quorum_api::v1::controller::RebuildRequest;
use quorum_service::{ApiError, now_unix};

use crate::{State, auth, db};

pub async fn rebuild(
    AxState(state): AxState<Arc<State>>,
    Path((id, job)): Path<(String, String)>,
    headers: HeaderMap,
    Json(req): Json<RebuildRequest>,
) -> Result<StatusCode, ApiError> {
    auth::user(&state, &headers)?;
    if !req.trusted {
        return Err(ApiError::bad_request(
            "only a trusted worker's rebuild can break a tie; ask with `trusted: true` (`--trusted`)",
        ));
    }
    db::build(&state.pool, &id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no build {id}")))?;
    let row = db::job(&state.pool, &id, &job)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("build {id} has no job `{job}`")))?;
    if row.state != "disputed" {
        return Err(ApiError::conflict(format!(
            "job `{job}` of build {id} is {}; only a disputed job is rebuilt to break a tie",
            row.state
        )));
    }
    let trusted: Option<i64> =
        sqlx::query_scalar("SELECT 1 FROM workers WHERE trusted <> 0 LIMIT 1")
            .fetch_optional(&state.pool)
            .await
            .map_err(ApiError::internal)?;
    if trusted.is_none() {
        return Err(ApiError::conflict(
            "no trusted worker is enrolled; enroll one with `quorum controller enroll --trusted`",
        ));
    }
    let turn = state.write_gate.enter().await;
    let inserted = sqlx::query(
        "INSERT INTO rebuilds (build_id, job, round, state, detail, requested_at) VALUES ($1, $2, $3, 'requested', 'waiting for the scheduler', $4) ON CONFLICT DO NOTHING",
    )
    .bind(&id)
    .bind(&job)
    .bind(row.round)
    .bind(now_unix())
    .execute(&state.pool)
    .await
    .map_err(ApiError::internal)?;
    drop(turn);
    if inserted.rows_affected() == 0 {
        return Err(ApiError::conflict(format!(
            "a trusted rebuild of job `{job}` of build {id} was already requested; see `quorum status {id}`"
        )));
    }
    tracing::info!(build = %id, %job, "trusted rebuild requested");
    state.wake.all();
    Ok(StatusCode::ACCEPTED)
}
