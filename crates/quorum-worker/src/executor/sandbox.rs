//! The namespace tier: each step runs under bubblewrap (`bwrap`) in new user, mount, pid,
//! network, UTS, IPC and cgroup namespaces, as uid/gid 1000 `build` on host `quorum-build`, with
//! only loopback, a fresh /proc, a minimal /dev, a read-only root the worker prepared
//! ([`super::root`]: a few /etc files, the `/bin` and `/lib*` links), the host's /usr bound
//! read-only, the build directory at /build (a size-limited tmpfs of the job's own with
//! `disk_bytes`) and a private, size-limited tmpfs at /tmp for each step. Nothing else of the
//! host, and nothing of the worker's data directory, is visible inside.
//!
//! The sandbox's init (bwrap, pid 1 of the step's pid namespace) is in the step's process group,
//! so the same group kill the process tier uses ends the whole namespace, including processes
//! that called `setsid` or double-forked. The owner's [`Limits`] apply through a per-step cgroup
//! the sandbox joins before exec.
//!
//! Inside, a seccomp filter ([`super::seccomp`], compiled once per executor) denies the system
//! calls builds never need with `EPERM`. bwrap reads it from a memfd each step inherits. The
//! step's first program is `quorum-sandbox-init` when the worker has it ([`super::landlock`]):
//! it adds the Landlock rules, which must come after bwrap's mounts, and executes the step.
//!
//! With the init, a sandbox can be made before its step is known: the init then waits for the
//! step's environment and command on its stdin. While a step runs, the executor starts the next
//! step's sandbox that way (a [`Spare`] in the job's slot), so that step finds everything set up
//! but the exec of its shell; the worker has the first step's started while it exports the
//! source ([`Executor::prepare`]). Each sandbox still serves one step only.

use std::ffi::OsString;
use std::future::Future;
use std::io::PipeWriter;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::AsyncWriteExt as _;

use super::cgroup::{CgroupError, Hierarchy, LimitHit, Limits, StepCgroup};
use super::disk::{self, BuildDisk};
use super::landlock::{self, INIT_NAME, LandlockTier};
use super::process::{Spawned, Supervision, inherit_fd, memfd_with, spawn_supervised, supervise};
use super::root::{Root, Roots, TOP_DIRS};
use super::seccomp::{self, SeccompError};
use super::{
    ExecError, Executor, JobSpec, Spare, SpareSlot, StepContext, StepExit, StepFuture, StepRun,
    Workspace, build_environment,
};

/// Where the build directory appears inside the sandbox; the same on every worker, so paths
/// compiled into artifacts agree.
pub const BUILD_PATH: &str = "/build";
pub(crate) const UID: u32 = 1000;
const HOSTNAME: &str = "quorum-build";
/// Where declared inputs appear, one read-only file per input.
const INPUTS_PATH: &str = "/inputs";

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error(
        "bubblewrap (bwrap) is not on PATH; install it (Debian/Ubuntu: `apt-get install \
         bubblewrap`, Fedora: `dnf install bubblewrap`) or set sandbox = \"process\" in the \
         worker config"
    )]
    BwrapMissing,
    #[error("cannot prepare the sandbox's root file system in {path}: {source}")]
    State {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
    #[error(
        "[limits] disk_bytes is set, but {0}; the worker mounts a size-limited tmpfs for each \
         job's build directory, which needs it to run as root: run it as root or remove \
         disk_bytes"
    )]
    DiskLimit(String),
    #[error("{INIT_NAME} does not work ({0}); reinstall it next to the worker's executable")]
    Init(String),
}

/// Runs steps in bubblewrap sandboxes.
#[derive(Debug)]
pub struct SandboxExecutor {
    bwrap: PathBuf,
    /// The read-only root steps start from.
    roots: Roots,
    limits: Limits,
    cgroups: Option<Hierarchy>,
    /// The compiled seccomp filter, as bwrap reads it.
    seccomp: Vec<u8>,
    /// `quorum-sandbox-init` on the host, when the worker has it.
    init: Option<PathBuf>,
    landlock: LandlockTier,
}

/// Numbers step groups; process-wide, because several executors may share one hierarchy.
static STEPS: AtomicU64 = AtomicU64::new(0);

impl SandboxExecutor {
    /// A sandbox whose prepared root lives in `state_dir` (outside any build directory).
    /// With limits that need cgroups, cgroups must be usable; without, they are used for usage
    /// figures when they are, and rusage is reported otherwise.
    pub fn new(state_dir: &Path, limits: Limits) -> Result<SandboxExecutor, SandboxError> {
        let bwrap = find_on_path("bwrap").ok_or(SandboxError::BwrapMissing)?;
        let seccomp = seccomp::program()?;
        if limits.disk_bytes.is_some() {
            disk::check(state_dir).map_err(SandboxError::DiskLimit)?;
        }
        let cgroups = match Hierarchy::detect() {
            Ok(h) => Some(h),
            Err(e) if limits.need_cgroups() => return Err(e.into()),
            Err(e) => {
                tracing::info!(error = %e, "no cgroups for build steps; usage comes from rusage");
                None
            }
        };
        let roots_dir = state_dir.join("roots");
        let roots = Roots::new(&roots_dir).map_err(|source| SandboxError::State {
            path: roots_dir,
            source,
        })?;
        let executor = SandboxExecutor {
            bwrap,
            roots,
            limits,
            cgroups,
            seccomp,
            init: None,
            landlock: LandlockTier::None,
        };
        match find_init() {
            Some(init) => executor.with_init(&init),
            None => {
                tracing::warn!(
                    "{INIT_NAME} is not next to the worker's executable nor on PATH: build \
                     steps run without Landlock"
                );
                Ok(executor)
            }
        }
    }

    /// Uses `init` as `quorum-sandbox-init` and checks which Landlock tier it reaches here.
    pub fn with_init(mut self, init: &Path) -> Result<SandboxExecutor, SandboxError> {
        let init = init
            .canonicalize()
            .map_err(|e| SandboxError::Init(format!("{}: {e}", init.display())))?;
        self.landlock = landlock::probe_init(&init).map_err(SandboxError::Init)?;
        if !matches!(self.landlock, LandlockTier::Full { .. }) {
            tracing::warn!(landlock = %self.landlock, "the kernel does not enforce every Landlock rule for build steps");
        }
        self.init = Some(init);
        Ok(self)
    }

    /// How much of the Landlock layer steps get.
    pub fn landlock(&self) -> LandlockTier {
        self.landlock
    }

    /// "cgroup v1", "cgroup v2", or `None` when steps run without cgroups.
    pub fn cgroups(&self) -> Option<&'static str> {
        self.cgroups.as_ref().map(Hierarchy::version)
    }

    /// The bwrap command for `step` in `job`, not yet supervised, and the root it binds, which
    /// must be kept until the step ends. The command owns the descriptor the seccomp filter is
    /// read from. Without a step, the init waits for one on its stdin (`--wait`), and it brings
    /// the step's environment along.
    #[allow(clippy::disallowed_methods)] // the executor is where build processes are created
    pub(crate) fn command(
        &self,
        job: &JobSpec,
        step: Option<&str>,
    ) -> std::io::Result<(Command, Arc<Root>)> {
        // Names are checked when the pipeline is parsed; a second check keeps a bind from
        // landing anywhere but directly in /inputs.
        if let Some(bad) = job
            .inputs
            .iter()
            .find(|i| i.name.is_empty() || i.name.starts_with('.') || i.name.contains('/'))
        {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("input name `{}` is not a plain file name", bad.name),
            ));
        }
        let root = self.roots.current()?;
        let mut cmd = Command::new(&self.bwrap);
        // A fresh memfd per step: bwrap reads the filter from the descriptor's offset, which
        // steps started at the same time would otherwise share.
        let filter = memfd_with(c"quorum-seccomp", &self.seccomp)?;
        let fd = inherit_fd(&mut cmd, filter);
        cmd.args(self.arguments(job, root.path(), step.is_some()))
            .arg("--seccomp")
            .arg(fd.to_string())
            .arg("--");
        if self.init.is_some() {
            cmd.args(landlock::init_arguments(Path::new(landlock::INIT_PATH)));
        }
        match (step, self.init.is_some()) {
            (Some(step), true) => cmd.arg("--").args(step_command(step)),
            (Some(step), false) => cmd.args(step_command(step)),
            (None, true) => cmd.arg("--wait"),
            (None, false) => {
                return Err(std::io::Error::other(format!(
                    "a sandbox can wait for its step only with {INIT_NAME}"
                )));
            }
        };
        cmd.env_clear().current_dir("/").stdin(Stdio::null());
        Ok((cmd, root))
    }

    fn arguments(&self, job: &JobSpec, root: &Path, with_env: bool) -> Vec<OsString> {
        let mut a: Vec<OsString> = Vec::new();
        let mut push = |args: &[&dyn AsRef<std::ffi::OsStr>]| {
            a.extend(args.iter().map(|s| s.as_ref().to_os_string()));
        };
        let uid = UID.to_string();
        push(&[
            &"--unshare-all",
            &"--unshare-user",
            // No `--disable-userns`: nested user namespaces, the usual first step of kernel
            // exploits, are the seccomp filter's to deny, and the option cost every step a
            // nested namespace of its own for the same effect.
            &"--die-with-parent",
            // No controlling terminal: TIOCSTI cannot inject input into the worker's terminal.
            &"--new-session",
            &"--cap-drop",
            &"ALL",
            &"--uid",
            &uid,
            &"--gid",
            &uid,
            &"--hostname",
            &HOSTNAME,
            // The prepared root, read-only: /etc, the /bin and /lib* links, the mount points.
            &"--ro-bind",
            &root,
            &"/",
            &"--proc",
            &"/proc",
            &"--dev",
            &"/dev",
            // POSIX shared memory works, in a tmpfs of the sandbox's own (charged to its cgroup).
            &"--tmpfs",
            &"/dev/shm",
            &"--ro-bind",
            &"/usr",
            &"/usr",
        ]);
        // Merged-/usr hosts have these as symlinks into /usr, which the root has; others have
        // directories.
        for top in TOP_DIRS {
            let host = Path::new("/").join(top);
            if host.is_dir() && !host.is_symlink() {
                push(&[&"--ro-bind", &host, &host]);
            }
        }
        if let Some(init) = &self.init {
            push(&[&"--ro-bind", init, &landlock::INIT_PATH]);
        }
        if !job.inputs.is_empty() {
            // The root is read-only, so the inputs' mount points go in a tmpfs of their own.
            push(&[&"--tmpfs", &INPUTS_PATH]);
            for input in &job.inputs {
                let inside = Path::new(INPUTS_PATH).join(&input.name);
                push(&[&"--ro-bind", &input.path, &inside]);
            }
            push(&[&"--remount-ro", &INPUTS_PATH]);
        }
        // A private /tmp per step, in the sandbox's own memory (charged to its cgroup).
        if let Some(bytes) = self.limits.tmp_bytes {
            push(&[&"--size", &bytes.to_string()]);
        }
        push(&[
            &"--tmpfs",
            &"/tmp",
            &"--bind",
            &job.build_dir,
            &BUILD_PATH,
            &"--chdir",
            &BUILD_PATH,
            // /dev is a tmpfs; its device nodes stay usable when it is read-only.
            &"--remount-ro",
            &"/dev",
            &"--clearenv",
        ]);
        if with_env {
            for (key, value) in sandbox_environment(job) {
                push(&[&"--setenv", &key, &value]);
            }
        }
        a
    }

    /// Runs `step` in the spare started for it, or in a sandbox started now when there is none
    /// (the job's first step, or no init to wait in), and meanwhile starts the spare of the
    /// job's next step.
    async fn run(&self, step: StepContext<'_>) -> Result<StepRun, ExecError> {
        // The owner's per-step limit, when it comes before the job's deadline; counted from
        // here, when the step starts, not from when its spare was made.
        let step_limit = self.limits.step_timeout_secs.and_then(|secs| {
            let until = tokio::time::Instant::now() + Duration::from_secs(secs);
            (until < step.deadline).then_some((secs, until))
        });
        let step = StepContext {
            deadline: step_limit.map_or(step.deadline, |(_, until)| until),
            ..step
        };
        let sandbox = match step.spare.take::<Sandbox>() {
            Some(spare) if !spare.process.has_ended() => *spare,
            stale => {
                // A spare whose bwrap ended before its step (it could not set up): start afresh,
                // so that the step's own sandbox says what went wrong, after the step's header.
                if let Some(stale) = stale {
                    stale.discard().await;
                }
                let command = self.init.is_none().then_some(step.command);
                self.start(step.job, step.output, step.index, command)
                    .await?
            }
        };
        let next = async {
            if self.init.is_none() || step.index >= step.job.script.len() {
                return None;
            }
            match self
                .start(step.job, step.output, step.index + 1, None)
                .await
            {
                Ok(spare) => Some(spare),
                Err(e) => {
                    // The next step starts its sandbox itself then, and reports what fails.
                    tracing::warn!(error = %e, "cannot start a spare sandbox");
                    None
                }
            }
        };
        // The step goes first (`join!` polls in order): its hand-over is written before the
        // spare's set-up begins.
        let (run, next) = tokio::join!(self.finish(sandbox, &step, step_limit), next);
        if let Some(next) = next
            && let Some(old) = step.spare.put(Box::new(next))
        {
            old.discard().await;
        }
        run
    }

    /// Starts a sandbox for step `index` of `job`, writing to `output`: the step's cgroup with
    /// the owner's limits, bwrap with the namespaces, mounts and seccomp filter, and the init
    /// restricted by Landlock and waiting for its step, or, without `command`, running it.
    async fn start(
        &self,
        job: &JobSpec,
        output: &PipeWriter,
        index: usize,
        command: Option<&str>,
    ) -> Result<Sandbox, ExecError> {
        let setup = ExecError::Setup;
        let group = match &self.cgroups {
            Some(h) => {
                let n = STEPS.fetch_add(1, Ordering::Relaxed);
                let name = format!("step-{}-{n}", std::process::id());
                Some(
                    StepCgroup::create(h, &name, &self.limits)
                        .map_err(|e| setup(std::io::Error::other(e)))?,
                )
            }
            None => None,
        };
        let cgroups = match &group {
            Some(g) => g
                .procs_files()
                .map_err(|e| setup(std::io::Error::other(e)))?,
            None => Vec::new(),
        };
        let (mut cmd, root) = self.command(job, command).map_err(setup)?;
        let handover = match command {
            Some(_) => None,
            None => {
                let (reader, writer) = std::io::pipe().map_err(setup)?;
                cmd.stdin(reader);
                Some(writer)
            }
        };
        supervise(
            &mut cmd,
            Supervision {
                nice: self.limits.nice,
                cgroups,
            },
        );
        let process = spawn_supervised(cmd, output, index).await?;
        Ok(Sandbox {
            process,
            handover,
            group,
            _root: root,
        })
    }

    /// Hands `step` to the waiting init of `sandbox` (if it is not running its step already),
    /// waits for the step, and reads what it used from its cgroup.
    async fn finish(
        &self,
        sandbox: Sandbox,
        step: &StepContext<'_>,
        step_limit: Option<(u64, tokio::time::Instant)>,
    ) -> Result<StepRun, ExecError> {
        let Sandbox {
            process,
            handover,
            group,
            _root,
        } = sandbox;
        let spawn_err = |source| ExecError::Spawn {
            step: step.index,
            source,
        };
        let message = match &handover {
            Some(_) => Some(
                landlock::handover_message(
                    &sandbox_environment(step.job),
                    &step_command(step.command),
                )
                .map_err(|e| spawn_err(std::io::Error::new(std::io::ErrorKind::InvalidInput, e)))?,
            ),
            None => None,
        };
        let hand_over = async move {
            let (Some(pipe), Some(message)) = (handover, message) else {
                return Ok(());
            };
            let mut pipe = tokio::net::unix::pipe::Sender::from_owned_fd(pipe.into())?;
            pipe.write_all(&message).await
            // Closing the pipe here is the end of the message for the init.
        };
        let (handed, run) = tokio::join!(hand_over, process.wait(step));
        let mut run = run?;
        // The init never runs a step it did not get whole: unless the step was stopped while it
        // waited, nothing ran, whatever the init exited with.
        if let Err(e) = handed
            && !matches!(run.exit, StepExit::TimedOut | StepExit::Cancelled)
        {
            return Err(spawn_err(e));
        }
        if let Some(group) = group {
            let usage = tokio::task::spawn_blocking(move || {
                let usage = group.usage();
                group.remove();
                usage
            })
            .await
            .map_err(|e| ExecError::Setup(std::io::Error::other(e)))?;
            run.cpu = usage.cpu.unwrap_or(run.cpu);
            if let Some(peak) = usage.peak_memory_bytes {
                run.peak_rss_kib = peak / 1024;
            }
            // A limit explains a failure; a step that hit a limit and still succeeded is fine.
            if !matches!(
                run.exit,
                StepExit::Exited(0) | StepExit::TimedOut | StepExit::Cancelled
            ) {
                run.limit = usage.limit;
            }
        }
        // The deadline that passed was the step's own, not the job's: a limit, not a timeout.
        if let (StepExit::TimedOut, Some((secs, _))) = (run.exit, step_limit) {
            run.exit = StepExit::Signaled(libc::SIGKILL);
            run.limit = Some(LimitHit::StepTime { secs });
        }
        Ok(run)
    }
}

/// A started sandbox: bwrap's namespaces, mounts and seccomp filter in place, inside the step's
/// cgroup, with the init restricted by Landlock and waiting for its step on `handover` (or,
/// without one, running the step it was started with). As a [`Spare`] it serves one step.
struct Sandbox {
    /// First, so that dropping the sandbox kills its processes before the cgroup goes.
    process: Spawned,
    handover: Option<PipeWriter>,
    group: Option<StepCgroup>,
    /// The root bwrap binds, kept until the sandbox is gone.
    _root: Arc<Root>,
}

impl Spare for Sandbox {
    fn discard(self: Box<Self>) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        let Sandbox {
            process,
            handover,
            group,
            _root,
        } = *self;
        Box::pin(async move {
            process.kill().await;
            drop(handover);
            if let Some(group) = group {
                let _ = tokio::task::spawn_blocking(move || group.remove()).await;
            }
        })
    }
}

/// The step's command line inside the sandbox.
fn step_command(step: &str) -> [&str; 4] {
    ["/bin/sh", "-e", "-c", step]
}

impl Executor for SandboxExecutor {
    fn name(&self) -> &'static str {
        "namespaces"
    }

    /// For example "namespaces, seccomp, landlock ABI 7, cgroup v1, disk 1073741824 bytes".
    fn description(&self) -> String {
        let mut layers = format!(
            "namespaces, seccomp, {}, {}",
            self.landlock,
            self.cgroups().unwrap_or("no cgroups")
        );
        if let Some(bytes) = self.limits.disk_bytes {
            layers.push_str(&format!(", disk {bytes} bytes"));
        }
        layers
    }

    fn run_step<'a>(&'a self, step: StepContext<'a>) -> StepFuture<'a> {
        Box::pin(self.run(step))
    }

    fn prepare<'a>(
        &'a self,
        job: &'a JobSpec,
        output: &'a PipeWriter,
        spare: &'a SpareSlot,
    ) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>> {
        Box::pin(async move {
            if self.init.is_none() || job.script.is_empty() {
                return;
            }
            match self.start(job, output, 1, None).await {
                Ok(sandbox) => {
                    if let Some(old) = spare.put(Box::new(sandbox)) {
                        old.discard().await;
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot start a spare sandbox"),
            }
        })
    }

    fn workspace(&self, job_dir: &Path) -> Result<Workspace, ExecError> {
        let mut workspace = Workspace::plain(job_dir).map_err(ExecError::Setup)?;
        if let Some(bytes) = self.limits.disk_bytes {
            workspace.disk =
                Some(BuildDisk::mount(&workspace.build_dir, bytes).map_err(ExecError::Setup)?);
        }
        Ok(workspace)
    }
}

/// The allow-listed environment with the sandbox's fixed paths for HOME and TMPDIR.
pub fn sandbox_environment(job: &JobSpec) -> Vec<(&'static str, String)> {
    build_environment(job)
        .into_iter()
        .map(|(key, value)| match key {
            "HOME" => (key, BUILD_PATH.to_string()),
            "TMPDIR" => (key, "/tmp".to_string()),
            _ => (key, value),
        })
        .collect()
}

/// `quorum-sandbox-init` next to the worker's own executable, or else on PATH, or else the
/// worker's own executable when it is a multi-call binary that can act as the init.
fn find_init() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok();
    exe.as_ref()
        .and_then(|exe| Some(exe.parent()?.join(INIT_NAME)))
        .filter(|p| p.is_file())
        .or_else(|| find_on_path(INIT_NAME))
        .or_else(|| exe.filter(|_| landlock::is_multicall()))
}

/// The first executable `name` in the worker's PATH.
pub(crate) fn find_on_path(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt as _;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| {
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}
