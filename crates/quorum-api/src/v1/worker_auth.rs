//! How a worker authenticates its requests to a controller: every request carries the worker's
//! id, a timestamp, a nonce and an Ed25519 signature over the method, path, timestamp, nonce
//! and body digest. The controller knows the public key from enrollment; the worker never holds
//! a shared secret. The controller accepts a nonce once per worker while the timestamp is
//! within [`MAX_SKEW_SECS`], so a captured request cannot be sent again (a replayed poll would
//! otherwise take the worker's next offer, tokens and all).

pub const HEADER_WORKER: &str = "x-quorum-worker";
pub const HEADER_TIMESTAMP: &str = "x-quorum-timestamp";
pub const HEADER_NONCE: &str = "x-quorum-nonce";
pub const HEADER_SIGNATURE: &str = "x-quorum-signature";

/// Requests older or newer than this, in seconds, are refused.
pub const MAX_SKEW_SECS: i64 = 60;

/// Whether `nonce` has the form a worker sends: 32 lowercase hexadecimal digits (128 random
/// bits).
pub fn is_nonce(nonce: &str) -> bool {
    nonce.len() == 32
        && nonce
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// The bytes a worker signs for one request.
pub fn message(
    method: &str,
    path_and_query: &str,
    timestamp: i64,
    nonce: &str,
    body: &[u8],
) -> Vec<u8> {
    let body_digest = quorum_core::Digest::of(body);
    format!(
        "quorum-worker-request-v2\n{method}\n{path_and_query}\n{timestamp}\n{nonce}\n{body_digest}"
    )
    .into_bytes()
}

/// The bytes a worker signs for a result report: the report JSON behind a context string, so a
/// report signature can never be replayed as a request signature or the reverse.
pub fn report_message(report_json: &[u8]) -> Vec<u8> {
    let mut m = b"quorum-result-report-v1\n".to_vec();
    m.extend_from_slice(report_json);
    m
}
