//! Client for an identity provider's token endpoint, used by controllers.

use quorum_api::v1::idp::{
    GRANT_CLIENT_CREDENTIALS, GRANT_TOKEN_EXCHANGE, TOKEN_TYPE_ACCESS, TOKEN_TYPE_JOB_AND_UPLOAD,
    TakeUp, TakeUpRequest, TakeUpTokens, TakeUpsRequest, TakeUpsResponse, TokenConstraints,
    TokenRequest, TokenResponse,
};

use crate::{ClientError, send_json};

#[derive(Clone)]
pub struct IdpClient {
    http: reqwest::Client,
    base: String,
    client_id: String,
    client_secret: String,
}

impl std::fmt::Debug for IdpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdpClient")
            .field("base", &self.base)
            .field("client_id", &self.client_id)
            .finish()
    }
}

/// What the controller asks a job, upload or read token to be for.
#[derive(Debug, Clone, Default)]
pub struct TokenFor {
    pub token_type: &'static str,
    pub audience: String,
    pub build: String,
    pub job: Option<String>,
    pub assignment: Option<String>,
    pub lifetime_secs: i64,
    /// Limits the store enforces for this token (files, bytes, calls, source addresses).
    pub constraints: TokenConstraints,
}

/// What the controller asks a take-up's job and upload tokens to be for (one exchange,
/// [`TOKEN_TYPE_JOB_AND_UPLOAD`]).
#[derive(Debug, Clone, Default)]
pub struct TakeUpFor {
    /// The job token's audience: `worker:<name>`.
    pub worker_audience: String,
    /// The upload token's audience: the store.
    pub upload_audience: String,
    pub build: String,
    pub job: String,
    pub assignment: String,
    pub lifetime_secs: i64,
    /// Limits the store enforces for the upload token.
    pub upload_constraints: TokenConstraints,
}

impl IdpClient {
    pub fn new(base: &str, client_id: &str, client_secret: &str) -> IdpClient {
        IdpClient {
            http: crate::http_client(),
            base: base.trim_end_matches('/').to_string(),
            client_id: client_id.to_string(),
            client_secret: client_secret.to_string(),
        }
    }

    async fn token<T: serde::de::DeserializeOwned>(
        &self,
        req: &TokenRequest,
        constraints: &TokenConstraints,
        take_up: &TakeUpRequest,
    ) -> Result<T, ClientError> {
        /// One form: the standard parameters and Quorum's side by side.
        #[derive(serde::Serialize)]
        struct Form<'a> {
            #[serde(flatten)]
            req: &'a TokenRequest,
            #[serde(flatten)]
            constraints: &'a TokenConstraints,
            #[serde(flatten)]
            take_up: &'a TakeUpRequest,
        }
        let req = self
            .http
            .post(format!("{}/token", self.base))
            .basic_auth(&self.client_id, Some(&self.client_secret))
            .form(&Form {
                req,
                constraints,
                take_up,
            });
        send_json(req).await
    }

    /// The client's own access token (client credentials grant).
    pub async fn access_token(&self) -> Result<TokenResponse, ClientError> {
        self.token(
            &TokenRequest {
                grant_type: GRANT_CLIENT_CREDENTIALS.into(),
                ..Default::default()
            },
            &TokenConstraints::default(),
            &TakeUpRequest::default(),
        )
        .await
    }

    /// Exchanges the client's access token for a token scoped to one assignment (RFC 8693).
    pub async fn exchange(
        &self,
        access_token: &str,
        what: &TokenFor,
    ) -> Result<TokenResponse, ClientError> {
        self.token(
            &TokenRequest {
                grant_type: GRANT_TOKEN_EXCHANGE.into(),
                subject_token: Some(access_token.to_string()),
                subject_token_type: Some(TOKEN_TYPE_ACCESS.into()),
                requested_token_type: Some(what.token_type.into()),
                audience: Some(what.audience.clone()),
                build: Some(what.build.clone()),
                job: what.job.clone(),
                assignment: what.assignment.clone(),
                lifetime_secs: Some(what.lifetime_secs),
            },
            &what.constraints,
            &TakeUpRequest::default(),
        )
        .await
    }

    /// Exchanges the client's access token for an assignment's job and upload tokens in one
    /// request.
    pub async fn exchange_take_up(
        &self,
        access_token: &str,
        what: &TakeUpFor,
    ) -> Result<TakeUpTokens, ClientError> {
        self.token(
            &TokenRequest {
                grant_type: GRANT_TOKEN_EXCHANGE.into(),
                subject_token: Some(access_token.to_string()),
                subject_token_type: Some(TOKEN_TYPE_ACCESS.into()),
                requested_token_type: Some(TOKEN_TYPE_JOB_AND_UPLOAD.into()),
                audience: Some(what.worker_audience.clone()),
                build: Some(what.build.clone()),
                job: Some(what.job.clone()),
                assignment: Some(what.assignment.clone()),
                lifetime_secs: Some(what.lifetime_secs),
            },
            &what.upload_constraints,
            &TakeUpRequest {
                upload_audience: Some(what.upload_audience.clone()),
            },
        )
        .await
    }

    /// Many take-ups' job and upload tokens in one request (`POST /take-ups`), their upload
    /// tokens all for `upload_audience` (the store); in the order of `take_ups`, all of them or,
    /// when one is refused, none.
    pub async fn exchange_take_ups(
        &self,
        access_token: &str,
        upload_audience: &str,
        take_ups: Vec<TakeUp>,
    ) -> Result<Vec<TakeUpTokens>, ClientError> {
        let req = self
            .http
            .post(format!("{}/take-ups", self.base))
            .basic_auth(&self.client_id, Some(&self.client_secret))
            .json(&TakeUpsRequest {
                subject_token: access_token.to_string(),
                upload_audience: upload_audience.to_string(),
                take_ups,
            });
        let answer: TakeUpsResponse = send_json(req).await?;
        Ok(answer.tokens)
    }
}
