//! Trusted rebuilds after the quorum: a tie-break an operator asks for on a disputed job
//! (`POST /api/v1/builds/{id}/jobs/{job}/rebuild`), and the shared pieces spot checks use too
//! (finding a trusted worker, offering it an assignment with its purpose). Run by the scheduler
//! at the start of each pass, so the scheduler stays the only writer of job and build states
//! and the only creator of assignments.
//!
//! A tie-break's result is an assignment of the disputed round with purpose `tie_break`; the
//! verdict is `verdict_with_rebuilds` over the round's results and these, which the signer
//! recomputes from the same rows. When it verifies the job, the build is reopened: jobs skipped
//! because of the dispute are queued again and the ordinary pass carries the build to its end
//! and signature. The dispute's record (the round's results, the differing paths) stays.

use std::collections::{BTreeMap, HashMap, HashSet};

use anyhow::Context as _;
use quorum_api::v1::controller::{AssignmentPurpose, RebuildStatus};
use quorum_core::verdict::{JobVerdict, Outcome, ResultView, verdict_with_rebuilds};
use quorum_service::now_unix;
use rand::seq::SliceRandom as _;
use sqlx::Row as _;

use crate::db::{self, AssignmentRow, Pool, WorkerRow};
use crate::{State, rfc3339};

/// How many trusted workers one rebuild (or spot check) is offered to before it is given up.
pub const MAX_ATTEMPTS: i64 = 3;

/// The purpose of every assignment of `build_id` that is not one of a job's quorum.
pub async fn purposes(
    pool: &Pool,
    build_id: &str,
) -> anyhow::Result<HashMap<String, AssignmentPurpose>> {
    let rows = sqlx::query(
        "SELECT id, purpose FROM assignments WHERE build_id = $1 AND purpose <> 'quorum'",
    )
    .bind(build_id)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .iter()
        .map(|r| (r.get("id"), purpose_of(&r.get::<String, _>("purpose"))))
        .collect())
}

/// The purpose an assignment's `purpose` column names.
pub(crate) fn purpose_of(name: &str) -> AssignmentPurpose {
    match name {
        "tie_break" => AssignmentPurpose::TieBreak,
        "spot_check" => AssignmentPurpose::SpotCheck,
        _ => AssignmentPurpose::Quorum,
    }
}

fn purpose_name(p: AssignmentPurpose) -> &'static str {
    match p {
        AssignmentPurpose::Quorum => "quorum",
        AssignmentPurpose::TieBreak => "tie_break",
        AssignmentPurpose::SpotCheck => "spot_check",
    }
}

/// Online trusted workers with `labels`, none of `exclude_workers` nor of `exclude_owners`, in
/// random order; with `free_only`, only those running nothing at all.
pub async fn trusted_candidates(
    state: &State,
    labels: &BTreeMap<String, String>,
    exclude_workers: &HashSet<String>,
    exclude_owners: &HashSet<String>,
    free_only: bool,
) -> anyhow::Result<Vec<WorkerRow>> {
    let rows = sqlx::query("SELECT * FROM workers WHERE trusted <> 0 AND last_seen >= $1")
        .bind(now_unix() - state.lease_secs as i64)
        .fetch_all(&state.pool)
        .await?;
    let mut out = Vec::new();
    for w in rows.iter().map(db::worker_from_row) {
        if exclude_workers.contains(&w.id)
            || exclude_owners.contains(&w.owner)
            || !labels.iter().all(|(k, v)| w.labels.get(k) == Some(v))
        {
            continue;
        }
        if free_only {
            let busy = sqlx::query(
                "SELECT 1 FROM assignments WHERE worker_id = $1 AND state IN ('offered', 'running') LIMIT 1",
            )
            .bind(&w.id)
            .fetch_optional(&state.pool)
            .await?;
            if busy.is_some() {
                continue;
            }
        }
        out.push(w);
    }
    out.shuffle(&mut rand::thread_rng());
    Ok(out)
}

/// Offers `worker` an assignment of job `job` in `round` made for `purpose`, in `tx`; the caller
/// wakes the worker once `tx` is committed.
pub async fn offer(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    state: &State,
    (build_id, job, round): (&str, &str, i64),
    worker: &WorkerRow,
    purpose: AssignmentPurpose,
) -> anyhow::Result<String> {
    let id = uuid::Uuid::new_v4().simple().to_string();
    let now = now_unix();
    sqlx::query("INSERT INTO assignments (id, build_id, job, worker_id, state, created_at, lease_expires, round, purpose) VALUES ($1, $2, $3, $4, 'offered', $5, $6, $7, $8)")
        .bind(&id)
        .bind(build_id)
        .bind(job)
        .bind(&worker.id)
        .bind(now)
        .bind(now + state.lease_secs as i64)
        .bind(round)
        .bind(purpose_name(purpose))
        .execute(&mut **tx)
        .await?;
    tracing::info!(assignment = %id, build = %build_id, %job, worker = %worker.id, purpose = purpose_name(purpose), "trusted rebuild offered");
    Ok(id)
}

/// The workers that took part in job `job`'s round `round` (any state but declined): worker,
/// owner and the assignment's purpose.
async fn participants(
    pool: &Pool,
    build_id: &str,
    job: &str,
    round: i64,
) -> anyhow::Result<Vec<(String, String, String)>> {
    let rows = sqlx::query(
        "SELECT a.worker_id, w.owner, a.purpose FROM assignments a JOIN workers w ON w.id = a.worker_id \
         WHERE a.build_id = $1 AND a.job = $2 AND a.round = $3 AND a.state <> 'declined'",
    )
    .bind(build_id)
    .bind(job)
    .bind(round)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .iter()
        .map(|r| (r.get("worker_id"), r.get("owner"), r.get("purpose")))
        .collect())
}

/// Excluded from a trusted rebuild of a job's round: workers that already worked on it (for
/// any purpose) and owners of the round's quorum workers, since a witness must be new.
pub async fn exclusions(
    pool: &Pool,
    build_id: &str,
    job: &str,
    round: i64,
) -> anyhow::Result<(HashSet<String>, HashSet<String>)> {
    let mut workers = HashSet::new();
    let mut owners = HashSet::new();
    for (worker, owner, purpose) in participants(pool, build_id, job, round).await? {
        if purpose == "quorum" {
            owners.insert(owner);
        }
        workers.insert(worker);
    }
    Ok((workers, owners))
}

struct Request {
    build_id: String,
    job: String,
    round: i64,
    state: String,
    assignment: Option<String>,
    attempts: i64,
    detail: String,
}

/// Moves every open tie-break along: offers it to a trusted worker, notices a lost one, and
/// decides the job once the rebuild reported.
pub async fn pass(state: &State) -> anyhow::Result<()> {
    let open: Vec<Request> = sqlx::query(
        "SELECT * FROM rebuilds WHERE state IN ('requested', 'running') ORDER BY requested_at",
    )
    .fetch_all(&state.pool)
    .await?
    .iter()
    .map(|r| Request {
        build_id: r.get("build_id"),
        job: r.get("job"),
        round: r.get("round"),
        state: r.get("state"),
        assignment: r.get("assignment_id"),
        attempts: r.get("attempts"),
        detail: r.get("detail"),
    })
    .collect();
    for r in open {
        if let Err(e) = step(state, &r).await {
            tracing::error!(build = %r.build_id, job = %r.job, error = %format!("{e:#}"), "cannot move a trusted rebuild along");
        }
    }
    Ok(())
}

async fn finish(state: &State, r: &Request, detail: &str) -> anyhow::Result<()> {
    let _turn = state.write_gate.enter().await;
    sqlx::query("UPDATE rebuilds SET state = 'done', detail = $1, finished_at = $2 WHERE build_id = $3 AND job = $4 AND round = $5")
        .bind(detail)
        .bind(now_unix())
        .bind(&r.build_id)
        .bind(&r.job)
        .bind(r.round)
        .execute(&state.pool)
        .await?;
    tracing::info!(build = %r.build_id, job = %r.job, %detail, "trusted rebuild done");
    Ok(())
}

async fn step(state: &State, r: &Request) -> anyhow::Result<()> {
    let pool = &state.pool;
    let job = db::job(pool, &r.build_id, &r.job)
        .await?
        .context("the job of a rebuild vanished")?;
    if r.state == "running" {
        let a = match &r.assignment {
            Some(id) => db::assignment(pool, id).await?,
            None => None,
        };
        return match a {
            Some(a) if matches!(a.state.as_str(), "offered" | "running") => Ok(()),
            Some(a) if a.state == "reported" => decide(state, r).await,
            other => {
                let why = other
                    .and_then(|a| a.detail.map(|d| format!("{}: {d}", a.worker_id)))
                    .unwrap_or_else(|| "the assignment ended without a result".into());
                if r.attempts >= MAX_ATTEMPTS {
                    finish(
                        state,
                        r,
                        &format!("gave up after {} trusted workers; last: {why}", r.attempts),
                    )
                    .await
                } else {
                    let _turn = state.write_gate.enter().await;
                    sqlx::query("UPDATE rebuilds SET state = 'requested', assignment_id = NULL, detail = $1 WHERE build_id = $2 AND job = $3 AND round = $4")
                        .bind(format!("offered again after {why}"))
                        .bind(&r.build_id)
                        .bind(&r.job)
                        .bind(r.round)
                        .execute(pool)
                        .await?;
                    Ok(())
                }
            }
        };
    }
    if job.state != "disputed" || job.round != r.round {
        return finish(
            state,
            r,
            &format!("the job is {}, no longer disputed", job.state),
        )
        .await;
    }
    let (workers, owners) = exclusions(pool, &r.build_id, &r.job, r.round).await?;
    let candidates = trusted_candidates(state, &job.spec.labels, &workers, &owners, false).await?;
    let Some(w) = candidates.first() else {
        let waiting = "waiting for an online trusted worker of an owner not in the dispute";
        if r.detail != waiting {
            let _turn = state.write_gate.enter().await;
            sqlx::query(
                "UPDATE rebuilds SET detail = $1 WHERE build_id = $2 AND job = $3 AND round = $4",
            )
            .bind(waiting)
            .bind(&r.build_id)
            .bind(&r.job)
            .bind(r.round)
            .execute(pool)
            .await?;
        }
        return Ok(());
    };
    let turn = state.write_gate.enter().await;
    let mut tx = pool.begin().await?;
    let id = offer(
        &mut tx,
        state,
        (&r.build_id, &r.job, r.round),
        w,
        AssignmentPurpose::TieBreak,
    )
    .await?;
    sqlx::query("UPDATE rebuilds SET state = 'running', assignment_id = $1, attempts = attempts + 1, detail = $2 WHERE build_id = $3 AND job = $4 AND round = $5 AND state = 'requested'")
        .bind(&id)
        .bind(format!("offered to trusted worker {} ({})", w.id, w.owner))
        .bind(&r.build_id)
        .bind(&r.job)
        .bind(r.round)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    drop(turn);
    state
        .offers
        .made(&r.build_id, [(id.as_str(), r.job.as_str(), w.id.as_str())]);
    state.worker_notify(&w.id).notify_one();
    Ok(())
}

/// The round's results and its trusted rebuilds, as the verdict function sees them.
pub async fn round_views(
    pool: &Pool,
    build_id: &str,
    job: &str,
    round: i64,
) -> anyhow::Result<(Vec<ResultView>, Vec<ResultView>)> {
    let purposes = purposes(pool, build_id).await?;
    let assignments: Vec<AssignmentRow> = db::assignments_of_build(pool, build_id)
        .await?
        .into_iter()
        .filter(|a| a.job == job && a.round == round && a.state == "reported")
        .collect();
    let (mut results, mut rebuilds) = (Vec::new(), Vec::new());
    for a in assignments {
        let w = db::worker(pool, &a.worker_id)
            .await?
            .context("worker vanished")?;
        let Some(outcome) = a
            .outcome
            .as_deref()
            .and_then(|o| serde_json::from_str::<Outcome>(o).ok())
        else {
            continue;
        };
        let view = ResultView {
            worker: w.id,
            owner: w.owner,
            trusted: w.trusted,
            outcome,
        };
        match purposes.get(&a.id) {
            Some(AssignmentPurpose::TieBreak) => rebuilds.push(view),
            Some(_) => {}
            None => results.push(view),
        }
    }
    Ok((results, rebuilds))
}

/// The rebuild reported: recompute the verdict with it and, when it decides the job, record
/// that and reopen the build so the ordinary pass takes it to its end.
async fn decide(state: &State, r: &Request) -> anyhow::Result<()> {
    let pool = &state.pool;
    let job = db::job(pool, &r.build_id, &r.job)
        .await?
        .context("the job of a rebuild vanished")?;
    let build = db::build(pool, &r.build_id)
        .await?
        .context("the build of a rebuild vanished")?;
    let (results, rebuilds) = round_views(pool, &r.build_id, &r.job, r.round).await?;
    let verdict = verdict_with_rebuilds(job.spec.policy, &results, &rebuilds);
    let trusted: Vec<String> = rebuilds
        .iter()
        .filter(|v| v.trusted)
        .map(|v| v.worker.clone())
        .collect();
    let (job_state, manifest, words) = match &verdict {
        JobVerdict::Verified { manifest, workers } => (
            "verified",
            Some(manifest.to_string()),
            format!(
                "verified by a trusted rebuild: {} identical results from {}",
                workers.len(),
                workers.join(", ")
            ),
        ),
        JobVerdict::Failed { workers } => (
            "failed",
            None,
            format!(
                "failed by a trusted rebuild: {} workers agree the job fails ({})",
                workers.len(),
                workers.join(", ")
            ),
        ),
        JobVerdict::Disputed { .. } | JobVerdict::Pending { .. } => {
            let rebuilt = rebuilds
                .iter()
                .map(|v| match &v.outcome {
                    Outcome::Success { manifest } => format!("{manifest} from {}", v.worker),
                    Outcome::Failed => format!("failure from {}", v.worker),
                })
                .collect::<Vec<_>>()
                .join("; ");
            return finish(
                state,
                r,
                &format!(
                    "the trusted rebuild ({rebuilt}) does not settle the dispute: it agrees with no \
                     side, or the side it agrees with still falls short of the policy"
                ),
            )
            .await;
        }
    };
    if build.state == "cancelled" || build.state == "cancelling" {
        return finish(
            state,
            r,
            &format!("{words}; not applied: the build was cancelled"),
        )
        .await;
    }
    let now = now_unix();
    let turn = state.write_gate.enter().await;
    let mut tx = pool.begin().await?;
    // The dispute's record stays: the round's results and differing paths are untouched, and
    // the detail keeps what the dispute said.
    let moved = sqlx::query("UPDATE jobs SET state = $1, manifest = $2, detail = $3 WHERE build_id = $4 AND name = $5 AND round = $6 AND state = 'disputed'")
        .bind(job_state)
        .bind(&manifest)
        .bind(format!("{words}; before the rebuild by {}: {}", trusted.join(", "), job.detail))
        .bind(&r.build_id)
        .bind(&r.job)
        .bind(r.round)
        .execute(&mut *tx)
        .await?;
    if moved.rows_affected() == 1 {
        if job_state == "verified" {
            sqlx::query("UPDATE jobs SET state = 'queued', detail = 'queued again: a trusted rebuild settled a dispute' WHERE build_id = $1 AND state = 'skipped'")
                .bind(&r.build_id)
                .execute(&mut *tx)
                .await?;
            // A job that ran on this job's provisional results, and was discarded when they
            // were disputed, runs again in a new round: its old results were made on inputs
            // that may not be the verified ones.
            let discarded = crate::provisional::discarded_on(&r.job);
            sqlx::query("UPDATE jobs SET state = 'queued', round = round + 1, detail = 'queued again: a trusted rebuild settled a dispute over its provisional inputs' \
                         WHERE build_id = $1 AND state = 'failed' AND substr(detail, 1, length($2)) = $2")
                .bind(&r.build_id)
                .bind(&discarded)
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query("UPDATE builds SET state = 'running', finished_at = NULL WHERE id = $1 AND state IN ('disputed', 'failed')")
            .bind(&r.build_id)
            .execute(&mut *tx)
            .await?;
    }
    sqlx::query("UPDATE rebuilds SET state = 'done', detail = $1, finished_at = $2 WHERE build_id = $3 AND job = $4 AND round = $5")
        .bind(&words)
        .bind(now)
        .bind(&r.build_id)
        .bind(&r.job)
        .bind(r.round)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    drop(turn);
    tracing::info!(build = %r.build_id, job = %r.job, state = job_state, "a trusted rebuild settled a dispute");
    state.wake.all();
    Ok(())
}

/// The tie-breaks of one build, for its status.
pub async fn of_build(pool: &Pool, build_id: &str) -> anyhow::Result<Vec<RebuildStatus>> {
    let rows = sqlx::query("SELECT * FROM rebuilds WHERE build_id = $1 ORDER BY requested_at, job")
        .bind(build_id)
        .fetch_all(pool)
        .await?;
    Ok(rows
        .iter()
        .map(|r| RebuildStatus {
            job: r.get("job"),
            round: r.get("round"),
            state: r.get("state"),
            assignment: r.get("assignment_id"),
            detail: r.get("detail"),
            requested_at: rfc3339(r.get("requested_at")),
            finished_at: r.get::<Option<i64>, _>("finished_at").map(rfc3339),
        })
        .collect())
}
