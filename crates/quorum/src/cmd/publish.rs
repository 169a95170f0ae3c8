//! `quorum publish`: the one command that publishes files to an artifact store. Globbing and
//! `--strip` happen here, `--type` becomes the top-level directory, and the rest is
//! `quorum_client::publish`: hash (with a digest cache), skip what the store has, upload the
//! rest in parallel, record the manifest.

use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::Args;
use quorum_client::publish::{DigestCache, Progress, Publisher, Summary};
use quorum_client::store::StoreClient;

#[derive(Debug, Args)]
pub struct PublishArgs {
    /// The upload token for this build (from the controller), scoped to one assignment.
    #[arg(long, env = "QUORUM_UPLOAD_TOKEN", hide_env_values = true)]
    token: String,
    /// The top-level directory the files are published under, such as `binaries`.
    #[arg(long = "type", value_name = "TYPE")]
    kind: String,
    /// Leading path components to drop from each matched path.
    #[arg(long, default_value_t = 0)]
    strip: usize,
    /// The store's URL.
    #[arg(long, env = "QUORUM_STORE")]
    store: String,
    /// Uploads in flight at once.
    #[arg(long, default_value_t = quorum_client::publish::DEFAULT_PARALLEL)]
    parallel: usize,
    /// Where digests of files hashed before are kept, so unchanged files (same path, size,
    /// mtime, ctime and inode) are not read again. Default: quorum/publish-digests.bin in the
    /// user's cache directory.
    #[arg(long, conflicts_with = "no_cache")]
    cache: Option<PathBuf>,
    /// Hash every file, and keep no digest cache.
    #[arg(long)]
    no_cache: bool,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
    /// The build the token is for (checked against the token before anything is sent).
    build: String,
    /// Files to publish, relative to the current directory: `*` stops at `/`, `**` crosses
    /// directories. Quote them so the shell leaves them alone.
    #[arg(required = true, value_name = "GLOB")]
    globs: Vec<String>,
}

pub async fn publish(args: PublishArgs) -> anyhow::Result<ExitCode> {
    check_token(&args.token, &args.build)?;
    let base = std::env::current_dir().context("cannot read the current directory")?;
    let started = std::time::Instant::now();
    let sources = quorum_client::publish::select(&base, &args.globs, args.strip, &args.kind)?;
    tracing::debug!(files = sources.len(), elapsed = ?started.elapsed(), "selected");
    let cache = if args.no_cache {
        DigestCache::in_memory()
    } else {
        match args.cache.clone().or_else(default_cache) {
            Some(file) => DigestCache::load(&file),
            None => DigestCache::in_memory(),
        }
    };
    tracing::debug!(cached = cache.len(), elapsed = ?started.elapsed(), "read the digest cache");
    let mut publisher = Publisher::new(StoreClient::new(&args.store), &args.token)
        .parallel(args.parallel)
        .cache(Arc::new(Mutex::new(cache)));
    if std::io::stdout().is_terminal() {
        publisher = publisher.progress(Arc::new(Bar::default()));
    }
    let summary = publisher.publish(&sources).await?;
    if args.json {
        let json = serde_json::json!({
            "files": summary.files,
            "manifest": summary.manifest,
            "blobs_sent": summary.sent.blobs,
            "bytes_sent": summary.sent.bytes_sent,
            "bytes_skipped": summary.sent.bytes_skipped,
            "seconds": summary.elapsed.as_secs_f64(),
        });
        println!("{json}");
    } else {
        println!("{}", describe(&summary));
    }
    Ok(ExitCode::SUCCESS)
}

/// Catches a token for another build (or of another kind) before any file is read. The store
/// verifies the token itself; nothing here is trusted.
fn check_token(token: &str, build: &str) -> anyhow::Result<()> {
    let peeked = quorum_token::peek(token).context("--token is not a Quorum token (a JWT)")?;
    if peeked.typ != quorum_token::TYP_UPLOAD {
        bail!(
            "--token is a `{}` token; publishing needs an upload token (`{}`)",
            peeked.typ,
            quorum_token::TYP_UPLOAD
        );
    }
    let scoped = peeked
        .claims
        .get("scope")
        .and_then(|s| s.get("build"))
        .and_then(|b| b.as_str())
        .unwrap_or_default();
    if scoped != build {
        bail!("--token is for build `{scoped}`, not `{build}`");
    }
    Ok(())
}

fn default_cache() -> Option<PathBuf> {
    let dir = std::env::var_os("XDG_CACHE_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(dir.join("quorum").join("publish-digests.bin"))
}

fn describe(s: &Summary) -> String {
    format!(
        "published {} files as manifest {}: sent {} blobs ({}), skipped {} the store already had, in {:.2} s",
        s.files,
        s.manifest,
        s.sent.blobs,
        bytes(s.sent.bytes_sent),
        bytes(s.sent.bytes_skipped),
        s.elapsed.as_secs_f64()
    )
}

fn bytes(n: u64) -> String {
    indicatif::HumanBytes(n).to_string()
}

/// A progress bar on the terminal, one phase (hashing, sending) at a time.
#[derive(Default)]
struct Bar(Mutex<Option<indicatif::ProgressBar>>);

impl Bar {
    fn start(&self, what: String, bytes: u64) {
        let bar = indicatif::ProgressBar::new(bytes);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg:24} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .expect("the template is valid")
            .progress_chars("=> "),
        );
        bar.set_message(what);
        bar.enable_steady_tick(Duration::from_millis(120));
        *self.0.lock().expect("bar lock") = Some(bar);
    }
}

impl Progress for Bar {
    fn shows_totals(&self) -> bool {
        true
    }

    fn hashing(&self, files: usize, bytes: u64) {
        self.start(format!("hashing {files} files"), bytes);
    }

    fn sending(&self, blobs: usize, bytes: u64) {
        self.start(format!("sending {blobs} blobs"), bytes);
    }

    fn advance(&self, bytes: u64) {
        if let Some(b) = &*self.0.lock().expect("bar lock") {
            b.inc(bytes);
        }
    }

    fn done(&self) {
        if let Some(b) = self.0.lock().expect("bar lock").take() {
            b.finish_and_clear();
        }
    }
}
