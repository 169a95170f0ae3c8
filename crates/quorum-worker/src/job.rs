//! One assignment from offer to report: verify the job token (or refuse), keep the lease alive,
//! fetch the source, run the steps, collect, upload and record the outputs, report the signed
//! result, and remove the job's directory.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use quorum_api::v1::controller::{Assignment, ReportedResult, ResultReport, Usage};
use quorum_client::controller::WorkerClient;
use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::agent::Worker;
use crate::artifacts;
use crate::executor::{self, JobSpec, JobStatus};
use crate::retry::with_retry;

/// Longest accepted job token lifetime: longer-lived tokens are refused as too dangerous.
const MAX_JOB_TOKEN_LIFETIME_SECS: i64 = 24 * 3600;
/// A result is worth waiting for a restarting controller.
const REPORT_BUDGET: Duration = Duration::from_secs(120);
const REFUSE_BUDGET: Duration = Duration::from_secs(30);
/// A git server that stalls must not hold a job slot for ever.
const FETCH_TIMEOUT: Duration = Duration::from_secs(15 * 60);
const PARALLEL_UPLOADS: usize = 4;
const LOG_QUEUE: usize = 256;

/// Runs an assignment, then each one the controller hands over with a report (the worker's
/// next waiting offer, taken as the slot frees up: no poll in between); `_slot` is the job
/// slot they occupy until the last ends.
pub(crate) async fn run(
    w: Arc<Worker>,
    client: Arc<WorkerClient>,
    a: Assignment,
    _slot: OwnedSemaphorePermit,
) {
    let mut next = Some(a);
    while let Some(a) = next.take() {
        let span = span(&a);
        next = run_one(&w, &client, a).instrument(span).await;
    }
}

/// The span a job's log lines are in.
pub(crate) fn span(a: &Assignment) -> tracing::Span {
    tracing::info_span!(
        "job",
        assignment = %a.id,
        build = %a.build_id,
        job = %a.job,
    )
}

/// Runs one accepted-or-refused assignment; returns the next one if the controller handed it
/// over with the report.
async fn run_one(w: &Arc<Worker>, client: &Arc<WorkerClient>, a: Assignment) -> Option<Assignment> {
    if let Err(reason) = accept(w, &a).await {
        refuse(w.clone(), client.clone(), a.id, &reason, false).await;
        return None;
    }
    let job_dir = w.config.data_dir.join("builds").join(&a.id);
    // Creating the directory claims the assignment: an offer repeated while it runs is ignored
    // rather than run twice in the same tree.
    if let Err(e) = tokio::fs::create_dir(&job_dir).await {
        tracing::warn!(error = %e, dir = %job_dir.display(), "cannot create the job directory; ignoring the offer");
        return None;
    }
    tracing::info!(repository = %a.repository, commit = %a.commit, "accepted assignment");
    let started = crate::ledger::now();
    let cancel = w.shutdown.child_token();
    let stopped = Arc::new(AtomicBool::new(false));
    let lease_end = CancellationToken::new();
    let lease = tokio::spawn(keep_lease(
        client.clone(),
        a.id.clone(),
        a.lease_secs,
        cancel.clone(),
        stopped.clone(),
        lease_end.clone(),
    ));
    let (log_tx, log_rx) = mpsc::channel(LOG_QUEUE);
    let shipper = tokio::spawn(crate::logship::ship(
        client.clone(),
        a.id.clone(),
        crate::logship::redactor(w, &a),
        log_rx,
        w.shutdown.clone(),
    ));

    let mut usage = Usage::default();
    let result = build(w, &a, &job_dir, log_tx, &cancel, &mut usage).await;
    // The log is complete before the result arrives, so the controller can close it.
    let _ = shipper.await;
    let next = match result {
        Some(result) => report(w, client, &a, result, usage, started).await,
        None if stopped.load(Ordering::SeqCst) => {
            tracing::info!("the controller stopped the assignment");
            None
        }
        None => {
            refuse(
                w.clone(),
                client.clone(),
                a.id.clone(),
                "the worker is shutting down",
                true,
            )
            .await;
            None
        }
    };
    lease_end.cancel();
    let _ = lease.await;
    let removed = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(&job_dir)).await;
    if let Ok(Err(e)) = removed {
        tracing::warn!(error = %e, "cannot remove the job directory");
    }
    next
}

/// Declines an assignment, saying why. Best effort: an unanswered refusal ends in lease expiry.
pub(crate) async fn refuse(
    w: Arc<Worker>,
    client: Arc<WorkerClient>,
    assignment: String,
    reason: &str,
    busy: bool,
) {
    tracing::warn!(%reason, "refusing assignment");
    // After shutdown there is one attempt, bounded, so stopping the worker stays quick.
    let call = with_retry("refuse the assignment", REFUSE_BUDGET, &w.shutdown, || {
        client.refuse(&assignment, reason, busy)
    });
    match tokio::time::timeout(REFUSE_BUDGET, call).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "cannot refuse the assignment"),
        Err(_) => tracing::warn!("refusing the assignment took too long"),
    }
}

/// Checks that the assignment is safe to run here: its job token verifies against an IdP this
/// worker trusts, is meant for this worker, and is scoped to exactly this assignment.
async fn accept(w: &Worker, a: &Assignment) -> Result<(), String> {
    if !safe_id(&a.id) {
        return Err("the assignment id is not a safe name (1 to 128 of A-Z a-z 0-9 - _)".into());
    }
    if !w.config.allow_local_repositories && !is_remote(&a.repository) {
        return Err(format!(
            "the repository `{}` is not a remote URL (https, http, ssh or git) and this worker does not build \
             local repositories (allow_local_repositories)",
            a.repository
        ));
    }
    let audience = format!("worker:{}", w.config.name);
    let claims = w
        .trust
        .verify(
            &a.job_token,
            quorum_token::TYP_JOB,
            &audience,
            MAX_JOB_TOKEN_LIFETIME_SECS,
        )
        .await
        .map_err(|e| format!("the job token does not verify: {e}"))?;
    let Some(scope) = claims.scope else {
        return Err("the job token has no scope".into());
    };
    let mismatch = |what: &str, token: &str, given: &str| {
        Err(format!(
            "the job token is for {what} `{token}` but the assignment names `{given}`"
        ))
    };
    if scope.build != a.build_id {
        return mismatch("build", &scope.build, &a.build_id);
    }
    if scope.job.as_deref() != Some(a.job.as_str()) {
        return mismatch("job", scope.job.as_deref().unwrap_or("(none)"), &a.job);
    }
    if scope.assignment.as_deref() != Some(a.id.as_str()) {
        return mismatch(
            "assignment",
            scope.assignment.as_deref().unwrap_or("(none)"),
            &a.id,
        );
    }
    if claims.tenant != a.tenant {
        return mismatch("tenant", &claims.tenant, &a.tenant);
    }
    Ok(())
}

/// Repositories reached over the network, as opposed to paths on this machine.
fn is_remote(repository: &str) -> bool {
    ["https://", "http://", "ssh://", "git://"]
        .iter()
        .any(|scheme| repository.starts_with(scheme))
}

/// The id becomes a directory name, so it must not be able to point anywhere else.
fn safe_id(id: &str) -> bool {
    (1..=128).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Renews the lease every `lease_secs / 3` until `end`; cancels the job if the controller says stop.
async fn keep_lease(
    client: Arc<WorkerClient>,
    assignment: String,
    lease_secs: u64,
    job: CancellationToken,
    stopped: Arc<AtomicBool>,
    end: CancellationToken,
) {
    let period = Duration::from_secs((lease_secs / 3).max(1));
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = end.cancelled() => return,
            _ = tick.tick() => {}
        }
        // A failed heartbeat is retried at the next tick; one that hangs must not delay it.
        match tokio::time::timeout(period, client.heartbeat(&assignment)).await {
            Ok(Ok(resp)) if resp.stop => {
                tracing::info!("the controller asked to stop the build");
                stopped.store(true, Ordering::SeqCst);
                job.cancel();
                return;
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "heartbeat failed"),
            Err(_) => tracing::warn!("heartbeat timed out"),
        }
    }
}

/// Fetches, builds, collects and uploads. `None` when the job was cancelled and has no result.
async fn build(
    w: &Worker,
    a: &Assignment,
    job_dir: &Path,
    log: mpsc::Sender<Vec<u8>>,
    cancel: &CancellationToken,
    usage: &mut Usage,
) -> Option<ReportedResult> {
    // Lives until the outputs are uploaded: it may hold the job's size-limited build directory.
    let workspace = match w.executor.workspace(job_dir) {
        Ok(workspace) => workspace,
        Err(e) => return Some(failed(&log, format!("worker error: {e}")).await),
    };
    let src = workspace.build_dir.clone();
    // Inputs are the job's own declaration: one that cannot be had or does not match its pinned
    // digest fails the job, with the input, URL and digests named. They come before the source
    // because the first step's sandbox binds them: it is started next, and gets ready while the
    // source is exported into the build directory it binds.
    let inputs = match w.inputs.fetch(&a.inputs, cancel).await {
        Ok(inputs) => inputs,
        Err(crate::inputs::InputError::Cancelled) => return None,
        Err(e) => return Some(failed(&log, e.to_string()).await),
    };
    let spec = JobSpec {
        build_dir: src.clone(),
        tmp_dir: workspace.tmp_dir.clone(),
        source_date_epoch: a.source_date_epoch,
        script: a.script.clone(),
        timeout: Duration::from_secs(a.timeout_secs),
        inputs,
    };
    let start = match executor::JobStart::new() {
        Ok(start) => start,
        Err(e) => return Some(failed(&log, format!("worker error: {e}")).await),
    };
    start.prepare(&*w.executor, &spec).await;
    if let Err(e) = fetch_source(w, a, &src, cancel).await {
        start.discard().await;
        if cancel.is_cancelled() {
            return None;
        }
        return Some(
            failed(
                &log,
                format!("worker error: cannot fetch the source: {e:#}"),
            )
            .await,
        );
    }
    // Outputs go up while later steps run; the result waits for them in `finish`.
    let uploads = artifacts::Uploads::start(
        &a.store_url,
        &a.upload_token,
        &src,
        &a.artifacts,
        PARALLEL_UPLOADS,
    );
    let steps = uploads.watch(&*w.executor);
    let outcome = match executor::run_started_job(&steps, &spec, start, log.clone(), cancel).await {
        Ok(outcome) => outcome,
        Err(e) => return Some(failed(&log, format!("worker error: {e}")).await),
    };
    usage.wall_ms = millis(outcome.wall);
    usage.cpu_ms = millis(outcome.cpu);
    usage.peak_rss_kib = outcome.peak_rss_kib;
    match &outcome.status {
        JobStatus::Succeeded => {}
        JobStatus::Cancelled => return None,
        // run_job has already written the reason into the log.
        other => {
            return Some(ReportedResult::Failed {
                reason: other.failure_reason().unwrap_or_default(),
            });
        }
    }

    let (hooks, dir) = (w.hooks.clone(), src.clone());
    if let Err(e) = tokio::task::spawn_blocking(move || hooks.after_build(&dir)).await {
        return Some(
            failed(
                &log,
                format!("worker error: the after-build hook failed: {e}"),
            )
            .await,
        );
    }
    let manifest = match uploads.finish(cancel).await {
        Ok((manifest, sent)) => {
            usage.bytes_uploaded = sent;
            manifest
        }
        Err(artifacts::Unfinished::Build(reason)) => return Some(failed(&log, reason).await),
        Err(artifacts::Unfinished::Worker(reason)) => {
            return Some(failed(&log, format!("worker error: {reason}")).await);
        }
        Err(artifacts::Unfinished::Cancelled) => return None,
    };
    let manifest_digest = manifest.digest();
    let note = format!(
        "\n[quorum: {} files, {} bytes uploaded, manifest {manifest_digest}]\n",
        manifest.entries.len(),
        usage.bytes_uploaded
    );
    let _ = log.send(note.into_bytes()).await;
    Some(ReportedResult::Success {
        manifest,
        manifest_digest,
    })
}

async fn failed(log: &mpsc::Sender<Vec<u8>>, reason: String) -> ReportedResult {
    tracing::warn!(%reason, "job failed");
    let _ = log
        .send(format!("\n[quorum: {reason}]\n").into_bytes())
        .await;
    ReportedResult::Failed { reason }
}

/// Updates the mirror and exports the commit into `dest`, outside the build's reach: nothing of
/// git's credentials or configuration ends up in the tree.
async fn fetch_source(
    w: &Worker,
    a: &Assignment,
    dest: &Path,
    cancel: &CancellationToken,
) -> anyhow::Result<()> {
    let (mirrors, repo, commit, dest) = (
        w.mirrors.clone(),
        a.repository.clone(),
        a.commit.clone(),
        dest.to_path_buf(),
    );
    let task = tokio::task::spawn_blocking(move || {
        let mirror = mirrors.update(&repo)?;
        quorum_git::export(&mirror, &commit, &dest)
    });
    tokio::select! {
        done = task => Ok(done.context("the fetch task failed")??),
        _ = cancel.cancelled() => anyhow::bail!("cancelled"),
        _ = tokio::time::sleep(FETCH_TIMEOUT) => anyhow::bail!("git took longer than {} s", FETCH_TIMEOUT.as_secs()),
    }
}

/// Signs and delivers the result, retrying while the controller may be restarting, then
/// appends the assignment to the usage ledger (delivered or not: the work was done). Unless the
/// worker is stopping, the delivery takes the worker's next waiting offer with it, returned
/// here for this job's slot.
async fn report(
    w: &Worker,
    client: &WorkerClient,
    a: &Assignment,
    result: ReportedResult,
    usage: Usage,
    started: u64,
) -> Option<Assignment> {
    let ledger_outcome = match &result {
        ReportedResult::Success { .. } => crate::ledger::Outcome::Success,
        ReportedResult::Failed { .. } => crate::ledger::Outcome::Failed,
    };
    let outcome = match &result {
        ReportedResult::Success {
            manifest_digest, ..
        } => format!("success, manifest {manifest_digest}"),
        ReportedResult::Failed { reason } => format!("failed: {reason}"),
    };
    let report = ResultReport {
        assignment: a.id.clone(),
        build_id: a.build_id.clone(),
        job: a.job.clone(),
        worker: client.worker_id().to_string(),
        result,
        usage,
        environment: w.environment.clone(),
    };
    let signed = client.sign_report(&report);
    // Not while stopping, nor when another controller's loop waits for this slot.
    let take = !w.shutdown.is_cancelled() && !w.others_wait_for_a_slot(client.base());
    let (reported, next) = match with_retry(
        "deliver the result",
        REPORT_BUDGET,
        &w.shutdown,
        || {
            let signed = &signed;
            async move {
                if take {
                    client.result_and_take(&a.id, signed).await
                } else {
                    client.result(&a.id, signed).await.map(|()| None)
                }
            }
        },
    )
    .await
    {
        Ok(next) => {
            tracing::info!(%outcome, next = next.as_ref().map(|n| n.id.as_str()), "reported the result");
            (true, next)
        }
        Err(e) => {
            tracing::error!(error = %e, %outcome, "cannot deliver the result; giving up");
            (false, None)
        }
    };
    let finished = crate::ledger::now();
    let entry = crate::ledger::Entry {
        assignment: a.id.clone(),
        build_id: a.build_id.clone(),
        bytes_uploaded: report.usage.bytes_uploaded,
        controller: client.base().to_string(),
        cpu_ms: report.usage.cpu_ms,
        finished,
        job: a.job.clone(),
        outcome: ledger_outcome,
        peak_rss_kib: report.usage.peak_rss_kib,
        reported,
        started,
        tenant: a.tenant.clone(),
        wall_ms: report.usage.wall_ms,
        worker: w.config.name.clone(),
    };
    let data_dir = w.config.data_dir.clone();
    let key = w.key.clone();
    let appended =
        tokio::task::spawn_blocking(move || crate::ledger::append(&data_dir, &key, entry)).await;
    match appended {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => tracing::error!(error = %e, "cannot append to the usage ledger"),
        Err(e) => tracing::error!(error = %e, "the usage ledger task failed"),
    }
    next
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::safe_id;

    #[test]
    fn ids_that_could_escape_the_builds_directory_are_unsafe() {
        assert!(safe_id("a1-B_2"));
        for bad in ["", ".", "..", "a/b", "../x", "a b", &"x".repeat(129)] {
            assert!(!safe_id(bad), "{bad:?}");
        }
    }
}
