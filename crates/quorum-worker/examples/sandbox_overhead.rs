//! Start-up overhead per step: runs N `true` steps through the process and the namespace
//! executors and prints the mean and median milliseconds per step and their ratio.
//! `cargo build --release -p quorum-worker --bins --examples &&
//! target/release/examples/sandbox_overhead [N]`

use std::time::{Duration, Instant};

use quorum_worker::executor::landlock::INIT_NAME;
use quorum_worker::executor::{
    Executor, JobSpec, JobStatus, Limits, ProcessExecutor, SandboxError, SandboxExecutor, run_job,
};
use tokio_util::sync::CancellationToken;

/// Wall time of each of `n` one-step jobs running `true`.
async fn measure(executor: &dyn Executor, n: usize) -> Vec<Duration> {
    let dir = tempfile::tempdir().expect("cannot create a temporary directory");
    let job = JobSpec {
        build_dir: dir.path().join("src"),
        tmp_dir: dir.path().join("tmp"),
        source_date_epoch: 0,
        script: vec!["true".into()],
        timeout: Duration::from_secs(30),
        inputs: Vec::new(),
    };
    std::fs::create_dir_all(&job.build_dir).expect("cannot create the build directory");
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let (tx, mut rx) = tokio::sync::mpsc::channel(16);
        let drain = tokio::spawn(async move { while rx.recv().await.is_some() {} });
        let started = Instant::now();
        let outcome = run_job(executor, &job, tx, &CancellationToken::new())
            .await
            .expect("the executor failed");
        times.push(started.elapsed());
        assert_eq!(outcome.status, JobStatus::Succeeded);
        drain.await.expect("the log drain panicked");
    }
    times
}

/// Adds `quorum-sandbox-init` from the same target directory (`cargo build --bins` puts it one
/// level above the examples), so the figures include the Landlock step.
fn with_init(sandbox: SandboxExecutor) -> Result<SandboxExecutor, SandboxError> {
    let init = std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.parent()?.join(INIT_NAME)));
    match init {
        Some(init) if init.is_file() => sandbox.with_init(&init),
        _ => {
            eprintln!("note: no {INIT_NAME} built; measuring without Landlock");
            Ok(sandbox)
        }
    }
}

/// Wall time of each of `n` bare `bwrap` runs of `/bin/true` with only a user, pid and network
/// namespace and /usr: what bubblewrap itself costs here, without the executor's layers.
#[allow(clippy::disallowed_methods)] // a baseline outside the executor
fn bare_bwrap(n: usize) -> Vec<Duration> {
    let mut args: Vec<String> = ["--unshare-user", "--unshare-pid", "--unshare-net"]
        .into_iter()
        .map(String::from)
        .collect();
    args.extend(["--ro-bind", "/usr", "/usr"].map(String::from));
    for top in ["bin", "lib", "lib64"] {
        let host = std::path::Path::new("/").join(top);
        if let Ok(target) = std::fs::read_link(&host) {
            args.extend([
                "--symlink".into(),
                target.display().to_string(),
                host.display().to_string(),
            ]);
        }
    }
    (0..n)
        .map(|_| {
            let started = Instant::now();
            let status = std::process::Command::new("bwrap")
                .args(&args)
                .arg("/usr/bin/true")
                .status()
                .expect("cannot run bwrap");
            assert!(status.success(), "bare bwrap failed");
            started.elapsed()
        })
        .collect()
}

fn stats(times: &mut [Duration]) -> (f64, f64) {
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let mean = times.iter().map(|d| ms(*d)).sum::<f64>() / times.len() as f64;
    (mean, ms(times[times.len() / 2]))
}

#[tokio::main]
async fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse().expect("N must be a number"))
        .unwrap_or(200);
    let state = tempfile::tempdir().expect("cannot create a temporary directory");
    let limits = Limits {
        memory_bytes: Some(1 << 30),
        pids: Some(256),
        cpu_quota: Some(1.0),
        ..Limits::default()
    };
    let sandbox = match SandboxExecutor::new(state.path(), limits).and_then(with_init) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1);
        }
    };
    let mut plain = measure(&ProcessExecutor, n).await;
    let mut boxed = measure(&sandbox, n).await;
    let mut bare = bare_bwrap(n);
    let (bm, bmed) = stats(&mut bare);
    let (pm, pmed) = stats(&mut plain);
    let (sm, smed) = stats(&mut boxed);
    println!("steps: {n} x `true`; sandbox: {}", sandbox.description());
    println!("process:    mean {pm:.2} ms, median {pmed:.2} ms");
    println!("bare bwrap: mean {bm:.2} ms, median {bmed:.2} ms");
    println!("namespaces: mean {sm:.2} ms, median {smed:.2} ms");
    println!(
        "ratio (namespaces / process): mean {:.2}, median {:.2}",
        sm / pm,
        smed / pmed
    );
}
