//! Start-up overhead per step: runs N `true` steps through the process and the namespace
//! executors, interleaved with as many bare `bwrap` runs, and prints the mean and median
//! milliseconds per step and the sandbox's ratio to bare bubblewrap (which moves with the load
//! less than either figure alone).
//!
//! The namespace executor starts the next step's sandbox while a step runs (a spare), so it is
//! measured three ways: a one-step job, whose step waits for its sandbox to be set up (no
//! spare); the same with its sandbox started ahead (`JobStart::prepare`, as the worker does
//! while it exports the source); and the steps of a three-step job driven through
//! `Executor::run_step` as `run_job` drives them, with a pause between steps that stands for the
//! previous step's own work, timed from "run this step" to the step's end. The CPU time is the
//! step's cgroup's, set-up of its sandbox included.
//! `cargo build --release -p quorum-worker --bin quorum-sandbox-init --example sandbox_overhead
//! && target/release/examples/sandbox_overhead [N]`

use std::time::{Duration, Instant};

use quorum_worker::executor::landlock::INIT_NAME;
use quorum_worker::executor::{
    Executor, JobSpec, JobStart, JobStatus, Limits, ProcessExecutor, SandboxError, SandboxExecutor,
    SpareSlot, StepContext, StepExit, run_job, run_started_job,
};
use tokio_util::sync::CancellationToken;

/// How long the harness waits between the steps of a job: what the previous step's own work
/// would give the spare to get ready in.
const PAUSE: Duration = Duration::from_millis(50);

/// A job of `steps` steps running `true`, in `dir`.
fn true_job(dir: &std::path::Path, steps: usize) -> JobSpec {
    let job = JobSpec {
        build_dir: dir.join("src"),
        tmp_dir: dir.join("tmp"),
        source_date_epoch: 0,
        script: vec!["true".into(); steps],
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

/// Like [`measure`], with the first step's sandbox started [`PAUSE`] before the job is run, as
/// the worker starts it before it exports the source; timed from the `run_started_job` call.
async fn measure_prepared(executor: &dyn Executor, job: &JobSpec) -> (Duration, Duration) {
    let start = JobStart::new().expect("cannot create a pipe");
    start.prepare(executor, job).await;
    tokio::time::sleep(PAUSE).await;
    let (tx, mut rx) = tokio::sync::mpsc::channel(16);
    let drain = tokio::spawn(async move { while rx.recv().await.is_some() {} });
    let started = Instant::now();
    let outcome = run_started_job(executor, job, start, tx, &CancellationToken::new())
        .await
        .expect("the executor failed");
    let took = started.elapsed();
    assert_eq!(outcome.status, JobStatus::Succeeded);
    drain.await.expect("the log drain panicked");
    (took, outcome.cpu)
}

/// Runs the steps of `job` one by one through `executor.run_step`, with [`PAUSE`] between them,
/// and returns each step's wall time (from the call to its end) and CPU time.
async fn steps_with_spares(executor: &dyn Executor, job: &JobSpec) -> Vec<(Duration, Duration)> {
    let (mut reader, writer) = std::io::pipe().expect("cannot create a pipe");
    let drain = std::thread::spawn(move || std::io::copy(&mut reader, &mut std::io::sink()));
    let cancel = CancellationToken::new();
    let spare = SpareSlot::default();
    let deadline = tokio::time::Instant::now() + job.timeout;
    let mut took = Vec::new();
    for (i, command) in job.script.iter().enumerate() {
        if i > 0 {
            tokio::time::sleep(PAUSE).await;
        }
        let started = Instant::now();
        let run = executor
            .run_step(StepContext {
                job,
                index: i + 1,
                command,
                output: &writer,
                deadline,
                cancel: &cancel,
                spare: &spare,
            })
            .await
            .expect("the executor failed");
        took.push((started.elapsed(), run.cpu));
        assert_eq!(run.exit, StepExit::Exited(0));
    }
    spare.discard().await;
    drop(writer);
    drain
        .join()
        .expect("the drain panicked")
        .expect("cannot drain the output");
    took
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
    let job = true_job(dir.path(), 1);
    let three = tempfile::tempdir().expect("cannot create a temporary directory");
    let job3 = true_job(three.path(), 3);
    let bare_args = bare_bwrap_args();
    // Interleaved, so that load coming and going on a shared machine meets every kind alike.
    let (mut plain, mut bare) = (Vec::new(), Vec::new());
    let (mut cold, mut cold_cpu) = (Vec::new(), Vec::new());
    let (mut prepared, mut prepared_cpu) = (Vec::new(), Vec::new());
    let mut in_job: [(Vec<Duration>, Vec<Duration>); 3] = Default::default();
    for _ in 0..n {
        plain.push(measure(&ProcessExecutor, &job).await.0);
        let (wall, used) = measure(&sandbox, &job).await;
        cold.push(wall);
        cold_cpu.push(used);
        bare.push(bare_bwrap(&bare_args));
        let (wall, used) = measure_prepared(&sandbox, &job).await;
        prepared.push(wall);
        prepared_cpu.push(used);
        for (i, (wall, used)) in steps_with_spares(&sandbox, &job3)
            .await
            .into_iter()
            .enumerate()
        {
            in_job[i].0.push(wall);
            in_job[i].1.push(used);
        }
    }
    let (bm, bmed) = stats(&mut bare);
    let (pm, pmed) = stats(&mut plain);
    let (sm, smed) = stats(&mut cold);
    let (cm, cmed) = stats(&mut cold_cpu);
    println!("steps: {n} x `true`; sandbox: {}", sandbox.description());
    println!("process:    mean {pm:.2} ms, median {pmed:.2} ms");
    println!("bare bwrap: mean {bm:.2} ms, median {bmed:.2} ms");
    println!("namespaces, one-step job (no spare): mean {sm:.2} ms, median {smed:.2} ms");
    println!("  CPU time of the step's cgroup: mean {cm:.2} ms, median {cmed:.2} ms");
    println!(
        "  ratio to bare bwrap: mean {:.2}, median {:.2}",
        sm / bm,
        smed / bmed
    );
    let (wm, wmed) = stats(&mut prepared);
    let (um, umed) = stats(&mut prepared_cpu);
    println!(
        "namespaces, one-step job, sandbox started {} ms ahead: mean {wm:.2} ms, median {wmed:.2} ms",
        PAUSE.as_millis()
    );
    println!("  CPU time of the step's cgroup: mean {um:.2} ms, median {umed:.2} ms");
    let names = [
        "step 1 of 3 (no spare; starts step 2's)",
        "step 2 of 3 (spare ready; starts step 3's)",
        "step 3 of 3 (spare ready)",
    ];
    for (name, (walls, cpus)) in names.iter().zip(in_job.iter_mut()) {
        let (wm, wmed) = stats(walls);
        let (um, umed) = stats(cpus);
        println!("namespaces, {name}: mean {wm:.2} ms, median {wmed:.2} ms");
        println!("  CPU time of the step's cgroup: mean {um:.2} ms, median {umed:.2} ms");
    }
}
