//! Build output manifests: the list of (path, mode, size, digest) a worker produced for one job.
//! Two workers agree exactly when their manifests have the same digest, so the byte form that
//! is hashed is defined here once: compact JSON of the entries sorted by path.

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::names::{PathError, check_relative_path};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestEntry {
    pub path: String,
    /// Permission bits only (`0o755` or `0o644` in practice); file type bits are never recorded.
    pub mode: u32,
    pub size: u64,
    pub digest: Digest,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub entries: Vec<ManifestEntry>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ManifestError {
    #[error("manifest entry {index}: {source}")]
    Path { index: usize, source: PathError },
    #[error("manifest entry {index}: mode {mode:o} has bits other than permissions")]
    Mode { index: usize, mode: u32 },
    #[error("manifest lists `{0}` twice")]
    Duplicate(String),
    #[error("manifest entries are not sorted by path at `{0}`")]
    Unsorted(String),
    #[error("manifest has {0} entries; at most 100000 are allowed")]
    TooMany(usize),
}

impl Manifest {
    /// Builds a manifest from entries in any order, sorting them into canonical order.
    pub fn new(mut entries: Vec<ManifestEntry>) -> Result<Manifest, ManifestError> {
        entries.sort_by(|a, b| a.path.cmp(&b.path));
        let m = Manifest { entries };
        m.validate()?;
        Ok(m)
    }

    /// Checks what a manifest from an untrusted party must satisfy: safe paths, permission-only
    /// modes, no duplicates, canonical order.
    pub fn validate(&self) -> Result<(), ManifestError> {
        if self.entries.len() > 100_000 {
            return Err(ManifestError::TooMany(self.entries.len()));
        }
        for (index, e) in self.entries.iter().enumerate() {
            check_relative_path(&e.path).map_err(|source| ManifestError::Path { index, source })?;
            if e.mode & !0o777 != 0 {
                return Err(ManifestError::Mode {
                    index,
                    mode: e.mode,
                });
            }
            if index > 0 {
                let prev = &self.entries[index - 1].path;
                match prev.cmp(&e.path) {
                    std::cmp::Ordering::Less => {}
                    std::cmp::Ordering::Equal => {
                        return Err(ManifestError::Duplicate(e.path.clone()));
                    }
                    std::cmp::Ordering::Greater => {
                        return Err(ManifestError::Unsorted(e.path.clone()));
                    }
                }
            }
        }
        Ok(())
    }

    /// The bytes whose SHA-256 is the manifest digest.
    pub fn canonical_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a manifest always serializes")
    }

    pub fn digest(&self) -> Digest {
        Digest::of(&self.canonical_bytes())
    }

    pub fn total_size(&self) -> u64 {
        self.entries.iter().map(|e| e.size).sum()
    }

    /// Paths whose entries differ between two manifests (present in one only, or with another
    /// digest or mode), sorted. This is the built-in file-level diff shown for disputes.
    pub fn differing_paths(&self, other: &Manifest) -> Vec<String> {
        use std::collections::BTreeMap;
        let a: BTreeMap<_, _> = self.entries.iter().map(|e| (&e.path, e)).collect();
        let b: BTreeMap<_, _> = other.entries.iter().map(|e| (&e.path, e)).collect();
        let mut out: Vec<String> = a
            .iter()
            .filter(|(p, e)| b.get(*p) != Some(*e))
            .map(|(p, _)| (*p).clone())
            .collect();
        out.extend(
            b.keys()
                .filter(|p| !a.contains_key(*p))
                .map(|p| (*p).clone()),
        );
        out.sort();
        out
    }
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

    #[test]
    fn digest_is_independent_of_input_order() {
        let a = Manifest::new(vec![entry("b", b"2"), entry("a", b"1")]).unwrap();
        let b = Manifest::new(vec![entry("a", b"1"), entry("b", b"2")]).unwrap();
        assert_eq!(a.digest(), b.digest());
        let c = Manifest::new(vec![entry("a", b"1"), entry("b", b"3")]).unwrap();
        assert_ne!(a.digest(), c.digest());
        assert_eq!(a.differing_paths(&c), vec!["b".to_string()]);
    }

    #[test]
    fn refuses_untrusted_shapes() {
        assert!(matches!(
            Manifest::new(vec![entry("../x", b"")]),
            Err(ManifestError::Path { .. })
        ));
        assert!(matches!(
            Manifest::new(vec![entry("a", b""), entry("a", b"")]),
            Err(ManifestError::Duplicate(_))
        ));
        let unsorted = Manifest {
            entries: vec![entry("b", b""), entry("a", b"")],
        };
        assert!(matches!(
            unsorted.validate(),
            Err(ManifestError::Unsorted(_))
        ));
        let mut setuid = entry("a", b"");
        setuid.mode = 0o4755;
        assert!(matches!(
            Manifest::new(vec![setuid]),
            Err(ManifestError::Mode { .. })
        ));
    }

    #[test]
    fn differing_paths_covers_one_sided_entries() {
        let a = Manifest::new(vec![entry("x", b"1"), entry("only-a", b"")]).unwrap();
        let b = Manifest::new(vec![entry("x", b"1"), entry("only-b", b"")]).unwrap();
        assert_eq!(
            a.differing_paths(&b),
            vec!["only-a".to_string(), "only-b".to_string()]
        );
    }
}
