//! Streams a job's log to its controller: batches whatever arrived at most every 200 ms, tracks
//! the byte offset the controller has accepted, and resends from there after a failure. The
//! queue is always drained into a bounded buffer, so a slow or absent controller costs log bytes,
//! never a stalled build.
//!
//! Every token and key the worker holds for the job is redacted before it leaves (the
//! controller redacts again, as it does not trust the worker). A secret may straddle two chunks
//! of output, so the bytes that could start one are held back until the next chunk decides them;
//! the offsets the controller sees count the redacted stream.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use quorum_client::ClientError;
use quorum_client::controller::WorkerClient;
use quorum_core::redact::Redactor;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::agent::Worker;
use crate::retry::Backoff;

const FLUSH_EVERY: Duration = Duration::from_millis(200);
const MAX_BATCH: usize = 1024 * 1024;
/// Unsent log kept in memory; beyond this new output is dropped, with a note in the log.
const MAX_PENDING: usize = 16 * 1024 * 1024;
/// How long to keep trying to deliver the rest once the job's output has ended; shorter when
/// the worker is shutting down, so stopping stays quick.
const FINAL_FLUSH: Duration = Duration::from_secs(30);
const FINAL_FLUSH_AT_SHUTDOWN: Duration = Duration::from_secs(5);

const DROPPED_NOTE: &[u8] =
    b"\n[quorum: log output dropped: the controller is not accepting the log]\n";

type LogCall = Pin<Box<dyn Future<Output = Result<(), ClientError>> + Send>>;

/// Finds what this worker holds for assignment `a`: its job and upload tokens and its own
/// signing key (in the encodings a key is usually printed in).
pub(crate) fn redactor(w: &Worker, a: &quorum_api::v1::controller::Assignment) -> Redactor {
    use base64::Engine as _;
    use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
    let key = w.key.to_bytes();
    let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
    Redactor::new(
        [
            a.job_token.clone(),
            a.upload_token.clone(),
            STANDARD.encode(key),
            URL_SAFE_NO_PAD.encode(key),
            hex,
        ],
        false,
    )
}

/// Ships everything received on `rx` to the log of `assignment`, with what `secrets` finds
/// redacted, returning once `rx` is closed and the rest is delivered (or [`FINAL_FLUSH`] has
/// passed). Returns the bytes the controller took.
pub(crate) async fn ship(
    client: Arc<WorkerClient>,
    assignment: String,
    secrets: Redactor,
    rx: mpsc::Receiver<Vec<u8>>,
    shutdown: CancellationToken,
) -> u64 {
    ship_every(client, assignment, secrets, rx, shutdown, FLUSH_EVERY).await
}

/// [`ship`], sending what is pending every `flush_every` while output goes on, and at once when
/// it has ended: the job's result is reported only after its log is delivered.
async fn ship_every(
    client: Arc<WorkerClient>,
    assignment: String,
    secrets: Redactor,
    mut rx: mpsc::Receiver<Vec<u8>>,
    shutdown: CancellationToken,
    flush_every: Duration,
) -> u64 {
    let mut offset = 0u64;
    // Redacted, ready to send.
    let mut pending: Vec<u8> = Vec::new();
    // Not yet redacted: output that may be the start of a secret.
    let mut held: Vec<u8> = Vec::new();
    let mut dropping = false;
    let mut closed_at: Option<Instant> = None;
    let mut inflight: Option<(usize, LogCall)> = None;
    let mut retry_at = Instant::now();
    let mut backoff = Backoff::new(flush_every, Duration::from_secs(5));
    let mut tick = tokio::time::interval(flush_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        if inflight.is_none() {
            if closed_at.is_some() && pending.is_empty() {
                break;
            }
            let budget = if shutdown.is_cancelled() {
                FINAL_FLUSH_AT_SHUTDOWN
            } else {
                FINAL_FLUSH
            };
            if closed_at.is_some_and(|t| t.elapsed() > budget) {
                tracing::warn!(
                    undelivered = pending.len(),
                    "giving up on delivering the rest of the log"
                );
                break;
            }
        }
        tokio::select! {
            chunk = rx.recv(), if closed_at.is_none() => match chunk {
                Some(chunk) if pending.len() + held.len() + chunk.len() <= MAX_PENDING => {
                    dropping = false;
                    held.extend_from_slice(&chunk);
                    let (redacted, decided) = secrets.redact(&held, false);
                    pending.extend_from_slice(&redacted);
                    held.drain(..decided);
                }
                Some(_) => {
                    if !dropping {
                        dropping = true;
                        // What was held cannot be continued by the dropped output.
                        pending.extend_from_slice(&secrets.redact_all(&held));
                        held.clear();
                        pending.extend_from_slice(DROPPED_NOTE);
                    }
                }
                None => {
                    pending.extend_from_slice(&secrets.redact_all(&held));
                    held.clear();
                    closed_at = Some(Instant::now());
                }
            },
            sent = async { inflight.as_mut().expect("guarded by the branch condition").1.as_mut().await },
                if inflight.is_some() =>
            {
                let (n, _) = inflight.take().expect("guarded by the branch condition");
                match sent {
                    Ok(()) => {
                        pending.drain(..n);
                        offset += n as u64;
                        backoff.reset();
                    }
                    Err(e) => {
                        let delay = backoff.next_delay();
                        tracing::warn!(error = %e, retry_in = ?delay, "cannot send the log");
                        retry_at = Instant::now() + delay;
                    }
                }
            }
            _ = async {
                if closed_at.is_some() {
                    // The output has ended: the rest goes now (or when a retry is due), not at
                    // the next tick, since the job's report waits for it.
                    tokio::time::sleep_until(retry_at).await
                } else {
                    tick.tick().await;
                }
            }, if inflight.is_none() && !pending.is_empty() => {
                if Instant::now() >= retry_at {
                    let n = pending.len().min(MAX_BATCH);
                    let body = pending[..n].to_vec();
                    let (client, id, at) = (client.clone(), assignment.clone(), offset);
                    inflight = Some((n, Box::pin(async move { client.log(&id, at, body).await })));
                }
            }
        }
    }
    offset
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use axum::body::Bytes;
    use axum::extract::{Query, State};

    use super::*;

    type Received = Arc<Mutex<Vec<(u64, Vec<u8>)>>>;

    #[derive(serde::Deserialize)]
    struct At {
        offset: u64,
    }

    /// A controller that keeps every log chunk with its offset.
    async fn controller() -> (String, Received) {
        let received = Received::default();
        let router = axum::Router::new()
            .fallback(
                |State(r): State<Received>, Query(at): Query<At>, body: Bytes| async move {
                    r.lock().unwrap().push((at.offset, body.to_vec()));
                },
            )
            .with_state(received.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
        (format!("http://{addr}/"), received)
    }

    /// Output that arrives between flushes and is the job's last goes out as soon as the
    /// output ends, not at the next flush (here an hour away).
    #[tokio::test]
    async fn the_last_output_is_sent_when_the_output_ends() {
        let (url, received) = controller().await;
        let key = ed25519_dalek::SigningKey::from_bytes(&[1; 32]);
        let client = Arc::new(WorkerClient::new(&url, "w1", key));
        let (tx, rx) = mpsc::channel(8);
        let shipper = tokio::spawn(ship_every(
            client,
            "as-1".into(),
            Redactor::new(Vec::<String>::new(), false),
            rx,
            CancellationToken::new(),
            Duration::from_secs(3600),
        ));
        // An interval's first tick is immediate: the first line goes out at once.
        tx.send(b"first\n".to_vec()).await.unwrap();
        let until = std::time::Instant::now() + Duration::from_secs(10);
        while received.lock().unwrap().is_empty() {
            assert!(
                std::time::Instant::now() < until,
                "the first line never arrived"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tx.send(b"last\n".to_vec()).await.unwrap();
        drop(tx);
        let sent = tokio::time::timeout(Duration::from_secs(10), shipper)
            .await
            .expect("the rest went out when the output ended, without waiting for a flush")
            .unwrap();
        assert_eq!(sent, 11);
        let log: Vec<u8> = received
            .lock()
            .unwrap()
            .iter()
            .flat_map(|(_, chunk)| chunk.clone())
            .collect();
        assert_eq!(log, b"first\nlast\n");
    }

    #[tokio::test]
    async fn a_token_split_between_shipped_chunks_leaves_redacted() {
        let (url, received) = controller().await;
        let key = ed25519_dalek::SigningKey::from_bytes(&[1; 32]);
        let client = Arc::new(WorkerClient::new(&url, "w1", key));
        let secret = "upload-token-0123456789";
        let (tx, rx) = mpsc::channel(8);
        let shipper = tokio::spawn(ship(
            client,
            "as-1".into(),
            Redactor::new([secret], false),
            rx,
            CancellationToken::new(),
        ));
        tx.send(b"curl -H 'Bearer upload-tok".to_vec())
            .await
            .unwrap();
        // Long enough for a flush: the first part goes out alone, without the held start.
        tokio::time::sleep(FLUSH_EVERY * 3).await;
        tx.send(b"en-0123456789' store\nend upload-".to_vec())
            .await
            .unwrap();
        drop(tx);
        let sent = tokio::time::timeout(Duration::from_secs(10), shipper)
            .await
            .unwrap()
            .unwrap();

        let chunks = received.lock().unwrap().clone();
        assert!(chunks.len() >= 2, "shipped in several requests: {chunks:?}");
        let mut log = Vec::new();
        for (offset, body) in &chunks {
            assert_eq!(
                *offset,
                log.len() as u64,
                "offsets count the redacted stream"
            );
            log.extend_from_slice(body);
        }
        assert_eq!(sent, log.len() as u64);
        assert_eq!(
            String::from_utf8(log).unwrap(),
            "curl -H 'Bearer [redacted]' store\nend [redacted]"
        );
        assert_eq!(chunks[0].1, b"curl -H 'Bearer ");
    }
}
