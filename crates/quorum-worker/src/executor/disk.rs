//! The owner's disk limit for a job's build directory (`disk_bytes`): the directory is a tmpfs of
//! that size, mounted by the worker in its own mount namespace before the source is exported, so
//! every step's `/build` is that tmpfs and a build that fills it gets `ENOSPC`. The worker's own
//! code (export, artifact collection) sees the same directory at the same path.
//!
//! Mounting needs `CAP_SYS_ADMIN` in the worker's mount namespace, so this limit needs a worker
//! running as root; the start-up probe says so when it is set without. (An unprivileged worker
//! could hold the tmpfs in a user and mount namespace of its own, but then its own file
//! operations, which canonicalize paths, would have to move into that namespace too.) A tmpfs is
//! memory (and swap): the pages a step writes are charged to its memory cgroup.

use std::io;
use std::path::{Path, PathBuf};

use super::process::{mount_tmpfs, unmount};

/// A mounted build directory; unmounted (lazily) when dropped.
#[derive(Debug)]
pub(crate) struct BuildDisk {
    dir: PathBuf,
}

impl BuildDisk {
    /// Creates `dir` and mounts a tmpfs of `bytes` on it.
    pub(crate) fn mount(dir: &Path, bytes: u64) -> io::Result<BuildDisk> {
        std::fs::create_dir_all(dir)?;
        mount_tmpfs(dir, bytes)?;
        Ok(BuildDisk {
            dir: dir.to_path_buf(),
        })
    }
}

impl Drop for BuildDisk {
    fn drop(&mut self) {
        if let Err(e) = unmount(&self.dir) {
            tracing::warn!(dir = %self.dir.display(), error = %e, "cannot unmount a job's build directory");
        }
    }
}

/// Whether this worker can mount build directories: mounts and unmounts a small one in
/// `state_dir`.
pub(crate) fn check(state_dir: &Path) -> Result<(), String> {
    let dir = state_dir.join("disk-probe");
    let mounted = BuildDisk::mount(&dir, 1 << 20);
    let result = match &mounted {
        Ok(_) => Ok(()),
        Err(e) => Err(format!(
            "cannot mount a size-limited tmpfs at {}: {e}",
            dir.display()
        )),
    };
    drop(mounted);
    let _ = std::fs::remove_dir(&dir);
    result
}

/// Unmounts build directories below `builds` that a worker which died left mounted, so they can
/// be removed. Returns how many it unmounted.
pub fn release_stale_mounts(builds: &Path) -> usize {
    let Ok(builds) = builds.canonicalize() else {
        return 0;
    };
    let Ok(table) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return 0;
    };
    // Deepest first, so nested mounts come off before their parents.
    let mut stale: Vec<PathBuf> = table
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|point| PathBuf::from(unescape(point)))
        .filter(|point| point.starts_with(&builds) && *point != builds)
        .collect();
    stale.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    stale.iter().filter(|p| unmount(p).is_ok()).count()
}

/// mountinfo writes space, tab, newline and backslash in paths as octal escapes.
fn unescape(field: &str) -> String {
    field
        .replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}
