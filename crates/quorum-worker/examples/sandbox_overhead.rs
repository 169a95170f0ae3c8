//! Start-up overhead per step: runs N `true` steps through the process and the namespace
//! executors, interleaved with as many bare `bwrap` runs, and prints the mean and median
//! milliseconds per step and the sandbox's ratio to bare bubblewrap (which moves with the load
//! less than either figure alone).
//! `cargo build --release -p quorum-worker --bins --examples &&
//! target/release/examples/sandbox_overhead [N]`

use std::time::{Duration, Instant};

use quorum_worker::executor::landlock::INIT_NAME;
use quorum_worker::executor::{
    Executor, JobSpec, JobStatus, Limits, ProcessExecutor, SandboxError, SandboxExecutor, run_job,
};
use tokio_util::sync::CancellationToken;

/// A one-step job running `true`, in `dir`.
fn true_job(dir: &std::path::Path) -> JobSpec {
    let job = JobSpec {
        build_dir: dir.join("src"),
        tmp_dir: dir.join("tmp"),
        source_date_epoch: 0,
        script: vec!["true".into()],
        timeout: Duration::from_secs(30),
        inputs: Vec::new(),
    };
    std::fs::create_dir_all(&job.build_dir).expect("cannot create the build directory");
    job
}

/// Wall time of one run of `job`, and the CPU time its step used (for the sandbox, every process
/// in the step's cgroup: bwrap, the init, the shell), which waiting for a busy CPU does not move.
async fn measure(executor: &dyn Executor, job: &JobSpec) -> (Duration, Duration) {
    let (tx, mut rx) = tokio::sync::mpsc::channel(16);
    let drain = tokio::spawn(async move { while rx.recv().await.is_some() {} });
    let started = Instant::now();
    let outcome = run_job(executor, job, tx, &CancellationToken::new())
        .await
        .expect("the executor failed");
    let took = started.elapsed();
    assert_eq!(outcome.status, JobStatus::Succeeded);
    drain.await.expect("the log drain panicked");
    (took, outcome.cpu)
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

/// The arguments of a bare `bwrap` running `/usr/bin/true` with only a user, pid and network
/// namespace and /usr: what bubblewrap itself costs here, without the executor's layers.
fn bare_bwrap_args() -> Vec<String> {
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
    args.push("/usr/bin/true".into());
    args
}

/// Wall time of one bare bwrap run.
#[allow(clippy::disallowed_methods)] // a baseline outside the executor
fn bare_bwrap(args: &[String]) -> Duration {
    let started = Instant::now();
    let status = std::process::Command::new("bwrap")
        .args(args)
        .status()
        .expect("cannot run bwrap");
    assert!(status.success(), "bare bwrap failed");
    started.elapsed()
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
    let dir = tempfile::tempdir().expect("cannot create a temporary directory");
    let job = true_job(dir.path());
    let bare_args = bare_bwrap_args();
    // Interleaved, so that load coming and going on a shared machine meets all three alike.
    let (mut plain, mut boxed, mut bare, mut cpu) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..n {
        plain.push(measure(&ProcessExecutor, &job).await.0);
        let (wall, used) = measure(&sandbox, &job).await;
        boxed.push(wall);
        cpu.push(used);
        bare.push(bare_bwrap(&bare_args));
    }
    let (bm, bmed) = stats(&mut bare);
    let (pm, pmed) = stats(&mut plain);
    let (sm, smed) = stats(&mut boxed);
    let (cm, cmed) = stats(&mut cpu);
    println!("steps: {n} x `true`; sandbox: {}", sandbox.description());
    println!("process:    mean {pm:.2} ms, median {pmed:.2} ms");
    println!("bare bwrap: mean {bm:.2} ms, median {bmed:.2} ms");
    println!("namespaces: mean {sm:.2} ms, median {smed:.2} ms");
    println!("namespaces, CPU time of the step's processes: mean {cm:.2} ms, median {cmed:.2} ms");
    println!(
        "ratio (namespaces / bare bwrap): mean {:.2}, median {:.2}",
        sm / bm,
        smed / bmed
    );
}
