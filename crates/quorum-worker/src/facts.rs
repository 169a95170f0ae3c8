//! The worker's environment facts, recorded with each result like a Debian `.buildinfo`: when
//! two workers disagree, these say what differed between them (kernel, CPU, isolation, the
//! packages whose /usr the steps saw). Gathered once at start.

use std::path::Path;

use quorum_api::v1::controller::EnvironmentFacts;
use quorum_core::digest::Hasher;

use crate::executor::Executor;

/// The files that identify the root file system a sandbox binds from the host, in hash order.
const ROOT_FS_FILES: &[&str] = &[
    "/etc/os-release",
    "/var/lib/dpkg/status",
    "/var/lib/rpm/rpmdb.sqlite",
];

/// Facts about this host and `executor`.
pub fn collect(executor: &dyn Executor) -> EnvironmentFacts {
    let bubblewrap = if executor.name() == "namespaces" {
        bwrap_version().unwrap_or_default()
    } else {
        String::new()
    };
    EnvironmentFacts {
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "unknown".into()),
        arch: std::env::consts::ARCH.to_string(),
        cpus: std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1),
        executor: executor.name().to_string(),
        cpu_model: std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|text| cpu_model(&text))
            .unwrap_or_default(),
        sandbox: executor.description(),
        bubblewrap,
        os: std::fs::read_to_string("/etc/os-release")
            .ok()
            .and_then(|text| os_release_name(&text))
            .unwrap_or_default(),
        root_fs: root_fs_digest(ROOT_FS_FILES.iter().map(Path::new)),
    }
}

/// The first `model name` (x86) or `CPU part`-less `Model` (arm) line's value.
fn cpu_model(cpuinfo: &str) -> Option<String> {
    cpuinfo.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        matches!(key.trim(), "model name" | "Model").then(|| value.trim().to_string())
    })
}

fn os_release_name(text: &str) -> Option<String> {
    text.lines().find_map(|line| {
        let value = line.strip_prefix("PRETTY_NAME=")?;
        Some(value.trim_matches('"').to_string())
    })
}

/// SHA-256 over each present file's path, length and bytes; a missing file contributes its path
/// and a marker, so "no rpm database" is part of the identity too.
fn root_fs_digest<'a>(files: impl Iterator<Item = &'a Path>) -> String {
    let mut hasher = Hasher::new();
    for path in files {
        hasher.update(path.as_os_str().as_encoded_bytes());
        match std::fs::read(path) {
            Ok(bytes) => {
                hasher.update(&(bytes.len() as u64).to_le_bytes());
                hasher.update(&bytes);
            }
            Err(_) => hasher.update(b"\0absent\0"),
        }
    }
    hasher.finish().to_string()
}

/// `bwrap --version`, e.g. "bubblewrap 0.8.0".
#[allow(clippy::disallowed_methods)] // asks the sandbox tool its version; runs no build code
fn bwrap_version() -> Option<String> {
    let out = std::process::Command::new("bwrap")
        .arg("--version")
        .env_clear()
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_cpu_and_os_names() {
        let x86 =
            "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) 8375C\n";
        assert_eq!(cpu_model(x86).unwrap(), "Intel(R) Xeon(R) 8375C");
        assert_eq!(cpu_model("processor : 0\n"), None);
        let os = "NAME=\"Debian GNU/Linux\"\nPRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\n";
        assert_eq!(
            os_release_name(os).unwrap(),
            "Debian GNU/Linux 12 (bookworm)"
        );
    }

    #[test]
    fn the_root_fs_digest_follows_the_package_database() {
        let dir = tempfile::tempdir().unwrap();
        let (os, db) = (dir.path().join("os-release"), dir.path().join("status"));
        std::fs::write(&os, "ID=debian\n").unwrap();
        std::fs::write(&db, "Package: gcc\nVersion: 12.2\n").unwrap();
        let files = [os.as_path(), db.as_path()];
        let first = root_fs_digest(files.iter().copied());
        assert_eq!(first, root_fs_digest(files.iter().copied()));
        std::fs::write(&db, "Package: gcc\nVersion: 12.3\n").unwrap();
        assert_ne!(first, root_fs_digest(files.iter().copied()));
        std::fs::remove_file(&db).unwrap();
        assert_ne!(first, root_fs_digest(files.iter().copied()));
        assert!(first.starts_with("sha256:"));
    }
}
