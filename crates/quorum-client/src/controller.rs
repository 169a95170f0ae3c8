//! The worker side of a controller's API: enrollment, long polling for assignments, and the
//! per-assignment calls (refuse, heartbeat, log, result), each signed with the worker's key.
//!
//! Every signed request is built first and signed afterwards, from the URL and body bytes of the
//! built request itself, so the signature always covers exactly what goes on the wire.

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use ed25519_dalek::{Signer as _, SigningKey};
use quorum_api::v1::controller::{
    Assignment, EnrollRequest, EnrollResponse, HeartbeatResponse, PollRequest, RefuseRequest,
    ResultReport, SignedReport,
};
use quorum_api::v1::worker_auth::{
    self, HEADER_NONCE, HEADER_SIGNATURE, HEADER_TIMESTAMP, HEADER_WORKER,
};
use reqwest::header::{CONTENT_TYPE, HeaderValue};

use crate::{ClientError, check, json, transport};

/// Bound for calls that should answer at once; the long poll gets its wait on top of this.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// A worker's client for one controller, signing every request as the enrolled worker.
#[derive(Clone)]
pub struct WorkerClient {
    http: reqwest::Client,
    base: String,
    worker_id: String,
    key: SigningKey,
}

impl std::fmt::Debug for WorkerClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerClient")
            .field("base", &self.base)
            .field("worker_id", &self.worker_id)
            .finish()
    }
}

impl WorkerClient {
    pub fn new(base: &str, worker_id: &str, key: SigningKey) -> WorkerClient {
        WorkerClient {
            http: crate::http_client(),
            base: base.trim_end_matches('/').to_string(),
            worker_id: worker_id.to_string(),
            key,
        }
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    pub fn worker_id(&self) -> &str {
        &self.worker_id
    }

    /// Registers a worker with the controller at `base`, spending a single-use enrollment token.
    /// Unsigned: the controller learns the worker's key from this call.
    pub async fn enroll(base: &str, req: &EnrollRequest) -> Result<EnrollResponse, ClientError> {
        let url = format!("{}/api/v1/workers/enroll", base.trim_end_matches('/'));
        let resp = crate::http_client()
            .post(&url)
            .timeout(CALL_TIMEOUT)
            .json(req)
            .send()
            .await
            .map_err(transport(&url))?;
        json(&url, resp).await
    }

    /// Long poll: `Some` as soon as the controller offers an assignment, `None` after
    /// `req.wait_ms` without one.
    pub async fn poll(&self, req: &PollRequest) -> Result<Option<Assignment>, ClientError> {
        let timeout = Duration::from_millis(req.wait_ms) + CALL_TIMEOUT;
        let (url, resp) = self
            .send("/api/v1/workers/poll", to_json(req), timeout)
            .await?;
        if resp.status() == reqwest::StatusCode::NO_CONTENT {
            return Ok(None);
        }
        json(&url, resp).await.map(Some)
    }

    /// Declines an assignment, saying why; the controller gives the job to another worker.
    /// `busy` says the worker cannot take it now (full, stopping) rather than objecting to it.
    pub async fn refuse(
        &self,
        assignment: &str,
        reason: &str,
        busy: bool,
    ) -> Result<(), ClientError> {
        let body = to_json(&RefuseRequest {
            reason: reason.to_string(),
            busy,
        });
        let path = format!("/api/v1/assignments/{}/refuse", segment(assignment));
        let (url, resp) = self.send(&path, body, CALL_TIMEOUT).await?;
        check(&url, resp).await.map(drop)
    }

    /// Renews the assignment's lease; `stop` in the answer means the build must be ended.
    pub async fn heartbeat(&self, assignment: &str) -> Result<HeartbeatResponse, ClientError> {
        let path = format!("/api/v1/assignments/{}/heartbeat", segment(assignment));
        let (url, resp) = self.send(&path, Vec::new(), CALL_TIMEOUT).await?;
        json(&url, resp).await
    }

    /// Appends raw log bytes that start at byte `offset` of the assignment's log.
    pub async fn log(
        &self,
        assignment: &str,
        offset: u64,
        bytes: Vec<u8>,
    ) -> Result<(), ClientError> {
        let path = format!(
            "/api/v1/assignments/{}/log?offset={offset}",
            segment(assignment)
        );
        let (url, resp) = self.send(&path, bytes, CALL_TIMEOUT).await?;
        check(&url, resp).await.map(drop)
    }

    /// Delivers the signed result of an assignment.
    pub async fn result(&self, assignment: &str, report: &SignedReport) -> Result<(), ClientError> {
        let path = format!("/api/v1/assignments/{}/result", segment(assignment));
        let (url, resp) = self.send(&path, to_json(report), CALL_TIMEOUT).await?;
        check(&url, resp).await.map(drop)
    }

    /// Delivers the result like [`WorkerClient::result`] and takes the worker's next waiting
    /// offer in the same request, if one is waiting: for a worker that has a slot free again.
    pub async fn result_and_take(
        &self,
        assignment: &str,
        report: &SignedReport,
    ) -> Result<Option<Assignment>, ClientError> {
        let path = format!("/api/v1/assignments/{}/result?take=1", segment(assignment));
        let (url, resp) = self.send(&path, to_json(report), CALL_TIMEOUT).await?;
        if resp.status() == reqwest::StatusCode::NO_CONTENT {
            return Ok(None);
        }
        json(&url, resp).await.map(Some)
    }

    /// Serializes `report` once and signs exactly those bytes with the worker's key.
    pub fn sign_report(&self, report: &ResultReport) -> SignedReport {
        let json = serde_json::to_string(report).expect("a result report always serializes");
        let signature = B64.encode(
            self.key
                .sign(&worker_auth::report_message(json.as_bytes()))
                .to_bytes(),
        );
        SignedReport {
            report: json,
            signature,
        }
    }

    /// POSTs `body` to `path_and_query` with the worker's signature headers.
    async fn send(
        &self,
        path_and_query: &str,
        body: Vec<u8>,
        timeout: Duration,
    ) -> Result<(String, reqwest::Response), ClientError> {
        let url = format!("{}{path_and_query}", self.base);
        let mut req = self
            .http
            .post(&url)
            .timeout(timeout)
            .header(CONTENT_TYPE, content_type(path_and_query))
            .body(body)
            .build()
            .map_err(transport(&url))?;
        let signed_path = match req.url().query() {
            Some(q) => format!("{}?{q}", req.url().path()),
            None => req.url().path().to_string(),
        };
        let body = req.body().and_then(|b| b.as_bytes()).unwrap_or_default();
        let timestamp = unix_now();
        // Fresh for every request, a retry included: the controller takes each nonce once.
        let nonce = format!("{:032x}", rand::random::<u128>());
        let message = worker_auth::message("POST", &signed_path, timestamp, &nonce, body);
        let signature = B64.encode(self.key.sign(&message).to_bytes());
        let headers = req.headers_mut();
        headers.insert(HEADER_WORKER, header(&self.worker_id, &url)?);
        headers.insert(HEADER_TIMESTAMP, HeaderValue::from(timestamp));
        headers.insert(HEADER_NONCE, header(&nonce, &url)?);
        headers.insert(HEADER_SIGNATURE, header(&signature, &url)?);
        let resp = self.http.execute(req).await.map_err(transport(&url))?;
        Ok((url, resp))
    }
}

fn to_json<T: serde::Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("wire types always serialize")
}

fn content_type(path: &str) -> HeaderValue {
    HeaderValue::from_static(if path.contains("/log?") {
        "application/octet-stream"
    } else {
        "application/json"
    })
}

fn header(value: &str, url: &str) -> Result<HeaderValue, ClientError> {
    HeaderValue::from_str(value).map_err(|_| ClientError::Body {
        url: url.to_string(),
        message: format!("`{value}` cannot be sent as a header value"),
    })
}

/// Percent-encodes an id for use as one path segment, so an id from the controller can never
/// add segments or a query of its own.
fn segment(id: &str) -> String {
    let mut out = String::with_capacity(id.len());
    for b in id.bytes() {
        if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs() as i64
}

#[cfg(test)]
mod tests {
    use super::segment;

    #[test]
    fn ids_stay_one_segment() {
        assert_eq!(segment("a-1_B"), "a-1_B");
        assert_eq!(segment("../x?y=1"), "%2E%2E%2Fx%3Fy%3D1");
    }
}
