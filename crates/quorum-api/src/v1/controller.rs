//! Controller endpoints. Worker-facing routes (`/api/v1/workers/...`, `/api/v1/assignments/...`)
//! are authenticated by the worker's signature (see `worker_auth`); user-facing routes
//! (`/api/v1/builds...`) by the controller's API token as a bearer token.

use std::collections::BTreeMap;

use quorum_core::pipeline::Policy;
use quorum_core::verdict::Outcome;
use quorum_core::{Digest, Manifest};
use serde::{Deserialize, Serialize};

/// `POST /api/v1/workers/enroll`, unauthenticated but needs a single-use enrollment token made
/// by the controller's operator. Owner, trust and labels come from that token, not the worker.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct EnrollRequest {
    pub enrollment_token: String,
    /// The worker's name, which is also the audience its job tokens must carry.
    pub name: String,
    /// Raw Ed25519 public key, base64.
    pub public_key: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct EnrollResponse {
    pub worker_id: String,
    pub owner: String,
}

/// `POST /api/v1/workers/poll`, worker: long poll for work. Answers `200` with an [`Assignment`]
/// as soon as one is offered, or `204` after `wait_ms` with none.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PollRequest {
    pub wait_ms: u64,
    /// How many more jobs the worker can take now.
    pub capacity: u32,
}

/// One job handed to one worker.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Assignment {
    pub id: String,
    pub build_id: String,
    pub job: String,
    pub tenant: String,
    pub repository: String,
    pub commit: String,
    pub source_date_epoch: i64,
    pub script: Vec<String>,
    pub artifacts: Vec<String>,
    pub timeout_secs: u64,
    /// Files the job declared besides its source (URL + pinned SHA-256): the worker downloads
    /// and verifies them outside the sandbox and mounts them read-only at `/inputs/<name>`.
    #[serde(default)]
    pub inputs: Vec<quorum_core::pipeline::Input>,
    /// Token for this worker (audience `worker:<name>`): checked against the IdPs the worker trusts.
    pub job_token: String,
    /// Token for the store (audience the store): lets this assignment upload and record a manifest.
    pub upload_token: String,
    pub store_url: String,
    /// Heartbeat at least this often, or the assignment is given to another worker.
    pub lease_secs: u64,
}

/// `POST /api/v1/assignments/{id}/refuse`, worker: the worker will not run this assignment
/// (for example, its job token does not verify). The controller gives the job to another worker.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RefuseRequest {
    pub reason: String,
    /// The worker is busy or stopping, not objecting to the job: it may be offered the job again.
    #[serde(default)]
    pub busy: bool,
}

/// `POST /api/v1/assignments/{id}/heartbeat`, worker: renews the lease.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct HeartbeatResponse {
    /// The assignment was cancelled or lost: stop the build.
    pub stop: bool,
}

// `POST /api/v1/assignments/{id}/log?offset=N`, worker, body = raw log bytes starting at byte
// `offset` of the job's log. Resending a range is harmless.

/// `POST /api/v1/assignments/{id}/result[?take=1]`, worker. Answers `204` once the report is
/// recorded. With `take=1` (the worker has a slot free again), the controller also hands over
/// the worker's next waiting offer, if one is waiting, as `200` with an [`Assignment`], exactly
/// as a poll would: a worker with queued work goes on without a poll of its own.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SignedReport {
    /// The [`ResultReport`] as JSON text, exactly the bytes that were signed.
    pub report: String,
    /// Base64 Ed25519 signature over `worker_auth::report_message(report)`.
    pub signature: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ResultReport {
    pub assignment: String,
    pub build_id: String,
    pub job: String,
    pub worker: String,
    pub result: ReportedResult,
    pub usage: Usage,
    pub environment: EnvironmentFacts,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ReportedResult {
    /// Every step exited 0; the outputs were uploaded and recorded under this manifest.
    Success {
        manifest: Manifest,
        manifest_digest: Digest,
    },
    /// A step failed or the job timed out.
    Failed { reason: String },
}

impl ReportedResult {
    pub fn outcome(&self) -> Outcome {
        match self {
            ReportedResult::Success {
                manifest_digest, ..
            } => Outcome::Success {
                manifest: *manifest_digest,
            },
            ReportedResult::Failed { .. } => Outcome::Failed,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct Usage {
    pub wall_ms: u64,
    pub cpu_ms: u64,
    pub peak_rss_kib: u64,
    pub bytes_uploaded: u64,
}

/// Facts about the worker's environment, recorded with each result so a dispute can be explained.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct EnvironmentFacts {
    pub kernel: String,
    pub arch: String,
    pub cpus: u32,
    pub executor: String,
    /// The CPU's model name, as `/proc/cpuinfo` gives it.
    #[serde(default)]
    pub cpu_model: String,
    /// The isolation layers steps ran under, e.g. "namespaces, seccomp, landlock ABI 7, cgroup v1".
    #[serde(default)]
    pub sandbox: String,
    /// `bwrap --version` for the namespace tier; empty otherwise.
    #[serde(default)]
    pub bubblewrap: String,
    /// The host system whose /usr the steps see (`PRETTY_NAME` of /etc/os-release).
    #[serde(default)]
    pub os: String,
    /// Identity of that root file system: `sha256:` over /etc/os-release and the package
    /// database (/var/lib/dpkg/status, or /var/lib/rpm/rpmdb.sqlite, when present), so two
    /// workers with the same digest built with the same packages installed.
    #[serde(default)]
    pub root_fs: String,
}

/// `POST /api/v1/builds`, API token: build `repository` at `rev`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SubmitBuild {
    pub repository: String,
    #[serde(default = "default_rev")]
    pub rev: String,
}

fn default_rev() -> String {
    "HEAD".into()
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BuildCreated {
    pub build_id: String,
    pub commit: String,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum BuildState {
    Running,
    Verified,
    Disputed,
    Failed,
    Cancelled,
}

impl BuildState {
    pub fn is_final(self) -> bool {
        !matches!(self, BuildState::Running)
    }
    pub fn as_str(self) -> &'static str {
        match self {
            BuildState::Running => "running",
            BuildState::Verified => "verified",
            BuildState::Disputed => "disputed",
            BuildState::Failed => "failed",
            BuildState::Cancelled => "cancelled",
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Waiting for the jobs it needs, or for workers.
    Queued,
    Running,
    /// Some identical results are in, but not yet enough for the policy.
    Provisional,
    Verified,
    Disputed,
    Failed,
    /// A job it needs did not verify, so it never ran.
    Skipped,
    Cancelled,
}

impl JobState {
    pub fn is_final(self) -> bool {
        matches!(
            self,
            JobState::Verified
                | JobState::Disputed
                | JobState::Failed
                | JobState::Skipped
                | JobState::Cancelled
        )
    }
}

/// `GET /api/v1/builds/{id}`, API token.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BuildStatus {
    pub id: String,
    pub state: BuildState,
    pub repository: String,
    pub commit: String,
    pub created_at: String,
    pub finished_at: Option<String>,
    pub jobs: Vec<JobStatus>,
    /// Whether a signed statement exists (`GET /api/v1/builds/{id}/statement`).
    pub signed: bool,
    /// Review flags on this build's jobs, cleared ones included.
    #[serde(default)]
    pub flags: Vec<ReviewFlag>,
    /// The spot checks drawn for this build's verified jobs.
    #[serde(default)]
    pub spot_checks: Vec<SpotCheckStatus>,
    /// Trusted rebuilds requested to break this build's disputes.
    #[serde(default)]
    pub rebuilds: Vec<RebuildStatus>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct JobStatus {
    pub name: String,
    pub state: JobState,
    pub policy: Policy,
    /// Why a job is waiting or why it ended as it did, in words.
    pub detail: String,
    pub manifest: Option<Digest>,
    pub assignments: Vec<AssignmentStatus>,
    /// For a dispute: the paths whose contents differ between the groups of results.
    pub differing_paths: Vec<String>,
    /// For a dispute: the report explaining it (`GET .../jobs/{job}/diff`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dispute_report: Option<DisputeReport>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AssignmentStatus {
    pub id: String,
    pub worker: String,
    pub owner: String,
    pub trusted: bool,
    pub state: String,
    pub outcome: Option<Outcome>,
    pub detail: Option<String>,
    pub usage: Option<Usage>,
    #[serde(default)]
    pub purpose: AssignmentPurpose,
}

/// `GET /api/v1/builds/{id}/artifacts`, API token: the verified artifacts and a read token to
/// fetch them from the store directly.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ArtifactList {
    pub store_url: String,
    pub read_token: String,
    pub artifacts: Vec<Artifact>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Artifact {
    pub job: String,
    pub path: String,
    pub mode: u32,
    pub size: u64,
    pub digest: Digest,
    pub manifest: Digest,
}

/// `GET /api/v1/signer/keys`, unauthenticated: the public keys that sign or signed this
/// controller's statements, by key id: the active key and every retired one not revoked, so
/// statements signed before a rotation keep verifying. A revoked key is left out.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SignerKeys {
    /// key id -> raw Ed25519 public key, base64.
    pub keys: BTreeMap<String, String>,
    /// The key id new statements are signed with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active: Option<String>,
}

/// `GET /api/v1/builds/{id}/logs/{job}?worker=W&offset=N`, API token: the log bytes from
/// `offset`. The response header `x-quorum-log-complete: true` says no more will come.
pub const HEADER_LOG_COMPLETE: &str = "x-quorum-log-complete";

/// `GET /api/v1/usage?tenant=T&limit=N`, API token: what workers reported using for this
/// controller's builds (summed from their signed reports), per tenant and per build, the most
/// recent `limit` builds (default 100). Only reported results count; `tenant` narrows both lists.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct UsageView {
    pub tenants: Vec<TenantUsage>,
    pub builds: Vec<BuildUsage>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TenantUsage {
    pub tenant: String,
    pub builds: u64,
    pub totals: UsageTotals,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BuildUsage {
    pub build_id: String,
    pub tenant: String,
    pub repository: String,
    pub state: BuildState,
    pub created_at: String,
    pub totals: UsageTotals,
}

/// Sums over reported results: wall and CPU time and bytes uploaded add up; the peak is the
/// largest any one result reported.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct UsageTotals {
    pub results: u64,
    pub wall_ms: u64,
    pub cpu_ms: u64,
    pub peak_rss_kib: u64,
    pub bytes_uploaded: u64,
}

/// Why an assignment was made.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum AssignmentPurpose {
    /// One of the job's round: its result counts toward the verdict.
    #[default]
    Quorum,
    /// A trusted rebuild an operator asked for to break a dispute.
    TieBreak,
    /// A trusted rebuild of a verified job, drawn by its policy's `spot_check` rate: compared
    /// with the verified result, never counted toward it.
    SpotCheck,
}

/// `POST /api/v1/builds/{id}/jobs/{job}/rebuild`, API token: asks a trusted worker to rebuild a
/// disputed job. If its result agrees with one side and that side, counting it, meets the
/// policy, the job verifies and the build goes on; the dispute's record stays. `202`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RebuildRequest {
    /// Must be true: only a trusted worker's rebuild can break a tie.
    pub trusted: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RebuildStatus {
    pub job: String,
    pub round: i64,
    /// `requested`, `running` or `done`.
    pub state: String,
    pub assignment: Option<String>,
    pub detail: String,
    pub requested_at: String,
    pub finished_at: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SpotCheckStatus {
    pub job: String,
    /// The recorded draw, uniform in [0, 1000000): the job is checked when below `rate_ppm`.
    pub draw: u32,
    pub rate_ppm: u32,
    /// `not_drawn`, `due`, `running`, `matched`, `mismatched` or `abandoned`.
    pub state: String,
    pub assignment: Option<String>,
    pub detail: String,
}

/// A verified job flagged for an operator's review: why, and the evidence. Not a score: it says
/// what a trusted rebuild found and which workers produced the result in question.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReviewFlag {
    pub id: String,
    pub build_id: String,
    pub job: String,
    pub reason: String,
    pub evidence: FlagEvidence,
    pub created_at: String,
    pub cleared_at: Option<String>,
    pub cleared_note: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FlagEvidence {
    /// The spot check that found the mismatch: its build and job, the trusted worker and what
    /// it produced.
    pub checked_build: String,
    pub checked_job: String,
    pub trusted_worker: String,
    pub trusted_outcome: Outcome,
    /// What the checked job was verified with, and by which workers.
    pub checked_manifest: Digest,
    pub checked_workers: Vec<String>,
    /// The flagged job's verified manifest, and which of the checked job's workers were among
    /// the ones that produced it.
    pub manifest: Digest,
    pub workers: Vec<String>,
}

/// `GET /api/v1/review?all=BOOL`, API token: review flags, oldest first; open ones only unless
/// `all`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReviewList {
    pub flags: Vec<ReviewFlag>,
}

/// `POST /api/v1/review/{id}/clear`, API token: an operator closes a flag, saying why. `204`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ClearFlag {
    pub note: String,
}

/// `GET /api/v1/builds/{id}/jobs/{job}/diff[?format=html]`, API token: the report explaining a
/// disputed job (plain text, or HTML with `format=html`). The controller writes it in the
/// background after the dispute; until then the route answers `409`. The header names what
/// produced it: [`DIFF_TOOL_DIFFOSCOPE`] or [`DIFF_TOOL_BUILTIN`].
pub const HEADER_DIFF_TOOL: &str = "x-quorum-diff-tool";
/// Every pair of differing files present on both sides was compared by diffoscope.
pub const DIFF_TOOL_DIFFOSCOPE: &str = "diffoscope";
/// The controller's own file-level diff (diffoscope absent, failed or timed out on some pair).
pub const DIFF_TOOL_BUILTIN: &str = "built-in";

/// In a job's status: a disputed job's explanation, `quorum diff BUILD JOB` prints it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DisputeReport {
    /// The report is written; `false` while the controller still prepares it.
    pub ready: bool,
    /// [`DIFF_TOOL_DIFFOSCOPE`] or [`DIFF_TOOL_BUILTIN`], once ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool: Option<String>,
}
