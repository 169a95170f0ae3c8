//! Clients kept in the IdP's SQLite database (`data_dir/idp.db`), managed by the admin CLI
//! (`quorum idp client add|list|disable|enable|rotate`) with or without the IdP running. The
//! same file holds the signing keys (`keys.rs`), so it is created mode 0600 and kept so.
//!
//! The running IdP reads this table on every token request (it is small), so a change made by the
//! CLI counts from the IdP's next request: no reload, no signal. Two processes may open the file
//! at once, hence WAL (readers never block the writer), a busy timeout (a writer waits for the
//! other instead of failing), `BEGIN IMMEDIATE` for the write that reads first (so two `add`s of
//! one id cannot both pass the check), and retries of the migration (two first starts may race
//! to create the schema; the loser finds it made).
//!
//! Config-file clients stay read-only here: an id lives in one place only, and a database client
//! carrying a config-file client's id stops the IdP at start.

use std::path::{Path, PathBuf};
use std::time::Duration;

use argon2::password_hash::rand_core::{OsRng, RngCore as _};
use base64::Engine as _;
use serde::Serialize;
use sqlx::Row as _;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};

use crate::clients::{Client, Clients, hash_secret};
use crate::{Config, ConfigError};

/// The database file inside `data_dir`.
pub const DB_FILE: &str = "idp.db";

/// Random bytes in a generated client secret (printed as unpadded base64url).
const SECRET_BYTES: usize = 32;

/// Why an admin operation (or the IdP's start) failed. Every client error names the id.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("client `{0}` is not registered")]
    UnknownClient(String),
    #[error("client `{0}` is already registered in the database")]
    DuplicateInDatabase(String),
    #[error("client `{0}` is already registered in the config file")]
    DuplicateInConfig(String),
    #[error(
        "client `{0}` is registered in the config file, which is read-only here; edit the config file to change it"
    )]
    ConfigClient(String),
    #[error(
        "client `{0}` is registered both in the config file and in the database; remove one of them"
    )]
    Conflict(String),
    #[error(
        "client id `{0}` is not allowed: use 1 to 128 printable ASCII characters without spaces or `:` (HTTP Basic splits on `:`)"
    )]
    BadId(String),
    #[error("client `{0}` needs a non-empty tenant")]
    EmptyTenant(String),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot create data_dir {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot open the client database {path}: {source}")]
    Open { path: PathBuf, source: sqlx::Error },
    #[error("cannot bring the client database {path} up to date: {source}")]
    Migrate {
        path: PathBuf,
        source: sqlx::migrate::MigrateError,
    },
    #[error("client database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("hashing the new secret failed: {0}")]
    Hashing(String),
    #[error("cannot use the legacy signing key file {0}: {1}")]
    LegacyKey(PathBuf, String),
    #[error("cannot make {0} private (mode 0600): {1}")]
    Private(PathBuf, std::io::Error),
}

/// Where a client is registered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientSource {
    /// `[[clients]]` in the config file; read-only for the admin CLI.
    Config,
    /// The database, managed by the admin CLI.
    Db,
}

impl std::fmt::Display for ClientSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ClientSource::Config => "config",
            ClientSource::Db => "db",
        })
    }
}

/// One registered client as listed: never its secret or hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ClientInfo {
    pub id: String,
    pub tenant: String,
    pub disabled: bool,
    pub source: ClientSource,
    /// Unix seconds; `None` for config-file clients.
    pub created_at: Option<i64>,
    /// Unix seconds of the last secret rotation, if any.
    pub rotated_at: Option<i64>,
}

/// The `clients` table. Cheap to clone (a pool).
#[derive(Debug, Clone)]
pub(crate) struct ClientDb {
    pool: SqlitePool,
}

impl ClientDb {
    /// Opens (creating if needed) `data_dir/idp.db` and brings its schema up to date.
    pub(crate) async fn open(data_dir: &Path) -> Result<ClientDb, AdminError> {
        std::fs::create_dir_all(data_dir).map_err(|source| AdminError::DataDir {
            path: data_dir.to_path_buf(),
            source,
        })?;
        let path = data_dir.join(DB_FILE);
        make_private(&path)?;
        let options = SqliteConnectOptions::new()
            .filename(&path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .busy_timeout(Duration::from_secs(10))
            // A rotated-out signing key's bytes are overwritten, not left in free pages.
            .pragma("secure_delete", "ON");
        // Switching a new file to WAL needs a lock that the busy timeout does not cover, so a
        // second process opening the same new file at the same moment can be told "locked":
        // try again shortly, a bounded number of times.
        let mut attempt = 0;
        let pool = loop {
            match SqlitePoolOptions::new()
                .max_connections(4)
                .connect_with(options.clone())
                .await
            {
                Ok(pool) => break pool,
                Err(e) if attempt < 20 && e.to_string().contains("locked") => {
                    attempt += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(50 * attempt)).await;
                }
                Err(source) => {
                    return Err(AdminError::Open {
                        path: path.clone(),
                        source,
                    });
                }
            }
        };
        let migrator = sqlx::migrate!("./migrations");
        // Another process (the CLI next to a first-starting IdP) may be creating the same
        // schema: each failure means it applied a migration first, and a new run skips what is
        // done, so one run per migration (plus one) always gets through.
        let mut runs = 0;
        loop {
            runs += 1;
            match migrator.run(&pool).await {
                Ok(()) => break,
                Err(e) if runs <= migrator.iter().count() => {
                    tracing::debug!(error = %e, "migrating the client database failed; retrying");
                }
                Err(source) => return Err(AdminError::Migrate { path, source }),
            }
        }
        Ok(ClientDb { pool })
    }

    /// An enabled client and its hash. Disabled and unknown ids both give `None`, so the token
    /// endpoint cannot tell them apart either.
    pub(crate) async fn find_enabled(
        &self,
        id: &str,
    ) -> Result<Option<(Client, String)>, sqlx::Error> {
        let row =
            sqlx::query("SELECT tenant, secret_hash FROM clients WHERE id = ? AND disabled = 0")
                .bind(id)
                .fetch_optional(&self.pool)
                .await?;
        Ok(row.map(|r| {
            (
                Client {
                    id: id.to_string(),
                    tenant: r.get("tenant"),
                },
                r.get("secret_hash"),
            )
        }))
    }

    pub(crate) async fn list(&self) -> Result<Vec<ClientInfo>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT id, tenant, disabled, created_at, rotated_at FROM clients ORDER BY id",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| ClientInfo {
                id: r.get("id"),
                tenant: r.get("tenant"),
                disabled: r.get::<i64, _>("disabled") != 0,
                source: ClientSource::Db,
                created_at: Some(r.get("created_at")),
                rotated_at: r.get("rotated_at"),
            })
            .collect())
    }

    /// Refuses a database client that shadows a config-file one: which secret would count is
    /// not something to guess.
    pub(crate) async fn check_no_conflict(&self, config: &Clients) -> Result<(), AdminError> {
        for c in self.list().await? {
            if config.get(&c.id).is_some() {
                return Err(AdminError::Conflict(c.id));
            }
        }
        Ok(())
    }

    pub(crate) fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    pub(crate) async fn close(&self) {
        self.pool.close().await;
    }
}

/// Creates the database file mode 0600 if it is missing, and makes an existing one (and its
/// WAL and shared-memory files) 0600: it holds the active signing key. SQLite gives the WAL and
/// shared-memory files it creates the database file's mode.
fn make_private(path: &Path) -> Result<(), AdminError> {
    use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map_err(|e| AdminError::Private(path.to_path_buf(), e))?;
    for suffix in ["", "-wal", "-shm"] {
        let file = PathBuf::from(format!("{}{suffix}", path.display()));
        match std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(AdminError::Private(file, e)),
        }
    }
    Ok(())
}

/// The admin CLI's view of the registrations: config-file clients (read-only) and database
/// clients (added, disabled, rotated here). Works whether or not the IdP is running.
#[derive(Debug)]
pub struct ClientAdmin {
    config: Clients,
    db: ClientDb,
}

impl ClientAdmin {
    /// Checks the config as `run` would and opens its database.
    pub async fn open(config: &Config) -> Result<ClientAdmin, AdminError> {
        let registry = config.registry()?;
        let db = ClientDb::open(&config.data_dir).await?;
        Ok(ClientAdmin {
            config: registry,
            db,
        })
    }

    /// Registers a new database client for `tenant` and returns its secret, generated here and
    /// shown this once: only its Argon2id hash is stored.
    pub async fn add(&self, id: &str, tenant: &str) -> Result<String, AdminError> {
        check_id(id)?;
        if tenant.trim().is_empty() {
            return Err(AdminError::EmptyTenant(id.into()));
        }
        if self.config.get(id).is_some() {
            return Err(AdminError::DuplicateInConfig(id.into()));
        }
        let (secret, hash) = new_secret().await?;
        // IMMEDIATE takes the write lock before the check, so a concurrent add of the same id
        // waits and then sees this one, instead of failing on commit.
        let mut tx = quorum_service::begin_with(&self.db.pool, "BEGIN IMMEDIATE").await?;
        let exists = sqlx::query("SELECT 1 FROM clients WHERE id = ?")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?
            .is_some();
        if exists {
            return Err(AdminError::DuplicateInDatabase(id.into()));
        }
        sqlx::query(
            "INSERT INTO clients (id, tenant, secret_hash, disabled, created_at) VALUES (?, ?, ?, 0, ?)",
        )
        .bind(id)
        .bind(tenant)
        .bind(&hash)
        .bind(quorum_service::now_unix())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(secret)
    }

    /// Every client, config-file ones first, each group sorted by id. No secret material.
    pub async fn list(&self) -> Result<Vec<ClientInfo>, AdminError> {
        let mut out: Vec<ClientInfo> = self
            .config
            .all()
            .into_iter()
            .map(|c| ClientInfo {
                id: c.id,
                tenant: c.tenant,
                disabled: false,
                source: ClientSource::Config,
                created_at: None,
                rotated_at: None,
            })
            .collect();
        out.extend(self.db.list().await?);
        Ok(out)
    }

    /// Disables a database client: from the IdP's next request on it is refused like an unknown
    /// one. Disabling a disabled client is harmless.
    pub async fn disable(&self, id: &str) -> Result<(), AdminError> {
        self.set_disabled(id, true).await
    }

    /// Enables a disabled database client again: from the IdP's next request on its current
    /// secret works. Enabling an enabled client is harmless.
    pub async fn enable(&self, id: &str) -> Result<(), AdminError> {
        self.set_disabled(id, false).await
    }

    async fn set_disabled(&self, id: &str, disabled: bool) -> Result<(), AdminError> {
        self.refuse_config_client(id)?;
        let done = sqlx::query("UPDATE clients SET disabled = ? WHERE id = ?")
            .bind(i64::from(disabled))
            .bind(id)
            .execute(&self.db.pool)
            .await?;
        if done.rows_affected() == 0 {
            return Err(AdminError::UnknownClient(id.into()));
        }
        Ok(())
    }

    /// Gives a database client a new secret and returns it (shown this once); the old secret is
    /// refused from the IdP's next request on. A disabled client stays disabled.
    pub async fn rotate(&self, id: &str) -> Result<String, AdminError> {
        self.refuse_config_client(id)?;
        let (secret, hash) = new_secret().await?;
        // One UPDATE: the old hash is replaced atomically, never briefly absent.
        let done = sqlx::query("UPDATE clients SET secret_hash = ?, rotated_at = ? WHERE id = ?")
            .bind(&hash)
            .bind(quorum_service::now_unix())
            .bind(id)
            .execute(&self.db.pool)
            .await?;
        if done.rows_affected() == 0 {
            return Err(AdminError::UnknownClient(id.into()));
        }
        Ok(secret)
    }

    /// Closes the database cleanly (checkpoints the WAL when this is the last connection).
    pub async fn close(self) {
        self.db.close().await;
    }

    fn refuse_config_client(&self, id: &str) -> Result<(), AdminError> {
        if self.config.get(id).is_some() {
            return Err(AdminError::ConfigClient(id.into()));
        }
        Ok(())
    }
}

/// Ids travel in HTTP Basic (`id:secret`), logs and CLI output, so keep them plain.
fn check_id(id: &str) -> Result<(), AdminError> {
    let ok =
        !id.is_empty() && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_graphic() && b != b':');
    if ok {
        Ok(())
    } else {
        Err(AdminError::BadId(id.into()))
    }
}

/// A fresh random secret and its Argon2id hash, hashed off the async runtime (Argon2 is slow on
/// purpose).
async fn new_secret() -> Result<(String, String), AdminError> {
    let mut bytes = [0u8; SECRET_BYTES];
    OsRng.fill_bytes(&mut bytes);
    let secret = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    let for_hash = secret.clone();
    let hash = tokio::task::spawn_blocking(move || hash_secret(&for_hash))
        .await
        .map_err(|e| AdminError::Hashing(e.to_string()))?;
    Ok((secret, hash))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_plain() {
        for good in ["ctl-dinah", "worker.1", "a@b"] {
            assert!(check_id(good).is_ok(), "{good}");
        }
        for bad in ["", "a:b", "a b", "é", &"x".repeat(129)] {
            assert!(matches!(check_id(bad), Err(AdminError::BadId(_))), "{bad}");
        }
    }
}
