//! Routes for users of the controller, authenticated by its API token: submit builds, read their
//! status, logs, verified artifacts and signed statements.

use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, Query, State as AxState};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use quorum_api::v1::controller::{
    Artifact, ArtifactList, AssignmentStatus, BuildCreated, BuildState, BuildStatus,
    HEADER_LOG_COMPLETE, JobState, JobStatus, ReportedResult, ResultReport, SignerKeys,
    SubmitBuild,
};
use quorum_api::v1::idp::TOKEN_TYPE_READ;
use quorum_client::idp::TokenFor;
use quorum_core::pipeline::{PIPELINE_FILE, Pipeline};
use quorum_service::{ApiError, now_unix};
use serde::Deserialize;
use sqlx::Row as _;

use crate::db;
use crate::{State, auth, rfc3339};

/// `POST /api/v1/builds`, API token: reads the pipeline at the exact commit and creates the build
/// with all its jobs. A pipeline that does not validate creates nothing.
pub async fn submit(
    AxState(state): AxState<Arc<State>>,
    headers: HeaderMap,
    Json(req): Json<SubmitBuild>,
) -> Result<(StatusCode, Json<BuildCreated>), ApiError> {
    auth::user(&state, &headers)?;
    let mirrors = state.mirrors.clone();
    let repo_url = req.repository.clone();
    let rev = req.rev.clone();
    let (commit, text, sde) = tokio::task::spawn_blocking(move || -> Result<_, ApiError> {
        let mirror = mirrors
            .update(&repo_url)
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
        let found = quorum_git::commit_with_file(&mirror, &rev, PIPELINE_FILE)
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
        let text = found.file.ok_or_else(|| {
            ApiError::bad_request(format!(
                "commit {} of {repo_url} has no {PIPELINE_FILE}",
                found.commit
            ))
        })?;
        Ok((found.commit, text, found.time))
    })
    .await
    .map_err(ApiError::internal)??;
    let text = String::from_utf8(text)
        .map_err(|_| ApiError::bad_request(format!("{PIPELINE_FILE} is not UTF-8")))?;
    let pipeline = Pipeline::parse(&text)
        .map_err(|e| ApiError::bad_request(format!("commit {commit}: {e}")))?;

    let id = uuid::Uuid::new_v4().simple().to_string();
    let now = now_unix();
    let mut tx = state.pool.begin().await.map_err(ApiError::internal)?;
    sqlx::query("INSERT INTO builds (id, repository, commit_id, source_date_epoch, state, created_at) VALUES ($1, $2, $3, $4, 'running', $5)")
        .bind(&id)
        .bind(&req.repository)
        .bind(&commit)
        .bind(sde)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(ApiError::internal)?;
    // Many rows per statement: a pipeline of a thousand jobs is a few round trips, not a
    // thousand (on PostgreSQL each is one over the network).
    const ROWS: usize = 200;
    for (chunk_no, chunk) in pipeline.jobs.chunks(ROWS).enumerate() {
        // Each placeholder once and in order, the build's on every row (`db::for_pool`).
        let values = crate::db::value_rows(chunk.len(), 1, 4, |p| {
            format!("({}, 'queued')", crate::db::placeholders(p, 4))
        });
        let sql = crate::db::for_pool(
            &state.pool,
            format!("INSERT INTO jobs (build_id, name, position, spec, state) VALUES {values}"),
        );
        let mut q = sqlx::query(&sql);
        for (i, job) in chunk.iter().enumerate() {
            q = q
                .bind(&id)
                .bind(&job.name)
                .bind((chunk_no * ROWS + i) as i64)
                .bind(serde_json::to_string(job).map_err(ApiError::internal)?);
        }
        q.execute(&mut *tx).await.map_err(ApiError::internal)?;
    }
    tx.commit().await.map_err(ApiError::internal)?;
    tracing::info!(build = %id, repository = %req.repository, %commit, jobs = pipeline.jobs.len(), "build created");
    crate::scheduler::remember_specs(&state, &id, pipeline.jobs);
    state.wake.build(&id);
    Ok((
        StatusCode::CREATED,
        Json(BuildCreated {
            build_id: id,
            commit,
        }),
    ))
}

pub(crate) fn build_state(s: &str) -> BuildState {
    match s {
        "verified" => BuildState::Verified,
        "disputed" => BuildState::Disputed,
        "failed" => BuildState::Failed,
        "cancelled" => BuildState::Cancelled,
        _ => BuildState::Running,
    }
}

pub(crate) fn job_state(s: &str) -> JobState {
    match s {
        "running" => JobState::Running,
        "provisional" => JobState::Provisional,
        "verified" => JobState::Verified,
        "disputed" => JobState::Disputed,
        "failed" => JobState::Failed,
        "skipped" => JobState::Skipped,
        "cancelled" => JobState::Cancelled,
        _ => JobState::Queued,
    }
}

async fn found_build(state: &State, id: &str) -> Result<db::BuildRow, ApiError> {
    db::build(&state.pool, id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no build {id}")))
}

/// `GET /api/v1/builds/{id}`, API token.
pub async fn status(
    AxState(state): AxState<Arc<State>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<BuildStatus>, ApiError> {
    auth::user(&state, &headers)?;
    let b = found_build(&state, &id).await?;
    let jobs = db::jobs(&state.pool, &id).await?;
    let assignments = db::assignments_of_build(&state.pool, &id).await?;
    let workers = sqlx::query(
        "SELECT * FROM workers WHERE id IN (SELECT worker_id FROM assignments WHERE build_id = $1)",
    )
    .bind(&id)
    .fetch_all(&state.pool)
    .await
    .map_err(ApiError::internal)?;
    let workers: Vec<db::WorkerRow> = workers.iter().map(db::worker_from_row).collect();
    let mut reports = crate::diff::summaries(&state.pool, &id).await?;
    let signed = sqlx::query("SELECT 1 FROM statements WHERE build_id = $1")
        .bind(&id)
        .fetch_optional(&state.pool)
        .await
        .map_err(ApiError::internal)?
        .is_some();
    let purposes = crate::rebuild::purposes(&state.pool, &id).await?;
    let jobs = jobs
        .into_iter()
        .map(|j| JobStatus {
            state: job_state(&j.state),
            policy: j.spec.policy,
            detail: j.detail.clone(),
            manifest: j.manifest.as_deref().and_then(|m| m.parse().ok()),
            differing_paths: j.differing_paths.clone(),
            dispute_report: reports.remove(&j.name),
            assignments: assignments
                .iter()
                .filter(|a| a.job == j.name)
                .map(|a| {
                    let w = workers.iter().find(|w| w.id == a.worker_id);
                    let report: Option<ResultReport> = a
                        .report
                        .as_deref()
                        .and_then(|r| serde_json::from_str(r).ok());
                    AssignmentStatus {
                        id: a.id.clone(),
                        worker: a.worker_id.clone(),
                        owner: w.map(|w| w.owner.clone()).unwrap_or_default(),
                        trusted: w.is_some_and(|w| w.trusted),
                        state: a.state.clone(),
                        outcome: a
                            .outcome
                            .as_deref()
                            .and_then(|o| serde_json::from_str(o).ok()),
                        detail: a.detail.clone(),
                        usage: report.map(|r| r.usage),
                        purpose: purposes.get(&a.id).copied().unwrap_or_default(),
                    }
                })
                .collect(),
            name: j.name,
        })
        .collect();
    Ok(Json(BuildStatus {
        id: b.id,
        state: build_state(&b.state),
        repository: b.repository,
        commit: b.commit_id,
        created_at: rfc3339(b.created_at),
        finished_at: b.finished_at.map(rfc3339),
        jobs,
        signed,
        flags: crate::review::of_build(&state.pool, &id).await?,
        spot_checks: crate::spot::of_build(&state.pool, &id).await?,
        rebuilds: crate::rebuild::of_build(&state.pool, &id).await?,
    }))
}

/// `POST /api/v1/builds/{id}/cancel`, API token: running assignments are told to stop at their
/// next heartbeat; unfinished jobs end cancelled.
pub async fn cancel(
    AxState(state): AxState<Arc<State>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    auth::user(&state, &headers)?;
    let b = found_build(&state, &id).await?;
    if b.state != "running" {
        return Err(ApiError::conflict(format!(
            "build {id} is already {}",
            b.state
        )));
    }
    sqlx::query("UPDATE builds SET state = 'cancelling' WHERE id = $1 AND state = 'running'")
        .bind(&id)
        .execute(&state.pool)
        .await
        .map_err(ApiError::internal)?;
    state.wake.all();
    Ok(StatusCode::ACCEPTED)
}

/// `GET /api/v1/builds/{id}/statement`, API token: the signed DSSE envelope of a verified build.
pub async fn statement(
    AxState(state): AxState<Arc<State>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    auth::user(&state, &headers)?;
    let row = sqlx::query("SELECT envelope FROM statements WHERE build_id = $1")
        .bind(&id)
        .fetch_optional(&state.pool)
        .await
        .map_err(ApiError::internal)?
        .ok_or_else(|| {
            ApiError::not_found(format!(
                "build {id} has no signed statement; only verified builds are signed"
            ))
        })?;
    let env: String = row.get("envelope");
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        env,
    )
        .into_response())
}

/// `GET /api/v1/builds/{id}/summary`, API token: the SLSA Verification Summary (a DSSE
/// envelope) signed beside the build's provenance.
pub async fn summary(
    AxState(state): AxState<Arc<State>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    auth::user(&state, &headers)?;
    let summary: Option<String> =
        sqlx::query_scalar("SELECT summary FROM statements WHERE build_id = $1")
            .bind(&id)
            .fetch_optional(&state.pool)
            .await
            .map_err(ApiError::internal)?
            .flatten();
    let summary = summary.ok_or_else(|| {
        ApiError::not_found(format!(
            "build {id} has no signed verification summary; only verified builds are signed"
        ))
    })?;
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        summary,
    )
        .into_response())
}

/// `GET /api/v1/builds/{id}/artifacts`, API token: the verified artifacts, and a read token to
/// fetch them from the store.
pub async fn artifacts(
    AxState(state): AxState<Arc<State>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<ArtifactList>, ApiError> {
    auth::user(&state, &headers)?;
    found_build(&state, &id).await?;
    let jobs = db::jobs(&state.pool, &id).await?;
    let assignments = db::assignments_of_build(&state.pool, &id).await?;
    let mut artifacts = Vec::new();
    for j in jobs.iter().filter(|j| j.state == "verified") {
        let Some(digest) = j
            .manifest
            .as_deref()
            .and_then(|m| m.parse::<quorum_core::Digest>().ok())
        else {
            continue;
        };
        let manifest = assignments
            .iter()
            .filter(|a| a.job == j.name)
            .filter_map(|a| {
                a.report
                    .as_deref()
                    .and_then(|r| serde_json::from_str::<ResultReport>(r).ok())
            })
            .find_map(|r| match r.result {
                ReportedResult::Success {
                    manifest,
                    manifest_digest,
                } if manifest_digest == digest => Some(manifest),
                _ => None,
            });
        for e in manifest.into_iter().flat_map(|m| m.entries) {
            artifacts.push(Artifact {
                job: j.name.clone(),
                path: e.path,
                mode: e.mode,
                size: e.size,
                digest: e.digest,
                manifest: digest,
            });
        }
    }
    let access = state
        .access_token()
        .await
        .map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, format!("{e:#}")))?;
    let read = state
        .idp
        .exchange(
            &access,
            &TokenFor {
                token_type: TOKEN_TYPE_READ,
                audience: state.store_audience.clone(),
                build: id.clone(),
                job: None,
                assignment: None,
                lifetime_secs: 900,
                constraints: Default::default(),
            },
        )
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("cannot get a read token from the IdP: {e}"),
            )
        })?;
    Ok(Json(ArtifactList {
        store_url: state.store_url.clone(),
        read_token: read.access_token,
        artifacts,
    }))
}

#[derive(Deserialize)]
pub struct LogQuery {
    #[serde(default)]
    offset: u64,
}

/// `GET /api/v1/assignments/{id}/log?offset=N`, API token: log bytes from `offset`; the header
/// `x-quorum-log-complete: true` says the assignment has ended and no more will come.
pub async fn read_log(
    AxState(state): AxState<Arc<State>>,
    Path(id): Path<String>,
    Query(q): Query<LogQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    auth::user(&state, &headers)?;
    let a = db::assignment(&state.pool, &id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no assignment {id}")))?;
    crate::logs::flush_ended(&state, &a).await?;
    let rows = sqlx::query("SELECT \"offset\", data FROM logs WHERE assignment_id = $1 AND \"offset\" + LENGTH(data) > $2 ORDER BY \"offset\"")
        .bind(&id)
        .bind(q.offset as i64)
        .fetch_all(&state.pool)
        .await
        .map_err(ApiError::internal)?;
    let mut out = Vec::new();
    for r in rows {
        let off: i64 = r.get("offset");
        let data: Vec<u8> = r.get("data");
        let skip = (q.offset as i64 - off).max(0) as usize;
        out.extend_from_slice(&data[skip.min(data.len())..]);
    }
    let complete = !matches!(a.state.as_str(), "offered" | "running");
    Ok((
        [(HEADER_LOG_COMPLETE, if complete { "true" } else { "false" })],
        Body::from(out),
    )
        .into_response())
}

/// `GET /api/v1/signer/keys`, anyone: every key that signed or signs this controller's
/// statements and is not revoked, read from the signer's key ring per request (so a rotation or
/// revocation shows at once).
pub async fn signer_keys(
    AxState(state): AxState<Arc<State>>,
) -> Result<Json<SignerKeys>, ApiError> {
    let published = state.signer.published_keys().map_err(ApiError::internal)?;
    let active = published
        .iter()
        .find(|k| k.state() == quorum_signer::SignerKeyState::Active)
        .map(|k| k.keyid.clone());
    let keys = published
        .into_iter()
        .map(|k| (k.keyid, k.public_key))
        .collect();
    Ok(Json(SignerKeys { keys, active }))
}
