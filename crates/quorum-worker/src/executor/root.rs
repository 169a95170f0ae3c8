//! The sandbox's root file system: one directory the worker prepares in its state directory and
//! bubblewrap binds read-only at `/` with a single mount.
//!
//! bubblewrap's own root is an empty tmpfs that every bind has to be added to one by one, and each
//! bind costs it a mount, a re-read of the mount table and a read-only remount: with the host's
//! /etc files, the generated `passwd` and `group` and a remount of `/` that was most of a step's
//! start-up after the namespaces themselves. The prepared root already holds those files, the
//! `/bin`, `/lib*` links and the mount points, so a step needs only its few real mounts (/usr,
//! /proc, /dev, /tmp, /build, the init and the inputs) on top.
//!
//! The /etc files are copies, so they must follow the host: each step compares the host files'
//! inode, size and times with those the copies were made from, and prepares a new root when they
//! differ (a package install rewrites `ld.so.cache`). A step holds the root it was started with
//! until it ends; the last holder of a replaced root removes it.

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::sandbox::{BUILD_PATH, UID};

/// Host files under /etc that toolchains read (dynamic loader cache, alternatives symlinks),
/// copied into the root when present. Everything else of /etc stays hidden.
const ETC_FILES: &[&str] = &[
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "alternatives",
    "nsswitch.conf",
];

/// The host's top-level directories a toolchain may reach through; on merged-/usr hosts they
/// are symlinks into /usr (copied as links), on others directories (bound read-only).
pub(crate) const TOP_DIRS: &[&str] = &["bin", "sbin", "lib", "lib32", "lib64", "libx32"];

/// Mount points the step's mounts land on (the root itself is read-only, so bubblewrap cannot
/// create them).
const MOUNT_POINTS: &[&str] = &["usr", "proc", "dev", "tmp", "build", "inputs"];

/// What a copy was made from: per host file, its inode, size, and change and modification times
/// (and, for a directory whose entries are edited in place, each entry's).
type Stamp = Vec<(PathBuf, Option<[i64; 6]>)>;

/// One prepared root; removed from disk when the last step using it ends.
#[derive(Debug)]
pub(crate) struct Root {
    path: PathBuf,
    stamp: Stamp,
}

impl Root {
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Root {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.path) {
            tracing::warn!(root = %self.path.display(), error = %e, "cannot remove a replaced sandbox root");
        }
    }
}

/// The executor's current root, and where new ones are prepared.
#[derive(Debug)]
pub(crate) struct Roots {
    dir: PathBuf,
    current: Mutex<Arc<Root>>,
    generation: AtomicU64,
}

impl Roots {
    /// Prepares the first root in `dir/root-<pid>-0`, removing roots a worker that is no longer
    /// running left in `dir`.
    pub(crate) fn new(dir: &Path) -> io::Result<Roots> {
        fs::create_dir_all(dir)?;
        remove_stale(dir);
        let first = prepare(dir, 0)?;
        Ok(Roots {
            dir: dir.to_path_buf(),
            current: Mutex::new(Arc::new(first)),
            generation: AtomicU64::new(1),
        })
    }

    /// The root for a step starting now: the current one, or a fresh one when the host's /etc
    /// files changed since it was made.
    pub(crate) fn current(&self) -> io::Result<Arc<Root>> {
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        if current.stamp != stamp() {
            let n = self.generation.fetch_add(1, Ordering::Relaxed);
            *current = Arc::new(prepare(&self.dir, n)?);
        }
        Ok(current.clone())
    }
}

fn stamp() -> Stamp {
    let of = |path: &Path| {
        fs::symlink_metadata(path).ok().map(|m| {
            [
                m.ino() as i64,
                m.size() as i64,
                m.ctime(),
                m.ctime_nsec(),
                m.mtime(),
                m.mtime_nsec(),
            ]
        })
    };
    let mut stamp = Stamp::new();
    for name in ETC_FILES {
        let host = Path::new("/etc").join(name);
        stamp.push((host.clone(), of(&host)));
        // Alternatives are replaced by renames, which the directory's times show; configuration
        // snippets may be edited in place.
        if *name == "ld.so.conf.d"
            && let Ok(entries) = fs::read_dir(&host)
        {
            let mut inner: Stamp = entries
                .flatten()
                .map(|e| {
                    let p = e.path();
                    let s = of(&p);
                    (p, s)
                })
                .collect();
            inner.sort();
            stamp.extend(inner);
        }
    }
    stamp
}

/// Builds `dir/root-<pid>-<n>`: the stamp is taken before the copies, so a change during the
/// copy makes the next step prepare again rather than keep a torn copy.
fn prepare(dir: &Path, n: u64) -> io::Result<Root> {
    let stamp = stamp();
    let path = dir.join(format!("root-{}-{n}", std::process::id()));
    if path.exists() {
        fs::remove_dir_all(&path)?;
    }
    // From here on, dropping `root` removes what was made.
    let root = Root { path, stamp };
    let at = |p: &str| root.path.join(p);
    fs::create_dir(&root.path)?;
    for point in MOUNT_POINTS {
        fs::create_dir(at(point))?;
    }
    // The init is bound here when the worker has one.
    fs::write(at(super::landlock::INIT_PATH.trim_start_matches('/')), b"")?;
    for top in TOP_DIRS {
        let host = Path::new("/").join(top);
        match fs::read_link(&host) {
            Ok(target) => std::os::unix::fs::symlink(target, at(top))?,
            Err(_) if host.is_dir() => fs::create_dir(at(top))?,
            Err(_) => {}
        }
    }
    let etc = at("etc");
    fs::create_dir(&etc)?;
    for name in ETC_FILES {
        let host = Path::new("/etc").join(name);
        if fs::symlink_metadata(&host).is_ok() {
            copy_tree(&host, &etc.join(name))?;
        }
    }
    fs::write(
        etc.join("passwd"),
        format!(
            "root:x:0:0:root:/root:/bin/sh\nbuild:x:{UID}:{UID}:build:{BUILD_PATH}:/bin/sh\n\
             nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
        ),
    )?;
    fs::write(
        etc.join("group"),
        format!("root:x:0:\nbuild:x:{UID}:\nnogroup:x:65534:\n"),
    )?;
    Ok(root)
}

/// Copies files, directories and symlinks (as links) from `from` to `to`; anything else (a
/// socket, a device) is left out.
fn copy_tree(from: &Path, to: &Path) -> io::Result<()> {
    let kind = fs::symlink_metadata(from)?.file_type();
    if kind.is_symlink() {
        std::os::unix::fs::symlink(fs::read_link(from)?, to)
    } else if kind.is_dir() {
        fs::create_dir(to)?;
        for entry in fs::read_dir(from)? {
            let entry = entry?;
            copy_tree(&entry.path(), &to.join(entry.file_name()))?;
        }
        Ok(())
    } else if kind.is_file() {
        fs::copy(from, to).map(drop)
    } else {
        Ok(())
    }
}

/// Removes `root-<pid>-*` directories of processes that no longer run: a worker killed with
/// SIGKILL cannot remove its own.
fn remove_stale(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("root-"))
            .and_then(|n| n.split('-').next())
        else {
            continue;
        };
        if !Path::new("/proc").join(pid).exists() {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_changed_host_file_gets_a_fresh_root_and_the_old_one_goes_with_its_last_step() {
        let dir = tempfile::tempdir().unwrap();
        let roots = Roots::new(dir.path()).unwrap();
        let first = roots.current().unwrap();
        assert!(first.path().join("etc/passwd").is_file());
        assert!(first.path().join(".quorum-init").is_file());
        assert!(first.path().join("etc/ld.so.cache").is_file());
        // Nothing changed on the host: the same root.
        assert!(Arc::ptr_eq(&first, &roots.current().unwrap()));

        // A root made from host files that have changed since (an empty stamp matches nothing),
        // held by a running step.
        let mut stale = prepare(dir.path(), 99).unwrap();
        stale.stamp.clear();
        let running = Arc::new(stale);
        *roots.current.lock().unwrap() = Arc::clone(&running);
        let fresh = roots.current().unwrap();
        assert!(!Arc::ptr_eq(&running, &fresh));
        let old = running.path().to_path_buf();
        assert!(old.exists(), "a root was removed under a running step");
        drop(running);
        assert!(!old.exists(), "the replaced root outlived its last step");
        // The very first root went when its holder did.
        let first_path = first.path().to_path_buf();
        drop(first);
        assert!(!first_path.exists());
        assert!(fresh.path().join("etc/group").is_file());
    }
}
