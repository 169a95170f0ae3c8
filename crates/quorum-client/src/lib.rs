//! Typed HTTP clients for Quorum's roles (over reqwest with rustls), and [`trust::TrustedIssuers`],
//! the JWKS cache every token verifier uses.

pub mod controller;
pub mod idp;
pub mod publish;
pub mod store;
pub mod trust;
pub mod user;
pub mod verify;

/// A failed call to another role.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach {url}: {source}")]
    Transport { url: String, source: reqwest::Error },
    #[error("{url} answered {status}: {message}")]
    Status {
        url: String,
        status: u16,
        message: String,
    },
    #[error("{url} answered with an unreadable body: {message}")]
    Body { url: String, message: String },
}

impl ClientError {
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// How long a request may wait for the next bytes of a response. Not a bound on the whole
/// request (a large upload or download takes as long as it takes), but a server that stops
/// answering no longer holds its caller, and with it a worker's job or a controller's pass,
/// forever.
const READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

/// One shared HTTP client configuration: rustls, bounded connect time, bounded silence.
pub fn http_client() -> reqwest::Client {
    http_client_reading(READ_TIMEOUT)
}

fn http_client_reading(read_timeout: std::time::Duration) -> reqwest::Client {
    reqwest::Client::builder()
        .connect_timeout(std::time::Duration::from_secs(10))
        .read_timeout(read_timeout)
        .pool_idle_timeout(std::time::Duration::from_secs(60))
        .build()
        .expect("the HTTP client builds")
}

/// Turns a non-success response into [`ClientError::Status`] with the server's message.
pub(crate) async fn check(
    url: &str,
    resp: reqwest::Response,
) -> Result<reqwest::Response, ClientError> {
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    let text = resp.text().await.unwrap_or_default();
    // OAuth errors also parse as `ErrorBody`, so try the richer shape first.
    let message = serde_json::from_str::<quorum_api::v1::idp::OAuthError>(&text)
        .map(|e| format!("{}: {}", e.error, e.error_description))
        .or_else(|_| serde_json::from_str::<quorum_api::ErrorBody>(&text).map(|b| b.error))
        .unwrap_or(text);
    Err(ClientError::Status {
        url: url.to_string(),
        status: status.as_u16(),
        message,
    })
}

pub(crate) fn transport(url: &str) -> impl FnOnce(reqwest::Error) -> ClientError + '_ {
    move |source| ClientError::Transport {
        url: url.to_string(),
        source,
    }
}

pub(crate) async fn json<T: serde::de::DeserializeOwned>(
    url: &str,
    resp: reqwest::Response,
) -> Result<T, ClientError> {
    let resp = check(url, resp).await?;
    let bytes = resp.bytes().await.map_err(transport(url))?;
    serde_json::from_slice(&bytes).map_err(|e| ClientError::Body {
        url: url.to_string(),
        message: e.to_string(),
    })
}

/// Sends `req`; answers the URL it went to (for error messages) and the response.
pub(crate) async fn send(
    req: reqwest::RequestBuilder,
) -> Result<(String, reqwest::Response), ClientError> {
    let (client, req) = req.build_split();
    let req = req.map_err(|source| ClientError::Transport {
        url: source.url().map(|u| u.to_string()).unwrap_or_default(),
        source,
    })?;
    let url = req.url().to_string();
    let resp = client.execute(req).await.map_err(transport(&url))?;
    Ok((url, resp))
}

/// Sends `req` and reads a JSON answer, turning a non-success status into an error.
pub(crate) async fn send_json<T: serde::de::DeserializeOwned>(
    req: reqwest::RequestBuilder,
) -> Result<T, ClientError> {
    let (url, resp) = send(req).await?;
    json(&url, resp).await
}

/// Sends `req` and checks that it succeeded; the body is not read.
pub(crate) async fn send_ok(req: reqwest::RequestBuilder) -> Result<(), ClientError> {
    let (url, resp) = send(req).await?;
    check(&url, resp).await.map(drop)
}

/// Sends `req` and reads the body as bytes, turning a non-success status into an error.
pub(crate) async fn send_bytes(
    req: reqwest::RequestBuilder,
) -> Result<(reqwest::header::HeaderMap, bytes::Bytes), ClientError> {
    let (url, resp) = send(req).await?;
    let resp = check(&url, resp).await?;
    let headers = resp.headers().clone();
    let body = resp.bytes().await.map_err(transport(&url))?;
    Ok((headers, body))
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    /// A server that accepts the request and then says nothing must not hold the caller.
    #[tokio::test]
    async fn a_silent_server_times_the_request_out() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let silent = tokio::spawn(async move {
            let (conn, _) = listener.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(30)).await;
            drop(conn);
        });
        let client = super::http_client_reading(Duration::from_millis(300));
        let start = Instant::now();
        let err = client
            .get(format!("http://{addr}/api/v1/anything"))
            .send()
            .await
            .expect_err("nothing was answered");
        assert!(err.is_timeout(), "{err:?}");
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{:?}",
            start.elapsed()
        );
        silent.abort();
    }
}
