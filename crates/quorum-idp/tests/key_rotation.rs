//! Signing-key rotation of a running IdP, through real HTTP: tokens signed by the old key keep
//! verifying until they expire, new tokens carry the new kid and verify at a verifier that cached
//! the old JWKS (after one refetch), the old key leaves JWKS when its last token has expired, and
//! a burst of made-up kids costs the IdP at most one JWKS request per verifier.
//!
//! The IdP's issuer is a counting pass-through proxy on 127.0.0.1:0, so verifiers fetch
//! discovery and JWKS through it and the test counts their JWKS requests; token requests go to
//! the IdP directly.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::extract::State;
use axum::http::{StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use ed25519_dalek::SigningKey;
use quorum_client::idp::{IdpClient, TokenFor};
use quorum_client::trust::{TrustError, TrustedIssuer, TrustedIssuers};
use quorum_idp::{ClientConfig, Config, KeyAdmin, KeyState, hash_secret};
use quorum_token::{Claims, IssuerKey, Jwks, TYP_ACCESS, TYP_JOB, TokenError};
use tokio_util::sync::CancellationToken;

/// The whole test finishes in this time or fails.
const BOUND: Duration = Duration::from_secs(120);
/// Short, so the old key's tokens expire and the key retires within the test.
const MAX_LIFETIME: i64 = 3;
/// The skew a retired key stays published past its tokens' lifetime.
const SKEW: i64 = quorum_token::LEEWAY_SECS as i64;
const CLIENT: (&str, &str, &str) = ("ctl-dinah", "dinah", "dinah-secret");
/// The key the IdP had before key rings existed (its legacy key file), known to the test so it
/// can play a thief holding the old key after retirement.
const OLD_SEED: [u8; 32] = [7; 32];

struct Proxy {
    upstream: String,
    http: reqwest::Client,
    jwks_fetches: AtomicUsize,
}

async fn forward(State(p): State<Arc<Proxy>>, uri: Uri) -> Response {
    if uri.path() == "/jwks" {
        p.jwks_fetches.fetch_add(1, Ordering::SeqCst);
    }
    let resp = match p.http.get(format!("{}{uri}", p.upstream)).send().await {
        Ok(resp) => resp,
        Err(e) => return (StatusCode::BAD_GATEWAY, e.to_string()).into_response(),
    };
    let status = StatusCode::from_u16(resp.status().as_u16()).unwrap();
    let body = resp.bytes().await.unwrap_or_default();
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

fn config(data_dir: &Path, issuer: &str) -> Config {
    Config {
        listen: "127.0.0.1:0".into(),
        data_dir: data_dir.to_path_buf(),
        issuer: Some(issuer.into()),
        max_token_lifetime_secs: MAX_LIFETIME,
        clients: vec![ClientConfig {
            id: CLIENT.0.into(),
            tenant: CLIENT.1.into(),
            secret_hash: hash_secret(CLIENT.2),
        }],
    }
}

fn verifier(issuer: &str) -> TrustedIssuers {
    TrustedIssuers::new(vec![TrustedIssuer::any_tenant(issuer)])
}

async fn verify(v: &TrustedIssuers, token: &str, issuer: &str) -> Result<Claims, TrustError> {
    v.verify(token, TYP_ACCESS, issuer, 3600).await
}

/// An access token for this IdP, signed by `key` (a thief's, or made up), valid for a minute.
fn forged(issuer: &str, key: &IssuerKey) -> String {
    let now = quorum_service::now_unix();
    let claims = Claims {
        iss: issuer.into(),
        sub: CLIENT.0.into(),
        aud: issuer.into(),
        exp: now + 60,
        nbf: now,
        iat: now,
        jti: quorum_token::new_jti(),
        tenant: CLIENT.1.into(),
        scope: None,
    };
    quorum_token::mint(TYP_ACCESS, &claims, key)
}

async fn published_kids(issuer: &str) -> Vec<String> {
    let jwks: Jwks = reqwest::get(format!("{issuer}/jwks"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    jwks.keys.into_iter().map(|k| k.kid).collect()
}

fn is_unknown_key(r: &Result<Claims, TrustError>, kid: &str) -> bool {
    matches!(r, Err(TrustError::Token(TokenError::UnknownKey { kid: k, .. })) if k == kid)
}

#[tokio::test]
async fn a_rotation_keeps_old_tokens_valid_until_they_expire_and_then_drops_the_old_key() {
    let dir = tempfile::tempdir().unwrap();
    // The IdP upgrades from a single key file: its key becomes the ring's first key.
    quorum_service::write_private(&dir.path().join(quorum_idp::LEGACY_KEY_FILE), &OLD_SEED)
        .unwrap();
    let old_key = IssuerKey::new(SigningKey::from_bytes(&OLD_SEED));

    let idp_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let idp_url = format!("http://{}", idp_listener.local_addr().unwrap());
    let proxy_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let issuer = format!("http://{}", proxy_listener.local_addr().unwrap());
    let proxy = Arc::new(Proxy {
        upstream: idp_url.clone(),
        http: reqwest::Client::new(),
        jwks_fetches: AtomicUsize::new(0),
    });
    let shutdown = CancellationToken::new();
    let cfg = config(dir.path(), &issuer);
    let idp_task = tokio::spawn(quorum_idp::run(idp_listener, cfg.clone(), shutdown.clone()));
    let router = axum::Router::new()
        .fallback(forward)
        .with_state(proxy.clone());
    let proxy_task = tokio::spawn(quorum_service::serve(
        proxy_listener,
        router,
        shutdown.clone(),
    ));
    let fetches = || proxy.jwks_fetches.load(Ordering::SeqCst);
    let client = IdpClient::new(&idp_url, CLIENT.0, CLIENT.2);

    tokio::time::timeout(BOUND, async {
        // Before the rotation: the imported key signs, and the key file is gone.
        let a = verifier(&issuer);
        let t1 = client.access_token().await.unwrap().access_token;
        assert_eq!(quorum_token::peek(&t1).unwrap().kid, old_key.kid);
        verify(&a, &t1, &issuer).await.unwrap();
        assert_eq!(fetches(), 1);
        assert!(!dir.path().join(quorum_idp::LEGACY_KEY_FILE).exists());

        // Rotate while the IdP runs.
        let admin = KeyAdmin::open(&cfg).await.unwrap();
        let rotated_at = quorum_service::now_unix();
        let new = admin.rotate().await.unwrap();
        assert_ne!(new.kid, old_key.kid);
        let listed = admin.list().await.unwrap();
        assert_eq!(listed[0].kid, new.kid);
        assert_eq!(listed[0].state, KeyState::Active);
        assert_eq!(listed[1].kid, old_key.kid);
        let KeyState::Retiring { until } = listed[1].state else {
            panic!("the old key is retiring: {listed:?}");
        };
        assert!(
            (rotated_at + MAX_LIFETIME + SKEW..=rotated_at + MAX_LIFETIME + SKEW + 2)
                .contains(&until)
        );
        let listing = serde_json::to_string(&listed).unwrap();
        assert!(listing.contains(r#""state":"retiring""#), "{listing}");
        // The old private key is gone from the database and its WAL.
        for name in ["idp.db", "idp.db-wal"] {
            let bytes = std::fs::read(dir.path().join(name)).unwrap_or_default();
            assert!(
                !bytes.windows(32).any(|w| w == OLD_SEED),
                "{name} still holds the rotated-out private key"
            );
        }

        // New tokens carry the new kid; the verifier that cached the old JWKS refetches once.
        let t2 = client.access_token().await.unwrap().access_token;
        assert_eq!(quorum_token::peek(&t2).unwrap().kid, new.kid);
        verify(&a, &t2, &issuer).await.unwrap();
        assert_eq!(fetches(), 2, "one refetch for the rotated-in kid");
        verify(&a, &t2, &issuer).await.unwrap();
        verify(&a, &t1, &issuer).await.unwrap();
        assert_eq!(fetches(), 2, "both keys are cached now");
        // A verifier arriving now finds both keys in JWKS.
        let b = verifier(&issuer);
        verify(&b, &t1, &issuer).await.unwrap();
        verify(&b, &t2, &issuer).await.unwrap();
        assert_eq!(
            published_kids(&issuer).await,
            [new.kid.clone(), old_key.kid.clone()]
        );
        // The IdP still takes an access token signed before the rotation, and what it issues
        // now carries the new kid.
        let job = client
            .exchange(
                &t1,
                &TokenFor {
                    token_type: quorum_api::v1::idp::TOKEN_TYPE_JOB,
                    audience: "worker:w1".into(),
                    build: "b1".into(),
                    job: Some("build".into()),
                    assignment: Some("a1".into()),
                    lifetime_secs: MAX_LIFETIME,
                    constraints: Default::default(),
                },
            )
            .await
            .unwrap()
            .access_token;
        assert_eq!(quorum_token::peek(&job).unwrap().kid, new.kid);
        b.verify(&job, TYP_JOB, "worker:w1", 3600).await.unwrap();

        // A burst of made-up kids at a verifier with a cached key set: one refetch in all.
        let c = verifier(&issuer);
        verify(&c, &t2, &issuer).await.unwrap();
        let before = fetches();
        let thieves: Vec<IssuerKey> = (0..40u8)
            .map(|i| IssuerKey::new(SigningKey::from_bytes(&[i.wrapping_add(100); 32])))
            .collect();
        let burst = thieves.iter().map(|k| {
            let token = forged(&issuer, k);
            let c = &c;
            let issuer = &issuer;
            async move { (k.kid.clone(), verify(c, &token, issuer).await) }
        });
        for (kid, result) in futures::future::join_all(burst).await {
            assert!(is_unknown_key(&result, &kid), "{kid}: {result:?}");
        }
        assert_eq!(
            fetches() - before,
            1,
            "a burst of unknown kids costs one refetch"
        );

        // The old key's tokens expire on their own; after its window the key leaves JWKS.
        let retire_at = until + 1;
        while quorum_service::now_unix() < retire_at {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert!(matches!(
            verify(&a, &t1, &issuer).await,
            Err(TrustError::Token(TokenError::Expired))
        ));
        assert_eq!(
            published_kids(&issuer).await,
            std::slice::from_ref(&new.kid)
        );
        let listed = admin.list().await.unwrap();
        assert_eq!(listed[1].state, KeyState::Retired { since: until });
        // A thief holding the old private key mints a fresh token: refused by a verifier that
        // fetches keys now, and by the IdP's own token exchange.
        let stolen = forged(&issuer, &old_key);
        let d = verifier(&issuer);
        let refused = verify(&d, &stolen, &issuer).await;
        assert!(is_unknown_key(&refused, &old_key.kid), "{refused:?}");
        let exchanged = client
            .exchange(
                &stolen,
                &TokenFor {
                    token_type: quorum_api::v1::idp::TOKEN_TYPE_JOB,
                    audience: "worker:w1".into(),
                    build: "b1".into(),
                    job: None,
                    assignment: None,
                    lifetime_secs: MAX_LIFETIME,
                    constraints: Default::default(),
                },
            )
            .await;
        assert!(exchanged.is_err(), "{exchanged:?}");
        // New tokens are still fine.
        let t3 = client.access_token().await.unwrap().access_token;
        verify(&d, &t3, &issuer).await.unwrap();
        admin.close().await;
    })
    .await
    .expect("test ran past its time bound");

    shutdown.cancel();
    idp_task.await.unwrap().unwrap();
    proxy_task.await.unwrap().unwrap();
}

#[tokio::test]
async fn rotation_keeps_exactly_one_private_key_and_the_database_private() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "http://idp.invalid");
    tokio::time::timeout(BOUND, async {
        let admin = KeyAdmin::open(&cfg).await.unwrap();
        // Rotating an IdP that never started creates its first key, then the second.
        let first = admin.rotate().await.unwrap();
        let second = admin.rotate().await.unwrap();
        let third = admin.rotate().await.unwrap();
        let listed = admin.list().await.unwrap();
        let kids: Vec<&str> = listed.iter().map(|k| k.kid.as_str()).collect();
        assert_eq!(kids.len(), 4, "{listed:?}");
        assert_eq!(kids[0], third.kid);
        assert!(kids.contains(&first.kid.as_str()) && kids.contains(&second.kid.as_str()));
        let active = listed
            .iter()
            .filter(|k| k.state == KeyState::Active)
            .count();
        assert_eq!(active, 1);
        let pool = sqlx::SqlitePool::connect(&format!(
            "sqlite://{}",
            dir.path().join(quorum_idp::DB_FILE).display()
        ))
        .await
        .unwrap();
        let private: Vec<String> =
            sqlx::query_scalar("SELECT kid FROM signing_keys WHERE private_key IS NOT NULL")
                .fetch_all(&pool)
                .await
                .unwrap();
        assert_eq!(
            private,
            std::slice::from_ref(&third.kid),
            "only the active key keeps its private half"
        );
        pool.close().await;
        let json = serde_json::to_string(&listed).unwrap();
        for word in ["private", "seed", "\"d\""] {
            assert!(!json.contains(word), "list leaks `{word}`: {json}");
        }
        admin.close().await;
        for name in ["idp.db", "idp.db-wal", "idp.db-shm"] {
            if let Ok(meta) = std::fs::metadata(dir.path().join(name)) {
                assert_eq!(meta.permissions().mode() & 0o777, 0o600, "{name}");
            }
        }
    })
    .await
    .expect("test ran past its time bound");
}

#[tokio::test]
async fn a_world_readable_database_is_made_private_when_opened() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join(quorum_idp::DB_FILE);
    std::fs::write(&db, b"").unwrap();
    std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o644)).unwrap();
    let cfg = config(dir.path(), "http://idp.invalid");
    let admin = KeyAdmin::open(&cfg).await.unwrap();
    admin.rotate().await.unwrap();
    admin.close().await;
    assert_eq!(
        std::fs::metadata(&db).unwrap().permissions().mode() & 0o777,
        0o600
    );
}

#[tokio::test]
async fn a_hanging_issuer_holds_up_only_the_tokens_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let idp_url = format!("http://{}", listener.local_addr().unwrap());
    let shutdown = CancellationToken::new();
    let idp_task = tokio::spawn(quorum_idp::run(
        listener,
        config(dir.path(), &idp_url),
        shutdown.clone(),
    ));
    // A trusted issuer that accepts connections and never answers.
    let tarpit = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let tarpit_url = format!("http://{}", tarpit.local_addr().unwrap());
    let held = tokio::spawn(async move {
        let mut sockets = Vec::new();
        while let Ok((socket, _)) = tarpit.accept().await {
            sockets.push(socket);
        }
    });
    let v = Arc::new(TrustedIssuers::new(vec![
        TrustedIssuer::any_tenant(&idp_url),
        TrustedIssuer::any_tenant(&tarpit_url),
    ]));

    tokio::time::timeout(BOUND, async {
        let stuck = {
            let v = v.clone();
            let token = forged(
                &tarpit_url,
                &IssuerKey::new(SigningKey::from_bytes(&[5; 32])),
            );
            let tarpit_url = tarpit_url.clone();
            tokio::spawn(async move {
                let started = std::time::Instant::now();
                (
                    v.verify(&token, TYP_ACCESS, &tarpit_url, 3600).await,
                    started.elapsed(),
                )
            })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!stuck.is_finished(), "the tarpit holds its verification");
        let token = IdpClient::new(&idp_url, CLIENT.0, CLIENT.2)
            .access_token()
            .await
            .unwrap()
            .access_token;
        let claims = tokio::time::timeout(Duration::from_secs(3), verify(&v, &token, &idp_url))
            .await
            .expect("another issuer's token is not held up by the hanging one")
            .unwrap();
        assert_eq!(claims.tenant, CLIENT.1);
        let (result, took) = stuck.await.unwrap();
        assert!(
            matches!(&result, Err(TrustError::Fetch { issuer, .. }) if *issuer == tarpit_url),
            "{result:?}"
        );
        assert!(
            took < Duration::from_secs(15),
            "the fetch gave up after {took:?}"
        );
    })
    .await
    .expect("test ran past its time bound");
    held.abort();
    shutdown.cancel();
    idp_task.await.unwrap().unwrap();
}
