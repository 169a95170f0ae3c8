//! Identity provider endpoints: OIDC discovery, JWKS, and the OAuth 2.0 token endpoint
//! (client credentials, and RFC 8693 token exchange for job, upload, read and revoke tokens).

use serde::{Deserialize, Serialize};

pub const GRANT_CLIENT_CREDENTIALS: &str = "client_credentials";
pub const GRANT_TOKEN_EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
pub const TOKEN_TYPE_ACCESS: &str = "urn:ietf:params:oauth:token-type:access_token";
pub const TOKEN_TYPE_JOB: &str = "urn:quorum:token-type:job";
pub const TOKEN_TYPE_UPLOAD: &str = "urn:quorum:token-type:upload";
pub const TOKEN_TYPE_READ: &str = "urn:quorum:token-type:read";
/// A revoke token: audience a store, scope one build; authenticates `POST /api/v1/revoke` there.
pub const TOKEN_TYPE_REVOKE: &str = "urn:quorum:token-type:revoke";

/// `GET /.well-known/openid-configuration`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Discovery {
    pub issuer: String,
    pub jwks_uri: String,
    pub token_endpoint: String,
    pub grant_types_supported: Vec<String>,
    pub id_token_signing_alg_values_supported: Vec<String>,
}

/// `POST /token`, form-encoded, client authenticated with HTTP Basic.
///
/// For token exchange, `subject_token` is the client's own access token and the quorum-specific
/// parameters (`build`, `job`, `assignment`, `lifetime_secs`) describe the one assignment the
/// requested token is for. The tenant always comes from the client's registration.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct TokenRequest {
    pub grant_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject_token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject_token_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested_token_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audience: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assignment: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lifetime_secs: Option<i64>,
}

/// Optional constraints sent as further form fields of the same token-exchange `POST /token`
/// (beside [`TokenRequest`]'s): the IdP copies them into the issued token's scope and the store
/// enforces them. Kept apart from `TokenRequest` so that struct's existing literals still build.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct TokenConstraints {
    /// Most blobs the token may upload; copied into the token's scope, enforced by the store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_files: Option<u64>,
    /// Most blob bytes the token may send; enforced by the store while the bytes arrive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bytes: Option<u64>,
    /// Most requests the token may make where it is used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_calls: Option<u64>,
    /// Comma-separated CIDRs (`10.0.0.0/8,::1/128`) the token may be used from. A form field
    /// holds one string, hence the commas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_cidrs: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TokenResponse {
    pub access_token: String,
    pub issued_token_type: String,
    pub token_type: String,
    pub expires_in: i64,
}

/// OAuth error response (RFC 6749 §5.2).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct OAuthError {
    pub error: String,
    pub error_description: String,
}

/// `requested_token_type` of the exchange that gives a worker's take-up both its tokens in one
/// request: a job token for `audience` (`worker:<name>`) and an upload token for
/// [`TakeUpRequest::upload_audience`] (the store), with the same scope (`build`, `job` and
/// `assignment`, all three required) and lifetime, checked as the two single exchanges are.
/// The [`TokenConstraints`] apply to the upload token only. Answered with [`TakeUpTokens`].
pub const TOKEN_TYPE_JOB_AND_UPLOAD: &str = "urn:quorum:token-type:job-and-upload";

/// The further form field of a [`TOKEN_TYPE_JOB_AND_UPLOAD`] exchange, sent beside
/// [`TokenRequest`]'s.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct TakeUpRequest {
    /// The upload token's audience (the store); `audience` is the job token's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upload_audience: Option<String>,
}

/// The answer to a [`TOKEN_TYPE_JOB_AND_UPLOAD`] exchange: each token as a single exchange
/// would have answered it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TakeUpTokens {
    pub job: TokenResponse,
    pub upload: TokenResponse,
}

/// `POST /take-ups`, JSON, client authenticated with HTTP Basic: many take-ups' job and upload
/// tokens in one request. A controller asks for them ahead, for the offers a worker will take
/// one after another, so that taking an offer costs no round trip to the IdP. Each take-up is
/// checked exactly as a [`TOKEN_TYPE_JOB_AND_UPLOAD`] exchange would be; one bad take-up
/// refuses the whole request, naming it by its index.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TakeUpsRequest {
    /// The client's own access token, as `subject_token` of an exchange.
    pub subject_token: String,
    /// The upload tokens' audience (the store), the same for every take-up.
    pub upload_audience: String,
    /// At most [`MAX_TAKE_UPS`].
    pub take_ups: Vec<TakeUp>,
}

/// Most take-ups in one [`TakeUpsRequest`].
pub const MAX_TAKE_UPS: usize = 256;

/// One take-up of a [`TakeUpsRequest`]: the fields of its exchange.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TakeUp {
    /// The job token's audience: `worker:<name>`.
    pub audience: String,
    pub build: String,
    pub job: String,
    pub assignment: String,
    pub lifetime_secs: i64,
    /// Limits on the upload token, enforced by the store.
    #[serde(default)]
    pub upload_constraints: TokenConstraints,
}

/// The answer to a [`TakeUpsRequest`]: each take-up's tokens, in the order asked.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TakeUpsResponse {
    pub tokens: Vec<TakeUpTokens>,
}
