//! Revokes each assignment's upload token at the store once the assignment has ended (reported,
//! refused, lost or cancelled), so a token that leaked from a worker is worthless afterwards,
//! even before it expires. Runs beside the scheduler and retries until the store confirms.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use quorum_api::v1::idp::TOKEN_TYPE_REVOKE;
use quorum_client::idp::TokenFor;
use quorum_client::store::StoreClient;
use sqlx::Row as _;
use tokio_util::sync::CancellationToken;

use crate::{State, background, db};

pub async fn run(state: Arc<State>, shutdown: CancellationToken) {
    let store = StoreClient::new(&state.store_url);
    let failed = "cannot revoke ended assignments' upload tokens yet; retrying";
    background::every(&shutdown, Duration::from_secs(1), failed, || {
        pass(&state, &store)
    })
    .await
}

async fn pass(state: &State, store: &StoreClient) -> anyhow::Result<()> {
    let rows = sqlx::query(
        "SELECT id, build_id, upload_jti FROM assignments WHERE upload_jti IS NOT NULL AND upload_revoked = 0 \
         AND state IN ('reported', 'refused', 'declined', 'lost', 'cancelled') LIMIT 1000",
    )
    .fetch_all(&state.pool)
    .await?;
    let mut by_build: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    for r in &rows {
        by_build
            .entry(r.get("build_id"))
            .or_default()
            .push((r.get("id"), r.get("upload_jti")));
    }
    for (build, items) in by_build {
        let access = state.access_token().await?;
        let what = TokenFor {
            token_type: TOKEN_TYPE_REVOKE,
            audience: state.store_audience.clone(),
            build: build.clone(),
            job: None,
            assignment: None,
            lifetime_secs: 300,
            constraints: Default::default(),
        };
        let token = state.idp.exchange(&access, &what).await?.access_token;
        let jtis: Vec<String> = items.iter().map(|(_, j)| j.clone()).collect();
        let answer = store.revoke(&token, jtis).await?;
        // One commit for the whole batch: these marks compete with dispatch for the writer.
        let (revoked, pinned): (Vec<_>, Vec<_>) = items
            .iter()
            .partition(|(_, jti)| answer.revoked.contains(jti));
        for (id, jti) in &pinned {
            // Pinned to someone else at the store: nothing more this controller can do.
            tracing::error!(assignment = %id, %jti, "the store would not revoke this upload token");
        }
        let _turn = state.write_gate.enter().await;
        let mut tx = state.pool.begin().await?;
        for (mark, rows) in [(1, &revoked), (-1, &pinned)] {
            let ids: Vec<&str> = rows.iter().map(|(id, _)| id.as_str()).collect();
            db::mark_revoked(&mut tx, &ids, mark).await?;
        }
        tx.commit().await?;
        tracing::info!(%build, count = items.len(), "upload tokens revoked");
    }
    Ok(())
}
