//! The adversarial table, for every case that needs no network: tokens forged by hand (raw
//! header and payload JSON, signed with Ed25519 or HMAC) must each be refused with the error
//! that names what is wrong.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use ed25519_dalek::{Signer as _, SigningKey};
use quorum_token::{
    Claims, Expect, IssuerKey, Scope, TYP_JOB, TYP_REVOKE, TYP_UPLOAD, TokenError, mint, peek,
    verify,
};
use serde_json::{Value, json};

const ISS: &str = "https://idp.example";
const AUD: &str = "worker:alice-1";

fn key() -> IssuerKey {
    IssuerKey::new(SigningKey::from_bytes(&[7; 32]))
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn expect(typ: &'static str) -> Expect<'static> {
    Expect {
        typ,
        issuer: ISS,
        audience: AUD,
        max_lifetime_secs: 3600,
    }
}

/// A well-formed payload; cases edit it.
fn payload() -> Value {
    let t = now();
    json!({
        "iss": ISS, "sub": "ctl-dinah", "aud": AUD, "exp": t + 600, "nbf": t, "iat": t,
        "jti": "j-1", "tenant": "dinah", "scope": {"controller": "ctl-dinah", "build": "12"}
    })
}

fn header(k: &IssuerKey, typ: &str) -> Value {
    json!({"alg": "EdDSA", "typ": typ, "kid": k.kid})
}

/// Signs raw header and payload text with `signer`, exactly as given (duplicates and all).
fn forge_raw(header: &str, payload: &str, signer: &SigningKey) -> String {
    let input = format!(
        "{}.{}",
        B64URL.encode(header.as_bytes()),
        B64URL.encode(payload.as_bytes())
    );
    let sig = signer.sign(input.as_bytes());
    format!("{input}.{}", B64URL.encode(sig.to_bytes()))
}

fn forge(header: &Value, payload: &Value, signer: &SigningKey) -> String {
    forge_raw(&header.to_string(), &payload.to_string(), signer)
}

fn check(token: &str, typ: &'static str) -> Result<Claims, TokenError> {
    verify(token, &key().key.verifying_key(), &expect(typ))
}

#[test]
fn a_hand_forged_token_with_the_right_key_verifies() {
    // The baseline: the forging helpers themselves produce tokens the verifier accepts, so each
    // refusal below is caused by the one thing the case changes.
    let k = key();
    let claims = check(&forge(&header(&k, TYP_JOB), &payload(), &k.key), TYP_JOB).unwrap();
    assert_eq!(claims.tenant, "dinah");
    assert_eq!(claims.scope.unwrap().build, "12");
}

#[test]
fn expired() {
    let k = key();
    let mut p = payload();
    let t = now() - 1000;
    p["iat"] = json!(t);
    p["nbf"] = json!(t);
    p["exp"] = json!(t + 600);
    let err = check(&forge(&header(&k, TYP_JOB), &p, &k.key), TYP_JOB).unwrap_err();
    assert_eq!(err, TokenError::Expired);
    assert_eq!(err.to_string(), "token has expired");
}

#[test]
fn not_before_in_the_future() {
    let k = key();
    let mut p = payload();
    p["nbf"] = json!(now() + 300);
    assert_eq!(
        check(&forge(&header(&k, TYP_JOB), &p, &k.key), TYP_JOB),
        Err(TokenError::NotYetValid)
    );
}

#[test]
fn missing_exp() {
    let k = key();
    let mut p = payload();
    p.as_object_mut().unwrap().remove("exp");
    let err = check(&forge(&header(&k, TYP_JOB), &p, &k.key), TYP_JOB).unwrap_err();
    assert_eq!(err, TokenError::Claims("`exp` is missing".into()));
}

#[test]
fn exp_as_a_string() {
    let k = key();
    let mut p = payload();
    p["exp"] = json!((now() + 600).to_string());
    let err = check(&forge(&header(&k, TYP_JOB), &p, &k.key), TYP_JOB).unwrap_err();
    assert!(
        matches!(&err, TokenError::Claims(m) if m.contains("`exp` must be an integer")),
        "{err}"
    );
}

#[test]
fn lifetime_longer_than_policy() {
    let k = key();
    let mut p = payload();
    p["exp"] = json!(now() + 7200);
    let err = check(&forge(&header(&k, TYP_JOB), &p, &k.key), TYP_JOB).unwrap_err();
    assert_eq!(
        err,
        TokenError::Lifetime {
            lifetime: 7200,
            max: 3600
        }
    );
    assert_eq!(
        err.to_string(),
        "token lives 7200 s, longer than the 3600 s allowed"
    );
}

#[test]
fn wrong_audience() {
    let k = key();
    let mut p = payload();
    p["aud"] = json!("worker:bob-1");
    assert_eq!(
        check(&forge(&header(&k, TYP_JOB), &p, &k.key), TYP_JOB),
        Err(TokenError::WrongAudience)
    );
}

#[test]
fn multi_valued_audience() {
    // Both values would pass a "contains" check: the list itself must be refused.
    let k = key();
    let mut p = payload();
    p["aud"] = json!([AUD, "store:bettina"]);
    let err = check(&forge(&header(&k, TYP_JOB), &p, &k.key), TYP_JOB).unwrap_err();
    assert_eq!(
        err,
        TokenError::Claims("`aud` must name exactly one audience, as a string".into())
    );
}

#[test]
fn issuer_differing_by_a_trailing_slash() {
    let k = key();
    let mut p = payload();
    p["iss"] = json!(format!("{ISS}/"));
    assert_eq!(
        check(&forge(&header(&k, TYP_JOB), &p, &k.key), TYP_JOB),
        Err(TokenError::WrongIssuer)
    );
}

#[test]
fn alg_none() {
    let k = key();
    let h = json!({"alg": "none", "typ": TYP_JOB, "kid": k.kid});
    // An unsecured JWS has an empty signature part.
    let token = format!(
        "{}.{}.",
        B64URL.encode(h.to_string()),
        B64URL.encode(payload().to_string())
    );
    let err = check(&token, TYP_JOB).unwrap_err();
    assert_eq!(err, TokenError::AlgorithmNotAllowed("none".into()));
    assert_eq!(
        peek(&token),
        Err(TokenError::AlgorithmNotAllowed("none".into()))
    );
    assert_eq!(
        err.to_string(),
        "token algorithm `none` is refused; only EdDSA is accepted"
    );
}

#[test]
fn hs256_signed_with_the_public_key_as_secret() {
    // The classic confusion: a verifier that lets the header pick the algorithm would check
    // this HMAC with the public key bytes as the secret, and accept it.
    let k = key();
    let public = k.key.verifying_key();
    let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    h.typ = Some(TYP_JOB.into());
    h.kid = Some(k.kid.clone());
    for secret in [public.as_bytes().to_vec(), k.jwk().x.into_bytes()] {
        let token = jsonwebtoken::encode(
            &h,
            &payload(),
            &jsonwebtoken::EncodingKey::from_secret(&secret),
        )
        .unwrap();
        assert_eq!(
            check(&token, TYP_JOB),
            Err(TokenError::AlgorithmNotAllowed("HS256".into()))
        );
    }
}

#[test]
fn other_algorithms() {
    let k = key();
    for alg in ["RS256", "ES256", "PS256", "EdDSA ", "eddsa", "Ed25519"] {
        let h = json!({"alg": alg, "typ": TYP_JOB, "kid": k.kid});
        assert_eq!(
            check(&forge(&h, &payload(), &k.key), TYP_JOB),
            Err(TokenError::AlgorithmNotAllowed(alg.into())),
            "{alg}"
        );
    }
    let h = json!({"alg": 1, "typ": TYP_JOB, "kid": k.kid});
    assert!(matches!(
        check(&forge(&h, &payload(), &k.key), TYP_JOB),
        Err(TokenError::AlgorithmNotAllowed(_))
    ));
}

#[test]
fn key_url_and_embedded_key_headers_are_ignored() {
    let k = key();
    let attacker = IssuerKey::new(SigningKey::from_bytes(&[66; 32]));
    let with_pointers = |kid: &str| {
        json!({
            "alg": "EdDSA", "typ": TYP_JOB, "kid": kid,
            "jku": "http://127.0.0.1:9/jwks", "x5u": "http://127.0.0.1:9/cert",
            "jwk": attacker.jwk(),
        })
    };
    // Signed by the attacker's key, which the header carries and points at: refused, because
    // the verifier checks with the key it found itself.
    let forged = forge(&with_pointers(&attacker.kid), &payload(), &attacker.key);
    assert_eq!(check(&forged, TYP_JOB), Err(TokenError::Signature));
    // Signed by the trusted key: the extra headers change nothing and choose nothing.
    let genuine = forge(&with_pointers(&k.kid), &payload(), &k.key);
    assert_eq!(check(&genuine, TYP_JOB).unwrap().jti, "j-1");
}

#[test]
fn critical_extensions_are_refused() {
    let k = key();
    let h = json!({"alg": "EdDSA", "typ": TYP_JOB, "kid": k.kid, "crit": ["exp"], "exp": 1});
    assert!(matches!(
        check(&forge(&h, &payload(), &k.key), TYP_JOB),
        Err(TokenError::Critical(_))
    ));
}

#[test]
fn tampered_payload() {
    let k = key();
    let token = forge(&header(&k, TYP_JOB), &payload(), &k.key);
    let parts: Vec<&str> = token.split('.').collect();
    let mut p = payload();
    p["tenant"] = json!("eliza");
    let tampered = format!("{}.{}.{}", parts[0], B64URL.encode(p.to_string()), parts[2]);
    assert_eq!(check(&tampered, TYP_JOB), Err(TokenError::Signature));
}

#[test]
fn truncated_signature() {
    let k = key();
    let token = forge(&header(&k, TYP_JOB), &payload(), &k.key);
    for cut in [1, 4, 40, 86] {
        let truncated = &token[..token.len() - cut];
        let err = check(truncated, TYP_JOB).unwrap_err();
        assert!(
            matches!(err, TokenError::Signature | TokenError::Malformed(_)),
            "cut {cut}: {err}"
        );
    }
    let no_signature = token.rsplit_once('.').unwrap().0;
    assert!(matches!(
        check(no_signature, TYP_JOB),
        Err(TokenError::Malformed(_))
    ));
}

#[test]
fn duplicate_json_keys() {
    let k = key();
    let t = now();
    let body = |extra: &str| {
        format!(
            r#"{{"iss":"{ISS}","sub":"ctl-dinah","aud":"{AUD}","exp":{},"nbf":{t},"iat":{t},"jti":"j-1","tenant":"dinah",{extra}"scope":{{"controller":"c","build":"12"}}}}"#,
            t + 600
        )
    };
    let h = header(&k, TYP_JOB).to_string();
    // A second `tenant`: a last-one-wins parser would read "eliza".
    let dup = forge_raw(&h, &body(r#""tenant":"eliza","#), &k.key);
    assert_eq!(
        check(&dup, TYP_JOB),
        Err(TokenError::DuplicateKey {
            part: "payload",
            key: "tenant".into()
        })
    );
    assert!(matches!(peek(&dup), Err(TokenError::DuplicateKey { .. })));
    // Nested objects are checked too.
    let nested = body("").replace(r#""build":"12""#, r#""build":"12","build":"123""#);
    assert_eq!(
        check(&forge_raw(&h, &nested, &k.key), TYP_JOB),
        Err(TokenError::DuplicateKey {
            part: "payload",
            key: "build".into()
        })
    );
    // And the header.
    let h2 = format!(
        r#"{{"alg":"EdDSA","typ":"{TYP_UPLOAD}","typ":"{TYP_JOB}","kid":"{}"}}"#,
        k.kid
    );
    assert_eq!(
        check(&forge_raw(&h2, &body(""), &k.key), TYP_JOB),
        Err(TokenError::DuplicateKey {
            part: "header",
            key: "typ".into()
        })
    );
    // The same text without duplicates verifies, so the refusals are about the duplicates.
    assert!(check(&forge_raw(&h, &body(""), &k.key), TYP_JOB).is_ok());
}

#[test]
fn each_kind_is_refused_as_another() {
    let k = key();
    let claims: Claims = serde_json::from_value(payload()).unwrap();
    let job = mint(TYP_JOB, &claims, &k);
    let upload = mint(TYP_UPLOAD, &claims, &k);
    let revoke = mint(TYP_REVOKE, &claims, &k);
    let err = check(&job, TYP_UPLOAD).unwrap_err();
    assert_eq!(
        err.to_string(),
        "token type is `quorum-job+jwt`, expected `quorum-upload+jwt`"
    );
    assert!(matches!(
        check(&upload, TYP_JOB),
        Err(TokenError::WrongType { .. })
    ));
    assert!(matches!(
        check(&revoke, TYP_UPLOAD),
        Err(TokenError::WrongType { .. })
    ));
    assert!(matches!(
        check(&upload, TYP_REVOKE),
        Err(TokenError::WrongType { .. })
    ));
    // Without any typ at all.
    let h = json!({"alg": "EdDSA", "kid": k.kid});
    assert!(matches!(
        check(&forge(&h, &payload(), &k.key), TYP_JOB),
        Err(TokenError::WrongType { .. })
    ));
    assert!(check(&job, TYP_JOB).is_ok());
}

#[test]
fn constraint_claims_round_trip_and_stay_optional() {
    let k = key();
    let mut claims: Claims = serde_json::from_value(payload()).unwrap();
    // Absent constraints are not serialized, so tokens without them keep their old shape.
    let bare = serde_json::to_value(&claims).unwrap();
    assert_eq!(
        bare["scope"],
        json!({"controller": "ctl-dinah", "build": "12"})
    );
    claims.scope = Some(Scope {
        max_files: Some(3),
        max_bytes: Some(1000),
        max_calls: Some(10),
        source_cidrs: vec!["10.0.0.0/8".into(), "::1/128".into()],
        ..claims.scope.unwrap()
    });
    let token = mint(TYP_UPLOAD, &claims, &k);
    let back = check(&token, TYP_UPLOAD).unwrap();
    assert_eq!(back.scope, claims.scope);
}
