//! `quorum diff BUILD JOB [--html]`: prints the controller's report explaining a disputed job
//! (diffoscope's, or the built-in file-level diff), waiting briefly while it is prepared.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use quorum_client::ClientError;
use quorum_client::user::UserClient;

use super::ControllerConn;

/// How long to wait for a report the controller is still preparing.
const WAIT: Duration = Duration::from_secs(60);

pub async fn diff(
    conn: &ControllerConn,
    build: &str,
    job: &str,
    html: bool,
) -> anyhow::Result<ExitCode> {
    use std::io::Write as _;
    let client = UserClient::new(&conn.controller, &conn.token);
    let deadline = Instant::now() + WAIT;
    let (report, tool) = loop {
        match client.diff(build, job, html).await {
            Err(e) if is_pending(&e) && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            other => {
                break other.with_context(|| {
                    format!("cannot get the diff report of job `{job}` of build {build}")
                })?;
            }
        }
    };
    if !html {
        eprintln!("explained by {tool}");
    }
    let mut out = std::io::stdout().lock();
    out.write_all(report.as_bytes())?;
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

/// The controller answers 409 while the report is being prepared.
fn is_pending(e: &ClientError) -> bool {
    e.status() == Some(409)
}
