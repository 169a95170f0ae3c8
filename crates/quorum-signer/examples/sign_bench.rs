//! The signer's benchmark harness: times `Signer::sign_build` over evidence shaped like the
//! controller's throughput benchmark (one build of many no-op jobs), with real worker keys and
//! real signed reports, and prints the median, fastest and slowest of several runs.
//!
//! ```text
//! cargo run --release -p quorum-signer --example sign_bench -- \
//!     [--jobs 1000] [--quorum 1] [--workers 100] [--files 0] [--runs 21]
//! ```
//!
//! `--quorum` results per job, each from another of `--workers` workers (round robin), each
//! report's manifest listing `--files` artifacts. Figures are in docs/benchmarks.md ("Signer").

use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use ed25519_dalek::{Signer as _, SigningKey};
use quorum_api::v1::controller::{EnvironmentFacts, ReportedResult, ResultReport, Usage};
use quorum_api::v1::worker_auth::report_message;
use quorum_core::pipeline::Policy;
use quorum_core::{Digest, Manifest, ManifestEntry};
use quorum_signer::{Evidence, JobEvidence, ResultEvidence, Signer};

struct Args {
    jobs: usize,
    quorum: usize,
    workers: usize,
    files: usize,
    runs: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        jobs: 1000,
        quorum: 1,
        workers: 100,
        files: 0,
        runs: 21,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("`{flag}` needs a value"))?;
        let n: usize = value
            .parse()
            .map_err(|_| format!("`{flag} {value}`: not a whole number"))?;
        match flag.as_str() {
            "--jobs" => args.jobs = n,
            "--quorum" => args.quorum = n,
            "--workers" => args.workers = n,
            "--files" => args.files = n,
            "--runs" => args.runs = n,
            _ => return Err(format!("unknown flag `{flag}`")),
        }
    }
    if args.jobs == 0 || args.quorum == 0 || args.runs == 0 || args.workers < args.quorum {
        return Err("jobs, quorum and runs must be at least 1, and workers at least quorum".into());
    }
    Ok(args)
}

fn evidence(args: &Args) -> Evidence {
    let keys: Vec<SigningKey> = (0..args.workers)
        .map(|i| {
            let mut seed = [0u8; 32];
            seed[..8].copy_from_slice(&(i as u64 + 1).to_le_bytes());
            SigningKey::from_bytes(&seed)
        })
        .collect();
    // What a real worker reports, so each report is as long to parse as one.
    let environment = EnvironmentFacts {
        kernel: "6.8.0-45-generic".into(),
        arch: "x86_64".into(),
        cpus: 2,
        executor: "sandbox".into(),
        cpu_model: "AMD EPYC 7B13".into(),
        sandbox: "namespaces, seccomp, landlock ABI 4, cgroup v2".into(),
        bubblewrap: "bubblewrap 0.9.0".into(),
        os: "Debian GNU/Linux 12 (bookworm)".into(),
        root_fs: Digest::of(b"root").to_string(),
    };
    let jobs = (0..args.jobs)
        .map(|j| {
            let name = format!("j{j}");
            let entries = (0..args.files)
                .map(|f| {
                    let content = format!("{j}/{f}");
                    ManifestEntry {
                        path: format!("out/f{f}"),
                        mode: 0o644,
                        size: content.len() as u64,
                        digest: Digest::of(content.as_bytes()),
                    }
                })
                .collect();
            let manifest = Manifest::new(entries).expect("generated paths are valid");
            let results = (0..args.quorum)
                .map(|q| {
                    let w = (j * args.quorum + q) % args.workers;
                    let (worker, assignment) = (format!("w{w}"), format!("a{j}-{q}"));
                    let report = ResultReport {
                        assignment: assignment.clone(),
                        build_id: "bench".into(),
                        job: name.clone(),
                        worker: worker.clone(),
                        result: ReportedResult::Success {
                            manifest_digest: manifest.digest(),
                            manifest: manifest.clone(),
                        },
                        usage: Usage {
                            wall_ms: 3,
                            cpu_ms: 1,
                            peak_rss_kib: 1800,
                            bytes_uploaded: 0,
                        },
                        environment: environment.clone(),
                    };
                    let report = serde_json::to_string(&report).expect("reports serialize");
                    let signature = keys[w].sign(&report_message(report.as_bytes()));
                    ResultEvidence {
                        assignment,
                        owner: format!("owner-{worker}"),
                        worker,
                        trusted: false,
                        worker_key: keys[w].verifying_key(),
                        report,
                        signature: B64.encode(signature.to_bytes()),
                    }
                })
                .collect();
            JobEvidence {
                name,
                policy: Policy {
                    quorum: args.quorum as u32,
                    trusted: 0,
                },
                results,
                rebuilds: vec![],
            }
        })
        .collect();
    Evidence {
        controller: "http://127.0.0.1:1".into(),
        build_id: "bench".into(),
        repository: "file:///bench".into(),
        commit: "0".repeat(40),
        started_on: "2026-01-01T00:00:00Z".into(),
        finished_on: "2026-01-01T00:00:01Z".into(),
        jobs,
    }
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("sign_bench: {e}");
            std::process::exit(2);
        }
    };
    let dir = tempfile::tempdir().expect("a temporary directory for the signing key");
    let signer =
        Signer::load_or_create(&dir.path().join("signer.key")).expect("a fresh signing key");
    let evidence = evidence(&args);
    // One run unmeasured: page faults and the first thread starts.
    signer.sign_build(&evidence).expect("the evidence signs");
    let mut times: Vec<Duration> = (0..args.runs)
        .map(|_| {
            let started = Instant::now();
            signer.sign_build(&evidence).expect("the evidence signs");
            started.elapsed()
        })
        .collect();
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "sign_build: {} jobs x {} results, {} workers, {} files each, {} runs: median {:.2} ms, min {:.2} ms, max {:.2} ms",
        args.jobs,
        args.quorum,
        args.workers,
        args.files,
        args.runs,
        ms(times[times.len() / 2]),
        ms(times[0]),
        ms(times[times.len() - 1]),
    );
}
