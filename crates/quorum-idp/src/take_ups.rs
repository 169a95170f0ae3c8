//! `POST /take-ups`, client authenticated with HTTP Basic: many take-ups' job and upload tokens
//! in one request. A controller asks for the tokens of the offers a worker will take one after
//! another before the worker comes for them, so a busy controller's take-up costs no round trip
//! here. Nothing is looser than `POST /token`: the subject token is checked once for the
//! request, and each take-up exactly as a `job-and-upload` exchange checks its one; one bad
//! take-up refuses the whole request, naming its index, and nothing is issued.

use std::sync::Arc;

use axum::extract::State;
use axum::extract::rejection::JsonRejection;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use quorum_api::v1::idp::{
    MAX_TAKE_UPS, TOKEN_TYPE_ACCESS, TOKEN_TYPE_JOB_AND_UPLOAD, TakeUpRequest, TakeUpsRequest,
    TakeUpsResponse, TokenRequest,
};

use crate::Idp;
use crate::token::{OAuthFailure, authenticate, check_subject, mint_take_up, take_up_claims};

pub async fn take_ups(
    State(idp): State<Arc<Idp>>,
    headers: HeaderMap,
    body: Result<axum::Json<TakeUpsRequest>, JsonRejection>,
) -> Result<Response, OAuthFailure> {
    let client = authenticate(&idp, &headers).await?;
    let axum::Json(batch) = body.map_err(|e| {
        OAuthFailure::invalid_request(format!("unreadable take-ups request: {}", e.body_text()))
    })?;
    if batch.take_ups.is_empty() || batch.take_ups.len() > MAX_TAKE_UPS {
        return Err(OAuthFailure::invalid_request(format!(
            "take_ups holds {} take-ups; send 1 to {MAX_TAKE_UPS}",
            batch.take_ups.len()
        )));
    }
    if batch.upload_audience.is_empty() {
        return Err(OAuthFailure::invalid_request("upload_audience is required"));
    }
    check_subject(
        &idp,
        &client,
        &TokenRequest {
            subject_token: Some(batch.subject_token.clone()),
            subject_token_type: Some(TOKEN_TYPE_ACCESS.into()),
            ..Default::default()
        },
    )
    .await?;
    let upload = TakeUpRequest {
        upload_audience: Some(batch.upload_audience.clone()),
    };
    // Every take-up's claims are checked before the first token is signed.
    let mut claims = Vec::with_capacity(batch.take_ups.len());
    for (i, t) in batch.take_ups.iter().enumerate() {
        let req = TokenRequest {
            requested_token_type: Some(TOKEN_TYPE_JOB_AND_UPLOAD.into()),
            audience: Some(t.audience.clone()),
            build: Some(t.build.clone()),
            job: Some(t.job.clone()),
            assignment: Some(t.assignment.clone()),
            lifetime_secs: Some(t.lifetime_secs),
            ..Default::default()
        };
        claims.push(
            take_up_claims(&idp, &client, &req, &t.upload_constraints, &upload)
                .map_err(|e| e.about(&format!("take_ups[{i}]")))?,
        );
    }
    let key = idp.signing_key().await?;
    let tokens = claims
        .into_iter()
        .map(|(job, upload)| mint_take_up(&client, &key, job, upload))
        .collect();
    let mut resp = axum::Json(TakeUpsResponse { tokens }).into_response();
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(resp)
}
