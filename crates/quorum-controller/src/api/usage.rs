//! `GET /api/v1/usage`, API token: per-tenant and per-build usage, summed in SQL from the
//! columns the result handler fills from each worker's signed report (wall and CPU time, peak
//! memory, bytes uploaded). The tenant is the one the controller's token named when the
//! worker took the assignment, the same one the worker's own ledger records.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Query, State as AxState};
use axum::http::HeaderMap;
use quorum_api::v1::controller::{BuildUsage, TenantUsage, UsageTotals, UsageView};
use quorum_service::ApiError;
use serde::Deserialize;
use sqlx::Row as _;
use sqlx::any::AnyRow;

use crate::api::builds::build_state;
use crate::{State, auth, rfc3339};

#[derive(Deserialize)]
pub struct UsageQuery {
    tenant: Option<String>,
    limit: Option<u32>,
}

const DEFAULT_LIMIT: u32 = 100;
const MAX_LIMIT: u32 = 10_000;

/// `SUM` of a BIGINT is NUMERIC in PostgreSQL, which the `Any` driver does not carry: cast back.
const TOTALS: &str = "COUNT(*) AS results, \
    CAST(COALESCE(SUM(a.wall_ms), 0) AS BIGINT) AS wall_ms, \
    CAST(COALESCE(SUM(a.cpu_ms), 0) AS BIGINT) AS cpu_ms, \
    CAST(COALESCE(MAX(a.peak_rss_kib), 0) AS BIGINT) AS peak_rss_kib, \
    CAST(COALESCE(SUM(a.bytes_uploaded), 0) AS BIGINT) AS bytes_uploaded";

fn totals(r: &AnyRow) -> UsageTotals {
    let n = |c: &str| r.get::<i64, _>(c).max(0) as u64;
    UsageTotals {
        results: n("results"),
        wall_ms: n("wall_ms"),
        cpu_ms: n("cpu_ms"),
        peak_rss_kib: n("peak_rss_kib"),
        bytes_uploaded: n("bytes_uploaded"),
    }
}

pub async fn usage(
    AxState(state): AxState<Arc<State>>,
    Query(q): Query<UsageQuery>,
    headers: HeaderMap,
) -> Result<Json<UsageView>, ApiError> {
    auth::user(&state, &headers)?;
    let limit = q.limit.unwrap_or(DEFAULT_LIMIT);
    if limit == 0 || limit > MAX_LIMIT {
        return Err(ApiError::bad_request(format!(
            "limit must be between 1 and {MAX_LIMIT}"
        )));
    }
    let tenant = q.tenant.filter(|t| !t.is_empty());
    let only = if tenant.is_some() {
        " AND a.tenant = $1"
    } else {
        ""
    };
    let tenants_sql = format!(
        "SELECT a.tenant AS tenant, COUNT(DISTINCT a.build_id) AS builds, {TOTALS} \
         FROM assignments a WHERE a.state = 'reported' AND a.tenant IS NOT NULL{only} \
         GROUP BY a.tenant ORDER BY a.tenant"
    );
    let builds_sql = format!(
        "SELECT b.id AS id, b.repository AS repository, b.state AS state, \
         b.created_at AS created_at, MAX(a.tenant) AS tenant, {TOTALS} \
         FROM builds b JOIN assignments a ON a.build_id = b.id \
         WHERE a.state = 'reported' AND a.tenant IS NOT NULL{only} \
         GROUP BY b.id, b.repository, b.state, b.created_at \
         ORDER BY b.created_at DESC, b.id LIMIT {limit}"
    );
    let mut tenants = sqlx::query(&tenants_sql);
    let mut builds = sqlx::query(&builds_sql);
    if let Some(t) = &tenant {
        tenants = tenants.bind(t.clone());
        builds = builds.bind(t.clone());
    }
    let tenants = tenants
        .fetch_all(&state.pool)
        .await
        .map_err(ApiError::internal)?
        .iter()
        .map(|r| TenantUsage {
            tenant: r.get("tenant"),
            builds: r.get::<i64, _>("builds").max(0) as u64,
            totals: totals(r),
        })
        .collect();
    let builds = builds
        .fetch_all(&state.pool)
        .await
        .map_err(ApiError::internal)?
        .iter()
        .map(|r| BuildUsage {
            build_id: r.get("id"),
            tenant: r.get("tenant"),
            repository: r.get("repository"),
            state: build_state(r.get::<&str, _>("state")),
            created_at: rfc3339(r.get("created_at")),
            totals: totals(r),
        })
        .collect();
    Ok(Json(UsageView { tenants, builds }))
}
