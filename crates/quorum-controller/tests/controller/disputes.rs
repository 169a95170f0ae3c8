//! Explained disputes through the real protocol, on SQLite and on PostgreSQL: simulated workers
//! upload different files to the real store and report them; the controller fetches the
//! differing files back with its own read token and explains the difference, with the built-in
//! diff or with diffoscope in its sandbox. Fake `diffoscope` scripts play the adversary (one
//! that probes the sandbox, one that overruns its time limit and leaves children behind).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::bounded;
use crate::support::{Backend, Stack};
use quorum_api::v1::controller::{BuildState, DIFF_TOOL_BUILTIN, DIFF_TOOL_DIFFOSCOPE, JobState};

on_both_backends!(
    the_builtin_diff_explains_text_binary_and_missing_files,
    diffoscope_explains_the_dispute_from_its_sandbox,
    diffoscope_cannot_read_the_controllers_data_or_reach_the_network,
    diffoscope_past_its_time_limit_is_killed_and_the_builtin_diff_stands_in,
    a_report_interrupted_by_a_restart_is_finished_and_then_kept,
);

const ONE_JOB: &str = "jobs:\n  build:\n    script: [\"true\"]\n    artifacts: [out.txt]\n";

/// Restarts the stack's controller with a changed `[project.disputes]`.
async fn reconfigure(
    stack: &mut Stack,
    change: impl FnOnce(&mut quorum_controller::DisputesConfig),
) {
    stack.stop_controller().await;
    change(&mut stack.config.project.disputes);
    stack.start_controller().await;
}

/// A build whose one job two workers of different owners dispute, each reporting its `files`.
async fn dispute(stack: &Stack, a: &[(&str, &[u8])], b: &[(&str, &[u8])]) -> String {
    let wa = stack.worker("a1", "alice", false).await;
    let wb = stack.worker("b1", "bob", false).await;
    let build = stack.submit(ONE_JOB).await;
    let (ta, tb) = tokio::join!(wa.take(), wb.take());
    wa.succeed_with_files(&ta, a).await;
    wb.succeed_with_files(&tb, b).await;
    let done = stack
        .wait_build(&build, "the dispute", |s| s.state.is_final())
        .await;
    assert_eq!(done.state, BuildState::Disputed, "{done:#?}");
    assert_eq!(done.jobs[0].state, JobState::Disputed);
    build
}

/// Waits (bounded) for the job's report; returns its text and what produced it.
async fn report(stack: &Stack, build: &str, job: &str) -> (String, String) {
    let user = stack.user();
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        match user.diff(build, job, false).await {
            Ok(report) => return report,
            Err(e) if e.status() == Some(409) && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("no diff report for job `{job}` of build {build}: {e}"),
        }
    }
}

/// `dir/diffoscope`, a shell script standing in for diffoscope.
fn fake_diffoscope(dir: &Path, script: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt as _;
    let path = dir.join("fake").join("diffoscope");
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, format!("#!/bin/sh\n{script}")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// A `sleep` argument no other process on the machine has: processes are found by it.
fn marker() -> String {
    format!("3599.{}", rand::random::<u32>())
}

/// Pids of the processes whose command line contains `marker`.
fn processes_with(marker: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(marker) {
            pids.push(pid);
        }
    }
    pids
}

/// Waits (bounded) until `pred` holds for the processes carrying `marker`.
async fn wait_processes(marker: &str, what: &str, pred: impl Fn(&[u32]) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let pids = processes_with(marker);
        if pred(&pids) {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: processes {pids:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// diffoscope and bubblewrap must be installed for the cases that use them.
fn require_diffoscope() {
    for tool in ["diffoscope", "bwrap"] {
        let found = std::env::var_os("PATH")
            .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()));
        assert!(
            found,
            "`{tool}` is not on PATH: run `source .ci/services.sh` first, which installs \
             diffoscope-minimal (and install bubblewrap)"
        );
    }
}

async fn the_builtin_diff_explains_text_binary_and_missing_files(backend: Backend) {
    let mut stack = Stack::start(backend, 30).await;
    reconfigure(&mut stack, |d| d.diffoscope = String::new()).await;
    let lib_a: Vec<u8> = (0..64).collect();
    let mut lib_b = lib_a.clone();
    lib_b[40] = 0xff;
    let build = dispute(
        &stack,
        &[
            ("lib.bin", &lib_a),
            ("only-a.txt", b"a"),
            ("out.txt", b"alpha\nbeta\ngamma\n"),
            ("same.txt", b"same"),
        ],
        &[
            ("lib.bin", &lib_b),
            ("only-b.txt", b"b"),
            ("out.txt", b"alpha\nBETA\ngamma\n"),
            ("same.txt", b"same"),
        ],
    )
    .await;
    let (text, tool) = report(&stack, &build, "build").await;
    assert_eq!(tool, DIFF_TOOL_BUILTIN, "{text}");
    assert!(text.contains("diffoscope is turned off"), "{text}");
    // Both results' manifests, and each differing path once; the common file is left out.
    let status = stack.user().status(&build).await.unwrap();
    for a in &status.jobs[0].assignments {
        let Some(quorum_core::verdict::Outcome::Success { manifest }) = &a.outcome else {
            panic!("{a:?}");
        };
        assert!(text.contains(&manifest.to_string()), "{text}");
    }
    for path in ["lib.bin", "only-a.txt", "only-b.txt", "out.txt"] {
        assert_eq!(text.matches(&format!("\n== {path}\n")).count(), 1, "{text}");
    }
    assert!(!text.contains("== same.txt"), "{text}");
    // Text: a unified diff (which side is A depends on the digests' order).
    assert!(
        text.contains("-beta\n+BETA\n") || text.contains("-BETA\n+beta\n"),
        "{text}"
    );
    // Binary: the first differing offset, and both sides in hex around it.
    assert!(
        text.contains("first difference at byte offset 40 (0x28)"),
        "{text}"
    );
    assert!(text.contains("2021 2223 2425 2627 2829"), "{text}");
    assert!(text.contains("2021 2223 2425 2627 ff29"), "{text}");
    // A path one result lacks says so.
    let only_a = section(&text, "only-a.txt");
    assert!(only_a.contains("missing (not in this result)"), "{only_a}");
    assert!(only_a.contains(": missing in "), "{only_a}");
    // The status points at the report; the HTML form says the same, escaped, and may not run
    // scripts.
    let job = &status.jobs[0];
    let summary = job
        .dispute_report
        .as_ref()
        .expect("the status names the report");
    assert!(summary.ready);
    assert_eq!(summary.tool.as_deref(), Some(DIFF_TOOL_BUILTIN));
    let html = reqwest::Client::new()
        .get(format!(
            "{}/api/v1/builds/{build}/jobs/build/diff?format=html",
            stack.controller_url
        ))
        .bearer_auth(&stack.api_token)
        .send()
        .await
        .unwrap();
    assert_eq!(html.status(), 200);
    let csp = html.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(csp.contains("default-src 'none'"), "{csp}");
    let html = html.text().await.unwrap();
    assert!(html.starts_with("<!DOCTYPE html>"), "{html}");
    assert!(
        html.contains("first difference at byte offset 40 (0x28)"),
        "{html}"
    );
    assert!(
        html.contains("-beta\n+BETA") || html.contains("-BETA\n+beta"),
        "{html}"
    );
    // Bad requests name what was wrong.
    let user = stack.user();
    let none = user.diff(&build, "nope", false).await.unwrap_err();
    assert_eq!(none.status(), Some(404), "{none}");
    assert!(none.to_string().contains("job `nope`"), "{none}");
    let bad = reqwest::Client::new()
        .get(format!(
            "{}/api/v1/builds/{build}/jobs/build/diff?format=pdf",
            stack.controller_url
        ))
        .bearer_auth(&stack.api_token)
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    assert!(bad.text().await.unwrap().contains("format `pdf`"));
    stack.stop().await;
}

/// The part of a text report about `path`.
fn section<'a>(text: &'a str, path: &str) -> &'a str {
    let start = text
        .find(&format!("\n== {path}\n"))
        .unwrap_or_else(|| panic!("no section for {path}: {text}"));
    let rest = &text[start + 1..];
    let end = rest[3..].find("\n== ").map_or(rest.len(), |i| i + 4);
    &rest[..end]
}

async fn diffoscope_explains_the_dispute_from_its_sandbox(backend: Backend) {
    require_diffoscope();
    let stack = Stack::start(backend, 30).await;
    let build = dispute(
        &stack,
        &[("out.txt", b"alpha\nbeta\ngamma\n")],
        &[("out.txt", b"alpha\nBETA\ngamma\n")],
    )
    .await;
    let (text, tool) = report(&stack, &build, "build").await;
    assert_eq!(tool, DIFF_TOOL_DIFFOSCOPE, "{text}");
    // diffoscope names the files by where the sandbox shows them: by group.
    assert!(text.contains("--- /diff/A/out.txt"), "{text}");
    assert!(text.contains("+++ /diff/B/out.txt"), "{text}");
    assert!(
        text.contains("-beta\n+BETA\n") || text.contains("-BETA\n+beta\n"),
        "{text}"
    );
    let (html, _) = stack.user().diff(&build, "build", true).await.unwrap();
    assert!(html.contains("<iframe sandbox srcdoc=\""), "{html}");
    assert!(html.contains("diffoscope"), "{html}");
    stack.stop().await;
}

async fn diffoscope_cannot_read_the_controllers_data_or_reach_the_network(backend: Backend) {
    require_diffoscope();
    let mut stack = Stack::start(backend, 30).await;
    let data_dir = stack.config.data_dir.clone();
    let canary = format!("CANARY-{}", uuid::Uuid::new_v4().simple());
    std::fs::write(data_dir.join("canary.txt"), &canary).unwrap();
    let port = stack.controller_url.rsplit(':').next().unwrap().to_string();
    let data = data_dir.display();
    // On out.txt it reports what it could reach; on evil.txt it leaves a symlink to the
    // controller's data as its HTML report, hoping the controller reads it back.
    let fake = fake_diffoscope(
        stack.dir.path(),
        &format!(
            r#"text=""; html=""; last=""
while [ $# -gt 0 ]; do
  case "$1" in --text) text="$2"; shift;; --html) html="$2"; shift;; esac
  last="$1"; shift
done
case "$last" in
  */evil.txt) echo evil > "$text"; ln -s '{data}/canary.txt' "$html"; exit 1;;
esac
{{
  echo "fake diffoscope on $last"
  if cat '{data}/canary.txt' 2>/dev/null; then echo "probe: data READABLE"; else echo "probe: data unreadable"; fi
  if cat '{data}/signer.key' >/dev/null 2>&1; then echo "probe: key READABLE"; else echo "probe: key unreadable"; fi
  if python3 -c 'import socket; socket.create_connection(("127.0.0.1", {port}), 2)' 2>/dev/null
  then echo "probe: network REACHABLE"; else echo "probe: network unreachable"; fi
  if touch /usr/probe 2>/dev/null; then echo "probe: /usr WRITABLE"; else echo "probe: /usr read-only"; fi
}} > "$text"
echo '<html><body>fake</body></html>' > "$html"
exit 1
"#
        ),
    );
    reconfigure(&mut stack, |d| d.diffoscope = fake.display().to_string()).await;
    let build = dispute(
        &stack,
        &[("evil.txt", b"one\n"), ("out.txt", b"alpha\n")],
        &[("evil.txt", b"two\n"), ("out.txt", b"beta\n")],
    )
    .await;
    let (text, tool) = report(&stack, &build, "build").await;
    let out = section(&text, "out.txt");
    assert!(out.contains("fake diffoscope on /diff/B/out.txt"), "{text}");
    for probe in [
        "probe: data unreadable",
        "probe: key unreadable",
        "probe: network unreachable",
        "probe: /usr read-only",
    ] {
        assert!(out.contains(probe), "{probe}: {text}");
    }
    // The symlinked report is refused, so that pair falls back to the built-in diff.
    let evil = section(&text, "evil.txt");
    assert!(evil.contains("report.html is not a plain file"), "{evil}");
    assert!(
        evil.contains("-one\n+two\n") || evil.contains("-two\n+one\n"),
        "{evil}"
    );
    assert_eq!(
        tool, DIFF_TOOL_BUILTIN,
        "not every pair came from diffoscope"
    );
    let (html, _) = stack.user().diff(&build, "build", true).await.unwrap();
    assert!(
        !text.contains(&canary) && !html.contains(&canary),
        "{text}\n{html}"
    );
    stack.stop().await;
}

async fn diffoscope_past_its_time_limit_is_killed_and_the_builtin_diff_stands_in(backend: Backend) {
    require_diffoscope();
    let mut stack = Stack::start(backend, 30).await;
    let marker = marker();
    // Children in the background, one in a session of its own, and the script itself asleep.
    let fake = fake_diffoscope(
        stack.dir.path(),
        &format!("sleep {marker} &\nsetsid sleep {marker} &\nsleep {marker}\n"),
    );
    reconfigure(&mut stack, |d| {
        d.diffoscope = fake.display().to_string();
        d.timeout_secs = 2;
    })
    .await;
    let build = dispute(
        &stack,
        &[("out.txt", b"alpha\nbeta\n")],
        &[("out.txt", b"alpha\nBETA\n")],
    )
    .await;
    let (text, tool) = report(&stack, &build, "build").await;
    assert_eq!(tool, DIFF_TOOL_BUILTIN, "{text}");
    assert!(
        text.contains("diffoscope did not finish within 2 s; all its processes were killed"),
        "{text}"
    );
    assert!(
        text.contains("-beta\n+BETA\n") || text.contains("-BETA\n+beta\n"),
        "{text}"
    );
    wait_processes(
        &marker,
        "diffoscope's processes outlive its time limit",
        |p| p.is_empty(),
    )
    .await;
    stack.stop().await;
}

async fn a_report_interrupted_by_a_restart_is_finished_and_then_kept(backend: Backend) {
    require_diffoscope();
    let mut stack = Stack::start(backend, 30).await;
    let marker = marker();
    let fake = fake_diffoscope(stack.dir.path(), &format!("sleep {marker}\n"));
    reconfigure(&mut stack, |d| d.diffoscope = fake.display().to_string()).await;
    let build = dispute(
        &stack,
        &[("out.txt", b"alpha\n")],
        &[("out.txt", b"beta\n")],
    )
    .await;
    // Stopped while diffoscope runs: the run is killed, and the report is still to do.
    wait_processes(&marker, "diffoscope did not start", |p| !p.is_empty()).await;
    stack.stop_controller().await;
    wait_processes(&marker, "diffoscope outlives the controller", |p| {
        p.is_empty()
    })
    .await;
    reconfigure(&mut stack, |d| d.diffoscope = String::new()).await;
    let (text, tool) = report(&stack, &build, "build").await;
    assert_eq!(tool, DIFF_TOOL_BUILTIN, "{text}");
    assert!(
        text.contains("-alpha\n+beta\n") || text.contains("-beta\n+alpha\n"),
        "{text}"
    );
    // Stored with the build: the same report after another restart.
    stack.stop_controller().await;
    stack.start_controller().await;
    assert_eq!(report(&stack, &build, "build").await, (text, tool));
    stack.stop().await;
}
