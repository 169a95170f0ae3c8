//! Registered clients and their credentials. Secrets are held only as Argon2id PHC strings, and
//! checking a secret costs the same whether or not the client exists, so timing does not reveal
//! which client ids are registered. `Clients` holds the config-file registrations; `db.rs` holds
//! the ones the admin CLI manages, and both end in the same `verify`.

use std::collections::HashMap;

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2};

use crate::ClientConfig;

/// Hashes a client secret into an Argon2id PHC string (default parameters, random salt).
pub fn hash_secret(secret: &str) -> String {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(secret.as_bytes(), &salt)
        .expect("argon2id with default parameters hashes any input")
        .to_string()
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ClientsError {
    #[error("client `{0}` is registered twice")]
    Duplicate(String),
    #[error("a client has an empty id")]
    EmptyId,
    #[error("client `{0}` has an empty tenant")]
    EmptyTenant(String),
    #[error(
        "client `{id}`: secret_hash is not an argon2id PHC string ({reason}); make one with `quorum idp hash-secret`"
    )]
    BadHash { id: String, reason: String },
}

/// A client that proved it holds its secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Client {
    pub id: String,
    pub tenant: String,
}

/// Verified against when the client id is unknown, so that path costs a full Argon2 run too.
/// It is `hash_secret` of a fixed phrase: it guards timing, not a secret.
const UNKNOWN_CLIENT_HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$J30+RNTLjsOJLln1KLTXIQ$MNAUwB2vJuT9OXqPcfRs8LCjqYZrkQR/r5a59yeLPqM";

#[derive(Debug)]
pub struct Clients {
    by_id: HashMap<String, (Client, String)>,
}

impl Clients {
    /// Checks every registration up front: a bad hash is a config error, not a failed login.
    pub fn new(configs: &[ClientConfig]) -> Result<Clients, ClientsError> {
        let mut by_id = HashMap::new();
        for c in configs {
            if c.id.is_empty() {
                return Err(ClientsError::EmptyId);
            }
            if c.tenant.is_empty() {
                return Err(ClientsError::EmptyTenant(c.id.clone()));
            }
            let parsed = PasswordHash::new(&c.secret_hash).map_err(|e| ClientsError::BadHash {
                id: c.id.clone(),
                reason: e.to_string(),
            })?;
            if parsed.algorithm != Algorithm::Argon2id.ident() {
                let reason = format!("algorithm is `{}`", parsed.algorithm);
                return Err(ClientsError::BadHash {
                    id: c.id.clone(),
                    reason,
                });
            }
            let client = Client {
                id: c.id.clone(),
                tenant: c.tenant.clone(),
            };
            if by_id
                .insert(c.id.clone(), (client, c.secret_hash.clone()))
                .is_some()
            {
                return Err(ClientsError::Duplicate(c.id.clone()));
            }
        }
        Ok(Clients { by_id })
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// The registration of `id` and its stored hash, to hand to `verify`.
    pub fn get(&self, id: &str) -> Option<(Client, String)> {
        self.by_id.get(id).cloned()
    }

    /// Every registration, sorted by id (for listing).
    pub fn all(&self) -> Vec<Client> {
        let mut all: Vec<Client> = self.by_id.values().map(|(c, _)| c.clone()).collect();
        all.sort_by(|a, b| a.id.cmp(&b.id));
        all
    }

    /// The client, if `secret` is its secret. Deliberately slow (Argon2): call it off the async
    /// runtime.
    #[cfg(test)]
    pub fn authenticate(&self, id: &str, secret: &str) -> Option<Client> {
        verify(self.get(id), secret)
    }
}

/// The candidate client, if `secret` matches its stored hash. With no candidate (unknown or
/// disabled client) a fixed hash is checked instead, so every refusal costs the same Argon2 run.
/// Deliberately slow: call it off the async runtime.
pub fn verify(candidate: Option<(Client, String)>, secret: &str) -> Option<Client> {
    let (client, stored) = match &candidate {
        Some((client, hash)) => (Some(client), hash.as_str()),
        None => (None, UNKNOWN_CLIENT_HASH),
    };
    let hash = PasswordHash::new(stored).ok()?;
    let ok = Argon2::default()
        .verify_password(secret.as_bytes(), &hash)
        .is_ok();
    client.filter(|_| ok).cloned()
}

/// Credentials that passed Argon2 recently, keyed by the stored hash and the SHA-256 of the
/// presented secret. Keying on the stored hash makes a rotation or a disable take effect at once
/// (the stored hash changes or the client is gone); keying on the secret's digest means only the
/// right secret ever hits. A wrong secret always pays the full Argon2 run.
#[derive(Default)]
pub struct VerifiedCache {
    entries: std::sync::Mutex<std::collections::HashMap<(String, [u8; 32]), std::time::Instant>>,
}

/// How long a verified credential is trusted without another Argon2 run.
const VERIFIED_TTL: std::time::Duration = std::time::Duration::from_secs(60);
/// Bound on remembered credentials; the cache is emptied when it is reached.
const VERIFIED_MAX: usize = 1024;

impl VerifiedCache {
    fn key(stored_hash: &str, secret: &str) -> (String, [u8; 32]) {
        use sha2::Digest as _;
        (
            stored_hash.to_string(),
            sha2::Sha256::digest(secret.as_bytes()).into(),
        )
    }

    /// The client, if this exact secret verified against its current hash within the TTL.
    pub fn hit(&self, candidate: &Option<(Client, String)>, secret: &str) -> Option<Client> {
        let (client, hash) = candidate.as_ref()?;
        let entries = self.entries.lock().expect("verified cache");
        let at = entries.get(&Self::key(hash, secret))?;
        (at.elapsed() < VERIFIED_TTL).then(|| client.clone())
    }

    pub fn remember(&self, stored_hash: &str, secret: &str) {
        let mut entries = self.entries.lock().expect("verified cache");
        if entries.len() >= VERIFIED_MAX {
            entries.clear();
        }
        entries.insert(Self::key(stored_hash, secret), std::time::Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(id: &str, secret: &str) -> ClientConfig {
        ClientConfig {
            id: id.into(),
            tenant: "dinah".into(),
            secret_hash: hash_secret(secret),
        }
    }

    #[test]
    fn authenticates_only_the_right_secret() {
        let clients = Clients::new(&[config("ctl", "s3cret")]).unwrap();
        assert_eq!(
            clients.authenticate("ctl", "s3cret").map(|c| c.tenant),
            Some("dinah".into())
        );
        assert_eq!(clients.authenticate("ctl", "wrong"), None);
        assert_eq!(clients.authenticate("nobody", "s3cret"), None);
    }

    #[test]
    fn refuses_bad_registrations() {
        let mut plain = config("ctl", "x");
        plain.secret_hash = "x".into();
        assert!(matches!(
            Clients::new(&[plain]),
            Err(ClientsError::BadHash { .. })
        ));
        let dup = Clients::new(&[config("ctl", "a"), config("ctl", "b")]);
        assert_eq!(dup.unwrap_err(), ClientsError::Duplicate("ctl".into()));
    }
}
