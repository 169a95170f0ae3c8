//! Manifests sent relative to an earlier manifest of the same tenant (`POST /api/v1/manifest`
//! with a `base`): the base's entries, with some added or replaced and some removed. The result
//! is checked like any manifest afterwards; this only refuses changes that do not describe one
//! edit of the base, naming the path.

use std::collections::{BTreeMap, HashSet};

use quorum_core::{Digest, Manifest, ManifestEntry};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DeltaError {
    #[error("invalid changes: {0}")]
    Entries(quorum_core::manifest::ManifestError),
    #[error("`removed` lists `{0}` twice or out of order; list each path once, sorted")]
    RemovedOrder(String),
    #[error("`removed` lists `{0}`, which the base manifest does not have")]
    NotInBase(String),
    #[error("`{0}` is both changed and removed")]
    ChangedAndRemoved(String),
}

/// `base` with `removed` taken out and `changed` added or put in place of the base's entry at
/// the same path. `changed` must be a valid manifest by itself (safe paths, sorted, each once),
/// and `removed` sorted paths of the base, none of them also changed.
pub fn apply(
    base: &Manifest,
    changed: &[ManifestEntry],
    removed: &[String],
) -> Result<Manifest, DeltaError> {
    let changes = Manifest {
        entries: changed.to_vec(),
    };
    changes.validate().map_err(DeltaError::Entries)?;
    if let Some(w) = removed.windows(2).find(|w| w[0] >= w[1]) {
        return Err(DeltaError::RemovedOrder(w[1].clone()));
    }
    let mut entries: BTreeMap<&str, &ManifestEntry> =
        base.entries.iter().map(|e| (e.path.as_str(), e)).collect();
    for path in removed {
        if entries.remove(path.as_str()).is_none() {
            return Err(DeltaError::NotInBase(path.clone()));
        }
    }
    for e in changed {
        if removed.binary_search(&e.path).is_ok() {
            return Err(DeltaError::ChangedAndRemoved(e.path.clone()));
        }
        entries.insert(e.path.as_str(), e);
    }
    Ok(Manifest {
        entries: entries.into_values().cloned().collect(),
    })
}

/// The digests `base` names that `manifest` no longer does.
pub fn dropped(base: &Manifest, manifest: &Manifest) -> Vec<Digest> {
    let kept: HashSet<Digest> = manifest.entries.iter().map(|e| e.digest).collect();
    let mut gone: Vec<Digest> = base
        .entries
        .iter()
        .map(|e| e.digest)
        .filter(|d| !kept.contains(d))
        .collect();
    gone.sort();
    gone.dedup();
    gone
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(path: &str, content: &[u8]) -> ManifestEntry {
        ManifestEntry {
            path: path.into(),
            mode: 0o644,
            size: content.len() as u64,
            digest: Digest::of(content),
        }
    }

    fn base() -> Manifest {
        Manifest::new(vec![entry("a", b"a"), entry("b/c", b"c"), entry("d", b"d")]).unwrap()
    }

    #[test]
    fn changes_add_replace_and_remove_entries() {
        let got = apply(
            &base(),
            &[entry("a", b"A"), entry("b/e", b"e")],
            &["d".to_string()],
        )
        .unwrap();
        let want = Manifest::new(vec![
            entry("a", b"A"),
            entry("b/c", b"c"),
            entry("b/e", b"e"),
        ])
        .unwrap();
        assert_eq!(got, want);
        let mut gone = [Digest::of(b"a"), Digest::of(b"d")];
        gone.sort();
        assert_eq!(dropped(&base(), &got), gone);
        assert_eq!(apply(&base(), &[], &[]).unwrap(), base());
    }

    #[test]
    fn changes_that_are_not_one_edit_of_the_base_are_refused_naming_the_path() {
        let b = base();
        assert_eq!(
            apply(&b, &[], &["x".to_string()]),
            Err(DeltaError::NotInBase("x".into()))
        );
        assert_eq!(
            apply(&b, &[], &["d".to_string(), "a".to_string()]),
            Err(DeltaError::RemovedOrder("a".into()))
        );
        assert_eq!(
            apply(&b, &[entry("a", b"A")], &["a".to_string()]),
            Err(DeltaError::ChangedAndRemoved("a".into()))
        );
        for bad in ["../x", "/etc/passwd", "a/./b", "a//b"] {
            let err = apply(&b, &[entry(bad, b"x")], &[]).unwrap_err();
            assert!(matches!(err, DeltaError::Entries(_)), "{bad}: {err}");
            assert!(err.to_string().contains(bad), "{bad}: {err}");
        }
        let err = apply(&b, &[entry("z", b"1"), entry("y", b"2")], &[]).unwrap_err();
        assert!(err.to_string().contains("not sorted"), "{err}");
    }
}
