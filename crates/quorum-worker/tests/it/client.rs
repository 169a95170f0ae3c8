//! `WorkerClient` signs what it sends: a small HTTP peer on 127.0.0.1:0 checks each request's
//! signature headers with the worker's public key, over the path and body it actually received.

use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use ed25519_dalek::{Signature, SigningKey, Verifier as _, VerifyingKey};
use quorum_api::v1::controller::{
    Assignment, EnvironmentFacts, PollRequest, ReportedResult, ResultReport, SignedReport, Usage,
};
use quorum_api::v1::worker_auth::{
    self, HEADER_NONCE, HEADER_SIGNATURE, HEADER_TIMESTAMP, HEADER_WORKER,
};
use quorum_client::controller::WorkerClient;

#[derive(Debug, Clone)]
struct Seen {
    worker: String,
    path_and_query: String,
    timestamp: i64,
    nonce: String,
    body: Vec<u8>,
    signature: Signature,
}

impl Seen {
    fn verifies_with(&self, key: &VerifyingKey) -> bool {
        let message = worker_auth::message(
            "POST",
            &self.path_and_query,
            self.timestamp,
            &self.nonce,
            &self.body,
        );
        key.verify(&message, &self.signature).is_ok()
    }
}

#[derive(Clone, Default)]
struct Peer {
    seen: Arc<Mutex<Vec<Seen>>>,
    /// Answer polls with this assignment; none means 204.
    offer: Arc<Mutex<Option<Assignment>>>,
}

async fn handle(
    State(peer): State<Peer>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    let Ok(signature) = B64
        .decode(header(HEADER_SIGNATURE))
        .map_err(drop)
        .and_then(|b| Signature::from_slice(&b).map_err(drop))
    else {
        return (StatusCode::UNAUTHORIZED, "no signature").into_response();
    };
    assert_eq!(method, Method::POST);
    let path_and_query = uri.path_and_query().unwrap().as_str().to_string();
    peer.seen.lock().unwrap().push(Seen {
        worker: header(HEADER_WORKER),
        path_and_query: path_and_query.clone(),
        timestamp: header(HEADER_TIMESTAMP).parse().unwrap_or(0),
        nonce: header(HEADER_NONCE),
        body: body.to_vec(),
        signature,
    });
    if path_and_query == "/api/v1/workers/poll" {
        return match peer.offer.lock().unwrap().clone() {
            Some(a) => axum::Json(a).into_response(),
            None => StatusCode::NO_CONTENT.into_response(),
        };
    }
    if path_and_query.ends_with("/heartbeat") {
        return axum::Json(serde_json::json!({ "stop": true })).into_response();
    }
    StatusCode::OK.into_response()
}

async fn start() -> (String, Peer) {
    let peer = Peer::default();
    let router = axum::Router::new()
        .fallback(handle)
        .with_state(peer.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    (format!("http://{addr}/"), peer)
}

fn assignment() -> Assignment {
    Assignment {
        id: "as-1".into(),
        build_id: "b-1".into(),
        job: "build".into(),
        tenant: "t".into(),
        repository: "https://example.invalid/r.git".into(),
        commit: "0".repeat(40),
        source_date_epoch: 1,
        script: vec!["make".into()],
        artifacts: vec!["out/*".into()],
        timeout_secs: 60,
        inputs: Vec::new(),
        job_token: "j".into(),
        upload_token: "u".into(),
        store_url: "http://store.invalid".into(),
        lease_secs: 30,
    }
}

#[tokio::test]
async fn every_request_is_signed_over_what_was_sent() {
    let (base, peer) = start().await;
    let key = SigningKey::from_bytes(&[7; 32]);
    let client = WorkerClient::new(&base, "w-42", key.clone());
    let t = tokio::time::Duration::from_secs(30);

    tokio::time::timeout(t, client.log("as-1", 5, b"hello log".to_vec()))
        .await
        .unwrap()
        .unwrap();
    assert!(
        tokio::time::timeout(t, client.heartbeat("as/1"))
            .await
            .unwrap()
            .unwrap()
            .stop
    );
    let poll = PollRequest {
        wait_ms: 10,
        capacity: 2,
    };
    assert_eq!(
        tokio::time::timeout(t, client.poll(&poll))
            .await
            .unwrap()
            .unwrap(),
        None
    );
    *peer.offer.lock().unwrap() = Some(assignment());
    assert_eq!(
        tokio::time::timeout(t, client.poll(&poll))
            .await
            .unwrap()
            .unwrap(),
        Some(assignment())
    );

    let seen = peer.seen.lock().unwrap().clone();
    let paths: Vec<&str> = seen.iter().map(|s| s.path_and_query.as_str()).collect();
    assert_eq!(
        paths,
        [
            "/api/v1/assignments/as-1/log?offset=5",
            // An id can never add path segments.
            "/api/v1/assignments/as%2F1/heartbeat",
            "/api/v1/workers/poll",
            "/api/v1/workers/poll",
        ]
    );
    assert_eq!(seen[0].body, b"hello log");
    assert_eq!(
        serde_json::from_slice::<PollRequest>(&seen[2].body).unwrap(),
        poll
    );
    let now = quorum_service::now_unix();
    let public = key.verifying_key();
    for s in &seen {
        assert_eq!(s.worker, "w-42");
        assert!(
            (s.timestamp - now).abs() <= 5,
            "timestamp {} vs now {now}",
            s.timestamp
        );
        assert!(
            s.verifies_with(&public),
            "signature of {} does not verify",
            s.path_and_query
        );
    }

    // The check above can fail: another key, another body or another offset do not verify.
    assert!(!seen[0].verifies_with(&SigningKey::from_bytes(&[8; 32]).verifying_key()));
    assert!(
        !Seen {
            body: b"hello LOG".to_vec(),
            ..seen[0].clone()
        }
        .verifies_with(&public)
    );
    let other_offset = Seen {
        path_and_query: "/api/v1/assignments/as-1/log?offset=0".into(),
        ..seen[0].clone()
    };
    assert!(!other_offset.verifies_with(&public));
    // Every request has a nonce of its own, also two polls with the same body; the signature
    // covers it.
    let nonces: std::collections::HashSet<&str> = seen.iter().map(|s| s.nonce.as_str()).collect();
    assert_eq!(nonces.len(), seen.len(), "{nonces:?}");
    assert!(
        nonces.iter().all(|n| worker_auth::is_nonce(n)),
        "{nonces:?}"
    );
    let other_nonce = Seen {
        nonce: seen[1].nonce.clone(),
        ..seen[0].clone()
    };
    assert!(!other_nonce.verifies_with(&public));
}

#[tokio::test]
async fn result_reports_carry_a_signature_over_the_exact_json() {
    let (base, peer) = start().await;
    let key = SigningKey::from_bytes(&[9; 32]);
    let client = WorkerClient::new(&base, "w-1", key.clone());
    let report = ResultReport {
        assignment: "as-1".into(),
        build_id: "b-1".into(),
        job: "build".into(),
        worker: "w-1".into(),
        result: ReportedResult::Failed {
            reason: "step 1 (`make`) exited with status 2".into(),
        },
        usage: Usage {
            wall_ms: 10,
            cpu_ms: 5,
            peak_rss_kib: 1000,
            bytes_uploaded: 0,
        },
        environment: EnvironmentFacts::default(),
    };
    let signed = client.sign_report(&report);
    tokio::time::timeout(
        std::time::Duration::from_secs(30),
        client.result("as-1", &signed),
    )
    .await
    .unwrap()
    .unwrap();

    let seen = peer.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].path_and_query, "/api/v1/assignments/as-1/result");
    assert!(seen[0].verifies_with(&key.verifying_key()));
    let received: SignedReport = serde_json::from_slice(&seen[0].body).unwrap();
    assert_eq!(
        serde_json::from_str::<ResultReport>(&received.report).unwrap(),
        report
    );
    let sig = Signature::from_slice(&B64.decode(&received.signature).unwrap()).unwrap();
    let public = key.verifying_key();
    assert!(
        public
            .verify(
                &worker_auth::report_message(received.report.as_bytes()),
                &sig
            )
            .is_ok()
    );
    // A request signature is not a report signature: the context strings differ.
    assert!(public.verify(received.report.as_bytes(), &sig).is_err());
}
