//! Routes for workers. Every request but enrollment is signed by the worker's key
//! (`auth::worker`); a worker can only touch its own assignments.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, Query, State as AxState};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use ed25519_dalek::{Signature, Verifier as _, VerifyingKey};
use quorum_api::v1::controller::{
    Assignment, EnrollRequest, EnrollResponse, HeartbeatResponse, PollRequest, RefuseRequest,
    ReportedResult, ResultReport, SignedReport,
};
use quorum_api::v1::worker_auth::report_message;
use quorum_client::idp::TakeUpFor;
use quorum_service::{ApiError, now_unix};
use serde::Deserialize;
use sqlx::Row as _;

use crate::State;
use crate::auth::{self, SignedWorker};
use crate::commits::{Arg, Kind, Write};
use crate::db::{self, AssignmentRow, WorkerRow};
use crate::offers::BuildSource;

fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("request body: {e}")))
}

/// `POST /api/v1/workers/enroll`, anyone holding an unused enrollment token.
pub async fn enroll(
    AxState(state): AxState<Arc<State>>,
    Json(req): Json<EnrollRequest>,
) -> Result<Json<EnrollResponse>, ApiError> {
    quorum_core::names::check_job_name(&req.name).map_err(|_| {
        ApiError::bad_request("worker name must be 1-64 letters, digits, `-`, `_` or `.`")
    })?;
    if auth::public_key(&req.public_key).is_none() {
        return Err(ApiError::bad_request(
            "public_key is not a base64 Ed25519 public key",
        ));
    }
    let hash = quorum_core::Digest::of(req.enrollment_token.as_bytes()).to_string();
    let mut tx = state.pool.begin().await.map_err(ApiError::internal)?;
    // Claiming the token is the transaction's first statement and a conditional write, so of two
    // concurrent enrollments with one token exactly one claims it, on SQLite (which takes the
    // write lock here, before any read) and on PostgreSQL alike.
    let claimed = sqlx::query(
        "UPDATE enrollments SET used_by = $1 WHERE token_hash = $2 AND used_by IS NULL",
    )
    .bind(&req.name)
    .bind(&hash)
    .execute(&mut *tx)
    .await
    .map_err(ApiError::internal)?;
    let row = sqlx::query(
        "SELECT owner, trusted, labels, used_by FROM enrollments WHERE token_hash = $1",
    )
    .bind(&hash)
    .fetch_optional(&mut *tx)
    .await
    .map_err(ApiError::internal)?
    .ok_or_else(|| {
        ApiError::unauthorized(
            "unknown enrollment token; ask the controller's operator for a new one",
        )
    })?;
    if claimed.rows_affected() == 0 {
        // Re-enrolling the same worker with the same key is harmless (it lost its state file).
        let used_by: Option<String> = row.get("used_by");
        let existing = sqlx::query("SELECT public_key FROM workers WHERE id = $1")
            .bind(&req.name)
            .fetch_optional(&mut *tx)
            .await
            .map_err(ApiError::internal)?;
        if used_by.as_deref() == Some(req.name.as_str())
            && existing.is_some_and(|r| r.get::<String, _>("public_key") == req.public_key)
        {
            return Ok(Json(EnrollResponse {
                worker_id: req.name,
                owner: row.get("owner"),
            }));
        }
        return Err(ApiError::unauthorized(
            "this enrollment token was already used",
        ));
    }
    let name_taken = || {
        ApiError::conflict(format!(
            "a worker named `{}` is already enrolled; choose another name",
            req.name
        ))
    };
    let taken = sqlx::query("SELECT 1 FROM workers WHERE id = $1")
        .bind(&req.name)
        .fetch_optional(&mut *tx)
        .await
        .map_err(ApiError::internal)?;
    if taken.is_some() {
        return Err(name_taken());
    }
    let owner: String = row.get("owner");
    sqlx::query("INSERT INTO workers (id, owner, trusted, labels, public_key, enrolled_at) VALUES ($1, $2, $3, $4, $5, $6)")
        .bind(&req.name)
        .bind(&owner)
        .bind(row.get::<i64, _>("trusted"))
        .bind(row.get::<String, _>("labels"))
        .bind(&req.public_key)
        .bind(now_unix())
        .execute(&mut *tx)
        .await
        .map_err(|e| {
            // Another token enrolled the same name between our look and this insert.
            if db::is_unique_violation(&e) {
                name_taken()
            } else {
                ApiError::internal(e)
            }
        })?;
    tx.commit().await.map_err(ApiError::internal)?;
    tracing::info!(worker = %req.name, %owner, "worker enrolled");
    Ok(Json(EnrollResponse {
        worker_id: req.name,
        owner,
    }))
}

/// `POST /api/v1/workers/poll`, worker: long poll for the next assignment offered to it.
pub async fn poll(
    AxState(state): AxState<Arc<State>>,
    SignedWorker {
        worker: w, body, ..
    }: SignedWorker,
) -> Result<Response, ApiError> {
    let req: PollRequest = parse(&body)?;
    let deadline = tokio::time::Instant::now() + Duration::from_millis(req.wait_ms.min(30_000));
    let notify = state.worker_notify(&w.id);
    loop {
        // Register interest before looking, so an offer made in between still wakes us.
        let notified = notify.notified();
        // Boxed: taking an offer holds a token request in flight, and inline that state
        // would sit in every idle worker's waiting poll.
        if req.capacity > 0
            && let Some(a) = Box::pin(take_offer(&state, &w)).await?
        {
            state.taken_with_poll.fetch_add(1, Ordering::Relaxed);
            return Ok(Json(a).into_response());
        }
        // Wake at least every third of a lease to mark the worker as still online: a worker
        // waiting in a long poll is available, even though it sends nothing.
        let beat = tokio::time::Instant::now() + Duration::from_millis(state.lease_secs * 1000 / 3);
        if tokio::time::timeout_at(deadline.min(beat), notified)
            .await
            .is_err()
        {
            if tokio::time::Instant::now() >= deadline {
                return Ok(StatusCode::NO_CONTENT.into_response());
            }
            let now = now_unix();
            state.commits.execute(auth::seen_at(&w.id, now)).await?;
            state.workers.seen(&w.id, now);
        }
    }
}

/// Taking an offer: `running`, with its lease, upload token's `jti`, tenant, deadline and the
/// tokens to redact from its log, if it is still offered.
const CLAIM: Kind = Kind {
    table: "assignments",
    set: "state = 'running', lease_expires = v.column2, upload_jti = v.column3, \
          tenant = v.column4, deadline = v.column5, log_secrets = v.column6",
    filter: "assignments.state = 'offered'",
};

/// Recording a report, if the assignment is the reporting worker's, of the build and job the
/// report names, and running.
const REPORT: Kind = Kind {
    table: "assignments",
    set: "state = 'reported', report = v.column2, signature = v.column3, outcome = v.column4, \
          detail = v.column5, finished_at = v.column6, wall_ms = v.column7, cpu_ms = v.column8, \
          peak_rss_kib = v.column9, bytes_uploaded = v.column10",
    filter: "assignments.worker_id = v.column11 AND assignments.build_id = v.column12 \
             AND assignments.job = v.column13 AND assignments.state = 'running'",
};

/// How long a take-up waits for tokens being minted ahead before it asks the IdP itself: a
/// batch takes milliseconds; this only bounds a stuck one.
const MINTING_WAIT: Duration = Duration::from_secs(5);

/// Claims the oldest offer for `w` and fetches its tokens: the offers made since this
/// controller started from memory (`offers.rs`), then, for a worker that had some when it
/// started, those made before from the database.
async fn take_offer(state: &State, w: &WorkerRow) -> Result<Option<Assignment>, ApiError> {
    let lease = Duration::from_secs(state.lease_secs);
    while let Some(o) = state.offers.next(&w.id, lease) {
        if let Some(a) = claim_offer(state, w, &o.id, &o.build_id, &o.job, None).await? {
            return Ok(Some(a));
        }
    }
    if !state.offers.maybe_before_start(&w.id) {
        return Ok(None);
    }
    // Offers made before a restart, with their builds, in one query.
    let offers = sqlx::query(
        "SELECT a.id, a.build_id, a.job, b.repository, b.commit_id, b.source_date_epoch \
         FROM assignments a JOIN builds b ON b.id = a.build_id \
         WHERE a.worker_id = $1 AND a.state = 'offered' ORDER BY a.created_at LIMIT 4",
    )
    .bind(&w.id)
    .fetch_all(&state.pool)
    .await
    .map_err(ApiError::internal)?;
    if offers.is_empty() {
        state.offers.none_before_start(&w.id);
    }
    for r in &offers {
        let source = BuildSource {
            repository: r.get("repository"),
            commit: r.get("commit_id"),
            source_date_epoch: r.get("source_date_epoch"),
        };
        let (id, build_id, job): (String, String, String) =
            (r.get("id"), r.get("build_id"), r.get("job"));
        if let Some(a) = claim_offer(state, w, &id, &build_id, &job, Some(source)).await? {
            return Ok(Some(a));
        }
    }
    Ok(None)
}

/// Claims offer `id` (of `job` in `build_id`) for `w` if it is still offered, with its
/// tokens; `source` is the build's when the caller read it.
async fn claim_offer(
    state: &State,
    w: &WorkerRow,
    id: &str,
    build_id: &str,
    job: &str,
    source: Option<BuildSource>,
) -> Result<Option<Assignment>, ApiError> {
    // The spec from the scheduler's cache, while the build runs.
    let cached = crate::scheduler::cached_spec(state, build_id, job);
    let running = cached.is_some();
    let spec = match cached {
        Some(spec) => spec,
        None => match db::job(&state.pool, build_id, job).await? {
            Some(job) => job.spec,
            None => return Ok(None),
        },
    };
    let worker_audience = format!("worker:{}", w.id);
    let lease = Duration::from_secs(state.lease_secs);
    // Tokens minted ahead, or being minted since the offer was made (`ahead.rs`).
    let minted = state
        .ahead
        .take_or_wait(id, &worker_audience, lease, MINTING_WAIT)
        .await;
    state.ahead.served(minted.is_some());
    let tokens = match minted {
        Some(tokens) => tokens,
        None => {
            let access = state
                .access_token()
                .await
                .map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, format!("{e:#}")))?;
            // Both tokens in one exchange: one IdP round trip per take-up.
            let what = TakeUpFor {
                worker_audience,
                upload_audience: state.store_audience.clone(),
                build: build_id.to_string(),
                job: job.to_string(),
                assignment: id.to_string(),
                lifetime_secs: crate::ahead::lifetime_secs(spec.timeout_secs, state.lease_secs),
                upload_constraints: state.upload_limits.clone(),
            };
            state
                .idp
                .exchange_take_up(&access, &what)
                .await
                .map_err(|e| {
                    ApiError::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("cannot get the job and upload tokens from the IdP: {e}"),
                    )
                })?
        }
    };
    let (job_token, upload_token) = (tokens.job.access_token, tokens.upload.access_token);
    let (tenant, upload_jti) = tenant_and_jti(&upload_token);
    let claim = Write {
        kind: &CLAIM,
        id: id.to_string(),
        args: vec![
            Arg::Int(now_unix() + state.lease_secs as i64),
            Arg::OptText(upload_jti),
            Arg::Text(tenant.clone()),
            Arg::Int(now_unix() + (spec.timeout_secs + state.lease_secs) as i64),
            // The tokens are redacted from the assignment's log (`logs.rs`).
            Arg::Text(crate::logs::kept_secrets(&[&job_token, &upload_token])),
        ],
    };
    if !state.commits.execute(claim).await? {
        return Ok(None); // withdrawn or taken by a concurrent poll
    }
    tracing::info!(assignment = %id, build = %build_id, job = %job, worker = %w.id, "assignment taken");
    let source = match source
        .map(Arc::new)
        .or_else(|| state.offers.source(build_id))
    {
        Some(source) => source,
        None => {
            let b = db::build(&state.pool, build_id)
                .await?
                .ok_or_else(|| ApiError::internal(format!("build {build_id} vanished")))?;
            let source = BuildSource {
                repository: b.repository,
                commit: b.commit_id,
                source_date_epoch: b.source_date_epoch,
            };
            // Kept only while the build runs: the scheduler forgets it when the build ends.
            if running {
                state.offers.remember_source(build_id, source)
            } else {
                Arc::new(source)
            }
        }
    };
    Ok(Some(Assignment {
        id: id.to_string(),
        build_id: build_id.to_string(),
        job: job.to_string(),
        tenant,
        repository: source.repository.clone(),
        commit: source.commit.clone(),
        source_date_epoch: source.source_date_epoch,
        script: spec.script.clone(),
        artifacts: spec.artifacts.clone(),
        timeout_secs: spec.timeout_secs,
        inputs: spec.inputs.clone(),
        job_token,
        upload_token,
        store_url: state.store_url.clone(),
        lease_secs: state.lease_secs,
    }))
}

/// The tenant and `jti` of an upload token the controller's own IdP issued to it. Read for
/// bookkeeping only, never to decide trust.
fn tenant_and_jti(token: &str) -> (String, Option<String>) {
    let Ok(peeked) = quorum_token::peek(token) else {
        return (String::new(), None);
    };
    let claim = |name: &str| peeked.claims.get(name)?.as_str().map(str::to_string);
    (claim("tenant").unwrap_or_default(), claim("jti"))
}

/// Loads an assignment that must belong to `w`; another worker's assignment looks absent.
async fn own_assignment(state: &State, w: &WorkerRow, id: &str) -> Result<AssignmentRow, ApiError> {
    db::assignment(&state.pool, id)
        .await?
        .filter(|a| a.worker_id == w.id)
        .ok_or_else(|| ApiError::not_found(format!("no assignment {id} for this worker")))
}

/// `POST /api/v1/assignments/{id}/refuse`, the assigned worker.
pub async fn refuse(
    AxState(state): AxState<Arc<State>>,
    Path(id): Path<String>,
    SignedWorker {
        worker: w, body, ..
    }: SignedWorker,
) -> Result<StatusCode, ApiError> {
    let req: RefuseRequest = parse(&body)?;
    let a = own_assignment(&state, &w, &id).await?;
    let reason: String = req.reason.chars().take(2000).collect();
    // A busy worker declines; it may get the job again later. A refusal is final for this
    // worker and job.
    let new_state = if req.busy { "declined" } else { "refused" };
    let turn = state.write_gate.enter().await;
    sqlx::query("UPDATE assignments SET state = $1, detail = $2, finished_at = $3 WHERE id = $4 AND state IN ('offered', 'running')")
        .bind(new_state)
        .bind(&reason)
        .bind(now_unix())
        .bind(&a.id)
        .execute(&state.pool)
        .await
        .map_err(ApiError::internal)?;
    drop(turn);
    tracing::warn!(assignment = %a.id, worker = %w.id, %reason, state = new_state, "worker refused assignment");
    state.wake.job(&a.build_id, &a.job);
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /api/v1/assignments/{id}/heartbeat`, the assigned worker: renews the lease, or tells
/// the worker to stop when the assignment is no longer its to run.
pub async fn heartbeat(
    AxState(state): AxState<Arc<State>>,
    Path(id): Path<String>,
    SignedWorker { worker: w, .. }: SignedWorker,
) -> Result<Json<HeartbeatResponse>, ApiError> {
    let a = own_assignment(&state, &w, &id).await?;
    let turn = state.write_gate.enter().await;
    let renewed = sqlx::query(
        "UPDATE assignments SET lease_expires = $1 WHERE id = $2 AND state = 'running'",
    )
    .bind(now_unix() + state.lease_secs as i64)
    .bind(&a.id)
    .execute(&state.pool)
    .await
    .map_err(ApiError::internal)?;
    drop(turn);
    Ok(Json(HeartbeatResponse {
        stop: renewed.rows_affected() == 0,
    }))
}

#[derive(Deserialize)]
pub struct Offset {
    offset: u64,
}

/// `POST /api/v1/assignments/{id}/log?offset=N`, the assigned worker: appends log bytes,
/// redacted (`logs.rs`). A chunk at an offset already received is a harmless resend; a gap is
/// refused.
pub async fn log(
    AxState(state): AxState<Arc<State>>,
    Path(id): Path<String>,
    Query(q): Query<Offset>,
    SignedWorker {
        worker: w, body, ..
    }: SignedWorker,
) -> Result<StatusCode, ApiError> {
    let a = own_assignment(&state, &w, &id).await?;
    if body.is_empty() {
        return Ok(StatusCode::NO_CONTENT);
    }
    crate::logs::append(&state, &a, q.offset, &body).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
pub struct ResultQuery {
    /// How many offers to hand over with the answer (0 or 1).
    #[serde(default)]
    take: u32,
}

/// `POST /api/v1/assignments/{id}/result[?take=1]`, the assigned worker: its signed report, and
/// with `take=1` its next waiting offer in the answer, if it has one (`200`), else `204`.
pub async fn result(
    AxState(state): AxState<Arc<State>>,
    Path(id): Path<String>,
    Query(q): Query<ResultQuery>,
    signed: SignedWorker,
) -> Result<Response, ApiError> {
    let w = signed.worker.clone();
    record_result(&state, &id, signed).await?;
    // The report is recorded; the next offer is taken as a poll takes it, without waiting. If
    // that fails (the IdP unreachable for its tokens), the answer still says the report is
    // recorded, so the worker does not send it again, and its next poll takes the offer.
    if q.take > 0 {
        match Box::pin(take_offer(&state, &w)).await {
            Ok(Some(a)) => {
                state.taken_with_report.fetch_add(1, Ordering::Relaxed);
                return Ok(Json(a).into_response());
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(worker = %w.id, error = %e.message, "report recorded; the next offer is left for the worker's poll")
            }
        }
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Records the worker's signed report on assignment `id`.
async fn record_result(
    state: &State,
    id: &str,
    SignedWorker {
        worker: w,
        key,
        body,
    }: SignedWorker,
) -> Result<(), ApiError> {
    // The usual case in one statement: a valid report of a running assignment, which the
    // report names, recorded on the condition that the row is this worker's, of that build
    // and job, and running. Anything else takes the path below, which reads the assignment
    // first and says precisely what is wrong.
    if let Ok((signed, report)) = check_report(&w, &key, &body)
        && report.assignment == id
        && record_report(state, &w, &signed, &report).await?
    {
        state.wake.job(&report.build_id, &report.job);
        return Ok(());
    }
    let a = own_assignment(state, &w, id).await?;
    let (signed, report) = check_report(&w, &key, &body)?;
    if report.assignment != a.id || report.build_id != a.build_id || report.job != a.job {
        return Err(ApiError::bad_request(
            "report names another assignment, build, job or worker",
        ));
    }
    if a.state == "reported" {
        // A retry after a lost response: the same report again is fine, another one is not.
        return if a.report.as_deref() == Some(signed.report.as_str()) {
            Ok(())
        } else {
            Err(ApiError::conflict(
                "this assignment already has a different report",
            ))
        };
    }
    if !record_report(state, &w, &signed, &report).await? {
        return Err(ApiError::conflict(format!(
            "assignment {} is {}; its result is no longer wanted",
            a.id, a.state
        )));
    }
    state.wake.job(&a.build_id, &a.job);
    Ok(())
}

/// Checks a report's signature with the worker's key, that it names this worker, and its
/// manifest; no database read.
fn check_report(
    w: &WorkerRow,
    key: &VerifyingKey,
    body: &[u8],
) -> Result<(SignedReport, ResultReport), ApiError> {
    let signed: SignedReport = parse(body)?;
    let sig = B64
        .decode(&signed.signature)
        .ok()
        .and_then(|b| Signature::from_slice(&b).ok())
        .ok_or_else(|| {
            ApiError::bad_request("report signature is not a base64 Ed25519 signature")
        })?;
    key.verify(&report_message(signed.report.as_bytes()), &sig)
        .map_err(|_| {
            ApiError::bad_request("report signature does not verify with this worker's key")
        })?;
    let report: ResultReport = serde_json::from_str(&signed.report)
        .map_err(|e| ApiError::bad_request(format!("report: {e}")))?;
    if report.worker != w.id {
        return Err(ApiError::bad_request(
            "report names another assignment, build, job or worker",
        ));
    }
    if let ReportedResult::Success {
        manifest,
        manifest_digest,
    } = &report.result
    {
        manifest
            .validate()
            .map_err(|e| ApiError::bad_request(format!("report manifest: {e}")))?;
        if manifest.digest() != *manifest_digest {
            return Err(ApiError::bad_request(
                "report manifest does not hash to its manifest_digest",
            ));
        }
    }
    Ok((signed, report))
}

/// Records a checked report on the assignment it names, if that is `w`'s, of the build and
/// job the report names, and running; returns whether it was.
async fn record_report(
    state: &State,
    w: &WorkerRow,
    signed: &SignedReport,
    report: &ResultReport,
) -> Result<bool, ApiError> {
    let outcome = serde_json::to_string(&report.result.outcome()).map_err(ApiError::internal)?;
    let detail = match &report.result {
        ReportedResult::Success { .. } => None,
        ReportedResult::Failed { reason } => Some(reason.chars().take(2000).collect::<String>()),
    };
    let usage = |v: u64| Arg::Int(i64::try_from(v).unwrap_or(i64::MAX));
    let write = Write {
        kind: &REPORT,
        id: report.assignment.clone(),
        args: vec![
            Arg::Text(signed.report.clone()),
            Arg::Text(signed.signature.clone()),
            Arg::Text(outcome.clone()),
            Arg::OptText(detail),
            Arg::Int(now_unix()),
            usage(report.usage.wall_ms),
            usage(report.usage.cpu_ms),
            usage(report.usage.peak_rss_kib),
            usage(report.usage.bytes_uploaded),
            Arg::Text(w.id.clone()),
            Arg::Text(report.build_id.clone()),
            Arg::Text(report.job.clone()),
        ],
    };
    if !state.commits.execute(write).await? {
        return Ok(false);
    }
    tracing::info!(assignment = %report.assignment, worker = %w.id, outcome = %outcome, "result reported");
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// However stale the statistics, a report finds its row by id. Here a thousand assignments
    /// run, but the statistics were gathered when they were offered: PostgreSQL took
    /// `state = 'running'` for a one-row restriction and read every running assignment for
    /// each statement (in a benchmark's plan, once per report of it: 64,000 comparisons for
    /// 64 reports).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reports_find_their_rows_by_id_on_postgres_with_stale_statistics() {
        let pg = quorum_testkit::PgDatabase::create("quorum_reports").await;
        let dir = tempfile::tempdir().unwrap();
        let pool = crate::db::open(dir.path(), Some(&pg.url)).await.unwrap();
        let long = "x".repeat(1300); // as wide as the rows of a real build
        for sql in [
            "INSERT INTO builds (id, repository, commit_id, source_date_epoch, state, created_at) \
             VALUES ('b', 'r', 'c', 0, 'running', 0)",
            "INSERT INTO workers (id, owner, trusted, labels, public_key, enrolled_at) \
             SELECT 'w' || i, 'o' || i, 0, '[]', 'k', 0 FROM generate_series(0, 99) AS i",
            "INSERT INTO jobs (build_id, name, position, spec, state) \
             SELECT 'b', 'j' || i, i, '{}', 'running' FROM generate_series(0, 999) AS i",
            "INSERT INTO assignments (id, build_id, job, worker_id, state, created_at, \
             lease_expires, tenant, log_secrets) SELECT 'a' || i, 'b', 'j' || i, 'w' || (i % 100), \
             'offered', i, 0, 'acme', $1 FROM generate_series(0, 999) AS i",
            "ANALYZE assignments",
            "UPDATE assignments SET state = 'running'",
        ] {
            let mut q = sqlx::query(sql);
            if sql.contains("$1") {
                q = q.bind(&long);
            }
            q.execute(&pool).await.unwrap();
        }
        let width = 13;
        let sql = format!(
            "EXPLAIN ANALYZE {}",
            crate::commits::statement(&pool, &REPORT, 64, width)
        );
        let mut q = sqlx::query(&sql);
        for i in (0..640).step_by(10) {
            q = q
                .bind(format!("a{i}"))
                .bind(long.clone())
                .bind("signature")
                .bind("{}")
                .bind(None::<String>);
            for _ in 0..4 {
                q = q.bind(0_i64);
            }
            q = q
                .bind(0_i64)
                .bind(format!("w{}", i % 100))
                .bind("b")
                .bind(format!("j{i}"));
        }
        let mut tx = pool.begin().await.unwrap();
        let plan: Vec<String> = q
            .fetch_all(&mut *tx)
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        tx.rollback().await.unwrap();
        let plan = plan.join("\n");
        assert!(
            plan.lines()
                .any(|l| l.contains("Update on assignments") && l.contains("rows=64 ")),
            "every report changed its row:\n{plan}"
        );
        // Rows read from the table, over all loops of each scan of it: the 64 reported, not
        // every running assignment.
        let read: u64 = plan
            .lines()
            .filter(|l| l.contains("Scan") && l.contains(" on assignments "))
            .map(|l| {
                let actual = &l[l.find("(actual").expect("EXPLAIN ANALYZE")..];
                let number = |key: &str| -> u64 {
                    let rest = &actual[actual.find(key).unwrap() + key.len()..];
                    let end = rest.find(|c: char| !c.is_ascii_digit()).unwrap();
                    rest[..end].parse().unwrap()
                };
                number("rows=") * number("loops=")
            })
            .sum();
        assert!(
            read <= 64,
            "{read} assignments read for 64 reports:\n{plan}"
        );
        pool.close().await;
    }
}
