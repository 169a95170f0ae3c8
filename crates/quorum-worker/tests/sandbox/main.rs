//! Conformance tests of the namespace sandbox: each runs real steps through `run_job` with
//! `SandboxExecutor` and checks what a hostile build could try. Skipped, with a printed note, only
//! when bubblewrap is not installed; tests of limits also need writable cgroups.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use quorum_worker::executor::{
    Executor, JobOutcome, JobSpec, JobStatus, LimitHit, Limits, ProcessExecutor, SandboxError,
    SandboxExecutor, run_job, sandbox_environment,
};
use tokio_util::sync::CancellationToken;

const SHORT: Duration = Duration::from_secs(30);

/// A sandbox with `limits`, or `None` (after saying why) when this host cannot run one.
fn sandbox(state: &Path, limits: Limits) -> Option<SandboxExecutor> {
    match SandboxExecutor::new(state, limits) {
        Ok(s) => Some(s),
        Err(SandboxError::BwrapMissing) => {
            println!("SKIPPED: bwrap is not installed (apt-get install bubblewrap)");
            None
        }
        Err(SandboxError::Cgroup(e)) => {
            println!("SKIPPED: cgroups are not writable here: {e}");
            None
        }
        Err(e) => panic!("cannot set up the sandbox: {e}"),
    }
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

/// Host processes whose working directory is `dir` or below it.
fn processes_in(dir: &Path) -> Vec<u32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if let Ok(cwd) = std::fs::read_link(format!("/proc/{pid}/cwd"))
            && cwd.starts_with(dir)
        {
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
    // The allowed places are the job's own directories on the host.
    assert!(dir.path().join("src/inside").exists());
    assert!(dir.path().join("tmp/inside").exists());
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
