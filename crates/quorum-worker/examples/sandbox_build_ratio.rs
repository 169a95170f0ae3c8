//! Wall-time ratio of a real C build through the namespace sandbox against the same build run
//! directly: generates a project (a Makefile and 48 C files, the same bytes every time), then runs
//! rounds of `make -j2` on the host, as one sandboxed step without the Landlock init, and as one
//! sandboxed step with every layer, each in a fresh copy, in an order that rotates from round to
//! round. A round's ratio compares builds run back to back, so load that comes and goes on a
//! shared machine moves both sides of it; the median ratio and its spread over the rounds are
//! printed.
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

/// One build's wall time and the CPU time (user and system) of all its processes. The CPU time
/// is what the sandbox's layers would add to per system call or path lookup; unlike the wall
/// time it does not grow when other work on the machine takes the CPUs away.
#[derive(Debug, Clone, Copy)]
struct Took {
    wall: Duration,
    cpu: Duration,
}

/// User plus system time of this process's waited-for descendants so far: `cutime` and `cstime`
/// of /proc/self/stat, in the kernel's USER_HZ (100 per second on every Linux architecture).
fn children_cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("cannot read /proc/self/stat");
    // Fields after the command name, which ends at the last ')': state is field 3, cutime 16.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .expect("/proc/self/stat has a command name")
        .1
        .split_whitespace()
        .collect();
    let ticks = |field: usize| -> u64 {
        fields[field - 3]
            .parse()
            .expect("/proc/self/stat has numeric times")
    };
    Duration::from_millis((ticks(16) + ticks(17)) * 10)
}

/// `make -j2` run directly in `dir`; make waits for every compiler it starts, so their CPU time
/// is in its own.
#[allow(clippy::disallowed_methods)] // the baseline is the build without the worker
fn direct(dir: &Path) -> Took {
    let (started, cpu) = (Instant::now(), children_cpu());
    let status = std::process::Command::new("make")
        .args(["-s", "-j2"])
        .current_dir(dir)
        .status()
        .expect("cannot run make");
    assert!(status.success(), "the direct build failed");
    Took {
        wall: started.elapsed(),
        cpu: children_cpu() - cpu,
    }
}

/// `make -j2` as one sandboxed step, timed around the whole `run_job` (sandbox setup included);
/// the CPU time is the step's cgroup's, bubblewrap and the init included.
async fn sandboxed(sandbox: &SandboxExecutor, dir: &Path) -> Took {
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
    Took {
        wall: took,
        cpu: outcome.cpu,
    }
}

/// The median and the lowest and highest of `values`.
fn spread(values: &mut [f64]) -> (f64, f64, f64) {
    values.sort_by(f64::total_cmp);
    (
        values[values.len() / 2],
        values[0],
        values[values.len() - 1],
    )
}

#[tokio::main]
async fn main() {
    let rounds: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse().expect("ROUNDS must be a number"))
        .unwrap_or(7);
    let new = |name: &str| {
        let state = tempfile::tempdir().expect("cannot create a temporary directory");
        let sandbox = SandboxExecutor::new(state.path(), Limits::default())
            .unwrap_or_else(|e| panic!("no sandbox here ({name}): {e}"));
        (state, sandbox)
    };
    let (_bare_state, bare) = new("without Landlock");
    let (_full_state, mut full) = new("every layer");
    let init = std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.parent()?.join(INIT_NAME)))
        .filter(|p| p.is_file())
        .expect("build quorum-sandbox-init first: cargo build --release -p quorum-worker --bins");
    full = full.with_init(&init).expect("the Landlock helper works");

    let work = tempfile::tempdir().expect("cannot create a temporary directory");
    const KINDS: [&str; 3] = ["direct", "sandbox without Landlock", "sandbox, every layer"];
    let mut times: [Vec<Took>; 3] = Default::default();
    for round in 0..rounds {
        for k in 0..KINDS.len() {
            // Rotate the order, so no kind always meets a warm or a cold cache or the same
            // neighbour's load.
            let kind = (k + round) % KINDS.len();
            let dir = work.path().join(format!("r{round}-{kind}"));
            let took = match kind {
                0 => {
                    generate(&dir);
                    direct(&dir)
                }
                1 => {
                    generate(&dir.join("src"));
                    sandboxed(&bare, &dir).await
                }
                _ => {
                    generate(&dir.join("src"));
                    sandboxed(&full, &dir).await
                }
            };
            times[kind].push(took);
            let _ = std::fs::remove_dir_all(&dir);
        }
        eprintln!(
            "round {round}: {}",
            times
                .iter()
                .zip(KINDS)
                .map(|(t, k)| format!(
                    "{k} {:.3} s ({:.3} s CPU)",
                    t[round].wall.as_secs_f64(),
                    t[round].cpu.as_secs_f64()
                ))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    println!("project: {FILES} C files + main.c, make -j2, {rounds} rounds");
    println!("sandbox: {}", full.description());
    let wall = |t: &Took| t.wall.as_secs_f64();
    let cpu = |t: &Took| t.cpu.as_secs_f64();
    for (measure, of) in [("wall", &wall as &dyn Fn(&Took) -> f64), ("CPU", &cpu)] {
        for (kind, name) in KINDS.iter().enumerate() {
            let mut values: Vec<f64> = times[kind].iter().map(of).collect();
            let (median, low, high) = spread(&mut values);
            println!("{measure:4} {name:26} median {median:.3} s (min {low:.3}, max {high:.3})");
        }
        for (kind, name) in KINDS.iter().enumerate().skip(1) {
            let mut ratios: Vec<f64> = times[kind]
                .iter()
                .zip(&times[0])
                .map(|(s, d)| of(s) / of(d))
                .collect();
            let (median, low, high) = spread(&mut ratios);
            println!(
                "{measure:4} ratio {name} / direct, per round: median {median:.3} \
                 (min {low:.3}, max {high:.3})"
            );
        }
    }
}
