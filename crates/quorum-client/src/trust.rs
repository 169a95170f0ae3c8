//! The issuers a component trusts, and their keys: fetched by OIDC discovery and JWKS, cached by
//! (issuer, kid), refreshed at most once per unknown kid.

use serde::{Deserialize, Serialize};

/// One trusted IdP, as written in a worker's or store's config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustedIssuer {
    /// The issuer URL, compared exactly with a token's `iss` (no trailing-slash folding).
    pub issuer: String,
}
