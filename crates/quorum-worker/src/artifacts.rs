//! Collecting a job's outputs: expanding the pipeline's artifact globs inside the build directory,
//! refusing anything that is not a regular file reached without symlinks, and hashing what is
//! left into a [`Manifest`]. Every function blocks; async callers use `spawn_blocking`.

use std::collections::BTreeMap;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Component, Path, PathBuf};

use quorum_core::digest::Hasher;
use quorum_core::manifest::ManifestError;
use quorum_core::{Digest, Manifest, ManifestEntry};

/// Why a job's outputs could not be collected: the build's fault, reported as its failure.
#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    #[error("artifact pattern `{pattern}` is not allowed: {reason}")]
    BadPattern { pattern: String, reason: String },
    #[error("artifact pattern `{0}` matched no files")]
    NoMatch(String),
    #[error("artifact `{0}` is a symlink; only regular files are collected")]
    Symlink(String),
    #[error("artifact `{0}` resolves outside the build directory")]
    Outside(String),
    #[error("artifact `{0}` is not a regular file")]
    NotRegular(String),
    #[error("artifact path {0} is not valid UTF-8")]
    NonUtf8(String),
    #[error("cannot read artifact {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("the outputs do not form a valid manifest: {0}")]
    Manifest(#[from] ManifestError),
}

/// The collected outputs: the manifest, and where each of its paths is on disk.
#[derive(Debug, Clone)]
pub struct Collected {
    pub manifest: Manifest,
    pub files: BTreeMap<String, PathBuf>,
}

/// Expands `patterns` in `build_dir` and hashes every match.
pub fn collect(build_dir: &Path, patterns: &[String]) -> Result<Collected, ArtifactError> {
    let files = expand(build_dir, patterns)?;
    let entries = files
        .iter()
        .map(|(rel, file)| entry(rel, file))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Collected {
        manifest: Manifest::new(entries)?,
        files,
    })
}

/// The regular files matched by `patterns` (relative to `build_dir`), keyed by their relative
/// path, so the order is sorted and a file matched twice counts once. `*` stops at `/`; `**`
/// crosses directories; directories themselves are skipped.
pub fn expand(
    build_dir: &Path,
    patterns: &[String],
) -> Result<BTreeMap<String, PathBuf>, ArtifactError> {
    let io_err = |path: &Path| {
        let path = path.display().to_string();
        move |source| ArtifactError::Io { path, source }
    };
    let root = build_dir.canonicalize().map_err(io_err(build_dir))?;
    let root_str = root
        .to_str()
        .ok_or_else(|| ArtifactError::NonUtf8(root.display().to_string()))?;
    let options = glob::MatchOptions {
        case_sensitive: true,
        require_literal_separator: true,
        require_literal_leading_dot: false,
    };
    let mut files = BTreeMap::new();
    for pattern in patterns {
        check_pattern(pattern)?;
        let full = format!("{}/{pattern}", glob::Pattern::escape(root_str));
        let matches = glob::glob_with(&full, options).map_err(|e| ArtifactError::BadPattern {
            pattern: pattern.clone(),
            reason: e.msg.to_string(),
        })?;
        let mut matched = false;
        for found in matches {
            let found = found.map_err(|e| {
                let path = e.path().display().to_string();
                ArtifactError::Io {
                    path,
                    source: e.into(),
                }
            })?;
            let rel_path = found
                .strip_prefix(&root)
                .expect("glob results start with the escaped root");
            let rel = rel_path
                .to_str()
                .ok_or_else(|| ArtifactError::NonUtf8(rel_path.display().to_string()))?;
            let meta = std::fs::symlink_metadata(&found).map_err(io_err(&found))?;
            if meta.file_type().is_symlink() {
                return Err(ArtifactError::Symlink(rel.to_string()));
            }
            if meta.is_dir() {
                continue;
            }
            if !meta.is_file() {
                return Err(ArtifactError::NotRegular(rel.to_string()));
            }
            // A symlinked directory on the way changes where the path really is.
            let real = found.canonicalize().map_err(io_err(&found))?;
            if !real.starts_with(&root) {
                return Err(ArtifactError::Outside(rel.to_string()));
            }
            if real != root.join(rel_path) {
                return Err(ArtifactError::Symlink(rel.to_string()));
            }
            matched = true;
            files.insert(rel.to_string(), found);
        }
        if !matched {
            return Err(ArtifactError::NoMatch(pattern.clone()));
        }
    }
    Ok(files)
}

fn check_pattern(pattern: &str) -> Result<(), ArtifactError> {
    let bad = |reason: &str| {
        Err(ArtifactError::BadPattern {
            pattern: pattern.to_string(),
            reason: reason.into(),
        })
    };
    if pattern.is_empty() {
        return bad("it is empty");
    }
    let path = Path::new(pattern);
    if path.is_absolute() {
        return bad("it must be relative to the build directory");
    }
    if path.components().any(|c| c == Component::ParentDir) {
        return bad("it must not contain `..`");
    }
    Ok(())
}

/// Hashes one file, streaming. Opened with O_NOFOLLOW and checked again on the open file, so a
/// file swapped for a symlink after [`expand`] is refused too.
fn entry(rel: &str, file: &Path) -> Result<ManifestEntry, ArtifactError> {
    let io_err = |source| ArtifactError::Io {
        path: rel.to_string(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(file)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => ArtifactError::Symlink(rel.to_string()),
            _ => io_err(e),
        })?;
    let meta = f.metadata().map_err(io_err)?;
    if !meta.is_file() {
        return Err(ArtifactError::NotRegular(rel.to_string()));
    }
    let (digest, size) = hash_reader(&mut f).map_err(io_err)?;
    Ok(ManifestEntry {
        path: rel.to_string(),
        mode: meta.permissions().mode() & 0o777,
        size,
        digest,
    })
}

/// The SHA-256 and length of everything `r` yields.
pub fn hash_reader(r: &mut impl std::io::Read) -> std::io::Result<(Digest, u64)> {
    let mut hasher = Hasher::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut size = 0u64;
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    Ok((hasher.finish(), size))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_must_stay_inside() {
        assert!(check_pattern("out/*.tar").is_ok());
        assert!(matches!(
            check_pattern("/etc/passwd"),
            Err(ArtifactError::BadPattern { .. })
        ));
        assert!(matches!(
            check_pattern("out/../../x"),
            Err(ArtifactError::BadPattern { .. })
        ));
        assert!(matches!(
            check_pattern(""),
            Err(ArtifactError::BadPattern { .. })
        ));
    }

    #[test]
    fn hash_matches_one_shot_digest() {
        let data = vec![7u8; 600 * 1024];
        let (d, n) = hash_reader(&mut data.as_slice()).unwrap();
        assert_eq!((d, n), (Digest::of(&data), data.len() as u64));
    }
}
