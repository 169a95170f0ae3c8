//! What the controller's background tasks (the revoker, the statement publisher, the dispute
//! explainer) share: a pass run at a fixed interval until shutdown, and the backoff for the
//! rows a pass could not finish.

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// The longest wait between two attempts at one row (a statement to push, a report to make).
const MAX_BACKOFF_SECS: i64 = 300;

/// Runs `pass` now and then `every` after each one ends, until `shutdown`; a failed pass is
/// logged with `failed` and the next one tries again. Stopping drops a pass midway (a store
/// request in flight): every pass starts from the database, so the next start does what it
/// had not marked done.
pub async fn every<F, Fut>(shutdown: &CancellationToken, every: Duration, failed: &str, mut pass: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            r = pass() => if let Err(e) = r {
                tracing::warn!(error = %format!("{e:#}"), "{failed}");
            },
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

/// Seconds to wait after `attempts` failures: 1 s after the first, doubling up to
/// [`MAX_BACKOFF_SECS`].
pub fn backoff_secs(attempts: i64) -> i64 {
    1i64.checked_shl(attempts.clamp(0, 16) as u32)
        .unwrap_or(MAX_BACKOFF_SECS)
        .min(MAX_BACKOFF_SECS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_is_capped() {
        let delays: Vec<i64> = (0..12).map(backoff_secs).collect();
        assert_eq!(&delays[..4], &[1, 2, 4, 8]);
        assert_eq!(delays[11], MAX_BACKOFF_SECS);
        assert_eq!(backoff_secs(i64::MAX), MAX_BACKOFF_SECS);
    }
}
