//! Publishing files to an artifact store: the engine behind `quorum publish` and the worker's
//! uploads. Files are hashed once (a [`DigestCache`] of earlier digests keyed by path, size,
//! mtime, ctime and inode skips unchanged files), the store is asked in one call per 10 000
//! digests which blobs this tenant lacks, only those are sent (files up to 1 MiB in batches of
//! about 16 MiB, one request and one store transaction each; larger files one per request),
//! several requests at a time, and the manifest is recorded last. A run that fails part way
//! leaves its finished blobs (and batches) in the store, so running it again sends only the
//! rest.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{self, Read as _};
use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{StreamExt as _, TryStreamExt as _};
use quorum_core::digest::hash_reader;
use quorum_core::manifest::ManifestError;
use quorum_core::{Digest, Manifest, ManifestEntry};
use serde::{Deserialize, Serialize};

use crate::ClientError;
use crate::store::StoreClient;

/// Digests per `missing` call: the most the store answers at once.
const MISSING_BATCH: usize = 10_000;
/// Uploads in flight by default: enough to hide a round trip per file on a fast link.
pub const DEFAULT_PARALLEL: usize = 8;
/// A cache that grows past this many entries keeps only the files of the latest run.
const CACHE_MAX_ENTRIES: usize = 500_000;

/// Why files could not be published. Every variant about one file names it.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("--type `{kind}` must be one plain directory name: {reason}")]
    BadType { kind: String, reason: String },
    #[error("pattern `{pattern}` is not allowed: {reason}")]
    BadPattern { pattern: String, reason: String },
    #[error("pattern `{0}` matched no files")]
    NoMatch(String),
    #[error(
        "`{path}` has {depth} path components, so --strip={strip} would leave nothing of its name"
    )]
    StripTooDeep {
        path: String,
        depth: usize,
        strip: usize,
    },
    #[error("`{first}` and `{second}` would both be published as `{name}`; change --strip")]
    Collision {
        name: String,
        first: String,
        second: String,
    },
    #[error("`{0}` is a symlink; publish the file it points to instead")]
    Symlink(String),
    #[error("`{0}` is not a regular file")]
    NotRegular(String),
    #[error("`{0}` is not valid UTF-8")]
    NonUtf8(String),
    #[error("cannot read `{path}`: {source}")]
    Read { path: String, source: io::Error },
    #[error("`{0}` changed while it was being read; publish it once it is complete")]
    Changed(String),
    #[error("the store could not say which blobs it lacks: {0}")]
    Missing(ClientError),
    #[error("cannot upload `{path}`: {source}")]
    Upload { path: String, source: ClientError },
    #[error("the files do not form a valid manifest: {0}")]
    Manifest(#[from] ManifestError),
    #[error("cannot record the manifest: {0}")]
    Record(ClientError),
    #[error("the store recorded manifest {stored}, but this client computed {computed}")]
    ManifestDiffers { stored: Digest, computed: Digest },
}

/// One file to publish: where it is, and the path it gets in the manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    pub name: String,
    pub path: PathBuf,
}

/// Expands `patterns` relative to `base` and names each match `<kind>/<path without its first
/// `strip` components>`, the only transformation publishing makes. `*` stops at `/`, `**`
/// crosses directories, and directories themselves are skipped. Symlinks and special files are
/// refused rather than followed.
pub fn select(
    base: &Path,
    patterns: &[String],
    strip: usize,
    kind: &str,
) -> Result<Vec<Source>, PublishError> {
    if let Err(e) = quorum_core::names::check_relative_path(kind) {
        return Err(PublishError::BadType {
            kind: kind.to_string(),
            reason: e.to_string(),
        });
    }
    if kind.contains('/') {
        return Err(PublishError::BadType {
            kind: kind.to_string(),
            reason: "it contains `/`".into(),
        });
    }
    let base_str = base
        .to_str()
        .ok_or_else(|| PublishError::NonUtf8(base.display().to_string()))?;
    let options = glob::MatchOptions {
        case_sensitive: true,
        require_literal_separator: true,
        require_literal_leading_dot: false,
    };
    // Published name -> (relative path it came from, where it is).
    let mut chosen: BTreeMap<String, (String, PathBuf)> = BTreeMap::new();
    for pattern in patterns {
        check_pattern(pattern)?;
        let full = format!("{}/{pattern}", glob::Pattern::escape(base_str));
        let matches = glob::glob_with(&full, options).map_err(|e| PublishError::BadPattern {
            pattern: pattern.clone(),
            reason: e.msg.to_string(),
        })?;
        let mut matched = false;
        for found in matches {
            let found = found.map_err(|e| PublishError::Read {
                path: e.path().display().to_string(),
                source: e.into(),
            })?;
            let rel_path = found
                .strip_prefix(base)
                .expect("glob results start with the escaped base");
            let rel = rel_path
                .to_str()
                .ok_or_else(|| PublishError::NonUtf8(rel_path.display().to_string()))?
                .to_string();
            let meta = std::fs::symlink_metadata(&found).map_err(|source| PublishError::Read {
                path: rel.clone(),
                source,
            })?;
            if meta.file_type().is_symlink() {
                return Err(PublishError::Symlink(rel));
            }
            if meta.is_dir() {
                continue;
            }
            if !meta.is_file() {
                return Err(PublishError::NotRegular(rel));
            }
            matched = true;
            let parts: Vec<&str> = rel.split('/').collect();
            if parts.len() <= strip {
                return Err(PublishError::StripTooDeep {
                    depth: parts.len(),
                    path: rel.clone(),
                    strip,
                });
            }
            let name = format!("{kind}/{}", parts[strip..].join("/"));
            match chosen.get(&name) {
                Some((first, _)) if *first != rel => {
                    return Err(PublishError::Collision {
                        name,
                        first: first.clone(),
                        second: rel,
                    });
                }
                Some(_) => {}
                None => {
                    chosen.insert(name, (rel, found));
                }
            }
        }
        if !matched {
            return Err(PublishError::NoMatch(pattern.clone()));
        }
    }
    Ok(chosen
        .into_iter()
        .map(|(name, (_, path))| Source { name, path })
        .collect())
}

fn check_pattern(pattern: &str) -> Result<(), PublishError> {
    let bad = |reason: &str| {
        Err(PublishError::BadPattern {
            pattern: pattern.to_string(),
            reason: reason.into(),
        })
    };
    if pattern.is_empty() {
        return bad("it is empty");
    }
    let path = Path::new(pattern);
    if path.is_absolute() {
        return bad("it must be relative to the current directory");
    }
    if path.components().any(|c| c == Component::ParentDir) {
        return bad("it must not contain `..`");
    }
    if let Err(e) = glob::Pattern::new(pattern) {
        return bad(e.msg);
    }
    Ok(())
}

/// What identifies one version of a file without reading it. ctime and the inode are part of
/// it because mtime alone can be set back by anyone who writes the file (`touch -d`, or a build
/// clamping mtimes to SOURCE_DATE_EPOCH), while ctime cannot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Stamp {
    size: u64,
    mtime: [i64; 2],
    ctime: [i64; 2],
    ino: u64,
    dev: u64,
}

impl Stamp {
    fn of(m: &std::fs::Metadata) -> Stamp {
        Stamp {
            size: m.len(),
            mtime: [m.mtime(), m.mtime_nsec()],
            ctime: [m.ctime(), m.ctime_nsec()],
            ino: m.ino(),
            dev: m.dev(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct CacheEntry {
    path: String,
    #[serde(flatten)]
    stamp: Stamp,
    digest: Digest,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct CacheFile {
    version: u32,
    entries: Vec<CacheEntry>,
}

/// Digests of files hashed before, keyed by absolute path and valid only while the file's
/// [`Stamp`] is unchanged: the quick check that spares rehashing a tree that did not change.
#[derive(Debug, Default)]
pub struct DigestCache {
    file: Option<PathBuf>,
    entries: HashMap<PathBuf, (Stamp, Digest)>,
    used: HashSet<PathBuf>,
    changed: bool,
}

impl DigestCache {
    /// A cache that lives as long as the process (the worker keeps one per job).
    pub fn in_memory() -> DigestCache {
        DigestCache::default()
    }

    /// The cache kept in `file`. A missing file starts empty; so does a damaged one, with a
    /// warning, since the cache only ever saves work.
    pub fn load(file: &Path) -> DigestCache {
        let mut cache = DigestCache {
            file: Some(file.to_path_buf()),
            ..DigestCache::default()
        };
        let parsed = match std::fs::read(file) {
            Ok(bytes) => serde_json::from_slice::<CacheFile>(&bytes)
                .map_err(|e| e.to_string())
                .and_then(|c| {
                    if c.version == 1 {
                        Ok(c)
                    } else {
                        Err(format!("unknown version {}", c.version))
                    }
                }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(CacheFile::default()),
            Err(e) => Err(e.to_string()),
        };
        match parsed {
            Ok(c) => {
                cache.entries = c
                    .entries
                    .into_iter()
                    .map(|e| (PathBuf::from(e.path), (e.stamp, e.digest)))
                    .collect();
            }
            Err(e) => {
                tracing::warn!(file = %file.display(), error = %e, "ignoring the digest cache")
            }
        }
        cache
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn get(&mut self, path: &Path, stamp: &Stamp) -> Option<Digest> {
        let (s, d) = self.entries.get(path)?;
        if s != stamp {
            return None;
        }
        self.used.insert(path.to_path_buf());
        Some(*d)
    }

    fn put(&mut self, path: PathBuf, stamp: Stamp, digest: Digest) {
        self.used.insert(path.clone());
        self.entries.insert(path, (stamp, digest));
        self.changed = true;
    }

    /// Writes the cache back to its file (a new file renamed into place), if it has one and
    /// learned something.
    pub fn save(&mut self) -> io::Result<()> {
        let Some(file) = self.file.clone() else {
            return Ok(());
        };
        if !self.changed {
            return Ok(());
        }
        if self.entries.len() > CACHE_MAX_ENTRIES {
            let used = std::mem::take(&mut self.used);
            self.entries.retain(|p, _| used.contains(p));
            self.used = used;
        }
        let entries = self
            .entries
            .iter()
            .filter_map(|(p, (stamp, digest))| {
                Some(CacheEntry {
                    path: p.to_str()?.to_string(),
                    stamp: *stamp,
                    digest: *digest,
                })
            })
            .collect();
        let bytes = serde_json::to_vec(&CacheFile {
            version: 1,
            entries,
        })
        .map_err(io::Error::other)?;
        let dir = file.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir)?;
        let tmp = file.with_extension(format!("tmp.{}", std::process::id()));
        std::fs::write(&tmp, bytes)?;
        std::fs::rename(&tmp, &file)?;
        self.changed = false;
        Ok(())
    }
}

/// A file ready to publish: its manifest entry and where its bytes are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hashed {
    pub entry: ManifestEntry,
    pub path: PathBuf,
}

/// How errors name a local file: relative to the current directory when it is inside it.
fn shown(path: &Path) -> String {
    std::env::current_dir()
        .ok()
        .and_then(|cwd| path.strip_prefix(cwd).ok().map(Path::to_path_buf))
        .unwrap_or_else(|| path.to_path_buf())
        .display()
        .to_string()
}

/// Hashes one file, or takes its digest from the cache. Opened with O_NOFOLLOW and checked on
/// the open file, so a file swapped for a symlink after it was selected is refused too.
fn hash_one(source: &Source, cache: &Mutex<DigestCache>) -> Result<Hashed, PublishError> {
    let shown = shown(&source.path);
    let read_err = |source_err| PublishError::Read {
        path: shown.clone(),
        source: source_err,
    };
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&source.path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => PublishError::Symlink(shown.clone()),
            _ => read_err(e),
        })?;
    let meta = f.metadata().map_err(read_err)?;
    if !meta.is_file() {
        return Err(PublishError::NotRegular(shown.clone()));
    }
    let stamp = Stamp::of(&meta);
    let key = std::path::absolute(&source.path).map_err(read_err)?;
    let entry = |digest| Hashed {
        entry: ManifestEntry {
            path: source.name.clone(),
            mode: meta.permissions().mode() & 0o777,
            size: stamp.size,
            digest,
        },
        path: source.path.clone(),
    };
    if let Some(digest) = cache.lock().expect("cache lock").get(&key, &stamp) {
        return Ok(entry(digest));
    }
    let (digest, size) = hash_reader(&mut f).map_err(read_err)?;
    let after = Stamp::of(&f.metadata().map_err(read_err)?);
    if after != stamp || size != stamp.size {
        return Err(PublishError::Changed(shown.clone()));
    }
    cache.lock().expect("cache lock").put(key, stamp, digest);
    Ok(entry(digest))
}

/// Hears how publishing goes, for a progress bar. Every method has a no-op default.
pub trait Progress: Send + Sync {
    /// Hashing `bytes` in `files` starts.
    fn hashing(&self, _files: usize, _bytes: u64) {}
    /// Sending `bytes` in `blobs` starts (what the store already has is not counted).
    fn sending(&self, _blobs: usize, _bytes: u64) {}
    /// `bytes` more were hashed or sent.
    fn advance(&self, _bytes: u64) {}
    /// The current phase ended.
    fn done(&self) {}
}

struct Quiet;

impl Progress for Quiet {}

/// What [`Publisher::upload`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sent {
    /// Blobs sent.
    pub blobs: usize,
    pub bytes_sent: u64,
    /// Bytes of files whose content the store already had (or another file carried).
    pub bytes_skipped: u64,
}

/// What [`Publisher::publish`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    pub files: usize,
    pub sent: Sent,
    pub manifest: Digest,
    pub elapsed: Duration,
}

/// Files up to this size travel in batches (`POST /api/v1/blobs`, one request, one store
/// transaction and one sync per directory for many blobs); larger ones one per request, where
/// the per-request cost is small beside the bytes.
const BATCH_FILE_MAX: u64 = 1 << 20;
/// Content bytes a batch is closed at: big enough to spread the per-request cost, small enough
/// that several batches are in flight at once.
const BATCH_TARGET_BYTES: u64 = 16 << 20;

/// Splits `files` into upload units: large files alone, the others in batches.
fn batches(files: Vec<Hashed>) -> Vec<Vec<Hashed>> {
    let mut out = Vec::new();
    let mut open: Vec<Hashed> = Vec::new();
    let mut open_bytes = 0;
    for h in files {
        if h.entry.size > BATCH_FILE_MAX {
            out.push(vec![h]);
            continue;
        }
        open_bytes += h.entry.size;
        open.push(h);
        if open_bytes >= BATCH_TARGET_BYTES || open.len() == quorum_api::v1::store::MAX_BATCH_BLOBS
        {
            out.push(std::mem::take(&mut open));
            open_bytes = 0;
        }
    }
    if !open.is_empty() {
        out.push(open);
    }
    out
}

/// Reads the files of `batch` into one framed body and sends it. An error names the file whose
/// blob the store refused when the store says which, else the batch by its first file.
async fn send_batch(
    store: &StoreClient,
    token: &str,
    batch: Vec<Hashed>,
) -> Result<(), PublishError> {
    let files = batch.clone();
    let body = tokio::task::spawn_blocking(move || {
        let capacity = files.iter().map(|h| h.entry.size as usize + 80).sum();
        let mut body = Vec::with_capacity(capacity);
        for h in &files {
            let header = quorum_api::v1::store::batch_frame_header(&h.entry.digest, h.entry.size);
            body.extend_from_slice(header.as_bytes());
            let start = body.len();
            let read = std::fs::File::open(&h.path)
                .and_then(|f| f.take(h.entry.size + 1).read_to_end(&mut body));
            match read {
                Ok(n) if n as u64 == h.entry.size => {}
                Ok(_) => return Err(PublishError::Changed(shown(&h.path))),
                Err(source) => {
                    return Err(PublishError::Read {
                        path: shown(&h.path),
                        source,
                    });
                }
            }
            debug_assert_eq!(body.len() - start, h.entry.size as usize);
        }
        Ok(body)
    })
    .await
    .map_err(|e| PublishError::Read {
        path: shown(&batch[0].path),
        source: io::Error::other(e),
    })??;
    store
        .put_blobs(token, body)
        .await
        .map(drop)
        .map_err(|source| {
            let text = source.to_string();
            let path = match batch
                .iter()
                .find(|h| text.contains(&h.entry.digest.to_string()))
            {
                Some(h) => shown(&h.path),
                None => format!(
                    "{} (in a batch of {} files)",
                    shown(&batch[0].path),
                    batch.len()
                ),
            };
            PublishError::Upload { path, source }
        })
}

/// Publishes files with one upload token.
#[derive(Clone)]
pub struct Publisher {
    store: StoreClient,
    token: String,
    parallel: usize,
    hashers: usize,
    progress: Arc<dyn Progress>,
    cache: Arc<Mutex<DigestCache>>,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("store", &self.store.base())
            .field("parallel", &self.parallel)
            .finish_non_exhaustive()
    }
}

impl Publisher {
    pub fn new(store: StoreClient, token: &str) -> Publisher {
        Publisher {
            store,
            token: token.to_string(),
            parallel: DEFAULT_PARALLEL,
            hashers: std::thread::available_parallelism().map_or(2, |n| n.get()),
            progress: Arc::new(Quiet),
            cache: Arc::new(Mutex::new(DigestCache::in_memory())),
        }
    }

    /// Uploads in flight at once (at least one).
    pub fn parallel(mut self, n: usize) -> Publisher {
        self.parallel = n.max(1);
        self
    }

    pub fn progress(mut self, progress: Arc<dyn Progress>) -> Publisher {
        self.progress = progress;
        self
    }

    pub fn cache(mut self, cache: Arc<Mutex<DigestCache>>) -> Publisher {
        self.cache = cache;
        self
    }

    /// Hashes every source (on blocking threads, one per core), taking unchanged files'
    /// digests from the cache. Fails on the first file that cannot be read, naming it.
    pub async fn hash(&self, sources: &[Source]) -> Result<Vec<Hashed>, PublishError> {
        let paths: Vec<PathBuf> = sources.iter().map(|s| s.path.clone()).collect();
        let total = tokio::task::spawn_blocking(move || {
            paths
                .iter()
                .filter_map(|p| std::fs::metadata(p).ok())
                .map(|m| m.len())
                .sum()
        })
        .await
        .unwrap_or(0);
        self.progress.hashing(sources.len(), total);
        // Files go to the blocking threads in groups, so a tree of small or cached files costs
        // a few thread hand-offs rather than one per file.
        let group = sources.len().div_ceil(self.hashers * 16).clamp(1, 256);
        let hashed = futures::stream::iter(sources.chunks(group).map(<[Source]>::to_vec))
            .map(|group| {
                let cache = self.cache.clone();
                let progress = self.progress.clone();
                async move {
                    let first = shown(&group[0].path);
                    tokio::task::spawn_blocking(move || {
                        group
                            .iter()
                            .map(|source| {
                                let h = hash_one(source, &cache)?;
                                progress.advance(h.entry.size);
                                Ok(h)
                            })
                            .collect::<Result<Vec<_>, PublishError>>()
                    })
                    .await
                    .map_err(|e| PublishError::Read {
                        path: first,
                        source: io::Error::other(e),
                    })?
                }
            })
            .buffered(self.hashers)
            .try_concat()
            .await;
        self.progress.done();
        hashed
    }

    /// Sends the blobs of `files` that the store lacks for this token's tenant, one per digest:
    /// small ones in batches, large ones alone, [`Publisher::parallel`] requests at a time.
    /// Stops at the first failure, naming its file (or its batch); what was sent before stays,
    /// so calling again sends only the rest.
    pub async fn upload(&self, files: &[Hashed]) -> Result<Sent, PublishError> {
        let mut digests: Vec<Digest> = files.iter().map(|h| h.entry.digest).collect();
        digests.sort();
        digests.dedup();
        let mut missing = HashSet::new();
        for chunk in digests.chunks(MISSING_BATCH) {
            let lacks = self
                .store
                .missing(&self.token, chunk.to_vec())
                .await
                .map_err(PublishError::Missing)?;
            missing.extend(lacks);
        }
        // One upload per missing digest, from the first file that has it.
        let mut sent = Sent::default();
        let mut wanted = Vec::new();
        for h in files {
            if missing.remove(&h.entry.digest) {
                sent.blobs += 1;
                sent.bytes_sent += h.entry.size;
                wanted.push(h.clone());
            } else {
                sent.bytes_skipped += h.entry.size;
            }
        }
        self.progress.sending(sent.blobs, sent.bytes_sent);
        // Owned items and handles: the stream's futures borrow nothing, so they stay `Send`
        // for any caller.
        let (store, token, progress) = (
            self.store.clone(),
            Arc::new(self.token.clone()),
            self.progress.clone(),
        );
        let result = futures::stream::iter(batches(wanted))
            .map(move |batch| {
                let (store, token, progress) = (store.clone(), token.clone(), progress.clone());
                async move {
                    let bytes = batch.iter().map(|h| h.entry.size).sum();
                    match batch.as_slice() {
                        [h] if h.entry.size > BATCH_FILE_MAX => store
                            .put_file(&token, &h.entry.digest, &h.path)
                            .await
                            .map_err(|source| PublishError::Upload {
                                path: shown(&h.path),
                                source,
                            })?,
                        _ => send_batch(&store, &token, batch).await?,
                    }
                    progress.advance(bytes);
                    Ok::<_, PublishError>(())
                }
            })
            .buffer_unordered(self.parallel)
            .try_collect::<()>()
            .await;
        self.progress.done();
        result.map(|()| sent)
    }

    /// Records `manifest`; the store refuses it unless every blob it names has arrived.
    pub async fn record(&self, manifest: &Manifest) -> Result<(), PublishError> {
        let stored = self
            .store
            .put_manifest(&self.token, manifest)
            .await
            .map_err(PublishError::Record)?;
        let computed = manifest.digest();
        if stored != computed {
            return Err(PublishError::ManifestDiffers { stored, computed });
        }
        Ok(())
    }

    /// Hashes, uploads what the store lacks and records the manifest. The digest cache is saved
    /// whether or not the rest succeeds, since the digests are right either way.
    pub async fn publish(&self, sources: &[Source]) -> Result<Summary, PublishError> {
        let started = Instant::now();
        let hashed = self.hash(sources).await;
        self.save_cache();
        let hashed = hashed?;
        tracing::debug!(files = hashed.len(), elapsed = ?started.elapsed(), "hashed");
        // Checked before anything is sent: a tree that cannot be recorded is not uploaded.
        let manifest = Manifest::new(hashed.iter().map(|h| h.entry.clone()).collect())?;
        let sent = self.upload(&hashed).await?;
        tracing::debug!(blobs = sent.blobs, elapsed = ?started.elapsed(), "uploaded");
        self.record(&manifest).await?;
        tracing::debug!(elapsed = ?started.elapsed(), "recorded the manifest");
        Ok(Summary {
            files: hashed.len(),
            sent,
            manifest: manifest.digest(),
            elapsed: started.elapsed(),
        })
    }

    fn save_cache(&self) {
        if let Err(e) = self.cache.lock().expect("cache lock").save() {
            tracing::warn!(error = %e, "cannot save the digest cache");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(i: usize, size: u64) -> Hashed {
        Hashed {
            entry: ManifestEntry {
                path: format!("f/{i}"),
                mode: 0o644,
                size,
                digest: Digest::of(&i.to_le_bytes()),
            },
            path: PathBuf::from(format!("f/{i}")),
        }
    }

    fn shape(files: Vec<Hashed>) -> Vec<usize> {
        batches(files).iter().map(Vec::len).collect()
    }

    #[test]
    fn large_files_go_alone_and_small_ones_in_batches_closed_at_the_byte_target() {
        let half = BATCH_TARGET_BYTES / 2;
        let files = vec![
            file(0, 10),
            file(1, BATCH_FILE_MAX + 1),
            file(2, BATCH_FILE_MAX),
            file(3, 10),
        ];
        assert_eq!(shape(files), [1, 3]);
        // Closed once a batch reaches the target.
        let small = BATCH_FILE_MAX.min(half);
        let n = (BATCH_TARGET_BYTES / small) as usize;
        let files: Vec<_> = (0..n + 1).map(|i| file(i, small)).collect();
        assert_eq!(shape(files), [n, 1]);
    }

    #[test]
    fn a_batch_holds_at_most_the_frames_the_store_takes() {
        let max = quorum_api::v1::store::MAX_BATCH_BLOBS;
        let files: Vec<_> = (0..2 * max + 5).map(|i| file(i, 1)).collect();
        assert_eq!(shape(files), [max, max, 5]);
        assert!(shape(Vec::new()).is_empty());
    }
}
