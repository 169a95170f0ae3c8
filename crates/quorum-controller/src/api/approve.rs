//! `POST /api/v1/builds/{id}/jobs/{job}/approve`, API token: opens a manual job's approval gate.
//! The handler only records the approval; the scheduler, which alone decides job states,
//! schedules the job on its next pass once the jobs it needs are verified.

use std::sync::Arc;

use axum::extract::{Path, State as AxState};
use axum::http::{HeaderMap, StatusCode};
use quorum_service::{ApiError, now_unix};

use crate::{State, auth, db};

pub async fn approve(
    AxState(state): AxState<Arc<State>>,
    Path((id, job)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    auth::user(&state, &headers)?;
    let build = db::build(&state.pool, &id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no build {id}")))?;
    let spec = db::jobs(&state.pool, &id)
        .await?
        .into_iter()
        .find(|j| j.name == job)
        .ok_or_else(|| ApiError::not_found(format!("build {id} has no job `{job}`")))?;
    if !spec.spec.manual {
        return Err(ApiError::conflict(format!(
            "job `{job}` has no approval gate (`manual: true`); it runs without one"
        )));
    }
    if build.state != "running" {
        return Err(ApiError::conflict(format!(
            "build {id} is already {}",
            build.state
        )));
    }
    let approved = sqlx::query(
        "UPDATE jobs SET approved_at = $1 WHERE build_id = $2 AND name = $3 AND approved_at IS NULL",
    )
    .bind(now_unix())
    .bind(&id)
    .bind(&job)
    .execute(&state.pool)
    .await
    .map_err(ApiError::internal)?;
    if approved.rows_affected() == 0 {
        return Err(ApiError::conflict(format!(
            "job `{job}` of build {id} is already approved"
        )));
    }
    tracing::info!(build = %id, %job, "job approved");
    state.wake.all();
    Ok(StatusCode::NO_CONTENT)
}
