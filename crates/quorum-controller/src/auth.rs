//! Authenticating callers: workers by the Ed25519 signature on every request (key from
//! enrollment), users by the controller's API token.

use axum::http::{HeaderMap, Method, Uri};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use ed25519_dalek::{Signature, Verifier as _, VerifyingKey};
use quorum_api::v1::worker_auth::{
    HEADER_NONCE, HEADER_SIGNATURE, HEADER_TIMESTAMP, HEADER_WORKER, MAX_SKEW_SECS, is_nonce,
    message,
};
use quorum_service::ApiError;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use crate::State;
use crate::commits::{Arg, Kind, Write};
use crate::db::{self, WorkerRow};

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Result<&'a str, ApiError> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| ApiError::unauthorized(format!("missing header {name}")))
}

/// A worker's request whose signature checked out: who sent it, its key, and the body it
/// signed. Extracting it reads the body (within the router's body limit) and runs [`worker`].
pub struct SignedWorker {
    pub worker: WorkerRow,
    pub key: VerifyingKey,
    pub body: axum::body::Bytes,
}

impl axum::extract::FromRequest<std::sync::Arc<State>> for SignedWorker {
    type Rejection = ApiError;

    async fn from_request(
        req: axum::extract::Request,
        state: &std::sync::Arc<State>,
    ) -> Result<Self, ApiError> {
        let (parts, body) = req.into_parts();
        let body = axum::body::Bytes::from_request(
            axum::extract::Request::from_parts(parts.clone(), body),
            state,
        )
        .await
        .map_err(|e| ApiError::new(e.status(), e.body_text()))?;
        let (worker, key) = worker(state, &parts.method, &parts.uri, &parts.headers, &body).await?;
        Ok(SignedWorker { worker, key, body })
    }
}

/// Checks the worker's request signature and records that the worker was seen.
async fn worker(
    state: &State,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(WorkerRow, VerifyingKey), ApiError> {
    let id = header(headers, HEADER_WORKER)?;
    let ts: i64 = header(headers, HEADER_TIMESTAMP)?
        .parse()
        .map_err(|_| ApiError::unauthorized(format!("{HEADER_TIMESTAMP} is not a number")))?;
    let now = quorum_service::now_unix();
    if (now - ts).abs() > MAX_SKEW_SECS {
        return Err(ApiError::unauthorized(format!(
            "request timestamp is {} s away from the controller's clock; fix the worker's clock",
            now - ts
        )));
    }
    let nonce = header(headers, HEADER_NONCE)?;
    if !is_nonce(nonce) {
        return Err(ApiError::unauthorized(format!(
            "{HEADER_NONCE} is not 32 lowercase hexadecimal digits"
        )));
    }
    let sig = B64
        .decode(header(headers, HEADER_SIGNATURE)?)
        .ok()
        .and_then(|b| Signature::from_slice(&b).ok())
        .ok_or_else(|| {
            ApiError::unauthorized("request signature is not a base64 Ed25519 signature")
        })?;
    let unknown = || ApiError::unauthorized("unknown worker or bad signature");
    let known = state
        .workers
        .get(&state.pool, id)
        .await?
        .ok_or_else(unknown)?;
    let key = known.key;
    let path = uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or(uri.path());
    key.verify(&message(method.as_str(), path, ts, nonce, body), &sig)
        .map_err(|_| unknown())?;
    // Only after the signature: nobody without the worker's key can spend its nonces.
    if !state.nonces.take(id, nonce, now) {
        return Err(ApiError::unauthorized(
            "this request was already received (a replay, or a retry that kept its nonce)",
        ));
    }
    let last_seen = known.last_seen.load(Ordering::Relaxed);
    let was_offline = last_seen < now - state.lease_secs as i64;
    // Seconds are the resolution of `last_seen`: a busy worker's many requests in one second
    // need one write, not one each.
    if last_seen < now {
        state.commits.execute(seen_at(id, now)).await?;
        known.last_seen.fetch_max(now, Ordering::Relaxed);
    }
    if was_offline {
        // A worker coming (back) online may be what a waiting job needs.
        state.wake.all();
    }
    let mut row = known.row.clone();
    row.last_seen = known.last_seen.load(Ordering::Relaxed);
    Ok((row, key))
}

/// How long a nonce is remembered, at least: a request is accepted while its timestamp is
/// within [`MAX_SKEW_SECS`] of the controller's clock, so up to twice that after it arrives
/// (a worker's clock ahead by the whole window).
const NONCE_SECS: i64 = 2 * MAX_SKEW_SECS;

/// The nonces of the workers' requests accepted lately, in two generations of [`NONCE_SECS`]
/// each: one is remembered from [`NONCE_SECS`] to twice that, after which its request's
/// timestamp is refused anyway. An entry is the nonce and a hash of the worker's id, about 40
/// bytes: a thousand requests a second hold under 10 MB.
#[derive(Default)]
pub(crate) struct Nonces {
    inner: std::sync::Mutex<NonceGenerations>,
}

#[derive(Default)]
struct NonceGenerations {
    /// The generation `current` holds: `now / NONCE_SECS` when it began.
    slot: i64,
    current: std::collections::HashSet<(u64, u128)>,
    previous: std::collections::HashSet<(u64, u128)>,
}

impl Nonces {
    /// Takes `worker`'s `nonce` (already checked with [`is_nonce`]) at `now`: false if it was
    /// taken before, within the time a request carrying it could still be accepted.
    pub(crate) fn take(&self, worker: &str, nonce: &str, now: i64) -> bool {
        let Ok(nonce) = u128::from_str_radix(nonce, 16) else {
            return false;
        };
        let slot = now.div_euclid(NONCE_SECS);
        let mut g = self.inner.lock().expect("nonces");
        if slot != g.slot {
            g.previous = if slot == g.slot + 1 {
                std::mem::take(&mut g.current)
            } else {
                std::collections::HashSet::new()
            };
            g.current.clear();
            g.slot = slot;
        }
        let key = (
            std::hash::BuildHasher::hash_one(
                &std::hash::BuildHasherDefault::<std::hash::DefaultHasher>::default(),
                worker,
            ),
            nonce,
        );
        if g.previous.contains(&key) {
            return false;
        }
        g.current.insert(key)
    }
}

/// Moving a worker's `last_seen` forward.
const SEEN: Kind = Kind {
    table: "workers",
    set: "last_seen = v.column2",
    filter: "workers.last_seen < v.column2",
};

/// The write that notes worker `id` seen at `now`, grouped with the dispatch path's writes.
pub(crate) fn seen_at(id: &str, now: i64) -> Write {
    Write {
        kind: &SEEN,
        id: id.to_string(),
        args: vec![Arg::Int(now)],
    }
}

/// An enrolled worker as its row says, with its key parsed (a curve point decompressed).
pub(crate) struct Known {
    row: WorkerRow,
    key: VerifyingKey,
    /// The latest `last_seen` this process read or wrote for the worker.
    last_seen: AtomicI64,
}

/// The enrolled workers this controller has authenticated, by id, so that a worker's request
/// costs no read of its row. Sound because a worker's row never changes after enrollment but
/// for `last_seen` (no route edits or removes a worker; a re-enrollment must present the same
/// key): whatever would change one must also drop it here. Unknown ids are never remembered,
/// so guessing names cannot fill it; emptied when full.
#[derive(Default)]
pub(crate) struct Workers {
    known: std::sync::Mutex<std::collections::HashMap<String, Arc<Known>>>,
}

/// Most workers [`Workers`] holds: a few MiB, more than the idle-worker benchmark's 10,000.
const WORKERS_MAX: usize = 65_536;

impl Workers {
    async fn get(&self, pool: &db::Pool, id: &str) -> Result<Option<Arc<Known>>, ApiError> {
        if let Some(known) = self.known.lock().expect("known workers").get(id) {
            return Ok(Some(known.clone()));
        }
        let Some(row) = db::worker(pool, id).await? else {
            return Ok(None);
        };
        let Some(key) = public_key(&row.public_key) else {
            return Ok(None);
        };
        let known = Arc::new(Known {
            last_seen: AtomicI64::new(row.last_seen),
            row,
            key,
        });
        let mut all = self.known.lock().expect("known workers");
        if all.len() >= WORKERS_MAX {
            all.clear();
        }
        all.insert(id.to_string(), known.clone());
        Ok(Some(known))
    }

    /// Notes a `last_seen` written for the worker outside [`worker`] (a long poll's beat).
    pub fn seen(&self, id: &str, now: i64) {
        if let Some(known) = self.known.lock().expect("known workers").get(id) {
            known.last_seen.fetch_max(now, Ordering::Relaxed);
        }
    }
}

pub fn public_key(b64: &str) -> Option<VerifyingKey> {
    let bytes: [u8; 32] = B64.decode(b64).ok()?.try_into().ok()?;
    VerifyingKey::from_bytes(&bytes).ok()
}

/// Checks the user API's bearer token in constant time.
pub fn user(state: &State, headers: &HeaderMap) -> Result<(), ApiError> {
    let given = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| {
            ApiError::unauthorized("missing bearer token; pass the controller's API token")
        })?;
    let a = quorum_core::Digest::of(given.as_bytes());
    let b = quorum_core::Digest::of(state.api_token.as_bytes());
    let diff = a
        .as_bytes()
        .iter()
        .zip(b.as_bytes())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y));
    if diff != 0 {
        return Err(ApiError::unauthorized("wrong API token"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A nonce is taken once per worker for as long as a request carrying it could be
    /// accepted (its timestamp at most [`MAX_SKEW_SECS`] off either way), and then forgotten.
    #[test]
    fn a_nonce_is_taken_once_per_worker_while_its_request_could_be_accepted() {
        let nonces = Nonces::default();
        let n = "00000000000000000000000000000001";
        let t = 10 * NONCE_SECS - 1; // the last second of a generation
        assert!(nonces.take("w1", n, t));
        assert!(!nonces.take("w1", n, t), "the same second");
        assert!(nonces.take("w2", n, t), "another worker's nonce space");
        assert!(!nonces.take("w1", n, t + NONCE_SECS), "a window later");
        // A fresh nonce between: generations turn over without losing the old one.
        assert!(nonces.take("w1", "00000000000000000000000000000002", t + 1));
        assert!(!nonces.take("w1", n, t + NONCE_SECS));
        // Forgotten once a request carrying it is refused by its timestamp anyway.
        assert!(nonces.take("w1", n, t + 2 * NONCE_SECS + 1));
        // Not hexadecimal: never taken.
        assert!(!nonces.take("w1", "zz000000000000000000000000000000", t));
    }
}
