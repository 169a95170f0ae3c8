//! Conformance 14: two builds running at once cannot see or signal each other, and share no
//! /tmp. Build A waits with a trap on the signals it could be sent; build B, started while A
//! runs, is told A's pid as the host sees it and as A's own namespace numbers it, and tries to
//! signal, kill, trace and look at it, and to read A's /tmp.

use std::time::{Duration, Instant};

use quorum_worker::executor::{Limits, ProcessExecutor};
use tokio_util::sync::CancellationToken;

use super::{SHORT, assert_succeeded, run_spec, sandbox, spec};

/// Marks build A's waiting shell, so the test can find it on the host.
const TARGET: &str = "quorum-conformance-14-target";

/// `attack [--probe] PID...`: for each pid, `R <what> <pid> <return> <errno>` per attempt;
/// with `--probe` only the harmless `kill(pid, 0)`.
const ATTACK_C: &str = r#"
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ptrace.h>
#include <unistd.h>

static void report(const char *what, long pid, long r, int err) {
    printf("R %s %ld %ld %d\n", what, pid, r, r == -1 ? err : 0);
}

int main(int argc, char **argv) {
    int probe = argc > 1 && strcmp(argv[1], "--probe") == 0;
    for (int i = 1 + probe; i < argc; i++) {
        pid_t pid = atoi(argv[i]);
        long r = kill(pid, 0);
        report("kill0", pid, r, errno);
        if (probe)
            continue;
        r = kill(pid, SIGUSR1);
        report("usr1", pid, r, errno);
        r = kill(pid, SIGKILL);
        report("kill9", pid, r, errno);
        r = ptrace(PTRACE_ATTACH, pid, 0, 0);
        report("ptrace", pid, r, errno);
        char path[64];
        snprintf(path, sizeof path, "/proc/%d/cmdline", (int)pid);
        r = access(path, F_OK);
        report("proc", pid, r, errno);
    }
    return 0;
}
"#;

/// The attacker's results: (what, pid) -> (return value, errno).
fn results(log: &str) -> Vec<(String, i64, i64, i32)> {
    log.lines()
        .filter_map(|l| {
            let mut f = l.strip_prefix("R ")?.split(' ');
            Some((
                f.next()?.to_string(),
                f.next()?.parse().ok()?,
                f.next()?.parse().ok()?,
                f.next()?.parse().ok()?,
            ))
        })
        .collect()
}

fn result(log: &str, what: &str, pid: i64) -> (i64, i32) {
    results(log)
        .into_iter()
        .find(|(w, p, _, _)| w == what && *p == pid)
        .map(|(_, _, r, e)| (r, e))
        .unwrap_or_else(|| panic!("no `{what}` result for pid {pid}: {log}"))
}

/// The host pid of the process whose innermost namespace pid is `ns_pid` and whose command line
/// carries [`TARGET`]: build A's waiting shell.
fn host_pid_of_target(ns_pid: u32) -> Option<u32> {
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            if !String::from_utf8_lossy(&cmdline).contains(TARGET) {
                return None;
            }
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
            let innermost = status
                .lines()
                .find_map(|l| l.strip_prefix("NSpid:"))?
                .split_whitespace()
                .last()?
                .parse::<u32>()
                .ok()?;
            (innermost == ns_pid && innermost != pid).then_some(pid)
        })
}

#[tokio::test]
async fn two_builds_at_once_cannot_see_signal_or_trace_each_other() {
    let state = tempfile::tempdir().unwrap();
    let Some(sb) = sandbox(state.path(), Limits::default()) else {
        return;
    };
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    // A fills its pid namespace's low numbers first, so that its target's number is one build B
    // (a shell, the compiler, the attacker) does not reach in its own namespace: B signalling
    // that number can then only ever mean A.
    let script_a = format!(
        "echo a-secret > /tmp/a-secret; for i in $(seq 40); do true & done; wait; \
         sh -c 'trap \"echo A-GOT-SIGNAL; exit 3\" USR1 TERM; echo $$ > /build/nspid; i=0; \
         while [ ! -e /build/go ] && [ $i -lt 600 ]; do sleep 0.05; i=$((i+1)); done; \
         test -e /build/go; echo A-DONE: {TARGET}'"
    );
    let job_a = spec(a.path(), &[&script_a], SHORT);
    let a_dir = job_a.build_dir.clone();

    let attack = async {
        let nspid_file = a_dir.join("nspid");
        let until = Instant::now() + Duration::from_secs(20);
        let (ns_pid, host_pid) = loop {
            let ns = std::fs::read_to_string(&nspid_file)
                .ok()
                .and_then(|s| s.trim().parse::<u32>().ok());
            if let Some(ns) = ns
                && let Some(host) = host_pid_of_target(ns)
            {
                break (ns, host);
            }
            assert!(Instant::now() < until, "build A's target never showed up");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let job_b = spec(
            b.path(),
            &[
                "cc -o attack attack.c",
                &format!("./attack {host_pid} {ns_pid}"),
                "cat /tmp/a-secret 2>&1 || true; ls -A /tmp | sed 's/^/TMP /'",
            ],
            SHORT,
        );
        std::fs::write(job_b.build_dir.join("attack.c"), ATTACK_C).unwrap();
        let ran_b = run_spec(&sb, &job_b, CancellationToken::new()).await;

        // The control, before A is released: from the host, A's pid is there to signal.
        let control = tempfile::tempdir().unwrap();
        let job_c = spec(
            control.path(),
            &[
                "cc -o attack attack.c",
                &format!("./attack --probe {host_pid}"),
            ],
            SHORT,
        );
        std::fs::write(job_c.build_dir.join("attack.c"), ATTACK_C).unwrap();
        let ran_c = run_spec(&ProcessExecutor, &job_c, CancellationToken::new()).await;

        std::fs::write(a_dir.join("go"), b"").unwrap();
        (ran_b, ran_c, host_pid, ns_pid)
    };
    let (ran_a, (ran_b, ran_c, host_pid, ns_pid)) =
        tokio::join!(run_spec(&sb, &job_a, CancellationToken::new()), attack);
    let (host, ns) = (i64::from(host_pid), i64::from(ns_pid));
    assert!(ns > 40, "A's target has namespace pid {ns}");

    // A ran to its end, never signalled.
    assert_succeeded(&ran_a);
    // (By lines: the step's header in the log quotes the script.)
    assert!(
        ran_a.log.lines().any(|l| l.starts_with("A-DONE:")),
        "{}",
        ran_a.log
    );
    assert!(
        !ran_a.log.lines().any(|l| l == "A-GOT-SIGNAL"),
        "{}",
        ran_a.log
    );

    // B tried everything and got nowhere: neither number names a process it can see.
    assert_succeeded(&ran_b);
    let log = &ran_b.log;
    for pid in [host, ns] {
        assert_eq!(result(log, "kill0", pid), (-1, libc::ESRCH), "{log}");
        assert_eq!(result(log, "usr1", pid), (-1, libc::ESRCH), "{log}");
        assert_eq!(result(log, "kill9", pid), (-1, libc::ESRCH), "{log}");
        assert_eq!(result(log, "proc", pid), (-1, libc::ENOENT), "{log}");
        let (r, errno) = result(log, "ptrace", pid);
        assert!(
            r == -1 && [libc::EPERM, libc::ESRCH].contains(&errno),
            "ptrace of {pid}: {log}"
        );
    }
    // Nor A's /tmp.
    assert!(!log.lines().any(|l| l == "a-secret"), "{log}");
    assert!(!log.lines().any(|l| l == "TMP a-secret"), "{log}");

    // The control: the same probe on the host reaches A's shell, so the assertions above could
    // have failed.
    assert_succeeded(&ran_c);
    assert_eq!(result(&ran_c.log, "kill0", host), (0, 0), "{}", ran_c.log);
}
