//! The identity provider through its real HTTP boundary: a server on 127.0.0.1:0, tokens fetched
//! with `IdpClient` and checked with `TrustedIssuers`, as controllers, workers and stores do.

use std::future::Future;
use std::time::Duration;

use quorum_api::v1::idp::{
    Discovery, GRANT_CLIENT_CREDENTIALS, GRANT_TOKEN_EXCHANGE, MAX_TAKE_UPS, OAuthError,
    TOKEN_TYPE_ACCESS, TOKEN_TYPE_JOB, TOKEN_TYPE_JOB_AND_UPLOAD, TOKEN_TYPE_READ,
    TOKEN_TYPE_UPLOAD, TakeUp, TokenConstraints,
};
use quorum_client::idp::{IdpClient, TakeUpFor, TokenFor};
use quorum_client::trust::{TrustedIssuer, TrustedIssuers};
use quorum_idp::{ClientConfig, Config, hash_secret};
use quorum_token::{Jwks, TYP_ACCESS, TYP_JOB, TYP_READ, TYP_UPLOAD};
use tokio_util::sync::CancellationToken;

/// Every test finishes in this time or fails (Argon2 is slow in debug builds).
const BOUND: Duration = Duration::from_secs(120);

async fn bounded<T>(f: impl Future<Output = T>) -> T {
    tokio::time::timeout(BOUND, f)
        .await
        .expect("test ran past its time bound")
}

struct Idp {
    url: String,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Idp {
    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("the IdP stops when cancelled")
            .unwrap()
            .unwrap();
    }
}

/// (id, tenant, secret) of the clients registered in every test IdP.
const CLIENTS: &[(&str, &str, &str)] = &[
    ("ctl-dinah", "dinah", "dinah-secret"),
    ("ctl-eliza", "eliza", "eliza-secret"),
];

async fn start(data_dir: &std::path::Path, max_token_lifetime_secs: i64) -> Idp {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    // Hashed once per test binary: Argon2 is slow in debug builds.
    static REGISTERED: std::sync::OnceLock<Vec<ClientConfig>> = std::sync::OnceLock::new();
    let clients = REGISTERED
        .get_or_init(|| {
            CLIENTS
                .iter()
                .map(|(id, tenant, secret)| ClientConfig {
                    id: (*id).into(),
                    tenant: (*tenant).into(),
                    secret_hash: hash_secret(secret),
                })
                .collect()
        })
        .clone();
    let config = Config {
        listen: "127.0.0.1:0".into(),
        data_dir: data_dir.to_path_buf(),
        issuer: None,
        max_token_lifetime_secs,
        clients,
    };
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(quorum_idp::run(listener, config, shutdown.clone()));
    Idp {
        url,
        shutdown,
        task,
    }
}

fn client(idp: &Idp, n: usize) -> IdpClient {
    let (id, _, secret) = CLIENTS[n];
    IdpClient::new(&idp.url, id, secret)
}

fn token_for(token_type: &'static str, audience: &str, build: &str) -> TokenFor {
    TokenFor {
        token_type,
        audience: audience.into(),
        build: build.into(),
        job: Some("compile".into()),
        assignment: Some("a-1".into()),
        lifetime_secs: 600,
        constraints: Default::default(),
    }
}

/// Posts a raw form, as a client that does not use `IdpClient` would.
async fn post_form(
    idp: &Idp,
    id: &str,
    secret: &str,
    form: &[(&str, &str)],
) -> (u16, serde_json::Value) {
    let resp = reqwest::Client::new()
        .post(format!("{}/token", idp.url))
        .basic_auth(id, Some(secret))
        .form(form)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap())
}

/// The exchange `IdpClient::exchange` makes, answered with the full OAuth error: the client's
/// error type keeps only the error code of an RFC 6749 body.
async fn exchange_raw(idp: &Idp, n: usize, subject: &str, what: &TokenFor) -> (u16, OAuthError) {
    let (id, _, secret) = CLIENTS[n];
    let lifetime = what.lifetime_secs.to_string();
    let mut form = vec![
        ("grant_type", GRANT_TOKEN_EXCHANGE),
        ("subject_token", subject),
        ("subject_token_type", TOKEN_TYPE_ACCESS),
        ("requested_token_type", what.token_type),
        ("audience", &what.audience),
        ("build", &what.build),
        ("lifetime_secs", &lifetime),
    ];
    form.extend(what.job.as_deref().map(|j| ("job", j)));
    form.extend(what.assignment.as_deref().map(|a| ("assignment", a)));
    let (status, body) = post_form(idp, id, secret, &form).await;
    (status, oauth_error(body))
}

fn oauth_error(body: serde_json::Value) -> OAuthError {
    serde_json::from_value(body).expect("an RFC 6749 error body")
}

#[tokio::test]
async fn discovery_and_jwks_publish_the_issuer_and_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let idp = start(dir.path(), 3600).await;
    bounded(async {
        let http = reqwest::Client::new();
        let d: Discovery = http
            .get(format!("{}/.well-known/openid-configuration", idp.url))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(d.issuer, idp.url);
        assert_eq!(d.jwks_uri, format!("{}/jwks", idp.url));
        assert_eq!(d.token_endpoint, format!("{}/token", idp.url));
        assert_eq!(
            d.id_token_signing_alg_values_supported,
            vec!["EdDSA".to_string()]
        );
        assert!(
            d.grant_types_supported
                .contains(&GRANT_TOKEN_EXCHANGE.to_string())
        );
        let jwks: Jwks = http
            .get(&d.jwks_uri)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(jwks.keys.len(), 1);
        let key = jwks.keys[0].verifying_key().unwrap();
        assert_eq!(jwks.keys[0].kid, quorum_token::Jwk::thumbprint(&key));
        // The key lives in the database, which only its owner may read.
        use std::os::unix::fs::PermissionsExt as _;
        let db = std::fs::metadata(dir.path().join(quorum_idp::DB_FILE)).unwrap();
        assert_eq!(db.permissions().mode() & 0o777, 0o600);
        assert!(!dir.path().join(quorum_idp::LEGACY_KEY_FILE).exists());
    })
    .await;
    idp.stop().await;
}

#[tokio::test]
async fn signing_key_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let kid = |url: String| async move {
        let jwks: Jwks = reqwest::get(format!("{url}/jwks"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        jwks.keys[0].kid.clone()
    };
    let first = start(dir.path(), 3600).await;
    let before = bounded(kid(first.url.clone())).await;
    first.stop().await;
    let second = start(dir.path(), 3600).await;
    assert_eq!(bounded(kid(second.url.clone())).await, before);
    second.stop().await;
}

#[tokio::test]
async fn client_credentials_and_exchange_give_tokens_that_verify() {
    let dir = tempfile::tempdir().unwrap();
    let idp = start(dir.path(), 3600).await;
    bounded(async {
        let trust = TrustedIssuers::new(vec![TrustedIssuer {
            issuer: idp.url.clone(),
            tenants: None,
        }]);
        let dinah = client(&idp, 0);
        let access = dinah.access_token().await.unwrap();
        assert_eq!(access.issued_token_type, TOKEN_TYPE_ACCESS);
        assert_eq!(access.expires_in, 3600);
        let claims = trust
            .verify(&access.access_token, TYP_ACCESS, &idp.url, 3600)
            .await
            .unwrap();
        assert_eq!(
            (claims.sub.as_str(), claims.tenant.as_str()),
            ("ctl-dinah", "dinah")
        );
        assert_eq!(claims.aud, idp.url);
        assert_eq!(claims.scope, None);

        for (token_type, typ, audience) in [
            (TOKEN_TYPE_JOB, TYP_JOB, "worker:alice-1"),
            (TOKEN_TYPE_UPLOAD, TYP_UPLOAD, "store:bettina"),
            (TOKEN_TYPE_READ, TYP_READ, "store:bettina"),
        ] {
            let t = dinah
                .exchange(
                    &access.access_token,
                    &token_for(token_type, audience, "b-42"),
                )
                .await
                .unwrap();
            assert_eq!(t.issued_token_type, token_type);
            assert_eq!(t.expires_in, 600);
            let c = trust
                .verify(&t.access_token, typ, audience, 3600)
                .await
                .unwrap();
            assert_eq!(c.tenant, "dinah");
            assert_eq!(c.sub, "ctl-dinah");
            assert_eq!(c.exp - c.iat, 600);
            assert_eq!(c.nbf, c.iat);
            assert_ne!(c.jti, claims.jti);
            let scope = c.scope.expect("exchanged tokens carry a scope");
            assert_eq!(scope.controller, "ctl-dinah");
            assert_eq!(scope.build, "b-42");
            assert_eq!(scope.job.as_deref(), Some("compile"));
            assert_eq!(scope.assignment.as_deref(), Some("a-1"));
            // The type is part of what a token is for: a job token is not an upload token.
            let other = if typ == TYP_JOB { TYP_UPLOAD } else { TYP_JOB };
            assert!(
                trust
                    .verify(&t.access_token, other, audience, 3600)
                    .await
                    .is_err()
            );
            assert!(
                trust
                    .verify(&t.access_token, typ, "store:someone-else", 3600)
                    .await
                    .is_err()
            );
        }
    })
    .await;
    idp.stop().await;
}

#[tokio::test]
async fn wrong_secret_and_unknown_client_get_the_same_401() {
    let dir = tempfile::tempdir().unwrap();
    let idp = start(dir.path(), 3600).await;
    bounded(async {
        let wrong = IdpClient::new(&idp.url, "ctl-dinah", "eliza-secret")
            .access_token()
            .await
            .unwrap_err();
        let unknown = IdpClient::new(&idp.url, "ctl-nobody", "dinah-secret")
            .access_token()
            .await
            .unwrap_err();
        assert_eq!(wrong.status(), Some(401));
        assert_eq!(unknown.status(), Some(401));
        let form = [("grant_type", GRANT_CLIENT_CREDENTIALS)];
        let (s1, b1) = post_form(&idp, "ctl-dinah", "nope", &form).await;
        let (s2, b2) = post_form(&idp, "ctl-nobody", "nope", &form).await;
        assert_eq!((s1, s2), (401, 401));
        assert_eq!(
            b1, b2,
            "the answer must not reveal whether the client exists"
        );
        assert_eq!(oauth_error(b1).error, "invalid_client");
        let no_auth = reqwest::Client::new()
            .post(format!("{}/token", idp.url))
            .form(&form)
            .send()
            .await
            .unwrap();
        assert_eq!(no_auth.status().as_u16(), 401);
        assert!(no_auth.headers().contains_key("www-authenticate"));
    })
    .await;
    idp.stop().await;
}

#[tokio::test]
async fn a_request_cannot_choose_its_tenant() {
    let dir = tempfile::tempdir().unwrap();
    let idp = start(dir.path(), 3600).await;
    bounded(async {
        let trust = TrustedIssuers::new(vec![TrustedIssuer {
            issuer: idp.url.clone(),
            tenants: None,
        }]);
        let (status, body) = post_form(
            &idp,
            "ctl-dinah",
            "dinah-secret",
            &[
                ("grant_type", GRANT_CLIENT_CREDENTIALS),
                ("tenant", "eliza"),
            ],
        )
        .await;
        assert_eq!(status, 200, "{body}");
        let access = body["access_token"].as_str().unwrap().to_string();
        assert_eq!(
            trust
                .verify(&access, TYP_ACCESS, &idp.url, 3600)
                .await
                .unwrap()
                .tenant,
            "dinah"
        );
        let (status, body) = post_form(
            &idp,
            "ctl-dinah",
            "dinah-secret",
            &[
                ("grant_type", GRANT_TOKEN_EXCHANGE),
                ("subject_token", &access),
                ("subject_token_type", TOKEN_TYPE_ACCESS),
                ("requested_token_type", TOKEN_TYPE_UPLOAD),
                ("audience", "store:bettina"),
                ("build", "7"),
                ("tenant", "eliza"),
            ],
        )
        .await;
        assert_eq!(status, 200, "{body}");
        let upload = body["access_token"].as_str().unwrap();
        assert_eq!(
            trust
                .verify(upload, TYP_UPLOAD, "store:bettina", 3600)
                .await
                .unwrap()
                .tenant,
            "dinah"
        );
    })
    .await;
    idp.stop().await;
}

#[tokio::test]
async fn exchange_refuses_another_clients_or_another_idps_access_token() {
    let dir = tempfile::tempdir().unwrap();
    let other_dir = tempfile::tempdir().unwrap();
    let idp = start(dir.path(), 3600).await;
    let other = start(other_dir.path(), 3600).await;
    bounded(async {
        let dinah = client(&idp, 0);
        let eliza = client(&idp, 1);
        let elizas = eliza.access_token().await.unwrap().access_token;
        let err = dinah
            .exchange(&elizas, &token_for(TOKEN_TYPE_UPLOAD, "store:bettina", "1"))
            .await
            .unwrap_err();
        assert_eq!(err.status(), Some(400));
        assert!(err.to_string().contains("invalid_grant"), "{err}");
        let (status, err) = exchange_raw(
            &idp,
            0,
            &elizas,
            &token_for(TOKEN_TYPE_UPLOAD, "store:bettina", "1"),
        )
        .await;
        assert_eq!(status, 400);
        assert!(err.error_description.contains("another client"), "{err:?}");

        // Same client id and secret at another IdP: its access token is signed with another key,
        // which this IdP's key ring does not hold.
        let foreign = client(&other, 0).access_token().await.unwrap().access_token;
        let (status, err) = exchange_raw(
            &idp,
            0,
            &foreign,
            &token_for(TOKEN_TYPE_JOB, "worker:w", "1"),
        )
        .await;
        assert_eq!(status, 400);
        assert_eq!(err.error, "invalid_grant");
        let foreign_kid = quorum_token::peek(&foreign).unwrap().kid;
        assert!(
            err.error_description
                .contains(&format!("has no key `{foreign_kid}`")),
            "{err:?}"
        );

        // An exchanged token is not an access token and cannot be exchanged again.
        let access = dinah.access_token().await.unwrap().access_token;
        let job = dinah
            .exchange(&access, &token_for(TOKEN_TYPE_JOB, "worker:w", "1"))
            .await
            .unwrap()
            .access_token;
        let (status, err) = exchange_raw(
            &idp,
            0,
            &job,
            &token_for(TOKEN_TYPE_UPLOAD, "store:bettina", "1"),
        )
        .await;
        assert_eq!(status, 400);
        assert!(err.error_description.contains("token type"), "{err:?}");
    })
    .await;
    idp.stop().await;
    other.stop().await;
}

#[tokio::test]
async fn exchange_checks_its_parameters_and_caps_the_lifetime() {
    let dir = tempfile::tempdir().unwrap();
    let idp = start(dir.path(), 900).await;
    bounded(async {
        let trust = TrustedIssuers::new(vec![TrustedIssuer {
            issuer: idp.url.clone(),
            tenants: None,
        }]);
        let dinah = client(&idp, 0);
        let access = dinah.access_token().await.unwrap();
        assert_eq!(
            access.expires_in, 900,
            "the access token is bounded by the configured maximum"
        );
        let access = access.access_token;

        let mut long = token_for(TOKEN_TYPE_READ, "store:bettina", "9");
        long.lifetime_secs = 7 * 24 * 3600;
        let t = dinah.exchange(&access, &long).await.unwrap();
        assert_eq!(t.expires_in, 900);
        let c = trust
            .verify(&t.access_token, TYP_READ, "store:bettina", 900)
            .await
            .unwrap();
        assert_eq!(c.exp - c.iat, 900);

        let cases: Vec<(TokenFor, &str)> = vec![
            (
                TokenFor {
                    lifetime_secs: 0,
                    ..token_for(TOKEN_TYPE_JOB, "worker:w", "1")
                },
                "lifetime_secs",
            ),
            (token_for(TOKEN_TYPE_JOB, "", "1"), "audience"),
            (token_for(TOKEN_TYPE_JOB, "worker:w", ""), "build"),
            (
                token_for(TOKEN_TYPE_ACCESS, "worker:w", "1"),
                "requested_token_type",
            ),
        ];
        for (what, needle) in cases {
            let err = dinah.exchange(&access, &what).await.unwrap_err();
            assert_eq!(err.status(), Some(400), "{err}");
            let (status, err) = exchange_raw(&idp, 0, &access, &what).await;
            assert_eq!(status, 400);
            assert_eq!(err.error, "invalid_request");
            assert!(err.error_description.contains(needle), "{err:?}");
        }

        let (status, body) = post_form(
            &idp,
            "ctl-dinah",
            "dinah-secret",
            &[("grant_type", "password")],
        )
        .await;
        assert_eq!(status, 400);
        assert_eq!(oauth_error(body).error, "unsupported_grant_type");
        // Two audiences are refused rather than one of them being picked.
        let (status, body) = post_form(
            &idp,
            "ctl-dinah",
            "dinah-secret",
            &[
                ("grant_type", GRANT_TOKEN_EXCHANGE),
                ("subject_token", &access),
                ("subject_token_type", TOKEN_TYPE_ACCESS),
                ("requested_token_type", TOKEN_TYPE_JOB),
                ("audience", "worker:a"),
                ("audience", "worker:b"),
                ("build", "1"),
            ],
        )
        .await;
        assert_eq!(status, 400);
        assert_eq!(oauth_error(body).error, "invalid_request");
    })
    .await;
    idp.stop().await;
}

#[tokio::test]
async fn exchange_copies_constraints_and_issues_revoke_tokens() {
    use quorum_api::v1::idp::TOKEN_TYPE_REVOKE;
    use quorum_token::{Scope, TYP_REVOKE};
    let dir = tempfile::tempdir().unwrap();
    let idp = start(dir.path(), 3600).await;
    bounded(async {
        let trust = TrustedIssuers::new(vec![TrustedIssuer::any_tenant(idp.url.clone())]);
        let access = client(&idp, 0).access_token().await.unwrap().access_token;
        let (id, _, secret) = CLIENTS[0];
        let base = [
            ("grant_type", GRANT_TOKEN_EXCHANGE),
            ("subject_token", access.as_str()),
            ("subject_token_type", TOKEN_TYPE_ACCESS),
            ("audience", "store:bettina"),
            ("build", "b-7"),
        ];
        let mut form = base.to_vec();
        form.extend([
            ("requested_token_type", TOKEN_TYPE_UPLOAD),
            ("job", "compile"),
            ("assignment", "a-1"),
            ("max_files", "3"),
            ("max_bytes", "1000"),
            ("max_calls", "7"),
            ("source_cidrs", "10.0.0.0/8, ::1/128"),
        ]);
        let (code, body) = post_form(&idp, id, secret, &form).await;
        assert_eq!(code, 200, "{body}");
        let token = body["access_token"].as_str().unwrap();
        let claims = trust
            .verify(token, TYP_UPLOAD, "store:bettina", 3600)
            .await
            .unwrap();
        assert_eq!(
            claims.scope,
            Some(Scope {
                controller: "ctl-dinah".into(),
                build: "b-7".into(),
                job: Some("compile".into()),
                assignment: Some("a-1".into()),
                max_files: Some(3),
                max_bytes: Some(1000),
                max_calls: Some(7),
                source_cidrs: vec!["10.0.0.0/8".into(), "::1/128".into()],
            })
        );

        // A network the store could not parse is refused at issuance.
        let mut bad = base.to_vec();
        bad.extend([
            ("requested_token_type", TOKEN_TYPE_UPLOAD),
            ("source_cidrs", "10.0.0.0/8,10.0.0.300/8"),
        ]);
        let (code, body) = post_form(&idp, id, secret, &bad).await;
        assert_eq!(code, 400);
        let err = oauth_error(body);
        assert_eq!(err.error, "invalid_request");
        assert!(
            err.error_description
                .contains("`10.0.0.300/8` is not a CIDR"),
            "{}",
            err.error_description
        );
        let mut negative = base.to_vec();
        negative.extend([
            ("requested_token_type", TOKEN_TYPE_UPLOAD),
            ("max_calls", "-1"),
        ]);
        assert_eq!(post_form(&idp, id, secret, &negative).await.0, 400);

        // Revoke tokens: their own typ, scoped to the build.
        let mut revoke = base.to_vec();
        revoke.push(("requested_token_type", TOKEN_TYPE_REVOKE));
        let (code, body) = post_form(&idp, id, secret, &revoke).await;
        assert_eq!(code, 200, "{body}");
        assert_eq!(body["issued_token_type"], TOKEN_TYPE_REVOKE);
        let token = body["access_token"].as_str().unwrap();
        let claims = trust
            .verify(token, TYP_REVOKE, "store:bettina", 3600)
            .await
            .unwrap();
        assert_eq!(claims.scope.unwrap().build, "b-7");
        assert!(
            trust
                .verify(token, TYP_UPLOAD, "store:bettina", 3600)
                .await
                .is_err()
        );
    })
    .await;
    idp.stop().await;
}

#[tokio::test]
async fn an_issuer_speaks_only_for_the_tenants_it_is_trusted_for() {
    use quorum_client::trust::TrustError;
    use quorum_token::TokenError;
    let dir = tempfile::tempdir().unwrap();
    let idp = start(dir.path(), 3600).await;
    bounded(async {
        let trust = TrustedIssuers::new(vec![TrustedIssuer {
            issuer: idp.url.clone(),
            tenants: Some(vec!["eliza".into()]),
        }]);
        let idp = &idp;
        let job = |n: usize| async move {
            let c = client(idp, n);
            let access = c.access_token().await.unwrap().access_token;
            c.exchange(&access, &token_for(TOKEN_TYPE_JOB, "worker:alice-1", "b-1"))
                .await
                .unwrap()
                .access_token
        };
        let dinah = job(0).await;
        let err = trust
            .verify(&dinah, TYP_JOB, "worker:alice-1", 3600)
            .await
            .unwrap_err();
        assert!(
            matches!(&err, TrustError::Token(TokenError::TenantNotAllowed { tenant, .. }) if tenant == "dinah"),
            "{err}"
        );
        assert_eq!(
            err.to_string(),
            format!("issuer `{}` may not speak for tenant `dinah`", idp.url)
        );
        let eliza = job(1).await;
        let claims = trust
            .verify(&eliza, TYP_JOB, "worker:alice-1", 3600)
            .await
            .unwrap();
        assert_eq!(claims.tenant, "eliza");
        // An empty list trusts the issuer for no tenant at all.
        let none = TrustedIssuers::new(vec![TrustedIssuer {
            issuer: idp.url.clone(),
            tenants: Some(vec![]),
        }]);
        assert!(
            none.verify(&eliza, TYP_JOB, "worker:alice-1", 3600)
                .await
                .is_err()
        );
    })
    .await;
    idp.stop().await;
}

/// The take-up exchange's form with `changes` applied: each named field is replaced by the
/// given value, or dropped for `None`.
fn take_up_form<'a>(
    subject: &'a str,
    changes: &[(&'a str, Option<&'a str>)],
) -> Vec<(&'a str, &'a str)> {
    let mut form = vec![
        ("grant_type", GRANT_TOKEN_EXCHANGE),
        ("subject_token", subject),
        ("subject_token_type", TOKEN_TYPE_ACCESS),
        ("requested_token_type", TOKEN_TYPE_JOB_AND_UPLOAD),
        ("audience", "worker:alice-1"),
        ("upload_audience", "store:bettina"),
        ("build", "b-42"),
        ("job", "compile"),
        ("assignment", "a-1"),
        ("lifetime_secs", "600"),
    ];
    for (name, value) in changes {
        form.retain(|(n, _)| n != name);
        form.extend(value.map(|v| (*name, v)));
    }
    form
}

#[tokio::test]
async fn take_up_exchange_gives_both_tokens_scoped_as_the_single_exchanges_would() {
    use quorum_token::Scope;
    let dir = tempfile::tempdir().unwrap();
    let idp = start(dir.path(), 900).await;
    bounded(async {
        let trust = TrustedIssuers::new(vec![TrustedIssuer::any_tenant(idp.url.clone())]);
        let dinah = client(&idp, 0);
        let access = dinah.access_token().await.unwrap().access_token;
        let what = TakeUpFor {
            worker_audience: "worker:alice-1".into(),
            upload_audience: "store:bettina".into(),
            build: "b-42".into(),
            job: "compile".into(),
            assignment: "a-1".into(),
            // Capped at the IdP's maximum, as a single exchange's.
            lifetime_secs: 7 * 24 * 3600,
            upload_constraints: TokenConstraints {
                max_files: Some(3),
                max_bytes: Some(1000),
                max_calls: Some(7),
                source_cidrs: Some("10.0.0.0/8".into()),
            },
        };
        let tokens = dinah.exchange_take_up(&access, &what).await.unwrap();
        assert_eq!(tokens.job.issued_token_type, TOKEN_TYPE_JOB);
        assert_eq!(tokens.upload.issued_token_type, TOKEN_TYPE_UPLOAD);
        assert_eq!(
            (tokens.job.expires_in, tokens.upload.expires_in),
            (900, 900)
        );
        let job = trust
            .verify(&tokens.job.access_token, TYP_JOB, "worker:alice-1", 900)
            .await
            .unwrap();
        let upload = trust
            .verify(
                &tokens.upload.access_token,
                TYP_UPLOAD,
                "store:bettina",
                900,
            )
            .await
            .unwrap();
        let scope = Scope {
            controller: "ctl-dinah".into(),
            build: "b-42".into(),
            job: Some("compile".into()),
            assignment: Some("a-1".into()),
            max_files: None,
            max_bytes: None,
            max_calls: None,
            source_cidrs: vec![],
        };
        // The constraints bind the upload token only; the job token is used at the worker.
        assert_eq!(job.scope.as_ref(), Some(&scope));
        assert_eq!(
            upload.scope,
            Some(Scope {
                max_files: Some(3),
                max_bytes: Some(1000),
                max_calls: Some(7),
                source_cidrs: vec!["10.0.0.0/8".into()],
                ..scope
            })
        );
        for c in [&job, &upload] {
            assert_eq!((c.sub.as_str(), c.tenant.as_str()), ("ctl-dinah", "dinah"));
            assert_eq!(c.exp - c.iat, 900);
        }
        assert_ne!(job.jti, upload.jti);
        // Neither token passes for the other: type and audience both differ.
        for (token, typ, audience) in [
            (&tokens.job.access_token, TYP_UPLOAD, "store:bettina"),
            (&tokens.job.access_token, TYP_UPLOAD, "worker:alice-1"),
            (&tokens.upload.access_token, TYP_JOB, "worker:alice-1"),
            (&tokens.upload.access_token, TYP_JOB, "store:bettina"),
        ] {
            assert!(trust.verify(token, typ, audience, 900).await.is_err());
        }

        // The tenant comes from the registration, whatever the form says.
        let (status, body) = post_form(
            &idp,
            "ctl-dinah",
            "dinah-secret",
            &take_up_form(&access, &[("tenant", Some("eliza"))]),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        for (field, typ, audience) in [
            ("job", TYP_JOB, "worker:alice-1"),
            ("upload", TYP_UPLOAD, "store:bettina"),
        ] {
            let token = body[field]["access_token"].as_str().unwrap();
            let c = trust.verify(token, typ, audience, 900).await.unwrap();
            assert_eq!(c.tenant, "dinah");
        }
    })
    .await;
    idp.stop().await;
}

#[tokio::test]
async fn take_up_exchange_refuses_what_the_single_exchanges_refuse() {
    let dir = tempfile::tempdir().unwrap();
    let idp = start(dir.path(), 3600).await;
    bounded(async {
        let dinah = client(&idp, 0);
        let access = dinah.access_token().await.unwrap().access_token;
        let elizas = client(&idp, 1).access_token().await.unwrap().access_token;
        let exchanged = dinah
            .exchange(&access, &token_for(TOKEN_TYPE_JOB, "worker:w", "1"))
            .await
            .unwrap()
            .access_token;
        // (form, OAuth error, what its description names)
        type Case<'a> = (Vec<(&'a str, &'a str)>, &'a str, &'a str);
        let cases: Vec<Case> = vec![
            (
                take_up_form(&access, &[("upload_audience", None)]),
                "invalid_request",
                "upload_audience is required",
            ),
            (
                take_up_form(&access, &[("upload_audience", Some(""))]),
                "invalid_request",
                "upload_audience is required",
            ),
            (
                take_up_form(&access, &[("audience", None)]),
                "invalid_request",
                "audience is required",
            ),
            (
                take_up_form(&access, &[("job", None)]),
                "invalid_request",
                "job is required",
            ),
            (
                take_up_form(&access, &[("assignment", None)]),
                "invalid_request",
                "assignment is required",
            ),
            (
                take_up_form(&access, &[("build", None)]),
                "invalid_request",
                "build is required",
            ),
            (
                take_up_form(&access, &[("lifetime_secs", Some("0"))]),
                "invalid_request",
                "lifetime_secs must be positive",
            ),
            (
                take_up_form(&access, &[("source_cidrs", Some("10.0.0.300/8"))]),
                "invalid_request",
                "`10.0.0.300/8` is not a CIDR",
            ),
            (
                take_up_form(&access, &[("subject_token_type", None)]),
                "invalid_request",
                "subject_token_type",
            ),
            (
                take_up_form(&elizas, &[]),
                "invalid_grant",
                "issued to another client",
            ),
            (take_up_form(&exchanged, &[]), "invalid_grant", "token type"),
            (
                take_up_form(
                    &access,
                    &[("requested_token_type", Some(TOKEN_TYPE_UPLOAD))],
                ),
                "invalid_request",
                "upload_audience belongs only to",
            ),
        ];
        for (form, error, needle) in cases {
            let (status, body) = post_form(&idp, "ctl-dinah", "dinah-secret", &form).await;
            assert_eq!(status, 400, "{form:?}: {body}");
            let err = oauth_error(body);
            assert_eq!(err.error, error, "{form:?}: {err:?}");
            assert!(err.error_description.contains(needle), "{form:?}: {err:?}");
        }
        // A wrong secret is refused before anything is read.
        let (status, body) =
            post_form(&idp, "ctl-dinah", "wrong", &take_up_form(&access, &[])).await;
        assert_eq!(status, 401);
        assert_eq!(oauth_error(body).error, "invalid_client");
    })
    .await;
    idp.stop().await;
}

fn take_up(worker: &str, assignment: &str) -> TakeUp {
    TakeUp {
        audience: format!("worker:{worker}"),
        build: "b-42".into(),
        job: format!("job-{assignment}"),
        assignment: assignment.into(),
        lifetime_secs: 600,
        upload_constraints: TokenConstraints {
            max_files: Some(5),
            ..Default::default()
        },
    }
}

/// Posts a raw `POST /take-ups` body, answered with its status and JSON.
async fn post_take_ups(idp: &Idp, n: usize, body: &serde_json::Value) -> (u16, serde_json::Value) {
    let (id, _, secret) = CLIENTS[n];
    let resp = reqwest::Client::new()
        .post(format!("{}/take-ups", idp.url))
        .basic_auth(id, Some(secret))
        .json(body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap())
}

#[tokio::test]
async fn take_ups_give_each_take_up_its_own_tokens_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let idp = start(dir.path(), 3600).await;
    bounded(async {
        let trust = TrustedIssuers::new(vec![TrustedIssuer::any_tenant(idp.url.clone())]);
        let dinah = client(&idp, 0);
        let access = dinah.access_token().await.unwrap().access_token;
        let asked: Vec<TakeUp> = (0..40)
            .map(|i| take_up(&format!("w{}", i % 3), &format!("a-{i}")))
            .collect();
        let tokens = dinah
            .exchange_take_ups(&access, "store:bettina", asked.clone())
            .await
            .unwrap();
        assert_eq!(tokens.len(), asked.len());
        let mut jtis = std::collections::BTreeSet::new();
        for (t, tokens) in asked.iter().zip(&tokens) {
            let job = trust
                .verify(&tokens.job.access_token, TYP_JOB, &t.audience, 3600)
                .await
                .unwrap();
            let upload = trust
                .verify(
                    &tokens.upload.access_token,
                    TYP_UPLOAD,
                    "store:bettina",
                    3600,
                )
                .await
                .unwrap();
            for (c, max_files) in [(&job, None), (&upload, Some(5))] {
                let scope = c.scope.as_ref().unwrap();
                assert_eq!(
                    (
                        scope.build.as_str(),
                        scope.job.as_deref(),
                        scope.assignment.as_deref()
                    ),
                    ("b-42", Some(t.job.as_str()), Some(t.assignment.as_str()))
                );
                // Constraints bind the upload token only, as in a single take-up.
                assert_eq!(scope.max_files, max_files);
                assert_eq!((c.tenant.as_str(), c.exp - c.iat), ("dinah", 600));
                assert!(jtis.insert(c.jti.clone()), "every token has its own jti");
            }
            // A job token is for its own worker only.
            let other = if t.audience == "worker:w0" {
                "worker:w1"
            } else {
                "worker:w0"
            };
            assert!(
                trust
                    .verify(&tokens.job.access_token, TYP_JOB, other, 3600)
                    .await
                    .is_err()
            );
        }
    })
    .await;
    idp.stop().await;
}

#[tokio::test]
async fn take_ups_refuse_the_whole_request_naming_the_bad_take_up() {
    let dir = tempfile::tempdir().unwrap();
    let idp = start(dir.path(), 3600).await;
    bounded(async {
        let dinah = client(&idp, 0);
        let access = dinah.access_token().await.unwrap().access_token;
        let elizas = client(&idp, 1).access_token().await.unwrap().access_token;
        let good: Vec<serde_json::Value> = (0..3)
            .map(|i| serde_json::to_value(take_up("w", &format!("a-{i}"))).unwrap())
            .collect();
        let body = |subject: &str, take_ups: Vec<serde_json::Value>| {
            serde_json::json!({
                "subject_token": subject,
                "upload_audience": "store:bettina",
                "take_ups": take_ups,
            })
        };
        let with = |i: usize, field: &str, value: serde_json::Value| {
            let mut take_ups = good.clone();
            take_ups[i][field] = value;
            take_ups
        };
        let too_many: Vec<serde_json::Value> = (0..=MAX_TAKE_UPS)
            .map(|i| serde_json::to_value(take_up("w", &format!("a-{i}"))).unwrap())
            .collect();
        // (body, OAuth error, what its description names)
        let cases = vec![
            (
                body(&access, with(2, "assignment", "".into())),
                "invalid_request",
                "take_ups[2]: assignment is required",
            ),
            (
                body(&access, with(1, "lifetime_secs", 0.into())),
                "invalid_request",
                "take_ups[1]: lifetime_secs must be positive",
            ),
            (
                body(&access, with(0, "audience", "".into())),
                "invalid_request",
                "take_ups[0]: audience is required",
            ),
            (
                body(&access, vec![]),
                "invalid_request",
                "take_ups holds 0 take-ups",
            ),
            (
                body(&access, too_many),
                "invalid_request",
                "take_ups holds 257 take-ups",
            ),
            (
                body(&elizas, good.clone()),
                "invalid_grant",
                "issued to another client",
            ),
            (
                serde_json::json!({"subject_token": access, "take_ups": good.clone()}),
                "invalid_request",
                "upload_audience",
            ),
        ];
        for (body, error, needle) in cases {
            let (status, answer) = post_take_ups(&idp, 0, &body).await;
            assert_eq!(status, 400, "{needle}: {answer}");
            assert!(
                answer.get("tokens").is_none(),
                "nothing is issued: {answer}"
            );
            let err = oauth_error(answer);
            assert_eq!(err.error, error, "{err:?}");
            assert!(err.error_description.contains(needle), "{needle}: {err:?}");
        }
        // Another client cannot use dinah's access token, and a wrong secret reads nothing.
        let (status, _) = post_take_ups(&idp, 1, &body(&access, good.clone())).await;
        assert_eq!(status, 400);
        let resp = reqwest::Client::new()
            .post(format!("{}/take-ups", idp.url))
            .basic_auth("ctl-dinah", Some("wrong"))
            .json(&body(&access, good.clone()))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 401);
    })
    .await;
    idp.stop().await;
}
