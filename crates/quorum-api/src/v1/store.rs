//! Artifact store endpoints. Writes need an upload token (`typ` `quorum-upload+jwt`) whose
//! audience is the store; reads need a read token for the build.

use quorum_core::{Digest, Manifest};
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

/// `PUT /api/v1/manifest`, upload token: records the assignment's manifest. Every blob it names
/// must already be stored for the token's tenant.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ManifestStored {
    pub digest: Digest,
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
