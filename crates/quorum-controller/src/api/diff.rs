//! `GET /api/v1/builds/{id}/jobs/{job}/diff[?format=html]`, API token: the report explaining a
//! disputed job, as the explainer (`crate::diff`) stored it. `404` for a job that is not
//! disputed, `409` while the report is prepared.

use std::sync::Arc;

use axum::extract::{Path, Query, State as AxState};
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use quorum_api::v1::controller::HEADER_DIFF_TOOL;
use quorum_service::ApiError;
use serde::Deserialize;

use crate::{State, auth, db};

#[derive(Deserialize)]
pub struct DiffQuery {
    #[serde(default)]
    format: Option<String>,
}

pub async fn diff(
    AxState(state): AxState<Arc<State>>,
    Path((id, job)): Path<(String, String)>,
    Query(q): Query<DiffQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    auth::user(&state, &headers)?;
    let html = match q.format.as_deref() {
        None | Some("text") => false,
        Some("html") => true,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "format `{other}` is not known; use `text` or `html`"
            )));
        }
    };
    db::build(&state.pool, &id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no build {id}")))?;
    let report = crate::diff::stored(&state.pool, &id, &job)
        .await?
        .ok_or_else(|| {
            ApiError::not_found(format!(
                "job `{job}` of build {id} is not disputed, so there is no report to show"
            ))
        })?
        .ok_or_else(|| {
            ApiError::conflict(format!(
                "the report on the dispute of job `{job}` of build {id} is still being prepared; try again shortly"
            ))
        })?;
    let tool = report.tool;
    Ok(if html {
        // The page quotes the workers' files (through diffoscope): it may not run scripts.
        (
            [
                (header::CONTENT_TYPE, "text/html; charset=utf-8".to_string()),
                (
                    header::CONTENT_SECURITY_POLICY,
                    "default-src 'none'; style-src 'unsafe-inline'; img-src data:; frame-src 'self'"
                        .to_string(),
                ),
                (header::HeaderName::from_static(HEADER_DIFF_TOOL), tool),
            ],
            report.html,
        )
            .into_response()
    } else {
        (
            [
                (
                    header::CONTENT_TYPE,
                    "text/plain; charset=utf-8".to_string(),
                ),
                (header::HeaderName::from_static(HEADER_DIFF_TOOL), tool),
            ],
            report.text,
        )
            .into_response()
    })
}
