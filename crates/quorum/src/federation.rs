//! A local federation: one IdP, one store, one controller and N workers, each a separate
//! `quorum <role>` process on loopback with its own config and data directory.
//!
//! Roles run as separate processes, not tasks in one process, so that the controller's signing
//! key never shares an address space with a worker that runs build code, and so that tests can
//! kill one role with SIGKILL exactly as a crash would.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use base64::Engine as _;
use serde::{Deserialize, Serialize};

/// One worker to start: its name, its owner (as the controller's operator records it), whether
/// it is trusted, and which IdPs it trusts (`None`: the federation's IdP).
#[derive(Debug, Clone)]
pub struct WorkerSpec {
    pub name: String,
    pub owner: String,
    pub trusted: bool,
    pub trusted_issuers: Option<Vec<String>>,
    /// Whether the worker builds repositories given as local paths (true in a local federation).
    pub allow_local_repositories: bool,
}

impl WorkerSpec {
    pub fn new(name: &str, owner: &str, trusted: bool) -> WorkerSpec {
        WorkerSpec {
            name: name.into(),
            owner: owner.into(),
            trusted,
            trusted_issuers: None,
            allow_local_repositories: true,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Spec {
    pub data_dir: PathBuf,
    /// The `quorum` executable to run for each role.
    pub exe: PathBuf,
    pub workers: Vec<WorkerSpec>,
    pub lease_secs: u64,
    /// `RUST_LOG` for the role processes.
    pub log_filter: String,
    /// The controller's PostgreSQL database; `None`: SQLite in its data directory.
    pub database_url: Option<String>,
}

impl Spec {
    /// `n` workers of distinct owners, the first of them trusted.
    pub fn local(data_dir: &Path, exe: &Path, n: usize) -> Spec {
        Spec {
            data_dir: data_dir.to_path_buf(),
            exe: exe.to_path_buf(),
            workers: (1..=n)
                .map(|i| WorkerSpec::new(&format!("worker-{i}"), &format!("owner-{i}"), i == 1))
                .collect(),
            lease_secs: 15,
            log_filter: "info".into(),
            database_url: None,
        }
    }
}

/// Secrets and addresses kept across restarts of the same data directory.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
struct Saved {
    api_token: String,
    client_secret: String,
    #[serde(default)]
    addresses: BTreeMap<String, String>,
}

pub struct Federation {
    spec: Spec,
    saved: Saved,
    /// The role processes, named `idp`, `store`, `controller` and after each worker.
    launcher: Launcher,
    pub idp_url: String,
    pub store_url: String,
    pub controller_url: String,
    pub api_token: String,
    pub store_audience: String,
}

impl std::fmt::Debug for Federation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Federation")
            .field("controller", &self.controller_url)
            .finish_non_exhaustive()
    }
}

fn random_secret() -> String {
    use rand_core::RngCore as _;
    let mut b = [0u8; 24];
    rand_core::OsRng.fill_bytes(&mut b);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

impl Federation {
    /// Starts every role and waits until the IdP, store and controller listen.
    pub async fn start(spec: Spec) -> anyhow::Result<Federation> {
        std::fs::create_dir_all(&spec.data_dir)
            .with_context(|| format!("cannot create {}", spec.data_dir.display()))?;
        let saved_path = spec.data_dir.join("federation.json");
        let saved: Saved = match std::fs::read(&saved_path) {
            Ok(b) => serde_json::from_slice(&b)
                .with_context(|| format!("{} is damaged", saved_path.display()))?,
            Err(_) => Saved {
                api_token: random_secret(),
                client_secret: random_secret(),
                addresses: BTreeMap::new(),
            },
        };
        let mut fed = Federation {
            api_token: saved.api_token.clone(),
            launcher: Launcher::new(&spec.exe, &spec.data_dir, &spec.log_filter),
            spec,
            saved,
            idp_url: String::new(),
            store_url: String::new(),
            controller_url: String::new(),
            store_audience: "store:local".into(),
        };
        fed.start_role("idp").await?;
        fed.start_role("store").await?;
        fed.start_role("controller").await?;
        for w in fed.spec.workers.clone() {
            fed.start_worker(&w).await?;
        }
        quorum_service::write_private(&saved_path, &serde_json::to_vec_pretty(&fed.saved)?)?;
        Ok(fed)
    }

    pub fn data_dir(&self) -> &Path {
        &self.spec.data_dir
    }

    /// The controller's PostgreSQL URL, or `None` when it keeps SQLite in its data directory.
    pub fn database_url(&self) -> Option<&str> {
        self.spec.database_url.as_deref()
    }

    pub fn role_dir(&self, role: &str) -> PathBuf {
        self.spec.data_dir.join(role)
    }

    fn config_text(&self, role: &str) -> anyhow::Result<String> {
        let dir = self.role_dir(role);
        let listen = self
            .saved
            .addresses
            .get(role)
            .cloned()
            .unwrap_or_else(|| "127.0.0.1:0".into());
        let text = match role {
            "idp" => toml::to_string(&quorum_idp::Config {
                listen,
                data_dir: dir,
                issuer: None,
                max_token_lifetime_secs: 24 * 3600,
                clients: vec![quorum_idp::ClientConfig {
                    id: "controller".into(),
                    tenant: "local".into(),
                    secret_hash: quorum_idp::hash_secret(&self.saved.client_secret),
                }],
            })?,
            "store" => toml::to_string(&quorum_store::Config {
                listen,
                data_dir: dir,
                audience: self.store_audience.clone(),
                trusted_issuers: vec![quorum_client::trust::TrustedIssuer::any_tenant(
                    self.idp_url.clone(),
                )],
                max_blob_bytes: quorum_store::DEFAULT_MAX_BLOB_BYTES,
                ..Default::default()
            })?,
            "controller" => toml::to_string(&self.controller_config(listen))?,
            _ => bail!("unknown role {role}"),
        };
        Ok(text)
    }

    fn controller_config(&self, listen: String) -> quorum_controller::Config {
        quorum_controller::Config {
            listen,
            data_dir: self.role_dir("controller"),
            database_url: self.spec.database_url.clone(),
            name: None,
            api_token: Some(self.saved.api_token.clone()),
            idp: quorum_controller::IdpConfig {
                url: self.idp_url.clone(),
                client_id: "controller".into(),
                client_secret: Some(self.saved.client_secret.clone()),
            },
            store: quorum_controller::StoreConfig {
                url: self.store_url.clone(),
                audience: self.store_audience.clone(),
            },
            lease_secs: self.spec.lease_secs,
            upload_max_files: 100_000,
            upload_max_bytes: 16 << 30,
            project: Default::default(),
        }
    }

    /// Starts (or restarts) the IdP, store or controller and waits for it to listen.
    pub async fn start_role(&mut self, role: &str) -> anyhow::Result<()> {
        std::fs::create_dir_all(self.role_dir(role))?;
        let config = self.config_text(role)?;
        let url = self.launcher.server_text(role, role, &config).await?;
        let addr = url.trim_start_matches("http://").to_string();
        self.saved.addresses.insert(role.to_string(), addr);
        match role {
            "idp" => self.idp_url = url,
            "store" => self.store_url = url,
            _ => self.controller_url = url,
        }
        Ok(())
    }

    /// Enrolls (on first start) and starts one worker.
    pub async fn start_worker(&mut self, w: &WorkerSpec) -> anyhow::Result<()> {
        let dir = self.role_dir(&w.name);
        std::fs::create_dir_all(&dir)?;
        let enrolled = dir.join("enrollments.json").exists();
        let token = if enrolled {
            None
        } else {
            Some(
                quorum_controller::create_enrollment(
                    &self.role_dir("controller"),
                    self.spec.database_url.as_deref(),
                    &w.owner,
                    w.trusted,
                    &BTreeMap::new(),
                )
                .await?,
            )
        };
        let issuers = w
            .trusted_issuers
            .clone()
            .unwrap_or_else(|| vec![self.idp_url.clone()]);
        let config = quorum_worker::Config {
            name: w.name.clone(),
            data_dir: dir,
            controllers: vec![quorum_worker::ControllerConfig {
                url: self.controller_url.clone(),
                enrollment_token: token,
            }],
            trusted_issuers: issuers
                .into_iter()
                .map(quorum_client::trust::TrustedIssuer::any_tenant)
                .collect(),
            max_jobs: 2,
            allow_local_repositories: w.allow_local_repositories,
            // A local federation should run on a machine without bubblewrap too, loudly weaker.
            sandbox: Default::default(),
            allow_weaker_sandbox: true,
            limits: Default::default(),
        };
        self.launcher.worker(&w.name, &config)
    }

    /// Kills a role's process with SIGKILL, as a crash would.
    pub fn kill(&mut self, name: &str) -> anyhow::Result<()> {
        self.launcher.kill(name)
    }

    /// Stops every role with SIGTERM, then SIGKILL after a grace period.
    pub fn shutdown(&mut self) {
        self.launcher.shutdown();
    }

    /// The controller's signing public key, base64 of the raw 32 bytes.
    pub fn signer_public_key(&self) -> anyhow::Result<String> {
        let key = quorum_controller::signer_public_key(&self.role_dir("controller"))?;
        Ok(base64::engine::general_purpose::STANDARD.encode(key.as_bytes()))
    }

    pub fn user_client(&self) -> quorum_client::user::UserClient {
        quorum_client::user::UserClient::new(&self.controller_url, &self.api_token)
    }
}

#[allow(clippy::disallowed_methods)] // role processes, not build processes
fn spawn_process(
    exe: &Path,
    dir: &Path,
    log_filter: &str,
    name: &str,
    args: &[&str],
) -> anyhow::Result<Child> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(format!("{name}.log")))?;
    Command::new(exe)
        .args(args)
        .env("RUST_LOG", log_filter)
        .env_remove("QUORUM_API_TOKEN")
        .env_remove("QUORUM_IDP_CLIENT_SECRET")
        .env_remove("QUORUM_ENROLLMENT_TOKEN")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("cannot start {} for {name}", exe.display()))
}

/// Waits for a server's ready file, failing early with its log if the process exits first.
async fn wait_ready(
    child: &mut Child,
    dir: &Path,
    name: &str,
    ready: &Path,
) -> anyhow::Result<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(addr) = std::fs::read_to_string(ready) {
            return Ok(addr.trim().to_string());
        }
        if let Some(status) = child.try_wait()? {
            let log = dir.join(format!("{name}.log"));
            bail!(
                "{name} exited ({status}) before listening; its log is {}:\n{}",
                log.display(),
                tail(&log)
            );
        }
        if Instant::now() > deadline {
            bail!("{name} did not start listening within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Starts role processes from configs written by the caller: for setups other than the local
/// federation's one of each, such as several IdPs and controllers sharing workers and a store.
/// Every process is stopped when the launcher is dropped.
pub struct Launcher {
    exe: PathBuf,
    dir: PathBuf,
    log_filter: String,
    processes: BTreeMap<String, Child>,
}

impl std::fmt::Debug for Launcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Launcher")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl Launcher {
    pub fn new(exe: &Path, dir: &Path, log_filter: &str) -> Launcher {
        Launcher {
            exe: exe.into(),
            dir: dir.into(),
            log_filter: log_filter.into(),
            processes: BTreeMap::new(),
        }
    }

    /// Writes `config` as `<name>.toml`, starts `quorum <role>` on it and returns its URL.
    pub async fn server<C: Serialize>(
        &mut self,
        name: &str,
        role: &str,
        config: &C,
    ) -> anyhow::Result<String> {
        self.server_text(name, role, &toml::to_string(config)?)
            .await
    }

    /// Like [`Launcher::server`], with the config already as TOML. Restarting a name replaces
    /// its process.
    pub async fn server_text(
        &mut self,
        name: &str,
        role: &str,
        config: &str,
    ) -> anyhow::Result<String> {
        self.kill(name)?;
        let path = self.dir.join(format!("{name}.toml"));
        std::fs::write(&path, config)?;
        let ready = self.dir.join(format!("{name}.ready"));
        let _ = std::fs::remove_file(&ready);
        let child = spawn_process(
            &self.exe,
            &self.dir,
            &self.log_filter,
            name,
            &[
                role,
                "--config",
                path_str(&path)?,
                "--ready-file",
                path_str(&ready)?,
            ],
        )?;
        let child = self
            .processes
            .entry(name.to_string())
            .insert_entry(child)
            .into_mut();
        let addr = wait_ready(child, &self.dir, name, &ready).await?;
        Ok(format!("http://{addr}"))
    }

    /// Writes `config` as `<name>.toml` and starts `quorum worker` on it.
    pub fn worker(&mut self, name: &str, config: &quorum_worker::Config) -> anyhow::Result<()> {
        self.kill(name)?;
        let path = self.dir.join(format!("{name}.toml"));
        std::fs::write(&path, toml::to_string(config)?)?;
        let child = spawn_process(
            &self.exe,
            &self.dir,
            &self.log_filter,
            name,
            &["worker", "--config", path_str(&path)?],
        )?;
        self.processes.insert(name.to_string(), child);
        Ok(())
    }
}

impl Launcher {
    /// Kills one process with SIGKILL, as a crash would.
    pub fn kill(&mut self, name: &str) -> anyhow::Result<()> {
        if let Some(mut child) = self.processes.remove(name) {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// Stops every process with SIGTERM, then SIGKILL after a grace period.
    pub fn shutdown(&mut self) {
        for c in self.processes.values_mut() {
            terminate(c.id());
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        for c in self.processes.values_mut() {
            while matches!(c.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        self.processes.clear();
    }
}

impl Drop for Launcher {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn terminate(pid: u32) {
    let _ = rustix::process::kill_process(
        rustix::process::Pid::from_raw(pid as i32).expect("child pids are positive"),
        rustix::process::Signal::TERM,
    );
}

fn path_str(p: &Path) -> anyhow::Result<&str> {
    p.to_str()
        .with_context(|| format!("path {} is not UTF-8", p.display()))
}

/// The last lines of a log file, for error messages.
pub fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}
