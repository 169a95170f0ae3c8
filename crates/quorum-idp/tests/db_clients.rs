//! Database clients managed through `ClientAdmin` (what `quorum idp client ...` calls) next to a
//! running IdP on 127.0.0.1:0, checked through the real token endpoint: changes count at the
//! IdP's next request, a disabled client is refused like an unknown one, rotation retires the old
//! secret at once, and nothing secret is ever listed.

use std::future::Future;
use std::path::Path;
use std::time::Duration;

use quorum_api::v1::idp::GRANT_CLIENT_CREDENTIALS;
use quorum_client::idp::IdpClient;
use quorum_client::trust::{TrustedIssuer, TrustedIssuers};
use quorum_idp::{AdminError, ClientAdmin, ClientConfig, ClientSource, Config, hash_secret};
use quorum_token::TYP_ACCESS;
use tokio_util::sync::CancellationToken;

/// Every test finishes in this time or fails (Argon2 is slow in debug builds).
const BOUND: Duration = Duration::from_secs(120);

async fn bounded<T>(f: impl Future<Output = T>) -> T {
    tokio::time::timeout(BOUND, f)
        .await
        .expect("test ran past its time bound")
}

/// The config-file client of every test IdP: (id, tenant, secret).
const CONFIG_CLIENT: (&str, &str, &str) = ("ctl-config", "dinah", "config-secret");

fn config(data_dir: &Path) -> Config {
    static HASH: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    Config {
        listen: "127.0.0.1:0".into(),
        data_dir: data_dir.to_path_buf(),
        issuer: None,
        max_token_lifetime_secs: 3600,
        clients: vec![ClientConfig {
            id: CONFIG_CLIENT.0.into(),
            tenant: CONFIG_CLIENT.1.into(),
            secret_hash: HASH.get_or_init(|| hash_secret(CONFIG_CLIENT.2)).clone(),
        }],
    }
}

struct Idp {
    url: String,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Idp {
    async fn start(config: Config) -> Idp {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(quorum_idp::run(listener, config, shutdown.clone()));
        Idp {
            url,
            shutdown,
            task,
        }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("the IdP stops when cancelled")
            .unwrap()
            .unwrap();
    }

    /// The status and body of a client credentials request, as any OAuth client sends it.
    async fn token_raw(&self, id: &str, secret: &str) -> (u16, serde_json::Value) {
        let resp = reqwest::Client::new()
            .post(format!("{}/token", self.url))
            .basic_auth(id, Some(secret))
            .form(&[("grant_type", GRANT_CLIENT_CREDENTIALS)])
            .send()
            .await
            .unwrap();
        (resp.status().as_u16(), resp.json().await.unwrap())
    }

    /// The tenant of a fresh access token for (id, secret), verified as a verifier would.
    async fn tenant_of(&self, id: &str, secret: &str) -> String {
        let trust = TrustedIssuers::new(vec![TrustedIssuer {
            issuer: self.url.clone(),
            tenants: None,
        }]);
        let token = IdpClient::new(&self.url, id, secret)
            .access_token()
            .await
            .unwrap_or_else(|e| panic!("client `{id}` gets no token: {e}"));
        let claims = trust
            .verify(&token.access_token, TYP_ACCESS, &self.url, 3600)
            .await
            .unwrap();
        assert_eq!(claims.sub, id);
        claims.tenant
    }
}

#[tokio::test]
async fn a_client_added_while_the_idp_runs_gets_tokens_for_its_tenant_until_disabled() {
    let dir = tempfile::tempdir().unwrap();
    let idp = Idp::start(config(dir.path())).await;
    bounded(async {
        // The IdP is up and has opened the database before the CLI adds anything.
        assert_eq!(
            idp.tenant_of(CONFIG_CLIENT.0, CONFIG_CLIENT.2).await,
            "dinah"
        );
        let (status, _) = idp.token_raw("ctl-eliza", "anything").await;
        assert_eq!(status, 401);

        let admin = ClientAdmin::open(&config(dir.path())).await.unwrap();
        let secret = admin.add("ctl-eliza", "eliza").await.unwrap();
        assert!(secret.len() >= 40, "a secret of 32 random bytes");
        assert_eq!(idp.tenant_of("ctl-eliza", &secret).await, "eliza");
        let (status, body) = idp.token_raw("ctl-eliza", "wrong").await;
        assert_eq!(
            (status, body["error"].as_str()),
            (401, Some("invalid_client"))
        );

        admin.disable("ctl-eliza").await.unwrap();
        let (disabled, disabled_body) = idp.token_raw("ctl-eliza", &secret).await;
        let (unknown, unknown_body) = idp.token_raw("ctl-nobody", &secret).await;
        assert_eq!((disabled, unknown), (401, 401));
        assert_eq!(
            disabled_body, unknown_body,
            "a disabled client is refused exactly like an unknown one"
        );
        // Disabling again is harmless; the config-file client is unaffected.
        admin.disable("ctl-eliza").await.unwrap();
        assert_eq!(
            idp.tenant_of(CONFIG_CLIENT.0, CONFIG_CLIENT.2).await,
            "dinah"
        );
        admin.close().await;
    })
    .await;
    idp.stop().await;
}

#[tokio::test]
async fn a_disabled_client_enabled_again_gets_tokens_with_its_secret() {
    let dir = tempfile::tempdir().unwrap();
    let idp = Idp::start(config(dir.path())).await;
    bounded(async {
        let admin = ClientAdmin::open(&config(dir.path())).await.unwrap();
        let secret = admin.add("worker-1", "eliza").await.unwrap();
        admin.disable("worker-1").await.unwrap();
        let (status, _) = idp.token_raw("worker-1", &secret).await;
        assert_eq!(status, 401, "disabled first");

        admin.enable("worker-1").await.unwrap();
        assert_eq!(idp.tenant_of("worker-1", &secret).await, "eliza");
        let row = admin.list().await.unwrap();
        assert!(!row.iter().find(|c| c.id == "worker-1").unwrap().disabled);
        // Enabling an enabled client is harmless; a wrong secret is still refused.
        admin.enable("worker-1").await.unwrap();
        let (status, body) = idp.token_raw("worker-1", "wrong").await;
        assert_eq!(
            (status, body["error"].as_str()),
            (401, Some("invalid_client"))
        );
        // Config-file clients and unknown ids are refused by name, and nothing changes.
        let config_client = admin.enable(CONFIG_CLIENT.0).await.unwrap_err();
        assert!(matches!(&config_client, AdminError::ConfigClient(id) if id == CONFIG_CLIENT.0));
        let ghost = admin.enable("ghost").await.unwrap_err();
        assert!(matches!(&ghost, AdminError::UnknownClient(id) if id == "ghost"));
        assert!(ghost.to_string().contains("`ghost`"), "{ghost}");
        assert_eq!(admin.list().await.unwrap().len(), 2);
        admin.close().await;
    })
    .await;
    idp.stop().await;
}

#[tokio::test]
async fn rotation_retires_the_old_secret_at_the_next_request() {
    let dir = tempfile::tempdir().unwrap();
    let idp = Idp::start(config(dir.path())).await;
    bounded(async {
        let admin = ClientAdmin::open(&config(dir.path())).await.unwrap();
        let old = admin.add("worker-1", "eliza").await.unwrap();
        assert_eq!(idp.tenant_of("worker-1", &old).await, "eliza");
        let new = admin.rotate("worker-1").await.unwrap();
        assert_ne!(old, new);
        let (status, body) = idp.token_raw("worker-1", &old).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (401, Some("invalid_client"))
        );
        assert_eq!(idp.tenant_of("worker-1", &new).await, "eliza");
        let listed = admin.list().await.unwrap();
        let row = listed.iter().find(|c| c.id == "worker-1").unwrap();
        assert!(row.rotated_at.is_some() && row.created_at.is_some());
        assert!(!row.disabled);
        admin.close().await;
    })
    .await;
    idp.stop().await;
}

#[tokio::test]
async fn list_names_both_sources_and_no_secret_material() {
    let dir = tempfile::tempdir().unwrap();
    bounded(async {
        let admin = ClientAdmin::open(&config(dir.path())).await.unwrap();
        let a = admin.add("ctl-eliza", "eliza").await.unwrap();
        let b = admin.add("worker-1", "eliza").await.unwrap();
        admin.disable("worker-1").await.unwrap();
        let listed = admin.list().await.unwrap();
        let summary: Vec<_> = listed
            .iter()
            .map(|c| (c.id.as_str(), c.tenant.as_str(), c.source, c.disabled))
            .collect();
        assert_eq!(
            summary,
            [
                ("ctl-config", "dinah", ClientSource::Config, false),
                ("ctl-eliza", "eliza", ClientSource::Db, false),
                ("worker-1", "eliza", ClientSource::Db, true),
            ]
        );
        let json = serde_json::to_string(&listed).unwrap();
        assert!(json.contains(r#""source":"db""#) && json.contains(r#""source":"config""#));
        for secret_material in [a.as_str(), b.as_str(), "$argon2", "secret", "hash"] {
            assert!(
                !json.contains(secret_material),
                "list leaks `{secret_material}`: {json}"
            );
        }
        // The database holds the hash, never the secret itself.
        admin.close().await;
        let raw = std::fs::read(dir.path().join(quorum_idp::DB_FILE)).unwrap();
        let wal = std::fs::read(dir.path().join("idp.db-wal")).unwrap_or_default();
        for bytes in [&raw, &wal] {
            assert!(!bytes.windows(a.len()).any(|w| w == a.as_bytes()));
        }
    })
    .await;
}

#[tokio::test]
async fn admin_errors_name_the_id() {
    let dir = tempfile::tempdir().unwrap();
    bounded(async {
        let admin = ClientAdmin::open(&config(dir.path())).await.unwrap();
        admin.add("ctl-eliza", "eliza").await.unwrap();
        let cases = [
            (admin.add("ctl-eliza", "other").await.err(), "ctl-eliza"),
            (admin.add("ctl-config", "dinah").await.err(), "ctl-config"),
            (admin.disable("ghost").await.err(), "ghost"),
            (admin.rotate("ghost").await.err(), "ghost"),
            (admin.disable("ctl-config").await.err(), "ctl-config"),
            (admin.rotate("ctl-config").await.err(), "ctl-config"),
            (admin.add("a:b", "eliza").await.err(), "a:b"),
            (admin.add("ctl-empty", " ").await.err(), "ctl-empty"),
        ];
        for (err, id) in &cases {
            let err = err.as_ref().expect("the operation is refused");
            assert!(err.to_string().contains(&format!("`{id}`")), "{err}");
        }
        let kinds: Vec<_> = cases.into_iter().map(|(e, _)| e.unwrap()).collect();
        assert!(matches!(kinds[0], AdminError::DuplicateInDatabase(_)));
        assert!(matches!(kinds[1], AdminError::DuplicateInConfig(_)));
        assert!(matches!(kinds[2], AdminError::UnknownClient(_)));
        assert!(matches!(kinds[3], AdminError::UnknownClient(_)));
        assert!(matches!(kinds[4], AdminError::ConfigClient(_)));
        assert!(matches!(kinds[5], AdminError::ConfigClient(_)));
        assert!(matches!(kinds[6], AdminError::BadId(_)));
        assert!(matches!(kinds[7], AdminError::EmptyTenant(_)));
        // Nothing of the refused calls was stored.
        let ids: Vec<_> = admin
            .list()
            .await
            .unwrap()
            .into_iter()
            .map(|c| (c.id, c.tenant))
            .collect();
        assert_eq!(
            ids,
            [
                ("ctl-config".to_string(), "dinah".to_string()),
                ("ctl-eliza".into(), "eliza".into())
            ]
        );
        admin.close().await;
    })
    .await;
}

#[tokio::test]
async fn a_database_client_shadowing_a_config_client_stops_the_start() {
    let dir = tempfile::tempdir().unwrap();
    bounded(async {
        // Added while the config did not name it; the config file gained it later.
        let mut without = config(dir.path());
        without.clients.clear();
        let admin = ClientAdmin::open(&without).await.unwrap();
        admin.add(CONFIG_CLIENT.0, "eliza").await.unwrap();
        admin.close().await;
        let idp = Idp::start(config(dir.path())).await;
        let err = tokio::time::timeout(Duration::from_secs(30), idp.task)
            .await
            .expect("the IdP refuses to start promptly")
            .unwrap()
            .unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("`ctl-config`"), "{msg}");
        assert!(
            matches!(err.downcast_ref(), Some(AdminError::Conflict(id)) if id == "ctl-config"),
            "{msg}"
        );
    })
    .await;
}

#[tokio::test]
async fn concurrent_first_opens_and_adds_do_not_trip_over_each_other() {
    let dir = tempfile::tempdir().unwrap();
    bounded(async {
        // Several fresh openers race to create the schema (the CLI next to a first-starting
        // IdP), then race to add the same id: exactly one add wins.
        let opens = (0..4).map(|_| {
            let c = config(dir.path());
            async move { ClientAdmin::open(&c).await }
        });
        let admins: Vec<ClientAdmin> = futures::future::join_all(opens)
            .await
            .into_iter()
            .map(|r| r.expect("every concurrent open succeeds"))
            .collect();
        let adds = admins.iter().map(|a| a.add("ctl-race", "eliza"));
        let results = futures::future::join_all(adds).await;
        let won = results.iter().filter(|r| r.is_ok()).count();
        assert_eq!(won, 1, "{results:?}");
        for r in results.iter().filter_map(|r| r.as_ref().err()) {
            assert!(matches!(r, AdminError::DuplicateInDatabase(id) if id == "ctl-race"));
        }
        for a in admins {
            a.close().await;
        }
    })
    .await;
}
