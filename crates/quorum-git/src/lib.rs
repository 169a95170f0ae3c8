//! The one place outside the worker's executor that runs `git`: mirroring repositories,
//! resolving revisions, reading a file at a commit, and exporting a commit's tree. Every
//! function blocks; async callers use `spawn_blocking`.
//!
//! Repository URLs come from users, so git runs with a fixed protocol allow-list (no `ext::`,
//! which would run commands), no terminal prompts, and no system or global config.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};

#[derive(Debug, thiserror::Error)]
pub enum GitError {
    #[error("cannot run git ({0}); install git and make sure it is on PATH")]
    Spawn(std::io::Error),
    #[error("git {what} failed for {repo}: {stderr}")]
    Failed {
        what: String,
        repo: String,
        stderr: String,
    },
    #[error("revision `{rev}` does not name a commit in {repo}")]
    UnknownRevision { repo: String, rev: String },
    #[error("revision `{0}` is not allowed: it must not start with `-` or contain whitespace")]
    BadRevision(String),
    #[error("commit {commit} is not in {repo}")]
    MissingCommit { repo: String, commit: String },
    #[error("cannot unpack the source tree into {dir}: {source}")]
    Unpack { dir: String, source: std::io::Error },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// A directory of bare mirrors, one per repository URL, updated before each use.
#[derive(Debug, Clone)]
pub struct Mirrors {
    dir: PathBuf,
    locks: Arc<Mutex<HashMap<String, Arc<Mutex<()>>>>>,
}

impl Mirrors {
    pub fn new(dir: impl Into<PathBuf>) -> Mirrors {
        Mirrors {
            dir: dir.into(),
            locks: Arc::default(),
        }
    }

    /// Brings the mirror of `url` up to date and returns its path.
    pub fn update(&self, url: &str) -> Result<PathBuf, GitError> {
        let lock = {
            let mut locks = self.locks.lock().expect("mirror lock map");
            locks.entry(url.to_string()).or_default().clone()
        };
        let _guard = lock.lock().expect("mirror lock");
        let name = quorum_core::Digest::of(url.as_bytes()).hex();
        let path = self.dir.join(&name[..32]);
        if path.join("HEAD").exists() {
            run(
                git(Some(&path)).args([
                    "fetch",
                    "--prune",
                    "--quiet",
                    "--force",
                    "origin",
                    "+refs/*:refs/*",
                ]),
                "fetch",
                url,
            )?;
        } else {
            std::fs::create_dir_all(&self.dir)?;
            let tmp = self
                .dir
                .join(format!("{}.tmp-{}", &name[..32], std::process::id()));
            let _ = std::fs::remove_dir_all(&tmp);
            run(
                git(None)
                    .arg("clone")
                    .arg("--mirror")
                    .arg("--quiet")
                    .arg("--")
                    .arg(url)
                    .arg(&tmp),
                "clone",
                url,
            )?;
            std::fs::rename(&tmp, &path)?;
        }
        Ok(path)
    }
}

/// Refuses a revision git could take for an option, or that would split a line of input.
fn check_rev(rev: &str) -> Result<(), GitError> {
    if rev.is_empty() || rev.starts_with('-') || rev.chars().any(char::is_whitespace) {
        return Err(GitError::BadRevision(rev.to_string()));
    }
    Ok(())
}

/// Resolves `rev` to a full commit id in the mirror at `repo`.
pub fn resolve(repo: &Path, rev: &str) -> Result<String, GitError> {
    check_rev(rev)?;
    let out = git(Some(repo))
        .args(["rev-parse", "--verify", "--quiet", "--end-of-options"])
        .arg(format!("{rev}^{{commit}}"))
        .output()
        .map_err(GitError::Spawn)?;
    if !out.status.success() {
        return Err(GitError::UnknownRevision {
            repo: repo.display().to_string(),
            rev: rev.to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Checks that `commit` (a full id) exists in the mirror.
pub fn has_commit(repo: &Path, commit: &str) -> Result<bool, GitError> {
    if commit.len() != 40 || !commit.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Ok(false);
    }
    let status = git(Some(repo))
        .args(["cat-file", "-e"])
        .arg(format!("{commit}^{{commit}}"))
        .stderr(Stdio::null())
        .status()
        .map_err(GitError::Spawn)?;
    Ok(status.success())
}

/// A commit with its committer time and one of its files, as [`commit_with_file`] reads them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitFile {
    /// The full commit id.
    pub commit: String,
    /// The committer time, in seconds since the epoch (the build's SOURCE_DATE_EPOCH).
    pub time: i64,
    /// The file's contents, `None` when the commit has no such file.
    pub file: Option<Vec<u8>>,
}

/// Resolves `rev` to a commit in the mirror at `repo` and reads its committer time and the
/// file at `path`, with one `git cat-file --batch`: what a build's submission needs.
pub fn commit_with_file(repo: &Path, rev: &str, path: &str) -> Result<CommitFile, GitError> {
    check_rev(rev)?;
    let repo_name = repo.display().to_string();
    let failed = |stderr: String| GitError::Failed {
        what: "cat-file".into(),
        repo: repo_name.clone(),
        stderr,
    };
    if path.contains('\n') {
        return Err(failed(format!("path {path:?} contains a line break")));
    }
    let mut child = git(Some(repo))
        .args(["cat-file", "--batch"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(GitError::Spawn)?;
    {
        use std::io::Write as _;
        // Two short lines: the pipe takes them whole before git answers.
        let mut stdin = child.stdin.take().expect("piped stdin");
        stdin.write_all(format!("{rev}^{{commit}}\n{rev}^{{commit}}:{path}\n").as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        return Err(failed(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    let mut rest = out.stdout.as_slice();
    let unknown = || GitError::UnknownRevision {
        repo: repo_name.clone(),
        rev: rev.to_string(),
    };
    let (commit, kind, body) = batch_object(&mut rest)
        .map_err(failed)?
        .ok_or_else(unknown)?;
    if kind != "commit" {
        return Err(unknown());
    }
    let time = committer_time(body).ok_or_else(|| failed("commit has no committer time".into()))?;
    let file = match batch_object(&mut rest).map_err(failed)? {
        None => None,
        Some((_, "blob", body)) => Some(body.to_vec()),
        Some((_, kind, _)) => return Err(failed(format!("{path} is a {kind}, not a file"))),
    };
    Ok(CommitFile {
        commit: commit.to_string(),
        time,
        file,
    })
}

/// One object in the answer of `git cat-file --batch`: its id, type and contents.
type BatchObject<'a> = (&'a str, &'a str, &'a [u8]);

/// Takes one answer of `git cat-file --batch` off the front of `rest`: the object, or `None`
/// for a name that is missing (or ambiguous).
fn batch_object<'a>(rest: &mut &'a [u8]) -> Result<Option<BatchObject<'a>>, String> {
    let all = *rest;
    let end = all
        .iter()
        .position(|&b| b == b'\n')
        .ok_or("an answer of git cat-file --batch ends early")?;
    let header = std::str::from_utf8(&all[..end]).map_err(|e| e.to_string())?;
    let after = &all[end + 1..];
    if header.ends_with(" missing") || header.ends_with(" ambiguous") {
        *rest = after;
        return Ok(None);
    }
    let mut fields = header.split(' ');
    let (Some(id), Some(kind), Some(size), None) =
        (fields.next(), fields.next(), fields.next(), fields.next())
    else {
        return Err(format!(
            "unexpected answer of git cat-file --batch: {header}"
        ));
    };
    let size: usize = size
        .parse()
        .map_err(|_| format!("bad object size in {header}"))?;
    if after.len() < size + 1 {
        return Err("an object of git cat-file --batch ends early".into());
    }
    *rest = &after[size + 1..];
    Ok(Some((id, kind, &after[..size])))
}

/// The committer time in a commit object's headers (`committer NAME <EMAIL> TIME ZONE`).
fn committer_time(commit: &[u8]) -> Option<i64> {
    let text = std::str::from_utf8(commit).ok()?;
    let line = text
        .lines()
        .take_while(|l| !l.is_empty())
        .find_map(|l| l.strip_prefix("committer "))?;
    let mut fields = line.rsplit(' ');
    fields.next()?; // the time zone
    fields.next()?.parse().ok()
}

/// Writes the tree of `commit` into `dest` (which must be empty or absent). `git archive` gives
/// every file the commit time as mtime, so the tree is the same on every worker.
pub fn export(repo: &Path, commit: &str, dest: &Path) -> Result<(), GitError> {
    if !has_commit(repo, commit)? {
        return Err(GitError::MissingCommit {
            repo: repo.display().to_string(),
            commit: commit.to_string(),
        });
    }
    std::fs::create_dir_all(dest)?;
    let mut child = git(Some(repo))
        .args(["archive", "--format=tar", commit])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(GitError::Spawn)?;
    let stdout = child.stdout.take().expect("piped stdout");
    let mut archive = tar::Archive::new(stdout);
    archive.set_preserve_mtime(true);
    archive.set_preserve_permissions(true);
    archive.set_overwrite(false);
    let unpacked = archive.unpack(dest).map_err(|source| GitError::Unpack {
        dir: dest.display().to_string(),
        source,
    });
    let out = child.wait_with_output()?;
    unpacked?;
    if !out.status.success() {
        return Err(GitError::Failed {
            what: "archive".into(),
            repo: repo.display().to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

#[allow(clippy::disallowed_methods)] // git is the one tool this crate exists to run
fn git(dir: Option<&Path>) -> Command {
    let mut c = Command::new("git");
    if let Some(d) = dir {
        c.arg("--git-dir").arg(d);
    }
    c.env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_ALLOW_PROTOCOL", "file:git:http:https:ssh")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_ASKPASS", "/bin/false")
        .stdin(Stdio::null());
    c
}

fn run(cmd: &mut Command, what: &str, repo: &str) -> Result<Output, GitError> {
    let out = cmd.output().map_err(GitError::Spawn)?;
    if !out.status.success() {
        return Err(GitError::Failed {
            what: what.to_string(),
            repo: repo.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(out)
}

/// Commits the files of `dir` (honouring its `.gitignore` files) into a new repository at
/// `dest`, for `quorum run` on a directory that is not itself a repository. Returns the commit.
pub fn snapshot(dir: &Path, dest: &Path) -> Result<String, GitError> {
    let repo = dest.display().to_string();
    std::fs::create_dir_all(dest)?;
    run(
        git(None).arg("init").arg("--quiet").arg("--bare").arg(dest),
        "init",
        &repo,
    )?;
    let with_tree = || {
        let mut c = git(Some(dest));
        c.arg("--work-tree").arg(dir);
        c
    };
    run(with_tree().args(["add", "--all", "."]), "add", &repo)?;
    run(
        with_tree()
            .args([
                "-c",
                "user.name=quorum run",
                "-c",
                "user.email=run@quorum.invalid",
                "commit",
                "--quiet",
                "--allow-empty",
                "-m",
            ])
            .arg(format!("snapshot of {}", dir.display())),
        "commit",
        &repo,
    )?;
    resolve(dest, "HEAD")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[allow(clippy::disallowed_methods)]
    fn sh(dir: &Path, script: &str) {
        let ok = Command::new("sh")
            .arg("-c")
            .arg(script)
            .current_dir(dir)
            .status()
            .unwrap()
            .success();
        assert!(ok, "{script}");
    }

    #[test]
    fn mirror_resolve_read_export() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        std::fs::create_dir(&src).unwrap();
        sh(
            &src,
            "git init -q -b main && printf 'jobs: {}\\n' > .quorum.yml && mkdir d && echo hi > d/f && chmod +x d/f \
                  && git add -A && GIT_COMMITTER_DATE='2020-01-01T00:00:00Z' git -c user.name=t -c user.email=t@t commit -qm one",
        );
        let mirrors = Mirrors::new(tmp.path().join("mirrors"));
        let repo = mirrors.update(src.to_str().unwrap()).unwrap();
        let commit = resolve(&repo, "main").unwrap();
        assert_eq!(commit.len(), 40);
        // By a branch's name, and a path the commit does not have.
        assert_eq!(
            commit_with_file(&repo, "main", ".quorum.yml").unwrap(),
            CommitFile {
                commit: commit.clone(),
                time: 1577836800,
                file: Some(b"jobs: {}\n".to_vec()),
            }
        );
        assert_eq!(commit_with_file(&repo, &commit, "nope").unwrap().file, None);
        assert!(matches!(
            commit_with_file(&repo, &commit, "d"),
            Err(GitError::Failed { stderr, .. }) if stderr == "d is a tree, not a file"
        ));
        assert!(matches!(
            commit_with_file(&repo, "nosuchbranch", ".quorum.yml"),
            Err(GitError::UnknownRevision { .. })
        ));
        assert!(matches!(
            commit_with_file(&repo, "-x", ".quorum.yml"),
            Err(GitError::BadRevision(_))
        ));
        let dest = tmp.path().join("out");
        export(&repo, &commit, &dest).unwrap();
        let meta = std::fs::metadata(dest.join("d/f")).unwrap();
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        assert_eq!(meta.mtime(), 1577836800);
        assert_eq!(meta.permissions().mode() & 0o111, 0o111);
        assert!(matches!(
            resolve(&repo, "--upload-pack=x"),
            Err(GitError::BadRevision(_))
        ));
        assert!(matches!(
            resolve(&repo, "nosuchbranch"),
            Err(GitError::UnknownRevision { .. })
        ));

        // A new commit upstream shows up after the next update.
        sh(
            &src,
            "echo two > g && git add g && git -c user.name=t -c user.email=t@t commit -qm two",
        );
        mirrors.update(src.to_str().unwrap()).unwrap();
        assert_ne!(resolve(&repo, "main").unwrap(), commit);
    }

    #[test]
    fn snapshot_commits_a_plain_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("plain");
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        std::fs::write(dir.join("sub/a"), "a").unwrap();
        std::fs::write(dir.join(".gitignore"), "ignored\n").unwrap();
        std::fs::write(dir.join("ignored"), "x").unwrap();
        let repo = tmp.path().join("snap.git");
        let commit = snapshot(&dir, &repo).unwrap();
        let read = |path: &str| commit_with_file(&repo, &commit, path).unwrap().file;
        assert_eq!(read("sub/a").unwrap(), b"a");
        assert_eq!(read("ignored"), None, ".gitignore is honoured");
    }

    #[test]
    fn ext_transport_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let marker = tmp.path().join("pwned");
        let url = format!("ext::sh -c touch% {}", marker.display());
        assert!(Mirrors::new(tmp.path().join("m")).update(&url).is_err());
        assert!(!marker.exists());
    }
}
