//! The controller's HTTP routes. Worker routes live in `workers.rs`, user routes in `builds.rs`;
//! each handler's doc names its method, route and who may call it.

mod approve;
mod builds;
mod diff;
mod metrics;
mod rebuild;
mod review;
mod usage;
mod workers;

use std::sync::Arc;

use axum::Router;
use axum::routing::{get, post};

use crate::State;

pub fn router(state: Arc<State>) -> Router {
    Router::new()
        .route("/api/v1/workers/enroll", post(workers::enroll))
        .route("/api/v1/workers/poll", post(workers::poll))
        .route("/api/v1/assignments/{id}/refuse", post(workers::refuse))
        .route(
            "/api/v1/assignments/{id}/heartbeat",
            post(workers::heartbeat),
        )
        .route(
            "/api/v1/assignments/{id}/log",
            post(workers::log).get(builds::read_log),
        )
        .route("/api/v1/assignments/{id}/result", post(workers::result))
        .route("/api/v1/builds", post(builds::submit))
        .route("/api/v1/builds/{id}", get(builds::status))
        .route("/api/v1/builds/{id}/cancel", post(builds::cancel))
        .route(
            "/api/v1/builds/{id}/jobs/{job}/approve",
            post(approve::approve),
        )
        .route(
            "/api/v1/builds/{id}/jobs/{job}/rebuild",
            post(rebuild::rebuild),
        )
        .route("/api/v1/review", get(review::list))
        .route("/api/v1/review/{id}/clear", post(review::clear))
        .route("/api/v1/builds/{id}/jobs/{job}/diff", get(diff::diff))
        .route("/api/v1/builds/{id}/statement", get(builds::statement))
        .route("/api/v1/builds/{id}/summary", get(builds::summary))
        .route("/api/v1/builds/{id}/artifacts", get(builds::artifacts))
        .route("/api/v1/signer/keys", get(builds::signer_keys))
        .route("/api/v1/usage", get(usage::usage))
        .route("/healthz", get(|| async { "ok" }))
        .route("/metrics", get(metrics::metrics))
        .layer(axum::extract::DefaultBodyLimit::max(16 * 1024 * 1024))
        .with_state(state)
}
