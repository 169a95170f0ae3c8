//! `POST /token`, client authenticated with HTTP Basic: the client credentials grant gives a
//! client its access token for this IdP, and RFC 8693 token exchange turns that access token
//! into a job, upload, read or revoke token for one assignment or build, carrying the
//! constraints the controller sets up front, or into a take-up's job and upload tokens at once. The tenant always comes from the
//! client's registration.

use std::sync::Arc;

use axum::extract::rejection::RawFormRejection;
use axum::extract::{RawForm, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use quorum_api::v1::idp::{
    GRANT_CLIENT_CREDENTIALS, GRANT_TOKEN_EXCHANGE, OAuthError, TOKEN_TYPE_ACCESS, TOKEN_TYPE_JOB,
    TOKEN_TYPE_JOB_AND_UPLOAD, TOKEN_TYPE_READ, TOKEN_TYPE_REVOKE, TOKEN_TYPE_UPLOAD,
    TakeUpRequest, TakeUpTokens, TokenConstraints, TokenRequest, TokenResponse,
};
use quorum_token::{Claims, Expect, Scope, TYP_ACCESS, TYP_JOB, TYP_READ, TYP_REVOKE, TYP_UPLOAD};

use crate::Idp;
use crate::clients::{self, Client};

/// Lifetime of access tokens, and of exchanged tokens whose request names none.
const DEFAULT_LIFETIME_SECS: i64 = 3600;

/// An RFC 6749 §5.2 error answer.
#[derive(Debug)]
pub struct OAuthFailure {
    status: StatusCode,
    error: &'static str,
    description: String,
}

impl OAuthFailure {
    fn new(error: &'static str, description: impl Into<String>) -> OAuthFailure {
        OAuthFailure {
            status: StatusCode::BAD_REQUEST,
            error,
            description: description.into(),
        }
    }

    pub(crate) fn invalid_request(description: impl Into<String>) -> OAuthFailure {
        OAuthFailure::new("invalid_request", description)
    }

    /// The same failure, its description led by `what` (which part of a request it is about).
    pub(crate) fn about(self, what: &str) -> OAuthFailure {
        OAuthFailure {
            description: format!("{what}: {}", self.description),
            ..self
        }
    }

    fn server_error() -> OAuthFailure {
        OAuthFailure {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            ..OAuthFailure::new("server_error", "internal error")
        }
    }

    /// Unknown client, disabled client and wrong secret answer alike, so the answer does not reveal which ids exist.
    fn invalid_client() -> OAuthFailure {
        OAuthFailure {
            status: StatusCode::UNAUTHORIZED,
            error: "invalid_client",
            description: "client authentication failed: send a registered client id and its secret with HTTP Basic"
                .into(),
        }
    }
}

impl IntoResponse for OAuthFailure {
    fn into_response(self) -> Response {
        let body = OAuthError {
            error: self.error.into(),
            error_description: self.description,
        };
        let mut resp = (self.status, axum::Json(body)).into_response();
        let headers = resp.headers_mut();
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if self.status == StatusCode::UNAUTHORIZED {
            headers.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"quorum-idp\""),
            );
        }
        resp
    }
}

pub async fn token(
    State(idp): State<Arc<Idp>>,
    headers: HeaderMap,
    form: Result<RawForm, RawFormRejection>,
) -> Result<Response, OAuthFailure> {
    let client = authenticate(&idp, &headers).await?;
    let RawForm(form) = form.map_err(|e| {
        OAuthFailure::invalid_request(format!("unreadable token request: {}", e.body_text()))
    })?;
    // One form, read as two structs: the standard and quorum parameters, and the optional
    // constraints (kept apart in the api so existing `TokenRequest` literals still build).
    let unreadable = |e: serde_urlencoded::de::Error| {
        OAuthFailure::invalid_request(format!("unreadable token request: {e}"))
    };
    let req: TokenRequest = serde_urlencoded::from_bytes(&form).map_err(unreadable)?;
    let constraints: TokenConstraints = serde_urlencoded::from_bytes(&form).map_err(unreadable)?;
    let take_up: TakeUpRequest = serde_urlencoded::from_bytes(&form).map_err(unreadable)?;
    let issued = match req.grant_type.as_str() {
        GRANT_CLIENT_CREDENTIALS => Issued::One(client_credentials(&idp, &client).await?),
        GRANT_TOKEN_EXCHANGE => exchange(&idp, &client, &req, &constraints, &take_up).await?,
        other => {
            return Err(OAuthFailure::new(
                "unsupported_grant_type",
                format!(
                    "grant_type `{other}` is not supported; use `{GRANT_CLIENT_CREDENTIALS}` or `{GRANT_TOKEN_EXCHANGE}`"
                ),
            ));
        }
    };
    let mut resp = axum::Json(issued).into_response();
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(resp)
}

/// What `POST /token` answers: one token, or a take-up's two.
#[derive(serde::Serialize)]
#[serde(untagged)]
enum Issued {
    One(TokenResponse),
    TakeUp(TakeUpTokens),
}

/// The client that `headers` authenticate with HTTP Basic, or `invalid_client`.
pub(crate) async fn authenticate(idp: &Idp, headers: &HeaderMap) -> Result<Client, OAuthFailure> {
    let (id, secret) = basic_credentials(headers).ok_or_else(OAuthFailure::invalid_client)?;
    // Config-file clients first (an id cannot be in both: checked at start and by the CLI),
    // then the database, read now so the admin CLI's last change counts.
    let candidate = match idp.clients.get(&id) {
        Some(found) => Some(found),
        None => idp.db.find_enabled(&id).await.map_err(|e| {
            tracing::error!(error = %e, "cannot read the client database");
            OAuthFailure::server_error()
        })?,
    };
    let client = match idp.verified.hit(&candidate, &secret) {
        Some(client) => Some(client),
        None => {
            let stored = candidate.as_ref().map(|(_, hash)| hash.clone());
            let checked_secret = secret.clone();
            let client =
                tokio::task::spawn_blocking(move || clients::verify(candidate, &checked_secret))
                    .await
                    .map_err(|e| {
                        tracing::error!(error = %e, "client authentication task failed");
                        OAuthFailure::server_error()
                    })?;
            if let (Some(_), Some(stored)) = (&client, stored) {
                idp.verified.remember(&stored, &secret);
            }
            client
        }
    };
    client.ok_or_else(|| {
        tracing::warn!(client = %id, "client authentication failed");
        OAuthFailure::invalid_client()
    })
}

fn basic_credentials(headers: &HeaderMap) -> Option<(String, String)> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, encoded) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let (id, secret) = std::str::from_utf8(&decoded).ok()?.split_once(':')?;
    Some((id.to_string(), secret.to_string()))
}

async fn client_credentials(idp: &Idp, client: &Client) -> Result<TokenResponse, OAuthFailure> {
    let lifetime = DEFAULT_LIFETIME_SECS.min(idp.max_lifetime_secs);
    let claims = idp.claims(client, &idp.issuer, lifetime, None);
    let key = idp.signing_key().await?;
    tracing::info!(client = %client.id, tenant = %client.tenant, jti = %claims.jti, kid = %key.kid, lifetime, "issued access token");
    Ok(TokenResponse {
        access_token: quorum_token::mint(TYP_ACCESS, &claims, &key),
        issued_token_type: TOKEN_TYPE_ACCESS.into(),
        token_type: "Bearer".into(),
        expires_in: lifetime,
    })
}

async fn exchange(
    idp: &Idp,
    client: &Client,
    req: &TokenRequest,
    constraints: &TokenConstraints,
    take_up: &TakeUpRequest,
) -> Result<Issued, OAuthFailure> {
    check_subject(idp, client, req).await?;
    let requested = req.requested_token_type.as_deref().unwrap_or_default();
    let (typ, token_type) = match requested {
        TOKEN_TYPE_JOB => (TYP_JOB, TOKEN_TYPE_JOB),
        TOKEN_TYPE_UPLOAD => (TYP_UPLOAD, TOKEN_TYPE_UPLOAD),
        TOKEN_TYPE_READ => (TYP_READ, TOKEN_TYPE_READ),
        TOKEN_TYPE_REVOKE => (TYP_REVOKE, TOKEN_TYPE_REVOKE),
        TOKEN_TYPE_JOB_AND_UPLOAD => {
            return Ok(Issued::TakeUp(
                exchange_take_up(idp, client, req, constraints, take_up).await?,
            ));
        }
        _ => {
            return Err(OAuthFailure::invalid_request(format!(
                "requested_token_type `{requested}` is not one of `{TOKEN_TYPE_JOB}`, `{TOKEN_TYPE_UPLOAD}`, `{TOKEN_TYPE_READ}`, `{TOKEN_TYPE_REVOKE}`, `{TOKEN_TYPE_JOB_AND_UPLOAD}`"
            )));
        }
    };
    if take_up.upload_audience.is_some() {
        return Err(OAuthFailure::invalid_request(format!(
            "upload_audience belongs only to `{TOKEN_TYPE_JOB_AND_UPLOAD}` exchanges"
        )));
    }
    let audience = required(&req.audience, "audience")?;
    let (scope, lifetime) = scope(idp, client, req, constraints)?;
    let claims = idp.claims(client, audience, lifetime, Some(scope));
    let key = idp.signing_key().await?;
    Ok(Issued::One(mint(client, &key, typ, token_type, claims)))
}

/// A take-up's job and upload tokens at once: the checks of the two single exchanges, with the
/// job and assignment required, and the constraints on the upload token only (the job token
/// is used at the worker, which counts nothing).
async fn exchange_take_up(
    idp: &Idp,
    client: &Client,
    req: &TokenRequest,
    constraints: &TokenConstraints,
    take_up: &TakeUpRequest,
) -> Result<TakeUpTokens, OAuthFailure> {
    let (job, upload) = take_up_claims(idp, client, req, constraints, take_up)?;
    let key = idp.signing_key().await?;
    Ok(mint_take_up(client, &key, job, upload))
}

/// The claims of a take-up's job and upload tokens, checked.
pub(crate) fn take_up_claims(
    idp: &Idp,
    client: &Client,
    req: &TokenRequest,
    constraints: &TokenConstraints,
    take_up: &TakeUpRequest,
) -> Result<(Claims, Claims), OAuthFailure> {
    let audience = required(&req.audience, "audience")?;
    let upload_audience = required(&take_up.upload_audience, "upload_audience")?;
    required(&req.job, "job")?;
    required(&req.assignment, "assignment")?;
    let (job_scope, lifetime) = scope(idp, client, req, &TokenConstraints::default())?;
    let (upload_scope, _) = scope(idp, client, req, constraints)?;
    let job = idp.claims(client, audience, lifetime, Some(job_scope));
    let upload = idp.claims(client, upload_audience, lifetime, Some(upload_scope));
    Ok((job, upload))
}

/// Signs a take-up's two tokens.
pub(crate) fn mint_take_up(
    client: &Client,
    key: &quorum_token::IssuerKey,
    job: Claims,
    upload: Claims,
) -> TakeUpTokens {
    TakeUpTokens {
        job: mint(client, key, TYP_JOB, TOKEN_TYPE_JOB, job),
        upload: mint(client, key, TYP_UPLOAD, TOKEN_TYPE_UPLOAD, upload),
    }
}

/// Checks that the exchange's subject token is this client's own, unexpired access token from
/// this IdP.
pub(crate) async fn check_subject(
    idp: &Idp,
    client: &Client,
    req: &TokenRequest,
) -> Result<(), OAuthFailure> {
    let subject = req
        .subject_token
        .as_deref()
        .ok_or_else(|| OAuthFailure::invalid_request("subject_token is required"))?;
    if req.subject_token_type.as_deref() != Some(TOKEN_TYPE_ACCESS) {
        return Err(OAuthFailure::invalid_request(format!(
            "subject_token_type must be `{TOKEN_TYPE_ACCESS}`"
        )));
    }
    let expect = Expect {
        typ: TYP_ACCESS,
        issuer: &idp.issuer,
        audience: &idp.issuer,
        max_lifetime_secs: idp.max_lifetime_secs,
    };
    let invalid = |e: quorum_token::TokenError| {
        OAuthFailure::new(
            "invalid_grant",
            format!("subject_token is not a valid access token of this IdP: {e}"),
        )
    };
    // The access token may predate a rotation: any published key of this IdP will do.
    let kid = quorum_token::peek(subject).map_err(invalid)?.kid;
    let key = idp
        .keys
        .public_key(&kid)
        .await
        .map_err(|e| {
            tracing::error!(error = %e, "cannot read the signing keys");
            OAuthFailure::server_error()
        })?
        .ok_or_else(|| {
            invalid(quorum_token::TokenError::UnknownKey {
                iss: idp.issuer.clone(),
                kid: kid.clone(),
            })
        })?;
    let subject = quorum_token::verify(subject, &key, &expect).map_err(invalid)?;
    // An access token is the client's own credential; it never speaks for another client.
    if subject.sub != client.id || subject.tenant != client.tenant {
        return Err(OAuthFailure::new(
            "invalid_grant",
            "subject_token was issued to another client",
        ));
    }
    Ok(())
}

/// The scope an exchange asks for, checked, and its lifetime capped at the IdP's maximum.
fn scope(
    idp: &Idp,
    client: &Client,
    req: &TokenRequest,
    constraints: &TokenConstraints,
) -> Result<(Scope, i64), OAuthFailure> {
    let build = required(&req.build, "build")?;
    let job = optional(&req.job, "job")?;
    let assignment = optional(&req.assignment, "assignment")?;
    let lifetime = req
        .lifetime_secs
        .unwrap_or(DEFAULT_LIFETIME_SECS)
        .min(idp.max_lifetime_secs);
    if lifetime <= 0 {
        return Err(OAuthFailure::invalid_request(
            "lifetime_secs must be positive",
        ));
    }
    let source_cidrs = source_cidrs(constraints.source_cidrs.as_deref())?;
    // The store keeps counters in signed 64-bit columns.
    for (name, value) in [
        ("max_files", constraints.max_files),
        ("max_calls", constraints.max_calls),
        ("max_bytes", constraints.max_bytes),
    ] {
        if value.is_some_and(|v| v > i64::MAX as u64) {
            return Err(OAuthFailure::invalid_request(format!(
                "{name} must be at most {}",
                i64::MAX
            )));
        }
    }
    let scope = Scope {
        controller: client.id.clone(),
        build: build.into(),
        job,
        assignment,
        max_files: constraints.max_files,
        max_bytes: constraints.max_bytes,
        max_calls: constraints.max_calls,
        source_cidrs,
    };
    Ok((scope, lifetime))
}

/// Signs one exchanged token. The claims are built before the key is read (`keys.rs`).
fn mint(
    client: &Client,
    key: &quorum_token::IssuerKey,
    typ: &'static str,
    token_type: &str,
    claims: Claims,
) -> TokenResponse {
    let build = claims
        .scope
        .as_ref()
        .map(|s| s.build.as_str())
        .unwrap_or_default();
    tracing::info!(
        client = %client.id, tenant = %client.tenant, typ, audience = %claims.aud, build, jti = %claims.jti, kid = %key.kid,
        lifetime = claims.exp - claims.iat, "issued exchanged token"
    );
    TokenResponse {
        access_token: quorum_token::mint(typ, &claims, key),
        issued_token_type: token_type.into(),
        token_type: "Bearer".into(),
        expires_in: claims.exp - claims.iat,
    }
}

/// Splits and checks the comma-separated CIDR list, so a token never carries a network its
/// verifier could not parse (which would lock the token out, or worse, be skipped).
fn source_cidrs(value: Option<&str>) -> Result<Vec<String>, OAuthFailure> {
    let Some(value) = value else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for part in value.split(',').map(str::trim) {
        let net: ipnet::IpNet = part.parse().map_err(|_| {
            OAuthFailure::invalid_request(format!(
                "source_cidrs entry `{part}` is not a CIDR such as 10.0.0.0/8 or ::1/128"
            ))
        })?;
        out.push(net.to_string());
    }
    Ok(out)
}

fn required<'a>(value: &'a Option<String>, name: &str) -> Result<&'a str, OAuthFailure> {
    match value.as_deref() {
        Some(v) if !v.is_empty() => Ok(v),
        _ => Err(OAuthFailure::invalid_request(format!("{name} is required"))),
    }
}

fn optional(value: &Option<String>, name: &str) -> Result<Option<String>, OAuthFailure> {
    match value.as_deref() {
        Some("") => Err(OAuthFailure::invalid_request(format!(
            "{name} must not be empty when given"
        ))),
        v => Ok(v.map(str::to_string)),
    }
}

impl Idp {
    /// The active key, read after the claims are built (see `keys.rs` for why the order matters).
    pub(crate) async fn signing_key(&self) -> Result<quorum_token::IssuerKey, OAuthFailure> {
        self.keys.active().await.map_err(|e| {
            tracing::error!(error = %e, "cannot read the active signing key");
            OAuthFailure::server_error()
        })
    }

    fn claims(
        &self,
        client: &Client,
        audience: &str,
        lifetime: i64,
        scope: Option<Scope>,
    ) -> Claims {
        let now = quorum_service::now_unix();
        Claims {
            iss: self.issuer.clone(),
            sub: client.id.clone(),
            aud: audience.to_string(),
            exp: now + lifetime,
            nbf: now,
            iat: now,
            jti: quorum_token::new_jti(),
            tenant: client.tenant.clone(),
            scope,
        }
    }
}
