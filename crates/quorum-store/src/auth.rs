//! Bearer tokens as axum extractors: [`Upload`] for writes, [`Read`] for downloads, [`Revoke`]
//! for revocation. Each verifies against the issuers this store trusts, then admits the call
//! (source address, revocation, `max_calls`) before the body is read, so a refused request
//! changes nothing.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use quorum_client::trust::TrustError;
use quorum_service::ApiError;
use quorum_token::{Claims, Scope, TYP_READ, TYP_REVOKE, TYP_UPLOAD};

use crate::Store;
use crate::db::Slot;
use crate::error::Error;
use crate::usage::{Refused, TokenId};

/// Longest lifetime of a token this store accepts.
pub const MAX_TOKEN_LIFETIME_SECS: i64 = 24 * 3600;

/// The limits an admitted token carries into its handler.
#[derive(Debug, Clone)]
pub struct Limits {
    pub jti: String,
    pub max_files: Option<u64>,
    pub max_bytes: Option<u64>,
}

/// A verified upload token: the one assignment it may write for.
#[derive(Debug)]
pub struct Upload {
    pub slot: Slot,
    pub limits: Limits,
}

/// A verified read token: the one build of one tenant it may read.
#[derive(Debug)]
pub struct Read {
    pub tenant: String,
    pub build: String,
}

/// A verified revoke token: may revoke tokens seen here for one build of one tenant.
#[derive(Debug)]
pub struct Revoke {
    pub iss: String,
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

/// Checks the constraints that need no body: where the request comes from, then (counting the
/// call durably) revocation and `max_calls`.
async fn admit(parts: &Parts, store: &Store, claims: &Claims, scope: &Scope) -> Result<(), Error> {
    if !scope.source_cidrs.is_empty() {
        let peer = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|ConnectInfo(addr)| addr.ip());
        check_source(&scope.source_cidrs, peer)?;
    }
    let id = TokenId {
        jti: claims.jti.clone(),
        iss: claims.iss.clone(),
        tenant: claims.tenant.clone(),
        build: scope.build.clone(),
        exp: claims.exp,
    };
    match crate::usage::reserve_call(&store.db, &id, scope.max_calls).await? {
        Ok(()) => Ok(()),
        Err(Refused::Revoked) => {
            Err(ApiError::unauthorized(format!("token `{}` has been revoked", claims.jti)).into())
        }
        Err(Refused::CallsUsedUp { max }) => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!("token has used all of its max_calls ({max}) calls"),
        )
        .into()),
        Err(Refused::Foreign) => Err(ApiError::unauthorized(format!(
            "token id `{}` is already used by another token",
            claims.jti
        ))
        .into()),
    }
}

/// The request's peer must lie in one of `cidrs`. IPv4 peers seen as IPv4-mapped IPv6 are
/// compared as IPv4.
fn check_source(cidrs: &[String], peer: Option<IpAddr>) -> Result<(), Error> {
    let Some(peer) = peer.map(|ip| ip.to_canonical()) else {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "token is bound to source addresses, and this request's address is unknown",
        )
        .into());
    };
    let mut allowed = false;
    for cidr in cidrs {
        let net: ipnet::IpNet = cidr.parse().map_err(|_| {
            ApiError::unauthorized(format!("token's source_cidrs entry `{cidr}` is not a CIDR"))
        })?;
        allowed |= net.contains(&peer);
    }
    if allowed {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!(
                "token may be used only from {}; this request came from {peer}",
                cidrs.join(", ")
            ),
        )
        .into())
    }
}

fn nonempty(v: Option<String>) -> Option<String> {
    v.filter(|s| !s.is_empty())
}

impl FromRequestParts<Arc<Store>> for Upload {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, store: &Arc<Store>) -> Result<Upload, Error> {
        let claims = verify(parts, store, TYP_UPLOAD).await?;
        let scope = claims.scope.clone().unwrap_or_default();
        let (Some(job), Some(assignment)) = (
            nonempty(scope.job.clone()),
            nonempty(scope.assignment.clone()),
        ) else {
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
        admit(parts, store, &claims, &scope).await?;
        Ok(Upload {
            slot: Slot {
                tenant: claims.tenant,
                build: scope.build,
                job,
                assignment,
            },
            limits: Limits {
                jti: claims.jti,
                max_files: scope.max_files,
                max_bytes: scope.max_bytes,
            },
        })
    }
}

impl FromRequestParts<Arc<Store>> for Read {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, store: &Arc<Store>) -> Result<Read, Error> {
        let claims = verify(parts, store, TYP_READ).await?;
        match claims.scope.clone() {
            Some(scope) if !scope.build.is_empty() => {
                admit(parts, store, &claims, &scope).await?;
                Ok(Read {
                    tenant: claims.tenant,
                    build: scope.build,
                })
            }
            _ => Err(ApiError::unauthorized("read token must name a build").into()),
        }
    }
}

impl FromRequestParts<Arc<Store>> for Revoke {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, store: &Arc<Store>) -> Result<Revoke, Error> {
        let claims = verify(parts, store, TYP_REVOKE).await?;
        match claims.scope.clone() {
            Some(scope) if !scope.build.is_empty() => {
                admit(parts, store, &claims, &scope).await?;
                Ok(Revoke {
                    iss: claims.iss,
                    tenant: claims.tenant,
                    build: scope.build,
                })
            }
            _ => Err(ApiError::unauthorized("revoke token must name a build").into()),
        }
    }
}
