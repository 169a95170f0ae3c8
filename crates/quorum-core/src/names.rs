//! Validation of the names and relative paths that cross trust boundaries: job names,
//! artifact paths in manifests. A path that passes here cannot escape the directory it is
//! joined to.

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PathError {
    #[error("path is empty")]
    Empty,
    #[error("path `{0}` is absolute; artifact paths are relative to the build directory")]
    Absolute(String),
    #[error("path `{0}` has a `..`, `.` or empty segment")]
    NotNormal(String),
    #[error("path `{0}` contains a backslash, a NUL or a control character")]
    BadCharacter(String),
    #[error("path `{0}` is longer than 1024 bytes")]
    TooLong(String),
}

/// Checks that `path` is relative, normalized (`a/b`, never `a//b`, `./a`, `a/../b`) and free of
/// characters that mean something else on another system.
pub fn check_relative_path(path: &str) -> Result<(), PathError> {
    if path.is_empty() {
        return Err(PathError::Empty);
    }
    if path.len() > 1024 {
        return Err(PathError::TooLong(path.chars().take(64).collect()));
    }
    if path.starts_with('/') {
        return Err(PathError::Absolute(path.to_string()));
    }
    if path.chars().any(|c| c == '\\' || c.is_control()) {
        return Err(PathError::BadCharacter(path.escape_debug().to_string()));
    }
    if path
        .split('/')
        .any(|seg| seg.is_empty() || seg == "." || seg == "..")
    {
        return Err(PathError::NotNormal(path.to_string()));
    }
    Ok(())
}

/// Job names appear in URLs, file names and artifact paths: keep them plain.
pub fn check_job_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && !name.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "job name `{name}` must be 1-64 characters of letters, digits, `-`, `_`, `.`, not starting with `.`"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_relative_paths() {
        for p in ["a", "out/hello", "dist/x-1.0.tar.gz", "a/b/c.d"] {
            assert_eq!(check_relative_path(p), Ok(()), "{p}");
        }
    }

    #[test]
    fn refuses_every_escape() {
        for p in [
            "",
            "/etc/passwd",
            "../x",
            "a/../../x",
            "a/./b",
            "a//b",
            "a/",
            "./a",
            "a\\..\\b",
            "a\0b",
            "..",
            ".",
        ] {
            assert!(check_relative_path(p).is_err(), "{p:?} must be refused");
        }
    }

    #[test]
    fn job_names() {
        assert!(check_job_name("build-x86_64.1").is_ok());
        for n in ["", ".hidden", "a/b", "a b", &"x".repeat(65)] {
            assert!(check_job_name(n).is_err(), "{n:?}");
        }
    }
}
