//! Artifact store endpoints. Writes need an upload token (`typ` `quorum-upload+jwt`) whose
//! audience is the store; reads need a read token for the build.

use quorum_core::{Digest, Manifest, ManifestEntry};
use serde::{Deserialize, Serialize};

/// `POST /api/v1/missing`, upload token: which of these blobs must be uploaded. A blob that
/// exists only for other tenants is reported missing: knowing a digest grants nothing.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MissingRequest {
    pub digests: Vec<Digest>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MissingResponse {
    pub missing: Vec<Digest>,
}

// `PUT /api/v1/blobs/{digest}`, upload token, body = the blob. The store hashes while it
// receives and keeps the blob only if the digest matches.

/// `POST /api/v1/blobs`, upload token: many blobs in one streamed request, kept all or none.
/// The body is a sequence of frames, each a header line [`batch_frame_header`] (`sha256:<hex>
/// <size>\n`) followed by exactly `size` bytes, ended by the end of the body. The store hashes
/// each frame as it arrives and keeps the batch only if every frame matches its digest, the body
/// ends on a frame boundary, and the token's `max_files` (one per frame) and `max_bytes` and the
/// tenant's quota take the whole batch; otherwise it keeps nothing of it. The call counts once
/// against `max_calls`. At most [`MAX_BATCH_BLOBS`] frames and [`MAX_BATCH_BYTES`] bytes of
/// content per batch; larger blobs go one per `PUT /api/v1/blobs/{digest}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BlobsStored {
    pub blobs: u64,
    pub bytes: u64,
}

/// Most frames in one batch.
pub const MAX_BATCH_BLOBS: usize = 1000;
/// Most content bytes (the frames' sizes summed) in one batch.
pub const MAX_BATCH_BYTES: u64 = 64 << 20;
/// Longest frame header line, newline included.
pub const MAX_FRAME_HEADER: usize = 128;
/// Frames up to this size are held whole in the store's memory as they arrive, written into the
/// batch's pack with the others (one file and one sync per batch); larger ones stream into a
/// file of their own. Clients send files up to this size in batches, and larger ones one per
/// `PUT /api/v1/blobs/{digest}`.
pub const WHOLE_FRAME: u64 = 4 << 20;

/// The header line of one frame of a batch.
pub fn batch_frame_header(digest: &Digest, size: u64) -> String {
    format!("{digest} {size}\n")
}

/// `PUT /api/v1/manifest`, upload token: records the assignment's manifest. Every blob it names
/// must already be stored for the token's tenant.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ManifestStored {
    pub digest: Digest,
}

/// `POST /api/v1/manifest`, upload token: records the assignment's manifest like `PUT`, but sent
/// either in full or relative to an earlier manifest of the same tenant, and answering the blobs
/// the tenant lacks instead of refusing. So a publisher can send its manifest first: an
/// unchanged tree is one small request, and a changed one is the changes, the blobs the store
/// asks for, and the changes again.
///
/// With `base` (the digest of a manifest this tenant has recorded, in any of its builds), the
/// manifest is the base's entries with `entries` added or replacing the base's entry at the same
/// path, and the `removed` paths taken out; without, it is `entries`. Both lists are sorted by
/// path and name each path once. A base this tenant has not recorded is answered 404 alike
/// whether it is unknown or another tenant's; the publisher then sends the manifest in full.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields)]
pub struct ManifestProposal {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<Digest>,
    pub entries: Vec<ManifestEntry>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub removed: Vec<String>,
}

/// The answer to a [`ManifestProposal`]: recorded (or recorded before by the same assignment),
/// or nothing recorded because the tenant lacks these blobs (each once, in no particular order).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ManifestAnswer {
    Recorded { digest: Digest },
    Missing { digests: Vec<Digest> },
}

/// `GET /api/v1/builds/{build}/manifests/{digest}`, read token: a manifest of the build.
pub type ManifestResponse = Manifest;

// `GET /api/v1/builds/{build}/blobs/{digest}`, read token: a blob that a manifest of the build
// references.

/// `POST /api/v1/revoke`, revoke token (`typ` `quorum-revoke+jwt`, audience the store, scope
/// one build): revokes the listed token ids. The store revokes only ids it has seen used for the
/// same tenant and build; a revoked token is refused from then on, even before its `exp`.
/// Revoking twice is harmless.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RevokeRequest {
    pub jtis: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RevokeResponse {
    /// The ids now revoked (including ones revoked before).
    pub revoked: Vec<String>,
    /// The ids that belong to another tenant, build or issuer here; nothing was done to them.
    pub unknown: Vec<String>,
}

// `GET /api/v1/builds/{build}/files/{job}/{path}`, read token: a file of the build by the name
// it has as a subject of the signed statement; single-range requests answered with 206 and
// `Content-Range`, 416 when the range lies outside the file. The same under
// `/api/v1/public/{tenant}/builds/{build}/...` without a token once the build is public (also
// for `blobs/{digest}` and `statement`).

/// `PUT /api/v1/builds/{build}/statement`, revoke token of the build's controller (the one
/// build-scoped token a controller holds and a worker never does), body = the DSSE envelope of
/// the build's signed statement. Every subject must name a blob of the build. `public = true`
/// makes the build's files, blobs and statement readable without a token.
/// `GET /api/v1/builds/{build}/statement`, read token: the envelope as it was recorded.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct StatementQuery {
    #[serde(default)]
    pub public: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct StatementStored {
    pub subjects: usize,
    pub public: bool,
}

/// `GET /api/v1/usage`, revoke token of the tenant's controller: what the tenant stores here and
/// has transferred.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TenantUsage {
    pub tenant: String,
    /// Bytes of the blobs the tenant has uploaded and still keeps here (shared blobs count for
    /// every tenant that uploaded them).
    pub stored_bytes: u64,
    /// Blob bytes of the tenant's uploads that the store kept (refused uploads are not counted;
    /// sending a blob again counts again).
    pub bytes_in: u64,
    /// Blob bytes served from the tenant's builds (ranges count what they asked for).
    pub bytes_out: u64,
}
