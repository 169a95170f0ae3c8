//! Benchmark harness for the controller (figures in docs/benchmarks.md). Everything runs in this
//! process over real loopback HTTP: the IdP, the store, the controller, and simulated workers
//! that speak the real worker protocol (signed long polls, signed reports) but run no build.
//!
//! ```text
//! source .ci/services.sh   # for --backend postgres
//! cargo run --release -p quorum-controller --example controller_bench -- \
//!     [--backend sqlite|postgres] [--latency-samples 200] [--workers 100] [--jobs 1000] \
//!     [--idle-workers 0]
//! ```
//!
//! * dispatch latency: idle workers wait in long polls; from the moment a build's submission
//!   returns (the job is queued) to the moment a worker's poll returns its assignment with
//!   both tokens (the step could start), one build at a time; p50 and p99.
//! * throughput: `--workers` simulated workers of distinct owners take and report no-op jobs of
//!   one build of `--jobs` jobs with `quorum: 1` as fast as they can; jobs per second from
//!   submission until the verified build's signed statement is served (and, besides, from the
//!   first job taken to the last report).
//! * idle workers: `--idle-workers` workers enrolled and waiting in long polls, held by a child
//!   process; this process's resident memory (the controller, beside an idle IdP and store)
//!   before and after they connect.

#[path = "../tests/controller/support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use quorum_api::v1::controller::{BuildState, Usage};
use support::{Backend, SimWorker, Stack};

struct Args {
    backend: Backend,
    latency_samples: usize,
    workers: usize,
    jobs: usize,
    idle_workers: usize,
}

fn args() -> Args {
    let mut a = Args {
        backend: Backend::Sqlite,
        latency_samples: 200,
        workers: 100,
        jobs: 1000,
        idle_workers: 0,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--backend" => {
                a.backend = match value().as_str() {
                    "sqlite" => Backend::Sqlite,
                    "postgres" => Backend::Postgres,
                    other => panic!("--backend is sqlite or postgres, not {other}"),
                }
            }
            "--latency-samples" => a.latency_samples = value().parse().expect("a number"),
            "--workers" => a.workers = value().parse().expect("a number"),
            "--jobs" => a.jobs = value().parse().expect("a number"),
            "--idle-workers" => a.idle_workers = value().parse().expect("a number"),
            other => panic!("unknown flag {other}"),
        }
    }
    a
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

/// Resident set size of process `pid`, from /proc.
fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kib| kib / 1024.0)
}

/// CPU seconds (user + system, every thread) this process has used so far, from /proc.
fn cpu_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which is in parentheses and may hold spaces): utime and
    // stime are the 12th and 13th of them, in clock ticks (100 a second on Linux).
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

/// Runs `worker` forever: poll, report `content` as the result taking the next waiting offer
/// with it (as a worker with a free slot does), and poll again only when none came. Each
/// assignment's arrival time goes to `arrivals`; `reported` counts the reports the controller
/// accepted.
fn spawn_worker(
    worker: SimWorker,
    arrivals: tokio::sync::mpsc::UnboundedSender<(String, Instant)>,
    reported: Arc<AtomicUsize>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut next = None;
        loop {
            let a = match next.take() {
                Some(a) => a,
                None => {
                    let Ok(polled) = worker
                        .client
                        .poll(&quorum_api::v1::controller::PollRequest {
                            wait_ms: 20_000,
                            capacity: 1,
                        })
                        .await
                    else {
                        return;
                    };
                    let Some(a) = polled else { continue };
                    a
                }
            };
            if arrivals.send((a.build_id.clone(), Instant::now())).is_err() {
                return;
            }
            next = worker
                .succeed_and_take(&a, b"no-op", Usage::default())
                .await;
            reported.fetch_add(1, Ordering::Relaxed);
        }
    })
}

async fn latency(stack: &Stack, samples: usize) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut tasks = Vec::new();
    for i in 0..10 {
        let w = stack
            .worker(&format!("lat-{i}"), &format!("lat-owner-{i}"), false)
            .await;
        tasks.push(spawn_worker(w, tx.clone(), Arc::default()));
    }
    let repo = support::repo_with_pipeline(
        &stack.dir.path().join("repos"),
        "policy: {quorum: 1}\njobs:\n  noop:\n    script: [\"true\"]\n",
    );
    let user = stack.user();
    // Let every worker settle into its long poll.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut latencies = Vec::with_capacity(samples);
    for i in 0..samples + 5 {
        let created = user.submit(repo.to_str().unwrap(), "HEAD").await.unwrap();
        let queued = Instant::now();
        let (build, arrived) = tokio::time::timeout(Duration::from_secs(30), rx.recv())
            .await
            .expect("an assignment within 30 s")
            .expect("workers run");
        assert_eq!(build, created.build_id);
        if i >= 5 {
            latencies.push(arrived - queued); // the first few warm up connections and caches
        }
        // Let the build finish (signing) before the next, so one dispatch is measured at a time.
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    latencies.sort();
    println!(
        "dispatch latency ({} samples, 10 idle workers): p50 {}, p99 {}, max {}",
        latencies.len(),
        ms(percentile(&latencies, 0.5)),
        ms(percentile(&latencies, 0.99)),
        ms(*latencies.last().unwrap())
    );
    for t in tasks {
        t.abort();
    }
}

async fn throughput(stack: &Stack, workers: usize, jobs: usize) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let reported = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for i in 0..workers {
        let w = stack
            .worker(&format!("tp-{i}"), &format!("tp-owner-{i}"), false)
            .await;
        tasks.push(spawn_worker(w, tx.clone(), reported.clone()));
    }
    drop(tx);
    let first_taken = Arc::new(std::sync::OnceLock::new());
    let drain = tokio::spawn({
        let first_taken = first_taken.clone();
        async move {
            let mut per_build: HashMap<String, usize> = HashMap::new();
            while let Some((b, at)) = rx.recv().await {
                let _ = first_taken.set(at);
                *per_build.entry(b).or_default() += 1;
            }
            per_build
        }
    });
    let mut pipeline = String::from("policy: {quorum: 1}\njobs:\n");
    for j in 0..jobs {
        pipeline.push_str(&format!("  j{j}:\n    script: [\"true\"]\n"));
    }
    // The repository exists before the clock starts, as a user's does when they submit: the
    // git processes that make it are the harness's work, not the controller's.
    let repo = support::repo_with_pipeline(&stack.dir.path().join("repos"), &pipeline);
    let user = stack.user();
    let build = {
        let started = Instant::now();
        let cpu_before = cpu_secs();
        let build = user
            .submit(repo.to_str().unwrap(), "HEAD")
            .await
            .unwrap()
            .build_id;
        let submitted = started.elapsed();
        // The build's status (a read of every job and assignment) is asked for only once every
        // job is reported, so the measurement's own reads do not slow what it measures.
        let deadline = Instant::now() + Duration::from_secs(600);
        while reported.load(Ordering::Relaxed) < jobs {
            assert!(
                Instant::now() < deadline,
                "every job is reported within 10 minutes"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let all_reported = started.elapsed();
        let flowing = first_taken
            .get()
            .map(|first| Instant::now() - *first)
            .unwrap_or_default();
        // The end is the build's signed statement being served: one row to look up, where
        // the status is every job and assignment, whose reads (every 20 ms) competed with the
        // signing they were waiting for.
        let deadline = Instant::now() + Duration::from_secs(60);
        while user.statement(&build).await.is_err() {
            assert!(
                Instant::now() < deadline,
                "the build is signed within a minute"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let elapsed = started.elapsed();
        let cpu = cpu_secs() - cpu_before;
        let status = user.status(&build).await.unwrap();
        assert_eq!(status.state, BuildState::Verified, "{status:#?}");
        assert!(
            status.jobs.iter().all(|j| j.assignments.len() == 1),
            "every job ran exactly once"
        );
        println!(
            "throughput: {jobs} no-op jobs through {workers} workers in {:.2} s ({:.0} jobs/s; \
             submission {}, last report to final state {}, build {:?}; first job taken to \
             last report {} ({:.0} jobs/s); CPU {:.2} s, {:.2} cores)",
            elapsed.as_secs_f64(),
            jobs as f64 / elapsed.as_secs_f64(),
            ms(submitted),
            ms(elapsed - all_reported),
            status.state,
            ms(flowing),
            jobs as f64 / flowing.as_secs_f64(),
            cpu,
            cpu / elapsed.as_secs_f64(),
        );
        build
    };
    for t in tasks {
        t.abort();
    }
    let per_build = drain.await.unwrap_or_default();
    assert_eq!(per_build.get(&build).copied().unwrap_or(jobs), jobs);
}

/// Enrolls `n` workers, then runs the controller alone in a child process (this harness with
/// `--idle-controller`, on the stack's database, beside the stack's IdP and store in this
/// process) and has another (`--idle-child`) hold one long poll per worker: the controller's
/// resident memory is then its own, not the IdP's (whose Argon2 check of the controller's
/// secret keeps 19 MiB) nor the clients'.
async fn idle(stack: &mut Stack, n: usize) {
    let tokens_file = stack.dir.path().join("idle-tokens");
    let mut tokens = String::new();
    for i in 0..n {
        let token = stack
            .enrollment(&format!("idle-owner-{i}"), false, &Default::default())
            .await;
        tokens.push_str(&format!("idle-{i} {token}\n"));
    }
    std::fs::write(&tokens_file, tokens).unwrap();
    stack.stop_controller().await;
    let config_file = stack.dir.path().join("idle-controller.json");
    std::fs::write(&config_file, serde_json::to_vec(&stack.config).unwrap()).unwrap();
    #[allow(clippy::disallowed_methods)] // the harness runs the controller in a second process
    let mut controller = tokio::process::Command::new(std::env::current_exe().unwrap())
        .arg("--idle-controller")
        .arg(&config_file)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let pid = controller.id().expect("the controller runs");
    let mut said = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(
        controller.stdout.take().unwrap(),
    ));
    let url = tokio::time::timeout(Duration::from_secs(60), said.next_line())
        .await
        .expect("the controller starts within a minute")
        .unwrap()
        .expect("the controller says where it listens");
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !http
        .get(format!("{url}/healthz"))
        .send()
        .await
        .is_ok_and(|r| r.status().is_success())
    {
        assert!(
            Instant::now() < deadline,
            "the controller answers within a minute"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Its access token fetched, as any controller's is once it runs.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = rss_mib(pid);
    #[allow(clippy::disallowed_methods)] // the harness runs its own clients in a third process
    let mut child = tokio::process::Command::new(std::env::current_exe().unwrap())
        .args(["--idle-child", &url])
        .arg(&tokens_file)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines =
        tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(child.stdout.take().unwrap()));
    let ready = tokio::time::timeout(Duration::from_secs(600), lines.next_line())
        .await
        .expect("the clients connect within 10 minutes")
        .unwrap();
    assert_eq!(ready.as_deref(), Some("ready"));
    let mut peak: f64 = 0.0;
    for _ in 0..30 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        peak = peak.max(rss_mib(pid));
    }
    println!(
        "idle workers: {n} enrolled workers each waiting in a long poll; controller process RSS \
         {before:.0} MiB before they connect, {:.0} MiB after (peak {peak:.0} MiB over 30 s)",
        rss_mib(pid)
    );
    let _ = child.kill().await;
    let _ = controller.kill().await;
}

/// The controller of the idle-workers measurement, alone in this process: runs the one in the
/// config file on a free loopback port, says its URL, and serves until killed.
async fn idle_controller(config_file: &str) {
    let config: quorum_controller::Config =
        serde_json::from_slice(&std::fs::read(config_file).unwrap()).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    println!("http://{}", listener.local_addr().unwrap());
    quorum_controller::run(listener, config, tokio_util::sync::CancellationToken::new())
        .await
        .unwrap();
}

/// The client side of the idle-workers measurement: enroll every worker in the file, start one
/// long poll each, say `ready`, and keep polling until killed.
async fn idle_child(controller: &str, tokens_file: &str) {
    let text = std::fs::read_to_string(tokens_file).unwrap();
    let mut polls = Vec::new();
    for line in text.lines() {
        let (name, token) = line.split_once(' ').unwrap();
        let w = SimWorker::enroll(controller, name, token).await;
        polls.push(tokio::spawn(async move {
            loop {
                let _ = w.poll(60_000).await;
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    println!("ready");
    for p in polls {
        let _ = p.await;
    }
}

#[tokio::main]
async fn main() {
    let raw: Vec<String> = std::env::args().collect();
    if raw.get(1).map(String::as_str) == Some("--idle-child") {
        return idle_child(&raw[2], &raw[3]).await;
    }
    if raw.get(1).map(String::as_str) == Some("--idle-controller") {
        return idle_controller(&raw[2]).await;
    }
    // The roles' logs on stderr when asked for (`QUORUM_BENCH_LOG=quorum_controller=info`):
    // where a phase's time went, from their timestamps.
    if let Ok(filter) = std::env::var("QUORUM_BENCH_LOG") {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_writer(std::io::stderr)
            .init();
    }
    let a = args();
    println!("backend: {:?}", a.backend);
    // A fresh stack per phase: workers of an earlier phase look online for a lease after they
    // stop, and would be offered work they never take.
    if a.latency_samples > 0 {
        let stack = Stack::start(a.backend, 30).await;
        latency(&stack, a.latency_samples).await;
        stack.stop().await;
    }
    if a.jobs > 0 && a.workers > 0 {
        let stack = Stack::start(a.backend, 30).await;
        throughput(&stack, a.workers, a.jobs).await;
        stack.stop().await;
    }
    if a.idle_workers > 0 {
        let mut stack = Stack::start(a.backend, 30).await;
        idle(&mut stack, a.idle_workers).await;
        stack.stop().await;
    }
}
