//! Pushes each verified build's signed statement to the store, beside its artifacts, and makes
//! the build public there when the project says so (`[project] public`). Consumers can then
//! check a build's files against its statement with the store alone.
//!
//! An outbox: the scheduler writes the statement, the verdict and (by the column's default) the
//! "not yet pushed" mark in one transaction; this task pushes what is marked and clears the mark
//! once the store confirms, retrying with exponential backoff. A controller killed at any point
//! pushes again after its restart, and pushing twice is harmless (the store records the same
//! envelope again).

use std::sync::Arc;
use std::time::Duration;

use quorum_api::v1::idp::TOKEN_TYPE_REVOKE;
use quorum_client::idp::TokenFor;
use quorum_client::store::StoreClient;
use quorum_core::attest::Envelope;
use quorum_service::now_unix;
use sqlx::Row as _;
use tokio_util::sync::CancellationToken;

use crate::{State, background};

/// How often the outbox is looked at.
const EVERY: Duration = Duration::from_secs(1);
/// Statements pushed per pass, so one pass stays short.
const BATCH: i64 = 64;

pub async fn run(state: Arc<State>, shutdown: CancellationToken) {
    let store = StoreClient::new(&state.store_url);
    let failed = "cannot read the statement outbox; retrying";
    background::every(&shutdown, EVERY, failed, || pass(&state, &store)).await
}

async fn pass(state: &State, store: &StoreClient) -> anyhow::Result<()> {
    let rows = sqlx::query(
        "SELECT build_id, envelope, push_attempts FROM statements \
         WHERE pushed_at IS NULL AND next_push_at <= $1 ORDER BY next_push_at LIMIT $2",
    )
    .bind(now_unix())
    .bind(BATCH)
    .fetch_all(&state.pool)
    .await?;
    for r in rows {
        let build: String = r.get("build_id");
        let attempts: i64 = r.get("push_attempts");
        match push(state, store, &build, &r.get::<String, _>("envelope")).await {
            Ok(()) => {
                let _turn = state.write_gate.enter().await;
                sqlx::query("UPDATE statements SET pushed_at = $1 WHERE build_id = $2")
                    .bind(now_unix())
                    .bind(&build)
                    .execute(&state.pool)
                    .await?;
                tracing::info!(%build, public = state.project.public, "statement pushed to the store");
            }
            Err(e) => {
                let delay = background::backoff_secs(attempts);
                tracing::warn!(%build, error = %format!("{e:#}"), retry_in_secs = delay, "cannot push the statement to the store");
                let _turn = state.write_gate.enter().await;
                sqlx::query(
                    "UPDATE statements SET push_attempts = push_attempts + 1, next_push_at = $1 WHERE build_id = $2",
                )
                .bind(now_unix() + delay)
                .bind(&build)
                .execute(&state.pool)
                .await?;
            }
        }
    }
    Ok(())
}

async fn push(
    state: &State,
    store: &StoreClient,
    build: &str,
    envelope: &str,
) -> anyhow::Result<()> {
    let envelope: Envelope = serde_json::from_str(envelope)?;
    let access = state.access_token().await?;
    // The revoke token is the one build-scoped token only a controller holds; the store takes
    // the statement only with it.
    let what = TokenFor {
        token_type: TOKEN_TYPE_REVOKE,
        audience: state.store_audience.clone(),
        build: build.to_string(),
        job: None,
        assignment: None,
        lifetime_secs: 300,
        constraints: Default::default(),
    };
    let token = state.idp.exchange(&access, &what).await?.access_token;
    store
        .put_statement(&token, build, &envelope, state.project.public)
        .await?;
    Ok(())
}
