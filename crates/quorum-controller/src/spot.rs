//! Spot checks ("airport security", seeds/02): a fraction of verified results, the policy's
//! `spot_check` rate, is rebuilt afterwards by a trusted worker. Which ones is a random draw
//! made once per verified job and stored (`spot_checks.draw`), so reading the database again
//! gives the same selection. The rebuild is offered only to a trusted worker that is running
//! nothing, after the build was verified and signed, so it never delays a verification.
//!
//! A rebuild that differs from the verified result flags for review that job and every job
//! verified since with a result from any of the workers that produced it (`review.rs`): the
//! reason and the evidence, no score. Run by the scheduler at the start of each pass.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::Context as _;
use quorum_api::v1::controller::{AssignmentPurpose, FlagEvidence, SpotCheckStatus};
use quorum_core::Digest;
use quorum_core::pipeline::PPM;
use quorum_core::verdict::Outcome;
use quorum_service::now_unix;
use rand::Rng as _;
use sqlx::Row as _;

use crate::db::{self, Pool};
use crate::rebuild::{MAX_ATTEMPTS, exclusions, offer, trusted_candidates};
use crate::{State, review};

/// Verified builds drawn per pass, so a backlog (a database from before spot checks) is
/// worked off without one long pass.
const DRAW_BATCH: i64 = 64;

pub async fn pass(state: &State) -> anyhow::Result<()> {
    draw(state).await?;
    let open: Vec<(String, String, String, Option<String>, i64, String)> = sqlx::query(
        "SELECT build_id, job, state, assignment_id, attempts, detail FROM spot_checks \
         WHERE state IN ('due', 'running') ORDER BY created_at LIMIT 100",
    )
    .fetch_all(&state.pool)
    .await?
    .iter()
    .map(|r| {
        (
            r.get("build_id"),
            r.get("job"),
            r.get("state"),
            r.get("assignment_id"),
            r.get("attempts"),
            r.get("detail"),
        )
    })
    .collect();
    for (build_id, job, check_state, assignment, attempts, detail) in open {
        let result = if check_state == "running" {
            follow(state, &build_id, &job, assignment.as_deref(), attempts).await
        } else {
            dispatch(state, &build_id, &job, &detail).await
        };
        if let Err(e) = result {
            tracing::error!(build = %build_id, %job, error = %format!("{e:#}"), "cannot move a spot check along");
        }
    }
    Ok(())
}

/// Draws, once per newly verified build, which of its jobs a trusted worker rebuilds.
async fn draw(state: &State) -> anyhow::Result<()> {
    let builds: Vec<String> = sqlx::query(
        "SELECT id FROM builds WHERE state = 'verified' AND spot_drawn = 0 ORDER BY finished_at LIMIT $1",
    )
    .bind(DRAW_BATCH)
    .fetch_all(&state.pool)
    .await?
    .iter()
    .map(|r| r.get("id"))
    .collect();
    for build_id in builds {
        let jobs = db::jobs(&state.pool, &build_id).await?;
        let now = now_unix();
        let _turn = state.write_gate.enter().await;
        let mut tx = state.pool.begin().await?;
        for job in jobs
            .iter()
            .filter(|j| j.state == "verified" && j.spec.spot_check_ppm > 0)
        {
            let draw = rand::rngs::OsRng.gen_range(0..PPM);
            let due = draw < job.spec.spot_check_ppm;
            sqlx::query("INSERT INTO spot_checks (build_id, job, draw, rate_ppm, state, detail, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING")
                .bind(&build_id)
                .bind(&job.name)
                .bind(i64::from(draw))
                .bind(i64::from(job.spec.spot_check_ppm))
                .bind(if due { "due" } else { "not_drawn" })
                .bind(if due { "waiting for a free trusted worker" } else { "" })
                .bind(now)
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query("UPDATE builds SET spot_drawn = 1 WHERE id = $1")
            .bind(&build_id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
    }
    Ok(())
}

async fn set(
    state: &State,
    build_id: &str,
    job: &str,
    check_state: &str,
    detail: &str,
) -> anyhow::Result<()> {
    let finished = matches!(check_state, "matched" | "mismatched" | "abandoned").then(now_unix);
    let _turn = state.write_gate.enter().await;
    sqlx::query("UPDATE spot_checks SET state = $1, detail = $2, finished_at = $3 WHERE build_id = $4 AND job = $5")
        .bind(check_state)
        .bind(detail)
        .bind(finished)
        .bind(build_id)
        .bind(job)
        .execute(&state.pool)
        .await?;
    Ok(())
}

/// Offers a due check to a free trusted worker of an owner that had no part in the result.
async fn dispatch(state: &State, build_id: &str, job: &str, detail: &str) -> anyhow::Result<()> {
    let row = db::job(&state.pool, build_id, job)
        .await?
        .context("the job of a spot check vanished")?;
    let (workers, owners) = exclusions(&state.pool, build_id, job, row.round).await?;
    let candidates = trusted_candidates(state, &row.spec.labels, &workers, &owners, true).await?;
    let Some(w) = candidates.first() else {
        let waiting =
            "waiting for a free trusted worker of an owner that had no part in the result";
        if detail != waiting {
            set(state, build_id, job, "due", waiting).await?;
        }
        return Ok(());
    };
    let turn = state.write_gate.enter().await;
    let mut tx = state.pool.begin().await?;
    let id = offer(
        &mut tx,
        state,
        (build_id, job, row.round),
        w,
        AssignmentPurpose::SpotCheck,
    )
    .await?;
    sqlx::query("UPDATE spot_checks SET state = 'running', assignment_id = $1, attempts = attempts + 1, detail = $2 WHERE build_id = $3 AND job = $4 AND state = 'due'")
        .bind(&id)
        .bind(format!("rebuilding on trusted worker {} ({})", w.id, w.owner))
        .bind(build_id)
        .bind(job)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    drop(turn);
    state
        .offers
        .made(build_id, [(id.as_str(), job, w.id.as_str())]);
    state.worker_notify(&w.id).notify_one();
    Ok(())
}

/// Looks at a running check's assignment: compares a reported result, offers a lost one again.
async fn follow(
    state: &State,
    build_id: &str,
    job: &str,
    assignment: Option<&str>,
    attempts: i64,
) -> anyhow::Result<()> {
    let a = match assignment {
        Some(id) => db::assignment(&state.pool, id).await?,
        None => None,
    };
    match a {
        Some(a) if matches!(a.state.as_str(), "offered" | "running") => Ok(()),
        Some(a) if a.state == "reported" => compare(state, build_id, job, &a).await,
        other => {
            let why = other
                .and_then(|a| a.detail.map(|d| format!("{}: {d}", a.worker_id)))
                .unwrap_or_else(|| "the assignment ended without a result".into());
            if attempts >= MAX_ATTEMPTS {
                set(
                    state,
                    build_id,
                    job,
                    "abandoned",
                    &format!("gave up after {attempts} trusted workers; last: {why}"),
                )
                .await
            } else {
                set(
                    state,
                    build_id,
                    job,
                    "due",
                    &format!("offered again after {why}"),
                )
                .await
            }
        }
    }
}

/// The workers whose results verified job `job` of `build_id` (its round's quorum results with
/// the verified manifest).
async fn verifiers(
    pool: &Pool,
    build_id: &str,
    job: &str,
    round: i64,
    manifest: &Digest,
) -> anyhow::Result<Vec<String>> {
    let want = serde_json::to_string(&Outcome::Success {
        manifest: *manifest,
    })?;
    let rows = sqlx::query(
        "SELECT worker_id, outcome FROM assignments WHERE build_id = $1 AND job = $2 AND round = $3 \
         AND state = 'reported' AND purpose = 'quorum' ORDER BY worker_id",
    )
    .bind(build_id)
    .bind(job)
    .bind(round)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .iter()
        .filter(|r| r.get::<Option<String>, _>("outcome").as_deref() == Some(want.as_str()))
        .map(|r| r.get("worker_id"))
        .collect())
}

async fn compare(
    state: &State,
    build_id: &str,
    job: &str,
    a: &db::AssignmentRow,
) -> anyhow::Result<()> {
    let pool = &state.pool;
    let row = db::job(pool, build_id, job)
        .await?
        .context("the job of a spot check vanished")?;
    let verified: Digest = row
        .manifest
        .as_deref()
        .and_then(|m| m.parse().ok())
        .context("a spot-checked job has no verified manifest")?;
    let outcome: Outcome = a
        .outcome
        .as_deref()
        .and_then(|o| serde_json::from_str(o).ok())
        .context("a reported spot check has no outcome")?;
    if outcome == (Outcome::Success { manifest: verified }) {
        return set(
            state,
            build_id,
            job,
            "matched",
            &format!(
                "trusted worker {} rebuilt the verified manifest {verified}",
                a.worker_id
            ),
        )
        .await;
    }
    let suspects = verifiers(pool, build_id, job, row.round, &verified).await?;
    let finished_at: i64 = sqlx::query_scalar("SELECT finished_at FROM builds WHERE id = $1")
        .bind(build_id)
        .fetch_one(pool)
        .await?;
    let found = match &outcome {
        Outcome::Success { manifest } => format!("manifest {manifest}"),
        Outcome::Failed => "a failure".to_string(),
    };
    let evidence = |manifest: Digest, workers: Vec<String>| FlagEvidence {
        checked_build: build_id.to_string(),
        checked_job: job.to_string(),
        trusted_worker: a.worker_id.clone(),
        trusted_outcome: outcome.clone(),
        checked_manifest: verified,
        checked_workers: suspects.clone(),
        manifest,
        workers,
    };
    let _turn = state.write_gate.enter().await;
    let mut tx = pool.begin().await?;
    review::raise(
        &mut tx,
        build_id,
        job,
        &format!(
            "a spot check by trusted worker {} produced {found}, not the verified manifest {verified} from {}",
            a.worker_id,
            suspects.join(", ")
        ),
        &evidence(verified, suspects.clone()),
    )
    .await?;
    // Every job verified since, in any build, with a result from one of the same workers.
    let mut since: BTreeMap<(String, String), (Digest, BTreeSet<String>)> = BTreeMap::new();
    if !suspects.is_empty() {
        let list = (0..suspects.len())
            .map(|i| format!("${}", i + 2))
            .collect::<Vec<_>>()
            .join(", ");
        let sql = format!(
            "SELECT a.build_id, a.job, a.worker_id, a.outcome, j.manifest FROM assignments a \
             JOIN jobs j ON j.build_id = a.build_id AND j.name = a.job AND j.round = a.round \
             JOIN builds b ON b.id = a.build_id \
             WHERE b.state = 'verified' AND b.finished_at >= $1 AND j.state = 'verified' \
             AND a.state = 'reported' AND a.purpose = 'quorum' AND a.worker_id IN ({list})"
        );
        let mut q = sqlx::query(&sql).bind(finished_at);
        for s in &suspects {
            q = q.bind(s);
        }
        for r in q.fetch_all(&mut *tx).await? {
            let (b, j): (String, String) = (r.get("build_id"), r.get("job"));
            if b == build_id && j == job {
                continue;
            }
            let Some(manifest) = r
                .get::<Option<String>, _>("manifest")
                .and_then(|m| m.parse::<Digest>().ok())
            else {
                continue;
            };
            let agreed = r
                .get::<Option<String>, _>("outcome")
                .and_then(|o| serde_json::from_str::<Outcome>(&o).ok())
                == Some(Outcome::Success { manifest });
            if agreed {
                since
                    .entry((b, j))
                    .or_insert_with(|| (manifest, BTreeSet::new()))
                    .1
                    .insert(r.get("worker_id"));
            }
        }
    }
    for ((b, j), (manifest, workers)) in &since {
        let workers: Vec<String> = workers.iter().cloned().collect();
        review::raise(
            &mut tx,
            b,
            j,
            &format!(
                "verified with results from {}, whose result for job `{job}` of build {build_id} a spot check by trusted worker {} contradicted",
                workers.join(", "),
                a.worker_id
            ),
            &evidence(*manifest, workers.clone()),
        )
        .await?;
    }
    sqlx::query("UPDATE spot_checks SET state = 'mismatched', detail = $1, finished_at = $2 WHERE build_id = $3 AND job = $4")
        .bind(format!(
            "trusted worker {} produced {found}, not the verified manifest {verified}; {} more verified jobs flagged",
            a.worker_id,
            since.len()
        ))
        .bind(now_unix())
        .bind(build_id)
        .bind(job)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(())
}

/// The spot checks drawn for one build, for its status.
pub async fn of_build(pool: &Pool, build_id: &str) -> anyhow::Result<Vec<SpotCheckStatus>> {
    let rows = sqlx::query("SELECT * FROM spot_checks WHERE build_id = $1 ORDER BY job")
        .bind(build_id)
        .fetch_all(pool)
        .await?;
    Ok(rows
        .iter()
        .map(|r| SpotCheckStatus {
            job: r.get("job"),
            draw: u32::try_from(r.get::<i64, _>("draw")).unwrap_or_default(),
            rate_ppm: u32::try_from(r.get::<i64, _>("rate_ppm")).unwrap_or_default(),
            state: r.get("state"),
            assignment: r.get("assignment_id"),
            detail: r.get("detail"),
        })
        .collect())
}
