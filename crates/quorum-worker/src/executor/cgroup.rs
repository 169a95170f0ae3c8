//! Per-step cgroups: the worker owner's memory, process-count and CPU limits, the usage they
//! measure (CPU time, peak memory) and which limit a failed step ran into.
//!
//! Each step gets its own group under a `quorum` group inside the worker's own cgroup, so the
//! worker's own limits (if its owner set any) still cover its builds. cgroup v1 is used with one
//! directory per controller (`memory`, `pids`, `cpu`, `cpuacct`); a host with only the unified
//! cgroup v2 hierarchy is used through it instead.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// The `[limits]` section of the worker's config: what one build step may use.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Memory (RAM plus swap where the kernel accounts it) of the whole step.
    #[serde(default)]
    pub memory_bytes: Option<u64>,
    /// Processes and threads of the whole step at once.
    #[serde(default)]
    pub pids: Option<u64>,
    /// CPU time per wall-clock time, in cores (1.5 = one and a half cores).
    #[serde(default)]
    pub cpu_quota: Option<f64>,
    /// Niceness of the step's processes (0 to 19; higher yields to the owner's own work).
    #[serde(default)]
    pub nice: Option<i32>,
    /// Wall-clock seconds one step may run (the pipeline's timeout covers the whole job).
    #[serde(default)]
    pub step_timeout_secs: Option<u64>,
    /// Bytes the job's build directory may hold: `/build` is then a tmpfs of this size, private
    /// to the job, and a build that fills it gets `ENOSPC`.
    #[serde(default)]
    pub disk_bytes: Option<u64>,
    /// Bytes of each step's private `/tmp` (a tmpfs; the kernel's default is half the RAM).
    #[serde(default)]
    pub tmp_bytes: Option<u64>,
}

impl Limits {
    /// Whether enforcing these needs cgroups (niceness does not).
    pub fn need_cgroups(&self) -> bool {
        self.memory_bytes.is_some() || self.pids.is_some() || self.cpu_quota.is_some()
    }
}

/// An owner's limit that a step ran into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitHit {
    /// The kernel's OOM killer ended a process of the step.
    Memory { bytes: u64 },
    /// A fork or clone failed because the step had this many processes.
    Pids { max: u64 },
    /// The step ran longer than the owner allows one step; its whole tree was killed.
    StepTime { secs: u64 },
}

impl std::fmt::Display for LimitHit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LimitHit::Memory { bytes } => {
                write!(f, "the worker's memory limit (memory_bytes = {bytes})")
            }
            LimitHit::Pids { max } => write!(f, "the worker's process limit (pids = {max})"),
            LimitHit::StepTime { secs } => write!(
                f,
                "the worker's per-step time limit (step_timeout_secs = {secs})"
            ),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error(
        "no usable cgroup hierarchy under /sys/fs/cgroup: {0}; mount the cgroup v1 memory, pids, \
         cpu and cpuacct controllers (or cgroup v2), or remove the [limits] memory_bytes, pids and \
         cpu_quota settings"
    )]
    NotFound(String),
    #[error(
        "cannot set up the cgroup {path}: {source}; run the worker as root or delegate that \
         cgroup to the worker's user"
    )]
    Io { path: PathBuf, source: io::Error },
    #[error("invalid [limits] setting: {0}")]
    Invalid(String),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> CgroupError + '_ {
    move |source| CgroupError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The controllers' directories for one group (in cgroup v2 all four are the same directory).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Dirs {
    memory: PathBuf,
    pids: PathBuf,
    cpu: PathBuf,
    cpuacct: PathBuf,
}

impl Dirs {
    fn join(&self, name: &str) -> Dirs {
        Dirs {
            memory: self.memory.join(name),
            pids: self.pids.join(name),
            cpu: self.cpu.join(name),
            cpuacct: self.cpuacct.join(name),
        }
    }

    /// Each directory once (co-mounted v1 controllers and v2 share directories).
    fn unique(&self) -> Vec<PathBuf> {
        let mut dirs: Vec<PathBuf> = Vec::new();
        for d in [&self.memory, &self.pids, &self.cpu, &self.cpuacct] {
            if !dirs.contains(d) {
                dirs.push(d.clone());
            }
        }
        dirs
    }
}

/// Where the worker creates its step groups: `<the worker's own cgroup>/quorum`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Hierarchy {
    v2: bool,
    parent: Dirs,
}

const ROOT: &str = "/sys/fs/cgroup";

impl Hierarchy {
    /// Finds the hierarchy and checks that a step group can be created, limited and removed.
    pub(crate) fn detect() -> Result<Hierarchy, CgroupError> {
        let own = fs::read_to_string("/proc/self/cgroup")
            .map_err(|e| CgroupError::NotFound(format!("cannot read /proc/self/cgroup: {e}")))?;
        let root = Path::new(ROOT);
        let hierarchy = if root.join("cgroup.controllers").exists() {
            let path = own_path(&own, None)
                .ok_or_else(|| CgroupError::NotFound("no cgroup v2 entry".into()))?;
            let dir = root.join(path).join("quorum");
            Hierarchy {
                v2: true,
                parent: Dirs {
                    memory: dir.clone(),
                    pids: dir.clone(),
                    cpu: dir.clone(),
                    cpuacct: dir,
                },
            }
        } else {
            let find = |name: &str| -> Result<PathBuf, CgroupError> {
                let mount = root.join(name);
                if !mount.join("cgroup.procs").exists() {
                    return Err(CgroupError::NotFound(format!(
                        "the cgroup v1 {name} controller is not mounted at {}",
                        mount.display()
                    )));
                }
                let path = own_path(&own, Some(name)).ok_or_else(|| {
                    CgroupError::NotFound(format!("the worker is in no {name} cgroup"))
                })?;
                Ok(mount.join(path).join("quorum"))
            };
            Hierarchy {
                v2: false,
                parent: Dirs {
                    memory: find("memory")?,
                    pids: find("pids")?,
                    cpu: find("cpu")?,
                    cpuacct: find("cpuacct")?,
                },
            }
        };
        static PROBES: AtomicU64 = AtomicU64::new(0);
        let n = PROBES.fetch_add(1, Ordering::Relaxed);
        let check = StepCgroup::create(
            &hierarchy,
            &format!("probe-{}-{n}", std::process::id()),
            &Limits {
                memory_bytes: Some(1 << 30),
                pids: Some(64),
                cpu_quota: Some(1.0),
                ..Limits::default()
            },
        )?;
        check.remove();
        Ok(hierarchy)
    }

    pub(crate) fn version(&self) -> &'static str {
        if self.v2 { "cgroup v2" } else { "cgroup v1" }
    }
}

/// The worker's own group for `controller` (v1) or in the unified hierarchy (`None`), relative.
fn own_path(proc_self_cgroup: &str, controller: Option<&str>) -> Option<String> {
    proc_self_cgroup.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let matches = match controller {
            None => controllers.is_empty(),
            Some(name) => controllers.split(',').any(|c| c == name),
        };
        matches.then(|| path.trim_start_matches('/').to_string())
    })
}

/// What a step used, read from its group after it ended.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Usage {
    pub cpu: Option<Duration>,
    pub peak_memory_bytes: Option<u64>,
    pub limit: Option<LimitHit>,
}

/// One step's group. Dropping it kills what is left in it and removes it.
#[derive(Debug)]
pub(crate) struct StepCgroup {
    v2: bool,
    dirs: Dirs,
    parent: Dirs,
    limits: Limits,
    removed: bool,
}

impl StepCgroup {
    pub(crate) fn create(
        h: &Hierarchy,
        name: &str,
        limits: &Limits,
    ) -> Result<StepCgroup, CgroupError> {
        if let Some(q) = limits.cpu_quota
            && !(q > 0.0 && q.is_finite())
        {
            return Err(CgroupError::Invalid(format!(
                "cpu_quota = {q}; give a positive number of cores such as 1.5"
            )));
        }
        let mut group = StepCgroup {
            v2: h.v2,
            dirs: h.parent.join(name),
            parent: h.parent.clone(),
            limits: limits.clone(),
            removed: false,
        };
        for dir in group.dirs.unique() {
            if h.v2 {
                // Controllers must be enabled for the children of every level we create.
                let parent = dir.parent().expect("a step group has a parent");
                for level in [parent.parent(), Some(parent)].into_iter().flatten() {
                    fs::create_dir_all(level).map_err(io_err(level))?;
                    let control = level.join("cgroup.subtree_control");
                    fs::write(&control, "+memory +pids +cpu").map_err(io_err(&control))?;
                }
            }
            create_retrying(&dir)?;
        }
        // From here on, dropping `group` removes what was created.
        group.write_limits()?;
        Ok(group)
    }

    fn write_limits(&mut self) -> Result<(), CgroupError> {
        let write = |dir: &Path, file: &str, value: String| -> Result<(), CgroupError> {
            let path = dir.join(file);
            fs::write(&path, value).map_err(io_err(&path))
        };
        let limits = self.limits.clone();
        if let Some(bytes) = limits.memory_bytes {
            if self.v2 {
                write(&self.dirs.memory, "memory.max", bytes.to_string())?;
                // Swap would let the step go past its limit; not every kernel accounts it.
                let _ = fs::write(self.dirs.memory.join("memory.swap.max"), "0");
            } else {
                write(
                    &self.dirs.memory,
                    "memory.limit_in_bytes",
                    bytes.to_string(),
                )?;
                let _ = fs::write(
                    self.dirs.memory.join("memory.memsw.limit_in_bytes"),
                    bytes.to_string(),
                );
            }
        }
        if let Some(max) = limits.pids {
            write(&self.dirs.pids, "pids.max", max.to_string())?;
        }
        if let Some(cores) = limits.cpu_quota {
            const PERIOD_US: u64 = 100_000;
            let quota = ((cores * PERIOD_US as f64) as u64).max(1_000);
            if self.v2 {
                write(&self.dirs.cpu, "cpu.max", format!("{quota} {PERIOD_US}"))?;
            } else {
                write(&self.dirs.cpu, "cpu.cfs_period_us", PERIOD_US.to_string())?;
                write(&self.dirs.cpu, "cpu.cfs_quota_us", quota.to_string())?;
            }
        }
        Ok(())
    }

    /// The files the step's process writes `0` to, to join each controller's group before exec.
    ///
    /// On cgroup v1 that is `tasks`, not `cgroup.procs`: moving a whole process takes the
    /// kernel's global threadgroup lock, whose first writer after a pause waits for an RCU grace
    /// period (5 to 20 ms per step on a busy machine, most of the sandbox's start-up cost),
    /// while moving the calling thread alone skips that lock. The child is single-threaded
    /// between fork and exec, so moving its thread moves the process.
    pub(crate) fn procs_files(&self) -> Result<Vec<fs::File>, CgroupError> {
        let file = if self.v2 { "cgroup.procs" } else { "tasks" };
        self.dirs
            .unique()
            .into_iter()
            .map(|dir| {
                let path = dir.join(file);
                fs::OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(io_err(&path))
            })
            .collect()
    }

    /// Usage so far; call after the step's processes are gone.
    pub(crate) fn usage(&self) -> Usage {
        let read = |dir: &Path, file: &str| fs::read_to_string(dir.join(file)).ok();
        let number = |dir: &Path, file: &str| read(dir, file)?.trim().parse::<u64>().ok();
        let (cpu, peak) = if self.v2 {
            let cpu = read(&self.dirs.cpu, "cpu.stat")
                .and_then(|s| keyed(&s, "usage_usec"))
                .map(Duration::from_micros);
            (cpu, number(&self.dirs.memory, "memory.peak"))
        } else {
            let cpu = number(&self.dirs.cpuacct, "cpuacct.usage").map(Duration::from_nanos);
            (cpu, number(&self.dirs.memory, "memory.max_usage_in_bytes"))
        };
        let oom_killed = if self.v2 {
            read(&self.dirs.memory, "memory.events").and_then(|s| keyed(&s, "oom_kill"))
        } else {
            read(&self.dirs.memory, "memory.oom_control").and_then(|s| keyed(&s, "oom_kill"))
        }
        .is_some_and(|n| n > 0);
        let pids_hit = read(&self.dirs.pids, "pids.events")
            .and_then(|s| keyed(&s, "max"))
            .is_some_and(|n| n > 0);
        let limit = match (self.limits.memory_bytes, self.limits.pids) {
            (Some(bytes), _) if oom_killed => Some(LimitHit::Memory { bytes }),
            (_, Some(max)) if pids_hit => Some(LimitHit::Pids { max }),
            _ => None,
        };
        Usage {
            cpu,
            peak_memory_bytes: peak,
            limit,
        }
    }

    /// Kills whatever is still in the group and removes it (and the `quorum` parent when it is
    /// empty, so nothing is left in the worker's own cgroup). Blocks for at most about 2 s.
    pub(crate) fn remove(mut self) {
        self.remove_now(Duration::from_secs(2));
    }

    fn remove_now(&mut self, patience: Duration) {
        if self.removed {
            return;
        }
        self.removed = true;
        let until = Instant::now() + patience;
        for dir in self.dirs.unique() {
            loop {
                self.kill_all(&dir);
                match fs::remove_dir(&dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                    // Killed processes leave the group only once they are fully gone.
                    Err(_) if Instant::now() < until => {
                        std::thread::sleep(Duration::from_millis(1))
                    }
                    Err(e) => {
                        tracing::warn!(group = %dir.display(), error = %e, "cannot remove a step's cgroup");
                        break;
                    }
                }
            }
        }
        // Another step may be using the parent; then it stays, and that step removes it.
        for dir in self.parent.unique() {
            let _ = fs::remove_dir(dir);
        }
    }

    fn kill_all(&self, dir: &Path) {
        if self.v2 && fs::write(dir.join("cgroup.kill"), "1").is_ok() {
            return;
        }
        if let Ok(procs) = fs::read_to_string(dir.join("cgroup.procs")) {
            for pid in procs.lines().filter_map(|l| l.trim().parse().ok()) {
                super::process::kill_pid(pid);
            }
        }
    }
}

impl Drop for StepCgroup {
    /// The step's future was dropped halfway: clean up without waiting long.
    fn drop(&mut self) {
        self.remove_now(Duration::from_millis(200));
    }
}

/// Creates `dir` and its parents. Another step's clean-up may remove the shared `quorum` parent
/// between the two mkdirs when it was empty, so a vanished parent is created again.
fn create_retrying(dir: &Path) -> Result<(), CgroupError> {
    let mut attempts = 0;
    loop {
        match fs::create_dir_all(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound && attempts < 10 => attempts += 1,
            Err(e) => return Err(io_err(dir)(e)),
        }
    }
}

/// The number after `key` in a `key value` per line file.
fn keyed(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let (k, v) = line.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_workers_own_groups() {
        let text = "9:name=systemd:/\n4:memory:/a/b\n2:cpu,cpuacct:/c\n0::/u\n";
        assert_eq!(own_path(text, Some("memory")).unwrap(), "a/b");
        assert_eq!(own_path(text, Some("cpuacct")).unwrap(), "c");
        assert_eq!(own_path(text, Some("pids")), None);
        assert_eq!(own_path(text, None).unwrap(), "u");
    }

    #[test]
    fn reads_keyed_counters() {
        let text = "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n";
        assert_eq!(keyed(text, "oom_kill"), Some(3));
        assert_eq!(keyed(text, "max"), None);
    }
}
