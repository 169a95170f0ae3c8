//! `GET /.well-known/openid-configuration` and `GET /jwks`, unauthenticated: what verifiers fetch
//! to find this issuer's public keys.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use quorum_api::v1::idp::{Discovery, GRANT_CLIENT_CREDENTIALS, GRANT_TOKEN_EXCHANGE};
use quorum_token::Jwks;

use crate::Idp;

pub async fn discovery(State(idp): State<Arc<Idp>>) -> Json<Discovery> {
    // The issuer is published exactly as configured (verifiers compare it byte for byte); only
    // the endpoint URLs are joined without a doubled slash.
    let base = idp.issuer.trim_end_matches('/');
    Json(Discovery {
        issuer: idp.issuer.clone(),
        jwks_uri: format!("{base}/jwks"),
        token_endpoint: format!("{base}/token"),
        grant_types_supported: vec![GRANT_CLIENT_CREDENTIALS.into(), GRANT_TOKEN_EXCHANGE.into()],
        id_token_signing_alg_values_supported: vec!["EdDSA".into()],
    })
}

/// The active key and every retiring one (`keys.rs`), read from the database per request.
pub async fn jwks(State(idp): State<Arc<Idp>>) -> Result<Json<Jwks>, StatusCode> {
    let keys = idp.keys.published().await.map_err(|e| {
        tracing::error!(error = %e, "cannot read the signing keys");
        StatusCode::INTERNAL_SERVER_ERROR
    })?;
    Ok(Json(Jwks { keys }))
}
