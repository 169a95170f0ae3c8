//! The start-up probe: can this host run the namespace sandbox, and enforce the owner's limits?
//! Run once when the worker starts, so a missing feature is reported before any job is taken.

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::JobSpec;
use super::cgroup::Limits;
use super::sandbox::{SandboxError, SandboxExecutor};

/// The `sandbox` setting of the worker's config.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SandboxTier {
    /// Each step in its own namespaces (bubblewrap), within the owner's cgroup limits.
    #[default]
    Namespaces,
    /// Plain processes of the worker's user: normalised, not contained.
    Process,
}

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    #[error("cannot prepare the sandbox probe in {path}: {source}")]
    Setup {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "bubblewrap is installed but cannot start a sandbox ({detail}); the kernel must allow \
         unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1, and on Ubuntu \
         24.04+ an AppArmor profile for bwrap or kernel.apparmor_restrict_unprivileged_userns=0)"
    )]
    Broken { detail: String },
}

const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// Builds the namespace executor and runs `true` in it once (blocking, at most about 10 s). The
/// probe's files go to `state_dir`, which no build can see.
pub fn probe(state_dir: &Path, limits: &Limits) -> Result<SandboxExecutor, ProbeError> {
    let executor = SandboxExecutor::new(state_dir, limits.clone())?;
    let dir = state_dir.join("probe");
    let setup = |source| ProbeError::Setup {
        path: dir.clone(),
        source,
    };
    let job = JobSpec {
        build_dir: dir.join("build"),
        tmp_dir: dir.join("tmp"),
        source_date_epoch: 0,
        script: vec!["true".into()],
        timeout: PROBE_TIMEOUT,
        inputs: Vec::new(),
    };
    std::fs::create_dir_all(&job.build_dir).map_err(setup)?;
    std::fs::create_dir_all(&job.tmp_dir).map_err(setup)?;
    let (mut command, root) = executor.command(&job, Some("true")).map_err(setup)?;
    let mut child = command
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(setup)?;
    let until = Instant::now() + PROBE_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().map_err(setup)? {
            break Some(status);
        }
        if Instant::now() >= until {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        let _ = pipe.read_to_string(&mut stderr);
    }
    drop(root);
    let _ = std::fs::remove_dir_all(&dir);
    match status {
        Some(s) if s.success() => Ok(executor),
        Some(s) => Err(ProbeError::Broken {
            detail: format!("`bwrap ... true` ended with {s}: {}", stderr.trim()),
        }),
        None => Err(ProbeError::Broken {
            detail: format!(
                "`bwrap ... true` did not end within {} s",
                PROBE_TIMEOUT.as_secs()
            ),
        }),
    }
}
