//! `POST /api/v1/manifest`, upload token: records the assignment's manifest, given in full or
//! relative to an earlier manifest of the tenant, and answers the blobs the tenant lacks instead
//! of refusing, so a publisher can send the manifest first and upload only what it is asked
//! for. Every rule of `PUT /api/v1/manifest` holds for the manifest the changes make: safe
//! paths, the tenant's own blobs of the right sizes, one manifest per assignment.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use axum::Json;
use axum::extract::State;
use axum::extract::rejection::JsonRejection;
use quorum_api::v1::store::{ManifestAnswer, ManifestProposal};
use quorum_core::{Digest, Manifest};
use quorum_service::ApiError;

use crate::Store;
use crate::auth::Upload;
use crate::db::{Recorded, Relative};
use crate::error::Error;

/// The manifest the store recorded last, parsed, with its tenant: a publisher's next proposal
/// is usually relative to it, and reading and parsing a 10,000-entry body again cost more than
/// recording the changes. A manifest is named by its digest, so this cannot go stale; whether
/// the tenant still records it is checked by the transaction, as for a base read from the
/// database.
#[derive(Default)]
pub(crate) struct LastRecorded(Mutex<Option<(String, Digest, Arc<Manifest>)>>);

impl LastRecorded {
    /// `base` as last recorded by `tenant`, if it was the last one.
    fn get(&self, tenant: &str, base: Digest) -> Option<Arc<Manifest>> {
        let last = self.0.lock().ok()?;
        let (t, digest, manifest) = last.as_ref()?;
        (t == tenant && *digest == base).then(|| manifest.clone())
    }

    fn set(&self, tenant: &str, digest: Digest, manifest: Manifest) {
        if let Ok(mut last) = self.0.lock() {
            *last = Some((tenant.to_string(), digest, Arc::new(manifest)));
        }
    }
}

pub async fn post_manifest(
    State(store): State<Arc<Store>>,
    Upload { slot, .. }: Upload,
    body: Result<Json<ManifestProposal>, JsonRejection>,
) -> Result<Json<ManifestAnswer>, Error> {
    let started = std::time::Instant::now();
    let Json(mut proposal) = body.map_err(super::bad_json)?;
    let invalid =
        |e: &dyn std::fmt::Display| ApiError::bad_request(format!("invalid manifest: {e}"));
    let unchanged = proposal.entries.is_empty() && proposal.removed.is_empty();
    // A base is read outside the serialized transaction (it is only parsed here); the
    // transaction checks again that the tenant still records it.
    let (manifest, digest, dropped) = match proposal.base {
        None => {
            // Given in full: nothing else refers to the entries.
            let manifest = Manifest {
                entries: std::mem::take(&mut proposal.entries),
            };
            manifest.validate().map_err(|e| invalid(&e))?;
            let digest = manifest.digest();
            (Some(manifest), digest, Vec::new())
        }
        // The base again: nothing to read, apply or check but that the tenant records it.
        Some(base) if unchanged => (None, base, Vec::new()),
        Some(base_digest) => {
            let base = match store.last_recorded.get(&slot.tenant, base_digest) {
                Some(base) => base,
                None => {
                    let body =
                        crate::db::tenant_manifest_body(&store.db, &slot.tenant, base_digest)
                            .await?
                            .ok_or_else(|| super::unknown_base(base_digest))?;
                    Arc::new(serde_json::from_slice(&body).map_err(|e| {
                        ApiError::internal(format!(
                            "stored manifest {base_digest} does not parse: {e}"
                        ))
                    })?)
                }
            };
            let manifest = crate::delta::apply(&base, &proposal.entries, &proposal.removed)
                .map_err(|e| invalid(&e))?;
            manifest.validate().map_err(|e| invalid(&e))?;
            let dropped = crate::delta::dropped(&base, &manifest);
            let digest = manifest.digest();
            (Some(manifest), digest, dropped)
        }
    };
    tracing::debug!(elapsed = ?started.elapsed(), "manifest made");
    let relative = proposal.base.map(|base| Relative {
        base,
        changed: &proposal.entries,
        dropped: &dropped,
    });
    let recorded =
        crate::db::record_manifest(&store.db, &slot, manifest.as_ref(), digest, relative).await?;
    let answer = match recorded {
        Recorded::New | Recorded::Again => ManifestAnswer::Recorded { digest },
        Recorded::Missing(missing) => {
            let mut seen = HashSet::new();
            let digests: Vec<Digest> = missing
                .into_iter()
                .map(|(_, d)| d)
                .filter(|d| seen.insert(*d))
                .collect();
            tracing::debug!(
                tenant = %slot.tenant, build = %slot.build, missing = digests.len(),
                "manifest names blobs still to upload"
            );
            return Ok(Json(ManifestAnswer::Missing { digests }));
        }
        refused => return Err(super::put_manifest::refusal(&slot, digest, refused).into()),
    };
    tracing::info!(
        tenant = %slot.tenant, build = %slot.build, job = %slot.job, assignment = %slot.assignment, %digest,
        entries = ?manifest.as_ref().map(|m| m.entries.len()), base = ?proposal.base,
        changed = proposal.entries.len(), removed = proposal.removed.len(),
        elapsed = ?started.elapsed(), "manifest recorded"
    );
    if let Some(manifest) = manifest {
        store.last_recorded.set(&slot.tenant, digest, manifest);
    }
    Ok(Json(answer))
}
