//! Conformance 4, the path tricks: symlinks planted in the source (as a repository can carry
//! them), hard links to files outside, and `/proc/<pid>/root`, for reading and for writing.

use std::path::PathBuf;

use quorum_worker::executor::Limits;

use super::{SHORT, assert_succeeded, run, sandbox, spec};

#[tokio::test]
async fn symlink_hardlink_and_proc_root_escapes_fail() {
    let state = tempfile::tempdir().unwrap();
    let Some(sb) = sandbox(state.path(), Limits::default()) else {
        return;
    };
    // A host secret and a host directory beside the job, both readable and writable by the
    // worker's user.
    let host = tempfile::tempdir().unwrap();
    let secret = "quorum-escape-secret-91c2";
    let secret_file = host.path().join("secret");
    std::fs::write(&secret_file, secret).unwrap();
    let host_dir = host.path().join("open");
    std::fs::create_dir(&host_dir).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let job = spec(dir.path(), &[], SHORT);
    // What a malicious repository can contain: absolute and relative links out of the tree.
    let link = |target: &std::path::Path, name: &str| {
        std::os::unix::fs::symlink(target, job.build_dir.join(name)).unwrap()
    };
    link(&secret_file, "abs-secret");
    link(&host_dir, "abs-dir");
    link(
        &PathBuf::from("../../..").join(secret_file.strip_prefix("/").unwrap()),
        "rel-secret",
    );
    let (s, d) = (secret_file.display(), host_dir.display());
    let script = format!(
        "cat abs-secret rel-secret /proc/1/root{s} /proc/self/root{s} 2>/dev/null || true; \
         for p in abs-dir/w /proc/1/root{d}/w /proc/self/root{d}/w /proc/self/cwd/../w; do \
           if touch \"$p\" 2>/dev/null; then echo WROTE \"$p\"; fi; done; \
         for f in /etc/passwd /usr/bin/env /proc/self/root/etc/group; do \
           if ln \"$f\" /build/hard-$(basename \"$f\") 2>/dev/null; then echo LINKED \"$f\"; fi; done; \
         echo END"
    );
    let ran = run(&sb, dir.path(), &[&script], SHORT).await;
    assert_succeeded(&ran);
    assert!(ran.log.contains("END"), "{}", ran.log);
    assert!(!ran.log.contains(secret), "{}", ran.log);
    for word in ["WROTE", "LINKED"] {
        assert!(!ran.log.lines().any(|l| l.starts_with(word)), "{}", ran.log);
    }
    assert_eq!(std::fs::read_dir(&host_dir).unwrap().count(), 0);
    assert!(!dir.path().join("w").exists());

    // The control: the same links do reach the secret from a plain process on the host.
    let control = run(
        &quorum_worker::executor::ProcessExecutor,
        dir.path(),
        &["cat abs-secret; touch abs-dir/w"],
        SHORT,
    )
    .await;
    assert_succeeded(&control);
    assert!(control.log.contains(secret), "{}", control.log);
}
