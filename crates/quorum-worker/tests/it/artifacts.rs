//! Artifact collection: glob expansion, refusing symlinks and paths that leave the build
//! directory, entry contents, and a manifest digest that does not depend on where the build ran.

use std::os::unix::fs::{PermissionsExt as _, symlink};
use std::path::Path;

use quorum_core::Digest;
use quorum_worker::artifacts::{ArtifactError, collect, expand};

fn write(root: &Path, rel: &str, contents: &[u8], mode: u32) {
    let path = root.join(rel);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, contents).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn tree(root: &Path) {
    write(root, "out/a.bin", b"alpha", 0o755);
    write(root, "out/sub/b.bin", b"beta", 0o644);
    write(root, "out/c.txt", b"gamma\n", 0o644);
    write(root, "top.txt", b"", 0o600);
    write(root, "src/main.c", b"int main;", 0o644);
}

fn patterns(p: &[&str]) -> Vec<String> {
    p.iter().map(|s| s.to_string()).collect()
}

#[test]
fn globs_expand_sorted_and_deduplicated() {
    let dir = tempfile::tempdir().unwrap();
    tree(dir.path());
    let found = expand(
        dir.path(),
        &patterns(&["out/*.bin", "**/*.txt", "out/c.txt"]),
    )
    .unwrap();
    let keys: Vec<&str> = found.keys().map(String::as_str).collect();
    // `*` stops at `/` (no out/sub/b.bin); `**` crosses directories; out/c.txt counts once.
    assert_eq!(keys, ["out/a.bin", "out/c.txt", "top.txt"]);
    assert_eq!(
        found["out/a.bin"],
        dir.path().canonicalize().unwrap().join("out/a.bin")
    );

    let all = expand(dir.path(), &patterns(&["out/**/*"])).unwrap();
    let keys: Vec<&str> = all.keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        ["out/a.bin", "out/c.txt", "out/sub/b.bin"],
        "directories are skipped"
    );
}

#[test]
fn a_pattern_without_files_fails() {
    let dir = tempfile::tempdir().unwrap();
    tree(dir.path());
    let err = expand(dir.path(), &patterns(&["out/*.bin", "dist/*"])).unwrap_err();
    assert!(
        matches!(&err, ArtifactError::NoMatch(p) if p == "dist/*"),
        "{err}"
    );
    let err = expand(dir.path(), &patterns(&["out/sub"])).unwrap_err();
    assert!(
        matches!(err, ArtifactError::NoMatch(_)),
        "a directory alone is not a file"
    );
}

#[test]
fn symlinks_are_refused() {
    let outside = tempfile::tempdir().unwrap();
    write(outside.path(), "secret", b"key", 0o600);
    let dir = tempfile::tempdir().unwrap();
    tree(dir.path());
    symlink(outside.path().join("secret"), dir.path().join("out/evil")).unwrap();
    let err = expand(dir.path(), &patterns(&["out/*"])).unwrap_err();
    assert!(
        matches!(&err, ArtifactError::Symlink(p) if p == "out/evil"),
        "{err}"
    );

    // Even a symlink to a file inside the tree: its target would be uploaded under another name.
    let dir = tempfile::tempdir().unwrap();
    tree(dir.path());
    symlink("a.bin", dir.path().join("out/alias")).unwrap();
    assert!(matches!(
        collect(dir.path(), &patterns(&["out/alias"])),
        Err(ArtifactError::Symlink(_))
    ));
}

#[test]
fn a_symlinked_directory_leading_outside_is_refused() {
    let outside = tempfile::tempdir().unwrap();
    write(outside.path(), "secret", b"key", 0o600);
    let dir = tempfile::tempdir().unwrap();
    tree(dir.path());
    symlink(outside.path(), dir.path().join("out/link")).unwrap();
    let err = expand(dir.path(), &patterns(&["out/link/*"])).unwrap_err();
    assert!(
        matches!(&err, ArtifactError::Outside(p) if p == "out/link/secret"),
        "{err}"
    );
}

#[test]
fn patterns_cannot_name_paths_outside() {
    let dir = tempfile::tempdir().unwrap();
    tree(dir.path());
    for bad in ["../*", "/etc/passwd", "out/../../x"] {
        assert!(
            matches!(
                expand(dir.path(), &patterns(&[bad])),
                Err(ArtifactError::BadPattern { .. })
            ),
            "{bad}"
        );
    }
}

#[test]
fn entries_have_mode_size_and_digest() {
    let dir = tempfile::tempdir().unwrap();
    tree(dir.path());
    let collected = collect(dir.path(), &patterns(&["out/**/*", "top.txt"])).unwrap();
    let entries: Vec<(&str, u32, u64, Digest)> = collected
        .manifest
        .entries
        .iter()
        .map(|e| (e.path.as_str(), e.mode, e.size, e.digest))
        .collect();
    assert_eq!(
        entries,
        [
            ("out/a.bin", 0o755, 5, Digest::of(b"alpha")),
            ("out/c.txt", 0o644, 6, Digest::of(b"gamma\n")),
            ("out/sub/b.bin", 0o644, 4, Digest::of(b"beta")),
            ("top.txt", 0o600, 0, Digest::empty()),
        ]
    );
    assert_eq!(collected.files.len(), 4);
}

#[test]
fn the_manifest_digest_does_not_depend_on_the_directory() {
    let one = tempfile::tempdir().unwrap();
    let two = tempfile::tempdir().unwrap();
    tree(one.path());
    // Later mtimes in the second tree: they are not part of the manifest.
    std::thread::sleep(std::time::Duration::from_millis(20));
    tree(two.path());
    let p = patterns(&["out/**/*", "*.txt"]);
    let a = collect(one.path(), &p).unwrap().manifest;
    let b = collect(two.path(), &p).unwrap().manifest;
    assert_ne!(one.path(), two.path());
    assert_eq!(a.digest(), b.digest());

    // One changed permission bit is a different result.
    std::fs::set_permissions(
        two.path().join("out/c.txt"),
        std::fs::Permissions::from_mode(0o664),
    )
    .unwrap();
    let c = collect(two.path(), &p).unwrap().manifest;
    assert_ne!(a.digest(), c.digest());
    assert_eq!(a.differing_paths(&c), ["out/c.txt"]);
}
