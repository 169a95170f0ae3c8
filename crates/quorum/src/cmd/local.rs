//! `quorum up` and `quorum run`: a whole federation on this machine, one process per role.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use quorum::federation::{Federation, Spec};

use super::client;

fn exe() -> anyhow::Result<PathBuf> {
    std::env::current_exe().context("cannot find the quorum executable to start the roles")
}

pub async fn up(data_dir: &Path, workers: usize) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(workers >= 1, "--workers must be at least 1");
    let mut fed = Federation::start(Spec::local(data_dir, &exe()?, workers)).await?;
    let key = fed.signer_public_key()?;
    std::fs::write(data_dir.join("signer.pub"), format!("{key}\n"))?;
    println!(
        "Quorum is up: IdP {}, store {}, controller {}, {workers} workers",
        fed.idp_url, fed.store_url, fed.controller_url
    );
    println!(
        "Logs and state are in {}. To use it from another shell:",
        data_dir.display()
    );
    println!(
        "  export QUORUM_CONTROLLER={} QUORUM_API_TOKEN={}",
        fed.controller_url, fed.api_token
    );
    println!("  quorum submit --wait <repository>");
    println!("Press Ctrl-C to stop.");
    let stop = tokio_util::sync::CancellationToken::new();
    quorum_service::cancel_on_signals(stop.clone());
    stop.cancelled().await;
    fed.shutdown();
    Ok(ExitCode::SUCCESS)
}

pub struct RunArgs {
    pub repository: String,
    pub rev: String,
    pub workers: usize,
    pub data_dir: Option<PathBuf>,
    pub out: PathBuf,
    pub timeout: u64,
    pub json: bool,
}

pub async fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(args.workers >= 1, "--workers must be at least 1");
    let temp = tempfile::Builder::new().prefix("quorum-run-").tempdir()?;
    let data_dir = args
        .data_dir
        .clone()
        .unwrap_or_else(|| temp.path().to_path_buf());
    let (repository, rev) = source(&args.repository, &args.rev, &data_dir)?;

    eprintln!(
        "starting a local federation: IdP, store, controller and {} workers",
        args.workers
    );
    let fed = Federation::start(Spec::local(&data_dir, &exe()?, args.workers)).await?;
    let c = fed.user_client();
    let created = c.submit(&repository, &rev).await?;
    eprintln!(
        "build {} of {} at commit {}",
        created.build_id, args.repository, created.commit
    );
    let status = client::wait_for(&c, &created.build_id, Duration::from_secs(args.timeout)).await?;
    client::report(&status, args.json)?;
    let out = args.out.join(&created.build_id);
    if status.state == quorum_api::v1::controller::BuildState::Verified {
        let files = client::fetch_verified(&c, &created.build_id, &out).await?;
        if !args.json {
            println!(
                "signed: {} verified artifacts in {}",
                files.len(),
                out.display()
            );
            for f in &files {
                println!("  {}", f.display());
            }
            println!(
                "check one with: quorum verify --statement {0}/statement.intoto.json --key {0}/signer.pub <file>",
                out.display()
            );
        }
    } else if !args.json {
        println!("nothing was signed: only verified builds are");
        if args.data_dir.is_none() {
            println!("(run again with --data-dir DIR to keep the federation's logs and database)");
        }
    }
    drop(fed);
    Ok(client::exit_for(&status))
}

/// A git repository or URL is built as it is; a plain directory is snapshotted into a
/// repository first so that there is an exact commit to build.
fn source(repository: &str, rev: &str, data_dir: &Path) -> anyhow::Result<(String, String)> {
    let path = Path::new(repository);
    if repository.contains("://") || !path.exists() {
        return Ok((repository.to_string(), rev.to_string()));
    }
    let abs =
        std::fs::canonicalize(path).with_context(|| format!("cannot resolve {repository}"))?;
    if abs.join(".git").exists() || abs.join("HEAD").is_file() {
        return Ok((abs.display().to_string(), rev.to_string()));
    }
    anyhow::ensure!(
        abs.is_dir(),
        "{repository} is neither a git repository nor a directory"
    );
    let snap = data_dir.join("snapshot.git");
    let commit = quorum_git::snapshot(&abs, &snap)
        .with_context(|| format!("cannot snapshot {repository} into a git repository"))?;
    eprintln!(
        "{repository} is not a git repository: building a snapshot of its files (commit {commit})"
    );
    Ok((snap.display().to_string(), commit))
}
