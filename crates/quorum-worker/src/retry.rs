//! Bounded retries for calls to a controller or store that may be restarting.

use std::future::Future;
use std::time::Duration;

use quorum_client::ClientError;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Exponential backoff between two bounds.
#[derive(Debug)]
pub(crate) struct Backoff {
    first: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub(crate) fn new(first: Duration, max: Duration) -> Backoff {
        Backoff {
            first,
            max,
            next: first,
        }
    }

    /// The delay before the next attempt; each call doubles the one after.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        d
    }

    pub(crate) fn reset(&mut self) {
        self.next = self.first;
    }
}

/// Errors worth another attempt: the peer could not be reached or failed on its side. A refusal
/// (4xx) will not change by asking again.
pub(crate) fn retryable(e: &ClientError) -> bool {
    match e {
        ClientError::Transport { .. } => true,
        ClientError::Status { status, .. } => *status >= 500 || *status == 429,
        ClientError::Body { .. } => false,
    }
}

/// Calls `call` until it succeeds, fails for good, `budget` is spent, or `cancel` fires.
pub(crate) async fn with_retry<T, Fut>(
    what: &str,
    budget: Duration,
    cancel: &CancellationToken,
    mut call: impl FnMut() -> Fut,
) -> Result<T, ClientError>
where
    Fut: Future<Output = Result<T, ClientError>>,
{
    let deadline = Instant::now() + budget;
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(10));
    loop {
        let err = match call().await {
            Ok(v) => return Ok(v),
            Err(e) => e,
        };
        let delay = backoff.next_delay();
        if !retryable(&err) || Instant::now() + delay > deadline || cancel.is_cancelled() {
            return Err(err);
        }
        tracing::warn!(error = %err, retry_in = ?delay, "cannot {what}; retrying");
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = cancel.cancelled() => return Err(err),
        }
    }
}
