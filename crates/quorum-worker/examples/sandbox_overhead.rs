//! Start-up overhead per step: runs N `true` steps through the process and the namespace
//! executors and prints the mean and median milliseconds per step and their ratio.
//! `cargo run --release -p quorum-worker --example sandbox_overhead [N]`

use std::time::{Duration, Instant};

use quorum_worker::executor::{
    Executor, JobSpec, JobStatus, Limits, ProcessExecutor, SandboxExecutor, run_job,
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
        nice: None,
    };
    let sandbox = match SandboxExecutor::new(state.path(), limits) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1);
        }
    };
    let mut plain = measure(&ProcessExecutor, n).await;
    let mut boxed = measure(&sandbox, n).await;
    let (pm, pmed) = stats(&mut plain);
    let (sm, smed) = stats(&mut boxed);
    println!(
        "steps: {n} x `true`; sandbox cgroups: {:?}",
        sandbox.cgroups()
    );
    println!("process:    mean {pm:.2} ms, median {pmed:.2} ms");
    println!("namespaces: mean {sm:.2} ms, median {smed:.2} ms");
    println!(
        "ratio (namespaces / process): mean {:.2}, median {:.2}",
        sm / pm,
        smed / pmed
    );
}
