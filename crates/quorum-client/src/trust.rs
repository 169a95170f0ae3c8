//! The issuers a component trusts, and their keys: fetched by OIDC discovery and JWKS, cached by
//! (issuer, kid) for `KEYS_TTL`. A kid missing from a cached set makes one refetch (the issuer
//! may have rotated its key), and such refetches are at most one per issuer per
//! `REFRESH_MIN_INTERVAL`, so a burst of tokens naming made-up kids costs the issuer one request.
//! Each issuer's keys have a lock of their own, and each discovery or JWKS request a time limit,
//! so an issuer that is slow or hangs holds up only the tokens naming it.
//! Trust is decided by the verifier's own config: a token's `kid`, `jku` or `x5u` never chooses
//! where keys come from.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ed25519_dalek::VerifyingKey;
use quorum_api::v1::idp::Discovery;
use quorum_token::{Claims, Expect, Jwks, TokenError};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use crate::{ClientError, json, transport};

/// One trusted IdP, as written in a worker's or store's config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustedIssuer {
    /// The issuer URL, compared exactly with a token's `iss` (no trailing-slash folding).
    pub issuer: String,
    /// The tenants this issuer may speak for; `None` means any. A shared IdP should be limited
    /// to the tenants it really serves, or it could mint tokens naming anyone's tenant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenants: Option<Vec<String>>,
}

impl TrustedIssuer {
    /// Trusts `issuer` for every tenant.
    pub fn any_tenant(issuer: impl Into<String>) -> TrustedIssuer {
        TrustedIssuer {
            issuer: issuer.into(),
            tenants: None,
        }
    }

    /// Whether this issuer may issue tokens naming `tenant`.
    pub fn speaks_for(&self, tenant: &str) -> bool {
        self.tenants
            .as_ref()
            .is_none_or(|t| t.iter().any(|x| x == tenant))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error("cannot fetch the keys of issuer {issuer}: {source}")]
    Fetch { issuer: String, source: ClientError },
    #[error("issuer {configured} publishes discovery for `{published}`; refusing its keys")]
    IssuerMismatch {
        configured: String,
        published: String,
    },
}

/// How long a fetched key set is used before it is fetched again.
const KEYS_TTL: Duration = Duration::from_secs(300);
/// At most one refresh per issuer in this window when tokens name unknown kids.
const REFRESH_MIN_INTERVAL: Duration = Duration::from_secs(10);
/// Longest a discovery or JWKS request may take, connecting included.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Default)]
struct IssuerKeys {
    keys: HashMap<String, VerifyingKey>,
    fetched: Option<Instant>,
    /// When a kid missing from a fresh set last made a refetch. Only these refetches are
    /// throttled: a set fetched a moment ago for a known kid must not stop a rotated-in key from
    /// being found.
    refreshed_for_unknown: Option<Instant>,
}

pub struct TrustedIssuers {
    issuers: Vec<TrustedIssuer>,
    http: reqwest::Client,
    /// One slot per issuer, locked across its fetches (so a burst waits for one refetch).
    cache: std::sync::Mutex<HashMap<String, Arc<Mutex<IssuerKeys>>>>,
}

impl std::fmt::Debug for TrustedIssuers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrustedIssuers")
            .field("issuers", &self.issuers)
            .finish()
    }
}

impl TrustedIssuers {
    pub fn new(issuers: Vec<TrustedIssuer>) -> TrustedIssuers {
        TrustedIssuers {
            issuers,
            http: crate::http_client(),
            cache: std::sync::Mutex::default(),
        }
    }

    pub fn issuers(&self) -> &[TrustedIssuer] {
        &self.issuers
    }

    /// Verifies `token` as a token of type `typ` for `audience`, issued by one of the trusted
    /// issuers with a key from that issuer's own JWKS, naming a tenant that issuer may speak for.
    pub async fn verify(
        &self,
        token: &str,
        typ: &str,
        audience: &str,
        max_lifetime_secs: i64,
    ) -> Result<Claims, TrustError> {
        let peeked = quorum_token::peek(token)?;
        let Some(trusted) = self.issuers.iter().find(|i| i.issuer == peeked.iss) else {
            return Err(TokenError::UntrustedIssuer(peeked.iss).into());
        };
        let key = self.key(&trusted.issuer, &peeked.kid).await?;
        let claims = quorum_token::verify(
            token,
            &key,
            &Expect {
                typ,
                issuer: &trusted.issuer,
                audience,
                max_lifetime_secs,
            },
        )?;
        if !trusted.speaks_for(&claims.tenant) {
            return Err(TokenError::TenantNotAllowed {
                iss: trusted.issuer.clone(),
                tenant: claims.tenant,
            }
            .into());
        }
        Ok(claims)
    }

    async fn key(&self, issuer: &str, kid: &str) -> Result<VerifyingKey, TrustError> {
        let slot = self
            .cache
            .lock()
            .expect("issuer key cache")
            .entry(issuer.to_string())
            .or_default()
            .clone();
        let mut entry = slot.lock().await;
        let fresh = entry.fetched.is_some_and(|t| t.elapsed() < KEYS_TTL);
        if fresh && let Some(k) = entry.keys.get(kid) {
            return Ok(*k);
        }
        // The lock is held across the fetch, so a burst of unknown kids waits for the one
        // refetch and then finds the throttle set, instead of each fetching.
        let may_refresh = !fresh
            || entry
                .refreshed_for_unknown
                .is_none_or(|t| t.elapsed() >= REFRESH_MIN_INTERVAL);
        if may_refresh {
            if fresh {
                entry.refreshed_for_unknown = Some(Instant::now());
            }
            entry.keys = self.fetch(issuer).await?;
            entry.fetched = Some(Instant::now());
        }
        entry.keys.get(kid).copied().ok_or_else(|| {
            TokenError::UnknownKey {
                iss: issuer.to_string(),
                kid: kid.to_string(),
            }
            .into()
        })
    }

    async fn fetch(&self, issuer: &str) -> Result<HashMap<String, VerifyingKey>, TrustError> {
        let fetch_err = |source| TrustError::Fetch {
            issuer: issuer.to_string(),
            source,
        };
        let url = format!(
            "{}/.well-known/openid-configuration",
            issuer.trim_end_matches('/')
        );
        let resp = self
            .http
            .get(&url)
            .timeout(FETCH_TIMEOUT)
            .send()
            .await
            .map_err(transport(&url))
            .map_err(fetch_err)?;
        let discovery: Discovery = json(&url, resp).await.map_err(fetch_err)?;
        if discovery.issuer != issuer {
            return Err(TrustError::IssuerMismatch {
                configured: issuer.to_string(),
                published: discovery.issuer,
            });
        }
        let url = discovery.jwks_uri;
        let resp = self
            .http
            .get(&url)
            .timeout(FETCH_TIMEOUT)
            .send()
            .await
            .map_err(transport(&url))
            .map_err(fetch_err)?;
        let jwks: Jwks = json(&url, resp).await.map_err(fetch_err)?;
        let mut keys = HashMap::new();
        for jwk in jwks.keys {
            match jwk.verifying_key() {
                Ok(k) => {
                    keys.insert(jwk.kid.clone(), k);
                }
                Err(e) => {
                    tracing::warn!(issuer, kid = %jwk.kid, error = %e, "ignoring unusable key in JWKS")
                }
            }
        }
        Ok(keys)
    }
}
