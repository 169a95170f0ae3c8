//! The subcommands: roles (`idp`, `store`, `controller`, `worker`), the local federation (`up`,
//! `run`), the user's commands against a running controller (`submit`, `status`, `logs`,
//! `verify`), and `publish` to a store.

mod client;
mod diff;
mod local;
mod publish;
mod roles;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "quorum",
    version,
    about = "Federated CI in which no single build worker is trusted"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

impl Cli {
    /// Services log at info; user commands stay quiet unless RUST_LOG says otherwise.
    pub fn default_log_filter(&self) -> &'static str {
        match self.command {
            Command::Idp(_) | Command::Store(_) | Command::Controller(_) | Command::Worker(_) => {
                "info"
            }
            _ => "warn",
        }
    }
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The role's TOML config file.
    #[arg(long)]
    config: PathBuf,
    /// Listen here instead of the config's `listen` (for example 127.0.0.1:0).
    #[arg(long)]
    listen: Option<String>,
    /// Once listening, write the bound address to this file (for launchers and tests).
    #[arg(long)]
    ready_file: Option<PathBuf>,
    /// Check the config and exit without starting anything.
    #[arg(long)]
    check_config: bool,
}

#[derive(Debug, Args)]
pub struct ControllerArgs {
    #[command(subcommand)]
    admin: Option<ControllerAdmin>,
    #[command(flatten)]
    serve: Option<ServeArgs>,
}

#[derive(Debug, Subcommand)]
enum ControllerAdmin {
    /// Create a single-use enrollment token for a worker of OWNER.
    Enroll {
        #[arg(long)]
        config: PathBuf,
        /// Who runs the worker; one owner's workers never fill one quorum together.
        #[arg(long)]
        owner: String,
        /// The project trusts this worker (policies can require trusted results).
        #[arg(long)]
        trusted: bool,
        /// Labels jobs can select on, as k=v,k=v (for example arch=aarch64).
        #[arg(long, value_delimiter = ',')]
        labels: Vec<String>,
    },
    /// Rotate, list or revoke the signer's keys (works while the controller runs: it signs
    /// with the new key from the next build).
    Signer {
        #[command(subcommand)]
        action: SignerKeyAdmin,
    },
}

#[derive(Debug, Subcommand)]
enum SignerKeyAdmin {
    /// Make a new signing key active and print its key id; the old key signs nothing more but
    /// stays published, so statements it signed keep verifying.
    Rotate {
        /// The controller's TOML config file (its data_dir holds the signer's keys).
        #[arg(long)]
        config: PathBuf,
    },
    /// List the signer's keys: key id, created, state (active, retired, revoked).
    List {
        #[arg(long)]
        config: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Stop publishing a retired key believed stolen: statements it signed no longer verify.
    Revoke {
        #[arg(long)]
        config: PathBuf,
        /// The key id, as `list` prints it (sha256:...).
        #[arg(long)]
        key_id: String,
    },
}

#[derive(Debug, Args)]
pub struct WorkerArgs {
    #[command(subcommand)]
    admin: Option<WorkerAdmin>,
    #[command(flatten)]
    serve: Option<ServeArgs>,
}

#[derive(Debug, Subcommand)]
enum WorkerAdmin {
    /// Print the worker's usage ledger, every record's signature verified (the worker need not
    /// be running).
    Usage {
        /// The worker's TOML config file (its data_dir holds the ledger and the key).
        #[arg(long)]
        config: PathBuf,
        #[arg(long, default_value = "table", value_parser = ["table", "csv", "json"])]
        format: String,
        /// Only this tenant's records (and totals).
        #[arg(long)]
        tenant: Option<String>,
    },
}

#[derive(Debug, Args)]
pub struct StoreArgs {
    #[command(subcommand)]
    admin: Option<StoreAdmin>,
    #[command(flatten)]
    serve: Option<ServeArgs>,
}

#[derive(Debug, Subcommand)]
enum StoreAdmin {
    /// Collect garbage once: manifests past retention, expired provisional uploads, blobs
    /// nobody references (safe while the store runs).
    Gc {
        /// The store's TOML config file.
        #[arg(long)]
        config: PathBuf,
        /// Print what was collected as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print the bytes each tenant stores and has transferred in and out.
    Usage {
        /// The store's TOML config file.
        #[arg(long)]
        config: PathBuf,
        #[arg(long, default_value = "table", value_parser = ["table", "json"])]
        format: String,
        /// Only this tenant.
        #[arg(long)]
        tenant: Option<String>,
    },
}

#[derive(Debug, Args)]
pub struct IdpArgs {
    #[command(subcommand)]
    admin: Option<IdpAdmin>,
    #[command(flatten)]
    serve: Option<ServeArgs>,
}

#[derive(Debug, Subcommand)]
enum IdpAdmin {
    /// Read a client secret on standard input and print its Argon2id hash for the config.
    HashSecret,
    /// Add, list, disable, enable or rotate the clients kept in the IdP's database (works whether or
    /// not the IdP is running; a running IdP sees changes at its next request).
    Client {
        #[command(subcommand)]
        action: IdpClientAdmin,
    },
    /// Rotate or list the IdP's signing keys (works while the IdP runs: it signs with the new key
    /// from its next request and keeps publishing the old one until its tokens have expired).
    Key {
        #[command(subcommand)]
        action: IdpKeyAdmin,
    },
}

#[derive(Debug, Subcommand)]
enum IdpKeyAdmin {
    /// Make a new signing key active and print its kid; the old key stops signing at once and
    /// leaves JWKS when every token it signed has expired.
    Rotate {
        /// The IdP's TOML config file (its data_dir holds the database).
        #[arg(long)]
        config: PathBuf,
    },
    /// List the signing keys: kid, created, state (active, retiring until T, retired).
    List {
        #[arg(long)]
        config: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum IdpClientAdmin {
    /// Register a client and print its new secret, once (only its hash is stored).
    Add {
        /// The IdP's TOML config file (its data_dir holds the database).
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        id: String,
        /// The tenant every token of this client is issued for.
        #[arg(long)]
        tenant: String,
    },
    /// List every client (config file and database), without secrets.
    List {
        #[arg(long)]
        config: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Disable a database client: it is refused like an unknown one from then on.
    Disable {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        id: String,
    },
    /// Enable a disabled database client again; its current secret works from then on.
    Enable {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        id: String,
    },
    /// Give a database client a new secret and print it, once; the old one stops working.
    Rotate {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        id: String,
    },
}

#[derive(Debug, Args)]
pub struct ControllerConn {
    /// The controller's URL.
    #[arg(long, env = "QUORUM_CONTROLLER")]
    controller: String,
    /// The controller's API token.
    #[arg(long, env = "QUORUM_API_TOKEN", hide_env_values = true)]
    token: String,
}

#[derive(Debug, Subcommand)]
enum ReviewAction {
    /// List review flags, oldest first (open ones only unless --all).
    List {
        #[command(flatten)]
        conn: ControllerConn,
        /// Include cleared flags.
        #[arg(long)]
        all: bool,
        #[arg(long)]
        json: bool,
    },
    /// Clear a review flag once it has been looked into, saying why.
    Clear {
        #[command(flatten)]
        conn: ControllerConn,
        flag: String,
        /// Why the flag is cleared (kept with it).
        #[arg(long)]
        note: String,
    },
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run an identity provider.
    #[command(args_conflicts_with_subcommands = true)]
    Idp(IdpArgs),
    /// Run an artifact store, or administer one.
    #[command(args_conflicts_with_subcommands = true)]
    Store(StoreArgs),
    /// Run a controller, or administer one.
    #[command(args_conflicts_with_subcommands = true)]
    Controller(ControllerArgs),
    /// Run a worker, or print its usage ledger.
    #[command(args_conflicts_with_subcommands = true)]
    Worker(WorkerArgs),
    /// Run every role on loopback until interrupted (SQLite, local disk, keys made on first start).
    Up {
        /// Where the roles keep their state; reuse it to keep builds, keys and enrollments.
        #[arg(long, default_value = ".quorum")]
        data_dir: PathBuf,
        /// How many workers (each with its own owner; the first is trusted).
        #[arg(long, default_value_t = 3)]
        workers: usize,
    },
    /// Build a git repository (or a directory) on a local federation and print the verdict.
    Run {
        /// A git repository path or URL, or a plain directory to snapshot.
        repository: String,
        /// The revision to build.
        #[arg(long, default_value = "HEAD")]
        rev: String,
        /// How many workers to start.
        #[arg(long, default_value_t = 3)]
        workers: usize,
        /// Keep the federation's state here instead of a temporary directory.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Where verified artifacts and the signed statement are written.
        #[arg(long, default_value = "quorum-out")]
        out: PathBuf,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 1800)]
        timeout: u64,
        /// Print the final status as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Submit a build to a running controller.
    Submit {
        #[command(flatten)]
        conn: ControllerConn,
        repository: String,
        #[arg(long, default_value = "HEAD")]
        rev: String,
        /// Wait for the verdict; exit 0 only if verified.
        #[arg(long)]
        wait: bool,
        #[arg(long)]
        json: bool,
    },
    /// Show a build's state, jobs and results.
    Status {
        #[command(flatten)]
        conn: ControllerConn,
        build: String,
        #[arg(long)]
        json: bool,
    },
    /// Print a build's logs (all jobs, or one), following them with -f.
    Logs {
        #[command(flatten)]
        conn: ControllerConn,
        build: String,
        job: Option<String>,
        #[arg(short = 'f', long)]
        follow: bool,
    },
    /// Print the report explaining a disputed job: how each group's differing files differ
    /// (diffoscope's report, or the built-in file-level diff).
    Diff {
        #[command(flatten)]
        conn: ControllerConn,
        build: String,
        job: String,
        /// The HTML report instead of text.
        #[arg(long)]
        html: bool,
    },
    /// Approve a manual job of a build (`manual: true` in the pipeline) so it can run.
    Approve {
        #[command(flatten)]
        conn: ControllerConn,
        build: String,
        job: String,
    },
    /// Ask a trusted worker to rebuild a disputed job: if it agrees with one side and that side
    /// then meets the policy, the job verifies. The dispute stays on record.
    Rebuild {
        #[command(flatten)]
        conn: ControllerConn,
        /// Required: only a trusted worker's rebuild can break a tie.
        #[arg(long)]
        trusted: bool,
        build: String,
        job: String,
    },
    /// List or clear the review flags that spot checks raise.
    Review {
        #[command(subcommand)]
        action: ReviewAction,
    },
    /// Show what workers reported using for this controller's builds, per tenant and per build.
    Usage {
        #[command(flatten)]
        conn: ControllerConn,
        /// Only this tenant.
        #[arg(long)]
        tenant: Option<String>,
        /// How many of the most recent builds to list.
        #[arg(long, default_value_t = 20)]
        builds: u32,
        #[arg(long)]
        json: bool,
    },
    /// Cancel a running build: its workers stop at their next heartbeat.
    Cancel {
        #[command(flatten)]
        conn: ControllerConn,
        build: String,
    },
    /// Download a verified build's artifacts and statement, checking every digest.
    Fetch {
        #[command(flatten)]
        conn: ControllerConn,
        build: String,
        #[arg(long, default_value = "quorum-out")]
        out: PathBuf,
    },
    /// Check an artifact against a signed statement and the signer's public key.
    Verify {
        /// The DSSE envelope (statement.intoto.json).
        #[arg(long)]
        statement: PathBuf,
        /// The signer's public key: a file holding base64 of the raw Ed25519 key (`signer.pub`),
        /// or the key set a controller publishes at /api/v1/signer/keys (`signer-keys.json`,
        /// written by `fetch`), which also verifies statements signed before a key rotation.
        #[arg(long)]
        key: PathBuf,
        /// The artifact's subject name (`<job>/<path>`); by default any subject with its digest.
        #[arg(long)]
        name: Option<String>,
        artifact: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Publish files to an artifact store: hash them, skip what it has, upload the rest.
    Publish(publish::PublishArgs),
}

pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Idp(IdpArgs {
            admin: Some(IdpAdmin::HashSecret),
            ..
        }) => roles::hash_secret(),
        Command::Idp(IdpArgs {
            admin: Some(IdpAdmin::Client { action }),
            ..
        }) => roles::idp_client(action).await,
        Command::Idp(IdpArgs {
            admin: Some(IdpAdmin::Key { action }),
            ..
        }) => roles::idp_key(action).await,
        Command::Idp(IdpArgs { serve: Some(s), .. }) => roles::idp(s).await,
        Command::Idp(_) => {
            anyhow::bail!(
                "`quorum idp` needs --config (or a subcommand such as hash-secret, client or key)"
            )
        }
        Command::Store(StoreArgs {
            admin: Some(StoreAdmin::Gc { config, json }),
            ..
        }) => roles::store_gc(&config, json).await,
        Command::Store(StoreArgs {
            admin:
                Some(StoreAdmin::Usage {
                    config,
                    format,
                    tenant,
                }),
            ..
        }) => roles::store_usage(&config, &format, tenant.as_deref()).await,
        Command::Store(StoreArgs { serve: Some(s), .. }) => roles::store(s).await,
        Command::Store(_) => {
            anyhow::bail!("`quorum store` needs --config (or a subcommand such as gc or usage)")
        }
        Command::Controller(ControllerArgs {
            admin:
                Some(ControllerAdmin::Enroll {
                    config,
                    owner,
                    trusted,
                    labels,
                }),
            ..
        }) => roles::enroll(&config, &owner, trusted, &labels).await,
        Command::Controller(ControllerArgs {
            admin: Some(ControllerAdmin::Signer { action }),
            ..
        }) => roles::signer_key(action),
        Command::Controller(ControllerArgs { serve: Some(s), .. }) => roles::controller(s).await,
        Command::Controller(_) => {
            anyhow::bail!("`quorum controller` needs --config (or a subcommand such as enroll)")
        }
        Command::Worker(WorkerArgs {
            admin:
                Some(WorkerAdmin::Usage {
                    config,
                    format,
                    tenant,
                }),
            ..
        }) => roles::worker_usage(&config, &format, tenant.as_deref()),
        Command::Worker(WorkerArgs { serve: Some(s), .. }) => roles::worker(s).await,
        Command::Worker(_) => {
            anyhow::bail!("`quorum worker` needs --config (or a subcommand such as usage)")
        }
        Command::Up { data_dir, workers } => local::up(&data_dir, workers).await,
        Command::Run {
            repository,
            rev,
            workers,
            data_dir,
            out,
            timeout,
            json,
        } => {
            local::run(local::RunArgs {
                repository,
                rev,
                workers,
                data_dir,
                out,
                timeout,
                json,
            })
            .await
        }
        Command::Submit {
            conn,
            repository,
            rev,
            wait,
            json,
        } => client::submit(&conn, &repository, &rev, wait, json).await,
        Command::Status { conn, build, json } => client::status(&conn, &build, json).await,
        Command::Logs {
            conn,
            build,
            job,
            follow,
        } => client::logs(&conn, &build, job.as_deref(), follow).await,
        Command::Approve { conn, build, job } => client::approve(&conn, &build, &job).await,
        Command::Diff {
            conn,
            build,
            job,
            html,
        } => diff::diff(&conn, &build, &job, html).await,
        Command::Rebuild {
            conn,
            trusted,
            build,
            job,
        } => client::rebuild(&conn, trusted, &build, &job).await,
        Command::Review {
            action: ReviewAction::List { conn, all, json },
        } => client::review_list(&conn, all, json).await,
        Command::Review {
            action: ReviewAction::Clear { conn, flag, note },
        } => client::review_clear(&conn, &flag, &note).await,
        Command::Usage {
            conn,
            tenant,
            builds,
            json,
        } => client::usage(&conn, tenant.as_deref(), builds, json).await,
        Command::Cancel { conn, build } => client::cancel(&conn, &build).await,
        Command::Fetch { conn, build, out } => client::fetch(&conn, &build, &out).await,
        Command::Verify {
            statement,
            key,
            name,
            artifact,
            json,
        } => client::verify(&statement, &key, name.as_deref(), &artifact, json),
        Command::Publish(args) => publish::publish(args).await,
    }
}
