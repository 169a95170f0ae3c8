//! Publishing files to an artifact store: the engine behind `quorum publish` and the worker's
//! uploads. Files are hashed once (a [`DigestCache`] of earlier digests keyed by path, size,
//! mtime, ctime and inode skips unchanged files, checked on the metadata [`select`]'s walk
//! read). [`Publisher::publish`] reads each small file the cache does not know once, hashing it
//! and sending it in a batch from the same buffer if the store lacks it (the large files it had
//! to hash travel beside those batches, one per request), then sends the manifest
//! first (`POST /api/v1/manifest`), relative to the last manifest this store accepted from this
//! cache when that is smaller, so an unchanged tree costs one small request; the store answers
//! the blobs its tenant lacks, only those are sent (files up to 4 MiB in batches of about 16 MiB,
//! one request and one store transaction each; larger files one per request), several requests
//! at a time, and the manifest is proposed again. The worker asks which blobs are missing
//! ([`Publisher::upload`]) as outputs appear and records the manifest at the end. A run that
//! fails part way leaves its finished blobs (and batches) in the store, so running it again
//! sends only the rest.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::OsString;
use std::io::{self, Read as _};
use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{StreamExt as _, TryStreamExt as _};
use quorum_api::v1::store::{ManifestAnswer, ManifestProposal};
use quorum_core::digest::hash_reader;
use quorum_core::manifest::ManifestError;
use quorum_core::{Digest, Manifest, ManifestEntry};

use crate::ClientError;
use crate::store::StoreClient;

/// Digests per `missing` call: the most the store answers at once.
const MISSING_BATCH: usize = 10_000;
/// Times the blobs a manifest lacks are sent before giving up: once, and again for blobs that
/// garbage collection took before the manifest named them.
const RECORD_ROUNDS: usize = 3;
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
    #[error(
        "the store still lacks {blobs} blobs of the manifest after {rounds} rounds of uploads; is its garbage collection collecting uploads right away?"
    )]
    StillMissing { blobs: usize, rounds: usize },
    #[error("the store recorded manifest {stored}, but this client computed {computed}")]
    ManifestDiffers { stored: Digest, computed: Digest },
}

/// One file to publish: where it is, and the path it gets in the manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    pub name: String,
    pub path: PathBuf,
}

/// The files [`select`] chose, in order of their published names, with the metadata the walk
/// read (its `lstat`) for the quick check, so a file is not stat'ed again before publishing.
///
/// The walk's metadata serves the first [`Publisher::publish`] of a selection only: a selection
/// published again is stat'ed again, since its files may have changed since the walk.
#[derive(Debug)]
pub struct Selection {
    sources: Vec<Source>,
    walked: Mutex<Option<Vec<std::fs::Metadata>>>,
}

impl Selection {
    /// The walk's metadata, once.
    fn take_walked(&self) -> Option<Vec<std::fs::Metadata>> {
        self.walked.lock().expect("selection lock").take()
    }
}

impl std::ops::Deref for Selection {
    type Target = [Source];

    fn deref(&self) -> &[Source] {
        &self.sources
    }
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
) -> Result<Selection, PublishError> {
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
    // Published name -> (relative path it came from, where it is, its lstat).
    let mut chosen: BTreeMap<String, (String, PathBuf, std::fs::Metadata)> = BTreeMap::new();
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
                Some((first, _, _)) if *first != rel => {
                    return Err(PublishError::Collision {
                        name,
                        first: first.clone(),
                        second: rel,
                    });
                }
                Some(_) => {}
                None => {
                    chosen.insert(name, (rel, found, meta));
                }
            }
        }
        if !matched {
            return Err(PublishError::NoMatch(pattern.clone()));
        }
    }
    let (sources, walked) = chosen
        .into_iter()
        .map(|(name, (_, path, meta))| (Source { name, path }, meta))
        .unzip();
    Ok(Selection {
        sources,
        walked: Mutex::new(Some(walked)),
    })
}

/// Why `pattern` cannot select files beneath `base` (named in the reason), if it cannot: it is
/// empty, absolute, or climbs out with `..`. `quorum publish` and the worker's artifact globs
/// share this rule.
pub fn pattern_problem(pattern: &str, base: &str) -> Option<String> {
    let path = Path::new(pattern);
    if pattern.is_empty() {
        Some("it is empty".into())
    } else if path.is_absolute() {
        Some(format!("it must be relative to {base}"))
    } else if path.components().any(|c| c == Component::ParentDir) {
        Some("it must not contain `..`".into())
    } else {
        None
    }
}

fn check_pattern(pattern: &str) -> Result<(), PublishError> {
    let bad = |reason: &str| {
        Err(PublishError::BadPattern {
            pattern: pattern.to_string(),
            reason: reason.into(),
        })
    };
    if let Some(reason) = pattern_problem(pattern, "the current directory") {
        return bad(&reason);
    }
    if let Err(e) = glob::Pattern::new(pattern) {
        return bad(e.msg);
    }
    Ok(())
}

/// What identifies one version of a file without reading it. ctime and the inode are part of
/// it because mtime alone can be set back by anyone who writes the file (`touch -d`, or a build
/// clamping mtimes to SOURCE_DATE_EPOCH), while ctime cannot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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

/// A manifest a store accepted: a base for the next publish to the same store.
#[derive(Debug, Clone)]
struct Accepted {
    store: String,
    digest: Digest,
    manifest: Manifest,
}

/// Accepted manifests remembered per store: enough for a few trees published in turn.
const ACCEPTED_PER_STORE: usize = 4;
/// The cache file's first bytes: the format and its version.
const CACHE_MAGIC: &[u8; 8] = b"QRMDC\x00\x00\x03";

/// Digests of files hashed before, keyed by absolute path and valid only while the file's
/// [`Stamp`] is unchanged: the quick check that spares rehashing a tree that did not change.
/// It also remembers the last manifests each store accepted, so the next publish can send only
/// what changed since (`ManifestProposal::base`).
///
/// The file is a compact binary form (length-prefixed fields, little-endian), read and written
/// whole: 10,000 entries take milliseconds either way, where JSON took a fifth of a second.
#[derive(Debug, Default)]
pub struct DigestCache {
    file: Option<PathBuf>,
    /// Keyed by the path's bytes: hashing a `Path` walks its components, which cost more than
    /// the lookups themselves over 10,000 files.
    entries: HashMap<OsString, (Stamp, Digest)>,
    used: HashSet<OsString>,
    /// Newest first.
    accepted: Vec<Accepted>,
    changed: bool,
}

impl DigestCache {
    /// A cache that lives as long as the process (the worker keeps one per job).
    pub fn in_memory() -> DigestCache {
        DigestCache::default()
    }

    /// The cache kept in `file`. A missing file starts empty; so does a damaged one (or one in
    /// another format), with a warning, since the cache only ever saves work.
    pub fn load(file: &Path) -> DigestCache {
        let mut cache = DigestCache {
            file: Some(file.to_path_buf()),
            ..DigestCache::default()
        };
        match std::fs::read(file) {
            Ok(bytes) => match decode(&bytes) {
                Ok((entries, accepted)) => {
                    cache.entries = entries;
                    cache.accepted = accepted;
                }
                Err(e) => {
                    tracing::warn!(file = %file.display(), error = %e, "ignoring the digest cache")
                }
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
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
        let (s, d) = self.entries.get(path.as_os_str())?;
        if s != stamp {
            return None;
        }
        self.used.insert(path.as_os_str().to_os_string());
        Some(*d)
    }

    fn put(&mut self, path: PathBuf, stamp: Stamp, digest: Digest) {
        let path = path.into_os_string();
        self.used.insert(path.clone());
        self.entries.insert(path, (stamp, digest));
        self.changed = true;
    }

    /// The remembered manifest of `store` that `manifest` differs least from, and the proposal
    /// relative to it; `None` when none would be smaller than the manifest in full.
    fn base_for(&self, store: &str, manifest: &Manifest) -> Option<(Digest, ManifestProposal)> {
        self.accepted
            .iter()
            .filter(|a| a.store == store)
            .map(|a| {
                let (entries, removed) = changes(&a.manifest, manifest);
                (
                    a.digest,
                    ManifestProposal {
                        base: Some(a.digest),
                        entries,
                        removed,
                    },
                )
            })
            .min_by_key(|(_, p)| p.entries.len() + p.removed.len())
            .filter(|(_, p)| p.entries.len() + p.removed.len() < manifest.entries.len())
    }

    /// Remembers that `store` accepted `manifest`.
    fn accepted(&mut self, store: &str, manifest: &Manifest, digest: Digest) {
        if self
            .accepted
            .first()
            .is_some_and(|a| a.store == store && a.digest == digest)
        {
            return;
        }
        self.forget(store, digest);
        self.accepted.insert(
            0,
            Accepted {
                store: store.to_string(),
                digest,
                manifest: manifest.clone(),
            },
        );
        let mut kept = 0;
        self.accepted.retain(|a| {
            kept += usize::from(a.store == store);
            a.store != store || kept <= ACCEPTED_PER_STORE
        });
        self.changed = true;
    }

    /// Forgets a manifest `store` no longer knows as a base.
    fn forget(&mut self, store: &str, digest: Digest) {
        let before = self.accepted.len();
        self.accepted
            .retain(|a| a.store != store || a.digest != digest);
        self.changed |= self.accepted.len() != before;
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
        let bytes = encode(&self.entries, &self.accepted);
        let dir = file.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir)?;
        let tmp = file.with_extension(format!("tmp.{}", std::process::id()));
        std::fs::write(&tmp, bytes)?;
        std::fs::rename(&tmp, &file)?;
        self.changed = false;
        Ok(())
    }
}

/// What `manifest` changes relative to `base` (both sorted by path): the entries added or
/// different, and the paths removed, each sorted.
fn changes(base: &Manifest, manifest: &Manifest) -> (Vec<ManifestEntry>, Vec<String>) {
    let (mut changed, mut removed) = (Vec::new(), Vec::new());
    let (mut old, mut new) = (
        base.entries.iter().peekable(),
        manifest.entries.iter().peekable(),
    );
    loop {
        match (old.peek(), new.peek()) {
            (None, None) => break,
            (Some(o), None) => {
                removed.push(o.path.clone());
                old.next();
            }
            (None, Some(n)) => {
                changed.push((*n).clone());
                new.next();
            }
            (Some(o), Some(n)) => match o.path.cmp(&n.path) {
                std::cmp::Ordering::Less => {
                    removed.push(o.path.clone());
                    old.next();
                }
                std::cmp::Ordering::Greater => {
                    changed.push((*n).clone());
                    new.next();
                }
                std::cmp::Ordering::Equal => {
                    if o != n {
                        changed.push((*n).clone());
                    }
                    old.next();
                    new.next();
                }
            },
        }
    }
    (changed, removed)
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    out.extend_from_slice(b);
}

fn encode(entries: &HashMap<OsString, (Stamp, Digest)>, accepted: &[Accepted]) -> Vec<u8> {
    use std::os::unix::ffi::OsStrExt as _;
    let mut out = Vec::with_capacity(entries.len() * 160 + 64);
    out.extend_from_slice(CACHE_MAGIC);
    out.extend_from_slice(&(entries.len() as u64).to_le_bytes());
    for (path, (s, digest)) in entries {
        put_bytes(&mut out, path.as_bytes());
        for n in [s.size, s.ino, s.dev] {
            out.extend_from_slice(&n.to_le_bytes());
        }
        for n in [s.mtime[0], s.mtime[1], s.ctime[0], s.ctime[1]] {
            out.extend_from_slice(&n.to_le_bytes());
        }
        out.extend_from_slice(digest.as_bytes());
    }
    out.extend_from_slice(&(accepted.len() as u64).to_le_bytes());
    for a in accepted {
        put_bytes(&mut out, a.store.as_bytes());
        out.extend_from_slice(a.digest.as_bytes());
        out.extend_from_slice(&(a.manifest.entries.len() as u64).to_le_bytes());
        for e in &a.manifest.entries {
            put_bytes(&mut out, e.path.as_bytes());
            out.extend_from_slice(&e.mode.to_le_bytes());
            out.extend_from_slice(&e.size.to_le_bytes());
            out.extend_from_slice(e.digest.as_bytes());
        }
    }
    let sum = Digest::of(&out);
    out.extend_from_slice(sum.as_bytes());
    out
}

/// Reads the cache file's fields in order, failing on a short or malformed file.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err("the file ends early".into());
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    fn i64(&mut self) -> Result<i64, String> {
        Ok(i64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    fn bytes(&mut self) -> Result<&'a [u8], String> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    fn text(&mut self) -> Result<String, String> {
        String::from_utf8(self.bytes()?.to_vec()).map_err(|_| "a name is not UTF-8".into())
    }
    fn digest(&mut self) -> Result<Digest, String> {
        Ok(Digest::from_bytes(
            self.take(32)?.try_into().expect("32 bytes"),
        ))
    }
    /// A count of items of at least `min` bytes each, checked against what is left so a damaged
    /// count cannot ask for a huge allocation.
    fn count(&mut self, min: usize) -> Result<usize, String> {
        let n = self.u64()?;
        if n > (self.0.len() / min) as u64 {
            return Err(format!("a count of {n} is larger than the file"));
        }
        Ok(n as usize)
    }
}

type Decoded = (HashMap<OsString, (Stamp, Digest)>, Vec<Accepted>);

/// Reads a cache file: its contents, then the SHA-256 of them. The checksum catches any damage
/// at once (a few milliseconds for a few megabytes), where checking each remembered manifest
/// against its digest meant serializing it again on every load.
fn decode(bytes: &[u8]) -> Result<Decoded, String> {
    use std::os::unix::ffi::OsStrExt as _;
    let Some(split) = bytes.len().checked_sub(32) else {
        return Err("the file ends early".into());
    };
    let (bytes, sum) = bytes.split_at(split);
    if Digest::of(bytes).as_bytes().as_slice() != sum {
        return Err("the file is damaged: its checksum does not match".into());
    }
    let mut r = Reader(bytes);
    if r.take(CACHE_MAGIC.len()).ok() != Some(CACHE_MAGIC.as_slice()) {
        return Err("not a digest cache of this version".into());
    }
    let n = r.count(4 + 3 * 8 + 4 * 8 + 32)?;
    let mut entries = HashMap::with_capacity(n);
    for _ in 0..n {
        let path = std::ffi::OsStr::from_bytes(r.bytes()?).to_os_string();
        let (size, ino, dev) = (r.u64()?, r.u64()?, r.u64()?);
        let mtime = [r.i64()?, r.i64()?];
        let ctime = [r.i64()?, r.i64()?];
        let stamp = Stamp {
            size,
            mtime,
            ctime,
            ino,
            dev,
        };
        entries.insert(path, (stamp, r.digest()?));
    }
    let n = r.count(4 + 32 + 8)?;
    let mut accepted = Vec::with_capacity(n);
    for _ in 0..n {
        let store = r.text()?;
        let digest = r.digest()?;
        let count = r.count(4 + 4 + 8 + 32)?;
        let mut list = Vec::with_capacity(count);
        for _ in 0..count {
            list.push(ManifestEntry {
                path: r.text()?,
                mode: r.u32()?,
                size: r.u64()?,
                digest: r.digest()?,
            });
        }
        accepted.push(Accepted {
            store,
            digest,
            manifest: Manifest { entries: list },
        });
    }
    if !r.0.is_empty() {
        return Err("the file has bytes after its end".into());
    }
    Ok((entries, accepted))
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

/// A file after the quick check: its digest known from the cache, hashed by the check, or left
/// to be read once, hashed and sent from the same buffer ([`Publisher::stream`]).
enum Checked {
    Known(Hashed),
    /// Read and hashed by the check (a file too large for a batch that the cache did not know),
    /// so its content is likely new to the store too.
    Read(Hashed),
    /// With its size from the quick check's metadata, for batching.
    Unread(Source, u64),
}

/// Takes one file's digest from the cache, else hashes it, or with `defer` leaves a file small
/// enough for a batch unread. `walked` is its `lstat` from the walk, if there was one. A file
/// that is read is opened with O_NOFOLLOW and checked on the open file, so a file swapped for a
/// symlink after it was selected is refused too.
fn check_one(
    source: &Source,
    walked: Option<std::fs::Metadata>,
    cache: &Mutex<DigestCache>,
    defer: bool,
) -> Result<Checked, PublishError> {
    let read_err = |e| PublishError::Read {
        path: shown(&source.path),
        source: e,
    };
    let key = std::path::absolute(&source.path).map_err(read_err)?;
    // The quick check needs no open: a regular file (not followed if a symlink) whose stamp
    // the cache knows. Its bytes are read only when sent, and the store checks them then.
    let meta = match walked {
        Some(meta) => meta,
        None => std::fs::symlink_metadata(&source.path).map_err(read_err)?,
    };
    if meta.is_file()
        && let Some(digest) = cache
            .lock()
            .expect("cache lock")
            .get(&key, &Stamp::of(&meta))
    {
        return Ok(Checked::Known(Hashed {
            entry: ManifestEntry {
                path: source.name.clone(),
                mode: meta.permissions().mode() & 0o777,
                size: meta.len(),
                digest,
            },
            path: source.path.clone(),
        }));
    }
    if defer && meta.is_file() && meta.len() <= BATCH_FILE_MAX {
        return Ok(Checked::Unread(source.clone(), meta.len()));
    }
    let hashed = read_one(source, key, cache, None)?;
    Ok(Checked::Read(hashed))
}

/// Reads and hashes one file, opened with O_NOFOLLOW and checked on the open file, and records
/// its digest in the cache; with `keep`, appends its bytes there too. `key` is its absolute
/// path.
fn read_one(
    source: &Source,
    key: PathBuf,
    cache: &Mutex<DigestCache>,
    keep: Option<&mut Vec<u8>>,
) -> Result<Hashed, PublishError> {
    // Named only when something goes wrong: finding the current directory per file is not free.
    let name = || shown(&source.path);
    let read_err = |e| PublishError::Read {
        path: name(),
        source: e,
    };
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&source.path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => PublishError::Symlink(name()),
            _ => read_err(e),
        })?;
    let meta = f.metadata().map_err(read_err)?;
    if !meta.is_file() {
        return Err(PublishError::NotRegular(name()));
    }
    let stamp = Stamp::of(&meta);
    let (digest, size) = match keep {
        Some(kept) => {
            let start = kept.len();
            (&mut f)
                .take(stamp.size + 1)
                .read_to_end(kept)
                .map_err(read_err)?;
            let bytes = &kept[start..];
            (Digest::of(bytes), bytes.len() as u64)
        }
        None => hash_reader(&mut f).map_err(read_err)?,
    };
    let after = Stamp::of(&f.metadata().map_err(read_err)?);
    if after != stamp || size != stamp.size {
        return Err(PublishError::Changed(name()));
    }
    cache.lock().expect("cache lock").put(key, stamp, digest);
    let hashed = Hashed {
        entry: ManifestEntry {
            path: source.name.clone(),
            mode: meta.permissions().mode() & 0o777,
            size: stamp.size,
            digest,
        },
        path: source.path.clone(),
    };
    Ok(hashed)
}

/// Hears how publishing goes, for a progress bar. Every method has a no-op default.
pub trait Progress: Send + Sync {
    /// Whether [`Progress::hashing`] needs the bytes to hash (a stat of every file first).
    fn shows_totals(&self) -> bool {
        false
    }
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
/// transaction and, in a local store, one pack file synced once for many blobs); larger ones
/// one per request, where the per-request cost is small beside the bytes. The store holds such
/// frames whole and packs them ([`quorum_api::v1::store::WHOLE_FRAME`]); sent alone, a file of a
/// few MiB cost a file, a sync and a transaction of its own, and was hashed before anything was
/// sent.
const BATCH_FILE_MAX: u64 = quorum_api::v1::store::WHOLE_FRAME;
/// Content bytes a batch is closed at: big enough to spread the per-request cost, small enough
/// that several batches are in flight at once.
const BATCH_TARGET_BYTES: u64 = 16 << 20;

/// Request bodies kept for the next batch once sent. A first upload fills a body of about
/// [`BATCH_TARGET_BYTES`] per batch, and memory fresh from the kernel costs a page fault and a
/// zeroed page when first touched: a fifth of this process's time before bodies were kept
/// (glibc's allocator hands such large blocks back to the kernel when they are freed).
#[derive(Clone)]
struct Bodies {
    kept: Arc<Mutex<Vec<Vec<u8>>>>,
    /// At most this many are kept: as many as requests are in flight.
    most: usize,
}

/// A body taken from [`Bodies`], handed back when dropped (by the HTTP client, once sent).
struct Body {
    bytes: Vec<u8>,
    home: Bodies,
}

impl Bodies {
    fn new(most: usize) -> Bodies {
        Bodies {
            kept: Arc::new(Mutex::new(Vec::new())),
            most,
        }
    }

    /// An empty body with room for `capacity` bytes.
    fn take(&self, capacity: usize) -> Body {
        let mut bytes = self
            .kept
            .lock()
            .expect("bodies lock")
            .pop()
            .unwrap_or_default();
        bytes.reserve(capacity);
        Body {
            bytes,
            home: self.clone(),
        }
    }
}

impl Body {
    /// The body for a request, without a copy.
    fn into_bytes(self) -> Bytes {
        Bytes::from_owner(self)
    }
}

impl AsRef<[u8]> for Body {
    fn as_ref(&self) -> &[u8] {
        &self.bytes
    }
}

impl Drop for Body {
    fn drop(&mut self) {
        let mut bytes = std::mem::take(&mut self.bytes);
        bytes.clear();
        let mut kept = self.home.kept.lock().expect("bodies lock");
        if kept.len() < self.home.most {
            kept.push(bytes);
        }
    }
}

/// A batch frame's header, as bytes.
fn frame_header(digest: &Digest, size: u64) -> Vec<u8> {
    quorum_api::v1::store::batch_frame_header(digest, size).into_bytes()
}

/// Splits `files` into upload units: large files alone, the others in batches.
fn batches(files: Vec<Hashed>) -> Vec<Vec<Hashed>> {
    batches_by(files, |h| h.entry.size)
}

/// [`batches`] of any items whose size `size` tells.
fn batches_by<T>(files: Vec<T>, size: impl Fn(&T) -> u64) -> Vec<Vec<T>> {
    let mut out = Vec::new();
    let mut open: Vec<T> = Vec::new();
    let mut open_bytes = 0;
    for h in files {
        let bytes = size(&h);
        if bytes > BATCH_FILE_MAX {
            out.push(vec![h]);
            continue;
        }
        open_bytes += bytes;
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

/// Reads the files of `batch` into one framed body and sends it ([`put_batch`]).
async fn send_batch(
    store: &StoreClient,
    token: &str,
    bodies: &Bodies,
    batch: Vec<Hashed>,
) -> Result<(), PublishError> {
    let files = batch.clone();
    let bodies = bodies.clone();
    let body = tokio::task::spawn_blocking(move || {
        let capacity = files.iter().map(|h| h.entry.size as usize + 80).sum();
        let mut taken = bodies.take(capacity);
        let body = &mut taken.bytes;
        for h in &files {
            let header = quorum_api::v1::store::batch_frame_header(&h.entry.digest, h.entry.size);
            body.extend_from_slice(header.as_bytes());
            let start = body.len();
            let read = std::fs::File::open(&h.path)
                .and_then(|f| f.take(h.entry.size + 1).read_to_end(body));
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
        Ok(taken)
    })
    .await
    .map_err(|e| PublishError::Read {
        path: shown(&batch[0].path),
        source: io::Error::other(e),
    })??;
    put_batch(store, token, body, &batch).await
}

/// Sends one framed body of blobs of `batch`. An error names the file whose blob the store
/// refused when the store says which, else the batch by its first file.
async fn put_batch(
    store: &StoreClient,
    token: &str,
    body: Body,
    batch: &[Hashed],
) -> Result<(), PublishError> {
    store
        .put_blobs(token, body.into_bytes())
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

/// Sends one upload unit of files already hashed: a large file alone (one `PUT`), or a batch.
async fn send_unit(
    store: &StoreClient,
    token: &str,
    bodies: &Bodies,
    batch: Vec<Hashed>,
) -> Result<(), PublishError> {
    match batch.as_slice() {
        [h] if h.entry.size > BATCH_FILE_MAX => store
            .put_file(token, &h.entry.digest, &h.path)
            .await
            .map_err(|source| PublishError::Upload {
                path: shown(&h.path),
                source,
            }),
        _ => send_batch(store, token, bodies, batch).await,
    }
}

/// What [`Publisher::stream`] sends in one request.
enum Unit {
    /// Files hashed already ([`send_unit`]).
    Read(Vec<Hashed>),
    /// Files to read, hash and frame ([`stream_batch`]).
    Unread(Vec<(Source, u64)>),
}

/// `a`'s items spread evenly among `b`'s, so that requests of both kinds are in flight
/// together.
fn spread<T>(a: Vec<T>, b: Vec<T>) -> Vec<T> {
    let (n, m) = (a.len(), b.len());
    let mut out = Vec::with_capacity(n + m);
    let (mut a, mut b) = (a.into_iter().peekable(), b.into_iter().peekable());
    let (mut taken_a, mut taken_b) = (0, 0);
    while a.peek().is_some() || b.peek().is_some() {
        // Take from `a` while it is behind its share of what has been taken.
        let from_a = b.peek().is_none() || (a.peek().is_some() && taken_a * m <= taken_b * n);
        if from_a {
            out.extend(a.next());
            taken_a += 1;
        } else {
            out.extend(b.next());
            taken_b += 1;
        }
    }
    out
}

/// Reads the files of `batch` (on a blocking thread), hashing each from its buffer, asks the
/// store which of their blobs it lacks, and sends those not `claimed` by another request in one
/// framed body. Returns every file's digest and what was sent.
async fn stream_batch(
    store: &StoreClient,
    token: &str,
    bodies: &Bodies,
    cache: &Arc<Mutex<DigestCache>>,
    claimed: &Mutex<HashSet<Digest>>,
    batch: Vec<(Source, u64)>,
) -> Result<(Vec<Hashed>, Sent), PublishError> {
    let first = shown(&batch[0].0.path);
    let (cache, bodies) = (cache.clone(), bodies.clone());
    // Each file is read straight into the body, after room for its frame header (whose length
    // its size decides), and the header written once the file is hashed: no buffer per file,
    // and no byte copied again (fresh buffers' first touch was a fifth of this process's time).
    let (mut taken, read) = tokio::task::spawn_blocking(move || {
        let room = |size: u64| frame_header(&Digest::of(b""), size).len();
        let capacity = batch.iter().map(|(_, n)| room(*n) + *n as usize).sum();
        let mut taken = bodies.take(capacity);
        let body = &mut taken.bytes;
        let mut read = Vec::with_capacity(batch.len());
        for (source, size) in &batch {
            let key = std::path::absolute(&source.path).map_err(|e| PublishError::Read {
                path: shown(&source.path),
                source: e,
            })?;
            let start = body.len();
            body.resize(start + room(*size), 0);
            let h = read_one(source, key, &cache, Some(body))?;
            let header = frame_header(&h.entry.digest, h.entry.size);
            // The size the walk saw decided the room; a file that has changed since is refused
            // by `read_one` unless only its time stamp did.
            body.splice(start..start + room(*size), header);
            read.push((h, start..body.len()));
        }
        Ok::<_, PublishError>((taken, read))
    })
    .await
    .map_err(|e| PublishError::Read {
        path: first,
        source: io::Error::other(e),
    })??;
    let mut digests: Vec<Digest> = read.iter().map(|(h, _)| h.entry.digest).collect();
    digests.sort();
    digests.dedup();
    let lacking = store
        .missing(token, digests)
        .await
        .map_err(PublishError::Missing)?;
    let mut ours: HashSet<Digest> = {
        let mut claimed = claimed.lock().expect("claimed lock");
        lacking.into_iter().filter(|d| claimed.insert(*d)).collect()
    };
    let mut framed = Vec::new();
    let mut hashed = Vec::with_capacity(read.len());
    // The frames of blobs not ours to send are cut out, the others moved up in place.
    let mut end = 0;
    let body = &mut taken.bytes;
    for (h, frame) in read {
        if ours.remove(&h.entry.digest) {
            if frame.start != end {
                body.copy_within(frame.clone(), end);
            }
            end += frame.len();
            framed.push(h.clone());
        }
        hashed.push(h);
    }
    body.truncate(end);
    let sent = Sent {
        blobs: framed.len(),
        bytes_sent: framed.iter().map(|h| h.entry.size).sum(),
        bytes_skipped: 0,
    };
    if !framed.is_empty() {
        put_batch(store, token, taken, &framed).await?;
    }
    Ok((hashed, sent))
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
    bodies: Bodies,
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
            bodies: Bodies::new(DEFAULT_PARALLEL),
        }
    }

    /// Uploads in flight at once (at least one).
    pub fn parallel(mut self, n: usize) -> Publisher {
        self.parallel = n.max(1);
        self.bodies = Bodies::new(self.parallel);
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
        let checked = self.check(sources, None, false).await?;
        Ok(checked
            .into_iter()
            .map(|c| match c {
                Checked::Known(h) | Checked::Read(h) => h,
                Checked::Unread(..) => unreachable!("nothing is deferred without `defer`"),
            })
            .collect())
    }

    /// The quick check of every source (with the walk's metadata when `walked` has it), hashing
    /// on blocking threads, one per core, what the cache does not know; with `defer`, files
    /// small enough for a batch are left unread for [`Publisher::stream`].
    async fn check(
        &self,
        sources: &[Source],
        walked: Option<Vec<std::fs::Metadata>>,
        defer: bool,
    ) -> Result<Vec<Checked>, PublishError> {
        // The total costs a stat per file unless the walk has them: only worth it when someone
        // shows it.
        let total = match &walked {
            _ if !self.progress.shows_totals() => 0,
            Some(metas) => metas.iter().map(std::fs::Metadata::len).sum(),
            None => {
                let paths: Vec<PathBuf> = sources.iter().map(|s| s.path.clone()).collect();
                tokio::task::spawn_blocking(move || {
                    paths
                        .iter()
                        .filter_map(|p| std::fs::metadata(p).ok())
                        .map(|m| m.len())
                        .sum()
                })
                .await
                .unwrap_or(0)
            }
        };
        self.progress.hashing(sources.len(), total);
        // Files go to the blocking threads in groups, so a tree of small or cached files costs
        // a few thread hand-offs rather than one per file.
        let group = sources.len().div_ceil(self.hashers * 16).clamp(1, 256);
        let mut walked = walked.map(Vec::into_iter);
        let groups: Vec<(Vec<Source>, Option<Vec<std::fs::Metadata>>)> = sources
            .chunks(group)
            .map(|g| {
                let metas = walked.as_mut().map(|w| w.by_ref().take(g.len()).collect());
                (g.to_vec(), metas)
            })
            .collect();
        let checked = futures::stream::iter(groups)
            .map(|(group, metas)| {
                let cache = self.cache.clone();
                let progress = self.progress.clone();
                async move {
                    let first = shown(&group[0].path);
                    tokio::task::spawn_blocking(move || {
                        let mut metas = metas.map(Vec::into_iter);
                        group
                            .iter()
                            .map(|source| {
                                let walked = metas.as_mut().and_then(Iterator::next);
                                let c = check_one(source, walked, &cache, defer)?;
                                if let Checked::Known(h) | Checked::Read(h) = &c {
                                    progress.advance(h.entry.size);
                                }
                                Ok(c)
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
        checked
    }

    /// Sends what this run reads that the store lacks, in one stream of requests,
    /// [`Publisher::parallel`] at a time: the files the check hashed (`read`: too large for a
    /// batch; the store is asked about all of them in one call first), one per request, spread
    /// among batches of `files`, each of which is read once, hashed and framed from the same
    /// buffer (per batch, the store is asked which of its blobs it lacks, and those are sent at
    /// once). A first upload so reads its small files once and hashes while sending, where a
    /// separate hashing pass would read them twice and send nothing until every file was
    /// hashed, and its large files travel beside the batches, so the first proposal of the
    /// manifest is recorded. A blob is sent once even if several files carry it. Returns the
    /// digests of `files`.
    async fn stream(
        &self,
        read: &[Hashed],
        files: Vec<(Source, u64)>,
    ) -> Result<(Vec<Hashed>, Sent), PublishError> {
        if files.is_empty() && read.is_empty() {
            return Ok((Vec::new(), Sent::default()));
        }
        let total = files.iter().map(|(_, size)| size).sum::<u64>()
            + read.iter().map(|h| h.entry.size).sum::<u64>();
        self.progress.sending(files.len() + read.len(), total);
        // Claimed across requests, so a blob two of them carry goes once.
        let claimed = Arc::new(Mutex::new(HashSet::new()));
        let mut lacking = self.lacking(read).await?;
        claimed
            .lock()
            .expect("claimed lock")
            .extend(lacking.iter().copied());
        let wanted: Vec<Hashed> = read
            .iter()
            .filter(|h| lacking.remove(&h.entry.digest))
            .cloned()
            .collect();
        let units = spread(
            batches(wanted).into_iter().map(Unit::Read).collect(),
            batches_by(files, |(_, size)| *size)
                .into_iter()
                .map(Unit::Unread)
                .collect(),
        );
        let result = futures::stream::iter(units)
            .map(|unit| {
                let (store, token, bodies) =
                    (self.store.clone(), self.token.clone(), self.bodies.clone());
                let (cache, progress, claimed) =
                    (self.cache.clone(), self.progress.clone(), claimed.clone());
                async move {
                    match unit {
                        Unit::Read(batch) => {
                            let sent = Sent {
                                blobs: batch.len(),
                                bytes_sent: batch.iter().map(|h| h.entry.size).sum(),
                                bytes_skipped: 0,
                            };
                            send_unit(&store, &token, &bodies, batch).await?;
                            progress.advance(sent.bytes_sent);
                            Ok((Vec::new(), sent))
                        }
                        Unit::Unread(batch) => {
                            let (hashed, sent) =
                                stream_batch(&store, &token, &bodies, &cache, &claimed, batch)
                                    .await?;
                            progress.advance(hashed.iter().map(|h| h.entry.size).sum());
                            Ok((hashed, sent))
                        }
                    }
                }
            })
            .buffer_unordered(self.parallel)
            .try_fold(
                (Vec::new(), Sent::default()),
                |(mut all, mut sent), (hashed, more)| async move {
                    all.extend(hashed);
                    sent.blobs += more.blobs;
                    sent.bytes_sent += more.bytes_sent;
                    Ok((all, sent))
                },
            )
            .await;
        self.progress.done();
        result
    }

    /// Sends the blobs of `files` that the store lacks for this token's tenant, one per digest:
    /// small ones in batches, large ones alone, [`Publisher::parallel`] requests at a time.
    /// Stops at the first failure, naming its file (or its batch); what was sent before stays,
    /// so calling again sends only the rest.
    pub async fn upload(&self, files: &[Hashed]) -> Result<Sent, PublishError> {
        let missing = self.lacking(files).await?;
        self.send(files, missing).await
    }

    /// Which of `files`' blobs the store lacks, asked in as few `missing` calls as the batch
    /// bound allows.
    async fn lacking(&self, files: &[Hashed]) -> Result<HashSet<Digest>, PublishError> {
        let mut digests: Vec<Digest> = files.iter().map(|h| h.entry.digest).collect();
        digests.sort();
        digests.dedup();
        let mut lacking = HashSet::new();
        for chunk in digests.chunks(MISSING_BATCH) {
            let lacks = self
                .store
                .missing(&self.token, chunk.to_vec())
                .await
                .map_err(PublishError::Missing)?;
            lacking.extend(lacks);
        }
        Ok(lacking)
    }

    /// Sends the blobs of `files` whose digests are in `missing`, one per digest, from the first
    /// file that has it.
    async fn send(
        &self,
        files: &[Hashed],
        mut missing: HashSet<Digest>,
    ) -> Result<Sent, PublishError> {
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
        let (store, token, progress, bodies) = (
            self.store.clone(),
            Arc::new(self.token.clone()),
            self.progress.clone(),
            self.bodies.clone(),
        );
        let result = futures::stream::iter(batches(wanted))
            .map(move |batch| {
                let (store, token, progress, bodies) = (
                    store.clone(),
                    token.clone(),
                    progress.clone(),
                    bodies.clone(),
                );
                async move {
                    let bytes = batch.iter().map(|h| h.entry.size).sum();
                    send_unit(&store, &token, &bodies, batch).await?;
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

    /// Takes the digests the cache knows (the quick check, on the walk's metadata), hashes
    /// the large files it does not, reads, hashes and sends the small ones it does not in one
    /// pass ([`Publisher::stream`]), then proposes the manifest, uploads the blobs the store
    /// asks for and proposes it again (see [`Publisher::propose`]). The digest cache is saved
    /// whether or not the rest succeeds, since the digests are right either way.
    pub async fn publish(&self, sources: &Selection) -> Result<Summary, PublishError> {
        let started = Instant::now();
        let result = async {
            let checked = self.check(sources, sources.take_walked(), true).await?;
            let (mut hashed, mut read, mut unread) =
                (Vec::with_capacity(checked.len()), Vec::new(), Vec::new());
            for c in checked {
                match c {
                    Checked::Known(h) => hashed.push(h),
                    Checked::Read(h) => read.push(h),
                    Checked::Unread(s, size) => unread.push((s, size)),
                }
            }
            tracing::debug!(
                known = hashed.len(), read = read.len(), unread = unread.len(),
                elapsed = ?started.elapsed(), "checked"
            );
            // Checked before anything is sent: a tree that cannot be recorded is not uploaded.
            // The digests do not enter the checks, so the unread files' stand in as empty.
            Manifest::new(
                hashed
                    .iter()
                    .map(|h| h.entry.clone())
                    .chain(read.iter().map(|h| h.entry.clone()))
                    .chain(unread.iter().map(|(s, _)| ManifestEntry {
                        path: s.name.clone(),
                        mode: 0,
                        size: 0,
                        digest: Digest::of(b""),
                    }))
                    .collect(),
            )?;
            let (streamed, early) = self.stream(&read, unread).await?;
            // The store has every blob of these now, or has just said it has.
            let settled: HashSet<Digest> = read
                .iter()
                .chain(&streamed)
                .map(|h| h.entry.digest)
                .collect();
            hashed.extend(read);
            hashed.extend(streamed);
            tracing::debug!(blobs = early.blobs, elapsed = ?started.elapsed(), "hashed while sending");
            let manifest = Manifest::new(hashed.iter().map(|h| h.entry.clone()).collect())?;
            // Serializing 10,000 entries to hash them is worth doing once.
            let digest = manifest.digest();
            let mut sent = self.propose(&hashed, &manifest, digest, &settled).await?;
            sent.blobs += early.blobs;
            sent.bytes_sent += early.bytes_sent;
            sent.bytes_skipped = sent.bytes_skipped.saturating_sub(early.bytes_sent);
            tracing::debug!(blobs = sent.blobs, elapsed = ?started.elapsed(), "recorded the manifest");
            Ok(Summary {
                files: hashed.len(),
                sent,
                manifest: digest,
                elapsed: started.elapsed(),
            })
        }
        .await;
        self.save_cache();
        result
    }

    /// Records `manifest` of `files` (whose digest is `digest`), manifest first: proposed
    /// relative to the remembered manifest of this store it differs least from (or in full), so
    /// an unchanged tree costs one small request; the store answers the blobs it lacks, which are sent before proposing
    /// again. The changed entries' blobs, but for those this run has sent or been told the store
    /// has (`settled`), are asked about (`missing`) and sent before the first proposal, so a
    /// changed tree is usually recorded by it. A base the store does not know
    /// for this tenant is forgotten and the manifest sent in full. What the store accepts is
    /// remembered as the next base.
    pub async fn propose(
        &self,
        files: &[Hashed],
        manifest: &Manifest,
        digest: Digest,
        settled: &HashSet<Digest>,
    ) -> Result<Sent, PublishError> {
        let store = self.store.base().to_string();
        let mut proposal = self
            .cache
            .lock()
            .expect("cache lock")
            .base_for(&store, manifest);
        let mut sent = Sent::default();
        // The changed entries' blobs are asked about and sent first: a changed tree then costs
        // the store one application of the changes, not two.
        let unsettled: Vec<Digest> = proposal
            .iter()
            .flat_map(|(_, delta)| &delta.entries)
            .map(|e| e.digest)
            .filter(|d| !settled.contains(d))
            .collect();
        if !unsettled.is_empty() {
            let mut digests = unsettled;
            digests.sort();
            digests.dedup();
            let mut lacking = HashSet::new();
            for chunk in digests.chunks(MISSING_BATCH) {
                let lacks = self
                    .store
                    .missing(&self.token, chunk.to_vec())
                    .await
                    .map_err(PublishError::Missing)?;
                lacking.extend(lacks);
            }
            sent = self.send(files, lacking).await?;
        }
        let mut uploads = 0;
        loop {
            let full;
            let asked = match &proposal {
                Some((_, delta)) => delta,
                None => {
                    full = ManifestProposal {
                        base: None,
                        entries: manifest.entries.clone(),
                        removed: Vec::new(),
                    };
                    &full
                }
            };
            match self.store.record_manifest(&self.token, asked).await {
                Ok(ManifestAnswer::Recorded { digest: stored }) => {
                    if stored != digest {
                        return Err(PublishError::ManifestDiffers {
                            stored,
                            computed: digest,
                        });
                    }
                    break;
                }
                Ok(ManifestAnswer::Missing { digests }) => {
                    if uploads == RECORD_ROUNDS {
                        return Err(PublishError::StillMissing {
                            blobs: digests.len(),
                            rounds: RECORD_ROUNDS,
                        });
                    }
                    uploads += 1;
                    let more = self.send(files, digests.into_iter().collect()).await?;
                    sent.blobs += more.blobs;
                    sent.bytes_sent += more.bytes_sent;
                }
                Err(e) if proposal.is_some() && e.status() == Some(404) => {
                    tracing::info!(error = %e, "sending the manifest in full");
                    if let Some((base, _)) = proposal.take() {
                        self.cache.lock().expect("cache lock").forget(&store, base);
                    }
                }
                Err(e) => return Err(PublishError::Record(e)),
            }
        }
        self.cache
            .lock()
            .expect("cache lock")
            .accepted(&store, manifest, digest);
        let total: u64 = files.iter().map(|h| h.entry.size).sum();
        sent.bytes_skipped = total.saturating_sub(sent.bytes_sent);
        Ok(sent)
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

    #[test]
    fn a_sent_body_is_kept_for_the_next_and_no_more_than_requests_in_flight() {
        let bodies = Bodies::new(2);
        let mut first = bodies.take(1 << 20);
        first.bytes.extend_from_slice(b"frames");
        let memory = first.bytes.as_ptr();
        let sent = first.into_bytes();
        assert_eq!(&sent[..], b"frames");
        let copy = sent.clone();
        drop(sent);
        assert!(
            bodies.kept.lock().unwrap().is_empty(),
            "kept while still sending"
        );
        drop(copy);
        let again = bodies.take(1000);
        assert_eq!(again.bytes.as_ptr(), memory, "the same memory, not fresh");
        assert!(again.bytes.is_empty() && again.bytes.capacity() >= 1 << 20);
        let taken: Vec<Body> = (0..4).map(|_| bodies.take(10)).collect();
        drop((again, taken));
        assert_eq!(bodies.kept.lock().unwrap().len(), 2);
    }

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

    fn manifest(files: &[(&str, &[u8])]) -> Manifest {
        Manifest::new(
            files
                .iter()
                .map(|(path, content)| ManifestEntry {
                    path: (*path).into(),
                    mode: 0o644,
                    size: content.len() as u64,
                    digest: Digest::of(content),
                })
                .collect(),
        )
        .unwrap()
    }

    #[test]
    fn changes_name_what_differs_from_the_base_and_the_closest_base_is_chosen() {
        let base = manifest(&[("a", b"1"), ("b", b"2"), ("c", b"3")]);
        let new = manifest(&[("a", b"1"), ("b", b"two"), ("d", b"4")]);
        let (changed, removed) = changes(&base, &new);
        let paths: Vec<&str> = changed.iter().map(|e| e.path.as_str()).collect();
        assert_eq!((paths, removed), (vec!["b", "d"], vec!["c".to_string()]));
        assert_eq!(changes(&new, &new), (Vec::new(), Vec::new()));

        // With more in common, a delta is smaller than the manifest and is chosen.
        let common: Vec<(String, Vec<u8>)> = (0..10)
            .map(|i| (format!("lib/{i}"), vec![i as u8]))
            .collect();
        let with = |files: &[(&str, &[u8])]| {
            let mut all: Vec<(&str, &[u8])> = files.to_vec();
            all.extend(common.iter().map(|(p, c)| (p.as_str(), c.as_slice())));
            manifest(&all)
        };
        let (base, new) = (
            with(&[("a", b"1"), ("b", b"2"), ("c", b"3")]),
            with(&[("a", b"1"), ("b", b"two"), ("d", b"4")]),
        );
        let mut cache = DigestCache::in_memory();
        let far = with(&[("x", b"x")]);
        cache.accepted("http://s", &far, far.digest());
        cache.accepted("http://s", &base, base.digest());
        cache.accepted("http://other", &new, new.digest());
        let (chosen, proposal) = cache.base_for("http://s", &new).unwrap();
        assert_eq!(chosen, base.digest());
        assert_eq!(proposal.base, Some(base.digest()));
        assert_eq!(proposal.entries.len() + proposal.removed.len(), 3);
        // Nothing is smaller than a manifest unlike every base: it goes in full.
        assert!(
            cache
                .base_for("http://s", &manifest(&[("q", b"q")]))
                .is_none()
        );
        cache.forget("http://s", base.digest());
        assert_eq!(
            cache.base_for("http://s", &new).map(|(d, _)| d),
            Some(far.digest())
        );
    }

    #[test]
    fn the_cache_file_keeps_digests_and_accepted_manifests_and_refuses_damage() {
        let dir = std::env::temp_dir().join(format!("quorum-cache-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("cache.bin");
        let path = dir.join("f");
        std::fs::write(&path, b"content").unwrap();
        let stamp = Stamp::of(&std::fs::metadata(&path).unwrap());
        let m = manifest(&[("a", b"1"), ("b/c", b"2")]);
        let mut cache = DigestCache::load(&file);
        cache.put(path.clone(), stamp, Digest::of(b"content"));
        cache.accepted("http://s", &m, m.digest());
        cache.save().unwrap();

        let mut again = DigestCache::load(&file);
        assert_eq!(again.get(&path, &stamp), Some(Digest::of(b"content")));
        assert_eq!(again.accepted.len(), 1);
        assert_eq!(again.accepted[0].manifest, m);

        // A damaged file (cut short, or a remembered manifest altered) is ignored whole.
        let bytes = std::fs::read(&file).unwrap();
        std::fs::write(&file, &bytes[..bytes.len() - 5]).unwrap();
        assert!(DigestCache::load(&file).is_empty());
        let mut altered = bytes.clone();
        let at = altered.len() - 40;
        altered[at] ^= 1;
        std::fs::write(&file, &altered).unwrap();
        let loaded = DigestCache::load(&file);
        assert!(loaded.is_empty() && loaded.accepted.is_empty());
        // So is a file in the old JSON format.
        std::fs::write(&file, br#"{"version":1,"entries":[]}"#).unwrap();
        assert!(DigestCache::load(&file).is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn large_files_are_spread_evenly_among_batches_in_order() {
        assert_eq!(
            spread(vec![1, 2], vec![10, 20, 30, 40]),
            [1, 10, 20, 2, 30, 40]
        );
        assert_eq!(spread(vec![1, 2, 3], Vec::new()), [1, 2, 3]);
        assert_eq!(spread(Vec::new(), vec![10, 20]), [10, 20]);
    }

    #[test]
    fn a_batch_holds_at_most_the_frames_the_store_takes() {
        let max = quorum_api::v1::store::MAX_BATCH_BLOBS;
        let files: Vec<_> = (0..2 * max + 5).map(|i| file(i, 1)).collect();
        assert_eq!(shape(files), [max, max, 5]);
        assert!(shape(Vec::new()).is_empty());
    }
}
