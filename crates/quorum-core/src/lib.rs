//! Quorum's domain core: the pipeline model, digests and manifests, the quorum policy and its
//! verdicts, and the attestation formats. Everything here is pure: no IO, no clocks, no tokio.

pub mod attest;
pub mod digest;
pub mod manifest;
pub mod names;
pub mod pipeline;
pub mod redact;
pub mod verdict;

pub use digest::Digest;
pub use manifest::{Manifest, ManifestEntry};
