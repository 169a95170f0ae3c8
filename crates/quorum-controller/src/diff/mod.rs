//! Explained disputes: when the scheduler declares a job disputed it adds a `dispute_reports`
//! row in the same transaction ([`note_dispute`]); this task, beside the scheduler and never in
//! its way, fetches the differing files of each group of results from the store with a read
//! token of the controller's own tenant, compares each group's version with the largest
//! group's (diffoscope in a sandbox, `diffoscope.rs`; the built-in diff, `builtin.rs`, when it
//! is absent, fails or times out), and stores the text and HTML reports (`report.rs`) with the
//! build. A row still pending when the controller stops is done after its restart; a store that
//! cannot be reached is retried with backoff.
//!
//! The comparison runs outside every worker and its result is an explanation, never a verdict:
//! the minority is not presumed guilty.

mod builtin;
mod diffoscope;
mod report;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use quorum_api::v1::controller::{DisputeReport, ReportedResult, ResultReport};
use quorum_api::v1::idp::TOKEN_TYPE_READ;
use quorum_client::idp::TokenFor;
use quorum_client::store::StoreClient;
use quorum_core::{Digest, Manifest};
use quorum_service::now_unix;
use serde::{Deserialize, Serialize};
use sqlx::Row as _;
use tokio_util::sync::CancellationToken;

use crate::{State, db};
use diffoscope::Diffoscope;
use report::{Dispute, Explained, Group, Pair, PathReport};

/// `[project.disputes]`: how disputes are explained.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DisputesConfig {
    /// diffoscope: a command looked up on PATH, or a path; `""` never runs it.
    #[serde(default = "default_diffoscope")]
    pub diffoscope: String,
    /// bubblewrap, the sandbox diffoscope runs in; without it diffoscope is not run.
    #[serde(default = "default_bwrap")]
    pub bwrap: String,
    /// Time limit of one diffoscope run (one pair of files).
    #[serde(default = "default_timeout_secs")]
    pub timeout_secs: u64,
    /// The largest report diffoscope may write on one pair (text and HTML each).
    #[serde(default = "default_max_report_bytes")]
    pub max_report_bytes: u64,
    /// Files larger than this are listed (size, digest) but not fetched and compared.
    #[serde(default = "default_max_file_bytes")]
    pub max_file_bytes: u64,
}

impl Default for DisputesConfig {
    fn default() -> DisputesConfig {
        DisputesConfig {
            diffoscope: default_diffoscope(),
            bwrap: default_bwrap(),
            timeout_secs: default_timeout_secs(),
            max_report_bytes: default_max_report_bytes(),
            max_file_bytes: default_max_file_bytes(),
        }
    }
}

fn default_diffoscope() -> String {
    "diffoscope".into()
}

fn default_bwrap() -> String {
    "bwrap".into()
}

fn default_timeout_secs() -> u64 {
    120
}

fn default_max_report_bytes() -> u64 {
    1 << 20
}

fn default_max_file_bytes() -> u64 {
    64 << 20
}

/// How often pending reports are looked for.
const EVERY: Duration = Duration::from_secs(1);
/// Reports started per pass.
const BATCH: i64 = 4;
/// Attempts after which files the store will not give are reported as such instead of retried.
const STRICT_ATTEMPTS: i64 = 5;
/// Differing paths reported in detail; the rest are counted.
const MAX_PATHS: usize = 200;
/// Pairs of files given to diffoscope per report; the rest get the built-in diff.
const MAX_DIFFOSCOPE_PAIRS: usize = 20;

/// Notes a newly disputed job for the explainer, inside the scheduler's transaction.
pub async fn note_dispute(
    conn: &mut sqlx::AnyConnection,
    build: &str,
    job: &str,
    round: i64,
) -> anyhow::Result<()> {
    sqlx::query(
        "INSERT INTO dispute_reports (build_id, job, round, state, created_at) \
         VALUES ($1, $2, $3, 'pending', $4) ON CONFLICT (build_id, job) DO NOTHING",
    )
    .bind(build)
    .bind(job)
    .bind(round)
    .bind(now_unix())
    .execute(conn)
    .await?;
    Ok(())
}

/// Each disputed job's report state, by job, for the build's status.
pub async fn summaries(
    pool: &db::Pool,
    build: &str,
) -> anyhow::Result<BTreeMap<String, DisputeReport>> {
    let rows = sqlx::query("SELECT job, state, tool FROM dispute_reports WHERE build_id = $1")
        .bind(build)
        .fetch_all(pool)
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            (
                r.get("job"),
                DisputeReport {
                    ready: r.get::<String, _>("state") == "ready",
                    tool: r.get("tool"),
                },
            )
        })
        .collect())
}

/// A report as stored, in both forms, and what produced it.
pub struct Stored {
    pub tool: String,
    pub text: String,
    pub html: String,
}

/// The report of `job` of `build`: `Ok(None)` if there is no dispute to explain,
/// `Ok(Some(None))` while it is prepared.
pub async fn stored(
    pool: &db::Pool,
    build: &str,
    job: &str,
) -> anyhow::Result<Option<Option<Stored>>> {
    let row = sqlx::query(
        "SELECT state, tool, report_text, report_html FROM dispute_reports WHERE build_id = $1 AND job = $2",
    )
    .bind(build)
    .bind(job)
    .fetch_optional(pool)
    .await?;
    Ok(row.map(|r| {
        (r.get::<String, _>("state") == "ready").then(|| Stored {
            tool: r.get::<Option<String>, _>("tool").unwrap_or_default(),
            text: r
                .get::<Option<String>, _>("report_text")
                .unwrap_or_default(),
            html: r
                .get::<Option<String>, _>("report_html")
                .unwrap_or_default(),
        })
    }))
}

pub async fn run(state: Arc<State>, shutdown: CancellationToken) {
    let store = StoreClient::new(&state.store_url);
    match Diffoscope::locate(&state.project.disputes) {
        Ok(d) => {
            tracing::info!(diffoscope = ?d, "disputes are explained by diffoscope in a sandbox")
        }
        Err(why) => tracing::info!(%why, "disputes are explained by the built-in diff"),
    }
    // Stopping drops a pass midway: a running diffoscope is killed with it (kill on drop), and
    // its report stays pending for the next start.
    let failed = "cannot read the pending dispute reports; retrying";
    crate::background::every(&shutdown, EVERY, failed, || pass(&state, &store)).await
}

async fn pass(state: &State, store: &StoreClient) -> anyhow::Result<()> {
    let rows = sqlx::query(
        "SELECT build_id, job, round, attempts FROM dispute_reports \
         WHERE state = 'pending' AND next_attempt_at <= $1 ORDER BY next_attempt_at LIMIT $2",
    )
    .bind(now_unix())
    .bind(BATCH)
    .fetch_all(&state.pool)
    .await?;
    for r in rows {
        let build: String = r.get("build_id");
        let job: String = r.get("job");
        let attempts: i64 = r.get("attempts");
        let explained = Explainer {
            state,
            store,
            build: &build,
            job: &job,
            round: r.get("round"),
            strict: attempts < STRICT_ATTEMPTS,
        }
        .explain()
        .await;
        match explained {
            Ok(d) => {
                let (tool, text, html) = (d.tool(), d.text(), d.html());
                let _turn = state.write_gate.enter().await;
                sqlx::query(
                    "UPDATE dispute_reports SET state = 'ready', tool = $1, report_text = $2, \
                     report_html = $3, finished_at = $4, last_error = NULL \
                     WHERE build_id = $5 AND job = $6 AND state = 'pending'",
                )
                .bind(tool)
                .bind(text)
                .bind(html)
                .bind(now_unix())
                .bind(&build)
                .bind(&job)
                .execute(&state.pool)
                .await?;
                tracing::info!(%build, %job, tool, "dispute explained");
            }
            Err(e) => {
                let delay = crate::background::backoff_secs(attempts);
                let error = format!("{e:#}");
                tracing::warn!(%build, %job, %error, retry_in_secs = delay, "cannot explain the dispute yet");
                let _turn = state.write_gate.enter().await;
                sqlx::query(
                    "UPDATE dispute_reports SET attempts = attempts + 1, next_attempt_at = $1, \
                     last_error = $2 WHERE build_id = $3 AND job = $4",
                )
                .bind(now_unix() + delay)
                .bind(error)
                .bind(&build)
                .bind(&job)
                .execute(&state.pool)
                .await?;
            }
        }
    }
    Ok(())
}

/// One successful group of results, with its manifest.
struct Success {
    label: String,
    manifest: Manifest,
}

struct Explainer<'a> {
    state: &'a State,
    store: &'a StoreClient,
    build: &'a str,
    job: &'a str,
    round: i64,
    /// A file the store will not give fails the attempt (to be retried) rather than being
    /// reported as missing.
    strict: bool,
}

impl Explainer<'_> {
    async fn explain(&self) -> anyhow::Result<Dispute> {
        let (groups, successes, failures) = self.groups().await?;
        let mut differing: BTreeSet<String> = BTreeSet::new();
        if let Some((first, rest)) = successes.split_first() {
            for other in rest {
                differing.extend(first.manifest.differing_paths(&other.manifest));
            }
        }
        let omitted = differing.len().saturating_sub(MAX_PATHS);
        let paths: Vec<String> = differing.into_iter().take(MAX_PATHS).collect();
        let work = tempfile::Builder::new()
            .prefix("quorum-dispute-")
            .tempdir()
            .context("cannot create a temporary directory for the dispute's files")?;
        let files = self.fetch(&successes, &paths, work.path()).await?;
        let diffoscope = Diffoscope::locate(&self.state.project.disputes);
        let mut compared = 0usize;
        let mut reports = Vec::new();
        for path in paths {
            let entries: Vec<(String, Option<quorum_core::ManifestEntry>)> = successes
                .iter()
                .map(|s| {
                    let entry = s.manifest.entries.iter().find(|e| e.path == path).cloned();
                    (s.label.clone(), entry)
                })
                .collect();
            let mut pairs = Vec::new();
            let (first_label, first_entry) = &entries[0];
            for (label, entry) in &entries[1..] {
                let by = match (first_entry, entry) {
                    (None, _) => Explained::Nothing(format!("missing in {first_label}")),
                    (_, None) => Explained::Nothing(format!("missing in {label}")),
                    (Some(a), Some(b)) if a.digest == b.digest => Explained::Nothing(format!(
                        "same contents; mode {:o} and {:o}",
                        a.mode, b.mode
                    )),
                    (Some(a), Some(b)) => match (files.get(&a.digest), files.get(&b.digest)) {
                        (Some(Ok(fa)), Some(Ok(fb))) => {
                            compared += 1;
                            let run = work.path().join(format!("run-{compared}"));
                            let tool = match &diffoscope {
                                Ok(_) if compared > MAX_DIFFOSCOPE_PAIRS => Err(format!(
                                    "only the first {MAX_DIFFOSCOPE_PAIRS} pairs go to diffoscope"
                                )),
                                Ok(d) => Ok(d),
                                Err(why) => Err(why.clone()),
                            };
                            compare(tool, fa, fb, &path, first_label, label, &run).await?
                        }
                        (Some(Err(why)), _) | (_, Some(Err(why))) => {
                            Explained::Nothing(why.clone())
                        }
                        _ => Explained::Nothing("not fetched".into()),
                    },
                };
                pairs.push(Pair {
                    left: first_label.clone(),
                    right: label.clone(),
                    by,
                });
            }
            reports.push(PathReport {
                path,
                entries,
                pairs,
            });
        }
        Ok(Dispute {
            build: self.build.to_string(),
            job: self.job.to_string(),
            round: self.round,
            groups,
            failures,
            paths: reports,
            omitted,
        })
    }

    /// The round's reported results, grouped: successes by manifest (most workers first, then
    /// by digest), and the failures.
    #[allow(clippy::type_complexity)]
    async fn groups(&self) -> anyhow::Result<(Vec<Group>, Vec<Success>, Vec<(String, String)>)> {
        let assignments = db::assignments_of_build(&self.state.pool, self.build).await?;
        let mut by_manifest: BTreeMap<Digest, (Manifest, Vec<String>)> = BTreeMap::new();
        let mut failures = Vec::new();
        for a in assignments
            .iter()
            .filter(|a| a.job == self.job && a.round == self.round && a.state == "reported")
        {
            let Some(report) = a
                .report
                .as_deref()
                .and_then(|r| serde_json::from_str::<ResultReport>(r).ok())
            else {
                continue;
            };
            match report.result {
                ReportedResult::Success {
                    manifest,
                    manifest_digest,
                } => by_manifest
                    .entry(manifest_digest)
                    .or_insert_with(|| (manifest, Vec::new()))
                    .1
                    .push(a.worker_id.clone()),
                ReportedResult::Failed { reason } => failures.push((a.worker_id.clone(), reason)),
            }
        }
        let mut sorted: Vec<(Digest, (Manifest, Vec<String>))> = by_manifest.into_iter().collect();
        sorted.sort_by(|a, b| b.1.1.len().cmp(&a.1.1.len()).then(a.0.cmp(&b.0)));
        let mut groups = Vec::new();
        let mut successes = Vec::new();
        for (i, (digest, (manifest, workers))) in sorted.into_iter().enumerate() {
            let label = group_label(i);
            groups.push(Group {
                label: label.clone(),
                manifest: Some(digest),
                workers,
            });
            successes.push(Success { label, manifest });
        }
        Ok((groups, successes, failures))
    }

    /// Downloads, once each, the blobs the differing paths name (up to the size limit) into
    /// `work/blobs/`, checking each digest. Per digest: the file, or why there is none.
    async fn fetch(
        &self,
        successes: &[Success],
        paths: &[String],
        work: &Path,
    ) -> anyhow::Result<BTreeMap<Digest, Result<PathBuf, String>>> {
        let limit = self.state.project.disputes.max_file_bytes;
        let mut wanted: BTreeMap<Digest, u64> = BTreeMap::new();
        for s in successes {
            for e in s
                .manifest
                .entries
                .iter()
                .filter(|e| paths.contains(&e.path))
            {
                wanted.insert(e.digest, e.size);
            }
        }
        let mut files = BTreeMap::new();
        if wanted.is_empty() {
            return Ok(files);
        }
        let dir = work.join("blobs");
        tokio::fs::create_dir(&dir).await?;
        let token = self.read_token().await?;
        for (digest, size) in wanted {
            if size > limit {
                files.insert(
                    digest,
                    Err(format!(
                        "not compared: {size} bytes is over the {limit}-byte limit"
                    )),
                );
                continue;
            }
            let got = match self.store.get_blob(&token, self.build, &digest).await {
                Ok(bytes) if Digest::of(&bytes) == digest => bytes,
                Ok(_) => anyhow::bail!("the store's copy of {digest} does not match its digest"),
                Err(e) if self.strict => {
                    return Err(e).with_context(|| format!("cannot fetch {digest} from the store"));
                }
                Err(e) => {
                    files.insert(
                        digest,
                        Err(format!(
                            "not compared: the store did not give {digest}: {e}"
                        )),
                    );
                    continue;
                }
            };
            let path = dir.join(digest.to_string().replace(':', "-"));
            tokio::fs::write(&path, &got)
                .await
                .with_context(|| format!("cannot write {}", path.display()))?;
            files.insert(digest, Ok(path));
        }
        Ok(files)
    }

    /// A read token for this build at the store, from the controller's own IdP (its tenant).
    async fn read_token(&self) -> anyhow::Result<String> {
        let access = self.state.access_token().await?;
        let what = TokenFor {
            token_type: TOKEN_TYPE_READ,
            audience: self.state.store_audience.clone(),
            build: self.build.to_string(),
            job: None,
            assignment: None,
            lifetime_secs: 600,
            constraints: Default::default(),
        };
        Ok(self
            .state
            .idp
            .exchange(&access, &what)
            .await
            .context("cannot get a read token from the IdP")?
            .access_token)
    }
}

/// `A`..`Z`, then `G27`, `G28`, ...
fn group_label(i: usize) -> String {
    match u8::try_from(i) {
        Ok(n) if n < 26 => char::from(b'A' + n).to_string(),
        _ => format!("G{}", i + 1),
    }
}

/// Compares two fetched files: diffoscope when it is available, else (or when it fails) the
/// built-in diff, saying why.
async fn compare(
    diffoscope: Result<&Diffoscope, String>,
    a: &Path,
    b: &Path,
    path: &str,
    la: &str,
    lb: &str,
    run: &Path,
) -> anyhow::Result<Explained> {
    let why = match diffoscope {
        Ok(d) => {
            tokio::fs::create_dir(run).await?;
            match d.compare((la, a), (lb, b), path, run).await {
                Ok(c) => {
                    return Ok(Explained::Diffoscope {
                        text: c.text,
                        html: c.html,
                    });
                }
                Err(why) => why,
            }
        }
        Err(why) => why,
    };
    let (a, b) = (tokio::fs::read(a).await?, tokio::fs::read(b).await?);
    let (path, la, lb) = (path.to_string(), la.to_string(), lb.to_string());
    let text = tokio::task::spawn_blocking(move || builtin::explain(&path, &la, &a, &lb, &b))
        .await
        .context("the built-in diff panicked")?;
    Ok(Explained::Builtin { text, why })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_are_lettered_then_numbered() {
        assert_eq!(group_label(0), "A");
        assert_eq!(group_label(25), "Z");
        assert_eq!(group_label(26), "G27");
    }
}
