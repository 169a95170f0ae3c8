//! Where blob bytes live, behind [`BlobBackend`]: a local directory (the default) or any
//! S3-compatible object store. Receiving a blob and making it visible are two steps: a backend
//! first receives and hashes the bytes somewhere invisible ([`Received`]), and only the caller
//! decides, inside the metadata transaction that records the blob, to place it
//! ([`BlobBackend::place_all`]). Dropping a `Received`, or the future receiving it, leaves
//! nothing behind.

use std::io;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::{StreamExt as _, TryStreamExt as _};
use object_store::ObjectStore as _;
use object_store::ObjectStoreExt as _;
use quorum_core::Digest;
use quorum_core::digest::Hasher;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt as _, AsyncSeekExt as _, AsyncWriteExt as _};

/// Blob content as it streams in or out.
pub type ByteStream<'a> = BoxStream<'a, io::Result<Bytes>>;

#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error("blob {expected} arrived as {actual} ({size} bytes); nothing was stored")]
    Mismatch {
        expected: Digest,
        actual: Digest,
        size: u64,
    },
    #[error(
        "upload of blob {digest} was cut short after {received} bytes ({source}); nothing was stored"
    )]
    Truncated {
        digest: Digest,
        received: u64,
        source: io::Error,
    },
    #[error("blob is larger than the {max} bytes this store accepts; nothing was stored")]
    TooLarge { max: u64 },
    #[error("the store's blob storage is full; nothing was stored")]
    Full,
    #[error("blob {0} is recorded but its bytes are gone")]
    Gone(Digest),
    #[error("blob storage failed: {0}")]
    Io(io::Error),
    #[error("object store: {0}")]
    ObjectStore(#[from] object_store::Error),
}

impl From<io::Error> for BlobError {
    fn from(e: io::Error) -> BlobError {
        if e.kind() == io::ErrorKind::StorageFull {
            BlobError::Full
        } else {
            BlobError::Io(e)
        }
    }
}

/// A blob received and verified, not yet recorded. Dropping it discards the bytes (but see
/// [`Received::sync`]).
///
/// Making it visible and durable takes steps that a batch can group: [`sync`] the bytes and,
/// where the backend can, stage them under the digest (outside any lock), sync the directory
/// entries that staging made, then [`reveal`] them inside the transaction that records them,
/// which costs nothing for a blob whose staged name is still its own, and sync the directory
/// entry that `reveal` names. [`BlobBackend::sync_all`] and [`BlobBackend::place_all`] do them
/// for any number of blobs, grouped.
///
/// [`sync`]: Received::sync
/// [`reveal`]: Received::reveal
pub trait Received: Send + 'static {
    fn size(&self) -> u64;
    /// Makes the received bytes durable, and may stage them under the digest: a second name for
    /// the same bytes that no row points to yet, so readers do not see it, and garbage
    /// collection may remove it as bytes without metadata (then [`Received::reveal`] places
    /// the blob again). Returns the directory whose entry staging made, to be synced. A staged
    /// blob that is not revealed must be [`unstaged`](Received::unstage) under the write lock,
    /// or it stays until garbage collection.
    fn sync(&self) -> BoxFuture<'static, Result<Option<PathBuf>, BlobError>>;
    /// Makes the blob visible under its digest: done if its staged name is still its own, else
    /// placed now, replacing identical bytes if some are there; returns the directory whose
    /// entry must still be synced for the blob to survive a crash. Called under the write lock.
    fn reveal(self: Box<Self>) -> BoxFuture<'static, Result<Option<PathBuf>, BlobError>>;
    /// Removes what [`Received::sync`] staged, if it is still this blob's own. Called under the
    /// write lock, so no upload can be placing the same digest meanwhile.
    fn unstage(&self) -> BoxFuture<'static, Result<(), BlobError>> {
        Box::pin(async { Ok(()) })
    }
}

/// Blobs synced (or renamed) at once by [`BlobBackend::sync_all`] and `place_all`: enough to
/// keep a disk's queue full, few enough not to crowd the blocking thread pool.
const PARALLEL_SYNCS: usize = 32;

async fn sync_dir(dir: PathBuf) -> Result<(), BlobError> {
    tokio::task::spawn_blocking(move || std::fs::File::open(dir)?.sync_all())
        .await
        .map_err(io::Error::other)??;
    Ok(())
}

/// Syncs each directory named once, in parallel.
async fn sync_dirs(dirs: Vec<Option<PathBuf>>) -> Result<(), BlobError> {
    let dirs: std::collections::BTreeSet<PathBuf> = dirs.into_iter().flatten().collect();
    futures::stream::iter(dirs.into_iter().map(sync_dir))
        .buffer_unordered(PARALLEL_SYNCS)
        .try_collect::<()>()
        .await
}

pub trait BlobBackend: Send + Sync + 'static {
    /// Receives `body` as blob `expected`, hashing it as it arrives, and returns it verified but
    /// invisible; fails, leaving nothing, if it is longer than `max_bytes`, ends early, or does
    /// not hash to `expected`.
    fn receive<'a>(
        &'a self,
        expected: Digest,
        body: ByteStream<'a>,
        max_bytes: u64,
    ) -> BoxFuture<'a, Result<Box<dyn Received>, BlobError>>;

    /// Streams `range` of a stored blob (the caller knows its size from the metadata).
    fn get(
        &self,
        digest: Digest,
        range: Range<u64>,
    ) -> BoxFuture<'_, Result<ByteStream<'static>, BlobError>>;

    /// Deletes a blob's bytes; deleting what is not there is fine.
    fn delete(&self, digest: Digest) -> BoxFuture<'_, Result<(), BlobError>>;

    /// Every blob whose bytes are stored.
    fn list(&self) -> BoxFuture<'_, Result<Vec<Digest>, BlobError>>;

    /// Makes every blob in `items` durable, still unrecorded; called before taking a lock: each
    /// one's [`Received::sync`], in parallel, then each directory staging touched is synced
    /// once, in parallel. (One `syncfs` per batch was tried: it also flushes whatever else is
    /// dirty on the file system, which on a busy machine costs more.) On an error, the caller
    /// unstages `items` under the write lock ([`BlobBackend::unstage_all`]).
    fn sync_all(&self, items: &[Box<dyn Received>]) -> BoxFuture<'static, Result<(), BlobError>> {
        let syncs: Vec<_> = items.iter().map(|r| r.sync()).collect();
        Box::pin(async move {
            let dirs: Vec<Option<PathBuf>> = futures::stream::iter(syncs)
                .buffer_unordered(PARALLEL_SYNCS)
                .try_collect()
                .await?;
            sync_dirs(dirs).await
        })
    }

    /// Removes what [`BlobBackend::sync_all`] staged for `items`, which will not be recorded;
    /// called under the write lock.
    fn unstage_all(
        &self,
        items: &[Box<dyn Received>],
    ) -> BoxFuture<'static, Result<(), BlobError>> {
        let unstages: Vec<_> = items.iter().map(|r| r.unstage()).collect();
        Box::pin(
            futures::stream::iter(unstages)
                .buffer_unordered(PARALLEL_SYNCS)
                .try_collect::<()>(),
        )
    }

    /// Reveals every blob in `items` (already synced) and makes that durable: each directory
    /// they went into is synced once, in parallel. On an error, blobs revealed so
    /// far stay (identical bytes under their digest); the caller records none of them, and
    /// garbage collection removes bytes without rows.
    fn place_all(
        &self,
        items: Vec<Box<dyn Received>>,
    ) -> BoxFuture<'static, Result<(), BlobError>> {
        let reveals: Vec<_> = items.into_iter().map(|item| item.reveal()).collect();
        Box::pin(async move {
            let dirs: Vec<Option<PathBuf>> = futures::stream::iter(reveals)
                .buffer_unordered(PARALLEL_SYNCS)
                .try_collect()
                .await?;
            sync_dirs(dirs).await
        })
    }
}

/// Which backend keeps the bytes (`[blobs]` in the config).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum BlobsConfig {
    /// `data_dir/blobs`, received into `data_dir/tmp`.
    #[default]
    Local,
    S3(S3Config),
}

/// An S3-compatible bucket. Credentials left out of the config are taken from the usual
/// `AWS_*` environment variables.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct S3Config {
    pub bucket: String,
    /// Such as `https://s3.example.org`; AWS itself when absent.
    #[serde(default)]
    pub endpoint: Option<String>,
    #[serde(default = "default_region")]
    pub region: String,
    /// Allows a plain-HTTP endpoint (a test server on loopback).
    #[serde(default)]
    pub allow_http: bool,
    #[serde(default)]
    pub access_key_id: Option<String>,
    #[serde(default)]
    pub secret_access_key: Option<String>,
}

fn default_region() -> String {
    "us-east-1".into()
}

/// Checks a blob's bytes as they pass: size cap, then digest at the end.
struct Verifier {
    expected: Digest,
    hasher: Hasher,
    size: u64,
    max: u64,
}

impl Verifier {
    fn new(expected: Digest, max: u64) -> Verifier {
        Verifier {
            expected,
            hasher: Hasher::new(),
            size: 0,
            max,
        }
    }

    fn next(&mut self, chunk: Option<io::Result<Bytes>>) -> Result<Option<Bytes>, BlobError> {
        let Some(chunk) = chunk else { return Ok(None) };
        let chunk = chunk.map_err(|source| BlobError::Truncated {
            digest: self.expected,
            received: self.size,
            source,
        })?;
        self.size += chunk.len() as u64;
        if self.size > self.max {
            return Err(BlobError::TooLarge { max: self.max });
        }
        self.hasher.update(&chunk);
        Ok(Some(chunk))
    }

    fn finish(self) -> Result<u64, BlobError> {
        let actual = self.hasher.finish();
        if actual != self.expected {
            return Err(BlobError::Mismatch {
                expected: self.expected,
                actual,
                size: self.size,
            });
        }
        Ok(self.size)
    }
}

/// Blobs as files `<root>/<first 2 hex>/<hex>`, received into `<tmp>` and renamed into place.
#[derive(Debug, Clone)]
pub struct LocalDir {
    root: PathBuf,
    tmp: PathBuf,
}

impl LocalDir {
    /// Creates both directories. With `clean`, removes uploads a previous process left
    /// unfinished in `tmp` (only the serving process may: nothing else writes there).
    pub fn open(root: PathBuf, tmp: PathBuf, clean: bool) -> io::Result<LocalDir> {
        std::fs::create_dir_all(&root)?;
        std::fs::create_dir_all(&tmp)?;
        if clean {
            for entry in std::fs::read_dir(&tmp)? {
                let path = entry?.path();
                tracing::info!(path = %path.display(), "removing an unfinished upload");
                std::fs::remove_file(&path)?;
            }
        }
        Ok(LocalDir { root, tmp })
    }

    pub fn path(&self, digest: &Digest) -> PathBuf {
        let hex = digest.hex();
        self.root.join(&hex[..2]).join(hex)
    }

    async fn receive_file(
        &self,
        expected: Digest,
        mut body: ByteStream<'_>,
        max_bytes: u64,
    ) -> Result<Box<dyn Received>, BlobError> {
        if max_bytes <= SMALL_BLOB {
            return self.receive_small(expected, body, max_bytes).await;
        }
        let tmp = self.tmp.clone();
        let temp = tokio::task::spawn_blocking(move || {
            tempfile::Builder::new().prefix("upload-").tempfile_in(tmp)
        })
        .await
        .map_err(io::Error::other)??;
        // The TempPath removes the file when dropped: on every error return below, when the
        // request is abandoned mid-body and this future is dropped, and when the caller drops
        // the `Received`.
        let (file, temp_path) = temp.into_parts();
        let mut file = tokio::fs::File::from_std(file);
        let mut verifier = Verifier::new(expected, max_bytes);
        while let Some(chunk) = verifier.next(body.next().await)? {
            file.write_all(&chunk).await?;
        }
        let size = verifier.finish()?;
        file.flush().await?;
        drop(file);
        Ok(Box::new(LocalReceived {
            temp: temp_path,
            dest: self.path(&expected),
            size,
        }))
    }
}

impl LocalDir {
    /// A blob known to be small (a frame of a batch): verified in memory as it arrives, then
    /// written with one blocking call rather than one per chunk.
    async fn receive_small(
        &self,
        expected: Digest,
        mut body: ByteStream<'_>,
        max_bytes: u64,
    ) -> Result<Box<dyn Received>, BlobError> {
        let mut verifier = Verifier::new(expected, max_bytes);
        let mut bytes = Vec::with_capacity(usize::try_from(max_bytes).unwrap_or(0));
        while let Some(chunk) = verifier.next(body.next().await)? {
            bytes.extend_from_slice(&chunk);
        }
        let size = verifier.finish()?;
        let tmp = self.tmp.clone();
        let temp = tokio::task::spawn_blocking(move || -> io::Result<tempfile::TempPath> {
            let mut temp = tempfile::Builder::new()
                .prefix("upload-")
                .tempfile_in(tmp)?;
            io::Write::write_all(&mut temp, &bytes)?;
            Ok(temp.into_temp_path())
        })
        .await
        .map_err(io::Error::other)??;
        Ok(Box::new(LocalReceived {
            temp,
            dest: self.path(&expected),
            size,
        }))
    }
}

/// Blobs up to this size whose size is known ahead are received in memory.
const SMALL_BLOB: u64 = 1 << 20;

struct LocalReceived {
    temp: tempfile::TempPath,
    dest: PathBuf,
    size: u64,
}

impl Received for LocalReceived {
    fn size(&self) -> u64 {
        self.size
    }

    /// Syncs the temporary file, then stages it: a hard link under the digest, made outside the
    /// lock so that its directory is synced outside it too. A name already there (identical
    /// bytes, recorded or staged by another upload) is left alone: `reveal` replaces it.
    fn sync(&self) -> BoxFuture<'static, Result<Option<PathBuf>, BlobError>> {
        let (temp, dest) = (self.temp.to_path_buf(), self.dest.clone());
        Box::pin(async move {
            let staged = tokio::task::spawn_blocking(move || -> io::Result<Option<PathBuf>> {
                std::fs::File::open(&temp)?.sync_all()?;
                let dir = dest.parent().expect("blob paths have a parent");
                std::fs::create_dir_all(dir)?;
                match std::fs::hard_link(&temp, &dest) {
                    Ok(()) => Ok(Some(dir.to_path_buf())),
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(None),
                    Err(e) => Err(e),
                }
            })
            .await
            .map_err(io::Error::other)??;
            Ok(staged)
        })
    }

    /// Under the write lock no other upload places this digest and garbage collection deletes
    /// nothing, so a name under the digest that is still this upload's own file (same inode:
    /// staged by `sync`, its directory synced since) stays until the commit, and then nothing is
    /// left to do. Otherwise (collected as bytes without metadata meanwhile, or another upload's
    /// bytes) the temporary file is renamed over it and its directory must be synced.
    fn reveal(self: Box<Self>) -> BoxFuture<'static, Result<Option<PathBuf>, BlobError>> {
        Box::pin(async move {
            let LocalReceived { temp, dest, .. } = *self;
            let dir = tokio::task::spawn_blocking(move || -> io::Result<Option<PathBuf>> {
                if is_own(&temp, &dest)? {
                    // Dropping `temp` removes the temporary name; the staged one stays.
                    return Ok(None);
                }
                rename(temp, &dest).map(Some)
            })
            .await
            .map_err(io::Error::other)??;
            Ok(dir)
        })
    }

    fn unstage(&self) -> BoxFuture<'static, Result<(), BlobError>> {
        let (temp, dest) = (self.temp.to_path_buf(), self.dest.clone());
        Box::pin(async move {
            tokio::task::spawn_blocking(move || -> io::Result<()> {
                if is_own(&temp, &dest)? {
                    std::fs::remove_file(&dest)?;
                }
                Ok(())
            })
            .await
            .map_err(io::Error::other)??;
            Ok(())
        })
    }
}

/// Whether `dest` is the same file as `temp` (a hard link that staging made).
fn is_own(temp: &Path, dest: &Path) -> io::Result<bool> {
    use std::os::unix::fs::MetadataExt as _;
    let ours = std::fs::metadata(temp)?;
    match std::fs::symlink_metadata(dest) {
        Ok(there) => Ok(there.dev() == ours.dev() && there.ino() == ours.ino()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// Renames a verified temporary file to `dest` (replacing identical bytes a crashed process may
/// have left); returns the directory to sync for the rename to be durable.
fn rename(temp: tempfile::TempPath, dest: &Path) -> io::Result<PathBuf> {
    let dir = dest.parent().expect("blob paths have a parent");
    std::fs::create_dir_all(dir)?;
    temp.persist(dest).map_err(|e| e.error)?;
    Ok(dir.to_path_buf())
}

impl BlobBackend for LocalDir {
    fn receive<'a>(
        &'a self,
        expected: Digest,
        body: ByteStream<'a>,
        max_bytes: u64,
    ) -> BoxFuture<'a, Result<Box<dyn Received>, BlobError>> {
        Box::pin(self.receive_file(expected, body, max_bytes))
    }

    fn get(
        &self,
        digest: Digest,
        range: Range<u64>,
    ) -> BoxFuture<'_, Result<ByteStream<'static>, BlobError>> {
        Box::pin(async move {
            let mut file = match tokio::fs::File::open(self.path(&digest)).await {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    return Err(BlobError::Gone(digest));
                }
                Err(e) => return Err(e.into()),
            };
            file.seek(io::SeekFrom::Start(range.start)).await?;
            let part = file.take(range.end - range.start);
            Ok(tokio_util::io::ReaderStream::with_capacity(part, 256 * 1024).boxed())
        })
    }

    fn delete(&self, digest: Digest) -> BoxFuture<'_, Result<(), BlobError>> {
        Box::pin(async move {
            match tokio::fs::remove_file(self.path(&digest)).await {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e.into()),
                _ => Ok(()),
            }
        })
    }

    fn list(&self) -> BoxFuture<'_, Result<Vec<Digest>, BlobError>> {
        let root = self.root.clone();
        Box::pin(async move {
            let found = tokio::task::spawn_blocking(move || -> io::Result<Vec<Digest>> {
                let mut out = Vec::new();
                for dir in std::fs::read_dir(&root)? {
                    let dir = dir?;
                    if !dir.file_type()?.is_dir() {
                        continue;
                    }
                    for file in std::fs::read_dir(dir.path())? {
                        let name = file?.file_name();
                        if let Some(d) = name
                            .to_str()
                            .and_then(|n| format!("sha256:{n}").parse().ok())
                        {
                            out.push(d);
                        }
                    }
                }
                Ok(out)
            })
            .await
            .map_err(io::Error::other)??;
            Ok(found)
        })
    }
}

/// Blobs as objects `blobs/<hex>` in an S3-compatible bucket. An upload streams into a multipart
/// upload (or a buffer, for blobs under one part) under its final key; S3 makes an object
/// visible only when the upload completes, which happens in [`Received::reveal`], so an
/// unverified or abandoned upload is aborted and never seen.
#[derive(Debug, Clone)]
pub struct S3 {
    store: Arc<dyn object_store::ObjectStore>,
}

/// Bytes buffered per part: S3 parts must be at least 5 MiB, all but the last.
const S3_PART: usize = 8 << 20;

impl S3 {
    pub fn open(config: &S3Config) -> Result<S3, BlobError> {
        let mut builder = object_store::aws::AmazonS3Builder::from_env()
            .with_bucket_name(&config.bucket)
            .with_region(&config.region)
            .with_allow_http(config.allow_http);
        if let Some(endpoint) = &config.endpoint {
            builder = builder.with_endpoint(endpoint);
        }
        if let Some(id) = &config.access_key_id {
            builder = builder.with_access_key_id(id);
        }
        if let Some(secret) = &config.secret_access_key {
            builder = builder.with_secret_access_key(secret);
        }
        Ok(S3 {
            store: Arc::new(builder.build()?),
        })
    }

    fn key(digest: &Digest) -> object_store::path::Path {
        object_store::path::Path::from(format!("blobs/{}", digest.hex()))
    }

    async fn receive_object(
        &self,
        expected: Digest,
        mut body: ByteStream<'_>,
        max_bytes: u64,
    ) -> Result<Box<dyn Received>, BlobError> {
        let mut pending = S3Received {
            writer: Some(object_store::buffered::BufWriter::with_capacity(
                self.store.clone(),
                S3::key(&expected),
                S3_PART,
            )),
            size: 0,
        };
        let mut verifier = Verifier::new(expected, max_bytes);
        while let Some(chunk) = verifier.next(body.next().await)? {
            pending.writer().put(chunk).await?;
        }
        pending.size = verifier.finish()?;
        Ok(Box::new(pending))
    }
}

struct S3Received {
    /// Taken out once completed; one still here when dropped is aborted.
    writer: Option<object_store::buffered::BufWriter>,
    size: u64,
}

impl S3Received {
    fn writer(&mut self) -> &mut object_store::buffered::BufWriter {
        self.writer
            .as_mut()
            .expect("an upload in progress has its writer")
    }
}

impl Drop for S3Received {
    fn drop(&mut self) {
        if let (Some(mut writer), Ok(rt)) =
            (self.writer.take(), tokio::runtime::Handle::try_current())
        {
            rt.spawn(async move {
                if let Err(e) = writer.abort().await {
                    tracing::warn!(error = %e, "cannot abort an unfinished multipart upload");
                }
            });
        }
    }
}

impl Received for S3Received {
    fn size(&self) -> u64 {
        self.size
    }

    /// S3 keeps nothing unless the upload completes, and completes only durably; nothing is
    /// staged (completing the upload would make it visible under its key).
    fn sync(&self) -> BoxFuture<'static, Result<Option<PathBuf>, BlobError>> {
        Box::pin(async { Ok(None) })
    }

    fn reveal(mut self: Box<Self>) -> BoxFuture<'static, Result<Option<PathBuf>, BlobError>> {
        Box::pin(async move {
            let mut writer = self.writer.take().expect("revealed once");
            if let Err(e) = writer.shutdown().await {
                // A failed completion may leave parts behind: abort them.
                self.writer = Some(writer);
                return Err(e.into());
            }
            Ok(None)
        })
    }
}

fn not_found_is_gone(digest: Digest) -> impl FnOnce(object_store::Error) -> BlobError {
    move |e| match e {
        object_store::Error::NotFound { .. } => BlobError::Gone(digest),
        e => e.into(),
    }
}

impl BlobBackend for S3 {
    fn receive<'a>(
        &'a self,
        expected: Digest,
        body: ByteStream<'a>,
        max_bytes: u64,
    ) -> BoxFuture<'a, Result<Box<dyn Received>, BlobError>> {
        Box::pin(self.receive_object(expected, body, max_bytes))
    }

    fn get(
        &self,
        digest: Digest,
        range: Range<u64>,
    ) -> BoxFuture<'_, Result<ByteStream<'static>, BlobError>> {
        Box::pin(async move {
            let options = object_store::GetOptions {
                range: Some(object_store::GetRange::Bounded(range)),
                ..Default::default()
            };
            let got = self
                .store
                .get_opts(&S3::key(&digest), options)
                .await
                .map_err(not_found_is_gone(digest))?;
            Ok(got
                .into_stream()
                .map(|c| c.map_err(io::Error::other))
                .boxed())
        })
    }

    fn delete(&self, digest: Digest) -> BoxFuture<'_, Result<(), BlobError>> {
        Box::pin(async move {
            match self.store.delete(&S3::key(&digest)).await {
                Err(object_store::Error::NotFound { .. }) | Ok(()) => Ok(()),
                Err(e) => Err(e.into()),
            }
        })
    }

    fn list(&self) -> BoxFuture<'_, Result<Vec<Digest>, BlobError>> {
        Box::pin(async move {
            let prefix = object_store::path::Path::from("blobs");
            let mut objects = self.store.list(Some(&prefix));
            let mut out = Vec::new();
            while let Some(meta) = objects.next().await {
                let meta = meta?;
                if let Some(d) = meta
                    .location
                    .filename()
                    .and_then(|n| format!("sha256:{n}").parse().ok())
                {
                    out.push(d);
                }
            }
            Ok(out)
        })
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt as _;

    use super::*;

    fn body(bytes: &'static [u8]) -> ByteStream<'static> {
        futures::stream::iter([Ok(Bytes::from_static(bytes))]).boxed()
    }

    async fn received(local: &LocalDir, bytes: &'static [u8]) -> Vec<Box<dyn Received>> {
        vec![
            local
                .receive(Digest::of(bytes), body(bytes), 100)
                .await
                .unwrap(),
        ]
    }

    fn inode(path: &Path) -> Option<u64> {
        std::fs::metadata(path).map(|m| m.ino()).ok()
    }

    fn temporary_files(dir: &Path) -> usize {
        std::fs::read_dir(dir.join("tmp")).unwrap().count()
    }

    /// Staging happens before the write lock, so by the time a blob is revealed under it, its
    /// staged name may have been collected as bytes without metadata, or replaced by another
    /// upload of the same bytes: either way the blob is placed again. Unstaging a refused blob
    /// removes its own staged name only, never another upload's.
    #[tokio::test]
    async fn a_staged_blob_collected_or_replaced_before_its_reveal_is_placed_again() {
        let dir = tempfile::tempdir().unwrap();
        let local = LocalDir::open(dir.path().join("blobs"), dir.path().join("tmp"), true).unwrap();
        let bytes: &'static [u8] = b"staged bytes";
        let path = local.path(&Digest::of(bytes));

        // Staged, then collected before the lock.
        let a = received(&local, bytes).await;
        local.sync_all(&a).await.unwrap();
        assert_eq!(
            std::fs::read(&path).unwrap(),
            bytes,
            "staged under the digest"
        );
        local.delete(Digest::of(bytes)).await.unwrap();
        local.place_all(a).await.unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), bytes, "placed again");
        assert_eq!(temporary_files(dir.path()), 0);
        local.delete(Digest::of(bytes)).await.unwrap();

        // Staged, then another upload of the same bytes finds the name taken (so stages
        // nothing) and is refused: unstaging it leaves the first upload's name alone.
        let a = received(&local, bytes).await;
        local.sync_all(&a).await.unwrap();
        let staged = inode(&path);
        let b = received(&local, bytes).await;
        local.sync_all(&b).await.unwrap();
        local.unstage_all(&b).await.unwrap();
        drop(b);
        assert_eq!(inode(&path), staged, "another upload's staged name stays");
        // Then the first is refused too: its own name goes, and nothing is left.
        local.unstage_all(&a).await.unwrap();
        drop(a);
        assert_eq!(inode(&path), None);
        assert_eq!(temporary_files(dir.path()), 0);

        // Staged, then replaced by another upload placed first: placed again over it.
        let a = received(&local, bytes).await;
        local.sync_all(&a).await.unwrap();
        let b = received(&local, bytes).await;
        local.sync_all(&b).await.unwrap();
        local.delete(Digest::of(bytes)).await.unwrap();
        local.place_all(b).await.unwrap();
        let replaced = inode(&path);
        local.place_all(a).await.unwrap();
        assert_ne!(
            inode(&path),
            replaced,
            "the first upload placed its own file"
        );
        assert_eq!(std::fs::read(&path).unwrap(), bytes);
        assert_eq!(temporary_files(dir.path()), 0);
    }
}
