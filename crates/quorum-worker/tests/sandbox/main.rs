//! Conformance tests of the namespace sandbox: each runs real steps through `run_job` with
//! `SandboxExecutor` and checks what a hostile build could try. Skipped, with a printed note, only
//! when bubblewrap is not installed; tests of limits also need writable cgroups.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use quorum_worker::executor::{
    Executor, JobOutcome, JobSpec, JobStatus, LimitHit, Limits, ProcessExecutor, SandboxError,
    SandboxExecutor, run_job, sandbox_environment,
};
use tokio_util::sync::CancellationToken;

mod escapes;
mod facts;
mod inputs;
mod landlock;
mod limits;
mod spares;
mod two_builds;

const SHORT: Duration = Duration::from_secs(30);

/// The Landlock helper cargo built next to these tests.
const INIT: &str = env!("CARGO_BIN_EXE_quorum-sandbox-init");

/// A sandbox with `limits` and the Landlock helper, or `None` (after saying why) when this host
/// cannot run one.
fn sandbox(state: &Path, limits: Limits) -> Option<SandboxExecutor> {
    match SandboxExecutor::new(state, limits).and_then(|s| s.with_init(Path::new(INIT))) {
        Ok(s) => Some(s),
        Err(SandboxError::BwrapMissing) => {
            skipped("bwrap is not installed (apt-get install bubblewrap)")
        }
        Err(SandboxError::Cgroup(e)) => skipped(&format!("cgroups are not writable here: {e}")),
        Err(e @ SandboxError::DiskLimit(_)) => skipped(&e.to_string()),
        Err(e) => panic!("cannot set up the sandbox: {e}"),
    }
}

/// A developer's machine may lack what the sandbox needs, and the case is skipped there; CI
/// (`.ci/run` installs bubblewrap, runs as root) must run every case, so there it fails.
fn skipped(why: &str) -> Option<SandboxExecutor> {
    assert!(
        std::env::var_os("CI").is_none(),
        "the sandbox cannot run here, and CI must run every sandbox case: {why}"
    );
    println!("SKIPPED: {why}");
    None
}

struct Ran {
    outcome: JobOutcome,
    log: String,
}

/// A job in `dir` (`dir/src` is the build directory, `dir/tmp` its temporary directory).
fn spec(dir: &Path, script: &[&str], timeout: Duration) -> JobSpec {
    let build_dir = dir.join("src");
    std::fs::create_dir_all(&build_dir).unwrap();
    JobSpec {
        build_dir,
        tmp_dir: dir.join("tmp"),
        source_date_epoch: 1_600_000_000,
        script: script.iter().map(|s| s.to_string()).collect(),
        timeout,
        inputs: Vec::new(),
    }
}

/// Runs `job` and collects its whole log; every wait is bounded.
async fn run_spec(executor: &dyn Executor, job: &JobSpec, cancel: CancellationToken) -> Ran {
    let (tx, mut rx) = tokio::sync::mpsc::channel(16);
    let collector = tokio::spawn(async move {
        let mut log = Vec::new();
        while let Some(chunk) = rx.recv().await {
            log.extend(chunk);
        }
        String::from_utf8_lossy(&log).into_owned()
    });
    let outcome = tokio::time::timeout(
        job.timeout + Duration::from_secs(30),
        run_job(executor, job, tx, &cancel),
    )
    .await
    .expect("the job ends soon after its timeout")
    .expect("the executor works");
    let log = tokio::time::timeout(Duration::from_secs(10), collector)
        .await
        .expect("the log ends")
        .unwrap();
    Ran { outcome, log }
}

async fn run(executor: &dyn Executor, dir: &Path, script: &[&str], timeout: Duration) -> Ran {
    let job = spec(dir, script, timeout);
    run_spec(executor, &job, CancellationToken::new()).await
}

fn assert_succeeded(ran: &Ran) {
    assert_eq!(ran.outcome.status, JobStatus::Succeeded, "{}", ran.log);
}

/// Processes working in `dir`: host processes whose working directory is below it, and
/// sandboxed ones, whose working directory reads `/build` from the host, found by the bind
/// mount of `dir` in their mount table.
fn processes_in(dir: &Path) -> Vec<u32> {
    let needle = dir.display().to_string();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let on_host =
            std::fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|cwd| cwd.starts_with(dir));
        let sandboxed = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).is_ok_and(|m| {
            m.lines().any(|l| {
                l.split(' ')
                    .nth(3)
                    .is_some_and(|root| root.starts_with(&needle))
            })
        });
        if on_host || sandboxed {
            found.push(pid);
        }
    }
    found
}

/// Waits up to 10 s for no host process to be working in `dir`.
fn wait_none_in(dir: &Path) -> Vec<u32> {
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let left = processes_in(dir);
        if left.is_empty() || Instant::now() >= until {
            return left;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The "nothing survives" checks below are only worth something if `processes_in` can see a
/// sandboxed step at all: show that it does while one runs.
#[tokio::test]
async fn processes_in_sees_a_running_sandboxed_step() {
    let state = tempfile::tempdir().unwrap();
    let Some(sb) = sandbox(state.path(), Limits::default()) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let watch = async {
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            let seen = processes_in(dir.path());
            if !seen.is_empty() || Instant::now() >= until {
                return seen;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let (ran, seen) = tokio::join!(
        run(&sb, dir.path(), &["sleep 2"], Duration::from_secs(30)),
        watch
    );
    assert_succeeded(&ran);
    assert!(!seen.is_empty(), "the running step was not found");
    assert!(
        wait_none_in(dir.path()).is_empty(),
        "the step's processes outlived it"
    );
}

#[tokio::test]
async fn there_is_no_network() {
    let state = tempfile::tempdir().unwrap();
    let Some(sb) = sandbox(state.path(), Limits::default()) else {
        return;
    };
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let connect = format!(
        "if perl -MIO::Socket::INET -e 'IO::Socket::INET->new(PeerAddr => \"127.0.0.1:{port}\", \
         Timeout => 3) or exit 1'; then echo TCP-CONNECTED; else echo TCP-FAILED; fi"
    );
    let ran = run(
        &sb,
        dir.path(),
        &[
            "echo IFACES $(tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' ')",
            &connect,
            "if perl -e 'gethostbyname(\"example.com\") or exit 1'; then echo DNS-OK; \
             else echo DNS-FAILED; fi",
            "if perl -MIO::Socket::INET -e 'IO::Socket::INET->new(PeerAddr => \"1.1.1.1:53\", \
             Timeout => 3) or exit 1'; then echo OUT-CONNECTED; else echo OUT-FAILED; fi",
        ],
        SHORT,
    )
    .await;
    assert_succeeded(&ran);
    assert!(ran.log.contains("\nIFACES lo\n"), "{}", ran.log);
    assert!(ran.log.contains("TCP-FAILED"), "{}", ran.log);
    assert!(ran.log.contains("DNS-FAILED"), "{}", ran.log);
    assert!(ran.log.contains("OUT-FAILED"), "{}", ran.log);
    assert!(
        matches!(listener.accept(), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "the host's listener got a connection from the sandbox"
    );
}

#[tokio::test]
async fn only_the_sandboxs_processes_are_visible_and_host_pids_cannot_be_signalled() {
    let state = tempfile::tempdir().unwrap();
    let Some(sb) = sandbox(state.path(), Limits::default()) else {
        return;
    };
    let host_pid = std::process::id();
    let dir = tempfile::tempdir().unwrap();
    let ran = run(
        &sb,
        dir.path(),
        &[
            "echo PROCS $(ls /proc | grep -c '^[0-9][0-9]*$')",
            &format!(
                "if kill -0 {host_pid} 2>/dev/null; then echo KILL-OK; else echo KILL-FAILED; fi"
            ),
            "if kill -0 1 2>/dev/null; then echo INIT-IS-OURS; fi",
        ],
        SHORT,
    )
    .await;
    assert_succeeded(&ran);
    let procs: u32 = ran
        .log
        .lines()
        .find_map(|l| l.strip_prefix("PROCS "))
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| panic!("no count in {}", ran.log));
    // bwrap's init, the step's shell and the pipeline (ls, grep): a handful, not the host's.
    assert!(procs <= 6, "{procs} processes visible: {}", ran.log);
    assert!(ran.log.contains("KILL-FAILED"), "{}", ran.log);
    // A pid namespace's init is the sandbox's own bwrap, visible and ours.
    assert!(ran.log.contains("INIT-IS-OURS"), "{}", ran.log);
}

#[tokio::test]
async fn writes_outside_build_and_tmp_fail_and_leave_nothing() {
    let state = tempfile::tempdir().unwrap();
    let Some(sb) = sandbox(state.path(), Limits::default()) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let marker = format!("quorum-escape-{}", std::process::id());
    let targets = [
        format!("/usr/{marker}"),
        format!("/etc/{marker}"),
        format!("/{marker}"),
        format!("/build/../{marker}"),
        format!("/proc/self/root/etc/{marker}"),
        format!("/dev/{marker}"),
    ];
    let script = format!(
        "for p in {}; do if touch \"$p\" 2>/dev/null; then echo WROTE \"$p\"; fi; done; \
         if ln -s /etc/passwd link && echo x >> link 2>/dev/null; then echo WROTE-LINK; fi; \
         touch /build/inside /tmp/inside; echo DONE",
        targets.join(" ")
    );
    let ran = run(&sb, dir.path(), &[&script], SHORT).await;
    assert_succeeded(&ran);
    assert!(ran.log.contains("DONE"), "{}", ran.log);
    assert!(
        !ran.log.lines().any(|l| l.starts_with("WROTE")),
        "{}",
        ran.log
    );
    for host in [
        PathBuf::from("/usr").join(&marker),
        PathBuf::from("/etc").join(&marker),
        PathBuf::from("/").join(&marker),
        dir.path().join(&marker),
    ] {
        assert!(!host.exists(), "{} appeared on the host", host.display());
    }
    // Nor in the root the worker prepared, which is the sandbox's / and /etc.
    assert_eq!(find_named(state.path(), &marker), None);
    // The build directory is the job's own on the host; /tmp is the step's private tmpfs.
    assert!(dir.path().join("src/inside").exists());
    assert!(!dir.path().join("tmp/inside").exists());
}

/// The first path below `dir` (not following symlinks) whose file name is `name`.
fn find_named(dir: &Path, name: &str) -> Option<PathBuf> {
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        if entry.file_name() == name {
            return Some(path);
        }
        if entry.file_type().is_ok_and(|t| t.is_dir())
            && let Some(found) = find_named(&path, name)
        {
            return Some(found);
        }
    }
    None
}

#[tokio::test]
async fn the_workers_files_next_to_the_build_are_not_readable() {
    let state = tempfile::tempdir().unwrap();
    let Some(sb) = sandbox(state.path(), Limits::default()) else {
        return;
    };
    // Laid out like the worker's data_dir: a key beside builds/<assignment>/src.
    let data = tempfile::tempdir().unwrap();
    let secret = "quorum-planted-secret-7f3a";
    std::fs::write(data.path().join("worker.key"), secret).unwrap();
    let job_dir = data.path().join("builds/a1");
    std::fs::write(data.path().join("builds/a1-key"), secret).unwrap_or_else(|_| {
        std::fs::create_dir_all(data.path().join("builds")).unwrap();
        std::fs::write(data.path().join("builds/a1-key"), secret).unwrap();
    });
    let host_key = data.path().join("worker.key");
    let script = format!(
        "cat {} ../../worker.key /build/../../worker.key /build/../a1-key 2>/dev/null || true; \
         find / \\( -path /proc -o -path /usr \\) -prune -o \\( -name worker.key -o -name a1-key \\) \
         -print 2>/dev/null | sed 's/^/FOUND /'; echo END",
        host_key.display()
    );
    let ran = run(&sb, &job_dir, &[&script], SHORT).await;
    assert_succeeded(&ran);
    assert!(ran.log.contains("END"), "{}", ran.log);
    assert!(!ran.log.contains(secret), "{}", ran.log);
    assert!(
        !ran.log.lines().any(|l| l.starts_with("FOUND")),
        "{}",
        ran.log
    );
}

#[tokio::test]
async fn identity_paths_and_environment_are_exactly_as_specified() {
    let state = tempfile::tempdir().unwrap();
    let Some(sb) = sandbox(state.path(), Limits::default()) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let ran = run(
        &sb,
        dir.path(),
        &["echo \"ID $(id -u):$(id -g) $(id -un):$(id -gn) $(hostname) $(pwd) $(umask)\"; env | sort | sed 's/^/ENV /'"],
        SHORT,
    )
    .await;
    assert_succeeded(&ran);
    assert!(
        ran.log
            .contains("\nID 1000:1000 build:build quorum-build /build 0022\n"),
        "{}",
        ran.log
    );
    let job = spec(dir.path(), &[], SHORT);
    let mut expected: Vec<String> = sandbox_environment(&job)
        .into_iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    // The shell itself sets PWD.
    expected.push("PWD=/build".into());
    expected.sort();
    let got: Vec<String> = ran
        .log
        .lines()
        .filter_map(|l| l.strip_prefix("ENV "))
        .map(str::to_string)
        .collect();
    assert_eq!(got, expected, "{}", ran.log);
    assert!(got.contains(&"HOME=/build".to_string()));
    assert!(got.contains(&"TMPDIR=/tmp".to_string()));
}

#[tokio::test]
async fn the_timeout_kills_setsid_double_forked_children() {
    let state = tempfile::tempdir().unwrap();
    let Some(sb) = sandbox(state.path(), Limits::default()) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let ran = run(
        &sb,
        dir.path(),
        &[
            "setsid sh -c '(while true; do date +%s%N > /build/marker; sleep 0.05; done) &' \
           </dev/null >/dev/null 2>&1; sleep 300",
        ],
        Duration::from_secs(2),
    )
    .await;
    assert_eq!(
        ran.outcome.status,
        JobStatus::TimedOut { secs: 2 },
        "{}",
        ran.log
    );
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "took {:?}",
        started.elapsed()
    );
    let marker = dir.path().join("src/marker");
    assert!(
        marker.exists(),
        "the background child never ran: {}",
        ran.log
    );
    let left = wait_none_in(dir.path());
    assert!(left.is_empty(), "processes survived the timeout: {left:?}");
    let before = std::fs::read(&marker).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        std::fs::read(&marker).unwrap(),
        before,
        "the marker is still being written"
    );
}

#[tokio::test]
async fn cancel_kills_the_whole_sandbox() {
    let state = tempfile::tempdir().unwrap();
    let Some(sb) = sandbox(state.path(), Limits::default()) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let job = spec(
        dir.path(),
        &["setsid sh -c 'sleep 300 &' </dev/null >/dev/null 2>&1; sleep 300"],
        SHORT,
    );
    let cancel = CancellationToken::new();
    let trigger = cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(500)).await;
        trigger.cancel();
    });
    let ran = run_spec(&sb, &job, cancel).await;
    assert_eq!(ran.outcome.status, JobStatus::Cancelled, "{}", ran.log);
    let left = wait_none_in(dir.path());
    assert!(left.is_empty(), "processes survived the cancel: {left:?}");
}

#[tokio::test]
async fn the_memory_limit_kills_an_allocator_and_says_so() {
    let state = tempfile::tempdir().unwrap();
    let limit = 64 << 20;
    let Some(sb) = sandbox(
        state.path(),
        Limits {
            memory_bytes: Some(limit),
            ..Limits::default()
        },
    ) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let ran = run(
        &sb,
        dir.path(),
        &[
            "echo small",
            "perl -e '$s = \"x\" x (512 * 1024 * 1024); print length $s'",
        ],
        SHORT,
    )
    .await;
    assert_eq!(
        ran.outcome.status,
        JobStatus::LimitExceeded {
            index: 2,
            step: "perl -e '$s = \"x\" x (512 * 1024 * 1024); print length $s'".into(),
            limit: LimitHit::Memory { bytes: limit },
        },
        "{}",
        ran.log
    );
    let reason = ran.outcome.status.failure_reason().unwrap();
    assert!(reason.contains("memory limit"), "{reason}");
    assert!(ran.log.contains("memory_bytes = 67108864"), "{}", ran.log);
    assert!(ran.outcome.peak_rss_kib > 0, "no peak memory was measured");
    assert!(
        ran.outcome.peak_rss_kib <= limit / 1024 + 1024,
        "{}",
        ran.outcome.peak_rss_kib
    );
    // The worker carries on: the same executor runs the next job.
    let again = tempfile::tempdir().unwrap();
    assert_succeeded(&run(&sb, again.path(), &["echo fine"], SHORT).await);
}

#[tokio::test]
async fn a_fork_bomb_stops_at_the_pids_limit_and_nothing_survives() {
    let state = tempfile::tempdir().unwrap();
    let Some(sb) = sandbox(
        state.path(),
        Limits {
            pids: Some(32),
            ..Limits::default()
        },
    ) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let ran = run(
        &sb,
        dir.path(),
        &["bomb() { bomb | bomb & }; bomb 2>/dev/null; sleep 2; exit 1"],
        Duration::from_secs(20),
    )
    .await;
    assert!(
        matches!(
            ran.outcome.status,
            JobStatus::LimitExceeded {
                limit: LimitHit::Pids { max: 32 },
                ..
            }
        ),
        "{:?}\n{}",
        ran.outcome.status,
        ran.log
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "took {:?}",
        started.elapsed()
    );
    let left = wait_none_in(dir.path());
    assert!(left.is_empty(), "fork bomb processes survived: {left:?}");
}

#[tokio::test]
async fn two_sandboxes_at_once_share_no_tmp() {
    let state = tempfile::tempdir().unwrap();
    let Some(sb) = sandbox(state.path(), Limits::default()) else {
        return;
    };
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let script = |name: &str| {
        format!("echo {name} > /tmp/{name}; sleep 1; echo SEEN $(ls /tmp | sort | tr '\\n' ' ')")
    };
    let (sa, sb_) = (script("first"), script("second"));
    let (ja, jb) = (
        spec(a.path(), &[&sa], SHORT),
        spec(b.path(), &[&sb_], SHORT),
    );
    let (ra, rb) = tokio::join!(
        run_spec(&sb, &ja, CancellationToken::new()),
        run_spec(&sb, &jb, CancellationToken::new())
    );
    assert_succeeded(&ra);
    assert_succeeded(&rb);
    assert!(ra.log.contains("SEEN first\n"), "{}", ra.log);
    assert!(rb.log.contains("SEEN second\n"), "{}", rb.log);
}

#[tokio::test]
async fn the_same_c_build_in_different_directories_gives_identical_bytes() {
    let state = tempfile::tempdir().unwrap();
    let Some(sb) = sandbox(state.path(), Limits::default()) else {
        return;
    };
    let program = "#include <stdio.h>\nint main(void) { puts(__FILE__); return 0; }\n";
    let build = "cc -g -O1 -o hello \"$PWD/hello.c\" && ./hello";
    let mut sandboxed = Vec::new();
    let mut plain = Vec::new();
    for _ in 0..2 {
        for (executor, out) in [
            (&sb as &dyn Executor, &mut sandboxed),
            (&ProcessExecutor as &dyn Executor, &mut plain),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let job = spec(dir.path(), &[build], SHORT);
            std::fs::write(job.build_dir.join("hello.c"), program).unwrap();
            let ran = run_spec(executor, &job, CancellationToken::new()).await;
            assert_succeeded(&ran);
            out.push(std::fs::read(job.build_dir.join("hello")).unwrap());
        }
    }
    assert!(sandboxed[0] == sandboxed[1], "the sandboxed builds differ");
    // The comparison can fail: outside the sandbox the build path leaks into the binary.
    assert!(
        plain[0] != plain[1],
        "the unsandboxed builds were identical, proving nothing"
    );
}

// ---- The seccomp filter. Each test compiles `probe.c` (one system call per argument, with
// arguments that fail harmlessly when the call is allowed) and runs it in the sandbox and, as the
// control that shows the assertion can fail, as a plain process on the host.

/// `name` → (return value, errno) for each call the probe made.
type Calls = HashMap<String, (i64, i32)>;

/// Compiles the probe with `cc` in a fresh job of `executor`, runs `setup` and then the probe
/// with `calls`, and returns its results and the log.
async fn probe_calls(executor: &dyn Executor, setup: &str, calls: &[&str]) -> (Calls, Ran) {
    let dir = tempfile::tempdir().unwrap();
    let job = spec(
        dir.path(),
        &[
            "cc -Wall -o probe probe.c -lpthread",
            setup,
            &format!("./probe {} </dev/null", calls.join(" ")),
        ],
        SHORT,
    );
    std::fs::write(job.build_dir.join("probe.c"), include_str!("probe.c")).unwrap();
    let ran = run_spec(executor, &job, CancellationToken::new()).await;
    assert_succeeded(&ran);
    let results: Calls = ran
        .log
        .lines()
        .filter_map(|l| {
            let mut f = l.strip_prefix("R ")?.split(' ');
            let name = f.next()?.to_string();
            Some((name, (f.next()?.parse().ok()?, f.next()?.parse().ok()?)))
        })
        .collect();
    for call in calls {
        let name = call.split('=').next().unwrap();
        assert!(
            results.contains_key(name),
            "no result for {name}: {}",
            ran.log
        );
    }
    (results, ran)
}

/// Runs the probe in the sandbox and on the host. `None` when there is no sandbox here.
async fn sandboxed_and_host(setup: &str, calls: &[&str]) -> Option<(Calls, Calls)> {
    let state = tempfile::tempdir().unwrap();
    let sb = sandbox(state.path(), Limits::default())?;
    let (inside, _) = probe_calls(&sb, setup, calls).await;
    let (outside, _) = probe_calls(&ProcessExecutor, setup, calls).await;
    Some((inside, outside))
}

/// `name` failed with `errno` in the sandbox, and not with it on the host.
fn assert_denied(inside: &Calls, outside: &Calls, name: &str, errno: i32) {
    assert_eq!(
        inside[name],
        (-1, errno),
        "{name} in the sandbox (host: {:?})",
        outside[name]
    );
    assert_ne!(outside[name].1, errno, "{name} on the host proves nothing");
}

#[tokio::test]
async fn keyctl_and_request_key_fail_with_eperm() {
    let Some((inside, outside)) = sandboxed_and_host("true", &["keyctl", "request_key"]).await
    else {
        return;
    };
    assert_denied(&inside, &outside, "keyctl", libc::EPERM);
    assert_denied(&inside, &outside, "request_key", libc::EPERM);
}

#[tokio::test]
async fn bpf_perf_io_uring_userfaultfd_and_setns_fail_with_eperm() {
    let calls = [
        "bpf",
        "perf_event_open",
        "io_uring_setup",
        "userfaultfd",
        "setns",
        "finit_module",
    ];
    let Some((inside, outside)) = sandboxed_and_host("true", &calls).await else {
        return;
    };
    for call in calls {
        assert_denied(&inside, &outside, call, libc::EPERM);
    }
}

#[tokio::test]
async fn tiocsti_and_tioclinux_ioctls_fail_with_eperm_and_other_ioctls_do_not() {
    let calls = ["tiocsti", "tiocsti_high", "tioclinux", "fionread"];
    let Some((inside, outside)) = sandboxed_and_host("true", &calls).await else {
        return;
    };
    assert_denied(&inside, &outside, "tiocsti", libc::EPERM);
    // The kernel reads the request as 32 bits; junk above them must not get past the filter.
    assert_denied(&inside, &outside, "tiocsti_high", libc::EPERM);
    assert_denied(&inside, &outside, "tioclinux", libc::EPERM);
    // Other ioctls reach the kernel: /dev/null is no terminal.
    assert_eq!(inside["fionread"], (-1, libc::ENOTTY));
}

#[tokio::test]
async fn new_user_namespaces_are_denied() {
    // unshare_user last: on the host it succeeds, and the calls after it would run in the new
    // namespace.
    let calls = ["clone_user", "clone3", "fork", "thread", "unshare_user"];
    let Some((inside, outside)) = sandboxed_and_host("true", &calls).await else {
        return;
    };
    // EPERM is the seccomp filter's answer, the only wall here: a namespace limit (bwrap's
    // `--disable-userns`, or the host's sysctl) would answer ENOSPC.
    assert_denied(&inside, &outside, "unshare_user", libc::EPERM);
    assert_denied(&inside, &outside, "clone_user", libc::EPERM);
    // clone3 hides its flags from the filter; ENOSYS sends glibc back to clone.
    assert_denied(&inside, &outside, "clone3", libc::ENOSYS);
    // Which is why forks and threads still work.
    assert_eq!(inside["fork"], (7, 0));
    assert_eq!(inside["thread"], (0, 0));

    let state = tempfile::tempdir().unwrap();
    let sb = sandbox(state.path(), Limits::default()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ran = run(
        &sb,
        dir.path(),
        &["if unshare -U true 2>&1; then echo UNSHARE-OK; else echo UNSHARE-FAILED; fi"],
        SHORT,
    )
    .await;
    assert_succeeded(&ran);
    assert!(ran.log.contains("UNSHARE-FAILED"), "{}", ran.log);
    assert!(ran.log.contains("Operation not permitted"), "{}", ran.log);
}

#[tokio::test]
async fn setuid_and_setgid_bits_cannot_be_set() {
    let calls = [
        "chmod_suid=file",
        "chmod_sgid=file",
        "fchmod_suid=file",
        "chmod_plain=file",
    ];
    let Some((inside, outside)) = sandboxed_and_host("touch file", &calls).await else {
        return;
    };
    assert_denied(&inside, &outside, "chmod_suid", libc::EPERM);
    assert_denied(&inside, &outside, "chmod_sgid", libc::EPERM);
    assert_denied(&inside, &outside, "fchmod_suid", libc::EPERM);
    // Ordinary modes still change.
    assert_eq!(inside["chmod_plain"], (0, 0));

    // And through the shell, as a build would: the bits do not stick.
    let state = tempfile::tempdir().unwrap();
    let sb = sandbox(state.path(), Limits::default()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ran = run(
        &sb,
        dir.path(),
        &[
            "touch /build/tool && chmod 755 /build/tool; chmod u+s /build/tool || true; \
             chmod g+s /build/tool || true; mkdir /build/d; chmod g+s /build/d || true; \
             echo MODES $(stat -c %a /build/tool /build/d)",
        ],
        SHORT,
    )
    .await;
    assert_succeeded(&ran);
    assert!(ran.log.contains("MODES 755 755\n"), "{}", ran.log);
    assert!(ran.log.contains("Operation not permitted"), "{}", ran.log);
    let mode = std::fs::metadata(dir.path().join("src/tool")).unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(mode.permissions().mode() & 0o7777, 0o755);
}

#[tokio::test]
async fn ptrace_and_process_vm_readv_of_another_sandbox_process_fail() {
    let calls = ["ptrace_child", "vm_readv"];
    let Some((inside, outside)) = sandboxed_and_host("true", &calls).await else {
        return;
    };
    assert_denied(&inside, &outside, "ptrace_child", libc::EPERM);
    assert_denied(&inside, &outside, "vm_readv", libc::EPERM);
}

#[tokio::test]
async fn a_normal_c_build_with_threads_still_works() {
    let state = tempfile::tempdir().unwrap();
    let Some(sb) = sandbox(state.path(), Limits::default()) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let job = spec(
        dir.path(),
        &[
            "printf 'int add(int a, int b) { return a + b; }\\n' > add.c",
            "cc -c -O2 add.c && ar rcs libadd.a add.o",
            "cc -O2 -o main main.c -L. -ladd -lpthread",
            "./main",
            "chmod 755 main && test -x main",
        ],
        SHORT,
    );
    std::fs::write(
        job.build_dir.join("main.c"),
        "#include <pthread.h>\n#include <stdio.h>\nint add(int, int);\n\
         static void *run(void *p) { *(int *)p = add(*(int *)p, 1); return p; }\n\
         int main(void) { int v = 41; pthread_t t; if (pthread_create(&t, 0, run, &v)) return 1;\n\
         pthread_join(t, 0); printf(\"ANSWER %d\\n\", v); return 0; }\n",
    )
    .unwrap();
    let ran = run_spec(&sb, &job, CancellationToken::new()).await;
    assert_succeeded(&ran);
    assert!(ran.log.contains("ANSWER 42\n"), "{}", ran.log);
}

// ---- More of the network, and the worker dying.

#[tokio::test]
async fn udp_to_the_hosts_loopback_and_ipv6_connects_fail() {
    let state = tempfile::tempdir().unwrap();
    let Some(sb) = sandbox(state.path(), Limits::default()) else {
        return;
    };
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    udp.set_nonblocking(true).unwrap();
    let udp_port = udp.local_addr().unwrap().port();
    // A host without IPv6 still gets the connect tried (to a port where nothing listens).
    let v6 = std::net::TcpListener::bind("[::1]:0").ok();
    if let Some(l) = &v6 {
        l.set_nonblocking(true).unwrap();
    }
    let v6_port = v6.as_ref().map_or(9, |l| l.local_addr().unwrap().port());
    let script = [
        format!(
            "for i in 1 2 3; do perl -MIO::Socket::INET -e '$s = IO::Socket::INET->new(PeerAddr \
             => \"127.0.0.1:{udp_port}\", Proto => \"udp\") or exit 1; $s->send(\"quorum\")' \
             && echo UDP-SENT; done; true"
        ),
        format!(
            "if perl -MIO::Socket::IP -e 'IO::Socket::IP->new(PeerHost => \"::1\", PeerPort => \
             {v6_port}, Timeout => 3) or exit 1'; then echo V6-CONNECTED; else echo V6-FAILED; fi"
        ),
    ];
    let steps: Vec<&str> = script.iter().map(String::as_str).collect();
    let dir = tempfile::tempdir().unwrap();
    let ran = run(&sb, dir.path(), &steps, SHORT).await;
    assert_succeeded(&ran);
    assert!(ran.log.contains("V6-FAILED"), "{}", ran.log);
    std::thread::sleep(Duration::from_millis(200));
    let mut buf = [0u8; 64];
    assert!(
        matches!(udp.recv_from(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "the host's UDP socket got a datagram from the sandbox: {}",
        ran.log
    );
    if let Some(l) = &v6 {
        assert!(
            matches!(l.accept(), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
            "the host's IPv6 listener got a connection from the sandbox"
        );
    }

    // The control: the same steps as plain processes do reach the host.
    let dir = tempfile::tempdir().unwrap();
    let ran = run(&ProcessExecutor, dir.path(), &steps, SHORT).await;
    assert_succeeded(&ran);
    std::thread::sleep(Duration::from_millis(200));
    let (n, _) = udp
        .recv_from(&mut buf)
        .expect("the control's datagram arrives");
    assert_eq!(&buf[..n], b"quorum");
    if v6.is_some() {
        assert!(ran.log.contains("V6-CONNECTED"), "{}", ran.log);
    }
}

#[tokio::test]
async fn host_unix_sockets_path_and_abstract_are_unreachable() {
    use std::os::linux::net::SocketAddrExt as _;
    use std::os::unix::net::{SocketAddr, UnixListener};
    let host = tempfile::tempdir().unwrap();
    let path = host.path().join("host.sock");
    let by_path = UnixListener::bind(&path).unwrap();
    let name = format!("quorum-test-{}", std::process::id());
    let abstract_ =
        UnixListener::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap()).unwrap();
    for l in [&by_path, &abstract_] {
        l.set_nonblocking(true).unwrap();
    }
    let calls = [
        format!("unix_path={}", path.display()),
        format!("unix_abstract={name}"),
    ];
    let calls: Vec<&str> = calls.iter().map(String::as_str).collect();
    let state = tempfile::tempdir().unwrap();
    let Some(sb) = sandbox(state.path(), Limits::default()) else {
        return;
    };
    let (inside, ran) = probe_calls(&sb, "true", &calls).await;
    // The path is not mounted in; the abstract namespace belongs to the network namespace.
    assert_eq!(inside["unix_path"], (-1, libc::ENOENT), "{}", ran.log);
    assert_eq!(
        inside["unix_abstract"],
        (-1, libc::ECONNREFUSED),
        "{}",
        ran.log
    );
    for l in [&by_path, &abstract_] {
        assert!(
            matches!(l.accept(), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
            "a host Unix socket got a connection from the sandbox"
        );
    }
    // The control: from the host, both connect.
    let (outside, ran) = probe_calls(&ProcessExecutor, "true", &calls).await;
    assert_eq!(outside["unix_path"], (0, 0), "{}", ran.log);
    assert_eq!(outside["unix_abstract"], (0, 0), "{}", ran.log);
}

/// Set for the child copy of this test binary that plays the worker in the kill test: the job
/// directory to run a long sandboxed step in.
const WORKER_DIR_ENV: &str = "QUORUM_SANDBOX_TEST_WORKER_DIR";

/// Not a test of its own: the stand-in worker `killing_the_worker_kills_the_sandbox` starts
/// (with `WORKER_DIR_ENV` set) and SIGKILLs. Without the variable it does nothing.
#[tokio::test]
async fn worker_stand_in_for_the_kill_test() {
    let Some(dir) = std::env::var_os(WORKER_DIR_ENV) else {
        return;
    };
    let dir = PathBuf::from(dir);
    let sb = SandboxExecutor::new(&dir.join("state"), Limits::default()).unwrap();
    run(
        &sb,
        &dir,
        &[
            "setsid sh -c 'sleep 300 &' </dev/null >/dev/null 2>&1; touch /build/started; \
           sleep 300; : quorum-kill-test",
        ],
        Duration::from_secs(120),
    )
    .await;
}

#[tokio::test]
async fn killing_the_worker_kills_the_sandbox() {
    let state = tempfile::tempdir().unwrap();
    if sandbox(state.path(), Limits::default()).is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    #[allow(clippy::disallowed_methods)] // the stand-in worker is this test binary itself
    let mut worker = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "worker_stand_in_for_the_kill_test",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(WORKER_DIR_ENV, dir.path())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let started = dir.path().join("src/started");
    let until = Instant::now() + Duration::from_secs(20);
    while !started.exists() {
        if Instant::now() >= until || worker.try_wait().unwrap().is_some() {
            let _ = worker.kill();
            let _ = worker.wait();
            panic!("the stand-in worker's step never started");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // Sandboxed processes show their cwd as /build, so they are found by their pid namespace:
    // the one of the step's shell, whose command line carries the marker.
    let ours = std::fs::read_link("/proc/self/ns/pid").unwrap();
    let ns = pids()
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains("quorum-kill-test"))
        })
        .filter_map(|pid| std::fs::read_link(format!("/proc/{pid}/ns/pid")).ok())
        .find(|ns| *ns != ours)
        .expect("the step's shell is in a pid namespace of its own");
    let in_sandbox = || -> Vec<u32> {
        pids()
            .filter(|pid| std::fs::read_link(format!("/proc/{pid}/ns/pid")).is_ok_and(|n| n == ns))
            .collect()
    };
    // bwrap's init, the shell, both sleeps.
    assert!(in_sandbox().len() >= 3, "{:?}", in_sandbox());
    // SIGKILL: the worker gets no chance to clean up.
    worker.kill().unwrap();
    worker.wait().unwrap();
    let until = Instant::now() + Duration::from_secs(10);
    while !in_sandbox().is_empty() && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(50));
    }
    let left = in_sandbox();
    assert!(
        left.is_empty(),
        "sandbox processes outlived the worker: {left:?}"
    );
}

/// Every process id on the host.
fn pids() -> impl Iterator<Item = u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse().ok())
}
