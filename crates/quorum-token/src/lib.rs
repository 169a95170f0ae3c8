//! Quorum's tokens: EdDSA-signed JWTs with an explicit `typ` per kind, minted by an IdP and
//! checked by workers and stores against the issuers *they* trust. No IO: the caller fetches keys
//! (JWKS) and hands them in.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use ed25519_dalek::{Signer as _, SigningKey, VerifyingKey};
use jsonwebtoken::{Algorithm, DecodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

/// The controller's own access token (RFC 9068 style).
pub const TYP_ACCESS: &str = "at+jwt";
/// A job token: lets one worker accept one assignment.
pub const TYP_JOB: &str = "quorum-job+jwt";
/// An upload token: lets one assignment write blobs and one manifest at one store.
pub const TYP_UPLOAD: &str = "quorum-upload+jwt";
/// A read token: lets a tenant's client read one build's artifacts at one store.
pub const TYP_READ: &str = "quorum-read+jwt";
/// A revoke token: lets a controller revoke the tokens of one build of its tenant at one store.
pub const TYP_REVOKE: &str = "quorum-revoke+jwt";

/// Clock skew tolerated between parties, in seconds.
pub const LEEWAY_SECS: u64 = 5;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub iss: String,
    pub sub: String,
    /// Exactly one audience: a multi-valued `aud` fails to parse and is refused.
    pub aud: String,
    pub exp: i64,
    pub nbf: i64,
    pub iat: i64,
    pub jti: String,
    pub tenant: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<Scope>,
}

/// What a job, upload or read token is for. Set by the controller when it asks for the token,
/// enforced where the token is used.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Scope {
    pub controller: String,
    pub build: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assignment: Option<String>,
    /// Most blobs the token may upload (each upload attempt counts, failed ones too).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_files: Option<u64>,
    /// Most bytes the token may send in blob bodies, counted as they arrive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bytes: Option<u64>,
    /// Most requests the token may make at the place it is used (failed ones count too).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_calls: Option<u64>,
    /// Source networks (CIDR, such as `10.0.0.0/8` or `::1/128`) the token may be used from;
    /// empty means anywhere.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub source_cidrs: Vec<String>,
}

/// A signing key with the id it is published under in the issuer's JWKS.
#[derive(Clone)]
pub struct IssuerKey {
    pub kid: String,
    pub key: SigningKey,
}

impl IssuerKey {
    /// The kid is derived from the public key, so a rotated key always gets a new id.
    pub fn new(key: SigningKey) -> IssuerKey {
        let kid = Jwk::thumbprint(&key.verifying_key());
        IssuerKey { kid, key }
    }

    pub fn jwk(&self) -> Jwk {
        Jwk::from_key(&self.kid, &self.key.verifying_key())
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("token is not a well-formed JWT: {0}")]
    Malformed(String),
    #[error("token type is `{got}`, expected `{expected}`")]
    WrongType { expected: String, got: String },
    #[error("token algorithm must be EdDSA")]
    Algorithm,
    #[error("token algorithm `{0}` is refused; only EdDSA is accepted")]
    AlgorithmNotAllowed(String),
    #[error("token {part} has the key `{key}` more than once")]
    DuplicateKey { part: &'static str, key: String },
    #[error("token header marks `{0}` as critical; no extension is understood here")]
    Critical(String),
    #[error("issuer `{iss}` may not speak for tenant `{tenant}`")]
    TenantNotAllowed { iss: String, tenant: String },
    #[error("token header has no `kid`")]
    NoKeyId,
    #[error("issuer `{0}` is not trusted here")]
    UntrustedIssuer(String),
    #[error("issuer `{iss}` has no key `{kid}`")]
    UnknownKey { iss: String, kid: String },
    #[error("token signature does not verify")]
    Signature,
    #[error("token has expired")]
    Expired,
    #[error("token is not valid yet")]
    NotYetValid,
    #[error("token is for another audience")]
    WrongAudience,
    #[error("token was issued by another issuer")]
    WrongIssuer,
    #[error("token lives {lifetime} s, longer than the {max} s allowed")]
    Lifetime { lifetime: i64, max: i64 },
    #[error("token claims are invalid: {0}")]
    Claims(String),
}

/// Signs `claims` as a JWT of type `typ`: the JWS compact serialization (RFC 7515 §7.1) of
/// the header and claims, signed with the issuer's key as it is. `jsonwebtoken::encode` takes
/// the key as PKCS#8 and derives its public half again on every token (a scalar
/// multiplication as costly as the signature; two per job take-up). Verification stays
/// `jsonwebtoken`'s (`verify`), which the tests run on every minted token.
pub fn mint(typ: &str, claims: &Claims, key: &IssuerKey) -> String {
    let mut header = Header::new(Algorithm::EdDSA);
    header.typ = Some(typ.to_string());
    header.kid = Some(key.kid.clone());
    let header = serde_json::to_vec(&header).expect("a JOSE header serializes");
    let claims = serde_json::to_vec(claims).expect("claims serialize");
    let mut token = format!("{}.{}", B64URL.encode(header), B64URL.encode(claims));
    let signature = key.key.sign(token.as_bytes());
    token.push('.');
    token.push_str(&B64URL.encode(signature.to_bytes()));
    token
}

/// What can be read from a token before its signature is checked: enough to pick the key.
/// Nothing here may be trusted until [`verify`] succeeds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unverified {
    pub typ: String,
    pub kid: String,
    pub iss: String,
    /// Every claim, unchecked: for bookkeeping on tokens the reader was just issued itself.
    pub claims: serde_json::Map<String, serde_json::Value>,
}

pub fn peek(token: &str) -> Result<Unverified, TokenError> {
    let parts = Parts::split(token)?;
    let header = parts.header()?;
    let kid = header.kid.ok_or(TokenError::NoKeyId)?;
    let payload = parts.payload()?;
    let iss = match payload.get("iss") {
        Some(serde_json::Value::String(s)) => s.clone(),
        _ => return Err(TokenError::Claims("`iss` must be a string".into())),
    };
    Ok(Unverified {
        typ: header.typ,
        kid,
        iss,
        claims: payload,
    })
}

/// The three base64url parts of a compact JWS.
struct Parts<'a> {
    header: &'a str,
    payload: &'a str,
}

/// What this crate reads from a JOSE header. Everything else (`jku`, `x5u`, `jwk`, `x5c`...) is
/// ignored on purpose: keys come only from the verifier's own trust list (RFC 8725 §3.10).
struct CheckedHeader {
    typ: String,
    kid: Option<String>,
}

impl<'a> Parts<'a> {
    fn split(token: &'a str) -> Result<Parts<'a>, TokenError> {
        let mut it = token.split('.');
        match (it.next(), it.next(), it.next(), it.next()) {
            (Some(header), Some(payload), Some(_), None) => Ok(Parts { header, payload }),
            _ => Err(TokenError::Malformed(
                "a JWT has exactly three dot-separated parts".into(),
            )),
        }
    }

    /// The header, refused unless its JSON has no duplicate keys, `alg` is `EdDSA` and no
    /// extension is marked critical.
    fn header(&self) -> Result<CheckedHeader, TokenError> {
        let map = json_object(self.header, "header")?;
        let alg = match map.get("alg") {
            Some(serde_json::Value::String(a)) => a.as_str(),
            Some(other) => return Err(TokenError::AlgorithmNotAllowed(other.to_string())),
            None => return Err(TokenError::Malformed("header has no `alg`".into())),
        };
        if alg != "EdDSA" {
            return Err(TokenError::AlgorithmNotAllowed(alg.to_string()));
        }
        if let Some(crit) = map.get("crit") {
            return Err(TokenError::Critical(crit.to_string()));
        }
        let string = |name: &str| match map.get(name) {
            None => Ok(None),
            Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(TokenError::Malformed(format!(
                "header `{name}` is not a string"
            ))),
        };
        Ok(CheckedHeader {
            typ: string("typ")?.unwrap_or_default(),
            kid: string("kid")?,
        })
    }

    /// The payload as a JSON object, refused if any object in it repeats a key: parsers differ
    /// on which copy wins, so a duplicate could make two verifiers read different claims.
    fn payload(&self) -> Result<serde_json::Map<String, serde_json::Value>, TokenError> {
        json_object(self.payload, "payload")
    }
}

fn json_object(
    part: &str,
    name: &'static str,
) -> Result<serde_json::Map<String, serde_json::Value>, TokenError> {
    let bytes = B64URL
        .decode(part)
        .map_err(|e| TokenError::Malformed(format!("{name} is not base64url: {e}")))?;
    match serde_json::from_slice::<NoDuplicates>(&bytes) {
        Ok(_) => {}
        Err(e) => {
            let msg = e.to_string();
            if let Some(rest) = msg.strip_prefix(DUPLICATE_PREFIX) {
                let key = rest.split('`').next().unwrap_or_default().to_string();
                return Err(TokenError::DuplicateKey { part: name, key });
            }
            return Err(TokenError::Malformed(format!("{name} is not JSON: {msg}")));
        }
    }
    match serde_json::from_slice(&bytes) {
        Ok(serde_json::Value::Object(map)) => Ok(map),
        Ok(_) => Err(TokenError::Malformed(format!(
            "{name} is not a JSON object"
        ))),
        Err(e) => Err(TokenError::Malformed(format!("{name} is not JSON: {e}"))),
    }
}

const DUPLICATE_PREFIX: &str = "duplicate key `";

/// Walks any JSON value and fails on the first object that repeats a key.
struct NoDuplicates;

impl<'de> Deserialize<'de> for NoDuplicates {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<NoDuplicates, D::Error> {
        d.deserialize_any(NoDuplicatesVisitor)
    }
}

struct NoDuplicatesVisitor;

impl<'de> serde::de::Visitor<'de> for NoDuplicatesVisitor {
    type Value = NoDuplicates;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<NoDuplicates, E> {
        Ok(NoDuplicates)
    }
    fn visit_i64<E>(self, _: i64) -> Result<NoDuplicates, E> {
        Ok(NoDuplicates)
    }
    fn visit_u64<E>(self, _: u64) -> Result<NoDuplicates, E> {
        Ok(NoDuplicates)
    }
    fn visit_f64<E>(self, _: f64) -> Result<NoDuplicates, E> {
        Ok(NoDuplicates)
    }
    fn visit_str<E>(self, _: &str) -> Result<NoDuplicates, E> {
        Ok(NoDuplicates)
    }
    fn visit_unit<E>(self) -> Result<NoDuplicates, E> {
        Ok(NoDuplicates)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<NoDuplicates, A::Error> {
        while seq.next_element::<NoDuplicates>()?.is_some() {}
        Ok(NoDuplicates)
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<NoDuplicates, A::Error> {
        let mut seen = std::collections::HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            if !seen.insert(key.clone()) {
                return Err(serde::de::Error::custom(format!(
                    "{DUPLICATE_PREFIX}{key}`"
                )));
            }
            map.next_value::<NoDuplicates>()?;
        }
        Ok(NoDuplicates)
    }
}

/// Checks the claims' shape before any library reads them, so each refusal says exactly what
/// is wrong: one audience as a string, and integer times.
fn check_claim_shapes(
    payload: &serde_json::Map<String, serde_json::Value>,
) -> Result<(), TokenError> {
    match payload.get("aud") {
        Some(serde_json::Value::String(_)) => {}
        Some(serde_json::Value::Array(_)) => {
            return Err(TokenError::Claims(
                "`aud` must name exactly one audience, as a string".into(),
            ));
        }
        Some(_) => return Err(TokenError::Claims("`aud` must be a string".into())),
        None => return Err(TokenError::Claims("`aud` is missing".into())),
    }
    for name in ["exp", "nbf", "iat"] {
        match payload.get(name) {
            Some(v) if v.is_i64() => {}
            Some(_) => {
                return Err(TokenError::Claims(format!(
                    "`{name}` must be an integer number of seconds since the epoch"
                )));
            }
            None => return Err(TokenError::Claims(format!("`{name}` is missing"))),
        }
    }
    Ok(())
}

/// What the verifier expects of a token.
#[derive(Debug, Clone)]
pub struct Expect<'a> {
    pub typ: &'a str,
    pub issuer: &'a str,
    pub audience: &'a str,
    /// Longest lifetime (`exp - iat`) accepted, in seconds.
    pub max_lifetime_secs: i64,
}

/// Verifies the signature with `key` (the key the *verifier* found for the token's issuer and
/// kid), then type, issuer, audience, time window and lifetime.
pub fn verify(token: &str, key: &VerifyingKey, expect: &Expect<'_>) -> Result<Claims, TokenError> {
    let parts = Parts::split(token)?;
    let header = parts.header()?;
    if header.typ != expect.typ {
        return Err(TokenError::WrongType {
            expected: expect.typ.to_string(),
            got: header.typ,
        });
    }
    check_claim_shapes(&parts.payload()?)?;
    let mut v = Validation::new(Algorithm::EdDSA);
    v.leeway = LEEWAY_SECS;
    v.validate_nbf = true;
    v.set_issuer(&[expect.issuer]);
    v.set_audience(&[expect.audience]);
    v.set_required_spec_claims(&["exp", "nbf", "iss", "aud", "sub"]);
    let dec = DecodingKey::from_ed_components(&B64URL.encode(key.as_bytes()))
        .map_err(|_| TokenError::Signature)?;
    let data = jsonwebtoken::decode::<Claims>(token, &dec, &v).map_err(|e| {
        use jsonwebtoken::errors::ErrorKind as K;
        match e.kind() {
            K::InvalidSignature => TokenError::Signature,
            K::ExpiredSignature => TokenError::Expired,
            K::ImmatureSignature => TokenError::NotYetValid,
            K::InvalidAudience => TokenError::WrongAudience,
            K::InvalidIssuer => TokenError::WrongIssuer,
            K::InvalidAlgorithm | K::InvalidAlgorithmName => TokenError::Algorithm,
            K::Json(_) | K::MissingRequiredClaim(_) => TokenError::Claims(e.to_string()),
            _ => TokenError::Malformed(e.to_string()),
        }
    })?;
    let c = data.claims;
    let lifetime = c.exp - c.iat;
    if lifetime > expect.max_lifetime_secs || lifetime <= 0 {
        return Err(TokenError::Lifetime {
            lifetime,
            max: expect.max_lifetime_secs,
        });
    }
    if c.tenant.is_empty() || c.jti.is_empty() {
        return Err(TokenError::Claims(
            "`tenant` and `jti` must not be empty".into(),
        ));
    }
    Ok(c)
}

/// A public key in JWKS form (RFC 8037 OKP / Ed25519).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Jwk {
    pub kty: String,
    pub crv: String,
    pub x: String,
    pub kid: String,
    #[serde(default)]
    pub alg: Option<String>,
    #[serde(default, rename = "use")]
    pub use_: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Jwks {
    pub keys: Vec<Jwk>,
}

impl Jwk {
    pub fn from_key(kid: &str, key: &VerifyingKey) -> Jwk {
        Jwk {
            kty: "OKP".into(),
            crv: "Ed25519".into(),
            x: B64URL.encode(key.as_bytes()),
            kid: kid.to_string(),
            alg: Some("EdDSA".into()),
            use_: Some("sig".into()),
        }
    }

    /// RFC 7638 thumbprint of an Ed25519 key.
    pub fn thumbprint(key: &VerifyingKey) -> String {
        use sha2::Digest as _;
        let canonical = format!(
            r#"{{"crv":"Ed25519","kty":"OKP","x":"{}"}}"#,
            B64URL.encode(key.as_bytes())
        );
        B64URL.encode(sha2::Sha256::digest(canonical.as_bytes()))
    }

    pub fn verifying_key(&self) -> Result<VerifyingKey, TokenError> {
        if self.kty != "OKP" || self.crv != "Ed25519" {
            return Err(TokenError::Algorithm);
        }
        if self.alg.as_deref().is_some_and(|a| a != "EdDSA") {
            return Err(TokenError::Algorithm);
        }
        let bytes = B64URL
            .decode(&self.x)
            .map_err(|e| TokenError::Malformed(format!("jwk x: {e}")))?;
        let arr: [u8; 32] = bytes
            .try_into()
            .map_err(|_| TokenError::Malformed("jwk x is not 32 bytes".into()))?;
        VerifyingKey::from_bytes(&arr)
            .map_err(|_| TokenError::Malformed("jwk x is not an Ed25519 point".into()))
    }
}

/// A fresh random token id.
pub fn new_jti() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(seed: u8) -> IssuerKey {
        IssuerKey::new(SigningKey::from_bytes(&[seed; 32]))
    }

    fn now() -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
    }

    fn claims(lifetime: i64) -> Claims {
        let t = now();
        Claims {
            iss: "http://idp".into(),
            sub: "controller-d".into(),
            aud: "worker:alice-1".into(),
            exp: t + lifetime,
            nbf: t,
            iat: t,
            jti: new_jti(),
            tenant: "dinah".into(),
            scope: Some(Scope {
                controller: "d".into(),
                build: "b".into(),
                job: Some("build".into()),
                assignment: None,
                ..Scope::default()
            }),
        }
    }

    fn expect() -> Expect<'static> {
        Expect {
            typ: TYP_JOB,
            issuer: "http://idp",
            audience: "worker:alice-1",
            max_lifetime_secs: 3600,
        }
    }

    /// The compact serialization written here is byte for byte what `jsonwebtoken::encode`
    /// writes for the same header, claims and key (Ed25519 signatures are deterministic).
    #[test]
    fn minted_token_is_what_jsonwebtoken_encodes() {
        use ed25519_dalek::pkcs8::EncodePrivateKey as _;
        let k = key(3);
        let mut header = Header::new(Algorithm::EdDSA);
        header.typ = Some(TYP_JOB.to_string());
        header.kid = Some(k.kid.clone());
        let der = k.key.to_pkcs8_der().unwrap();
        let c = claims(60);
        let theirs = jsonwebtoken::encode(
            &header,
            &c,
            &jsonwebtoken::EncodingKey::from_ed_der(der.as_bytes()),
        )
        .unwrap();
        assert_eq!(mint(TYP_JOB, &c, &k), theirs);
    }

    #[test]
    fn minted_token_verifies() {
        let k = key(1);
        let t = mint(TYP_JOB, &claims(60), &k);
        let peeked = peek(&t).unwrap();
        assert_eq!(peeked.kid, k.kid);
        assert_eq!(peeked.iss, "http://idp");
        let jwk = k.jwk();
        let c = verify(&t, &jwk.verifying_key().unwrap(), &expect()).unwrap();
        assert_eq!(c.tenant, "dinah");
    }

    #[test]
    fn refusals() {
        let k = key(1);
        let vk = k.key.verifying_key();
        let t = mint(TYP_UPLOAD, &claims(60), &k);
        assert!(matches!(
            verify(&t, &vk, &expect()),
            Err(TokenError::WrongType { .. })
        ));
        let t = mint(TYP_JOB, &claims(60), &k);
        assert_eq!(
            verify(&t, &key(2).key.verifying_key(), &expect()),
            Err(TokenError::Signature)
        );
        let mut e = expect();
        e.audience = "worker:bob";
        assert_eq!(verify(&t, &vk, &e), Err(TokenError::WrongAudience));
        let mut e = expect();
        e.issuer = "http://idp/";
        assert_eq!(verify(&t, &vk, &e), Err(TokenError::WrongIssuer));
        let mut old = claims(60);
        old.exp = now() - 120;
        old.iat = old.exp - 60;
        old.nbf = old.iat;
        assert_eq!(
            verify(&mint(TYP_JOB, &old, &k), &vk, &expect()),
            Err(TokenError::Expired)
        );
        let mut future = claims(600);
        future.nbf = now() + 300;
        assert_eq!(
            verify(&mint(TYP_JOB, &future, &k), &vk, &expect()),
            Err(TokenError::NotYetValid)
        );
        let long = claims(7200);
        assert!(matches!(
            verify(&mint(TYP_JOB, &long, &k), &vk, &expect()),
            Err(TokenError::Lifetime { .. })
        ));
    }

    #[test]
    fn tampered_payload_fails() {
        let k = key(1);
        let t = mint(TYP_JOB, &claims(60), &k);
        let parts: Vec<&str> = t.split('.').collect();
        let mut c = claims(60);
        c.tenant = "eliza".into();
        let forged = format!(
            "{}.{}.{}",
            parts[0],
            B64URL.encode(serde_json::to_vec(&c).unwrap()),
            parts[2]
        );
        assert_eq!(
            verify(&forged, &k.key.verifying_key(), &expect()),
            Err(TokenError::Signature)
        );
    }
}
