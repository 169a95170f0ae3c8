//! Where blob bytes live, behind [`BlobBackend`]: a local directory (the default) or any
//! S3-compatible object store. Receiving a blob and making it visible are two steps: a backend
//! first receives and hashes the bytes somewhere invisible ([`Received`]), and only the caller
//! decides, inside the metadata transaction that records the blob, to place it
//! ([`BlobBackend::place_all`]). Dropping a `Received`, or the future receiving it, leaves
//! nothing behind.
//!
//! A local directory keeps the small blobs of a batch together in one pack file
//! ([`BlobBackend::pack`]), written as they arrive and synced once: one file to create and
//! sync per batch rather than one per blob, which is most of what a tree of small files costs
//! a store. A packed blob's row records its pack and offset ([`Packed`]); garbage collection
//! deletes a pack once none of its blobs is recorded, and rewrites one that is mostly dead.

use std::any::Any;
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::io::{self, Write as _};
use std::ops::Range;
use std::os::fd::AsRawFd as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

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

/// A blob whole in memory, as the pieces it arrived in: slices of a request body's own chunks,
/// so that a frame of a batch is not copied before it is written.
#[derive(Debug)]
pub struct Pieces(pub Vec<Bytes>);

impl Pieces {
    pub(crate) fn len(&self) -> usize {
        self.0.iter().map(Bytes::len).sum()
    }

    /// Checks that the blob hashes to `expected`, as a streamed upload is checked.
    fn verify(&self, expected: Digest) -> Result<(), BlobError> {
        let mut verifier = Verifier::new(expected, u64::MAX);
        for piece in &self.0 {
            verifier.next(Some(Ok(piece.clone())))?;
        }
        verifier.finish().map(drop)
    }

    /// Copies the blob to the start of `out`, which is at least [`Pieces::len`] long.
    fn copy_to(&self, out: &mut [u8]) {
        let mut end = 0;
        for piece in &self.0 {
            out[end..end + piece.len()].copy_from_slice(piece);
            end += piece.len();
        }
    }
}

impl From<Bytes> for Pieces {
    fn from(bytes: Bytes) -> Pieces {
        Pieces(vec![bytes])
    }
}

/// Blobs received whole ([`BlobBackend::receive_whole`], [`PackWriter::whole`]), in order; or
/// which one failed (its index) and why.
pub type Whole<'a> = BoxFuture<'a, Result<Vec<Box<dyn Received>>, (usize, BlobError)>>;

/// A pack's name: 32 lowercase hex digits, random.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PackId(String);

impl PackId {
    fn random() -> PackId {
        PackId(format!("{:032x}", rand::random::<u128>()))
    }

    /// A pack name read back (from a row or a directory listing), if it has the form of one:
    /// it becomes part of a path, so nothing else is taken.
    pub fn parse(s: &str) -> Option<PackId> {
        let ok = s.len() == 32 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        ok.then(|| PackId(s.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for PackId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where a packed blob's bytes are: its pack, and the offset of its first byte there. A blob
/// without one is stored as an object (a file) of its own.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Packed {
    pub pack: PackId,
    pub offset: u64,
}

/// Keeps the whole blobs of one batch together in a pack ([`BlobBackend::pack`]).
pub trait PackWriter: Send {
    /// Verifies `blobs` and appends them to the pack, in one blocking call started at once;
    /// returns them received (each naming its place, [`Received::packed`]) in order, or which
    /// failed and why. Calls may overlap: each is given its place in the pack when it is made.
    fn whole(&mut self, blobs: Vec<(Digest, Pieces)>) -> Whole<'static>;
}

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
/// for any number of blobs, grouped. It is `Any` so that a backend can group the blocking
/// work of its own blobs ([`LocalDir`] does) rather than go blob by blob.
///
/// [`sync`]: Received::sync
/// [`reveal`]: Received::reveal
pub trait Received: Any + Send + 'static {
    fn size(&self) -> u64;
    /// Where in a pack the blob is, if it went into one: what its row records.
    fn packed(&self) -> Option<Packed> {
        None
    }
    /// Makes the received bytes durable, and may stage them under the digest: a name for the
    /// bytes that no row points to yet, so readers do not see it, and garbage
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

/// Runs blocking file system work on the blocking thread pool.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> Result<T, BlobError> {
    Ok(tokio::task::spawn_blocking(work)
        .await
        .map_err(io::Error::other)??)
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Syncs each directory named once, in parallel.
async fn sync_dirs(dirs: Vec<Option<PathBuf>>) -> Result<(), BlobError> {
    let dirs: BTreeSet<PathBuf> = dirs.into_iter().flatten().collect();
    futures::stream::iter(dirs.into_iter().map(|dir| blocking(move || sync_dir(&dir))))
        .buffer_unordered(PARALLEL_SYNCS)
        .try_collect::<()>()
        .await
}

/// Runs `steps` (each a blob's sync or reveal, naming the directory whose entry it made), a
/// few at a time, then syncs each directory named once.
fn then_sync_dirs(
    steps: Vec<BoxFuture<'static, Result<Option<PathBuf>, BlobError>>>,
) -> BoxFuture<'static, Result<(), BlobError>> {
    Box::pin(async move {
        let dirs: Vec<Option<PathBuf>> = futures::stream::iter(steps)
            .buffer_unordered(PARALLEL_SYNCS)
            .try_collect()
            .await?;
        sync_dirs(dirs).await
    })
}

/// [`BlobBackend::sync_all`] blob by blob, for backends with nothing to group.
fn sync_each(items: &[Box<dyn Received>]) -> BoxFuture<'static, Result<(), BlobError>> {
    then_sync_dirs(items.iter().map(|r| r.sync()).collect())
}

/// [`BlobBackend::unstage_all`] blob by blob.
fn unstage_each(items: &[Box<dyn Received>]) -> BoxFuture<'static, Result<(), BlobError>> {
    let unstages: Vec<_> = items.iter().map(|r| r.unstage()).collect();
    Box::pin(
        futures::stream::iter(unstages)
            .buffer_unordered(PARALLEL_SYNCS)
            .try_collect::<()>(),
    )
}

/// [`BlobBackend::place_all`] blob by blob.
fn place_each(items: Vec<Box<dyn Received>>) -> BoxFuture<'static, Result<(), BlobError>> {
    then_sync_dirs(items.into_iter().map(|item| item.reveal()).collect())
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

    /// Receives blobs that arrived whole in memory (frames of a batch, up to [`WHOLE_BLOB`]
    /// bytes each) as [`BlobBackend::receive`] would, verifying each; returns them in order.
    /// On an error, says which blob (its index) and why, and nothing of any is kept. A backend
    /// that keeps packs takes them through its [`PackWriter`] instead.
    fn receive_whole(&self, blobs: Vec<(Digest, Pieces)>) -> Whole<'_> {
        Box::pin(async move {
            let mut received = Vec::with_capacity(blobs.len());
            for (i, (digest, pieces)) in blobs.into_iter().enumerate() {
                let size = pieces.len() as u64;
                let body = futures::stream::iter(pieces.0.into_iter().map(Ok)).boxed();
                received.push(self.receive(digest, body, size).await.map_err(|e| (i, e))?);
            }
            Ok(received)
        })
    }

    /// A writer that keeps a batch's whole blobs in one pack, for a backend that packs them;
    /// the others receive them blob by blob ([`BlobBackend::receive_whole`]).
    fn pack(&self) -> Option<Box<dyn PackWriter>> {
        None
    }

    /// Streams `range` of a stored blob, found in its pack if its row names one (the caller
    /// knows its size and place from the metadata).
    fn get(
        &self,
        digest: Digest,
        packed: Option<Packed>,
        range: Range<u64>,
    ) -> BoxFuture<'_, Result<ByteStream<'static>, BlobError>>;

    /// Deletes a blob's bytes (a blob of its own, not one in a pack); deleting what is not
    /// there is fine.
    fn delete(&self, digest: Digest) -> BoxFuture<'_, Result<(), BlobError>>;

    /// Every blob stored as an object of its own (packed blobs are not listed).
    fn list(&self) -> BoxFuture<'_, Result<Vec<Digest>, BlobError>>;

    /// Every pack, with its length in bytes.
    fn packs(&self) -> BoxFuture<'_, Result<Vec<(PackId, u64)>, BlobError>> {
        Box::pin(async { Ok(Vec::new()) })
    }

    /// Deletes a pack; deleting what is not there is fine.
    fn delete_pack(&self, _pack: PackId) -> BoxFuture<'_, Result<(), BlobError>> {
        Box::pin(async { Ok(()) })
    }

    /// Makes every blob in `items` durable, still unrecorded; called before taking a lock: each
    /// one's [`Received::sync`], in parallel, then each directory staging touched is synced
    /// once, in parallel. (One `syncfs` per batch was tried: it also flushes whatever else is
    /// dirty on the file system, which on a busy machine costs more.) On an error, the caller
    /// unstages `items` under the write lock ([`BlobBackend::unstage_all`]).
    fn sync_all(&self, items: &[Box<dyn Received>]) -> BoxFuture<'static, Result<(), BlobError>> {
        sync_each(items)
    }

    /// Removes what [`BlobBackend::sync_all`] staged for `items`, which will not be recorded;
    /// called under the write lock.
    fn unstage_all(
        &self,
        items: &[Box<dyn Received>],
    ) -> BoxFuture<'static, Result<(), BlobError>> {
        unstage_each(items)
    }

    /// Reveals every blob in `items` (already synced) and makes that durable: each directory
    /// they went into is synced once, in parallel. On an error, blobs revealed so
    /// far stay (identical bytes under their digest); the caller records none of them, and
    /// garbage collection removes bytes without rows.
    fn place_all(
        &self,
        items: Vec<Box<dyn Received>>,
    ) -> BoxFuture<'static, Result<(), BlobError>> {
        place_each(items)
    }
}

/// Which backend keeps the bytes (`[blobs]` in the config).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum BlobsConfig {
    /// `data_dir/blobs`, received into unnamed files there (or, where the file system makes
    /// none, into `data_dir/tmp`).
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

/// Blobs as files `<root>/<first 2 hex>/<hex>`. A blob is received into an unnamed file
/// (`O_TMPFILE`) in its own directory, which gets a name only when it is staged: no temporary
/// name to create and remove, nothing left behind if the process dies, and uploads spread over
/// the 256 directories (and the file system's block groups) rather than all creating and
/// removing names in one. Where the file system makes no unnamed files, a blob is received into
/// a named temporary file in `<tmp>` instead. Whole pages are written past the page cache
/// (`O_DIRECT`) where the file system allows it: see [`Local::append`]. The blobs of a batch go
/// into one pack, `<root>/packs/<pack id>`, received and staged the same way ([`LocalPack`]).
#[derive(Debug, Clone)]
pub struct LocalDir {
    root: PathBuf,
    packs: PathBuf,
    writes: Writes,
}

/// How a [`LocalDir`] writes uploads: decided once, by trying, when it is opened.
#[derive(Debug, Clone)]
struct Writes {
    /// Into unnamed files in the blob's directory, or named temporary files in `tmp`.
    unnamed: bool,
    /// Whole pages past the page cache.
    direct: bool,
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
        let unnamed = probed(
            can_link_unnamed(&root, &tmp),
            &root,
            "no unnamed files (O_TMPFILE) here; uploads go through named temporary files",
        );
        let direct = probed(
            can_write_direct(&root),
            &root,
            "no direct writes (O_DIRECT) here; uploads go through the page cache",
        );
        Ok(LocalDir {
            packs: root.join("packs"),
            root,
            writes: Writes {
                unnamed,
                direct,
                tmp,
            },
        })
    }

    pub fn path(&self, digest: &Digest) -> PathBuf {
        let hex = digest.hex();
        self.root.join(&hex[..2]).join(hex)
    }

    /// Receives a blob into a file that no reader can see, written as it arrives, a piece of
    /// up to [`WRITE_PIECE`] bytes per blocking call (the first call also creates the file, so
    /// a small blob costs one).
    async fn receive_file(
        &self,
        expected: Digest,
        mut body: ByteStream<'_>,
        max_bytes: u64,
    ) -> Result<Box<dyn Received>, BlobError> {
        let dest = self.path(&expected);
        let mut verifier = Verifier::new(expected, max_bytes);
        // The file is moved into each blocking call and back: a call still running when this
        // future is dropped (the request abandoned) drops it, which removes it.
        let mut local: Option<Local> = None;
        let mut piece =
            Vec::with_capacity(WRITE_PIECE.min(usize::try_from(max_bytes).unwrap_or(0)));
        loop {
            let chunk = verifier.next(body.next().await)?;
            let end = chunk.is_none();
            if let Some(chunk) = chunk {
                piece.extend_from_slice(&chunk);
            }
            if piece.len() >= WRITE_PIECE || end {
                let (writes, dest) = (self.writes.clone(), dest.clone());
                let (written, rest) = blocking(move || {
                    let local = match local {
                        Some(local) => local,
                        None => Local::create(writes, dest)?,
                    };
                    // What is left (less than a page) goes with the next piece.
                    let took = local.append(&piece, end)?;
                    piece.drain(..took);
                    Ok((local, piece))
                })
                .await?;
                (local, piece) = (Some(written), rest);
            }
            if end {
                break;
            }
        }
        let local = local.expect("the last piece created the file if nothing before did");
        let size = verifier.finish()?;
        Ok(Box::new(LocalReceived {
            file: Arc::new(local),
            packed: None,
            size,
        }))
    }

    fn pack_path(&self, pack: &PackId) -> PathBuf {
        self.packs.join(pack.as_str())
    }
}

/// The pack of one batch in a [`LocalDir`]: created by the first group of blobs written to it,
/// each group at the place [`PackWriter::whole`] gave it when called, so groups are written in
/// parallel. With direct writes each group is padded to whole pages.
struct LocalPack {
    id: PackId,
    dest: PathBuf,
    writes: Writes,
    file: Arc<OnceLock<PackFile>>,
    /// Where the next group goes.
    next: u64,
}

/// A pack's file, made by the first group written to it; or why it could not be made.
type PackFile = Result<Arc<Local>, (io::ErrorKind, String)>;

impl LocalPack {
    /// The pack's file, made by the first caller (the others wait for it).
    fn file(cell: &OnceLock<PackFile>, writes: &Writes, dest: &Path) -> io::Result<Arc<Local>> {
        let made = cell.get_or_init(|| {
            let made = Local::create(writes.clone(), dest.to_path_buf()).and_then(|local| {
                // Every write to a pack is of whole pages at a page's offset.
                if writes.direct {
                    set_direct(&local.file, true)?;
                }
                Ok(Arc::new(local))
            });
            made.map_err(|e| (e.kind(), e.to_string()))
        });
        made.clone()
            .map_err(|(kind, message)| io::Error::new(kind, message))
    }
}

impl PackWriter for LocalPack {
    fn whole(&mut self, blobs: Vec<(Digest, Pieces)>) -> Whole<'static> {
        let len: usize = blobs.iter().map(|(_, b)| b.len()).sum();
        let offset = self.next;
        self.next += written_len(len, self.writes.direct) as u64;
        let (cell, writes, dest, id) = (
            self.file.clone(),
            self.writes.clone(),
            self.dest.clone(),
            self.id.clone(),
        );
        let task = tokio::task::spawn_blocking(move || {
            for (i, (expected, bytes)) in blobs.iter().enumerate() {
                bytes.verify(*expected).map_err(|e| (i, e))?;
            }
            let file = LocalPack::file(&cell, &writes, &dest).map_err(|e| (0, e.into()))?;
            write_at(&file.file, &blobs, offset, writes.direct).map_err(|e| (0, e.into()))?;
            let mut at = offset;
            let received = blobs.iter().map(|(_, bytes)| {
                let packed = Some(Packed {
                    pack: id.clone(),
                    offset: at,
                });
                at += bytes.len() as u64;
                let size = bytes.len() as u64;
                let file = file.clone();
                Box::new(LocalReceived { file, packed, size }) as Box<dyn Received>
            });
            Ok(received.collect())
        });
        Box::pin(async move {
            task.await
                .map_err(|e| (0, BlobError::Io(io::Error::other(e))))?
        })
    }
}

/// How many bytes a group of `len` takes in a pack: with direct writes, whole pages.
fn written_len(len: usize, direct: bool) -> usize {
    if direct {
        len.next_multiple_of(PAGE)
    } else {
        len
    }
}

/// Writes `blobs` one after the other at `offset` of `file`, in one call from [`ALIGNED`]:
/// with `direct`, past the page cache, padded with zeros to whole pages.
fn write_at(
    file: &std::fs::File,
    blobs: &[(Digest, Pieces)],
    offset: u64,
    direct: bool,
) -> io::Result<()> {
    use std::os::unix::fs::FileExt as _;
    let len: usize = blobs.iter().map(|(_, b)| b.len()).sum();
    with_aligned(written_len(len, direct), |out| {
        let mut end = 0;
        for (_, pieces) in blobs {
            pieces.copy_to(&mut out[end..]);
            end += pieces.len();
        }
        out[end..].fill(0);
        file.write_all_at(out, offset)
    })
}

/// Blobs up to this size may arrive whole (the frames of a batch): see [`PackWriter::whole`]
/// and [`BlobBackend::receive_whole`].
pub const WHOLE_BLOB: u64 = quorum_api::v1::store::WHOLE_FRAME;

/// A blob is written in pieces of this many bytes, one blocking call each.
const WRITE_PIECE: usize = 1 << 20;

/// The unit of direct writes: their memory, length and file offset must be multiples of the
/// device's block size, which a page is for any device.
const PAGE: usize = 4096;

thread_local! {
    /// Each blocking thread's page-aligned buffer for direct writes, kept between writes: new
    /// memory is slow to touch the first time (on this kind of virtual machine especially),
    /// which is what direct writes avoid.
    static ALIGNED: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `f` on `len` page-aligned bytes of this thread's [`ALIGNED`] buffer, grown if need be.
fn with_aligned<T>(len: usize, f: impl FnOnce(&mut [u8]) -> T) -> T {
    ALIGNED.with_borrow_mut(|buffer| {
        if buffer.len() < len + PAGE {
            buffer.resize(len + PAGE, 0);
        }
        let at = buffer.as_ptr().align_offset(PAGE);
        f(&mut buffer[at..at + len])
    })
}

/// Turns direct writes (`O_DIRECT`) on or off for `file` (which has no other flag `F_SETFL`
/// changes).
fn set_direct(file: &std::fs::File, on: bool) -> io::Result<()> {
    let flags = if on {
        rustix::fs::OFlags::DIRECT
    } else {
        rustix::fs::OFlags::empty()
    };
    rustix::fs::fcntl_setfl(file, flags)?;
    Ok(())
}

/// Writes `bytes` (whole pages) at `file`'s position, a multiple of a page, past the page
/// cache: copied into [`ALIGNED`] a piece at a time.
fn write_direct(file: &std::fs::File, bytes: &[u8]) -> io::Result<()> {
    with_aligned(bytes.len().min(WRITE_PIECE), |buffer| {
        set_direct(file, true)?;
        let written = bytes.chunks(WRITE_PIECE).try_for_each(|chunk| {
            let aligned = &mut buffer[..chunk.len()];
            aligned.copy_from_slice(chunk);
            (&*file).write_all(aligned)
        });
        set_direct(file, false)?;
        written
    })
}

/// Whether a probe of what the file system in `dir` allows succeeded; if not, logs `without`
/// (what uploads do instead) with the reason.
fn probed(probe: io::Result<()>, dir: &Path, without: &str) -> bool {
    match probe {
        Ok(()) => true,
        Err(e) => {
            tracing::info!(error = %e, dir = %dir.display(), "{without}");
            false
        }
    }
}

/// Whether `root`'s file system takes direct writes: some (and older kernels' tmpfs) refuse
/// `O_DIRECT`.
fn can_write_direct(root: &Path) -> io::Result<()> {
    write_direct(&tempfile::tempfile_in(root)?, &[0; PAGE])
}

/// Whether `root`'s file system makes unnamed files (`O_TMPFILE`, refused by some file systems
/// and older kernels) and links them through `/proc/self/fd` (which needs `/proc`): makes one
/// and links it into `tmp` under a name of this process's, then removes that name.
fn can_link_unnamed(root: &Path, tmp: &Path) -> io::Result<()> {
    let file = open_unnamed(root)?;
    let probe = tmp.join(format!("probe-{}", std::process::id()));
    let _ = std::fs::remove_file(&probe);
    link_unnamed(&file, &probe)?;
    std::fs::remove_file(&probe)
}

/// An unnamed file in `dir`, readable and writable by this user only (as `tempfile` makes the
/// named ones).
fn open_unnamed(dir: &Path) -> io::Result<std::fs::File> {
    use rustix::fs::{Mode, OFlags};
    let fd = rustix::fs::openat(
        rustix::fs::CWD,
        dir,
        OFlags::TMPFILE | OFlags::WRONLY | OFlags::CLOEXEC,
        Mode::RUSR | Mode::WUSR,
    )?;
    Ok(fd.into())
}

/// Gives the unnamed `file` the name `to`. `linkat` with `AT_EMPTY_PATH` would need
/// `CAP_DAC_READ_SEARCH`; through `/proc/self/fd` it needs nothing.
fn link_unnamed(file: &std::fs::File, to: &Path) -> io::Result<()> {
    rustix::fs::linkat(
        rustix::fs::CWD,
        format!("/proc/self/fd/{}", file.as_raw_fd()),
        rustix::fs::CWD,
        to,
        rustix::fs::AtFlags::SYMLINK_FOLLOW,
    )?;
    Ok(())
}

/// A blob's bytes, received and verified, in a file of its own that only staging names; or a
/// batch's pack.
struct Local {
    file: std::fs::File,
    /// Device and inode of `file`: a name under the digest with the same is this upload's own.
    id: (u64, u64),
    /// `file`'s name in `tmp`, removed when dropped; `None` for an unnamed file.
    name: Option<tempfile::TempPath>,
    dest: PathBuf,
    writes: Writes,
}

impl Local {
    /// A new, empty file to be named `dest`: unnamed in `dest`'s directory (made if missing),
    /// or named in `tmp`.
    fn create(writes: Writes, dest: PathBuf) -> io::Result<Local> {
        let (file, name) = if writes.unnamed {
            let dir = dest.parent().expect("blob paths have a parent");
            let file = match open_unnamed(dir) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    std::fs::create_dir_all(dir)?;
                    open_unnamed(dir)
                }
                opened => opened,
            }?;
            (file, None)
        } else {
            let (file, name) = tempfile::Builder::new()
                .prefix("upload-")
                .tempfile_in(&writes.tmp)?
                .into_parts();
            (file, Some(name))
        };
        use std::os::unix::fs::MetadataExt as _;
        let meta = file.metadata()?;
        Ok(Local {
            file,
            id: (meta.dev(), meta.ino()),
            name,
            dest,
            writes,
        })
    }

    /// Appends `bytes` to the file, whose length so far is a multiple of a page, and returns
    /// how many it took. With direct writes, whole pages go past the page cache: writing a
    /// GiB through it cost 1.7-3.4 s of system time on the project machine, against 0.8-1.0 s
    /// past it (`dd`), most of it the first touch of the cache's new pages. The rest, less
    /// than a page, goes through the cache if `last` (a page beyond the end of the file needs
    /// no read first), else is left for the next call.
    fn append(&self, bytes: &[u8], last: bool) -> io::Result<usize> {
        let whole = if self.writes.direct {
            bytes.len() / PAGE * PAGE
        } else {
            0
        };
        if whole > 0 {
            write_direct(&self.file, &bytes[..whole])?;
        }
        if last && whole < bytes.len() {
            (&self.file).write_all(&bytes[whole..])?;
            return Ok(bytes.len());
        }
        Ok(whole)
    }

    fn dir(&self) -> &Path {
        self.dest.parent().expect("blob paths have a parent")
    }

    /// Gives the file one more name, `to`.
    fn link(&self, to: &Path) -> io::Result<()> {
        match &self.name {
            Some(name) => std::fs::hard_link(name, to),
            None => link_unnamed(&self.file, to),
        }
    }

    /// Syncs the bytes, then stages them: a name under the digest, made outside the lock so
    /// that its directory is synced outside it too. A name already there (identical bytes,
    /// recorded or staged by another upload) is left alone: `reveal` replaces it. Returns
    /// whether it made the name, so that the directory must be synced.
    fn stage(&self) -> io::Result<bool> {
        self.file.sync_all()?;
        let linked = match self.link(&self.dest) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                std::fs::create_dir_all(self.dir())?;
                self.link(&self.dest)
            }
            linked => linked,
        };
        match linked {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Whether the name under the digest is this file (a name that staging made).
    fn is_own(&self) -> io::Result<bool> {
        use std::os::unix::fs::MetadataExt as _;
        match std::fs::symlink_metadata(&self.dest) {
            Ok(there) => Ok((there.dev(), there.ino()) == self.id),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Under the write lock no other upload places this digest and garbage collection deletes
    /// nothing, so a name under the digest that is still this upload's own file (staged by
    /// `stage`, its directory synced since) stays until the commit, and then nothing is left to
    /// do. Otherwise (collected as bytes without metadata meanwhile, or another upload's bytes)
    /// the file is given a name in `tmp` that is renamed over the digest's (a rename replaces a
    /// name at once, so readers never find it missing), and its directory must be synced:
    /// returns whether it must.
    fn reveal(&self) -> io::Result<bool> {
        if self.is_own()? {
            return Ok(false);
        }
        // The inode number is unique among the files that exist, and this one exists.
        let aside = self.writes.tmp.join(format!("reveal-{}", self.id.1));
        match std::fs::remove_file(&aside) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        match self.link(&aside) {
            // An unnamed file whose staged name is gone cannot be named again (the kernel allows
            // linking one only until its first name goes): its bytes go into a new file.
            Err(e) if e.kind() == io::ErrorKind::NotFound && self.name.is_none() => {
                let copy = open_unnamed(self.dir())?;
                let mut bytes =
                    std::fs::File::open(format!("/proc/self/fd/{}", self.file.as_raw_fd()))?;
                io::copy(&mut bytes, &mut &copy)?;
                copy.sync_all()?;
                link_unnamed(&copy, &aside)?;
            }
            linked => linked?,
        }
        let placed =
            std::fs::create_dir_all(self.dir()).and_then(|()| std::fs::rename(&aside, &self.dest));
        if let Err(e) = placed {
            let _ = std::fs::remove_file(&aside);
            return Err(e);
        }
        Ok(true)
    }

    /// Removes the name staging made, if it is still this file's.
    fn unstage(&self) -> io::Result<()> {
        if self.is_own()? {
            std::fs::remove_file(&self.dest)?;
        }
        Ok(())
    }
}

/// A local blob as the [`Received`] a batch handles: its file, or its place in the pack it
/// shares with the rest of its batch. [`LocalDir`] groups the blocking work of a batch's blobs
/// into a few tasks ([`BlobBackend::sync_all`] and the rest), each file once.
struct LocalReceived {
    file: Arc<Local>,
    packed: Option<Packed>,
    size: u64,
}

/// Whether every blob in `items` is a [`LocalReceived`] (those a `LocalDir` received).
fn all_local(items: &[Box<dyn Received>]) -> bool {
    items
        .iter()
        .all(|item| <dyn Any>::is::<LocalReceived>(item.as_ref()))
}

/// The files of local blobs, each once (a pack holds many blobs).
fn files_of(items: &[Box<dyn Received>]) -> Vec<Arc<Local>> {
    let mut seen = HashSet::new();
    items
        .iter()
        .map(|item| {
            let item: &LocalReceived =
                <dyn Any>::downcast_ref(item.as_ref()).expect("checked to be local");
            item.file.clone()
        })
        .filter(|file| seen.insert(Arc::as_ptr(file)))
        .collect()
}

impl Received for LocalReceived {
    fn size(&self) -> u64 {
        self.size
    }

    fn packed(&self) -> Option<Packed> {
        self.packed.clone()
    }

    fn sync(&self) -> BoxFuture<'static, Result<Option<PathBuf>, BlobError>> {
        let local = self.file.clone();
        Box::pin(blocking(move || {
            Ok(local.stage()?.then(|| local.dir().to_path_buf()))
        }))
    }

    fn reveal(self: Box<Self>) -> BoxFuture<'static, Result<Option<PathBuf>, BlobError>> {
        let local = self.file;
        Box::pin(blocking(move || {
            Ok(local.reveal()?.then(|| local.dir().to_path_buf()))
        }))
    }

    fn unstage(&self) -> BoxFuture<'static, Result<(), BlobError>> {
        let local = self.file.clone();
        Box::pin(blocking(move || local.unstage()))
    }
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

    fn pack(&self) -> Option<Box<dyn PackWriter>> {
        let id = PackId::random();
        Some(Box::new(LocalPack {
            dest: self.pack_path(&id),
            id,
            writes: self.writes.clone(),
            file: Arc::default(),
            next: 0,
        }))
    }

    fn get(
        &self,
        digest: Digest,
        packed: Option<Packed>,
        range: Range<u64>,
    ) -> BoxFuture<'_, Result<ByteStream<'static>, BlobError>> {
        Box::pin(async move {
            let (path, start) = match &packed {
                Some(p) => (self.pack_path(&p.pack), p.offset),
                None => (self.path(&digest), 0),
            };
            let mut file = match tokio::fs::File::open(path).await {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    return Err(BlobError::Gone(digest));
                }
                Err(e) => return Err(e.into()),
            };
            file.seek(io::SeekFrom::Start(start + range.start)).await?;
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

    /// Syncs and stages the blobs a few blocking tasks at a time rather than one task per
    /// blob and per directory: the blobs are grouped by directory, and each task takes whole
    /// directories, so it syncs each of them once, after staging all its blobs there.
    fn sync_all(&self, items: &[Box<dyn Received>]) -> BoxFuture<'static, Result<(), BlobError>> {
        if !all_local(items) {
            return sync_each(items);
        }
        let mut dirs: BTreeMap<PathBuf, Vec<Arc<Local>>> = BTreeMap::new();
        for local in files_of(items) {
            dirs.entry(local.dir().to_path_buf())
                .or_default()
                .push(local);
        }
        let mut tasks: Vec<Vec<(PathBuf, Vec<Arc<Local>>)>> = Vec::new();
        for (i, dir) in dirs.into_iter().enumerate() {
            match tasks.get_mut(i % PARALLEL_SYNCS) {
                Some(task) => task.push(dir),
                None => tasks.push(vec![dir]),
            }
        }
        Box::pin(async move {
            futures::future::try_join_all(tasks.into_iter().map(|task| {
                blocking(move || {
                    for (dir, blobs) in task {
                        let mut staged = false;
                        for blob in &blobs {
                            staged |= blob.stage()?;
                        }
                        if staged {
                            sync_dir(&dir)?;
                        }
                    }
                    Ok(())
                })
            }))
            .await?;
            Ok(())
        })
    }

    /// One blocking task for all the blobs: under the lock a staged name is nearly always
    /// still its own, and checking that is one `stat`.
    fn unstage_all(
        &self,
        items: &[Box<dyn Received>],
    ) -> BoxFuture<'static, Result<(), BlobError>> {
        if !all_local(items) {
            return unstage_each(items);
        }
        let locals = files_of(items);
        Box::pin(blocking(move || {
            locals.iter().try_for_each(|l| l.unstage())
        }))
    }

    /// One blocking task reveals all the blobs (a `stat` each, as a rule); the directories of
    /// those placed again are then synced in parallel. The files are closed (and any temporary
    /// names removed) in that task too, off the runtime's threads.
    fn place_all(
        &self,
        items: Vec<Box<dyn Received>>,
    ) -> BoxFuture<'static, Result<(), BlobError>> {
        if !all_local(&items) {
            return place_each(items);
        }
        let locals = files_of(&items);
        Box::pin(async move {
            let dirs = blocking(move || {
                let mut dirs = Vec::new();
                for l in &locals {
                    if l.reveal()? {
                        dirs.push(Some(l.dir().to_path_buf()));
                    }
                }
                drop((locals, items));
                Ok(dirs)
            })
            .await?;
            sync_dirs(dirs).await
        })
    }

    fn list(&self) -> BoxFuture<'_, Result<Vec<Digest>, BlobError>> {
        let root = self.root.clone();
        Box::pin(async move {
            let found = tokio::task::spawn_blocking(move || -> io::Result<Vec<Digest>> {
                let mut out = Vec::new();
                for dir in std::fs::read_dir(&root)? {
                    let dir = dir?;
                    // `<first 2 hex>` directories; not `packs`.
                    if !dir.file_type()?.is_dir() || dir.file_name().len() != 2 {
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

    fn packs(&self) -> BoxFuture<'_, Result<Vec<(PackId, u64)>, BlobError>> {
        let dir = self.packs.clone();
        Box::pin(blocking(move || {
            let entries = match std::fs::read_dir(&dir) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
                entries => entries?,
            };
            let mut out = Vec::new();
            for entry in entries {
                let entry = entry?;
                let Some(id) = entry.file_name().to_str().and_then(PackId::parse) else {
                    continue;
                };
                match entry.metadata() {
                    Ok(meta) => out.push((id, meta.len())),
                    // Deleted since the listing.
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(out)
        }))
    }

    fn delete_pack(&self, pack: PackId) -> BoxFuture<'_, Result<(), BlobError>> {
        Box::pin(async move {
            match tokio::fs::remove_file(self.pack_path(&pack)).await {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e.into()),
                _ => Ok(()),
            }
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

    /// Blobs in a bucket are objects of their own: S3 takes no pack ([`BlobBackend::pack`]).
    fn get(
        &self,
        digest: Digest,
        _packed: Option<Packed>,
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

    /// The local directory as opened (unnamed files and direct writes, where the file system
    /// allows them, as the test machines' does), or forced to named temporary files in `tmp`
    /// and the page cache as on one that does not.
    fn open(dir: &Path, unnamed: bool) -> LocalDir {
        let local = LocalDir::open(dir.join("blobs"), dir.join("tmp"), true).unwrap();
        assert!(local.writes.unnamed, "this file system makes unnamed files");
        assert!(local.writes.direct, "this file system takes direct writes");
        // Named temporary files go with buffered writes, so that both ways are tested.
        let writes = Writes {
            unnamed,
            direct: unnamed,
            ..local.writes
        };
        LocalDir { writes, ..local }
    }

    /// Files this process holds open in `dir` that have no name: unnamed uploads.
    fn unnamed_files(dir: &Path) -> Vec<String> {
        let dir = dir.canonicalize().unwrap();
        std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
            .map(|target| target.display().to_string())
            .filter(|target| {
                target.starts_with(&*dir.to_string_lossy()) && target.ends_with(" (deleted)")
            })
            .collect()
    }

    #[tokio::test]
    async fn a_staged_blob_collected_or_replaced_before_its_reveal_is_placed_again() {
        staged_blobs_collected_or_replaced_are_placed_again(true).await;
    }

    #[tokio::test]
    async fn the_same_with_named_temporary_files() {
        staged_blobs_collected_or_replaced_are_placed_again(false).await;
    }

    /// Staging happens before the write lock, so by the time a blob is revealed under it, its
    /// staged name may have been collected as bytes without metadata, or replaced by another
    /// upload of the same bytes: either way the blob is placed again. Unstaging a refused blob
    /// removes its own staged name only, never another upload's.
    async fn staged_blobs_collected_or_replaced_are_placed_again(unnamed: bool) {
        let dir = tempfile::tempdir().unwrap();
        let local = open(dir.path(), unnamed);
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
        assert_eq!(unnamed_files(dir.path()), Vec::<String>::new());
    }

    #[tokio::test]
    async fn a_batch_goes_into_one_pack_read_back_by_place() {
        batch_packed(true).await;
    }

    #[tokio::test]
    async fn the_same_through_named_temporary_files_and_the_page_cache() {
        batch_packed(false).await;
    }

    async fn read(local: &LocalDir, digest: Digest, at: &Packed, range: Range<u64>) -> Vec<u8> {
        let got = local.get(digest, Some(at.clone()), range).await.unwrap();
        let chunks: Vec<Bytes> = got.try_collect().await.unwrap();
        chunks.concat()
    }

    /// A batch's groups go into one pack, each at the place it was given when handed over,
    /// whichever is written first; the pack has no name until it is staged, a group that does
    /// not match its digests leaves nothing, and a pack collected as bytes without metadata
    /// between staging and recording is placed again.
    async fn batch_packed(unnamed: bool) {
        let dir = tempfile::tempdir().unwrap();
        let local = open(dir.path(), unnamed);
        let blob = |n: usize, seed: u8| -> Bytes {
            (0..n)
                .map(|i| (i as u8).wrapping_mul(seed))
                .collect::<Vec<u8>>()
                .into()
        };
        let (a, b, c) = (blob(5000, 3), blob(3, 5), blob(70_000, 7));
        let mut writer = local.pack().expect("a local directory packs batches");
        // A blob may arrive in several pieces.
        let c_pieces = Pieces(vec![c.slice(..1), c.slice(1..4096), c.slice(4096..)]);
        let first = writer.whole(vec![
            (Digest::of(&a), a.clone().into()),
            (Digest::of(&b), b.clone().into()),
        ]);
        let second = writer.whole(vec![(Digest::of(&c), c_pieces)]);
        let mut items = second.await.unwrap();
        items.splice(0..0, first.await.unwrap());
        let at: Vec<Packed> = items.iter().map(|i| i.packed().unwrap()).collect();
        assert!(at.iter().all(|p| p.pack == at[0].pack), "{at:?}");
        // With direct writes a group is padded to whole pages.
        let second_at = if unnamed { 8192 } else { 5003 };
        let offsets: Vec<u64> = at.iter().map(|p| p.offset).collect();
        assert_eq!(offsets, vec![0, 5000, second_at]);
        let pack = local.pack_path(&at[0].pack);
        assert!(!pack.exists(), "no name before staging");
        assert_eq!(unnamed_files(dir.path()).len(), usize::from(unnamed));

        local.sync_all(&items).await.unwrap();
        assert!(pack.exists(), "staged under its name");
        local.delete_pack(at[0].pack.clone()).await.unwrap();
        local.place_all(items).await.unwrap();
        assert_eq!(local.packs().await.unwrap().len(), 1, "placed again");
        for (bytes, place) in [&a, &b, &c].into_iter().zip(&at) {
            let got = read(&local, Digest::of(bytes), place, 0..bytes.len() as u64).await;
            assert_eq!(got, &bytes[..]);
        }
        assert_eq!(
            read(&local, Digest::of(&c), &at[2], 10..20).await,
            &c[10..20]
        );
        // The writer holds the pack's file until the batch is done with.
        drop(writer);
        assert_eq!(temporary_files(dir.path()), 0);
        assert_eq!(unnamed_files(dir.path()), Vec::<String>::new());

        // A blob that does not match: its group fails, naming it, and nothing is left.
        let mut writer = local.pack().unwrap();
        let wrong = writer.whole(vec![
            (Digest::of(&a), a.clone().into()),
            (Digest::of(&a), b.clone().into()),
        ]);
        let Err((i, BlobError::Mismatch { .. })) = wrong.await else {
            panic!("a blob that does not match its digest was kept");
        };
        assert_eq!(i, 1);
        assert_eq!(local.packs().await.unwrap().len(), 1);
        assert_eq!(temporary_files(dir.path()), 0);
        assert_eq!(unnamed_files(dir.path()), Vec::<String>::new());
    }

    /// A received blob is in no directory until it is staged, and dropping it leaves nothing:
    /// no name anywhere, no file held open.
    #[tokio::test]
    async fn a_received_blob_is_unnamed_until_staged_and_gone_when_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let local = open(dir.path(), true);
        let small: &'static [u8] = b"a small blob";
        let large: Vec<u8> = (0..3 * WRITE_PIECE as u32 + 17)
            .map(|i| (i % 251) as u8)
            .collect();
        let large_digest = Digest::of(&large);
        let pieces = large
            .chunks(100_000)
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect::<Vec<_>>();
        let mut items = received(&local, small).await;
        items.push(
            local
                .receive(large_digest, futures::stream::iter(pieces).boxed(), 1 << 30)
                .await
                .unwrap(),
        );
        assert_eq!(items[1].size(), large.len() as u64);
        let named = |d: &Path| -> usize {
            std::fs::read_dir(d)
                .unwrap()
                .map(|sub| std::fs::read_dir(sub.unwrap().path()).unwrap().count())
                .sum()
        };
        assert_eq!(unnamed_files(dir.path()).len(), 2);
        assert_eq!(
            (
                named(&dir.path().join("blobs")),
                temporary_files(dir.path())
            ),
            (0, 0)
        );
        drop(items);
        assert_eq!(unnamed_files(dir.path()), Vec::<String>::new());

        // Staged and placed: the names are the files, with the right bytes.
        let mut items = received(&local, small).await;
        let pieces = large
            .chunks(65_536)
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect::<Vec<_>>();
        items.push(
            local
                .receive(large_digest, futures::stream::iter(pieces).boxed(), 1 << 30)
                .await
                .unwrap(),
        );
        local.sync_all(&items).await.unwrap();
        local.place_all(items).await.unwrap();
        assert_eq!(
            std::fs::read(local.path(&Digest::of(small))).unwrap(),
            small
        );
        assert_eq!(std::fs::read(local.path(&large_digest)).unwrap(), large);
        assert_eq!(temporary_files(dir.path()), 0);
        assert_eq!(unnamed_files(dir.path()), Vec::<String>::new());
    }
}
