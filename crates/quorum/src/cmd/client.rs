//! The user's commands against a running controller, and the pieces `run` shares with them:
//! waiting with progress, printing a verdict, fetching and checking artifacts.

use std::io::IsTerminal as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use base64::Engine as _;
use quorum_api::v1::controller::{
    AssignmentPurpose, BuildState, BuildStatus, JobState, UsageTotals,
};
use quorum_client::user::UserClient;
use quorum_core::Digest;
use quorum_core::attest;
use quorum_core::verdict::Outcome;

use super::ControllerConn;

fn client(conn: &ControllerConn) -> UserClient {
    UserClient::new(&conn.controller, &conn.token)
}

/// Absolute path for local repositories, so the controller and workers find the same one.
pub fn normalize_repository(repository: &str) -> String {
    let p = Path::new(repository);
    if !repository.contains("://")
        && p.exists()
        && let Ok(abs) = std::fs::canonicalize(p)
    {
        return abs.display().to_string();
    }
    repository.to_string()
}

pub async fn submit(
    conn: &ControllerConn,
    repository: &str,
    rev: &str,
    wait: bool,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let c = client(conn);
    let created = c.submit(&normalize_repository(repository), rev).await?;
    if !wait {
        if json {
            println!("{}", serde_json::to_string_pretty(&created)?);
        } else {
            println!("build {} at commit {}", created.build_id, created.commit);
        }
        return Ok(ExitCode::SUCCESS);
    }
    let status = wait_for(&c, &created.build_id, Duration::from_secs(24 * 3600)).await?;
    report(&status, json)?;
    Ok(exit_for(&status))
}

pub async fn status(conn: &ControllerConn, build: &str, json: bool) -> anyhow::Result<ExitCode> {
    let status = client(conn).status(build).await?;
    report(&status, json)?;
    Ok(ExitCode::SUCCESS)
}

pub async fn logs(
    conn: &ControllerConn,
    build: &str,
    job: Option<&str>,
    follow: bool,
) -> anyhow::Result<ExitCode> {
    use std::io::Write as _;
    let c = client(conn);
    let status = c.status(build).await?;
    if let Some(job) = job
        && !status.jobs.iter().any(|j| j.name == job)
    {
        bail!("build {build} has no job `{job}`");
    }
    let mut out = std::io::stdout().lock();
    let mut offsets: std::collections::BTreeMap<String, u64> = Default::default();
    let deadline = Instant::now() + Duration::from_secs(24 * 3600);
    loop {
        let status = c.status(build).await?;
        let mut all_complete = status.state.is_final();
        for j in status
            .jobs
            .iter()
            .filter(|j| job.is_none_or(|n| n == j.name))
        {
            for a in &j.assignments {
                let offset = offsets.entry(a.id.clone()).or_insert(0);
                let (bytes, complete) = c.log(&a.id, *offset).await?;
                if !bytes.is_empty() {
                    if *offset == 0 {
                        writeln!(out, "==> {} on {} ({}) <==", j.name, a.worker, a.owner)?;
                    }
                    out.write_all(&bytes)?;
                    *offset += bytes.len() as u64;
                }
                all_complete &= complete;
            }
        }
        out.flush()?;
        if !follow || all_complete || Instant::now() > deadline {
            return Ok(ExitCode::SUCCESS);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

pub async fn approve(conn: &ControllerConn, build: &str, job: &str) -> anyhow::Result<ExitCode> {
    client(conn).approve(build, job).await?;
    println!("job `{job}` of build {build} is approved");
    Ok(ExitCode::SUCCESS)
}

pub async fn rebuild(
    conn: &ControllerConn,
    trusted: bool,
    build: &str,
    job: &str,
) -> anyhow::Result<ExitCode> {
    if !trusted {
        bail!(
            "only a trusted worker's rebuild can break a tie; run `quorum rebuild --trusted {build} {job}`"
        );
    }
    client(conn).rebuild_trusted(build, job).await?;
    println!(
        "a trusted rebuild of job `{job}` of build {build} is requested; `quorum status {build}` follows it"
    );
    Ok(ExitCode::SUCCESS)
}

pub async fn review_list(conn: &ControllerConn, all: bool, json: bool) -> anyhow::Result<ExitCode> {
    let list = client(conn).review_list(all).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(ExitCode::SUCCESS);
    }
    if list.flags.is_empty() {
        println!("no {}review flags", if all { "" } else { "open " });
    }
    for f in &list.flags {
        print_flag(f);
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn review_clear(
    conn: &ControllerConn,
    flag: &str,
    note: &str,
) -> anyhow::Result<ExitCode> {
    client(conn).review_clear(flag, note).await?;
    println!("review flag {flag} is cleared");
    Ok(ExitCode::SUCCESS)
}

fn print_flag(f: &quorum_api::v1::controller::ReviewFlag) {
    let e = &f.evidence;
    let state = match (&f.cleared_at, &f.cleared_note) {
        (Some(at), note) => format!("cleared {at}: {}", note.as_deref().unwrap_or_default()),
        (None, _) => format!("open since {}", f.created_at),
    };
    println!(
        "flag {} on build {} job `{}` ({state})",
        f.id, f.build_id, f.job
    );
    println!("    {}", f.reason);
    println!(
        "    evidence: job `{}` of build {} verified as {} by {}; trusted worker {} produced {}",
        e.checked_job,
        e.checked_build,
        e.checked_manifest,
        e.checked_workers.join(", "),
        e.trusted_worker,
        match &e.trusted_outcome {
            Outcome::Success { manifest } => manifest.to_string(),
            Outcome::Failed => "a failure".into(),
        }
    );
}

pub async fn usage(
    conn: &ControllerConn,
    tenant: Option<&str>,
    builds: u32,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let view = client(conn).usage(tenant, builds).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&view)?);
        return Ok(ExitCode::SUCCESS);
    }
    let row = |name: &str, t: &UsageTotals| {
        format!(
            "{name:<34} {:>7} {:>10.1} {:>10.1} {:>10} {:>12}",
            t.results,
            t.wall_ms as f64 / 1000.0,
            t.cpu_ms as f64 / 1000.0,
            t.peak_rss_kib / 1024,
            t.bytes_uploaded
        )
    };
    let header = format!(
        "{:>7} {:>10} {:>10} {:>10} {:>12}",
        "results", "wall s", "cpu s", "peak MiB", "bytes up"
    );
    println!("{:<34} {header}", "TENANT (builds)");
    for t in &view.tenants {
        println!(
            "{}",
            row(&format!("{} ({})", t.tenant, t.builds), &t.totals)
        );
    }
    println!("\n{:<34} {header}", "BUILD (tenant, state)");
    for b in &view.builds {
        let name = format!("{} ({}, {})", b.build_id, b.tenant, b.state.as_str());
        println!("{}", row(&name, &b.totals));
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn cancel(conn: &ControllerConn, build: &str) -> anyhow::Result<ExitCode> {
    client(conn).cancel(build).await?;
    println!("build {build} is being cancelled");
    Ok(ExitCode::SUCCESS)
}

pub async fn fetch(conn: &ControllerConn, build: &str, out: &Path) -> anyhow::Result<ExitCode> {
    let c = client(conn);
    let files = fetch_verified(&c, build, out).await?;
    println!("{} verified artifacts in {}", files.len(), out.display());
    Ok(ExitCode::SUCCESS)
}

/// Polls the controller until the build is final, showing progress on a terminal.
pub async fn wait_for(
    c: &UserClient,
    build: &str,
    timeout: Duration,
) -> anyhow::Result<BuildStatus> {
    let bar = if std::io::stderr().is_terminal() {
        let b = indicatif::ProgressBar::new_spinner();
        b.enable_steady_tick(Duration::from_millis(120));
        Some(b)
    } else {
        None
    };
    let started = Instant::now();
    let mut last_line = String::new();
    loop {
        let status = c.status(build).await?;
        let line = status
            .jobs
            .iter()
            .map(|j| format!("{}: {} ({})", j.name, state_word(j.state), j.detail))
            .collect::<Vec<_>>()
            .join(" | ");
        if line != last_line {
            match &bar {
                Some(b) => b.set_message(line.clone()),
                None => eprintln!("[{:>5.1}s] {line}", started.elapsed().as_secs_f64()),
            }
            last_line = line.clone();
        }
        if status.state.is_final() {
            if let Some(b) = bar {
                b.finish_and_clear();
            }
            return Ok(status);
        }
        if started.elapsed() > timeout {
            if let Some(b) = bar {
                b.finish_and_clear();
            }
            bail!(
                "build {build} did not finish within {} s; last state: {line}",
                timeout.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn state_word(s: JobState) -> &'static str {
    match s {
        JobState::Queued => "queued",
        JobState::Running => "running",
        JobState::Provisional => "provisional",
        JobState::Verified => "verified",
        JobState::Disputed => "disputed",
        JobState::Failed => "failed",
        JobState::Skipped => "skipped",
        JobState::Cancelled => "cancelled",
    }
}

pub fn exit_for(status: &BuildStatus) -> ExitCode {
    if status.state == BuildState::Verified {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// Prints a build's verdict: per job, who produced what.
pub fn report(status: &BuildStatus, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(status)?);
        return Ok(());
    }
    println!("build {}: {}", status.id, status.state.as_str());
    println!("  source {} at {}", status.repository, status.commit);
    for j in &status.jobs {
        println!(
            "  job {}: {} (quorum {}, trusted {}): {}",
            j.name,
            state_word(j.state),
            j.policy.quorum,
            j.policy.trusted,
            j.detail
        );
        for a in &j.assignments {
            let what = match &a.outcome {
                Some(Outcome::Success { manifest }) => manifest.to_string(),
                Some(Outcome::Failed) => {
                    format!("failed: {}", a.detail.clone().unwrap_or_default())
                }
                None => format!(
                    "{}{}",
                    a.state,
                    a.detail
                        .as_ref()
                        .map(|d| format!(": {d}"))
                        .unwrap_or_default()
                ),
            };
            let purpose = match a.purpose {
                AssignmentPurpose::Quorum => "",
                AssignmentPurpose::TieBreak => " (tie-break)",
                AssignmentPurpose::SpotCheck => " (spot check)",
            };
            println!(
                "    {:<12} {:<10} {:<8} {}{purpose}",
                a.worker,
                a.owner,
                if a.trusted { "trusted" } else { "" },
                what
            );
        }
        if !j.differing_paths.is_empty() {
            println!("    differing files: {}", j.differing_paths.join(", "));
        }
        match &j.dispute_report {
            Some(r) if r.ready => println!(
                "    diff report ({}): quorum diff {} {}",
                r.tool.as_deref().unwrap_or_default(),
                status.id,
                j.name
            ),
            Some(_) => println!("    diff report: being prepared"),
            None => {}
        }
    }
    for r in &status.rebuilds {
        println!("  trusted rebuild of {}: {}: {}", r.job, r.state, r.detail);
    }
    for c in &status.spot_checks {
        println!(
            "  spot check of {}: {} (draw {} against rate {} per million){}",
            c.job,
            c.state,
            c.draw,
            c.rate_ppm,
            if c.detail.is_empty() {
                String::new()
            } else {
                format!(": {}", c.detail)
            }
        );
    }
    for f in &status.flags {
        print_flag(f);
    }
    Ok(())
}

/// Downloads the verified artifacts of `build` into `out/<job>/<path>`, with the signed
/// statement, its verification summary (both checked by `quorum_client::verify::check_build`,
/// so a build whose summary does not say PASSED for it is refused), the key that signed it (`signer.pub`) and every key the controller publishes
/// (`signer-keys.json`, for `quorum verify --key`) beside them. Every file is checked against
/// its digest and against the statement before it is kept.
pub async fn fetch_verified(
    c: &UserClient,
    build: &str,
    out: &Path,
) -> anyhow::Result<Vec<PathBuf>> {
    let envelope = c.statement(build).await?;
    let summary = c
        .summary(build)
        .await
        .context("cannot get the build's verification summary")?;
    let published = c.signer_keys().await?;
    let keys = signer_keys(&published).context("the controller's signer keys")?;
    // Any published key will do (statements signed before a rotation name a retired key); a
    // revoked key is not published, so its statements are refused here. The summary must say
    // the policy was met, for this build and this provenance.
    let checked = quorum_client::verify::check_build(build, &envelope, &summary, &keys)
        .context("refusing the build's artifacts")?;
    let signed_by = envelope
        .signatures
        .iter()
        .find_map(|s| published.keys.get(&s.keyid))
        .cloned()
        .unwrap_or_default();
    let subjects = checked.subjects;
    let list = c.artifacts(build).await?;
    let store = quorum_client::store::StoreClient::new(&list.store_url);
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut written = Vec::new();
    for a in &list.artifacts {
        let name = format!("{}/{}", a.job, a.path);
        if !subjects
            .iter()
            .any(|s| s.name == name && s.digest.sha256 == a.digest.hex())
        {
            bail!(
                "artifact {name} ({}) is not in the signed statement; refusing it",
                a.digest
            );
        }
        quorum_core::names::check_relative_path(&name)?;
        let bytes = store.get_blob(&list.read_token, build, &a.digest).await?;
        let got = Digest::of(&bytes);
        if got != a.digest {
            bail!(
                "artifact {name} from the store has digest {got}, expected {}; refusing it",
                a.digest
            );
        }
        let dest = out.join(&name);
        write_file(&dest, &bytes, a.mode)?;
        written.push(dest);
    }
    quorum_service::write_private(
        &out.join("statement.intoto.json"),
        &serde_json::to_vec_pretty(&envelope)?,
    )?;
    quorum_service::write_private(
        &out.join("summary.intoto.json"),
        &serde_json::to_vec_pretty(&summary)?,
    )?;
    std::fs::write(out.join("signer.pub"), format!("{signed_by}\n"))?;
    std::fs::write(
        out.join("signer-keys.json"),
        serde_json::to_vec_pretty(&published)?,
    )?;
    Ok(written)
}

fn write_file(dest: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    if let Some(dir) = dest.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = dest.with_extension("part");
    std::fs::write(&tmp, bytes).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode & 0o777))?;
    std::fs::rename(&tmp, dest)
        .with_context(|| format!("cannot move {} into place", dest.display()))?;
    Ok(())
}

/// Every key of a signer's published set, each checked to be the key its id names.
fn signer_keys(
    published: &quorum_api::v1::controller::SignerKeys,
) -> anyhow::Result<Vec<ed25519_dalek::VerifyingKey>> {
    published
        .keys
        .iter()
        .map(|(id, b64)| {
            let key = parse_key(b64).with_context(|| format!("key {id}"))?;
            anyhow::ensure!(
                attest::key_id(&key) == *id,
                "key {id} is published under another key's id"
            );
            Ok(key)
        })
        .collect()
}

/// A `--key` file: base64 of one raw Ed25519 key (`signer.pub`), or the JSON key set a
/// controller publishes at `/api/v1/signer/keys` (`signer-keys.json`).
fn read_keys(path: &Path) -> anyhow::Result<Vec<ed25519_dalek::VerifyingKey>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read key {}", path.display()))?;
    let keys = if text.trim_start().starts_with('{') {
        let published: quorum_api::v1::controller::SignerKeys = serde_json::from_str(&text)
            .context("not a signer key set (the JSON of /api/v1/signer/keys)")?;
        signer_keys(&published)?
    } else {
        vec![parse_key(&text)?]
    };
    anyhow::ensure!(!keys.is_empty(), "the key set is empty");
    Ok(keys)
}

fn parse_key(b64: &str) -> anyhow::Result<ed25519_dalek::VerifyingKey> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .context("the public key is not base64")?;
    let arr: [u8; 32] = bytes
        .try_into()
        .map_err(|_| anyhow::anyhow!("the public key is not 32 bytes"))?;
    ed25519_dalek::VerifyingKey::from_bytes(&arr).context("the public key is not an Ed25519 key")
}

/// `quorum verify`: exit 0 when the statement's signature verifies with the key and the
/// artifact's SHA-256 is one of its subjects (under `name`, if given); 1 otherwise.
pub fn verify(
    statement: &Path,
    key: &Path,
    name: Option<&str>,
    artifact: &Path,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let keys = read_keys(key).with_context(|| format!("key file {}", key.display()))?;
    let env_text = std::fs::read(statement)
        .with_context(|| format!("cannot read statement {}", statement.display()))?;
    let envelope: attest::Envelope = serde_json::from_slice(&env_text)
        .with_context(|| format!("{} is not a DSSE envelope", statement.display()))?;
    let bytes = std::fs::read(artifact)
        .with_context(|| format!("cannot read artifact {}", artifact.display()))?;
    let digest = Digest::of(&bytes);
    let outcome = attest::verify_envelope_with_any(&envelope, &keys).and_then(|s| {
        let subjects = attest::subjects(&s)?;
        subjects
            .into_iter()
            .find(|s| s.digest.sha256 == digest.hex() && name.is_none_or(|n| n == s.name))
            .ok_or(attest::VerifyError::NotASubject {
                digest: digest.to_string(),
            })
    });
    let ok = outcome.is_ok();
    if json {
        let v = match &outcome {
            Ok(s) => {
                serde_json::json!({"verified": true, "subject": s.name, "digest": digest.to_string()})
            }
            Err(e) => {
                serde_json::json!({"verified": false, "error": e.to_string(), "digest": digest.to_string()})
            }
        };
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        match &outcome {
            Ok(s) => println!("verified: {} is {} ({digest})", artifact.display(), s.name),
            Err(e) => eprintln!("NOT verified: {}: {e}", artifact.display()),
        }
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
