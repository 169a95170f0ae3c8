//! `GET /api/v1/review?all=BOOL` and `POST /api/v1/review/{id}/clear`, API token: the review
//! flags spot checks raise (`crate::review`), listed, and cleared by an operator with a note.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, Query, State as AxState};
use axum::http::{HeaderMap, StatusCode};
use quorum_api::v1::controller::{ClearFlag, ReviewList};
use quorum_service::ApiError;
use serde::Deserialize;

use crate::review::{self, Cleared};
use crate::{State, auth};

#[derive(Deserialize)]
pub struct ListQuery {
    #[serde(default)]
    all: bool,
}

pub async fn list(
    AxState(state): AxState<Arc<State>>,
    Query(q): Query<ListQuery>,
    headers: HeaderMap,
) -> Result<Json<ReviewList>, ApiError> {
    auth::user(&state, &headers)?;
    Ok(Json(ReviewList {
        flags: review::list(&state.pool, q.all).await?,
    }))
}

pub async fn clear(
    AxState(state): AxState<Arc<State>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Json(req): Json<ClearFlag>,
) -> Result<StatusCode, ApiError> {
    auth::user(&state, &headers)?;
    let note = req.note.trim();
    if note.is_empty() || note.len() > 2000 {
        return Err(ApiError::bad_request(
            "a note of 1 to 2000 characters saying why the flag is cleared is required",
        ));
    }
    let cleared = {
        let _turn = state.write_gate.enter().await;
        review::clear(&state.pool, &id, note).await?
    };
    match cleared {
        Cleared::Done => Ok(StatusCode::NO_CONTENT),
        Cleared::Unknown => Err(ApiError::not_found(format!("no review flag {id}"))),
        Cleared::Already(at) => Err(ApiError::conflict(format!(
            "review flag {id} was already cleared at {at}"
        ))),
    }
}
