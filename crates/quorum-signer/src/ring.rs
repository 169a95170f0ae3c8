//! The signer's key ring, in two files beside each other in the controller's data dir:
//! `signer.key` (the active private key, 32 raw bytes, mode 0600; the only private key kept) and
//! `signer-keys.json` (every key's public half, key id and state). Files, not the controller's
//! database: the signer does not trust that database, and the key must stay readable by the
//! signer alone.
//!
//! Rotation writes the new private key over `signer.key` first (temporary name, fsync, rename)
//! and the ring after; whoever finds `signer.key` holding a key the ring does not list (a
//! rotation cut short, or a data dir from before key rings) adds it as the active key and
//! retires the others. The signer reads `signer.key` at every signature, so a rotation made by
//! the CLI while the controller runs counts from the next statement. Retired keys stay listed
//! and published for ever: statements outlive keys. Only a revoked key (one believed stolen)
//! leaves the published set, and statements signed with it stop verifying for consumers.
//!
//! Writers (first start, rotation, revocation) hold an exclusive lock on `signer.lock`.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use ed25519_dalek::SigningKey;
use quorum_core::attest;
use serde::{Deserialize, Serialize};

use crate::SignError;

/// The ring's public file, beside the private key.
pub const RING_FILE: &str = "signer-keys.json";
const LOCK_FILE: &str = "signer.lock";

/// One key of the ring: never its private half.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignerKeyInfo {
    /// `sha256:<hex of the raw public key>`, as in DSSE signatures.
    pub keyid: String,
    /// The raw Ed25519 public key, base64.
    pub public_key: String,
    /// Unix seconds.
    pub created_at: i64,
    /// When it stopped signing; `None` while active.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retired_at: Option<i64>,
    /// When the operator revoked it; a revoked key is no longer published.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<i64>,
}

/// Where a signer key is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SignerKeyState {
    /// Signs new statements.
    Active,
    /// Signs nothing new; statements it signed keep verifying.
    Retired,
    /// Not published: statements it signed no longer verify for consumers.
    Revoked,
}

impl std::fmt::Display for SignerKeyState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SignerKeyState::Active => "active",
            SignerKeyState::Retired => "retired",
            SignerKeyState::Revoked => "revoked",
        })
    }
}

impl SignerKeyInfo {
    pub fn state(&self) -> SignerKeyState {
        match (self.revoked_at, self.retired_at) {
            (Some(_), _) => SignerKeyState::Revoked,
            (None, Some(_)) => SignerKeyState::Retired,
            (None, None) => SignerKeyState::Active,
        }
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RingFile {
    keys: Vec<SignerKeyInfo>,
}

/// The ring of one data dir; cheap, holds paths only.
#[derive(Debug, Clone)]
pub struct KeyRing {
    key_path: PathBuf,
    ring_path: PathBuf,
    lock_path: PathBuf,
}

impl KeyRing {
    /// The ring whose active private key is `key_path` (the public file and the lock live beside
    /// it).
    pub fn new(key_path: &Path) -> KeyRing {
        let dir = key_path.parent().unwrap_or(Path::new("."));
        KeyRing {
            key_path: key_path.to_path_buf(),
            ring_path: dir.join(RING_FILE),
            lock_path: dir.join(LOCK_FILE),
        }
    }

    /// The key that signs now, created on first use; the ring is brought in line with it if it
    /// does not list it yet. Refuses a revoked key.
    pub fn active(&self) -> Result<SigningKey, SignError> {
        let key = match self.read_key()? {
            Some(key) => key,
            None => {
                let _lock = self.lock()?;
                match self.read_key()? {
                    Some(key) => key,
                    None => {
                        let key = new_key();
                        self.write_key(&key)?;
                        key
                    }
                }
            }
        };
        let keyid = attest::key_id(&key.verifying_key());
        let listed = self.read_ring()?;
        match listed.keys.iter().find(|k| k.keyid == keyid) {
            Some(k) if k.revoked_at.is_some() => Err(SignError::ActiveRevoked(keyid)),
            Some(k) if k.retired_at.is_none() => Ok(key),
            _ => {
                // Read again under the lock: a rotation may have replaced the key meanwhile.
                let _lock = self.lock()?;
                let key = self
                    .read_key()?
                    .ok_or_else(|| self.err(&self.key_path, "the key file vanished"))?;
                let keyid = attest::key_id(&key.verifying_key());
                let mut ring = self.read_ring()?;
                if ring
                    .keys
                    .iter()
                    .any(|k| k.keyid == keyid && k.revoked_at.is_some())
                {
                    return Err(SignError::ActiveRevoked(keyid));
                }
                adopt(&mut ring, &key);
                self.write_ring(&ring)?;
                Ok(key)
            }
        }
    }

    /// Every key, newest first (the file lists them in the order they were added).
    pub fn list(&self) -> Result<Vec<SignerKeyInfo>, SignError> {
        self.settle()?;
        let mut keys = self.read_ring()?.keys;
        keys.reverse();
        Ok(keys)
    }

    /// What consumers may verify with: every key not revoked, the active one included.
    pub fn published(&self) -> Result<Vec<SignerKeyInfo>, SignError> {
        let mut keys = self.list()?;
        keys.retain(|k| k.revoked_at.is_none());
        Ok(keys)
    }

    /// Makes a new key active; the old one is retired (its private half is overwritten, its
    /// public half stays published). Returns the new key.
    pub fn rotate(&self) -> Result<SignerKeyInfo, SignError> {
        self.settle()?;
        let _lock = self.lock()?;
        let key = new_key();
        // Private key first: a crash before the ring is written leaves a key the ring does not
        // list, which `active` adopts; the other order could publish a key that never signs
        // while the old one goes on signing.
        self.write_key(&key)?;
        let mut ring = self.read_ring()?;
        let info = adopt(&mut ring, &key);
        self.write_ring(&ring)?;
        Ok(info)
    }

    /// Revokes a retired key: it leaves the published set. The active key cannot be revoked
    /// (rotate first), so there is always a key to sign with.
    pub fn revoke(&self, keyid: &str) -> Result<SignerKeyInfo, SignError> {
        self.settle()?;
        let _lock = self.lock()?;
        let mut ring = self.read_ring()?;
        let entry = ring
            .keys
            .iter_mut()
            .find(|k| k.keyid == keyid)
            .ok_or_else(|| SignError::UnknownKey(keyid.to_string()))?;
        if entry.retired_at.is_none() {
            return Err(SignError::RevokeActive(keyid.to_string()));
        }
        entry.revoked_at.get_or_insert(now_unix());
        let info = entry.clone();
        self.write_ring(&ring)?;
        Ok(info)
    }

    /// Creates or adopts the key in `signer.key` as `active` does, but lets a revoked one be:
    /// listing, publishing the other keys and rotating away from it must still work.
    fn settle(&self) -> Result<(), SignError> {
        match self.active() {
            Ok(_) | Err(SignError::ActiveRevoked(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn err(&self, path: &Path, message: impl std::fmt::Display) -> SignError {
        SignError::Key {
            path: path.display().to_string(),
            message: message.to_string(),
        }
    }

    fn read_key(&self) -> Result<Option<SigningKey>, SignError> {
        match std::fs::read(&self.key_path) {
            Ok(bytes) => {
                let seed: [u8; 32] = bytes
                    .as_slice()
                    .try_into()
                    .map_err(|_| self.err(&self.key_path, "not a 32-byte key"))?;
                Ok(Some(SigningKey::from_bytes(&seed)))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.err(&self.key_path, e)),
        }
    }

    fn write_key(&self, key: &SigningKey) -> Result<(), SignError> {
        write_atomic(&self.key_path, key.as_bytes(), 0o600).map_err(|e| self.err(&self.key_path, e))
    }

    fn read_ring(&self) -> Result<RingFile, SignError> {
        match std::fs::read(&self.ring_path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| self.err(&self.ring_path, e)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(RingFile::default()),
            Err(e) => Err(self.err(&self.ring_path, e)),
        }
    }

    fn write_ring(&self, ring: &RingFile) -> Result<(), SignError> {
        let json = serde_json::to_vec_pretty(ring).expect("the ring serializes");
        write_atomic(&self.ring_path, &json, 0o644).map_err(|e| self.err(&self.ring_path, e))
    }

    fn lock(&self) -> Result<std::fs::File, SignError> {
        if let Some(dir) = self.lock_path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| self.err(dir, e))?;
        }
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&self.lock_path)
            .map_err(|e| self.err(&self.lock_path, e))?;
        file.lock().map_err(|e| self.err(&self.lock_path, e))?;
        Ok(file)
    }
}

/// Lists `key` as the active key, retiring every other active one. Returns its entry.
fn adopt(ring: &mut RingFile, key: &SigningKey) -> SignerKeyInfo {
    let now = now_unix();
    let keyid = attest::key_id(&key.verifying_key());
    for k in ring.keys.iter_mut().filter(|k| k.keyid != keyid) {
        k.retired_at.get_or_insert(now);
    }
    match ring.keys.iter_mut().find(|k| k.keyid == keyid) {
        Some(k) => {
            k.retired_at = None;
            k.clone()
        }
        None => {
            let info = SignerKeyInfo {
                keyid,
                public_key: B64.encode(key.verifying_key().as_bytes()),
                created_at: now,
                retired_at: None,
                revoked_at: None,
            };
            ring.keys.push(info.clone());
            info
        }
    }
}

fn new_key() -> SigningKey {
    SigningKey::generate(&mut rand_core::OsRng)
}

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default()
}

/// Temporary name, fsync, rename: a reader sees the old file or the new one, never half.
fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}
