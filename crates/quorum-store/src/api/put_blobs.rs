//! `POST /api/v1/blobs`, upload token: a batch of blobs in one streamed request, so that a tree
//! of many small files costs one request, one metadata transaction and (in a local directory,
//! where the batch's blobs share a pack) one file and one sync per batch rather than all of that
//! per file. The body is frames of `sha256:<hex> <size>\n`
//! and exactly `size` bytes (`quorum_api::v1::store::batch_frame_header`).
//!
//! All or none: each frame is hashed into a file no reader sees as it arrives, and only when the
//! whole body has arrived and every frame matched does one transaction count the batch against
//! the token (one file per frame, and its bytes) and the tenant's quota, place every blob and
//! link them. A frame that does not match its digest, a body that ends inside a frame, bytes
//! after a frame that do not form the next frame's header, or a batch over a limit leaves
//! nothing of the batch behind, and counts nothing but the call. Limits are also checked as
//! frames arrive, against the counters at the start, so a batch that cannot fit is cut off
//! early; the transaction has the last word.
//!
//! Frames up to [`WHOLE_BLOB`] bytes (all a client sends, as a rule) are held whole in memory,
//! as slices of the body's own chunks ([`Chunks`]: no copy), and handed to the backend in groups
//! of about a MiB ([`Arriving`]), which hashes and writes a group in one blocking call while the
//! next frames are read: one hop to a blocking thread per group rather than per blob. A backend
//! that keeps packs writes all the groups of a batch into one ([`BlobBackend::pack`]), so the
//! batch costs one file and one sync. Larger frames stream into the backend as a `PUT` does,
//! as slices too.

use std::io;
use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::{BoxStream, FuturesOrdered};
use futures::{StreamExt as _, TryStreamExt as _};
use quorum_api::v1::store::{BlobsStored, MAX_BATCH_BLOBS, MAX_BATCH_BYTES, MAX_FRAME_HEADER};
use quorum_core::Digest;
use quorum_service::ApiError;

use crate::Store;
use crate::auth::Limits;
use crate::auth::Upload;
use crate::blobs::{BlobBackend, BlobError, ByteStream, PackWriter, Pieces, Received, WHOLE_BLOB};
use crate::error::Error;

pub async fn put_blobs(
    State(store): State<Arc<Store>>,
    Upload { slot, limits }: Upload,
    body: Body,
) -> Result<Json<BlobsStored>, Error> {
    let started = std::time::Instant::now();
    let used = {
        let mut conn = store.db.pool().acquire().await?;
        crate::usage::counts(&mut conn, &limits.jti).await?
    };
    let mut reader = Chunks::new(body.into_data_stream().map_err(io::Error::other).boxed());
    let mut arriving = Arriving::new(store.blobs.as_ref());
    let read = read_frames(&store, &limits, used, &mut reader, &mut arriving).await;
    let items = arriving.finish(read).await?;
    let blobs = items.len() as u64;
    let received = started.elapsed();
    let bytes = crate::ingest::store_blobs(&store, &slot.tenant, &limits, items).await?;
    tracing::info!(
        tenant = %slot.tenant, build = %slot.build, blobs, bytes, ?received,
        elapsed = ?started.elapsed(), "blob batch stored"
    );
    Ok(Json(BlobsStored { blobs, bytes }))
}

/// The request body as it arrives, read a frame at a time without copying: a frame's bytes are
/// slices of the body's own chunks.
struct Chunks {
    chunks: BoxStream<'static, io::Result<Bytes>>,
    /// The unread rest of the current chunk.
    head: Bytes,
}

impl Chunks {
    fn new(chunks: BoxStream<'static, io::Result<Bytes>>) -> Chunks {
        Chunks {
            chunks,
            head: Bytes::new(),
        }
    }

    /// Makes sure some unread bytes are at hand; false at the end of the body.
    async fn fill(&mut self) -> io::Result<bool> {
        while self.head.is_empty() {
            match self.chunks.next().await {
                Some(chunk) => self.head = chunk?,
                None => return Ok(false),
            }
        }
        Ok(true)
    }

    /// Up to `most` of the bytes at hand ([`Chunks::fill`]), consumed.
    fn split(&mut self, most: u64) -> Bytes {
        let n = usize::try_from(most).unwrap_or(usize::MAX);
        self.head.split_to(n.min(self.head.len()))
    }

    /// The bytes up to and including the next newline, at most `most` of them: fewer, and no
    /// newline, if the body ends first.
    async fn line(&mut self, most: usize) -> io::Result<Vec<u8>> {
        let mut line = Vec::new();
        while line.len() < most && self.fill().await? {
            let room = (most - line.len()).min(self.head.len());
            let newline = self.head[..room].iter().position(|&b| b == b'\n');
            let piece = self.split(newline.map_or(room, |at| at + 1) as u64);
            line.extend_from_slice(&piece);
            if newline.is_some() {
                break;
            }
        }
        Ok(line)
    }
}

/// Reads the body's frames into `arriving`, checking the batch's limits as they come against
/// the token's counters at the start (`used`: files, bytes).
async fn read_frames(
    store: &Store,
    limits: &Limits,
    (used_files, used_bytes): (u64, u64),
    reader: &mut Chunks,
    arriving: &mut Arriving<'_>,
) -> Result<(), Error> {
    let mut total = 0u64;
    let mut frame = 0;
    while let Some((digest, size)) = read_header(reader, frame).await? {
        if frame == MAX_BATCH_BLOBS {
            return Err(ApiError::bad_request(format!(
                "frame {frame}: a batch holds at most {MAX_BATCH_BLOBS} blobs; nothing of the batch was stored"
            ))
            .into());
        }
        if size > store.max_blob_bytes {
            return Err(in_frame(
                frame,
                BlobError::TooLarge {
                    max: store.max_blob_bytes,
                }
                .into(),
            ));
        }
        total = total.saturating_add(size);
        if total > MAX_BATCH_BYTES {
            return Err(ApiError::bad_request(format!(
                "frame {frame} ({digest}): a batch holds at most {MAX_BATCH_BYTES} bytes; send larger blobs one per PUT /api/v1/blobs/{{digest}}; nothing of the batch was stored"
            ))
            .into());
        }
        let files = frame as u64 + 1;
        let over_files = limits
            .max_files
            .is_some_and(|max| used_files.saturating_add(files) > max);
        let over_bytes = limits
            .max_bytes
            .is_some_and(|max| used_bytes.saturating_add(total) > max);
        if over_files || over_bytes {
            return Err(crate::usage::batch_over(
                limits, used_files, used_bytes, files, total,
            ));
        }
        if size <= WHOLE_BLOB {
            let bytes = whole_frame(reader, digest, size)
                .await
                .map_err(|e| in_frame(frame, e.into()))?;
            arriving.whole(frame, digest, bytes).await?;
        } else {
            let received = store
                .blobs
                .receive(digest, frame_body(reader, size), size)
                .await
                .map_err(|e| in_frame(frame, e.into()))?;
            arriving.kept.push((digest, received));
        }
        frame += 1;
    }
    Ok(())
}

/// A group of whole frames is handed to the backend at this many bytes...
const GROUP_BYTES: u64 = 1 << 20;
/// ...or this many blobs.
const GROUP_BLOBS: usize = 64;
/// Groups being written at once for one batch; the next frames wait for the oldest beyond.
const GROUPS_IN_FLIGHT: usize = 4;

/// A group handed to the backend: its blobs, received, or the error naming the frame.
type Keeping<'a> = BoxFuture<'a, Result<Vec<(Digest, Box<dyn Received>)>, Error>>;

/// A batch's blobs as they arrive: whole frames gathered into groups, each kept by the backend
/// in one go (into the batch's pack, [`BlobBackend::pack`], or [`BlobBackend::receive_whole`]),
/// a few groups at a time while the next frames are read.
struct Arriving<'a> {
    blobs: &'a dyn BlobBackend,
    pack: Option<Box<dyn PackWriter>>,
    group: Vec<(Digest, Pieces)>,
    group_bytes: u64,
    /// The frame number of `group`'s first blob.
    group_first: usize,
    in_flight: FuturesOrdered<Keeping<'a>>,
    kept: Vec<(Digest, Box<dyn Received>)>,
}

impl<'a> Arriving<'a> {
    fn new(blobs: &'a dyn BlobBackend) -> Arriving<'a> {
        Arriving {
            blobs,
            pack: blobs.pack(),
            group: Vec::new(),
            group_bytes: 0,
            group_first: 0,
            in_flight: FuturesOrdered::new(),
            kept: Vec::new(),
        }
    }

    /// Adds frame `frame`, read whole, to the open group; hands the group over once it is
    /// full, and waits for the oldest group if too many are in flight.
    async fn whole(&mut self, frame: usize, digest: Digest, bytes: Pieces) -> Result<(), Error> {
        if self.group.is_empty() {
            self.group_first = frame;
        }
        self.group_bytes += bytes.len() as u64;
        self.group.push((digest, bytes));
        if self.group_bytes >= GROUP_BYTES || self.group.len() >= GROUP_BLOBS {
            self.hand_over();
        }
        while self.in_flight.len() > GROUPS_IN_FLIGHT {
            let kept = self.in_flight.next().await.expect("groups are in flight")?;
            self.kept.extend(kept);
        }
        Ok(())
    }

    fn hand_over(&mut self) {
        let group = std::mem::take(&mut self.group);
        self.group_bytes = 0;
        let first = self.group_first;
        let digests: Vec<Digest> = group.iter().map(|(d, _)| *d).collect();
        let keeping = match &mut self.pack {
            Some(pack) => pack.whole(group),
            None => self.blobs.receive_whole(group),
        };
        self.in_flight.push_back(Box::pin(async move {
            let received = keeping
                .await
                .map_err(|(i, e)| in_frame(first + i, e.into()))?;
            Ok(digests.into_iter().zip(received).collect())
        }));
    }

    /// Every blob of the batch, once `read` (reading the body) succeeded and every group was
    /// kept. On an error, first waits for the groups still being written, so that nothing of
    /// the batch outlives its answer.
    async fn finish(
        mut self,
        read: Result<(), Error>,
    ) -> Result<Vec<(Digest, Box<dyn Received>)>, Error> {
        if read.is_ok() && !self.group.is_empty() {
            self.hand_over();
        }
        let mut result = read;
        while let Some(kept) = self.in_flight.next().await {
            match kept {
                Ok(kept) => self.kept.extend(kept),
                Err(e) => result = result.and(Err(e)),
            }
        }
        result.map(|()| self.kept)
    }
}

/// The next `size` bytes of the body, as the pieces they arrived in; an error if it ends first.
async fn whole_frame(reader: &mut Chunks, digest: Digest, size: u64) -> Result<Pieces, BlobError> {
    let mut pieces = Vec::new();
    let mut received = 0;
    while received < size {
        let source = match reader.fill().await {
            Ok(true) => {
                let piece = reader.split(size - received);
                received += piece.len() as u64;
                pieces.push(piece);
                continue;
            }
            Ok(false) => ended_early(size - received),
            Err(e) => e,
        };
        return Err(BlobError::Truncated {
            digest,
            received,
            source,
        });
    }
    Ok(Pieces(pieces))
}

fn ended_early(left: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        format!("the body ended {left} bytes before the frame did"),
    )
}

/// Reads the header of frame `frame`; `None` at the end of the body.
async fn read_header(reader: &mut Chunks, frame: usize) -> Result<Option<(Digest, u64)>, Error> {
    let line = reader.line(MAX_FRAME_HEADER).await.map_err(|e| {
        ApiError::bad_request(format!(
            "frame {frame}: the body broke off ({e}); nothing of the batch was stored"
        ))
    })?;
    if line.is_empty() {
        return Ok(None);
    }
    let bad = |why: &str| -> Error {
        let shown = String::from_utf8_lossy(&line[..line.len().min(80)])
            .escape_debug()
            .to_string();
        ApiError::bad_request(format!(
            "frame {frame}: header `{shown}` {why}; nothing of the batch was stored"
        ))
        .into()
    };
    let Some(text) = line.strip_suffix(b"\n") else {
        return Err(bad(if line.len() == MAX_FRAME_HEADER {
            "is too long"
        } else {
            "ends with the body, before its newline"
        }));
    };
    let parsed = std::str::from_utf8(text).ok().and_then(|t| {
        let (digest, size) = t.split_once(' ')?;
        Some((digest.parse::<Digest>().ok()?, size.parse::<u64>().ok()?))
    });
    parsed
        .map(Some)
        .ok_or_else(|| bad("is not `sha256:<hex> <size>`"))
}

/// Exactly the next `size` bytes of the body, as they arrived; an error if it ends first.
fn frame_body(reader: &mut Chunks, size: u64) -> ByteStream<'_> {
    futures::stream::try_unfold((reader, size), |(reader, left)| async move {
        if left == 0 {
            return Ok(None);
        }
        if !reader.fill().await? {
            return Err(ended_early(left));
        }
        let chunk = reader.split(left);
        let left = left - chunk.len() as u64;
        Ok(Some((chunk, (reader, left))))
    })
    .boxed()
}

/// Names the frame in a client error about it.
fn in_frame(frame: usize, e: Error) -> Error {
    let api = match e {
        Error::Api(api) => api,
        Error::Blob(
            e @ (BlobError::Mismatch { .. }
            | BlobError::Truncated { .. }
            | BlobError::TooLarge { .. }),
        ) => {
            let status = match e {
                BlobError::TooLarge { .. } => axum::http::StatusCode::PAYLOAD_TOO_LARGE,
                _ => axum::http::StatusCode::BAD_REQUEST,
            };
            ApiError::new(status, e.to_string())
        }
        e => return e,
    };
    ApiError::new(
        api.status,
        format!(
            "frame {frame}: {}; nothing of the batch was stored",
            api.message.trim_end_matches("; nothing was stored")
        ),
    )
    .into()
}

#[cfg(test)]
mod tests {
    use quorum_api::v1::store::batch_frame_header;

    use super::*;

    /// `body` as a stream of chunks, cut at `cuts` (ascending), with an empty chunk first.
    fn cut(body: &[u8], cuts: &[usize]) -> Chunks {
        let body = Bytes::copy_from_slice(body);
        let mut chunks = vec![Ok(Bytes::new())];
        let mut at = 0;
        for &c in cuts.iter().chain([&body.len()]) {
            chunks.push(Ok(body.slice(at..c)));
            at = c;
        }
        Chunks::new(futures::stream::iter(chunks).boxed())
    }

    /// Every frame `reader` holds (digest and bytes), or the first error.
    async fn frames(reader: &mut Chunks) -> Result<Frames, String> {
        let mut out = Vec::new();
        while let Some((digest, size)) = read_header(reader, out.len())
            .await
            .map_err(|e| e.to_string())?
        {
            let pieces = whole_frame(reader, digest, size)
                .await
                .map_err(|e| e.to_string())?;
            out.push((digest, pieces.0.concat()));
        }
        Ok(out)
    }

    /// Each blob's digest and bytes, as [`frames`] returns them.
    type Frames = Vec<(Digest, Vec<u8>)>;

    /// `blobs` framed into a body; with what [`frames`] should read from it, and where each
    /// frame ends (from 0, the start of the body).
    fn framed(blobs: &[&[u8]]) -> (Vec<u8>, Frames, Vec<usize>) {
        let (mut body, mut want, mut ends) = (Vec::new(), Vec::new(), vec![0]);
        for blob in blobs {
            let digest = Digest::of(blob);
            body.extend(batch_frame_header(&digest, blob.len() as u64).as_bytes());
            body.extend(*blob);
            want.push((digest, blob.to_vec()));
            ends.push(body.len());
        }
        (body, want, ends)
    }

    #[tokio::test]
    async fn frames_are_read_whole_wherever_the_body_is_cut() {
        let (body, want, _) = framed(&[b"", b"a", b"hello, world", &[7u8; 300]]);
        for at in 0..=body.len() {
            let got = frames(&mut cut(&body, &[at])).await;
            assert_eq!(got.as_ref(), Ok(&want), "cut at {at}");
        }
        for step in [1, 2, 3, 50] {
            let cuts: Vec<usize> = (step..body.len()).step_by(step).collect();
            let got = frames(&mut cut(&body, &cuts)).await;
            assert_eq!(got.as_ref(), Ok(&want), "cut every {step} bytes");
        }
    }

    #[tokio::test]
    async fn a_frame_in_one_chunk_is_a_slice_of_it_not_a_copy() {
        let (body, _, _) = framed(&[b"first", &[9u8; 4000]]);
        let chunk = Bytes::from(body);
        let inside = chunk.as_ptr_range();
        let mut reader = Chunks::new(futures::stream::iter([Ok(chunk.clone())]).boxed());
        for frame in 0..2 {
            let (digest, size) = read_header(&mut reader, frame).await.unwrap().unwrap();
            let pieces = whole_frame(&mut reader, digest, size).await.unwrap();
            assert_eq!(pieces.0.len(), 1);
            assert!(
                inside.contains(&pieces.0[0].as_ptr()),
                "frame {frame} was copied"
            );
        }
    }

    #[tokio::test]
    async fn a_body_cut_short_names_what_is_missing() {
        let (body, want, ends) = framed(&[b"one blob", &[3u8; 100]]);
        let headers: Vec<usize> = want
            .iter()
            .map(|(d, b)| batch_frame_header(d, b.len() as u64).len())
            .collect();
        for len in 0..body.len() {
            let got = frames(&mut cut(&body[..len], &[len / 2])).await;
            match ends.iter().position(|&end| end == len) {
                Some(whole) => assert_eq!(got, Ok(want[..whole].to_vec()), "{len} bytes"),
                None => {
                    let frame = ends.iter().filter(|&&end| end < len).count() - 1;
                    let data = ends[frame] + headers[frame];
                    let error = got.expect_err("a body cut inside a frame");
                    let expected = if len < data {
                        "ends with the body, before its newline".to_string()
                    } else {
                        let left = ends[frame + 1] - len;
                        format!("the body ended {left} bytes before the frame did")
                    };
                    assert!(error.contains(&expected), "{len} bytes: {error}");
                }
            }
        }
    }

    #[tokio::test]
    async fn a_body_that_breaks_off_is_an_error_not_an_end() {
        let (body, _, _) = framed(&[&[1u8; 64]]);
        let chunks = [
            Ok(Bytes::copy_from_slice(&body[..90])),
            Err(io::Error::other("connection reset")),
        ];
        let mut reader = Chunks::new(futures::stream::iter(chunks).boxed());
        let error = frames(&mut reader).await.expect_err("a broken body");
        assert!(error.contains("connection reset"), "{error}");
    }
}
