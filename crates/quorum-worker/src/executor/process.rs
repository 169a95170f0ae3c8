//! The process tier: each step is `/bin/sh -e -c <step>` as the worker's own user, in a session
//! of its own, with a cleared environment, umask 022 and no stdin. At the deadline, on cancel, and
//! when the step's shell exits, its whole process group is killed with SIGKILL.
//!
//! This tier normalises a build; it does not contain one. A step can read whatever the worker's
//! user can read (the namespace sandbox tier is what hides the rest of the host).

// `pre_exec`, `wait4`, `killpg`, `memfd_create`, `mount` and `umount2` are libc calls whose contracts Rust cannot check; this module
// is the one place in the workspace allowed `unsafe`, and each block says why it is sound.
#![allow(unsafe_code)]

use std::ffi::{CStr, CString};
use std::io::{self, Seek as _, Write as _};
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use tokio::sync::oneshot;

use super::{
    ExecError, Executor, JobSpec, StepContext, StepExit, StepFuture, StepRun, build_environment,
};

/// Runs steps as plain child processes of the worker.
#[derive(Debug, Default, Clone, Copy)]
pub struct ProcessExecutor;

impl Executor for ProcessExecutor {
    fn name(&self) -> &'static str {
        "process"
    }

    fn run_step<'a>(&'a self, step: StepContext<'a>) -> StepFuture<'a> {
        Box::pin(run_step(step))
    }
}

async fn run_step(step: StepContext<'_>) -> Result<StepRun, ExecError> {
    if let Some(input) = step.job.inputs.first() {
        return Err(ExecError::Setup(std::io::Error::other(format!(
            "the job declares inputs (`{}`), which only the namespace sandbox can mount at \
             /inputs; this worker runs builds as plain processes",
            input.name
        ))));
    }
    let mut cmd = command(step.job, step.command);
    supervise(&mut cmd, Supervision::default());
    run_supervised(cmd, &step).await
}

/// What [`supervise`] sets up in the child besides its own session, umask and parent-death
/// signal: the owner's niceness and the cgroups to join before exec.
#[derive(Debug, Default)]
pub(super) struct Supervision {
    pub nice: Option<i32>,
    /// `cgroup.procs` (v2) or `tasks` (v1) files, opened for writing; the child writes `0`
    /// (itself) to each, so it is inside its limits before it runs a single instruction of the
    /// build.
    pub cgroups: Vec<std::fs::File>,
}

/// Spawns `cmd` (already given its arguments and environment; its output goes to the step's
/// pipe here), waits for it until it ends, the deadline passes or the step is cancelled, and
/// kills its process group on every way out.
pub(super) async fn run_supervised(
    cmd: Command,
    step: &StepContext<'_>,
) -> Result<StepRun, ExecError> {
    spawn_supervised(cmd, step.output, step.index)
        .await?
        .wait(step)
        .await
}

/// A supervised child, spawned and not yet waited for. Dropping it kills its process group;
/// the thread blocked in `wait4` then reaps it.
pub(super) struct Spawned {
    index: usize,
    group: ProcessGroup,
    waiter: tokio::task::JoinHandle<io::Result<(i32, libc::rusage)>>,
}

/// Spawns `cmd` for step `index`, with both its stdout and stderr going to `output`.
pub(super) async fn spawn_supervised(
    mut cmd: Command,
    output: &std::io::PipeWriter,
    index: usize,
) -> Result<Spawned, ExecError> {
    let spawn_err = |source| ExecError::Spawn {
        step: index,
        source,
    };
    cmd.stdout(output.try_clone().map_err(spawn_err)?);
    cmd.stderr(output.try_clone().map_err(spawn_err)?);

    let (pid_tx, pid_rx) = oneshot::channel();
    let waiter = tokio::task::spawn_blocking(move || spawn_and_wait(cmd, pid_tx));
    let Ok(pid) = pid_rx.await else {
        // No pid means the spawn failed; the waiter holds the reason.
        return match waiter.await {
            Ok(Err(e)) => Err(spawn_err(e)),
            Ok(Ok(_)) => Err(spawn_err(io::Error::other(
                "the step ended before it was started",
            ))),
            Err(e) => Err(spawn_err(io::Error::other(e))),
        };
    };
    Ok(Spawned {
        index,
        group: ProcessGroup(pid),
        waiter,
    })
}

impl Spawned {
    /// Whether the child has ended (and been reaped) already.
    pub(super) fn has_ended(&self) -> bool {
        self.waiter.is_finished()
    }

    /// Waits for the child until it ends, the deadline of `step` passes or the step is
    /// cancelled; its process group is killed on every way out, including this future being
    /// dropped halfway.
    pub(super) async fn wait(self, step: &StepContext<'_>) -> Result<StepRun, ExecError> {
        let Spawned {
            index,
            group,
            mut waiter,
        } = self;
        let killed = tokio::select! {
            biased;
            waited = &mut waiter => return finish(index, waited, None),
            _ = tokio::time::sleep_until(step.deadline) => StepExit::TimedOut,
            _ = step.cancel.cancelled() => StepExit::Cancelled,
        };
        group.kill();
        finish(index, waiter.await, Some(killed))
    }

    /// Kills the child's process group and returns once the child is reaped.
    pub(super) async fn kill(self) {
        self.group.kill();
        let _ = self.waiter.await;
    }
}

/// The step's command line and environment. The allow on `Command::new` marks this as the one
/// sanctioned place where build processes are created.
#[allow(clippy::disallowed_methods)]
fn command(job: &JobSpec, step: &str) -> Command {
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-e")
        .arg("-c")
        .arg(step)
        .current_dir(&job.build_dir)
        .env_clear()
        .envs(build_environment(job))
        .stdin(Stdio::null());
    cmd
}

/// Makes the child of `cmd` a supervised step: own session, umask 022, killed with the worker,
/// and `extra` applied before exec.
pub(super) fn supervise(cmd: &mut Command, extra: Supervision) {
    let worker = std::process::id() as libc::pid_t;
    let Supervision { nice, cgroups } = extra;
    // SAFETY: the closure runs in the child between fork and exec, where only async-signal-safe
    // functions may be called: it makes plain syscalls and allocates nothing (the files were
    // opened before the fork and are only borrowed here).
    unsafe {
        cmd.pre_exec(move || {
            // Own session and process group, so one killpg reaches everything the step starts.
            if libc::setsid() == -1 {
                return Err(io::Error::last_os_error());
            }
            libc::umask(0o022);
            // If the worker dies, its builds die with it instead of running on unsupervised.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) == -1 {
                return Err(io::Error::last_os_error());
            }
            // The worker may have died before prctl took effect; nobody would kill us then.
            if libc::getppid() != worker {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            if let Some(nice) = nice
                && libc::setpriority(libc::PRIO_PROCESS as _, 0, nice) == -1
            {
                return Err(io::Error::last_os_error());
            }
            for file in &cgroups {
                // "0" names the writing process itself.
                if libc::write(file.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

/// An anonymous in-memory file holding `bytes`, positioned at its start, close-on-exec. For data
/// a child reads from an inherited descriptor (bwrap's `--seccomp FD`): one per child, since
/// the children would otherwise share its file offset.
pub(super) fn memfd_with(name: &CStr, bytes: &[u8]) -> io::Result<OwnedFd> {
    // SAFETY: `name` is NUL-terminated and outlives the call; the call touches no other memory.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd == -1 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just opened and is owned by nothing else.
    let mut file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.write_all(bytes)?;
    file.rewind()?;
    Ok(file.into())
}

/// Makes `fd` available to the child of `cmd` under its current number, which is returned.
///
/// The descriptor stays close-on-exec in the worker, so processes other threads spawn at the same
/// time never get it; only this child clears the flag, between fork and exec. `cmd` owns `fd`
/// until it is dropped, so the number stays valid until the spawn.
pub(super) fn inherit_fd(cmd: &mut Command, fd: OwnedFd) -> RawFd {
    let raw = fd.as_raw_fd();
    // SAFETY: the closure runs between fork and exec and only makes one fcntl call, which is
    // async-signal-safe; it allocates nothing. `fd` is moved in, so it is open at that point.
    unsafe {
        cmd.pre_exec(move || {
            if libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, 0) == -1 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    raw
}

/// Mounts a tmpfs of `bytes` at `dir` (no devices, no setuid), in the worker's own mount
/// namespace; needs `CAP_SYS_ADMIN` there.
pub(super) fn mount_tmpfs(dir: &Path, bytes: u64) -> io::Result<()> {
    let target = CString::new(dir.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let options = CString::new(format!("size={bytes},mode=0755")).map_err(io::Error::other)?;
    // SAFETY: every pointer is a NUL-terminated string that outlives the call.
    let r = unsafe {
        libc::mount(
            c"quorum-build".as_ptr(),
            target.as_ptr(),
            c"tmpfs".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV,
            options.as_ptr().cast(),
        )
    };
    if r == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Detaches the mount at `dir`; it goes away once nothing uses it any more.
pub(super) fn unmount(dir: &Path) -> io::Result<()> {
    let target = CString::new(dir.as_os_str().as_bytes()).map_err(io::Error::other)?;
    // SAFETY: `target` is a NUL-terminated string that outlives the call.
    if unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) } == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// SIGKILLs one process; for leftovers found in a step's cgroup. A pid that is already gone is
/// no error.
pub(super) fn kill_pid(pid: libc::pid_t) {
    if pid <= 1 {
        return;
    }
    // SAFETY: sending a signal has no memory-safety preconditions.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
}

/// Spawns and reaps the step on one blocking thread. PR_SET_PDEATHSIG fires when the *thread*
/// that forked the child ends, so that thread must outlive the child: it does, blocked in wait4.
fn spawn_and_wait(
    mut cmd: Command,
    pid_tx: oneshot::Sender<libc::pid_t>,
) -> io::Result<(i32, libc::rusage)> {
    let child = cmd.spawn()?;
    // The command holds copies of the output pipe; they must close so the log sees EOF.
    drop(cmd);
    let pid = child.id() as libc::pid_t;
    let _ = pid_tx.send(pid);
    let mut status = 0;
    // SAFETY: rusage is plain old data; all zeroes is a valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: `pid` is our child and not yet reaped (std's Child never waits on drop);
        // both out-pointers are valid for the call.
        let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
        if r == pid {
            return Ok((status, usage));
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

fn finish(
    index: usize,
    waited: Result<io::Result<(i32, libc::rusage)>, tokio::task::JoinError>,
    killed: Option<StepExit>,
) -> Result<StepRun, ExecError> {
    let wait_err = |source| ExecError::Wait {
        step: index,
        source,
    };
    let (status, usage) = waited
        .map_err(|e| wait_err(io::Error::other(e)))?
        .map_err(wait_err)?;
    let exit = killed.unwrap_or(if libc::WIFEXITED(status) {
        StepExit::Exited(libc::WEXITSTATUS(status))
    } else {
        StepExit::Signaled(libc::WTERMSIG(status))
    });
    Ok(StepRun {
        exit,
        cpu: timeval(usage.ru_utime) + timeval(usage.ru_stime),
        peak_rss_kib: u64::try_from(usage.ru_maxrss).unwrap_or(0),
        limit: None,
    })
}

fn timeval(t: libc::timeval) -> Duration {
    Duration::from_secs(u64::try_from(t.tv_sec).unwrap_or(0))
        + Duration::from_micros(u64::try_from(t.tv_usec).unwrap_or(0))
}

/// A step's process group (its id is the step shell's pid, thanks to setsid).
struct ProcessGroup(libc::pid_t);

impl ProcessGroup {
    fn kill(&self) {
        // SAFETY: sending a signal has no memory-safety preconditions. While the leader is
        // unreaped the group id cannot be reused; afterwards the group is either the step's
        // leftovers or empty (ESRCH, ignored).
        unsafe {
            libc::killpg(self.0, libc::SIGKILL);
        }
    }
}

impl Drop for ProcessGroup {
    /// Also ends background processes a step left behind when its shell exited.
    fn drop(&mut self) {
        self.kill();
    }
}
