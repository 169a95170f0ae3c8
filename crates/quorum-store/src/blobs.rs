//! Where blob bytes live, behind [`BlobBackend`] so an object store can replace the local
//! directory. A backend keeps a blob only once its bytes hashed to the digest they were sent as.

use std::io;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use futures::StreamExt as _;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use quorum_core::Digest;
use quorum_core::digest::Hasher;
use tokio::io::AsyncWriteExt as _;

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
    #[error("blob is larger than the {max} bytes this store accepts")]
    TooLarge { max: u64 },
    #[error("blob {0} is recorded but its bytes are gone")]
    Gone(Digest),
    #[error("blob storage failed: {0}")]
    Io(#[from] io::Error),
}

/// A stored blob, ready to stream.
pub struct StoredBlob {
    pub size: u64,
    pub body: ByteStream<'static>,
}

pub trait BlobBackend: Send + Sync + 'static {
    /// Receives `body` as blob `expected`, keeping it only if it hashes to `expected` and is at
    /// most `max_bytes` long; anything partial is removed. Returns the size. Concurrent puts of
    /// one blob all succeed.
    fn put<'a>(
        &'a self,
        expected: Digest,
        body: ByteStream<'a>,
        max_bytes: u64,
    ) -> BoxFuture<'a, Result<u64, BlobError>>;

    /// Opens a stored blob.
    fn get(&self, digest: Digest) -> BoxFuture<'_, Result<StoredBlob, BlobError>>;
}

/// Blobs as files `<root>/<first 2 hex>/<hex>`, received into `<tmp>` and renamed into place.
#[derive(Debug, Clone)]
pub struct LocalDir {
    root: PathBuf,
    tmp: PathBuf,
}

impl LocalDir {
    /// Creates both directories, and removes uploads a previous process left unfinished in `tmp`
    /// (nothing else writes there).
    pub fn open(root: PathBuf, tmp: PathBuf) -> io::Result<LocalDir> {
        std::fs::create_dir_all(&root)?;
        std::fs::create_dir_all(&tmp)?;
        for entry in std::fs::read_dir(&tmp)? {
            let path = entry?.path();
            tracing::info!(path = %path.display(), "removing an unfinished upload");
            std::fs::remove_file(&path)?;
        }
        Ok(LocalDir { root, tmp })
    }

    pub fn path(&self, digest: &Digest) -> PathBuf {
        let hex = digest.hex();
        self.root.join(&hex[..2]).join(hex)
    }

    async fn receive(
        &self,
        expected: Digest,
        mut body: ByteStream<'_>,
        max_bytes: u64,
    ) -> Result<u64, BlobError> {
        let tmp = self.tmp.clone();
        let temp = tokio::task::spawn_blocking(move || {
            tempfile::Builder::new().prefix("upload-").tempfile_in(tmp)
        })
        .await
        .map_err(io::Error::other)??;
        // The TempPath removes the file when dropped: on every error return below, and when the
        // request is abandoned mid-body and this future is dropped.
        let (file, temp_path) = temp.into_parts();
        let mut file = tokio::fs::File::from_std(file);
        let mut hasher = Hasher::new();
        let mut size = 0u64;
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|source| BlobError::Truncated {
                digest: expected,
                received: size,
                source,
            })?;
            size += chunk.len() as u64;
            if size > max_bytes {
                return Err(BlobError::TooLarge { max: max_bytes });
            }
            hasher.update(&chunk);
            file.write_all(&chunk).await?;
        }
        let actual = hasher.finish();
        if actual != expected {
            return Err(BlobError::Mismatch {
                expected,
                actual,
                size,
            });
        }
        file.flush().await?;
        file.sync_all().await?;
        drop(file);
        let dest = self.path(&expected);
        tokio::task::spawn_blocking(move || place(temp_path, &dest))
            .await
            .map_err(io::Error::other)??;
        Ok(size)
    }
}

/// Moves a verified temporary file to `dest`. Content addressing makes a concurrent writer of the
/// same digest harmless: whichever rename lands last replaces identical bytes.
fn place(temp: tempfile::TempPath, dest: &Path) -> io::Result<()> {
    let dir = dest.parent().expect("blob paths have a parent");
    std::fs::create_dir_all(dir)?;
    if dest.exists() {
        return Ok(());
    }
    temp.persist(dest).map_err(|e| e.error)?;
    // The rename is durable only once the directory entry is.
    std::fs::File::open(dir)?.sync_all()
}

impl BlobBackend for LocalDir {
    fn put<'a>(
        &'a self,
        expected: Digest,
        body: ByteStream<'a>,
        max_bytes: u64,
    ) -> BoxFuture<'a, Result<u64, BlobError>> {
        Box::pin(self.receive(expected, body, max_bytes))
    }

    fn get(&self, digest: Digest) -> BoxFuture<'_, Result<StoredBlob, BlobError>> {
        Box::pin(async move {
            let file = match tokio::fs::File::open(self.path(&digest)).await {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    return Err(BlobError::Gone(digest));
                }
                Err(e) => return Err(e.into()),
            };
            let size = file.metadata().await?.len();
            let body = tokio_util::io::ReaderStream::with_capacity(file, 256 * 1024).boxed();
            Ok(StoredBlob { size, body })
        })
    }
}
