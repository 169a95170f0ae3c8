//! Declared inputs (`inputs:` of a job in `.quorum.yml`): files a build needs besides its source,
//! each named with a URL and a pinned SHA-256. Builds have no network, so the worker downloads
//! them before the build, outside the sandbox, checks each digest, keeps them in a cache keyed by
//! digest (`data_dir/inputs/sha256-<hex>`), and the sandbox binds them read-only at
//! `/inputs/<name>`.
//!
//! Nothing is trusted before its digest matches: a download goes to a temporary name in the
//! cache directory and is renamed to its digest's name only after the check, so the cache only
//! ever holds verified files and two jobs fetching the same input at once cannot see half of it.
//! A later lockfile-driven fetch phase (cargo, npm, pip) produces more of the same (name, URL,
//! digest) triples and goes through [`InputCache::fetch`] too.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use quorum_core::Digest;
use quorum_core::digest::Hasher;
use quorum_core::pipeline::Input;
use tokio::io::AsyncWriteExt as _;
use tokio_util::sync::CancellationToken;

use crate::executor::MountedInput;

/// One input may not take longer than this to download.
const DOWNLOAD_TIMEOUT: Duration = Duration::from_secs(10 * 60);
/// Nor be larger: a pipeline could otherwise fill the worker's disk before any digest is checked.
pub const MAX_INPUT_BYTES: u64 = 4 << 30;

/// Why an input could not be provided; the message names the input, its URL and what failed.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    #[error(
        "input `{name}` from {url} does not match its pinned digest: expected {expected}, got \
         {actual}"
    )]
    Mismatch {
        name: String,
        url: String,
        expected: Digest,
        actual: Digest,
    },
    #[error("input `{name}`: cannot download {url}: {reason}")]
    Download {
        name: String,
        url: String,
        reason: String,
    },
    #[error("input `{name}`: cannot store it in the cache {dir}: {source}")]
    Cache {
        name: String,
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("cancelled while fetching the inputs")]
    Cancelled,
}

/// The worker's cache of verified inputs.
#[derive(Debug, Clone)]
pub struct InputCache {
    dir: PathBuf,
    http: reqwest::Client,
}

impl InputCache {
    /// A cache in `dir` (created when first needed).
    pub fn new(dir: PathBuf) -> InputCache {
        InputCache {
            dir,
            http: reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(30))
                .build()
                .expect("a default reqwest client builds"),
        }
    }

    /// Where the verified file of `digest` is kept.
    pub fn path_of(&self, digest: &Digest) -> PathBuf {
        self.dir.join(format!("sha256-{}", digest.hex()))
    }

    /// Provides every input, from the cache or downloaded and verified, in the order given.
    pub async fn fetch(
        &self,
        inputs: &[Input],
        cancel: &CancellationToken,
    ) -> Result<Vec<MountedInput>, InputError> {
        let mut mounted = Vec::with_capacity(inputs.len());
        for input in inputs {
            let path = self.path_of(&input.sha256);
            if !tokio::fs::try_exists(&path).await.unwrap_or(false) {
                tokio::select! {
                    done = tokio::time::timeout(DOWNLOAD_TIMEOUT, self.download(input, &path)) => {
                        done.map_err(|_| InputError::Download {
                            name: input.name.clone(),
                            url: input.url.clone(),
                            reason: format!("took longer than {} s", DOWNLOAD_TIMEOUT.as_secs()),
                        })??
                    }
                    _ = cancel.cancelled() => return Err(InputError::Cancelled),
                }
            }
            mounted.push(MountedInput {
                name: input.name.clone(),
                path,
            });
        }
        Ok(mounted)
    }

    async fn download(&self, input: &Input, dest: &Path) -> Result<(), InputError> {
        static TEMPS: AtomicU64 = AtomicU64::new(0);
        let cache_err = |source| InputError::Cache {
            name: input.name.clone(),
            dir: self.dir.clone(),
            source,
        };
        let download_err = |reason: String| InputError::Download {
            name: input.name.clone(),
            url: input.url.clone(),
            reason,
        };
        tokio::fs::create_dir_all(&self.dir)
            .await
            .map_err(cache_err)?;
        let temp = self.dir.join(format!(
            "partial-{}-{}",
            std::process::id(),
            TEMPS.fetch_add(1, Ordering::Relaxed)
        ));
        let fetched = async {
            let mut response = self
                .http
                .get(&input.url)
                .send()
                .await
                .and_then(|r| r.error_for_status())
                .map_err(|e| download_err(e.to_string()))?;
            let mut file = tokio::fs::File::create(&temp).await.map_err(cache_err)?;
            let mut hasher = Hasher::new();
            let mut size = 0u64;
            while let Some(chunk) = response
                .chunk()
                .await
                .map_err(|e| download_err(e.to_string()))?
            {
                size += chunk.len() as u64;
                if size > MAX_INPUT_BYTES {
                    return Err(download_err(format!(
                        "larger than the worker's limit of {MAX_INPUT_BYTES} bytes"
                    )));
                }
                hasher.update(&chunk);
                file.write_all(&chunk).await.map_err(cache_err)?;
            }
            file.sync_all().await.map_err(cache_err)?;
            let actual = hasher.finish();
            if actual != input.sha256 {
                return Err(InputError::Mismatch {
                    name: input.name.clone(),
                    url: input.url.clone(),
                    expected: input.sha256,
                    actual,
                });
            }
            tokio::fs::rename(&temp, dest).await.map_err(cache_err)
        }
        .await;
        if fetched.is_err() {
            let _ = tokio::fs::remove_file(&temp).await;
        }
        fetched
    }
}
