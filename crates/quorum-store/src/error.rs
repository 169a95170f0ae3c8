//! The store's one error type, and the one place it becomes an HTTP answer. Storage failures are
//! logged in full and answered generically.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use quorum_service::ApiError;

use crate::blobs::BlobError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Already says what to answer.
    #[error("{}", .0.message)]
    Api(ApiError),
    #[error("database: {0}")]
    Db(sqlx::Error),
    #[error(transparent)]
    Blob(BlobError),
}

impl From<ApiError> for Error {
    fn from(e: ApiError) -> Error {
        Error::Api(e)
    }
}

impl From<sqlx::Error> for Error {
    fn from(e: sqlx::Error) -> Error {
        Error::Db(e)
    }
}

impl From<BlobError> for Error {
    fn from(e: BlobError) -> Error {
        Error::Blob(e)
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let api = match self {
            Error::Api(e) => e,
            Error::Db(e) => ApiError::internal(format!("database: {e}")),
            Error::Blob(e @ (BlobError::Mismatch { .. } | BlobError::Truncated { .. })) => {
                ApiError::bad_request(e.to_string())
            }
            Error::Blob(e @ BlobError::TooLarge { .. }) => {
                ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, e.to_string())
            }
            Error::Blob(e @ BlobError::Full) => {
                tracing::error!("blob storage is full");
                ApiError::new(StatusCode::INSUFFICIENT_STORAGE, e.to_string())
            }
            Error::Blob(
                e @ (BlobError::Gone(_) | BlobError::Io(_) | BlobError::ObjectStore(_)),
            ) => ApiError::internal(e),
        };
        if api.status.is_client_error() {
            tracing::info!(status = %api.status, error = %api.message, "request refused");
        }
        api.into_response()
    }
}
