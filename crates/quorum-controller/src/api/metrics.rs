//! `GET /metrics`, unauthenticated: Prometheus text exposition of what the controller's
//! database holds (builds, jobs and assignments by state; workers enrolled and online). Read
//! from the database at each scrape, so the figures survive restarts and never drift from it;
//! only the take-up token counter is the process's own.
//! Only counts are exposed: no repository, build id or worker name leaves through here.

use std::fmt::Write as _;
use std::sync::Arc;

use axum::extract::State as AxState;
use axum::http::header;
use axum::response::IntoResponse;
use quorum_service::{ApiError, now_unix};
use sqlx::Row as _;

use crate::State;

async fn by_state(state: &State, table: &str) -> Result<Vec<(String, i64)>, ApiError> {
    let rows = sqlx::query(&format!(
        "SELECT state, COUNT(*) AS n FROM {table} GROUP BY state ORDER BY state"
    ))
    .fetch_all(&state.pool)
    .await
    .map_err(ApiError::internal)?;
    Ok(rows.iter().map(|r| (r.get("state"), r.get("n"))).collect())
}

pub async fn metrics(AxState(state): AxState<Arc<State>>) -> Result<impl IntoResponse, ApiError> {
    let mut out = String::new();
    for (table, name, help) in [
        ("builds", "quorum_builds", "Builds by state."),
        ("jobs", "quorum_jobs", "Jobs by state."),
        (
            "assignments",
            "quorum_assignments",
            "Assignments (one job on one worker) by state.",
        ),
    ] {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        for (s, n) in by_state(&state, table).await? {
            let _ = writeln!(out, "{name}{{state=\"{s}\"}} {n}");
        }
    }
    let enrolled: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM workers")
        .fetch_one(&state.pool)
        .await
        .map_err(ApiError::internal)?;
    let online: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM workers WHERE last_seen >= $1")
        .bind(now_unix() - state.lease_secs as i64)
        .fetch_one(&state.pool)
        .await
        .map_err(ApiError::internal)?;
    let signed: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM statements")
        .fetch_one(&state.pool)
        .await
        .map_err(ApiError::internal)?;
    let _ = writeln!(
        out,
        "# HELP quorum_workers_enrolled Workers enrolled with this controller.\n# TYPE quorum_workers_enrolled gauge\nquorum_workers_enrolled {enrolled}"
    );
    let _ = writeln!(
        out,
        "# HELP quorum_workers_online Workers seen within one lease.\n# TYPE quorum_workers_online gauge\nquorum_workers_online {online}"
    );
    let _ = writeln!(
        out,
        "# HELP quorum_statements_signed Signed provenance statements.\n# TYPE quorum_statements_signed gauge\nquorum_statements_signed {signed}"
    );
    // Counted by this process since it started, unlike the figures above.
    let _ = writeln!(
        out,
        "# HELP quorum_take_up_tokens_total Offers taken, by where their tokens came from: minted ahead or asked for at take-up.\n# TYPE quorum_take_up_tokens_total counter"
    );
    for (minted, n) in [
        ("ahead", &state.ahead.served_ahead),
        ("at_take_up", &state.ahead.served_at_take_up),
    ] {
        let _ = writeln!(
            out,
            "quorum_take_up_tokens_total{{minted=\"{minted}\"}} {}",
            n.load(std::sync::atomic::Ordering::Relaxed)
        );
    }
    let _ = writeln!(
        out,
        "# HELP quorum_assignments_taken_total Offers taken, by how: a poll, or handed over with the worker's previous report.\n# TYPE quorum_assignments_taken_total counter"
    );
    for (with, n) in [
        ("poll", &state.taken_with_poll),
        ("report", &state.taken_with_report),
    ] {
        let _ = writeln!(
            out,
            "quorum_assignments_taken_total{{with=\"{with}\"}} {}",
            n.load(std::sync::atomic::Ordering::Relaxed)
        );
    }
    let _ = writeln!(
        out,
        "# HELP quorum_take_up_tokens_waiting Offers whose tokens were minted ahead and wait to be taken.\n# TYPE quorum_take_up_tokens_waiting gauge\nquorum_take_up_tokens_waiting {}",
        state.ahead.waiting()
    );
    let _ = writeln!(
        out,
        "# HELP quorum_access_tokens_fetched_total Access tokens the controller fetched from its IdP.\n# TYPE quorum_access_tokens_fetched_total counter\nquorum_access_tokens_fetched_total {}",
        state
            .access_tokens_fetched
            .load(std::sync::atomic::Ordering::Relaxed)
    );
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out))
}
