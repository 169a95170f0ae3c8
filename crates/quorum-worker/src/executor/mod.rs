//! Runs a job's steps: the only place in Quorum that spawns build processes.
//!
//! [`run_job`] owns what every tier shares: the step order, one job-wide deadline, the allow-listed
//! environment, and one output pipe per job whose bytes go to the log in the order they were
//! written. An [`Executor`] runs one step and guarantees that nothing it started outlives the step.
//! [`ProcessExecutor`] runs steps as plain processes of the worker's user; [`SandboxExecutor`] runs
//! each step in its own namespaces (bubblewrap), under a seccomp filter, within the owner's cgroup
//! [`Limits`]; a VM would be a third `Executor` behind the same seam. [`probe()`] picks what the
//! host supports at start. A tier may start the next step's sandbox while a step runs and keep it
//! in the job's [`SpareSlot`], so that a step does not wait for its sandbox's set-up.

use std::future::Future;
use std::io::{PipeReader, PipeWriter, Write as _};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::Duration;

use tokio::io::AsyncReadExt as _;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

mod cgroup;
mod disk;
pub mod landlock;
mod probe;
mod process;
mod root;
mod sandbox;
mod seccomp;

pub use cgroup::{CgroupError, LimitHit, Limits};
pub use disk::release_stale_mounts;
pub use landlock::LandlockTier;
pub use probe::{ProbeError, SandboxTier, probe};
pub use process::ProcessExecutor;
pub use sandbox::{BUILD_PATH, SandboxError, SandboxExecutor, sandbox_environment};
pub use seccomp::SeccompError;

/// Everything a tier needs to run one job.
#[derive(Debug, Clone)]
pub struct JobSpec {
    /// The exported source tree; steps run here.
    pub build_dir: PathBuf,
    /// The job's own temporary directory (`TMPDIR`), inside the job directory, for the process
    /// tier; the sandbox gives each step a private tmpfs at /tmp instead.
    pub tmp_dir: PathBuf,
    pub source_date_epoch: i64,
    pub script: Vec<String>,
    /// For all steps together.
    pub timeout: Duration,
    /// Verified declared inputs, bound read-only at `/inputs/<name>` (namespace tier only).
    pub inputs: Vec<MountedInput>,
}

/// A declared input the worker has verified (`crate::inputs`), as a tier mounts it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountedInput {
    /// The file's name under `/inputs`.
    pub name: String,
    /// The verified file on the host.
    pub path: PathBuf,
}

/// Where one job's files live, made by [`Executor::workspace`] before its source is exported
/// into `build_dir`. Dropping it releases what the tier set up for the job (the sandbox's
/// size-limited build directory); the caller removes the files.
#[derive(Debug)]
pub struct Workspace {
    pub build_dir: PathBuf,
    pub tmp_dir: PathBuf,
    disk: Option<disk::BuildDisk>,
}

impl Workspace {
    /// `job_dir/src` and `job_dir/tmp` as plain directories.
    fn plain(job_dir: &Path) -> std::io::Result<Workspace> {
        let workspace = Workspace {
            build_dir: job_dir.join("src"),
            tmp_dir: job_dir.join("tmp"),
            disk: None,
        };
        std::fs::create_dir_all(&workspace.build_dir)?;
        std::fs::create_dir_all(&workspace.tmp_dir)?;
        Ok(workspace)
    }

    /// Whether `build_dir` is a size-limited file system of its own.
    pub fn has_disk_limit(&self) -> bool {
        self.disk.is_some()
    }
}

/// The whole environment of a step: nothing of the worker's own environment is passed on.
pub fn build_environment(job: &JobSpec) -> Vec<(&'static str, String)> {
    vec![
        ("SOURCE_DATE_EPOCH", job.source_date_epoch.to_string()),
        ("TZ", "UTC".into()),
        ("LANG", "C.UTF-8".into()),
        ("LC_ALL", "C.UTF-8".into()),
        ("HOME", "/nonexistent".into()),
        ("PATH", "/usr/local/bin:/usr/bin:/bin".into()),
        ("USER", "build".into()),
        ("LOGNAME", "build".into()),
        ("PYTHONHASHSEED", "0".into()),
        ("TMPDIR", job.tmp_dir.display().to_string()),
    ]
}

/// One step, as handed to an [`Executor`].
#[derive(Debug)]
pub struct StepContext<'a> {
    pub job: &'a JobSpec,
    /// 1-based, as shown to users.
    pub index: usize,
    pub command: &'a str,
    /// Both stdout and stderr of the step go here.
    pub output: &'a PipeWriter,
    /// The job's deadline: at this instant the step's whole process tree is killed.
    pub deadline: Instant,
    /// Cancelled on worker shutdown or when the controller says stop: kill the step.
    pub cancel: &'a CancellationToken,
    /// Where the tier keeps a sandbox it started ahead for the job's next step.
    pub spare: &'a SpareSlot,
}

/// A sandbox started ahead of the step that will run in it, waiting for that step's command.
/// It is used by one step at most (taking it out of its [`SpareSlot`] moves it), and dropping
/// or discarding it unused kills it with everything in it.
pub trait Spare: std::any::Any + Send {
    /// Kills the sandbox and everything in it, and returns once all of it is gone.
    fn discard(self: Box<Self>) -> Pin<Box<dyn Future<Output = ()> + Send>>;
}

/// One job's place for a [`Spare`]: a tier puts in the sandbox it started for the next step while
/// this one runs, and takes it out when that step comes. [`run_job`] owns it and discards what is
/// left in it when the job ends, however it ends, so no spare outlives its job.
#[derive(Default)]
pub struct SpareSlot(std::sync::Mutex<Option<Box<dyn Spare>>>);

impl SpareSlot {
    /// Keeps `spare` for the next step; one that was already there is returned.
    pub fn put(&self, spare: Box<dyn Spare>) -> Option<Box<dyn Spare>> {
        self.lock().replace(spare)
    }

    /// The spare, when there is one of type `T` (another tier's spare stays where it is).
    pub fn take<T: Spare>(&self) -> Option<Box<T>> {
        let mut slot = self.lock();
        let ours = slot.as_deref().is_some_and(|spare| {
            let spare: &dyn std::any::Any = spare;
            spare.is::<T>()
        });
        if !ours {
            return None;
        }
        let spare: Box<dyn std::any::Any + Send> = slot.take()?;
        spare.downcast::<T>().ok()
    }

    /// Kills the spare, if there is one, and waits until it is gone.
    pub async fn discard(&self) {
        let spare = self.lock().take();
        if let Some(spare) = spare {
            spare.discard().await;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Box<dyn Spare>>> {
        // A panic while holding the lock cannot leave the Option half-written.
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl std::fmt::Debug for SpareSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let full = self.lock().is_some();
        f.debug_struct("SpareSlot").field("full", &full).finish()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepExit {
    Exited(i32),
    Signaled(i32),
    TimedOut,
    Cancelled,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepRun {
    pub exit: StepExit,
    /// User plus system time of the step and the descendants it waited for.
    pub cpu: Duration,
    pub peak_rss_kib: u64,
    /// The owner's limit the step ran into, when it failed because of one.
    pub limit: Option<LimitHit>,
}

pub type StepFuture<'a> = Pin<Box<dyn Future<Output = Result<StepRun, ExecError>> + Send + 'a>>;

/// An isolation tier. Boxed futures keep it object safe, so the tier is chosen at run time.
pub trait Executor: Send + Sync {
    /// Recorded with each result (`EnvironmentFacts::executor`).
    fn name(&self) -> &'static str;
    /// The isolation layers in force, recorded with each result (`EnvironmentFacts::sandbox`).
    fn description(&self) -> String {
        self.name().to_string()
    }
    /// Runs one step to its end. When it returns, no process the step started may be left.
    fn run_step<'a>(&'a self, step: StepContext<'a>) -> StepFuture<'a>;
    /// Creates the directories of a job in `job_dir` (which must exist).
    fn workspace(&self, job_dir: &Path) -> Result<Workspace, ExecError> {
        Workspace::plain(job_dir).map_err(ExecError::Setup)
    }
    /// Starts the sandbox of `job`'s first step ahead, writing to `output`, and keeps it in
    /// `spare` for [`Executor::run_step`]; tiers with nothing to start ahead do nothing. A
    /// failure is not reported here: the step then starts its own sandbox and says what failed.
    fn prepare<'a>(
        &'a self,
        _job: &'a JobSpec,
        _output: &'a PipeWriter,
        _spare: &'a SpareSlot,
    ) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>> {
        Box::pin(std::future::ready(()))
    }
}

/// The executor itself failed; the build did not get to run (or to finish) for the worker's sake.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("cannot prepare the job: {0}")]
    Setup(std::io::Error),
    #[error("cannot start step {step}: {source}")]
    Spawn { step: usize, source: std::io::Error },
    #[error("cannot wait for step {step}: {source}")]
    Wait { step: usize, source: std::io::Error },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobStatus {
    Succeeded,
    /// A step exited non-zero or was killed by a signal it did not get from us.
    Failed {
        index: usize,
        step: String,
        exit: StepExit,
    },
    /// A step failed after running into one of the worker owner's limits.
    LimitExceeded {
        index: usize,
        step: String,
        limit: LimitHit,
    },
    TimedOut {
        secs: u64,
    },
    Cancelled,
}

impl JobStatus {
    /// What went wrong, in the words reported to the controller; `None` on success.
    pub fn failure_reason(&self) -> Option<String> {
        match self {
            JobStatus::Succeeded => None,
            JobStatus::Failed { index, step, exit } => Some(match exit {
                StepExit::Exited(code) => {
                    format!("step {index} (`{step}`) exited with status {code}")
                }
                StepExit::Signaled(sig) => {
                    format!("step {index} (`{step}`) was killed by signal {sig}")
                }
                // run_job reports these as TimedOut and Cancelled, never as a failed step.
                StepExit::TimedOut | StepExit::Cancelled => {
                    format!("step {index} (`{step}`) was stopped")
                }
            }),
            JobStatus::LimitExceeded { index, step, limit } => {
                Some(format!("step {index} (`{step}`) was stopped by {limit}"))
            }
            JobStatus::TimedOut { secs } => Some(format!("timed out after {secs} s")),
            JobStatus::Cancelled => Some("cancelled".into()),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobOutcome {
    pub status: JobStatus,
    pub wall: Duration,
    pub cpu: Duration,
    pub peak_rss_kib: u64,
}

/// How long output may keep arriving after the last step ended. Only a process that left its
/// step's process group can still hold the pipe open then; its output is dropped.
const OUTPUT_GRACE: Duration = Duration::from_secs(2);

/// A job's output pipe and spare slot, made before the job runs, so that its first step's
/// sandbox can be started while the worker still fetches the source ([`JobStart::prepare`]).
/// Dropping it unused kills that sandbox.
#[derive(Debug)]
pub struct JobStart {
    reader: PipeReader,
    writer: PipeWriter,
    spare: SpareSlot,
}

impl JobStart {
    pub fn new() -> Result<JobStart, ExecError> {
        let (reader, writer) = std::io::pipe().map_err(ExecError::Setup)?;
        Ok(JobStart {
            reader,
            writer,
            spare: SpareSlot::default(),
        })
    }

    /// Has `executor` start the sandbox of `job`'s first step now, if its tier can. `job` must
    /// be the job later run with [`run_started_job`], its inputs verified and its build
    /// directory in place (the source may still be arriving in it).
    pub async fn prepare(&self, executor: &dyn Executor, job: &JobSpec) {
        executor.prepare(job, &self.writer, &self.spare).await;
    }

    /// Kills the first step's sandbox, if one was started, and waits until it is gone.
    pub async fn discard(self) {
        self.spare.discard().await;
    }
}

/// Runs `job`'s steps in order with `executor` until one fails, the deadline passes or `cancel`
/// fires. Output, a `$ <step>` header per step and a closing note on failure go to `log`.
pub async fn run_job(
    executor: &dyn Executor,
    job: &JobSpec,
    log: mpsc::Sender<Vec<u8>>,
    cancel: &CancellationToken,
) -> Result<JobOutcome, ExecError> {
    run_started_job(executor, job, JobStart::new()?, log, cancel).await
}

/// [`run_job`] with the output pipe and spare slot of `start`, in which the first step's sandbox
/// may be waiting.
pub async fn run_started_job(
    executor: &dyn Executor,
    job: &JobSpec,
    start: JobStart,
    log: mpsc::Sender<Vec<u8>>,
    cancel: &CancellationToken,
) -> Result<JobOutcome, ExecError> {
    // A spare holds the output pipe too, and the log ends only when every writer is gone: the
    // job's end discards `spare` before it drops `writer`.
    let JobStart {
        reader,
        writer,
        spare,
    } = start;
    if let Err(e) = tokio::fs::create_dir_all(&job.tmp_dir).await {
        spare.discard().await;
        return Err(ExecError::Setup(e));
    }
    let mut forwarder = tokio::spawn(forward(reader, log.clone()));
    let started = Instant::now();
    let deadline = started + job.timeout;
    let mut outcome = JobOutcome {
        status: JobStatus::Succeeded,
        wall: Duration::ZERO,
        cpu: Duration::ZERO,
        peak_rss_kib: 0,
    };
    let timed_out = JobStatus::TimedOut {
        secs: job.timeout.as_secs(),
    };
    for (i, command) in job.script.iter().enumerate() {
        let index = i + 1;
        if cancel.is_cancelled() {
            outcome.status = JobStatus::Cancelled;
            break;
        }
        if Instant::now() >= deadline {
            outcome.status = timed_out.clone();
            break;
        }
        write_header(&writer, command)
            .await
            .map_err(ExecError::Setup)?;
        let run = executor
            .run_step(StepContext {
                job,
                index,
                command,
                output: &writer,
                deadline,
                cancel,
                spare: &spare,
            })
            .await;
        let run = match run {
            Ok(run) => run,
            Err(e) => {
                spare.discard().await;
                return Err(e);
            }
        };
        outcome.cpu += run.cpu;
        outcome.peak_rss_kib = outcome.peak_rss_kib.max(run.peak_rss_kib);
        outcome.status = match run.exit {
            StepExit::Exited(0) => continue,
            StepExit::TimedOut => timed_out.clone(),
            StepExit::Cancelled => JobStatus::Cancelled,
            exit => match run.limit {
                Some(limit) => JobStatus::LimitExceeded {
                    index,
                    step: command.clone(),
                    limit,
                },
                None => JobStatus::Failed {
                    index,
                    step: command.clone(),
                    exit,
                },
            },
        };
        break;
    }
    outcome.wall = started.elapsed();
    // A spare left for a step that will not run: the job has ended, and so does the spare.
    spare.discard().await;
    drop(writer);
    if tokio::time::timeout(OUTPUT_GRACE, &mut forwarder)
        .await
        .is_err()
    {
        forwarder.abort();
        let _ = log
            .send(b"\n[quorum: output from processes that left their step was dropped]\n".to_vec())
            .await;
    }
    if let Some(reason) = outcome.status.failure_reason() {
        let _ = log
            .send(format!("\n[quorum: {reason}]\n").into_bytes())
            .await;
    }
    Ok(outcome)
}

/// Writes the step header into the pipe itself, so it lands between the previous step's output
/// and this step's. A blocking write: off the async threads.
async fn write_header(writer: &PipeWriter, command: &str) -> std::io::Result<()> {
    let writer = writer.try_clone()?;
    let header = format!("$ {command}\n");
    tokio::task::spawn_blocking(move || (&writer).write_all(header.as_bytes()))
        .await
        .map_err(std::io::Error::other)?
}

/// Copies the pipe into `log` until every writer is gone. A full log queue slows the copy down
/// rather than losing bytes; a closed one is drained into nothing so steps never block on output.
async fn forward(reader: PipeReader, log: mpsc::Sender<Vec<u8>>) -> std::io::Result<()> {
    let mut pipe = tokio::net::unix::pipe::Receiver::from_owned_fd(reader.into())?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut log = Some(log);
    loop {
        let n = pipe.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        if let Some(tx) = &log
            && tx.send(buf[..n].to_vec()).await.is_err()
        {
            log = None;
        }
    }
}
