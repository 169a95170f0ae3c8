//! Wall-time ratio of a real C build through the namespace sandbox against the same build run
//! directly: generates a project (a Makefile and 48 C files, the same bytes every time), then
//! alternates `make -j2` on the host and `make -j2` as one sandboxed step, each in a fresh copy,
//! and prints the medians and their ratio.
//! `cargo build --release -p quorum-worker --bins --examples &&
//! target/release/examples/sandbox_build_ratio [ROUNDS]`

use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use quorum_worker::executor::landlock::INIT_NAME;
use quorum_worker::executor::{
    Executor as _, JobSpec, JobStatus, Limits, SandboxExecutor, run_job,
};
use tokio_util::sync::CancellationToken;

const FILES: usize = 48;
const FUNCTIONS: usize = 12;

/// Writes the project into `dir`: `unit<i>.c` with arithmetic the optimiser has to work through,
/// `main.c` calling every unit, and a Makefile with one object per unit.
fn generate(dir: &Path) {
    std::fs::create_dir_all(dir).expect("cannot create the project directory");
    let mut main = String::from("#include <stdint.h>\n#include <stdio.h>\n");
    for i in 0..FILES {
        let mut unit = String::from("#include <stdint.h>\n");
        for f in 0..FUNCTIONS {
            let _ = write!(
                unit,
                "uint64_t u{i}_f{f}(uint64_t x) {{\n  uint64_t a = x ^ {k}u;\n  \
                 for (int r = 0; r < {rounds}; r++) {{\n    a = a * 6364136223846793005u + {k}u;\n    \
                 a ^= a >> {shift};\n    if (a & 1) a += u{i}_f{prev}(a >> 3); else a -= {k}u;\n  }}\n  \
                 return a;\n}}\n",
                k = (i * 7919 + f * 104729) % 1_000_003,
                rounds = 3 + f % 5,
                shift = 7 + f % 13,
                prev = f.saturating_sub(1),
            );
            if f == 0 {
                // The first function must not call itself forever.
                unit = unit.replace(&format!("u{i}_f0(a >> 3)"), "(a >> 3)");
            }
        }
        let _ = writeln!(
            unit,
            "uint64_t unit{i}(uint64_t x) {{ return u{i}_f{}(x); }}",
            FUNCTIONS - 1
        );
        std::fs::write(dir.join(format!("unit{i}.c")), unit).expect("cannot write a unit");
        let _ = writeln!(main, "uint64_t unit{i}(uint64_t);");
    }
    main.push_str("int main(void) {\n  uint64_t s = 0;\n");
    for i in 0..FILES {
        let _ = writeln!(main, "  s += unit{i}(s + {i});");
    }
    main.push_str("  printf(\"%llu\\n\", (unsigned long long)s);\n  return 0;\n}\n");
    std::fs::write(dir.join("main.c"), main).expect("cannot write main.c");
    let objects: Vec<String> = (0..FILES).map(|i| format!("unit{i}.o")).collect();
    let makefile = format!(
        "CFLAGS = -O2 -g\nOBJS = main.o {}\n\nprogram: $(OBJS)\n\t$(CC) -o $@ $(OBJS)\n\n\
         %.o: %.c\n\t$(CC) $(CFLAGS) -c -o $@ $<\n",
        objects.join(" ")
    );
    std::fs::write(dir.join("Makefile"), makefile).expect("cannot write the Makefile");
}

/// `make -j2` run directly in `dir`.
#[allow(clippy::disallowed_methods)] // the baseline is the build without the worker
fn direct(dir: &Path) -> Duration {
    let started = Instant::now();
    let status = std::process::Command::new("make")
        .args(["-s", "-j2"])
        .current_dir(dir)
        .status()
        .expect("cannot run make");
    assert!(status.success(), "the direct build failed");
    started.elapsed()
}

/// `make -j2` as one sandboxed step, timed around the whole `run_job` (sandbox setup included).
async fn sandboxed(sandbox: &SandboxExecutor, dir: &Path) -> Duration {
    let job = JobSpec {
        build_dir: dir.join("src"),
        tmp_dir: dir.join("tmp"),
        source_date_epoch: 1_600_000_000,
        script: vec!["make -s -j2".into()],
        timeout: Duration::from_secs(600),
        inputs: Vec::new(),
    };
    let (tx, mut rx) = tokio::sync::mpsc::channel(16);
    let drain = tokio::spawn(async move { while rx.recv().await.is_some() {} });
    let started = Instant::now();
    let outcome = run_job(sandbox, &job, tx, &CancellationToken::new())
        .await
        .expect("the executor failed");
    let took = started.elapsed();
    drain.await.expect("the log drain panicked");
    assert_eq!(outcome.status, JobStatus::Succeeded);
    took
}

fn median(times: &mut [Duration]) -> f64 {
    times.sort();
    times[times.len() / 2].as_secs_f64()
}

#[tokio::main]
async fn main() {
    let rounds: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse().expect("ROUNDS must be a number"))
        .unwrap_or(5);
    let state = tempfile::tempdir().expect("cannot create a temporary directory");
    let mut sandbox = SandboxExecutor::new(state.path(), Limits::default())
        .unwrap_or_else(|e| panic!("no sandbox here: {e}"));
    let init = std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.parent()?.join(INIT_NAME)));
    if let Some(init) = init.filter(|p| p.is_file()) {
        sandbox = sandbox.with_init(&init).expect("the Landlock helper works");
    }
    let work = tempfile::tempdir().expect("cannot create a temporary directory");
    let (mut host, mut boxed) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let (a, b) = (
            work.path().join(format!("h{round}")),
            work.path().join(format!("s{round}")),
        );
        generate(&a);
        generate(&b.join("src"));
        // Alternate which goes first, so neither always meets a warm or a cold cache.
        if round % 2 == 0 {
            host.push(direct(&a));
            boxed.push(sandboxed(&sandbox, &b).await);
        } else {
            boxed.push(sandboxed(&sandbox, &b).await);
            host.push(direct(&a));
        }
    }
    let (h, s) = (median(&mut host), median(&mut boxed));
    println!("project: {FILES} C files + main.c, make -j2, {rounds} rounds each");
    println!("sandbox: {}", sandbox.description());
    println!("direct:    median {h:.3} s");
    println!("sandboxed: median {s:.3} s");
    println!("ratio (sandboxed / direct): {:.3}", s / h);
}
