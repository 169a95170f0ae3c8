//! The IdP's signing keys: a key ring in `idp.db` (table `signing_keys`), so that
//! `quorum idp key rotate` can change the signing key of a running IdP without a restart.
//!
//! Exactly one key is active. The IdP reads the active key and the published ones from the
//! database at most once a second (`CACHE`; a rotation made in the IdP's own process counts at
//! once), so a rotation by the CLI counts from at most a second later. A rotated-out key loses its private half in the same transaction (it never signs
//! again; `secure_delete` overwrites the bytes in the file) and keeps its public half in JWKS
//! until every token it signed has expired: the rotation time plus the longest token lifetime
//! plus the verifiers' clock skew plus that second. Then it is dropped from JWKS and only listed.
//!
//! Claims are built before the active key is read (`token.rs`), and the key read is at most a
//! second old, so a token signed with a key that a racing rotation has just retired was issued
//! at most a second after that rotation, and expires within the key's publication window.

use std::path::Path;

use argon2::password_hash::rand_core::{OsRng, RngCore as _};
use ed25519_dalek::{SigningKey, VerifyingKey};
use quorum_token::{IssuerKey, Jwk};
use serde::Serialize;
use sqlx::Row as _;
use sqlx::sqlite::SqlitePool;

use crate::Config;
use crate::db::{AdminError, ClientDb};

/// The single-key file of IdPs from before the key ring. Imported as the first key of the ring
/// (same kid, so its tokens keep verifying) and then deleted.
pub const LEGACY_KEY_FILE: &str = "idp-signing.key";

/// Seconds a retired key stays published after the longest lifetime of its tokens: the clock
/// skew verifiers tolerate past `exp`.
const SKEW_SECS: i64 = quorum_token::LEEWAY_SECS as i64;

/// Why the running IdP cannot read its keys.
#[derive(Debug, thiserror::Error)]
pub(crate) enum KeyError {
    #[error("signing keys: {0}")]
    Db(#[from] sqlx::Error),
    #[error("signing_keys has no active key")]
    NoActiveKey,
    #[error("signing key `{0}` is corrupt: its private key does not match its kid")]
    Corrupt(String),
}

/// One key as listed: never its private half.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeyInfo {
    pub kid: String,
    /// Unix seconds.
    pub created_at: i64,
    #[serde(flatten)]
    pub state: KeyState,
}

/// Where a key is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "lowercase")]
pub enum KeyState {
    /// Signs every new token.
    Active,
    /// Signs nothing; still in JWKS until `until` (unix seconds), when its last token expires.
    Retiring { until: i64 },
    /// Gone from JWKS since `since` (unix seconds); tokens naming it are refused.
    Retired { since: i64 },
}

impl std::fmt::Display for KeyState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeyState::Active => f.write_str("active"),
            KeyState::Retiring { until } => write!(f, "retiring until {}", rfc3339(*until)),
            KeyState::Retired { since } => write!(f, "retired since {}", rfc3339(*since)),
        }
    }
}

/// Unix seconds as an RFC 3339 UTC time, for people.
pub fn rfc3339(t: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(t)
        .ok()
        .and_then(|d| {
            d.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| t.to_string())
}

/// How long the running IdP trusts its last read of the ring. A rotation made by another
/// process (`quorum idp key rotate`) counts from at most this much later; one made in this
/// process counts at once ([`ROTATIONS`]). A retired key stays published this much longer too,
/// since it may sign for this long after its rotation.
const CACHE: std::time::Duration = std::time::Duration::from_secs(1);

/// Rotations made in this process: a ring whose snapshot predates the last one reads again.
static ROTATIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The running IdP's view of the ring. No `Debug`: it caches a private key.
pub(crate) struct KeyRing {
    pool: SqlitePool,
    /// This IdP's longest token lifetime: a retired key stays published at least this long
    /// (plus skew) after its rotation, even if the CLI that rotated it read a shorter one.
    max_lifetime_secs: i64,
    /// The ring as last read: a token request then pays neither a query nor a key derivation.
    snapshot: std::sync::Mutex<Option<std::sync::Arc<Snapshot>>>,
}

/// One read of the ring: the active key and the keys published beside it, read together so a
/// token is never signed with a key its own exchange would not find.
struct Snapshot {
    read_at: std::time::Instant,
    rotations: u64,
    active: IssuerKey,
    published: Vec<Jwk>,
}

impl KeyRing {
    pub(crate) fn new(db: &ClientDb, max_lifetime_secs: i64) -> KeyRing {
        KeyRing {
            pool: db.pool().clone(),
            max_lifetime_secs,
            snapshot: std::sync::Mutex::default(),
        }
    }

    /// The key that signs now, as the database said at most [`CACHE`] ago.
    pub(crate) async fn active(&self) -> Result<IssuerKey, KeyError> {
        Ok(self.snapshot().await?.active.clone())
    }

    /// The public keys verifiers may need now: the active one and every retiring one. Read
    /// from the database each time (verifiers cache JWKS), so it never lags what signs.
    pub(crate) async fn published(&self) -> Result<Vec<Jwk>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT kid, public_key FROM signing_keys
             WHERE retired_at IS NULL OR MAX(published_until, retired_at + ?) > ?
             ORDER BY rowid DESC",
        )
        .bind(self.max_lifetime_secs + SKEW_SECS + CACHE.as_secs() as i64)
        .bind(quorum_service::now_unix())
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .filter_map(|r| {
                let kid: String = r.get("kid");
                let key = verifying_key(&r.get::<Vec<u8>, _>("public_key"))?;
                Some(Jwk::from_key(&kid, &key))
            })
            .collect())
    }

    /// A published key by kid (for the IdP's own access tokens, which may predate a rotation):
    /// from the snapshot, or from the database for a kid the snapshot does not know.
    pub(crate) async fn public_key(&self, kid: &str) -> Result<Option<VerifyingKey>, KeyError> {
        let snapshot = self.snapshot().await?;
        let found = match snapshot.published.iter().find(|k| k.kid == kid) {
            Some(k) => Some(k.clone()),
            None => self.published().await?.into_iter().find(|k| k.kid == kid),
        };
        Ok(found.and_then(|k| k.verifying_key().ok()))
    }

    /// The snapshot, read again when it is older than [`CACHE`] or than this process's last
    /// rotation. Concurrent requests may each read; the last one's snapshot stays.
    async fn snapshot(&self) -> Result<std::sync::Arc<Snapshot>, KeyError> {
        let rotations = ROTATIONS.load(std::sync::atomic::Ordering::SeqCst);
        let previous = self.snapshot.lock().expect("key ring snapshot").clone();
        if let Some(s) = &previous
            && s.rotations == rotations
            && s.read_at.elapsed() < CACHE
        {
            return Ok(s.clone());
        }
        let read_at = std::time::Instant::now();
        let row = sqlx::query(
            "SELECT kid, private_key FROM signing_keys WHERE retired_at IS NULL AND private_key IS NOT NULL",
        )
        .fetch_optional(&self.pool)
        .await?
        .ok_or(KeyError::NoActiveKey)?;
        let published = self.published().await?;
        let kid: String = row.get("kid");
        let active = match previous {
            Some(s) if s.active.kid == kid => s.active.clone(),
            _ => {
                let seed: Vec<u8> = row.get("private_key");
                let key = issuer_key(&kid, &seed).ok_or_else(|| KeyError::Corrupt(kid.clone()))?;
                tracing::info!(kid = %key.kid, "signing with key");
                key
            }
        };
        let snapshot = std::sync::Arc::new(Snapshot {
            read_at,
            rotations,
            active,
            published,
        });
        *self.snapshot.lock().expect("key ring snapshot") = Some(snapshot.clone());
        Ok(snapshot)
    }
}

/// Makes sure the ring has an active key: on the first start, the legacy key file's key (so
/// tokens signed before the upgrade keep verifying) or a new one. Returns the active kid. Safe
/// to race with another process doing the same: the write lock is taken before the check.
pub(crate) async fn ensure_active(db: &ClientDb, data_dir: &Path) -> Result<String, AdminError> {
    let legacy_path = data_dir.join(LEGACY_KEY_FILE);
    let legacy = match std::fs::read(&legacy_path) {
        Ok(bytes) => Some(SigningKey::from_bytes(
            &bytes.as_slice().try_into().map_err(|_| {
                AdminError::LegacyKey(legacy_path.clone(), "not a 32-byte key".into())
            })?,
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(AdminError::LegacyKey(legacy_path, e.to_string())),
    };
    let mut tx = quorum_service::begin_with(db.pool(), "BEGIN IMMEDIATE").await?;
    let active: Option<String> =
        sqlx::query_scalar("SELECT kid FROM signing_keys WHERE retired_at IS NULL")
            .fetch_optional(&mut *tx)
            .await?;
    let kid = match active {
        Some(kid) => kid,
        None => {
            let key = match &legacy {
                Some(key) => key.clone(),
                None => new_key(),
            };
            let kid = insert_active(&mut tx, &key).await?;
            tracing::info!(%kid, imported = legacy.is_some(), "created the first signing key of the ring");
            kid
        }
    };
    tx.commit().await?;
    // The legacy file's key now lives in the ring (or was there already): the file is a second
    // copy of a private key, which must not outlive the key's rotation.
    if let Some(key) = legacy {
        let legacy_kid = Jwk::thumbprint(&key.verifying_key());
        let known: Option<i64> = sqlx::query_scalar("SELECT 1 FROM signing_keys WHERE kid = ?")
            .bind(&legacy_kid)
            .fetch_optional(db.pool())
            .await?;
        if known.is_some() {
            std::fs::remove_file(&legacy_path)
                .map_err(|e| AdminError::LegacyKey(legacy_path.clone(), e.to_string()))?;
            tracing::info!(kid = %legacy_kid, path = %legacy_path.display(), "moved the legacy signing key into the key ring");
        } else {
            tracing::warn!(kid = %legacy_kid, path = %legacy_path.display(), "ignoring a legacy signing key file the key ring does not know; the ring's active key signs");
        }
    }
    Ok(kid)
}

async fn insert_active(
    tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
    key: &SigningKey,
) -> Result<String, sqlx::Error> {
    let kid = Jwk::thumbprint(&key.verifying_key());
    sqlx::query(
        "INSERT INTO signing_keys (kid, public_key, private_key, created_at) VALUES (?, ?, ?, ?)",
    )
    .bind(&kid)
    .bind(key.verifying_key().as_bytes().as_slice())
    .bind(key.as_bytes().as_slice())
    .bind(quorum_service::now_unix())
    .execute(&mut **tx)
    .await?;
    Ok(kid)
}

fn new_key() -> SigningKey {
    let mut seed = [0u8; 32];
    OsRng.fill_bytes(&mut seed);
    SigningKey::from_bytes(&seed)
}

fn issuer_key(kid: &str, seed: &[u8]) -> Option<IssuerKey> {
    let key = IssuerKey::new(SigningKey::from_bytes(seed.try_into().ok()?));
    // The kid is the public key's thumbprint: a row whose seed does not match its kid is corrupt.
    (key.kid == kid).then_some(key)
}

fn verifying_key(bytes: &[u8]) -> Option<VerifyingKey> {
    VerifyingKey::from_bytes(bytes.try_into().ok()?).ok()
}

/// The admin CLI's view of the ring (`quorum idp key rotate|list`); works whether or not the
/// IdP is running.
#[derive(Debug)]
pub struct KeyAdmin {
    db: ClientDb,
    data_dir: std::path::PathBuf,
    max_lifetime_secs: i64,
}

impl KeyAdmin {
    /// Checks the config as `run` would and opens its database.
    pub async fn open(config: &Config) -> Result<KeyAdmin, AdminError> {
        config.check()?;
        let db = ClientDb::open(&config.data_dir).await?;
        Ok(KeyAdmin {
            db,
            data_dir: config.data_dir.clone(),
            max_lifetime_secs: config.max_token_lifetime_secs,
        })
    }

    /// Makes a new key active and starts retiring the old one, in one transaction. A running
    /// IdP signs with the new key from its next request and keeps publishing the old one until
    /// every token it signed has expired. Returns the new key.
    pub async fn rotate(&self) -> Result<KeyInfo, AdminError> {
        ensure_active(&self.db, &self.data_dir).await?;
        let now = quorum_service::now_unix();
        let mut tx = quorum_service::begin_with(self.db.pool(), "BEGIN IMMEDIATE").await?;
        let retired = sqlx::query(
            "UPDATE signing_keys SET private_key = NULL, retired_at = ?, published_until = ?
             WHERE retired_at IS NULL",
        )
        .bind(now)
        .bind(now + self.max_lifetime_secs + SKEW_SECS + CACHE.as_secs() as i64)
        .execute(&mut *tx)
        .await?;
        let kid = insert_active(&mut tx, &new_key()).await?;
        tx.commit().await?;
        ROTATIONS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        // `secure_delete` scrubs the database file, but the WAL still holds the pages written
        // when the old key was inserted: copy it back and empty it. Busy readers only delay
        // this to a later checkpoint, so a failure here is not the rotation's.
        if let Err(e) = sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
            .execute(self.db.pool())
            .await
        {
            tracing::warn!(error = %e, "cannot empty the WAL after the rotation; the old key's bytes leave it at a later checkpoint");
        }
        tracing::info!(%kid, retired = retired.rows_affected(), "rotated the IdP signing key");
        Ok(KeyInfo {
            kid,
            created_at: now,
            state: KeyState::Active,
        })
    }

    /// Every key of the ring, newest first, with its state now. No private material.
    pub async fn list(&self) -> Result<Vec<KeyInfo>, AdminError> {
        let now = quorum_service::now_unix();
        let rows = sqlx::query(
            "SELECT kid, created_at, retired_at, published_until FROM signing_keys
             ORDER BY rowid DESC",
        )
        .fetch_all(self.db.pool())
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| {
                let until: Option<i64> = r.get("published_until");
                let state = match until {
                    None => KeyState::Active,
                    Some(until) if until > now => KeyState::Retiring { until },
                    Some(since) => KeyState::Retired { since },
                };
                KeyInfo {
                    kid: r.get("kid"),
                    created_at: r.get("created_at"),
                    state,
                }
            })
            .collect())
    }

    /// Closes the database cleanly.
    pub async fn close(self) {
        self.db.close().await;
    }
}
