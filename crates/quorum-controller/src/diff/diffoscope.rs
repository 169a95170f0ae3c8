//! diffoscope, run by the controller on two differing files in a bubblewrap sandbox: new user,
//! pid, network, IPC, UTS and cgroup namespaces (no network at all), no capabilities, `/usr`
//! read-only, a few `/etc` files the dynamic loader and libmagic read, a private size-limited
//! `/tmp`, the two files read-only, and one empty output directory. Nothing else of the host is
//! mounted, so the controller's data directory (the signer's key, the database) does not exist
//! inside. The run has a time limit; at the limit bwrap is killed, and `--die-with-parent` plus
//! the pid namespace end every process diffoscope started, even ones that left its session.
//! Report files are capped in size (`RLIMIT_FSIZE` inside, and again when read back).
//!
//! The files compared come from workers, so diffoscope's parsers see hostile input: that is
//! why it runs here and not in the controller's process.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use super::DisputesConfig;

/// Where the two files appear inside the sandbox: `/diff/<group>/<path>` (`/diff/A/out.txt`),
/// so diffoscope sees the artifact's own name (it picks comparators by name and content) and
/// its report names the groups as the rest of the report does.
const INSIDE: &str = "/diff";
/// Where a diffoscope that is not under `/usr` is mounted.
const INSIDE_TOOL: &str = "/run/quorum/diffoscope";
/// The size of the private `/tmp` (diffoscope unpacks archives there).
const TMP_BYTES: u64 = 512 << 20;
/// How much of diffoscope's standard error a failure message quotes.
const STDERR_TAIL: u64 = 2048;

/// A located diffoscope and bubblewrap, with the limits each run gets.
#[derive(Debug, Clone)]
pub struct Diffoscope {
    program: PathBuf,
    bwrap: PathBuf,
    prlimit: Option<PathBuf>,
    timeout: Duration,
    max_report: u64,
}

/// diffoscope's text and HTML reports on one pair of files.
#[derive(Debug)]
pub struct Compared {
    pub text: String,
    pub html: String,
}

impl Diffoscope {
    /// Finds diffoscope and bubblewrap as the config names them, or says why it will not run:
    /// turned off, not installed, or no sandbox (it never runs outside one).
    pub fn locate(config: &DisputesConfig) -> Result<Diffoscope, String> {
        if config.diffoscope.trim().is_empty() {
            return Err("diffoscope is turned off (`[project.disputes] diffoscope = \"\"`)".into());
        }
        let program = find_program(&config.diffoscope)
            .ok_or_else(|| format!("diffoscope (`{}`) is not installed", config.diffoscope))?;
        let bwrap = find_program(&config.bwrap).ok_or_else(|| {
            format!(
                "bubblewrap (`{}`) is not installed, and diffoscope never runs outside a sandbox",
                config.bwrap
            )
        })?;
        Ok(Diffoscope {
            program,
            bwrap,
            prlimit: find_program("prlimit"),
            timeout: Duration::from_secs(config.timeout_secs.max(1)),
            max_report: config.max_report_bytes.max(4096),
        })
    }

    /// Compares `a` and `b` (host files holding groups `la`'s and `lb`'s versions of `path`)
    /// in a fresh sandbox; `work` is a private directory of the caller's for this run's output.
    pub async fn compare(
        &self,
        (la, a): (&str, &Path),
        (lb, b): (&str, &Path),
        path: &str,
        work: &Path,
    ) -> Result<Compared, String> {
        let out = work.join("out");
        std::fs::create_dir(&out).map_err(|e| format!("cannot create {}: {e}", out.display()))?;
        let stderr_path = work.join("stderr");
        let stderr = std::fs::File::create(&stderr_path)
            .map_err(|e| format!("cannot create {}: {e}", stderr_path.display()))?;
        let inside_a = format!("{INSIDE}/{la}/{path}");
        let inside_b = format!("{INSIDE}/{lb}/{path}");
        let args = self.args((a, &inside_a), (b, &inside_b), &out);
        #[allow(clippy::disallowed_methods)]
        // diffoscope in a sandbox, on the controller's side: not build code
        let mut command = tokio::process::Command::new(&self.bwrap);
        command
            .args(&args)
            .env_clear()
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(stderr))
            .kill_on_drop(true);
        let mut child = command
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", self.bwrap.display()))?;
        let status = match tokio::time::timeout(self.timeout, child.wait()).await {
            Ok(status) => status.map_err(|e| format!("cannot wait for diffoscope: {e}"))?,
            Err(_) => {
                // Killing bwrap kills its init (die-with-parent), and with it the whole pid
                // namespace: every process diffoscope started.
                let _ = child.kill().await;
                return Err(format!(
                    "diffoscope did not finish within {} s; all its processes were killed",
                    self.timeout.as_secs()
                ));
            }
        };
        // diffoscope: 0 identical, 1 different, 2 error.
        if !matches!(status.code(), Some(0 | 1)) {
            return Err(format!(
                "diffoscope failed ({status}): {}",
                read_tail(&stderr_path, STDERR_TAIL)
            ));
        }
        Ok(Compared {
            text: self.read_report(&out.join("report.txt"))?,
            html: self.read_report(&out.join("report.html"))?,
        })
    }

    fn args(
        &self,
        (a, inside_a): (&Path, &str),
        (b, inside_b): (&Path, &str),
        out: &Path,
    ) -> Vec<std::ffi::OsString> {
        let mut args: Vec<std::ffi::OsString> = Vec::new();
        let mut push = |items: &[&std::ffi::OsStr]| args.extend(items.iter().map(|s| s.into()));
        push(&[
            "--unshare-all".as_ref(),
            "--die-with-parent".as_ref(),
            "--new-session".as_ref(),
            "--cap-drop".as_ref(),
            "ALL".as_ref(),
            "--ro-bind".as_ref(),
            "/usr".as_ref(),
            "/usr".as_ref(),
        ]);
        // /bin, /lib... are links into /usr on merged-/usr systems, directories elsewhere.
        for top in ["/bin", "/sbin", "/lib", "/lib32", "/lib64"] {
            match std::fs::read_link(top) {
                Ok(target) => push(&["--symlink".as_ref(), target.as_os_str(), top.as_ref()]),
                Err(_) if Path::new(top).is_dir() => {
                    push(&["--ro-bind".as_ref(), top.as_ref(), top.as_ref()])
                }
                Err(_) => {}
            }
        }
        for etc in [
            "/etc/ld.so.cache",
            "/etc/alternatives",
            "/etc/magic",
            "/etc/mime.types",
        ] {
            push(&["--ro-bind-try".as_ref(), etc.as_ref(), etc.as_ref()]);
        }
        let tmp_bytes = TMP_BYTES.to_string();
        push(&[
            "--proc".as_ref(),
            "/proc".as_ref(),
            "--dev".as_ref(),
            "/dev".as_ref(),
            "--size".as_ref(),
            tmp_bytes.as_ref(),
            "--tmpfs".as_ref(),
            "/tmp".as_ref(),
            "--ro-bind".as_ref(),
            a.as_os_str(),
            inside_a.as_ref(),
            "--ro-bind".as_ref(),
            b.as_os_str(),
            inside_b.as_ref(),
            "--bind".as_ref(),
            out.as_os_str(),
            "/out".as_ref(),
        ]);
        let tool: PathBuf = if self.program.starts_with("/usr") {
            self.program.clone()
        } else {
            push(&[
                "--ro-bind".as_ref(),
                self.program.as_os_str(),
                INSIDE_TOOL.as_ref(),
            ]);
            INSIDE_TOOL.into()
        };
        push(&[
            "--chdir".as_ref(),
            "/tmp".as_ref(),
            "--clearenv".as_ref(),
            "--setenv".as_ref(),
            "PATH".as_ref(),
            "/usr/local/bin:/usr/bin:/bin".as_ref(),
            "--setenv".as_ref(),
            "HOME".as_ref(),
            "/tmp".as_ref(),
            "--setenv".as_ref(),
            "TMPDIR".as_ref(),
            "/tmp".as_ref(),
            "--setenv".as_ref(),
            "LANG".as_ref(),
            "C.UTF-8".as_ref(),
            "--".as_ref(),
        ]);
        let fsize = format!("--fsize={}", self.max_report);
        if let Some(prlimit) = &self.prlimit {
            push(&[prlimit.as_os_str(), fsize.as_ref(), "--".as_ref()]);
        }
        let max = self.max_report.to_string();
        push(&[
            tool.as_os_str(),
            "--no-progress".as_ref(),
            "--text".as_ref(),
            "/out/report.txt".as_ref(),
            "--html".as_ref(),
            "/out/report.html".as_ref(),
            "--max-report-size".as_ref(),
            max.as_ref(),
            "--max-text-report-size".as_ref(),
            max.as_ref(),
            inside_a.as_ref(),
            inside_b.as_ref(),
        ]);
        args
    }

    /// Reads a report diffoscope wrote. It must be a plain file: the sandbox could have left a
    /// symlink there, which would make the controller read a file of its own. Every process of
    /// the sandbox is gone by now, so nothing can swap the file after the check.
    fn read_report(&self, path: &Path) -> Result<String, String> {
        use std::io::Read as _;
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        let meta =
            std::fs::symlink_metadata(path).map_err(|_| format!("diffoscope wrote no {name}"))?;
        if !meta.file_type().is_file() {
            return Err(format!("diffoscope's {name} is not a plain file"));
        }
        if meta.len() > self.max_report {
            return Err(format!(
                "diffoscope's {name} is larger than {} bytes",
                self.max_report
            ));
        }
        let mut bytes = Vec::new();
        std::fs::File::open(path)
            .and_then(|f| f.take(self.max_report).read_to_end(&mut bytes))
            .map_err(|e| format!("cannot read diffoscope's {name}: {e}"))?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }
}

/// `name` if it is a path to an executable file, else the first executable `name` on PATH; the
/// real file behind any links, since that is what gets mounted.
fn find_program(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt as _;
    let executable = |p: &Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    let found = if name.contains('/') {
        Some(PathBuf::from(name)).filter(|p| executable(p))
    } else {
        std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join(name))
                .find(|p| executable(p))
        })
    };
    found.and_then(|p| std::fs::canonicalize(p).ok())
}

/// The last `max` bytes of a file, as text, for an error message.
fn read_tail(path: &Path, max: u64) -> String {
    use std::io::{Read as _, Seek as _, SeekFrom};
    let Ok(mut f) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(max)));
    let mut bytes = Vec::new();
    let _ = f.take(max).read_to_end(&mut bytes);
    String::from_utf8_lossy(&bytes).trim().to_string()
}
