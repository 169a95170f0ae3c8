//! The Landlock layer. Each rule is shown biting where nothing else would stop the attempt: the
//! helper runs directly on the host (no namespaces, no seccomp), next to the same attempt
//! without it as the control; and inside the sandbox, a write the mount layout allows fails.

use std::path::Path;
use std::process::Command;

use quorum_worker::executor::{LandlockTier, Limits};

use super::{Calls, INIT, SHORT, assert_succeeded, run, sandbox};

/// Whether this kernel enforces every rule; prints why not when it does not.
fn full_landlock() -> bool {
    let state = tempfile::tempdir().unwrap();
    match sandbox(state.path(), Limits::default()).map(|s| s.landlock()) {
        Some(LandlockTier::Full { .. }) => true,
        Some(tier) => {
            println!("SKIPPED: this kernel gives {tier}");
            false
        }
        None => false,
    }
}

/// Runs `sh -c script` on the host, under the helper with `--write writable` or plainly, and
/// returns its standard output.
#[allow(clippy::disallowed_methods)] // tests start their own processes
fn host_sh(landlocked: bool, writable: &Path, script: &str) -> String {
    let mut cmd = if landlocked {
        let mut c = Command::new(INIT);
        c.arg("--write").arg(writable).arg("--");
        c.arg("/bin/sh");
        c
    } else {
        Command::new("/bin/sh")
    };
    let out = cmd.args(["-c", script]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Compiles probe.c into `dir` on the host.
#[allow(clippy::disallowed_methods)] // tests start their own processes
fn host_probe(dir: &Path) -> std::path::PathBuf {
    let source = dir.join("probe.c");
    std::fs::write(&source, include_str!("probe.c")).unwrap();
    let binary = dir.join("probe");
    let cc = Command::new("cc")
        .args(["-Wall", "-o"])
        .arg(&binary)
        .arg(&source)
        .arg("-lpthread")
        .output()
        .unwrap();
    assert!(
        cc.status.success(),
        "{}",
        String::from_utf8_lossy(&cc.stderr)
    );
    binary
}

/// Runs the probe with `calls` on the host, landlocked or not.
fn host_calls(landlocked: bool, probe: &Path, calls: &[String]) -> Calls {
    let script = format!("{} {}", probe.display(), calls.join(" "));
    host_sh(landlocked, probe.parent().unwrap(), &script)
        .lines()
        .filter_map(|l| {
            let mut f = l.strip_prefix("R ")?.split(' ');
            let name = f.next()?.to_string();
            Some((name, (f.next()?.parse().ok()?, f.next()?.parse().ok()?)))
        })
        .collect()
}

#[test]
fn the_tier_names_landlock_when_the_kernel_enforces_it() {
    let state = tempfile::tempdir().unwrap();
    let Some(sb) = sandbox(state.path(), Limits::default()) else {
        return;
    };
    use quorum_worker::executor::Executor as _;
    match sb.landlock() {
        LandlockTier::Full { abi } => {
            assert!(abi >= 6, "ABI {abi} has no scoping, so it cannot be full");
            assert!(
                sb.description().contains(&format!("landlock ABI {abi}")),
                "{}",
                sb.description()
            );
        }
        tier => println!("SKIPPED: this kernel gives {tier}"),
    }
}

#[test]
fn writes_links_and_renames_stay_beneath_the_write_directories() {
    if !full_landlock() {
        return;
    }
    let (allowed, other) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a, o) = (allowed.path().display(), other.path().display());
    let attempts = [
        format!("touch {o}/created"),
        format!("echo x >> {o}/existing"),
        format!("ln -s /etc/passwd {o}/symlink"),
        format!("mkdir {o}/dir"),
        // A hard link from outside into the writable directory would make the outside file
        // writable through it; so would a rename out of it.
        format!("ln {o}/existing {a}/hardlink-in"),
        format!("mv {a}/mine {o}/renamed-out"),
        format!("rm {o}/existing"),
    ];
    let script: String = attempts
        .iter()
        .enumerate()
        .map(|(i, cmd)| format!("if {cmd} 2>/dev/null; then echo DONE-{i}; fi; "))
        .collect::<String>()
        + &format!("touch {a}/inside && echo INSIDE");
    let setup = || {
        std::fs::write(other.path().join("existing"), "host\n").unwrap();
        std::fs::write(allowed.path().join("mine"), "mine\n").unwrap();
    };

    setup();
    let confined = host_sh(true, allowed.path(), &script);
    assert!(confined.contains("INSIDE"), "{confined}");
    assert!(!confined.contains("DONE-"), "{confined}");
    assert_eq!(
        std::fs::read_to_string(other.path().join("existing")).unwrap(),
        "host\n"
    );
    assert_eq!(std::fs::read_dir(other.path()).unwrap().count(), 1);

    // The control: without the helper every attempt succeeds.
    let (allowed, other) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let script = script
        .replace(&a.to_string(), &allowed.path().display().to_string())
        .replace(&o.to_string(), &other.path().display().to_string());
    std::fs::write(other.path().join("existing"), "host\n").unwrap();
    std::fs::write(allowed.path().join("mine"), "mine\n").unwrap();
    let free = host_sh(false, allowed.path(), &script);
    for i in 0..attempts.len() {
        assert!(free.contains(&format!("DONE-{i}")), "control {i}: {free}");
    }
}

#[test]
fn tcp_bind_and_connect_are_denied() {
    if !full_landlock() {
        return;
    }
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let probe = host_probe(dir.path());
    let calls = [format!("tcp_connect={port}"), "tcp_bind=0".to_string()];

    let confined = host_calls(true, &probe, &calls);
    assert_eq!(confined["tcp_connect"], (-1, libc::EACCES));
    assert_eq!(confined["tcp_bind"], (-1, libc::EACCES));
    assert!(
        matches!(listener.accept(), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "the listener got a connection from a landlocked process"
    );

    let free = host_calls(false, &probe, &calls);
    assert_eq!(free["tcp_connect"], (0, 0));
    assert_eq!(free["tcp_bind"], (0, 0));
}

#[test]
fn abstract_sockets_and_signals_outside_the_domain_are_out_of_reach() {
    use std::os::linux::net::SocketAddrExt as _;
    use std::os::unix::net::{SocketAddr, UnixListener};
    if !full_landlock() {
        return;
    }
    let name = format!("quorum-landlock-test-{}", std::process::id());
    let _listener =
        UnixListener::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let probe = host_probe(dir.path());
    // The test process itself: outside any Landlock domain, same user.
    let calls = [
        format!("unix_abstract={name}"),
        format!("kill_pid={}", std::process::id()),
    ];

    let confined = host_calls(true, &probe, &calls);
    assert_eq!(confined["unix_abstract"], (-1, libc::EPERM));
    assert_eq!(confined["kill_pid"], (-1, libc::EPERM));

    let free = host_calls(false, &probe, &calls);
    assert_eq!(free["unix_abstract"], (0, 0));
    assert_eq!(free["kill_pid"], (0, 0));
}

#[tokio::test]
async fn in_the_sandbox_a_write_the_mount_layout_allows_is_refused() {
    if !full_landlock() {
        return;
    }
    let state = tempfile::tempdir().unwrap();
    let Some(sb) = sandbox(state.path(), Limits::default()) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // /proc is mounted read-write in the sandbox, and a process may rename itself; only
    // Landlock stands in the way. /build, /tmp and /dev/null stay writable.
    let ran = run(
        &sb,
        dir.path(),
        &[
            "grep ' /proc proc rw' /proc/self/mounts >/dev/null && echo PROC-MOUNTED-RW",
            "if echo renamed > /proc/self/comm; then echo COMM-WRITTEN; else echo COMM-DENIED; fi",
            "echo ok > /build/f && echo ok > /tmp/f && echo ok > /dev/null && echo WRITABLE",
        ],
        SHORT,
    )
    .await;
    assert_succeeded(&ran);
    assert!(ran.log.contains("PROC-MOUNTED-RW"), "{}", ran.log);
    assert!(ran.log.contains("COMM-DENIED"), "{}", ran.log);
    assert!(ran.log.contains("Permission denied"), "{}", ran.log);
    assert!(ran.log.contains("\nWRITABLE\n"), "{}", ran.log);
}
