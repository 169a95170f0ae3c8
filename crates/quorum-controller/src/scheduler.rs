//! The scheduler: the one task that creates assignments and decides job and build states.
//! A full pass expires lost leases, then walks every unfinished build: jobs whose needs are
//! verified get workers of distinct owners (random among the eligible, trusted ones first when
//! the policy asks), reported results become verdicts, and a build whose jobs all verified is
//! signed. Between full passes (at least one a tick, and one on every wake that is not about a
//! single job), a pass weighs only the jobs whose assignments were reported or refused since the
//! last one, with the same rule on the same rows. Every pass starts from the database alone, so
//! it can be repeated after a crash.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use quorum_api::v1::controller::{AssignmentPurpose, ReportedResult, ResultReport};
use quorum_api::v1::idp::TakeUp;
use quorum_core::pipeline::JobSpec;
use quorum_core::verdict::{
    JobVerdict, Outcome, ResultView, job_verdict, provisional_manifest, retry_after_failure,
};
use quorum_service::now_unix;
use quorum_signer::{Evidence, JobEvidence, ResultEvidence};
use rand::seq::SliceRandom as _;
use sqlx::Row as _;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::db::{self, AssignmentRow, JobRow, WorkerRow};
use crate::provisional::{self, Needs};
use crate::{State, auth, rfc3339};

/// After a restart, running work gets a fresh lease: workers were cut off while we were down,
/// not lost.
pub async fn resume_after_restart(state: &State) -> anyhow::Result<()> {
    sqlx::query("UPDATE assignments SET lease_expires = $1 WHERE state IN ('offered', 'running')")
        .bind(now_unix() + state.lease_secs as i64)
        .execute(&state.pool)
        .await
        .context("cannot renew leases after restart")?;
    // Offers made before the restart are in the database only; the workers they are for look
    // there until they have taken them (`offers.rs`).
    let workers: Vec<String> =
        sqlx::query_scalar("SELECT DISTINCT worker_id FROM assignments WHERE state = 'offered'")
            .fetch_all(&state.pool)
            .await
            .context("cannot read the offers made before the restart")?;
    state.offers.made_before_start(workers);
    Ok(())
}

/// The parsed specs of one build's jobs, by job name.
pub(crate) type BuildSpecs = HashMap<String, Arc<JobSpec>>;

/// The build's specs from the cache, read and parsed on the first pass that needs them.
async fn specs_of(state: &State, build_id: &str) -> anyhow::Result<Arc<BuildSpecs>> {
    if let Some(specs) = state.specs.lock().expect("spec cache").get(build_id) {
        return Ok(specs.clone());
    }
    let specs = Arc::new(db::job_specs(&state.pool, build_id).await?);
    state
        .specs
        .lock()
        .expect("spec cache")
        .insert(build_id.to_string(), specs.clone());
    Ok(specs)
}

/// Seeds the cache with a new build's specs as its submission parsed them: the rows it just
/// wrote are their serialization, so the build's first pass need not read and parse them.
pub(crate) fn remember_specs(state: &State, build_id: &str, jobs: Vec<JobSpec>) {
    let specs: BuildSpecs = jobs
        .into_iter()
        .map(|j| (j.name.clone(), Arc::new(j)))
        .collect();
    state
        .specs
        .lock()
        .expect("spec cache")
        .insert(build_id.to_string(), Arc::new(specs));
}

/// A running build's job spec, if the scheduler has it parsed already (the dispatch path's
/// shortcut; it never fills the cache, so a finished build's stray offer cannot refill it).
pub(crate) fn cached_spec(state: &State, build_id: &str, job: &str) -> Option<Arc<JobSpec>> {
    let specs = state.specs.lock().expect("spec cache");
    specs.get(build_id)?.get(job).cloned()
}

/// Drops a finished build's specs and source from the caches.
fn forget_specs(state: &State, build_id: &str) {
    state.specs.lock().expect("spec cache").remove(build_id);
    state.offers.forget_build(build_id);
}

/// What wakes the scheduler, and how much of a pass that asks for. A report or a refusal names
/// its job, and the next pass weighs only the jobs named since the last one: with a thousand
/// jobs running, reading and weighing the whole build on every report cost more than the
/// reports themselves. Anything else (a new build, a worker back online, an approval, a
/// cancellation, a settled tie-break) asks for a full pass. The names are only where to look
/// first: a full pass runs first after a start and at least every [`FULL_EVERY`].
#[derive(Default)]
pub(crate) struct Wake {
    notify: Notify,
    pending: std::sync::Mutex<Pending>,
}

#[derive(Default)]
struct Pending {
    full: bool,
    /// New builds, weighed whole.
    builds: BTreeSet<String>,
    /// Jobs whose assignments changed, by build.
    jobs: BTreeMap<String, BTreeSet<String>>,
}

impl Pending {
    /// Whether the pass should not wait for more wake-ups: anything but reported jobs.
    fn urgent(&self) -> bool {
        self.full || !self.builds.is_empty()
    }
}

impl Wake {
    /// Asks for a pass over every unfinished build.
    pub fn all(&self) {
        self.pending.lock().expect("scheduler wake").full = true;
        self.notify.notify_one();
    }

    /// Asks for a pass over one new build, at once: its first offers go out without the
    /// reads of a full pass (leases, every other build) in front of them.
    pub fn build(&self, build: &str) {
        self.pending
            .lock()
            .expect("scheduler wake")
            .builds
            .insert(build.to_string());
        self.notify.notify_one();
    }

    /// Asks for a pass over one job whose assignments changed (a report, a refusal).
    pub fn job(&self, build: &str, job: &str) {
        {
            let mut pending = self.pending.lock().expect("scheduler wake");
            // A full pass is coming anyway; it weighs this job too.
            if !pending.full {
                pending
                    .jobs
                    .entry(build.to_string())
                    .or_default()
                    .insert(job.to_string());
            }
        }
        self.notify.notify_one();
    }

    fn urgent(&self) -> bool {
        self.pending.lock().expect("scheduler wake").urgent()
    }

    /// Waits for the next wake-up; when it is for jobs only, gathers the wake-ups of
    /// [`GATHER`] more (or until a full pass or a new build is asked for), so that reports arriving together
    /// are weighed in one pass and one transaction.
    async fn wait(&self) {
        self.notify.notified().await;
        let until = tokio::time::Instant::now() + GATHER;
        while !self.urgent() {
            if tokio::time::timeout_at(until, self.notify.notified())
                .await
                .is_err()
            {
                return;
            }
        }
    }

    fn take(&self) -> Pending {
        std::mem::take(&mut *self.pending.lock().expect("scheduler wake"))
    }
}

/// The longest time between two full passes. Everything that changes what a pass would decide
/// wakes the scheduler (a report or refusal for its job, anything else for a full pass), and
/// expired leases are looked for every tick; the periodic full pass is the net under that.
const FULL_EVERY: Duration = Duration::from_secs(2);

/// How long a pass for reported jobs waits for more reports: a verdict is recorded that much
/// later, and a busy controller weighs many reports in one pass instead of one pass each. New
/// builds and everything else that asks for a full pass do not wait.
const GATHER: Duration = Duration::from_millis(10);

pub async fn run(state: Arc<State>, shutdown: CancellationToken) {
    let tick = Duration::from_millis(250);
    // Leases, trusted rebuilds and spot checks are looked at once a tick, not on every
    // wake-up: a busy controller wakes the scheduler for each report, and their reads would
    // ride along on every one of those passes.
    let mut tick_due = tokio::time::Instant::now();
    // The first pass is full: it is what resumes a restarted controller.
    let mut full_due = tokio::time::Instant::now();
    loop {
        let now = tokio::time::Instant::now();
        let ticked = now >= tick_due;
        if ticked {
            tick_due = now + tick;
        }
        let pending = state.wake.take();
        let changed = if pending.full || now >= full_due {
            full_due = now + FULL_EVERY;
            None
        } else {
            Some(pending)
        };
        // Stopping drops a pass midway: its open transaction rolls back, and the next start
        // redoes the pass from the database (as after a kill).
        tokio::select! {
            _ = shutdown.cancelled() => return,
            r = pass(&state, changed, ticked) => if let Err(e) = r {
                tracing::error!(error = %format!("{e:#}"), "scheduler pass failed; retrying");
            },
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = state.wake.wait() => {}
            _ = tokio::time::sleep(tick) => {}
        }
    }
}

/// One pass: every unfinished build, or with `changed` just those new builds and jobs (every
/// build after all when a lease expired); leases and timeouts on a full pass and when
/// `ticked`, and then the trusted rebuilds (tie-breaks, spot checks).
async fn pass(state: &State, changed: Option<Pending>, ticked: bool) -> anyhow::Result<()> {
    let now = now_unix();
    let mut online = Online::new(state, now);
    let expired = (changed.is_none() || ticked) && expire(state, now).await?;
    match changed {
        Some(Pending { builds, jobs, .. }) if !expired => {
            for build_id in &builds {
                if let Err(e) = evaluate_build(state, build_id, &mut online).await {
                    tracing::error!(build = %build_id, error = %format!("{e:#}"), "cannot evaluate build");
                }
            }
            for (build_id, jobs) in jobs {
                if builds.contains(&build_id) {
                    continue;
                }
                if let Err(e) = evaluate_jobs(state, &build_id, &jobs, &mut online).await {
                    tracing::error!(build = %build_id, error = %format!("{e:#}"), "cannot evaluate build");
                }
            }
        }
        _ => {
            // Offers older than a lease are withdrawn; so are their places in memory.
            state.offers.prune(Duration::from_secs(state.lease_secs));
            evaluate_builds(state, &mut online).await?
        }
    }
    if !ticked {
        return Ok(());
    }
    // Trusted rebuilds after the quorum: tie-breaks operators asked for, then spot checks.
    // Their failures are logged, never in the way of scheduling. They come after the builds,
    // so their reads and commits never delay a new job's offer.
    if let Err(e) = crate::rebuild::pass(state).await {
        tracing::error!(error = %format!("{e:#}"), "trusted rebuilds could not be moved along");
    }
    if let Err(e) = crate::spot::pass(state).await {
        tracing::error!(error = %format!("{e:#}"), "spot checks could not be moved along");
    }
    Ok(())
}

/// Ends assignments whose lease expired or that ran past their deadline; returns whether it
/// ended any.
async fn expire(state: &State, now: i64) -> anyhow::Result<bool> {
    let turn = state.write_gate.enter().await;
    // An offer nobody took is withdrawn as if declined: the worker never had the job, so it
    // neither costs an attempt nor rules the worker (or its owner) out of the job. Counted as
    // lost, a few offers that expired on a busy machine left a job with too few owners for
    // its quorum, for good.
    let withdrawn = sqlx::query(
        "UPDATE assignments SET state = 'declined', detail = 'not taken before the offer expired', finished_at = $1 \
         WHERE state = 'offered' AND lease_expires < $2",
    )
    .bind(now)
    .bind(now)
    .execute(&state.pool)
    .await?;
    let lost = sqlx::query(
        "UPDATE assignments SET state = 'lost', detail = 'the worker stopped heartbeating; lease expired', finished_at = $1 \
         WHERE state = 'running' AND lease_expires < $2",
    )
    .bind(now)
    .bind(now)
    .execute(&state.pool)
    .await?;
    if lost.rows_affected() > 0 {
        tracing::warn!(
            count = lost.rows_affected(),
            "assignments lost to expired leases"
        );
    }
    // The worker enforces the job's timeout itself; this catches one that does not.
    let overdue = sqlx::query(
        "UPDATE assignments SET state = 'lost', detail = 'ran past the job''s timeout', finished_at = $1 \
         WHERE state = 'running' AND deadline < $2",
    )
    .bind(now)
    .bind(now)
    .execute(&state.pool)
    .await?;
    drop(turn);
    if overdue.rows_affected() > 0 {
        tracing::warn!(
            count = overdue.rows_affected(),
            "assignments given up after the job's timeout"
        );
    }
    Ok(withdrawn.rows_affected() + lost.rows_affected() + overdue.rows_affected() > 0)
}

/// The workers online during a pass, read once and only if some job needs a new offer (a pass
/// that only records verdicts never reads them).
struct Online {
    seen_since: i64,
    rows: Option<Vec<WorkerRow>>,
}

impl Online {
    fn new(state: &State, now: i64) -> Online {
        Online {
            seen_since: now - state.lease_secs as i64,
            rows: None,
        }
    }

    async fn rows(&mut self, pool: &db::Pool) -> anyhow::Result<&[WorkerRow]> {
        if self.rows.is_none() {
            let rows = sqlx::query("SELECT * FROM workers WHERE last_seen >= $1")
                .bind(self.seen_since)
                .fetch_all(pool)
                .await?
                .iter()
                .map(db::worker_from_row)
                .collect();
            self.rows = Some(rows);
        }
        Ok(self.rows.as_deref().unwrap_or_default())
    }
}

/// Moves every unfinished build along: cancels what was asked to be, evaluates the rest.
async fn evaluate_builds(state: &State, online: &mut Online) -> anyhow::Result<()> {
    let builds: Vec<(String, String)> = sqlx::query(
        "SELECT id, state FROM builds WHERE state IN ('running', 'cancelling') ORDER BY created_at",
    )
    .fetch_all(&state.pool)
    .await?
    .iter()
    .map(|r| (r.get("id"), r.get("state")))
    .collect();
    for (id, build_state) in builds {
        if build_state == "cancelling" {
            cancel_build(state, &id).await?;
        } else if let Err(e) = evaluate_build(state, &id, online).await {
            tracing::error!(build = %id, error = %format!("{e:#}"), "cannot evaluate build");
        }
    }
    Ok(())
}

async fn cancel_build(state: &State, id: &str) -> anyhow::Result<()> {
    let now = now_unix();
    let _turn = state.write_gate.enter().await;
    let mut tx = state.pool.begin().await?;
    sqlx::query("UPDATE assignments SET state = 'cancelled', detail = 'build cancelled', finished_at = $1 WHERE build_id = $2 AND state IN ('offered', 'running')")
        .bind(now)
        .bind(id)
        .execute(&mut *tx)
        .await?;
    sqlx::query("UPDATE jobs SET state = 'cancelled', detail = 'build cancelled' WHERE build_id = $1 AND state NOT IN ('verified', 'disputed', 'failed', 'skipped')")
        .bind(id)
        .execute(&mut *tx)
        .await?;
    sqlx::query("UPDATE builds SET state = 'cancelled', finished_at = $1 WHERE id = $2")
        .bind(now)
        .bind(id)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    forget_specs(state, id);
    tracing::info!(build = %id, "build cancelled");
    Ok(())
}

fn is_final(state: &str) -> bool {
    matches!(
        state,
        "verified" | "disputed" | "failed" | "skipped" | "cancelled"
    )
}

/// What one pass decides for one job.
struct JobUpdate {
    state: &'static str,
    detail: String,
    manifest: Option<String>,
    differing: Vec<String>,
    /// The round the job is in after this pass (one more than before when it is retried).
    round: i64,
}

async fn evaluate_build(state: &State, build_id: &str, online: &mut Online) -> anyhow::Result<()> {
    // A pass costs what the build's unfinished jobs cost: specs come parsed from the cache, and
    // finished jobs' assignments are not read.
    let specs = specs_of(state, build_id).await?;
    let jobs = db::jobs_with_specs(&state.pool, build_id, &specs).await?;
    let assignments = db::open_assignments(&state.pool, build_id).await?;
    let workers = workers_of(state, &assignments).await?;
    let mut states: BTreeMap<String, String> = jobs
        .iter()
        .map(|j| (j.name.clone(), j.state.clone()))
        .collect();
    decide_jobs(
        state,
        build_id,
        &jobs,
        &assignments,
        &workers,
        &mut states,
        online,
    )
    .await?;
    if states.values().all(|s| is_final(s)) {
        finish_build(state, build_id, &states, &jobs).await?;
    }
    Ok(())
}

/// Weighs only `changed` jobs of a build (and reads only them, the jobs they need, and their
/// current rounds' assignments), with the rule a full pass applies. When one of them changes
/// state and another job needs it, or it was the build's last unfinished job, the whole build
/// is weighed at once, as a full pass would.
async fn evaluate_jobs(
    state: &State,
    build_id: &str,
    changed: &BTreeSet<String>,
    online: &mut Online,
) -> anyhow::Result<()> {
    // A cancelling build is a full pass's to cancel; a finished one has nothing left to weigh.
    let build_state: Option<String> = sqlx::query_scalar("SELECT state FROM builds WHERE id = $1")
        .bind(build_id)
        .fetch_optional(&state.pool)
        .await?;
    if build_state.as_deref() != Some("running") {
        return Ok(());
    }
    let specs = specs_of(state, build_id).await?;
    let mut names: BTreeSet<&str> = BTreeSet::new();
    for name in changed {
        if let Some(spec) = specs.get(name) {
            names.insert(name);
            names.extend(spec.needs.iter().map(String::as_str));
        }
    }
    let names: Vec<&str> = names.into_iter().collect();
    let rows = db::jobs_named(&state.pool, build_id, &names, &specs).await?;
    let mut states: BTreeMap<String, String> = rows
        .iter()
        .map(|j| (j.name.clone(), j.state.clone()))
        .collect();
    let jobs: Vec<JobRow> = rows
        .into_iter()
        .filter(|j| changed.contains(&j.name) && !is_final(&j.state))
        .collect();
    if jobs.is_empty() {
        return Ok(());
    }
    let unfinished: Vec<&str> = jobs.iter().map(|j| j.name.as_str()).collect();
    let assignments = db::open_assignments_of(&state.pool, build_id, &unfinished).await?;
    let workers = workers_of(state, &assignments).await?;
    let moved = decide_jobs(
        state,
        build_id,
        &jobs,
        &assignments,
        &workers,
        &mut states,
        online,
    )
    .await?;
    if moved.is_empty() {
        return Ok(());
    }
    let needed = specs
        .values()
        .any(|s| s.needs.iter().any(|n| moved.contains(n)));
    let last = moved.iter().any(|n| is_final(&states[n]))
        && !db::any_unfinished(&state.pool, build_id).await?;
    if needed || last {
        evaluate_build(state, build_id, online).await?;
    }
    Ok(())
}

/// The workers of `assignments`, by id.
async fn workers_of(
    state: &State,
    assignments: &[AssignmentRow],
) -> anyhow::Result<BTreeMap<String, WorkerRow>> {
    let ids: BTreeSet<&str> = assignments.iter().map(|a| a.worker_id.as_str()).collect();
    let ids: Vec<&str> = ids.into_iter().collect();
    Ok(db::workers_named(&state.pool, &ids)
        .await?
        .into_iter()
        .map(|w| (w.id.clone(), w))
        .collect())
}

/// Decides `jobs` of one build from their current rounds' `assignments`, writes what changed
/// and the new offers, and wakes the workers offered work once their offers are committed.
/// `states` holds the states of the jobs they need and is updated as jobs are decided. Returns
/// the jobs whose state changed.
///
/// The writes are committed every [`FLUSH_ROWS`] offers, not once at the end: a build of a
/// thousand new jobs took about 100 ms to decide and write before the first worker could be
/// woken, and its first 256 offers already reach most workers. A job's row and its offers are
/// always in one transaction; a crash between two commits leaves later jobs queued without
/// offers, which the next pass offers, as if this pass had stopped there.
async fn decide_jobs(
    state: &State,
    build_id: &str,
    jobs: &[JobRow],
    assignments: &[AssignmentRow],
    workers: &BTreeMap<String, WorkerRow>,
    states: &mut BTreeMap<String, String>,
    online: &mut Online,
) -> anyhow::Result<Vec<String>> {
    let mut by_job: HashMap<(&str, i64), Vec<&AssignmentRow>> = HashMap::new();
    for a in assignments {
        by_job.entry((&a.job, a.round)).or_default().push(a);
    }
    let mut writes = Writes::new(state, false);
    let mut offered = HashSet::new();
    let mut moved = Vec::new();
    for (i, job) in jobs.iter().enumerate() {
        if is_final(&job.state) {
            continue;
        }
        // Earlier rounds ended in failure and were retried: only this round's results count.
        let mine: &[&AssignmentRow] = by_job
            .get(&(job.name.as_str(), job.round))
            .map_or(&[], Vec::as_slice);
        let update = decide_job(&mut writes, build_id, job, mine, workers, states, online).await?;
        let new_state = update.state;
        if update.state != job.state
            || update.detail != job.detail
            || update.manifest != job.manifest
            || update.differing != job.differing_paths
            || update.round != job.round
        {
            if update.state != job.state {
                tracing::info!(build = %build_id, job = %job.name, state = update.state, detail = %update.detail, "job state");
                moved.push(job.name.clone());
            }
            // The explainer (diff/) compares the groups' files in the background.
            if update.state == "disputed" && job.state != "disputed" {
                crate::diff::note_dispute(writes.tx().await?, build_id, &job.name, update.round)
                    .await?;
            }
            writes.job_updates.push((job.name.clone(), update));
        }
        states.insert(job.name.clone(), new_state.to_string());
        // Not after the last job: the commit below has the rest, and no empty one follows.
        let rows = if writes.again { FLUSH_ROWS } else { FIRST_ROWS };
        if writes.offers.len() >= rows && i + 1 < jobs.len() {
            writes.commit(build_id, &mut offered).await?;
            writes = Writes::new(state, true);
        }
    }
    writes.commit(build_id, &mut offered).await?;
    Ok(moved)
}

/// Has the tokens of the new offers minted ahead (`ahead.rs`): each worker's first ahead of
/// everything queued, since the worker takes it at once, and its others behind, taken one after
/// another while it works. `offered` holds the workers this pass offered work in its earlier
/// commits, whose first offers were among those.
fn mint_ahead(state: &State, build_id: &str, offers: &[NewOffer], offered: &mut HashSet<String>) {
    let take_up = |o: &NewOffer| TakeUp {
        audience: format!("worker:{}", o.worker),
        build: build_id.to_string(),
        job: o.job.clone(),
        assignment: o.id.clone(),
        lifetime_secs: crate::ahead::lifetime_secs(o.timeout_secs, state.lease_secs),
        upload_constraints: state.upload_limits.clone(),
    };
    let (first, later): (Vec<&NewOffer>, Vec<&NewOffer>) = offers
        .iter()
        .partition(|o| offered.insert(o.worker.clone()));
    state.ahead.queue(
        first.into_iter().map(take_up),
        later.into_iter().map(take_up),
    );
}

/// The writes of one build's pass, in one transaction taken under the write gate; the workers
/// of its offers are woken once it is committed.
///
/// The gate and the transaction are taken at the first write, not when the pass starts
/// deciding: deciding 256 new jobs takes milliseconds of reading and picking, which the
/// workers' take-ups and reports, waiting for the gate behind it, used to wait out as well. The
/// decisions rest on what the pass read before, as they did when the transaction was open
/// meanwhile: only the scheduler makes offers and writes jobs' rows, and a report that lands
/// in between wakes the next pass.
struct Writes<'a> {
    state: &'a State,
    /// Whether this pass committed writes just before (see [`db::WriteGate::enter_again`]).
    again: bool,
    /// The write gate's turn and the transaction, once begun.
    open: Option<Open<'a>>,
    /// New assignments, inserted by `flush`.
    offers: Vec<NewOffer>,
    /// Jobs whose row changes, by name, written by `flush`.
    job_updates: Vec<(String, JobUpdate)>,
}

/// The write gate's turn (SQLite), held until the commit, and the transaction.
type Open<'a> = (
    Option<tokio::sync::MutexGuard<'a, ()>>,
    sqlx::Transaction<'static, sqlx::Any>,
);

/// An assignment the pass creates: (id, job, worker, round), and its job's timeout.
struct NewOffer {
    id: String,
    job: String,
    worker: String,
    round: i64,
    timeout_secs: u64,
}

impl<'a> Writes<'a> {
    /// `again`: this pass committed writes just before, and lets waiting writers go first.
    fn new(state: &'a State, again: bool) -> Writes<'a> {
        Writes {
            state,
            again,
            open: None,
            offers: Vec::new(),
            job_updates: Vec::new(),
        }
    }

    /// The transaction, begun (after waiting for the gate) at the first call.
    async fn tx(&mut self) -> anyhow::Result<&mut sqlx::Transaction<'static, sqlx::Any>> {
        open(&mut self.open, self.state, self.again).await
    }

    /// Has the tokens of the new offers minted ahead, writes and commits everything, then
    /// wakes the workers offered work.
    async fn commit(mut self, build_id: &str, offered: &mut HashSet<String>) -> anyhow::Result<()> {
        let state = self.state;
        // Queued for minting before any worker can see its offers, so that a take-up finds
        // its tokens on their way and waits for them rather than asking the IdP itself; and
        // before the writes, so that the IdP mints while the database writes. Tokens of
        // offers whose commit fails are never handed out, and expire.
        mint_ahead(state, build_id, &self.offers, offered);
        let started = std::time::Instant::now();
        self.flush(build_id).await?;
        let flushed = started.elapsed();
        if let Some((turn, tx)) = self.open.take() {
            tx.commit().await?;
            drop(turn);
        }
        tracing::debug!(build = %build_id, offers = self.offers.len(), jobs = self.job_updates.len(), ?flushed, committed = ?started.elapsed(), "pass's writes committed");
        state.offers.made(
            build_id,
            self.offers
                .iter()
                .map(|o| (o.id.as_str(), o.job.as_str(), o.worker.as_str())),
        );
        for o in &self.offers {
            state.worker_notify(&o.worker).notify_one();
        }
        Ok(())
    }
}

/// Begins the transaction in `open` unless it is open: waits for the write gate's turn first
/// (after others waiting if `again`).
async fn open<'o, 'a>(
    open: &'o mut Option<Open<'a>>,
    state: &'a State,
    again: bool,
) -> anyhow::Result<&'o mut sqlx::Transaction<'static, sqlx::Any>> {
    if open.is_none() {
        let turn = if again {
            state.write_gate.enter_again().await
        } else {
            state.write_gate.enter().await
        };
        *open = Some((turn, state.pool.begin().await?));
    }
    Ok(&mut open.as_mut().expect("just opened").1)
}

/// Rows per multi-row statement in `flush`: well under the bound-parameter limits of both
/// databases (32766 in SQLite, 65535 in PostgreSQL; a job update binds 6 values a row), and
/// enough that a thousand new jobs take eight statements. With 64 they took 32, each a round
/// trip inside the pass's transaction before the first worker could be woken.
const FLUSH_ROWS: usize = 256;

/// New offers in a pass's first commit: fewer than [`FLUSH_ROWS`], so that the first workers
/// are woken after a shorter write (on PostgreSQL 256 offers took about 23 ms to write).
const FIRST_ROWS: usize = 128;

impl Writes<'_> {
    /// Writes the pass's offers and job updates, `FLUSH_ROWS` rows per statement: the first
    /// pass of a build of a thousand jobs offers them all, which one statement per row made a
    /// thousand round trips to PostgreSQL inside the transaction.
    async fn flush(&mut self, build_id: &str) -> anyhow::Result<()> {
        let now = now_unix();
        let lease = now + self.state.lease_secs as i64;
        if self.offers.is_empty() && self.job_updates.is_empty() {
            return Ok(());
        }
        let pool = &self.state.pool;
        let tx = open(&mut self.open, self.state, self.again).await?;
        for chunk in self.offers.chunks(FLUSH_ROWS) {
            // Each placeholder once and in order (`db::for_pool`): the build, time and lease
            // are bound again on every row.
            let rows = db::value_rows(chunk.len(), 1, 7, |p| {
                format!(
                    "({}, 'offered', {})",
                    db::placeholders(p, 4),
                    db::placeholders(p + 4, 3)
                )
            });
            let sql = db::for_pool(
                pool,
                format!(
                    "INSERT INTO assignments (id, build_id, job, worker_id, state, created_at, lease_expires, round) VALUES {rows}"
                ),
            );
            let mut q = sqlx::query(&sql);
            for o in chunk {
                q = q
                    .bind(&o.id)
                    .bind(build_id)
                    .bind(&o.job)
                    .bind(&o.worker)
                    .bind(now)
                    .bind(lease)
                    .bind(o.round);
            }
            q.execute(&mut **tx).await?;
        }
        for chunk in self.job_updates.chunks(FLUSH_ROWS) {
            // Written for a power of two of rows, the last repeated (`db::padded_len`).
            let chunk: Vec<&(String, JobUpdate)> =
                db::padded(&chunk.iter().collect::<Vec<_>>()).collect();
            let rows = db::value_rows(chunk.len(), 1, 6, |p| {
                format!("({})", db::placeholders(p, 6))
            });
            // VALUES columns are named column1, column2, ... in both SQLite and PostgreSQL.
            // The build is the last placeholder, so that they run in order (`db::for_pool`).
            let sql = db::for_pool(
                pool,
                format!(
                    "UPDATE jobs SET state = v.column2, detail = v.column3, manifest = v.column4, \
                     differing_paths = v.column5, round = v.column6 FROM (VALUES {rows}) AS v \
                     WHERE jobs.name = v.column1 AND jobs.build_id = ${}",
                    chunk.len() * 6 + 1
                ),
            );
            let mut q = sqlx::query(&sql);
            for (name, u) in chunk {
                q = q
                    .bind(name)
                    .bind(u.state)
                    .bind(&u.detail)
                    .bind(&u.manifest)
                    .bind(serde_json::to_string(&u.differing)?)
                    .bind(u.round);
            }
            q.bind(build_id).execute(&mut **tx).await?;
        }
        Ok(())
    }
}

async fn decide_job(
    writes: &mut Writes<'_>,
    build_id: &str,
    job: &JobRow,
    mine: &[&AssignmentRow],
    workers: &BTreeMap<String, WorkerRow>,
    states: &BTreeMap<String, String>,
    online: &mut Online,
) -> anyhow::Result<JobUpdate> {
    let spec = &job.spec;
    let round = job.round;
    let waiting = |detail: String| JobUpdate {
        state: "queued",
        detail,
        manifest: None,
        differing: vec![],
        round,
    };
    // A round that ended in failure starts the next one while retries remain.
    let failed = |detail: String| {
        if retry_after_failure(round, spec.retries) {
            JobUpdate {
                state: "queued",
                detail: format!("retry {} of {} after: {detail}", round + 1, spec.retries),
                manifest: None,
                differing: vec![],
                round: round + 1,
            }
        } else {
            JobUpdate {
                state: "failed",
                detail,
                manifest: None,
                differing: vec![],
                round,
            }
        }
    };
    let provisional_inputs = match provisional::check_needs(spec, mine, states, is_final) {
        Needs::Ready(provisional) => provisional,
        Needs::Waiting(detail) => return Ok(waiting(detail)),
        Needs::Skipped(detail) => {
            return Ok(JobUpdate {
                state: "skipped",
                detail,
                manifest: None,
                differing: vec![],
                round,
            });
        }
        Needs::Discarded(detail) => {
            let active: Vec<&&AssignmentRow> = mine
                .iter()
                .filter(|a| matches!(a.state.as_str(), "offered" | "running"))
                .collect();
            withdraw_extra(writes, &active).await?;
            return Ok(JobUpdate {
                state: "failed",
                detail,
                manifest: None,
                differing: vec![],
                round,
            });
        }
    };
    if spec.manual && job.approved_at.is_none() {
        return Ok(waiting(format!(
            "waiting for approval: `quorum approve {build_id} {}`",
            job.name
        )));
    }
    let results: Vec<ResultView> = mine
        .iter()
        .filter(|a| a.state == "reported")
        .filter_map(|a| {
            let w = workers.get(&a.worker_id)?;
            let outcome: Outcome = serde_json::from_str(a.outcome.as_deref()?).ok()?;
            Some(ResultView {
                worker: w.id.clone(),
                owner: w.owner.clone(),
                trusted: w.trusted,
                outcome,
            })
        })
        .collect();
    let active: Vec<&&AssignmentRow> = mine
        .iter()
        .filter(|a| matches!(a.state.as_str(), "offered" | "running"))
        .collect();
    // Slots not yet filled count as outstanding: a dispute is declared only once `quorum`
    // results are in, so the record holds as many witnesses as the policy asked for.
    let unfilled = (spec.policy.quorum as usize).saturating_sub(results.len() + active.len());
    let verdict = job_verdict(spec.policy, &results, active.len() + unfilled);
    if !provisional_inputs.is_empty() && verdict.is_final() {
        if matches!(verdict, JobVerdict::Verified { .. }) {
            withdraw_extra(writes, &active).await?;
        }
        let (state, detail, manifest) = provisional::held(&verdict, &provisional_inputs);
        return Ok(JobUpdate {
            state,
            detail,
            manifest,
            differing: vec![],
            round,
        });
    }
    match verdict {
        JobVerdict::Verified {
            manifest,
            workers: agreeing,
        } => {
            withdraw_extra(writes, &active).await?;
            return Ok(JobUpdate {
                state: "verified",
                detail: format!(
                    "{} identical results from {}",
                    agreeing.len(),
                    agreeing.join(", ")
                ),
                manifest: Some(manifest.to_string()),
                differing: vec![],
                round,
            });
        }
        JobVerdict::Failed { workers: agreeing } => {
            withdraw_extra(writes, &active).await?;
            let reason = mine
                .iter()
                .find_map(|a| {
                    (a.state == "reported")
                        .then_some(a.detail.clone())
                        .flatten()
                })
                .unwrap_or_default();
            return Ok(failed(format!(
                "{} workers agree the job fails ({}): {reason}",
                agreeing.len(),
                agreeing.join(", ")
            )));
        }
        JobVerdict::Disputed { groups } => {
            let detail = groups
                .iter()
                .map(|(o, ws)| match o {
                    Outcome::Success { manifest } => format!("{manifest} from {}", ws.join(", ")),
                    Outcome::Failed => format!("failure from {}", ws.join(", ")),
                })
                .collect::<Vec<_>>()
                .join("; ");
            let differing = differing_paths(mine);
            return Ok(JobUpdate {
                state: "disputed",
                detail: format!("results differ: {detail}"),
                manifest: None,
                differing,
                round,
            });
        }
        JobVerdict::Pending { .. } => {}
    }

    // Declined offers (a busy or stopping worker) cost nothing; refusals and lost leases count.
    let attempts = mine.iter().filter(|a| a.state != "declined").count();
    if attempts >= spec.attempt_limit() as usize {
        let reasons: Vec<String> = mine
            .iter()
            .filter(|a| matches!(a.state.as_str(), "refused" | "lost"))
            .filter_map(|a| a.detail.clone().map(|d| format!("{}: {d}", a.worker_id)))
            .take(5)
            .collect();
        return Ok(failed(format!(
            "gave up after {} assignments; {}",
            attempts,
            reasons.join("; ")
        )));
    }

    // Results agree so far (or none yet): top up to `quorum` live or reported assignments,
    // and make sure enough of them are trusted.
    let counted: Vec<&WorkerRow> = mine
        .iter()
        .filter(|a| matches!(a.state.as_str(), "offered" | "running" | "reported"))
        .filter_map(|a| workers.get(&a.worker_id))
        .collect();
    let trusted_have = counted.iter().filter(|w| w.trusted).count() as u32;
    let trusted_need = spec.policy.trusted.saturating_sub(trusted_have) as usize;
    let slots = (spec.policy.quorum as usize)
        .saturating_sub(counted.len())
        .max(trusted_need);
    let mut detail = String::new();
    if slots > 0 {
        let used_workers: HashSet<&str> = mine
            .iter()
            .filter(|a| a.state != "declined")
            .map(|a| a.worker_id.as_str())
            .collect();
        let used_owners: HashSet<&str> = counted.iter().map(|w| w.owner.as_str()).collect();
        let eligible: Vec<&WorkerRow> = online
            .rows(&writes.state.pool)
            .await?
            .iter()
            .filter(|w| {
                !used_workers.contains(w.id.as_str()) && !used_owners.contains(w.owner.as_str())
            })
            .filter(|w| spec.labels.iter().all(|(k, v)| w.labels.get(k) == Some(v)))
            .collect();
        let picked = pick(&eligible, slots, trusted_need);
        for w in &picked {
            offer(writes, build_id, spec, round, w);
        }
        if picked.len() < slots {
            let labels = if spec.labels.is_empty() {
                String::new()
            } else {
                format!(
                    " with labels {}",
                    spec.labels
                        .iter()
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect::<Vec<_>>()
                        .join(",")
                )
            };
            detail = format!(
                "waiting for {} more online workers of distinct owners{}{labels}",
                slots - picked.len(),
                if trusted_need > 0 {
                    format!(" ({trusted_need} of them trusted)")
                } else {
                    String::new()
                },
            );
        }
    }
    let reported = results.len();
    let running = counted.len() > reported || slots > 0 && detail.is_empty();
    // Provisional means identical results so far: what a job accepting provisional inputs
    // may start on.
    let state_name = if provisional_manifest(&results).is_some() {
        "provisional"
    } else if reported > 0 || running {
        "running"
    } else {
        "queued"
    };
    if detail.is_empty() {
        detail = format!("{reported} of {} results in", spec.policy.quorum);
    }
    // A later round says so for as long as it lasts, not only while its offers are made.
    if round > 0 && round <= i64::from(spec.retries) {
        detail.push_str(&format!(" (retry {round} of {})", spec.retries));
    }
    Ok(JobUpdate {
        state: state_name,
        detail,
        manifest: None,
        differing: vec![],
        round,
    })
}

/// Picks `slots` workers, one per owner, `trusted_need` of them trusted when possible. Owners are
/// drawn first and then one worker of each, so running many workers does not raise an owner's
/// chance of being picked.
fn pick<'a>(eligible: &[&'a WorkerRow], slots: usize, trusted_need: usize) -> Vec<&'a WorkerRow> {
    let mut rng = rand::thread_rng();
    let mut by_owner: BTreeMap<&str, Vec<&'a WorkerRow>> = BTreeMap::new();
    for w in eligible {
        by_owner.entry(w.owner.as_str()).or_default().push(w);
    }
    let mut owners: Vec<&str> = by_owner.keys().copied().collect();
    owners.shuffle(&mut rng);
    let mut picked: Vec<&'a WorkerRow> = Vec::new();
    let mut used: HashSet<&str> = HashSet::new();
    // Trusted first: owners with a trusted worker, one trusted worker each.
    for owner in &owners {
        if picked.len() >= trusted_need.min(slots) {
            break;
        }
        let trusted: Vec<&&'a WorkerRow> = by_owner[owner].iter().filter(|w| w.trusted).collect();
        if let Some(w) = trusted.choose(&mut rng) {
            picked.push(w);
            used.insert(owner);
        }
    }
    for owner in &owners {
        if picked.len() >= slots {
            break;
        }
        if used.contains(owner) {
            continue;
        }
        if let Some(w) = by_owner[owner].choose(&mut rng) {
            picked.push(w);
            used.insert(owner);
        }
    }
    picked
}

/// Offers the job to `w`: the assignment is inserted with the pass's other writes (`flush`).
fn offer(writes: &mut Writes<'_>, build_id: &str, spec: &JobSpec, round: i64, w: &WorkerRow) {
    let id = uuid::Uuid::new_v4().simple().to_string();
    tracing::info!(assignment = %id, build = %build_id, job = %spec.name, worker = %w.id, owner = %w.owner, "assignment offered");
    writes.offers.push(NewOffer {
        id,
        job: spec.name.clone(),
        worker: w.id.clone(),
        round,
        timeout_secs: spec.timeout_secs,
    });
}

/// Once a verdict is reached, assignments still running are no longer needed.
async fn withdraw_extra(writes: &mut Writes<'_>, active: &[&&AssignmentRow]) -> anyhow::Result<()> {
    for a in active {
        sqlx::query("UPDATE assignments SET state = 'cancelled', detail = 'verdict reached without it', finished_at = $1 WHERE id = $2 AND state IN ('offered', 'running')")
            .bind(now_unix())
            .bind(&a.id)
            .execute(&mut **writes.tx().await?)
            .await?;
    }
    Ok(())
}

/// The built-in file-level diff: paths whose entries differ from the largest group's manifest.
fn differing_paths(mine: &[&AssignmentRow]) -> Vec<String> {
    let manifests: Vec<quorum_core::Manifest> = mine
        .iter()
        .filter_map(|a| serde_json::from_str::<ResultReport>(a.report.as_deref()?).ok())
        .filter_map(|r| match r.result {
            ReportedResult::Success { manifest, .. } => Some(manifest),
            ReportedResult::Failed { .. } => None,
        })
        .collect();
    let mut out: Vec<String> = Vec::new();
    if let Some(first) = manifests.first() {
        for m in &manifests[1..] {
            out.extend(first.differing_paths(m));
        }
    }
    out.sort();
    out.dedup();
    out
}

/// Ends a build whose jobs are all final (`states`); `jobs` are its rows as this pass read them,
/// which for finished jobs are as stored (a pass changes a job's round only when it retries the
/// job, and then the job is not final).
async fn finish_build(
    state: &State,
    build_id: &str,
    states: &BTreeMap<String, String>,
    jobs: &[JobRow],
) -> anyhow::Result<()> {
    let all_verified = states.values().all(|s| s == "verified");
    let final_state = if all_verified {
        "verified"
    } else if states.values().any(|s| s == "disputed") {
        "disputed"
    } else if states.values().any(|s| s == "cancelled") && !states.values().any(|s| s == "failed") {
        "cancelled"
    } else {
        "failed"
    };
    let now = now_unix();
    if !all_verified {
        let _turn = state.write_gate.enter().await;
        sqlx::query(
            "UPDATE builds SET state = $1, finished_at = $2 WHERE id = $3 AND state = 'running'",
        )
        .bind(final_state)
        .bind(now)
        .bind(build_id)
        .execute(&state.pool)
        .await?;
        forget_specs(state, build_id);
        tracing::info!(build = %build_id, state = final_state, "build finished");
        return Ok(());
    }
    let started = std::time::Instant::now();
    let evidence = gather_evidence(state, build_id, now, jobs).await?;
    let gathered = started.elapsed();
    let signing = state.signer.sign_build(&evidence);
    let signed_in = started.elapsed() - gathered;
    match signing {
        Ok(signed) => {
            // The statements and the verdict land together or not at all, and only once.
            let turn = state.write_gate.enter().await;
            let mut conn = db::durable_connection(&state.pool).await?;
            let mut tx = db::begin_durable(&state.pool, &mut conn).await?;
            sqlx::query("INSERT INTO statements (build_id, envelope, summary, created_at) VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING")
                .bind(build_id)
                .bind(serde_json::to_string(&signed.provenance)?)
                .bind(serde_json::to_string(&signed.summary)?)
                .bind(now)
                .execute(&mut *tx)
                .await?;
            sqlx::query("UPDATE builds SET state = 'verified', finished_at = $1 WHERE id = $2 AND state = 'running'")
                .bind(now)
                .bind(build_id)
                .execute(&mut *tx)
                .await?;
            crate::failpoint::pause_if_armed(state, crate::failpoint::AFTER_SIGNING).await;
            tx.commit().await?;
            drop(turn);
            forget_specs(state, build_id);
            tracing::info!(
                build = %build_id,
                evidence_ms = gathered.as_millis() as u64,
                signing_ms = signed_in.as_millis() as u64,
                total_ms = started.elapsed().as_millis() as u64,
                "build verified and signed"
            );
        }
        Err(e) => {
            tracing::error!(build = %build_id, error = %e, "the signer refused the evidence");
            let _turn = state.write_gate.enter().await;
            sqlx::query("UPDATE builds SET state = 'failed', finished_at = $1 WHERE id = $2 AND state = 'running'")
                .bind(now)
                .bind(build_id)
                .execute(&state.pool)
                .await?;
            sqlx::query("UPDATE jobs SET detail = detail || $1 WHERE build_id = $2")
                .bind(format!(" (signer refused: {e})"))
                .bind(build_id)
                .execute(&state.pool)
                .await?;
        }
    }
    Ok(())
}

/// Everything the signer re-checks, read straight from the database (`jobs` by this pass).
async fn gather_evidence(
    state: &State,
    build_id: &str,
    now: i64,
    jobs: &[JobRow],
) -> anyhow::Result<Evidence> {
    let b = db::build(&state.pool, build_id)
        .await?
        .context("build vanished")?;
    let (assignments, purposes) = db::reported_of_build(&state.pool, build_id).await?;
    // Every worker once, not once per result: a build of a thousand jobs has a thousand.
    let workers = workers_of(state, &assignments).await?;
    let mut keys = HashMap::new();
    for (id, w) in &workers {
        let key = auth::public_key(&w.public_key)
            .with_context(|| format!("stored key of worker {id} is invalid"))?;
        keys.insert(id.as_str(), key);
    }
    // The reported results by job and round, so that a large build is not read once per job.
    let mut reported: HashMap<(&str, i64), Vec<&AssignmentRow>> = HashMap::new();
    for a in &assignments {
        reported.entry((&a.job, a.round)).or_default().push(a);
    }
    let mut out = Vec::new();
    for j in jobs {
        let (mut results, mut rebuilds) = (Vec::new(), Vec::new());
        for a in reported
            .get(&(j.name.as_str(), j.round))
            .into_iter()
            .flatten()
        {
            // Tie-breaks are evidence of their own; spot checks come after signing, never in it.
            let into = match purposes.get(&a.id) {
                None | Some(AssignmentPurpose::Quorum) => &mut results,
                Some(AssignmentPurpose::TieBreak) => &mut rebuilds,
                Some(AssignmentPurpose::SpotCheck) => continue,
            };
            let w = workers.get(&a.worker_id).context("worker vanished")?;
            let key = keys[a.worker_id.as_str()];
            into.push(ResultEvidence {
                assignment: a.id.clone(),
                worker: w.id.clone(),
                owner: w.owner.clone(),
                trusted: w.trusted,
                worker_key: key,
                report: a.report.clone().unwrap_or_default(),
                signature: a.signature.clone().unwrap_or_default(),
            });
        }
        out.push(JobEvidence {
            name: j.name.clone(),
            policy: j.spec.policy,
            results,
            rebuilds,
        });
    }
    Ok(Evidence {
        controller: state.name.clone(),
        build_id: b.id,
        repository: b.repository,
        commit: b.commit_id,
        started_on: rfc3339(b.created_at),
        finished_on: rfc3339(now),
        jobs: out,
    })
}
