//! The scenario of the federated-CI seed, as a test: two identity providers (F and G), two
//! projects that do not trust each other with a controller each (D trusts F, E trusts G), two
//! workers of different owners serving both and trusting both IdPs, and one store trusting both.
//! A third IdP (X) that nobody trusts issues perfectly valid tokens and is refused everywhere.

use std::collections::BTreeSet;
use std::time::Duration;

use quorum::federation::Launcher;
use quorum_api::v1::controller::BuildState;
use quorum_client::trust::TrustedIssuer;
use quorum_client::user::UserClient;

use crate::util::{self, repo_with};

const PIPELINE: &str = "policy: {quorum: 2}\njobs:\n  build:\n    script: [\"mkdir out && echo built > out/a\"]\n    artifacts: [out/a]\n";

async fn idp(
    l: &mut Launcher,
    dir: &std::path::Path,
    name: &str,
    client: &str,
    tenant: &str,
    secret: &str,
) -> String {
    let config = quorum_idp::Config {
        listen: "127.0.0.1:0".into(),
        data_dir: dir.join(name),
        issuer: None,
        max_token_lifetime_secs: 24 * 3600,
        clients: vec![quorum_idp::ClientConfig {
            id: client.into(),
            tenant: tenant.into(),
            secret_hash: quorum_idp::hash_secret(secret),
        }],
    };
    l.server(name, "idp", &config).await.unwrap()
}

#[allow(clippy::too_many_arguments)]
async fn controller(
    l: &mut Launcher,
    dir: &std::path::Path,
    name: &str,
    idp: &str,
    client: &str,
    secret: &str,
    store: &str,
) -> String {
    let config = quorum_controller::Config {
        listen: "127.0.0.1:0".into(),
        data_dir: dir.join(name),
        database_url: None,
        name: None,
        api_token: Some(format!("token-{name}")),
        idp: quorum_controller::IdpConfig {
            url: idp.into(),
            client_id: client.into(),
            client_secret: Some(secret.into()),
        },
        store: quorum_controller::StoreConfig {
            url: store.into(),
            audience: "store:bettina".into(),
        },
        lease_secs: util::LEASE_SECS,
        upload_max_files: 1000,
        upload_max_bytes: 1 << 30,
        project: Default::default(),
    };
    l.server(name, "controller", &config).await.unwrap()
}

async fn wait_final(c: &UserClient, build: &str) -> quorum_api::v1::controller::BuildStatus {
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let s = c.status(build).await.unwrap();
        if s.state.is_final() {
            return s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "build did not finish: {s:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn two_projects_share_workers_and_a_store_without_touching_each_other() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut l = Launcher::new(&util::exe(), dir, "info,sqlx=warn");

    let fatima = idp(&mut l, dir, "idp-f", "dinah-ci", "dinah", "secret-f").await;
    let georgina = idp(&mut l, dir, "idp-g", "eliza-ci", "eliza", "secret-g").await;
    // X claims to speak for Dinah, with keys of its own that verify perfectly.
    let xavier = idp(&mut l, dir, "idp-x", "mallory-ci", "dinah", "secret-x").await;

    let store_config = quorum_store::Config {
        listen: "127.0.0.1:0".into(),
        data_dir: dir.join("store"),
        audience: "store:bettina".into(),
        trusted_issuers: vec![
            TrustedIssuer {
                issuer: fatima.clone(),
                tenants: Some(vec!["dinah".into()]),
            },
            TrustedIssuer {
                issuer: georgina.clone(),
                tenants: Some(vec!["eliza".into()]),
            },
        ],
        max_blob_bytes: quorum_store::DEFAULT_MAX_BLOB_BYTES,
        ..Default::default()
    };
    let store = l.server("store", "store", &store_config).await.unwrap();

    let dinah = controller(
        &mut l, dir, "ctl-d", &fatima, "dinah-ci", "secret-f", &store,
    )
    .await;
    let eliza = controller(
        &mut l, dir, "ctl-e", &georgina, "eliza-ci", "secret-g", &store,
    )
    .await;
    let mallory = controller(
        &mut l,
        dir,
        "ctl-m",
        &xavier,
        "mallory-ci",
        "secret-x",
        &store,
    )
    .await;

    // Alice's and Cecilia's workers serve all three controllers and trust F and G only.
    for (name, owner) in [("alice-1", "alice"), ("cecilia-1", "cecilia")] {
        let mut controllers = Vec::new();
        for (ctl, url) in [("ctl-d", &dinah), ("ctl-e", &eliza), ("ctl-m", &mallory)] {
            let token = quorum_controller::create_enrollment(
                &dir.join(ctl),
                None,
                owner,
                false,
                &Default::default(),
            )
            .await
            .unwrap();
            controllers.push(quorum_worker::ControllerConfig {
                url: url.clone(),
                enrollment_token: Some(token),
            });
        }
        let config = quorum_worker::Config {
            name: name.into(),
            data_dir: dir.join(name),
            controllers,
            trusted_issuers: vec![
                TrustedIssuer::any_tenant(fatima.clone()),
                TrustedIssuer::any_tenant(georgina.clone()),
            ],
            max_jobs: 2,
            allow_local_repositories: true,
            sandbox: Default::default(),
            allow_weaker_sandbox: true,
            limits: Default::default(),
        };
        l.worker(name, &config).unwrap();
    }

    let repo = repo_with(&[(".quorum.yml", PIPELINE)]);
    let repo = repo.path().to_str().unwrap();
    let d = UserClient::new(&dinah, "token-ctl-d");
    let e = UserClient::new(&eliza, "token-ctl-e");
    let m = UserClient::new(&mallory, "token-ctl-m");
    let d_build = d.submit(repo, "HEAD").await.unwrap().build_id;
    let e_build = e.submit(repo, "HEAD").await.unwrap().build_id;
    let m_build = m.submit(repo, "HEAD").await.unwrap().build_id;

    // Both projects' builds run on the shared workers and verify.
    for (c, b) in [(&d, &d_build), (&e, &e_build)] {
        let s = wait_final(c, b).await;
        assert_eq!(s.state, BuildState::Verified, "{s:#?}");
        let workers: BTreeSet<&str> = s.jobs[0]
            .assignments
            .iter()
            .map(|a| a.worker.as_str())
            .collect();
        assert_eq!(workers, BTreeSet::from(["alice-1", "cecilia-1"]));
    }

    // The untrusted IdP's job tokens are refused by every worker; nothing runs for it.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let s = m.status(&m_build).await.unwrap();
        // A worker may also turn an offer down while its slots are busy with D's and E's jobs;
        // what matters is that each of them refuses X's token once it looks at it.
        let untrusted: BTreeSet<&str> = s.jobs[0]
            .assignments
            .iter()
            .filter(|a| {
                a.state == "refused"
                    && a.detail
                        .as_deref()
                        .unwrap_or_default()
                        .contains("not trusted")
            })
            .map(|a| a.worker.as_str())
            .collect();
        assert!(
            s.jobs[0].assignments.iter().all(|a| a.outcome.is_none()),
            "nothing ran for X: {s:#?}"
        );
        if untrusted.len() == 2 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "workers did not refuse X's tokens: {s:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Each project reads its own artifacts, and neither can read the other's, even with a
    // valid read token of its own.
    let d_list = d.artifacts(&d_build).await.unwrap();
    let e_list = e.artifacts(&e_build).await.unwrap();
    let sc = quorum_client::store::StoreClient::new(&store);
    let d_art = &d_list.artifacts[0];
    let e_art = &e_list.artifacts[0];
    assert_eq!(
        sc.get_blob(&d_list.read_token, &d_build, &d_art.digest)
            .await
            .unwrap()
            .as_ref(),
        b"built\n"
    );
    assert_eq!(
        sc.get_blob(&e_list.read_token, &e_build, &e_art.digest)
            .await
            .unwrap()
            .as_ref(),
        b"built\n"
    );
    for (token, build, digest) in [
        (&e_list.read_token, &d_build, d_art.digest),
        (&d_list.read_token, &e_build, e_art.digest),
    ] {
        let err = sc.get_blob(token, build, &digest).await.unwrap_err();
        assert!(
            matches!(err.status(), Some(404) | Some(401)),
            "cross-tenant read must fail: {err}"
        );
        let err = sc
            .get_manifest(token, build, &d_art.manifest)
            .await
            .unwrap_err();
        assert!(
            matches!(err.status(), Some(404) | Some(401)),
            "cross-tenant manifest read must fail: {err}"
        );
    }
    // One controller's API token is worthless at the other.
    assert_eq!(
        UserClient::new(&eliza, "token-ctl-d")
            .status(&e_build)
            .await
            .unwrap_err()
            .status(),
        Some(401)
    );
    assert_eq!(e.status(&d_build).await.unwrap_err().status(), Some(404));
    // Nor can either cancel the other's build or read its logs, with its own valid API token.
    let d_assignment = wait_final(&d, &d_build).await.jobs[0].assignments[0]
        .id
        .clone();
    assert_eq!(e.cancel(&d_build).await.unwrap_err().status(), Some(404));
    assert_eq!(
        e.log(&d_assignment, 0).await.unwrap_err().status(),
        Some(404)
    );
    assert_eq!(
        d.status(&d_build).await.unwrap().state,
        BuildState::Verified
    );

    // Each controller bills the work of its build to its own tenant alone: the workers' signed
    // reports for D's build are counted under dinah at D, and E's under eliza at E.
    for (client, tenant, build) in [(&d, "dinah", &d_build), (&e, "eliza", &e_build)] {
        let usage = client.usage(None, 10).await.unwrap();
        let tenants: Vec<&str> = usage.tenants.iter().map(|t| t.tenant.as_str()).collect();
        assert_eq!(tenants, [tenant], "{usage:#?}");
        let totals = usage.tenants[0].totals;
        assert_eq!(totals.results, 2, "two workers reported: {usage:#?}");
        assert!(
            totals.wall_ms > 0 && totals.bytes_uploaded > 0,
            "{usage:#?}"
        );
        assert_eq!(usage.builds.len(), 1, "{usage:#?}");
        assert_eq!(&usage.builds[0].build_id, build);
        assert_eq!(usage.builds[0].tenant, tenant);
    }

    // The store recorded each project's manifests under its own tenant only: that is what it
    // bills to whom.
    let db = sqlx::SqlitePool::connect(&format!(
        "sqlite://{}?mode=ro",
        dir.join("store/store.db").display()
    ))
    .await
    .unwrap();
    let rows: Vec<(String, String)> =
        sqlx::query_as("SELECT DISTINCT tenant, build FROM manifests ORDER BY tenant")
            .fetch_all(&db)
            .await
            .unwrap();
    assert_eq!(
        rows,
        vec![
            ("dinah".to_string(), d_build.clone()),
            ("eliza".to_string(), e_build.clone())
        ]
    );
}
