//! Streams a job's log to its controller: batches whatever arrived at most every 200 ms, tracks
//! the byte offset the controller has accepted, and resends from there after a failure. The
//! queue is always drained into a bounded buffer, so a slow or absent controller costs log bytes,
//! never a stalled build.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use quorum_client::ClientError;
use quorum_client::controller::WorkerClient;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

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

/// Ships everything received on `rx` to the log of `assignment`, returning once `rx` is closed and
/// the rest is delivered (or [`FINAL_FLUSH`] has passed). Returns the bytes the controller took.
pub(crate) async fn ship(
    client: Arc<WorkerClient>,
    assignment: String,
    mut rx: mpsc::Receiver<Vec<u8>>,
    shutdown: CancellationToken,
) -> u64 {
    let mut offset = 0u64;
    let mut pending: Vec<u8> = Vec::new();
    let mut dropping = false;
    let mut closed_at: Option<Instant> = None;
    let mut inflight: Option<(usize, LogCall)> = None;
    let mut retry_at = Instant::now();
    let mut backoff = Backoff::new(FLUSH_EVERY, Duration::from_secs(5));
    let mut tick = tokio::time::interval(FLUSH_EVERY);
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
                Some(chunk) if pending.len() + chunk.len() <= MAX_PENDING => {
                    dropping = false;
                    pending.extend_from_slice(&chunk);
                }
                Some(_) => {
                    if !dropping {
                        dropping = true;
                        pending.extend_from_slice(DROPPED_NOTE);
                    }
                }
                None => closed_at = Some(Instant::now()),
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
            _ = tick.tick(), if inflight.is_none() && !pending.is_empty() => {
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
