//! Bearer tokens as axum extractors: [`Upload`] for writes, [`Read`] for downloads. Both verify
//! against the issuers this store trusts and run before the body is read.

use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use quorum_client::trust::TrustError;
use quorum_service::ApiError;
use quorum_token::{Claims, TYP_READ, TYP_UPLOAD};

use crate::Store;
use crate::db::Slot;
use crate::error::Error;

/// Longest lifetime of a token this store accepts.
pub const MAX_TOKEN_LIFETIME_SECS: i64 = 24 * 3600;

/// A verified upload token: the one assignment it may write for.
#[derive(Debug)]
pub struct Upload(pub Slot);

/// A verified read token: the one build of one tenant it may read.
#[derive(Debug)]
pub struct Read {
    pub tenant: String,
    pub build: String,
}

async fn verify(parts: &Parts, store: &Store, typ: &str) -> Result<Claims, Error> {
    let token = parts
        .headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .ok_or_else(|| {
            ApiError::unauthorized(format!(
                "missing bearer token: send `Authorization: Bearer <{typ} token>`"
            ))
        })?;
    store
        .trust
        .verify(token.trim(), typ, &store.audience, MAX_TOKEN_LIFETIME_SECS)
        .await
        .map_err(|e| match e {
            // The caller's token may be fine; this store cannot reach its issuer right now.
            TrustError::Fetch { .. } | TrustError::IssuerMismatch { .. } => {
                tracing::warn!(error = %e, "cannot check a token's issuer");
                Error::Api(ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    e.to_string(),
                ))
            }
            TrustError::Token(e) => Error::Api(ApiError::unauthorized(e.to_string())),
        })
}

fn nonempty(v: Option<String>) -> Option<String> {
    v.filter(|s| !s.is_empty())
}

impl FromRequestParts<Arc<Store>> for Upload {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, store: &Arc<Store>) -> Result<Upload, Error> {
        let claims = verify(parts, store, TYP_UPLOAD).await?;
        let scope = claims.scope.unwrap_or_default();
        let (Some(job), Some(assignment)) = (nonempty(scope.job), nonempty(scope.assignment))
        else {
            return Err(ApiError::unauthorized(
                "upload token must name a build, a job and an assignment",
            )
            .into());
        };
        if scope.build.is_empty() {
            return Err(ApiError::unauthorized(
                "upload token must name a build, a job and an assignment",
            )
            .into());
        }
        Ok(Upload(Slot {
            tenant: claims.tenant,
            build: scope.build,
            job,
            assignment,
        }))
    }
}

impl FromRequestParts<Arc<Store>> for Read {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, store: &Arc<Store>) -> Result<Read, Error> {
        let claims = verify(parts, store, TYP_READ).await?;
        match claims.scope {
            Some(scope) if !scope.build.is_empty() => Ok(Read {
                tenant: claims.tenant,
                build: scope.build,
            }),
            _ => Err(ApiError::unauthorized("read token must name a build").into()),
        }
    }
}
