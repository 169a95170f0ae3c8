//! Collecting a job's outputs: expanding the pipeline's artifact globs inside the build directory,
//! refusing anything that is not a regular file reached without symlinks, and hashing what is
//! left into a [`Manifest`]. Every function here blocks (async callers use `spawn_blocking`)
//! except [`Uploads`], which uploads outputs in the background while later steps run.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use quorum_client::publish::{DigestCache, Hashed, PublishError, Publisher, Source};
use quorum_client::store::StoreClient;
use quorum_core::digest::hash_reader;
use quorum_core::manifest::ManifestError;
use quorum_core::{Manifest, ManifestEntry};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::executor::{ExecError, Executor, StepContext, StepExit, StepFuture, StepRun, Workspace};
use crate::retry::{Backoff, retryable};

/// Why a job's outputs could not be collected: the build's fault, reported as its failure.
#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    #[error("artifact pattern `{pattern}` is not allowed: {reason}")]
    BadPattern { pattern: String, reason: String },
    #[error("artifact pattern `{0}` matched no files")]
    NoMatch(String),
    #[error("artifact `{0}` is a symlink; only regular files are collected")]
    Symlink(String),
    #[error("artifact `{0}` resolves outside the build directory")]
    Outside(String),
    #[error("artifact `{0}` is not a regular file")]
    NotRegular(String),
    #[error("artifact path {0} is not valid UTF-8")]
    NonUtf8(String),
    #[error("cannot read artifact {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("the outputs do not form a valid manifest: {0}")]
    Manifest(#[from] ManifestError),
}

/// The collected outputs: the manifest, and where each of its paths is on disk.
#[derive(Debug, Clone)]
pub struct Collected {
    pub manifest: Manifest,
    pub files: BTreeMap<String, PathBuf>,
}

/// Expands `patterns` in `build_dir` and hashes every match.
pub fn collect(build_dir: &Path, patterns: &[String]) -> Result<Collected, ArtifactError> {
    let files = expand(build_dir, patterns)?;
    let entries = files
        .iter()
        .map(|(rel, file)| entry(rel, file))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Collected {
        manifest: Manifest::new(entries)?,
        files,
    })
}

/// The regular files matched by `patterns` (relative to `build_dir`), keyed by their relative
/// path, so the order is sorted and a file matched twice counts once. `*` stops at `/`; `**`
/// crosses directories; directories themselves are skipped.
pub fn expand(
    build_dir: &Path,
    patterns: &[String],
) -> Result<BTreeMap<String, PathBuf>, ArtifactError> {
    let io_err = |path: &Path| {
        let path = path.display().to_string();
        move |source| ArtifactError::Io { path, source }
    };
    let root = build_dir.canonicalize().map_err(io_err(build_dir))?;
    let root_str = root
        .to_str()
        .ok_or_else(|| ArtifactError::NonUtf8(root.display().to_string()))?;
    let options = glob::MatchOptions {
        case_sensitive: true,
        require_literal_separator: true,
        require_literal_leading_dot: false,
    };
    let mut files = BTreeMap::new();
    for pattern in patterns {
        check_pattern(pattern)?;
        let full = format!("{}/{pattern}", glob::Pattern::escape(root_str));
        let matches = glob::glob_with(&full, options).map_err(|e| ArtifactError::BadPattern {
            pattern: pattern.clone(),
            reason: e.msg.to_string(),
        })?;
        let mut matched = false;
        for found in matches {
            let found = found.map_err(|e| {
                let path = e.path().display().to_string();
                ArtifactError::Io {
                    path,
                    source: e.into(),
                }
            })?;
            let rel_path = found
                .strip_prefix(&root)
                .expect("glob results start with the escaped root");
            let rel = rel_path
                .to_str()
                .ok_or_else(|| ArtifactError::NonUtf8(rel_path.display().to_string()))?;
            let meta = std::fs::symlink_metadata(&found).map_err(io_err(&found))?;
            if meta.file_type().is_symlink() {
                return Err(ArtifactError::Symlink(rel.to_string()));
            }
            if meta.is_dir() {
                continue;
            }
            if !meta.is_file() {
                return Err(ArtifactError::NotRegular(rel.to_string()));
            }
            // A symlinked directory on the way changes where the path really is.
            let real = found.canonicalize().map_err(io_err(&found))?;
            if !real.starts_with(&root) {
                return Err(ArtifactError::Outside(rel.to_string()));
            }
            if real != root.join(rel_path) {
                return Err(ArtifactError::Symlink(rel.to_string()));
            }
            matched = true;
            files.insert(rel.to_string(), found);
        }
        if !matched {
            return Err(ArtifactError::NoMatch(pattern.clone()));
        }
    }
    Ok(files)
}

fn check_pattern(pattern: &str) -> Result<(), ArtifactError> {
    match quorum_client::publish::pattern_problem(pattern, "the build directory") {
        Some(reason) => Err(ArtifactError::BadPattern {
            pattern: pattern.to_string(),
            reason,
        }),
        None => Ok(()),
    }
}

/// Hashes one file, streaming. Opened with O_NOFOLLOW and checked again on the open file, so a
/// file swapped for a symlink after [`expand`] is refused too.
fn entry(rel: &str, file: &Path) -> Result<ManifestEntry, ArtifactError> {
    let io_err = |source| ArtifactError::Io {
        path: rel.to_string(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(file)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => ArtifactError::Symlink(rel.to_string()),
            _ => io_err(e),
        })?;
    let meta = f.metadata().map_err(io_err)?;
    if !meta.is_file() {
        return Err(ArtifactError::NotRegular(rel.to_string()));
    }
    let (digest, size) = hash_reader(&mut f).map_err(io_err)?;
    Ok(ManifestEntry {
        path: rel.to_string(),
        mode: meta.permissions().mode() & 0o777,
        size,
        digest,
    })
}

/// Uploads a job's outputs while its steps run, so no step waits on the store (a post-build
/// upload would hold the build loop). After each step that succeeds, the artifact patterns are
/// scanned and new or changed files are hashed and sent on a background task while the next
/// step runs. [`Uploads::finish`] collects the final outputs, waits for the queue, and sends
/// what is still missing, then records the manifest: the store accepts it only once every blob
/// has arrived, so the job's result is never reported before its uploads.
///
/// Background uploads are a head start, never the record: a file a later step rewrites may go
/// up twice, or fail (the store refuses bytes that changed under the digest), and the final
/// pass, which hashes only files whose size, mtime, ctime or inode changed, decides what the
/// manifest says.
pub(crate) struct Uploads {
    publisher: Publisher,
    build_dir: PathBuf,
    patterns: Vec<String>,
    steps: Option<mpsc::UnboundedSender<()>>,
    task: Option<JoinHandle<u64>>,
}

/// What identifies one version of a file for the background scan.
type Seen = (u64, i64, i64, i64, i64, u64);

fn seen(m: &std::fs::Metadata) -> Seen {
    (
        m.len(),
        m.mtime(),
        m.mtime_nsec(),
        m.ctime(),
        m.ctime_nsec(),
        m.ino(),
    )
}

/// How long the final pass keeps retrying a store that cannot be reached or fails on its side.
const STORE_BUDGET: Duration = Duration::from_secs(60);

impl Uploads {
    /// Starts the background task for a job whose outputs in `build_dir` match `patterns`.
    pub(crate) fn start(
        store_url: &str,
        token: &str,
        build_dir: &Path,
        patterns: &[String],
        parallel: usize,
    ) -> Uploads {
        let publisher = Publisher::new(StoreClient::new(store_url), token)
            .parallel(parallel)
            .cache(Arc::new(Mutex::new(DigestCache::in_memory())));
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(background(
            publisher.clone(),
            build_dir.to_path_buf(),
            patterns.to_vec(),
            rx,
        ));
        Uploads {
            publisher,
            build_dir: build_dir.to_path_buf(),
            patterns: patterns.to_vec(),
            steps: Some(tx),
            task: Some(task),
        }
    }

    /// `inner`, telling this queue each time a step succeeds. It holds the queue weakly, so
    /// [`Uploads::finish`] can close it while the executor is still around.
    pub(crate) fn watch<'a>(&self, inner: &'a dyn Executor) -> StepsEnd<'a> {
        StepsEnd {
            inner,
            steps: self.steps.as_ref().expect("not finished yet").downgrade(),
        }
    }

    /// Waits for the background queue (after its last scan), collects the final outputs
    /// (hashing only files changed since they were queued), uploads what the store still lacks
    /// and records the manifest. Returns the manifest and the bytes sent in all.
    pub(crate) async fn finish(
        mut self,
        cancel: &CancellationToken,
    ) -> Result<(Manifest, u64), Unfinished> {
        self.steps = None;
        let mut sent = 0;
        if let Some(mut task) = self.task.take() {
            tokio::select! {
                done = &mut task => sent = done.unwrap_or_default(),
                _ = cancel.cancelled() => {
                    task.abort();
                    return Err(Unfinished::Cancelled);
                }
            }
        }
        let (dir, patterns) = (self.build_dir.clone(), self.patterns.clone());
        let files = tokio::task::spawn_blocking(move || expand(&dir, &patterns))
            .await
            .map_err(|e| Unfinished::Worker(format!("collecting the outputs failed: {e}")))?
            .map_err(|e| Unfinished::Build(e.to_string()))?;
        let sources: Vec<Source> = files
            .into_iter()
            .map(|(name, path)| Source { name, path })
            .collect();
        let hashed = self
            .publisher
            .hash(&sources)
            .await
            .map_err(|e| Unfinished::Build(e.to_string()))?;
        let manifest = Manifest::new(hashed.iter().map(|h| h.entry.clone()).collect())
            .map_err(|e| Unfinished::Build(ArtifactError::from(e).to_string()))?;
        let p = &self.publisher;
        let deliver = async {
            let sent = retrying(cancel, || p.upload(&hashed))
                .await
                .map_err(|e| Unfinished::Worker(format!("cannot upload the outputs: {e}")))?
                .bytes_sent;
            retrying(cancel, || p.record(&manifest))
                .await
                .map_err(|e| Unfinished::Worker(format!("cannot record the outputs: {e}")))?;
            Ok(sent)
        };
        // A store that stalls mid-request must not keep a cancelled job alive.
        tokio::select! {
            delivered = deliver => sent += delivered?,
            _ = cancel.cancelled() => return Err(Unfinished::Cancelled),
        }
        Ok((manifest, sent))
    }
}

impl Drop for Uploads {
    /// A job that ends without [`Uploads::finish`] (failed, cancelled) stops its uploads.
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// Why a job's outputs did not reach the store.
#[derive(Debug)]
pub(crate) enum Unfinished {
    /// The build's outputs are not publishable: the job fails.
    Build(String),
    /// The worker or the store failed.
    Worker(String),
    /// The job was cancelled while its uploads were under way.
    Cancelled,
}

/// Calls `call` again while it fails on something that may pass (the store unreachable or
/// failing on its side), within [`STORE_BUDGET`].
async fn retrying<T, Fut>(
    cancel: &CancellationToken,
    mut call: impl FnMut() -> Fut,
) -> Result<T, PublishError>
where
    Fut: Future<Output = Result<T, PublishError>>,
{
    let deadline = tokio::time::Instant::now() + STORE_BUDGET;
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(10));
    loop {
        let err = match call().await {
            Ok(v) => return Ok(v),
            Err(e) => e,
        };
        let transient = match &err {
            PublishError::Missing(e)
            | PublishError::Upload { source: e, .. }
            | PublishError::Record(e) => retryable(e),
            _ => false,
        };
        let delay = backoff.next_delay();
        if !transient || tokio::time::Instant::now() + delay > deadline || cancel.is_cancelled() {
            return Err(err);
        }
        tracing::warn!(error = %err, retry_in = ?delay, "cannot upload the outputs; retrying");
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = cancel.cancelled() => return Err(err),
        }
    }
}

/// The background task: on each step's end, scan and send what is new or changed. Every
/// failure here is only logged; the final pass redoes whatever did not arrive.
async fn background(
    publisher: Publisher,
    build_dir: PathBuf,
    patterns: Vec<String>,
    mut steps: mpsc::UnboundedReceiver<()>,
) -> u64 {
    let mut queued: HashMap<String, Seen> = HashMap::new();
    let mut sent = 0;
    while steps.recv().await.is_some() {
        // Steps that ended while the last batch went up are covered by one scan.
        while steps.try_recv().is_ok() {}
        let (dir, pats) = (build_dir.clone(), patterns.clone());
        let Ok(present) = tokio::task::spawn_blocking(move || present(&dir, &pats)).await else {
            continue;
        };
        let mut changed = Vec::new();
        for (name, (path, stamp)) in present {
            if queued.get(&name) != Some(&stamp) {
                queued.insert(name.clone(), stamp);
                changed.push(Source { name, path });
            }
        }
        if changed.is_empty() {
            continue;
        }
        let mut hashed: Vec<Hashed> = Vec::with_capacity(changed.len());
        for source in changed {
            match publisher.hash(std::slice::from_ref(&source)).await {
                Ok(h) => hashed.extend(h),
                Err(e) => {
                    tracing::debug!(error = %e, "not uploading an output in the background yet")
                }
            }
        }
        match publisher.upload(&hashed).await {
            Ok(s) => {
                tracing::debug!(
                    blobs = s.blobs,
                    bytes = s.bytes_sent,
                    "uploaded outputs in the background"
                );
                sent += s.bytes_sent;
            }
            Err(e) => {
                tracing::info!(error = %e, "a background upload failed; the final pass will retry")
            }
        }
    }
    sent
}

/// The files matching `patterns` right now, with what identifies their version. Unlike
/// [`expand`], a pattern without matches is not an error mid-build, and a file that cannot be
/// collected is left for the final pass to report.
fn present(build_dir: &Path, patterns: &[String]) -> BTreeMap<String, (PathBuf, Seen)> {
    let mut out = BTreeMap::new();
    for pattern in patterns {
        let Ok(files) = expand(build_dir, std::slice::from_ref(pattern)) else {
            continue;
        };
        for (name, path) in files {
            if let Ok(meta) = std::fs::symlink_metadata(&path) {
                out.insert(name, (path, seen(&meta)));
            }
        }
    }
    out
}

/// An executor that tells the upload queue about every step that succeeded.
pub(crate) struct StepsEnd<'a> {
    inner: &'a dyn Executor,
    steps: mpsc::WeakUnboundedSender<()>,
}

impl Executor for StepsEnd<'_> {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn description(&self) -> String {
        self.inner.description()
    }

    fn workspace(&self, job_dir: &Path) -> Result<Workspace, ExecError> {
        self.inner.workspace(job_dir)
    }

    fn run_step<'a>(&'a self, step: StepContext<'a>) -> StepFuture<'a> {
        Box::pin(async move {
            let run = self.inner.run_step(step).await;
            if let Ok(StepRun {
                exit: StepExit::Exited(0),
                ..
            }) = &run
                && let Some(steps) = self.steps.upgrade()
            {
                let _ = steps.send(());
            }
            run
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_must_stay_inside() {
        assert!(check_pattern("out/*.tar").is_ok());
        assert!(matches!(
            check_pattern("/etc/passwd"),
            Err(ArtifactError::BadPattern { .. })
        ));
        assert!(matches!(
            check_pattern("out/../../x"),
            Err(ArtifactError::BadPattern { .. })
        ));
        assert!(matches!(
            check_pattern(""),
            Err(ArtifactError::BadPattern { .. })
        ));
    }
}
