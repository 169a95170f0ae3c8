//! The artifact store through its real HTTP boundary: a real IdP and a real store on
//! 127.0.0.1:0, tokens from `IdpClient`, uploads and downloads with `StoreClient`. The later
//! tests cover the adversarial table's network cases: constraints, revocation, and tokens forged
//! by issuers the store trusts.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use futures::StreamExt as _;
use object_store::{ObjectStore, ObjectStoreExt as _};
use quorum_api::v1::idp::{
    GRANT_TOKEN_EXCHANGE, TOKEN_TYPE_ACCESS, TOKEN_TYPE_JOB, TOKEN_TYPE_READ, TOKEN_TYPE_REVOKE,
    TOKEN_TYPE_UPLOAD,
};
use quorum_api::v1::store::{ManifestAnswer, ManifestProposal, WHOLE_FRAME};
use quorum_client::ClientError;
use quorum_client::idp::{IdpClient, TokenFor};
use quorum_client::store::StoreClient;
use quorum_client::trust::TrustedIssuer;
use quorum_core::{Digest, Manifest, ManifestEntry};
use quorum_store::{BlobsConfig, S3Config};
use tokio::io::AsyncWriteExt as _;
use tokio_util::sync::CancellationToken;

const AUDIENCE: &str = "store:bettina";
/// Every test finishes in this time or fails (Argon2 is slow in debug builds).
const BOUND: Duration = Duration::from_secs(120);

async fn bounded<T>(f: impl Future<Output = T>) -> T {
    tokio::time::timeout(BOUND, f)
        .await
        .expect("test ran past its time bound")
}

/// (id, tenant, secret) of the controllers registered at each test IdP.
const CLIENTS: &[(&str, &str, &str)] = &[
    ("ctl-dinah", "dinah", "dinah-secret"),
    ("ctl-eliza", "eliza", "eliza-secret"),
];
const DINAH: usize = 0;
const ELIZA: usize = 1;

struct Server {
    url: String,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Server {
    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("the server stops when cancelled")
            .unwrap()
            .unwrap();
    }
}

async fn bind() -> (tokio::net::TcpListener, String) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    (listener, url)
}

async fn start_idp(data_dir: &Path) -> Server {
    // Hashed once per test binary: Argon2 is slow in debug builds.
    static REGISTERED: std::sync::OnceLock<Vec<quorum_idp::ClientConfig>> =
        std::sync::OnceLock::new();
    let clients = REGISTERED
        .get_or_init(|| {
            CLIENTS
                .iter()
                .map(|(id, tenant, secret)| quorum_idp::ClientConfig {
                    id: (*id).into(),
                    tenant: (*tenant).into(),
                    secret_hash: quorum_idp::hash_secret(secret),
                })
                .collect()
        })
        .clone();
    let (listener, url) = bind().await;
    let config = quorum_idp::Config {
        listen: "127.0.0.1:0".into(),
        data_dir: data_dir.to_path_buf(),
        issuer: None,
        max_token_lifetime_secs: 3600,
        clients,
    };
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(quorum_idp::run(listener, config, shutdown.clone()));
    Server {
        url,
        shutdown,
        task,
    }
}

/// Where a test store keeps its metadata and bytes. Every behaviour test runs on both: the
/// defaults (SQLite, local directory) and the servers (PostgreSQL, S3), through
/// [`on_every_backend!`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    Local,
    S3Postgres,
}

/// A fresh PostgreSQL database (dropped with the returned guard) and S3 bucket of this test's
/// own, or nothing for [`Backend::Local`].
async fn prepare(backend: Backend) -> (Option<quorum_testkit::PgDatabase>, BlobsConfig) {
    if backend == Backend::Local {
        return (None, BlobsConfig::Local);
    }
    let need = |var: &str| {
        std::env::var(var).unwrap_or_else(|_| {
            panic!("{var} is not set: run `source .ci/services.sh` first (it starts PostgreSQL and moto)")
        })
    };
    let s3 = need("QUORUM_TEST_S3_ENDPOINT");
    let db = quorum_testkit::PgDatabase::create("store").await;
    let bucket = format!("store-{}", uuid::Uuid::new_v4().simple());
    let made = reqwest::Client::new()
        .put(format!("{s3}/{bucket}"))
        .send()
        .await
        .expect("cannot reach QUORUM_TEST_S3_ENDPOINT");
    assert!(
        made.status().is_success(),
        "creating bucket {bucket}: {made:?}"
    );
    let blobs = BlobsConfig::S3(S3Config {
        bucket,
        endpoint: Some(s3),
        region: "us-east-1".into(),
        allow_http: true,
        access_key_id: Some("test".into()),
        secret_access_key: Some("test".into()),
    });
    (Some(db), blobs)
}

/// Starts a store and waits until it answers, so its storage is ready for other users (such as
/// a garbage collection pass in the test).
async fn start_store(config: &quorum_store::Config) -> Server {
    let (listener, url) = bind().await;
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(quorum_store::run(
        listener,
        config.clone(),
        shutdown.clone(),
    ));
    let answer = reqwest::get(format!("{url}/api/v1/usage")).await.unwrap();
    assert_eq!(answer.status(), 401);
    Server {
        url,
        shutdown,
        task,
    }
}

async fn start_store_trusting(
    data_dir: &Path,
    trusted_issuers: Vec<TrustedIssuer>,
    max_blob_bytes: u64,
) -> Server {
    start_store(&quorum_store::Config {
        listen: "127.0.0.1:0".into(),
        data_dir: data_dir.to_path_buf(),
        audience: AUDIENCE.into(),
        trusted_issuers,
        max_blob_bytes,
        ..Default::default()
    })
    .await
}

/// An IdP, a store that trusts it, and their directories.
struct World {
    idp: Server,
    store: Server,
    client: StoreClient,
    config: quorum_store::Config,
    store_dir: PathBuf,
    _dirs: (tempfile::TempDir, tempfile::TempDir),
    /// The PostgreSQL database of the S3 + PostgreSQL runs, dropped after the test.
    _db: Option<quorum_testkit::PgDatabase>,
}

impl World {
    async fn start(backend: Backend) -> World {
        World::start_with(backend, |_| {}).await
    }

    /// A world whose store config `adjust` changes first.
    async fn start_with(backend: Backend, adjust: impl FnOnce(&mut quorum_store::Config)) -> World {
        let idp_dir = tempfile::tempdir().unwrap();
        let store_dir = tempfile::tempdir().unwrap();
        let idp = start_idp(idp_dir.path()).await;
        let (db, blobs) = prepare(backend).await;
        let mut config = quorum_store::Config {
            listen: "127.0.0.1:0".into(),
            data_dir: store_dir.path().to_path_buf(),
            audience: AUDIENCE.into(),
            trusted_issuers: vec![TrustedIssuer {
                issuer: idp.url.clone(),
                tenants: None,
            }],
            database_url: db.as_ref().map(|d| d.url.clone()),
            blobs,
            ..Default::default()
        };
        adjust(&mut config);
        let store = start_store(&config).await;
        let client = StoreClient::new(&store.url);
        World {
            client,
            store_dir: config.data_dir.clone(),
            config,
            idp,
            store,
            _dirs: (idp_dir, store_dir),
            _db: db,
        }
    }

    async fn stop(self) {
        self.store.stop().await;
        self.idp.stop().await;
    }

    /// Stops the store and starts it again on the same storage.
    async fn restart(mut self) -> World {
        self.store.stop().await;
        self.store = start_store(&self.config).await;
        self.client = StoreClient::new(&self.store.url);
        self
    }

    async fn upload_token(&self, who: usize, build: &str, assignment: &str) -> String {
        token(
            &self.idp,
            who,
            TOKEN_TYPE_UPLOAD,
            AUDIENCE,
            build,
            Some(assignment),
        )
        .await
    }

    async fn read_token(&self, who: usize, build: &str) -> String {
        token(&self.idp, who, TOKEN_TYPE_READ, AUDIENCE, build, None).await
    }

    async fn controller_token(&self, who: usize, build: &str) -> String {
        token(&self.idp, who, TOKEN_TYPE_REVOKE, AUDIENCE, build, None).await
    }

    fn s3(&self) -> Option<(Arc<dyn ObjectStore>, &S3Config)> {
        let BlobsConfig::S3(c) = &self.config.blobs else {
            return None;
        };
        let store = object_store::aws::AmazonS3Builder::new()
            .with_bucket_name(&c.bucket)
            .with_endpoint(c.endpoint.clone().unwrap())
            .with_region(&c.region)
            .with_allow_http(true)
            .with_access_key_id("test")
            .with_secret_access_key("test")
            .build()
            .unwrap();
        Some((Arc::new(store), c))
    }

    /// The contents of every stored blob, whichever the backend. In a local directory a
    /// batch's blobs are slices of its pack, where their rows say; a pack no row names counts
    /// as one blob, so that one left behind shows.
    async fn blobs(&self) -> Vec<Vec<u8>> {
        let Some((s3, _)) = self.s3() else {
            let packs = self.store_dir.join("blobs").join("packs");
            let rows = self.packed_rows().await;
            let mut out = Vec::new();
            // As below: a blob collected between the listing and the read is simply gone.
            for path in self.files("blobs") {
                let bytes = match std::fs::read(&path) {
                    Ok(bytes) => bytes,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => panic!("reading {}: {e}", path.display()),
                };
                if !path.starts_with(&packs) {
                    out.push(bytes);
                    continue;
                }
                let name = path.file_name().unwrap().to_str().unwrap();
                match rows.get(name) {
                    Some(slices) => out.extend(
                        slices
                            .iter()
                            .map(|&(at, n)| bytes[at as usize..(at + n) as usize].to_vec()),
                    ),
                    None => out.push(bytes),
                }
            }
            return out;
        };
        let listed: Vec<_> = s3.list(None).collect().await;
        let mut out = Vec::new();
        for meta in listed {
            let meta = meta.unwrap();
            // A store collecting garbage in the background may delete a blob between the
            // listing and the read: gone is what it is then.
            match s3.get(&meta.location).await {
                Ok(got) => out.push(got.bytes().await.unwrap().to_vec()),
                Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => panic!("reading {}: {e}", meta.location),
            }
        }
        out
    }

    /// Where the local store's packed blobs are: (offset, size) by pack, from its SQLite
    /// database.
    async fn packed_rows(&self) -> std::collections::HashMap<String, Vec<(i64, i64)>> {
        use sqlx::Row as _;
        let options = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(self.store_dir.join("store.db"))
            .read_only(true);
        let pool = sqlx::SqlitePool::connect_with(options).await.unwrap();
        let rows = sqlx::query("SELECT pack, pack_offset, size FROM blobs WHERE pack IS NOT NULL")
            .fetch_all(&pool)
            .await
            .unwrap();
        pool.close().await;
        let mut out: std::collections::HashMap<String, Vec<(i64, i64)>> = Default::default();
        for row in rows {
            out.entry(row.get(0))
                .or_default()
                .push((row.get(1), row.get(2)));
        }
        out
    }

    /// Uploads in progress: files without a name in the store's directory (the store runs in
    /// this process, so they are among its open files) or temporary files, or the bucket's
    /// unfinished multipart uploads.
    async fn unfinished(&self) -> Vec<String> {
        let Some((_, c)) = self.s3() else {
            let dir = self.store_dir.canonicalize().unwrap();
            let unnamed = std::fs::read_dir("/proc/self/fd")
                .unwrap()
                .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
                .filter(|target| {
                    target.starts_with(&dir) && target.to_string_lossy().ends_with(" (deleted)")
                });
            return self
                .files("tmp")
                .into_iter()
                .chain(unnamed)
                .map(|p| p.display().to_string())
                .collect();
        };
        let listing = reqwest::Client::new()
            .get(format!(
                "{}/{}?uploads",
                c.endpoint.as_deref().unwrap(),
                c.bucket
            ))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        listing
            .split("<Key>")
            .skip(1)
            .map(|k| k.split('<').next().unwrap().to_string())
            .collect()
    }

    /// Files under `data_dir/<sub>`, recursively.
    fn files(&self, sub: &str) -> Vec<PathBuf> {
        fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
            let Ok(entries) = std::fs::read_dir(dir) else {
                return;
            };
            for entry in entries {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    walk(&path, out)
                } else {
                    out.push(path)
                }
            }
        }
        let mut out = Vec::new();
        walk(&self.store_dir.join(sub), &mut out);
        out
    }
}

/// Runs each named `async fn(Backend)` on every backend: `local::<name>` on SQLite and the local
/// directory, `s3_postgres::<name>` on PostgreSQL and S3.
macro_rules! on_every_backend {
    ($($name:ident),* $(,)?) => {
        mod local {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                super::$name(super::Backend::Local).await
            })*
        }
        mod s3_postgres {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                super::$name(super::Backend::S3Postgres).await
            })*
        }
    };
}

async fn token(
    idp: &Server,
    who: usize,
    token_type: &'static str,
    audience: &str,
    build: &str,
    assignment: Option<&str>,
) -> String {
    let (id, _, secret) = CLIENTS[who];
    let client = IdpClient::new(&idp.url, id, secret);
    let access = client.access_token().await.unwrap().access_token;
    let what = TokenFor {
        token_type,
        audience: audience.into(),
        build: build.into(),
        job: assignment.map(|_| "compile".into()),
        assignment: assignment.map(str::to_string),
        lifetime_secs: 600,
        constraints: Default::default(),
    };
    client.exchange(&access, &what).await.unwrap().access_token
}

fn manifest(files: &[(&str, &[u8])]) -> Manifest {
    Manifest::new(
        files
            .iter()
            .map(|(path, bytes)| ManifestEntry {
                path: (*path).into(),
                mode: 0o644,
                size: bytes.len() as u64,
                digest: Digest::of(bytes),
            })
            .collect(),
    )
    .unwrap()
}

fn status(r: Result<impl std::fmt::Debug, ClientError>) -> (u16, String) {
    let err = r.expect_err("the store must refuse this");
    (
        err.status()
            .unwrap_or_else(|| panic!("not an HTTP refusal: {err}")),
        err.to_string(),
    )
}

/// Uploads `files` and records their manifest for `build` as one assignment of `who`.
async fn publish(w: &World, who: usize, build: &str, files: &[(&str, &[u8])]) -> Digest {
    let upload = w.upload_token(who, build, "a-1").await;
    for (_, bytes) in files {
        w.client
            .put_blob(&upload, &Digest::of(bytes), bytes.to_vec())
            .await
            .unwrap();
    }
    w.client
        .put_manifest(&upload, &manifest(files))
        .await
        .unwrap()
}

async fn round_trip_missing_upload_manifest_read(backend: Backend) {
    let w = World::start(backend).await;
    bounded(async {
        let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let files: &[(&str, &[u8])] = &[
            ("bin/tool", b"#!/bin/sh\necho hi\n"),
            ("lib/big.a", &big),
            ("empty", b""),
        ];
        let upload = w.upload_token(DINAH, "b-1", "a-1").await;
        let digests: Vec<Digest> = files.iter().map(|(_, b)| Digest::of(b)).collect();
        let missing = w.client.missing(&upload, digests.clone()).await.unwrap();
        assert_eq!(
            missing,
            digests[..2].to_vec(),
            "the empty blob is never missing"
        );

        w.client
            .put_blob(&upload, &digests[0], files[0].1.to_vec())
            .await
            .unwrap();
        // The big one streams from a file, as workers upload.
        let src = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(src.path(), &big).unwrap();
        w.client
            .put_file(&upload, &digests[1], src.path())
            .await
            .unwrap();
        assert!(
            w.client
                .missing(&upload, digests.clone())
                .await
                .unwrap()
                .is_empty()
        );
        assert!(w.blobs().await.contains(&big));
        assert!(w.unfinished().await.is_empty());

        let m = manifest(files);
        let stored = w.client.put_manifest(&upload, &m).await.unwrap();
        assert_eq!(stored, m.digest());
        // The same manifest again is fine; another one for the same assignment is not.
        assert_eq!(w.client.put_manifest(&upload, &m).await.unwrap(), stored);
        let other = manifest(&files[..2]);
        assert_eq!(status(w.client.put_manifest(&upload, &other).await).0, 409);

        let read = w.read_token(DINAH, "b-1").await;
        assert_eq!(
            w.client.get_manifest(&read, "b-1", &stored).await.unwrap(),
            m
        );
        for (_, bytes) in files {
            let got = w
                .client
                .get_blob(&read, "b-1", &Digest::of(bytes))
                .await
                .unwrap();
            assert_eq!(&got[..], *bytes);
        }
    })
    .await;

    // Everything survives a restart of the store on the same storage.
    let w = w.restart().await;
    bounded(async {
        let read = w.read_token(DINAH, "b-1").await;
        let digest = manifest(&[("bin/tool", b"#!/bin/sh\necho hi\n")]).entries[0].digest;
        assert_eq!(
            &w.client.get_blob(&read, "b-1", &digest).await.unwrap()[..],
            b"#!/bin/sh\necho hi\n"
        );
    })
    .await;
    w.stop().await;
}

async fn digest_mismatch_is_refused_and_leaves_no_file(backend: Backend) {
    let w = World::start(backend).await;
    bounded(async {
        let upload = w.upload_token(DINAH, "b-1", "a-1").await;
        let claimed = Digest::of(b"what the manifest will say");
        let (code, message) = status(
            w.client
                .put_blob(&upload, &claimed, b"something else".to_vec())
                .await,
        );
        assert_eq!(code, 400);
        assert!(message.contains(&claimed.to_string()), "{message}");
        assert!(
            message.contains(&Digest::of(b"something else").to_string()),
            "{message}"
        );
        assert!(w.blobs().await.is_empty(), "{:?}", w.blobs().await);
        assert!(
            w.unfinished().await.is_empty(),
            "{:?}",
            w.unfinished().await
        );
        assert_eq!(
            w.client.missing(&upload, vec![claimed]).await.unwrap(),
            vec![claimed]
        );
        let (code, _) = status(w.client.put_blob(&upload, &claimed, Vec::new()).await);
        assert_eq!(code, 400, "a body shorter than the blob does not match");
    })
    .await;
    w.stop().await;
}

async fn an_abandoned_upload_leaves_no_file(backend: Backend) {
    let w = World::start(backend).await;
    bounded(async {
        let upload = w.upload_token(DINAH, "b-1", "a-1").await;
        // Each is seen once past what it buffers: a local upload its first written piece
        // (1 MiB), S3 its first part (8 MiB). Send more than that.
        let (size, sent) = match backend {
            Backend::Local => (3 << 20, 3 << 19),
            Backend::S3Postgres => (20 << 20, 10 << 20),
        };
        let digest = Digest::of(&vec![7u8; size]);
        let addr = w.store.url.trim_start_matches("http://").to_string();
        let mut conn = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let head = format!(
            "PUT /api/v1/blobs/{digest} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {upload}\r\nContent-Length: {size}\r\n\r\n"
        );
        conn.write_all(head.as_bytes()).await.unwrap();
        conn.write_all(&vec![7u8; sent]).await.unwrap();
        conn.flush().await.unwrap();
        // The partial upload exists while the connection is open...
        while w.unfinished().await.is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        drop(conn);
        // ...and gone once the client goes away.
        while !w.unfinished().await.is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(w.blobs().await.is_empty());
        assert_eq!(w.client.missing(&upload, vec![digest]).await.unwrap(), vec![digest]);
    })
    .await;
    w.stop().await;
}

async fn blobs_over_the_cap_are_refused(backend: Backend) {
    let w = World::start_with(backend, |c| c.max_blob_bytes = 1000).await;
    bounded(async {
        let upload = w.upload_token(DINAH, "b-1", "a-1").await;
        let big = vec![1u8; 1001];
        let (code, _) = status(
            w.client
                .put_blob(&upload, &Digest::of(&big), big.clone())
                .await,
        );
        assert_eq!(code, 413);
        let fits = vec![1u8; 1000];
        w.client
            .put_blob(&upload, &Digest::of(&fits), fits)
            .await
            .unwrap();
        assert_eq!(w.blobs().await.len(), 1);
        assert!(w.unfinished().await.is_empty());
    })
    .await;
    w.stop().await;
}

async fn tenants_do_not_see_each_others_blobs_or_builds(backend: Backend) {
    let w = World::start(backend).await;
    bounded(async {
        let secret: &[u8] = b"dinah's private build output";
        let d = Digest::of(secret);
        let manifest_digest = publish(&w, DINAH, "b-1", &[("out", secret)]).await;

        let eliza_upload = w.upload_token(ELIZA, "b-1", "a-1").await;
        assert_eq!(
            w.client.missing(&eliza_upload, vec![d]).await.unwrap(),
            vec![d],
            "knowing a digest grants nothing"
        );
        // Eliza cannot claim the blob in a manifest without uploading it herself.
        let (code, message) = status(
            w.client
                .put_manifest(&eliza_upload, &manifest(&[("out", secret)]))
                .await,
        );
        assert_eq!(code, 400);
        assert!(
            message.contains("`out`") && message.contains(&d.to_string()),
            "{message}"
        );

        // Eliza reading Dinah's build gets exactly what a build that does not exist gives.
        let eliza_read = w.read_token(ELIZA, "b-1").await;
        let (code, blob_message) = status(w.client.get_blob(&eliza_read, "b-1", &d).await);
        assert_eq!(code, 404);
        let absent = Digest::of(b"never stored anywhere");
        let (_, absent_message) = status(w.client.get_blob(&eliza_read, "b-1", &absent).await);
        assert_eq!(
            blob_message.replace(&d.to_string(), "X"),
            absent_message.replace(&absent.to_string(), "X")
        );
        assert_eq!(
            status(
                w.client
                    .get_manifest(&eliza_read, "b-1", &manifest_digest)
                    .await
            )
            .0,
            404
        );

        // After uploading it herself the blob is hers too, but Dinah's build stays Dinah's.
        w.client
            .put_blob(&eliza_upload, &d, secret.to_vec())
            .await
            .unwrap();
        assert!(
            w.client
                .missing(&eliza_upload, vec![d])
                .await
                .unwrap()
                .is_empty()
        );
        assert_eq!(
            status(w.client.get_blob(&eliza_read, "b-1", &d).await).0,
            404
        );
        assert_eq!(
            status(
                w.client
                    .get_manifest(&eliza_read, "b-1", &manifest_digest)
                    .await
            )
            .0,
            404
        );
        // Her own manifest with the same content lands in her own build.
        assert_eq!(
            w.client
                .put_manifest(&eliza_upload, &manifest(&[("out", secret)]))
                .await
                .unwrap(),
            manifest_digest
        );
        assert_eq!(
            &w.client.get_blob(&eliza_read, "b-1", &d).await.unwrap()[..],
            secret
        );
        let dinah_read = w.read_token(DINAH, "b-1").await;
        assert_eq!(
            &w.client.get_blob(&dinah_read, "b-1", &d).await.unwrap()[..],
            secret
        );
    })
    .await;
    w.stop().await;
}

async fn a_read_token_reads_exactly_its_build(backend: Backend) {
    let w = World::start(backend).await;
    bounded(async {
        let (in12, in123): (&[u8], &[u8]) = (b"build twelve", b"build one-two-three");
        let m12 = publish(&w, DINAH, "12", &[("f", in12)]).await;
        let m123 = publish(&w, DINAH, "123", &[("f", in123)]).await;
        let read12 = w.read_token(DINAH, "12").await;
        let read123 = w.read_token(DINAH, "123").await;
        assert_eq!(
            &w.client
                .get_blob(&read12, "12", &Digest::of(in12))
                .await
                .unwrap()[..],
            in12
        );
        assert_eq!(
            &w.client
                .get_blob(&read123, "123", &Digest::of(in123))
                .await
                .unwrap()[..],
            in123
        );
        w.client.get_manifest(&read12, "12", &m12).await.unwrap();

        assert_eq!(
            status(w.client.get_blob(&read12, "123", &Digest::of(in123)).await).0,
            404
        );
        assert_eq!(
            status(w.client.get_manifest(&read12, "123", &m123).await).0,
            404
        );
        assert_eq!(
            status(w.client.get_blob(&read123, "12", &Digest::of(in12)).await).0,
            404
        );
        assert_eq!(
            status(w.client.get_manifest(&read123, "12", &m12).await).0,
            404
        );
        // A blob of another build of the same tenant is not readable through this build.
        assert_eq!(
            status(w.client.get_blob(&read12, "12", &Digest::of(in123)).await).0,
            404
        );
        assert_eq!(
            status(w.client.get_manifest(&read12, "12", &m123).await).0,
            404
        );
    })
    .await;
    w.stop().await;
}

async fn manifests_must_name_uploaded_blobs_of_the_right_size(backend: Backend) {
    let w = World::start(backend).await;
    bounded(async {
        let upload = w.upload_token(DINAH, "b-1", "a-1").await;
        let present: &[u8] = b"uploaded";
        w.client
            .put_blob(&upload, &Digest::of(present), present.to_vec())
            .await
            .unwrap();
        let absent: &[u8] = b"never uploaded";
        let (code, message) = status(
            w.client
                .put_manifest(&upload, &manifest(&[("a", present), ("b", absent)]))
                .await,
        );
        assert_eq!(code, 400);
        assert!(
            message.contains("`b`") && message.contains(&Digest::of(absent).to_string()),
            "{message}"
        );

        let mut lying = manifest(&[("a", present)]);
        lying.entries[0].size += 1;
        assert_eq!(status(w.client.put_manifest(&upload, &lying).await).0, 400);
        let unsafe_path = Manifest {
            entries: vec![ManifestEntry {
                path: "../escape".into(),
                mode: 0o644,
                size: 8,
                digest: Digest::of(present),
            }],
        };
        assert_eq!(
            status(w.client.put_manifest(&upload, &unsafe_path).await).0,
            400
        );
        // None of the refusals recorded anything: the assignment can still record its manifest.
        w.client
            .put_manifest(&upload, &manifest(&[("a", present)]))
            .await
            .unwrap();
    })
    .await;
    w.stop().await;
}

async fn tokens_of_the_wrong_kind_are_refused(backend: Backend) {
    let w = World::start(backend).await;
    bounded(async {
        let blob: &[u8] = b"payload";
        let d = Digest::of(blob);
        let job = token(&w.idp, DINAH, TOKEN_TYPE_JOB, AUDIENCE, "b-1", Some("a-1")).await;
        let read = w.read_token(DINAH, "b-1").await;
        let elsewhere = token(
            &w.idp,
            DINAH,
            TOKEN_TYPE_UPLOAD,
            "store:another",
            "b-1",
            Some("a-1"),
        )
        .await;
        let unscoped = token(&w.idp, DINAH, TOKEN_TYPE_UPLOAD, AUDIENCE, "b-1", None).await;
        for (bad, why) in [
            (job.as_str(), "token type"),
            (read.as_str(), "token type"),
            (elsewhere.as_str(), "audience"),
            (unscoped.as_str(), "assignment"),
            ("not-a-jwt", "well-formed"),
        ] {
            let (code, message) = status(w.client.put_blob(bad, &d, blob.to_vec()).await);
            assert_eq!(code, 401, "{message}");
            assert!(message.contains(why), "{why}: {message}");
            assert_eq!(status(w.client.missing(bad, vec![d]).await).0, 401);
            assert_eq!(
                status(w.client.put_manifest(bad, &manifest(&[("x", blob)])).await).0,
                401
            );
        }
        assert!(w.blobs().await.is_empty());
        let upload = w.upload_token(DINAH, "b-1", "a-1").await;
        publish(&w, DINAH, "b-1", &[("x", blob)]).await;
        // An upload token does not read.
        assert_eq!(status(w.client.get_blob(&upload, "b-1", &d).await).0, 401);
        let no_token = reqwest::get(format!("{}/api/v1/builds/b-1/blobs/{d}", w.store.url))
            .await
            .unwrap();
        assert_eq!(no_token.status().as_u16(), 401);
    })
    .await;
    w.stop().await;
}

async fn tokens_from_an_untrusted_idp_are_refused(backend: Backend) {
    let w = World::start(backend).await;
    let rogue_dir = tempfile::tempdir().unwrap();
    let rogue = start_idp(rogue_dir.path()).await;
    bounded(async {
        // Same client names and tenant, but an issuer the store does not trust.
        let forged = token(
            &rogue,
            DINAH,
            TOKEN_TYPE_UPLOAD,
            AUDIENCE,
            "b-1",
            Some("a-1"),
        )
        .await;
        let blob: &[u8] = b"payload";
        let (code, message) = status(
            w.client
                .put_blob(&forged, &Digest::of(blob), blob.to_vec())
                .await,
        );
        assert_eq!(code, 401);
        assert!(message.contains("not trusted"), "{message}");
        let forged_read = token(&rogue, DINAH, TOKEN_TYPE_READ, AUDIENCE, "b-1", None).await;
        assert_eq!(
            status(
                w.client
                    .get_blob(&forged_read, "b-1", &Digest::of(blob))
                    .await
            )
            .0,
            401
        );
        assert!(w.blobs().await.is_empty());
    })
    .await;
    rogue.stop().await;
    w.stop().await;
}

async fn concurrent_uploads_of_one_blob_all_succeed(backend: Backend) {
    let w = World::start(backend).await;
    bounded(async {
        let blob: Vec<u8> = (0..2_000_000u32).map(|i| (i * 7 % 256) as u8).collect();
        let d = Digest::of(&blob);
        let t1 = w.upload_token(DINAH, "b-1", "a-1").await;
        let t2 = w.upload_token(DINAH, "b-1", "a-2").await;
        let t3 = w.upload_token(ELIZA, "b-9", "a-1").await;
        let (r1, r2, r3) = tokio::join!(
            w.client.put_blob(&t1, &d, blob.clone()),
            w.client.put_blob(&t2, &d, blob.clone()),
            w.client.put_blob(&t3, &d, blob.clone()),
        );
        r1.unwrap();
        r2.unwrap();
        r3.unwrap();
        assert_eq!(w.blobs().await.len(), 1);
        assert!(w.unfinished().await.is_empty());
        assert_eq!(w.blobs().await[0], blob);
        assert!(w.client.missing(&t1, vec![d]).await.unwrap().is_empty());
        assert!(w.client.missing(&t3, vec![d]).await.unwrap().is_empty());
    })
    .await;
    w.stop().await;
}

async fn missing_answers_ten_thousand_digests_and_no_more(backend: Backend) {
    let w = World::start(backend).await;
    bounded(async {
        let upload = w.upload_token(DINAH, "b-1", "a-1").await;
        let stored: &[u8] = b"the one stored blob";
        w.client
            .put_blob(&upload, &Digest::of(stored), stored.to_vec())
            .await
            .unwrap();
        let mut digests: Vec<Digest> = (0..9_999u32)
            .map(|i| Digest::of(&i.to_le_bytes()))
            .collect();
        digests.push(Digest::of(stored));
        let missing = w.client.missing(&upload, digests.clone()).await.unwrap();
        assert_eq!(missing.len(), 9_999);
        assert_eq!(
            missing,
            digests[..9_999].to_vec(),
            "answered in request order"
        );
        digests.push(Digest::of(b"one too many"));
        assert_eq!(status(w.client.missing(&upload, digests).await).0, 400);
    })
    .await;
    w.stop().await;
}

// ---- Constraints set up front, revocation, and forged tokens from trusted issuers ----

/// A token carrying constraints, requested with raw form fields (as `TokenConstraints` names
/// them) since `IdpClient` does not send them.
async fn constrained(
    idp: &Server,
    who: usize,
    token_type: &str,
    build: &str,
    assignment: Option<&str>,
    extra: &[(&str, &str)],
) -> String {
    let (id, _, secret) = CLIENTS[who];
    let access = IdpClient::new(&idp.url, id, secret)
        .access_token()
        .await
        .unwrap()
        .access_token;
    let mut form: Vec<(&str, &str)> = vec![
        ("grant_type", GRANT_TOKEN_EXCHANGE),
        ("subject_token", &access),
        ("subject_token_type", TOKEN_TYPE_ACCESS),
        ("requested_token_type", token_type),
        ("audience", AUDIENCE),
        ("build", build),
        ("lifetime_secs", "600"),
    ];
    if let Some(a) = assignment {
        form.push(("job", "compile"));
        form.push(("assignment", a));
    }
    form.extend_from_slice(extra);
    let resp = reqwest::Client::new()
        .post(format!("{}/token", idp.url))
        .basic_auth(id, Some(secret))
        .form(&form)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
    let body: serde_json::Value = resp.json().await.unwrap();
    body["access_token"].as_str().unwrap().to_string()
}

fn claim(token: &str, name: &str) -> serde_json::Value {
    let payload = token.split('.').nth(1).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&B64URL.decode(payload).unwrap()).unwrap();
    v[name].clone()
}

fn jti(token: &str) -> String {
    claim(token, "jti").as_str().unwrap().to_string()
}

async fn revoke(w: &World, token: &str, jtis: &[&str]) -> (u16, serde_json::Value) {
    let resp = reqwest::Client::new()
        .post(format!("{}/api/v1/revoke", w.store.url))
        .bearer_auth(token)
        .json(&serde_json::json!({ "jtis": jtis }))
        .send()
        .await
        .unwrap();
    let code = resp.status().as_u16();
    (code, resp.json().await.unwrap())
}

async fn max_calls_holds_under_racing_requests(backend: Backend) {
    let w = World::start(backend).await;
    bounded(async {
        let t = constrained(
            &w.idp,
            DINAH,
            TOKEN_TYPE_UPLOAD,
            "b-1",
            Some("a-1"),
            &[("max_calls", "5")],
        )
        .await;
        assert_eq!(claim(&t, "scope")["max_calls"], 5);
        let d = Digest::of(b"x");
        let calls = (0..20).map(|_| w.client.missing(&t, vec![d]));
        let results = futures::future::join_all(calls).await;
        let ok = results.iter().filter(|r| r.is_ok()).count();
        assert_eq!(ok, 5, "exactly max_calls calls succeed");
        for r in results.into_iter().filter(Result::is_err) {
            let (code, message) = status(r);
            assert_eq!(code, 403);
            assert!(message.contains("max_calls (5)"), "{message}");
        }
        // Failed calls count too: a token of 2 calls spent on bad requests is used up.
        let t2 = constrained(
            &w.idp,
            DINAH,
            TOKEN_TYPE_UPLOAD,
            "b-1",
            Some("a-2"),
            &[("max_calls", "2")],
        )
        .await;
        for _ in 0..2 {
            let (code, _) = status(w.client.put_blob(&t2, &d, b"not x".to_vec()).await);
            assert_eq!(code, 400);
        }
        let (code, message) = status(w.client.put_blob(&t2, &d, b"x".to_vec()).await);
        assert_eq!(code, 403, "{message}");
        assert!(w.blobs().await.is_empty());
    })
    .await;
    w.stop().await;
}

async fn file_n_plus_one_is_refused(backend: Backend) {
    let w = World::start(backend).await;
    bounded(async {
        let t = constrained(
            &w.idp,
            DINAH,
            TOKEN_TYPE_UPLOAD,
            "b-1",
            Some("a-1"),
            &[("max_files", "2")],
        )
        .await;
        let (one, two, three): (&[u8], &[u8], &[u8]) = (b"one", b"two", b"three");
        w.client
            .put_blob(&t, &Digest::of(one), one.to_vec())
            .await
            .unwrap();
        w.client
            .put_blob(&t, &Digest::of(two), two.to_vec())
            .await
            .unwrap();
        let (code, message) = status(
            w.client
                .put_blob(&t, &Digest::of(three), three.to_vec())
                .await,
        );
        assert_eq!(code, 403);
        assert!(message.contains("max_files (2)"), "{message}");
        assert_eq!(w.blobs().await.len(), 2, "the third file was not stored");
        assert_eq!(
            w.client.missing(&t, vec![Digest::of(three)]).await.unwrap(),
            vec![Digest::of(three)]
        );
    })
    .await;
    w.stop().await;
}

async fn an_upload_is_cut_off_at_max_bytes_leaving_nothing(backend: Backend) {
    let w = World::start(backend).await;
    bounded(async {
        let t = constrained(
            &w.idp,
            DINAH,
            TOKEN_TYPE_UPLOAD,
            "b-1",
            Some("a-1"),
            &[("max_bytes", "3000000")],
        )
        .await;
        let first: Vec<u8> = (0..2_000_000u32).map(|i| (i % 253) as u8).collect();
        w.client
            .put_blob(&t, &Digest::of(&first), first.clone())
            .await
            .unwrap();
        // Declared too large: refused before the body is read.
        let second: Vec<u8> = (0..1_000_001u32).map(|i| (i % 241) as u8).collect();
        let d2 = Digest::of(&second);
        let (code, message) = status(w.client.put_blob(&t, &d2, second.clone()).await);
        assert_eq!(code, 413);
        assert!(message.contains("max_bytes (3000000 bytes)"), "{message}");
        // Streamed without a length: cut off at the chunk that goes over.
        let chunks: Vec<Result<bytes::Bytes, std::io::Error>> = second
            .chunks(64 * 1024)
            .map(|c| Ok(bytes::Bytes::copy_from_slice(c)))
            .collect();
        let resp = reqwest::Client::new()
            .put(format!("{}/api/v1/blobs/{d2}", w.store.url))
            .bearer_auth(&t)
            .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 413);
        assert!(resp.text().await.unwrap().contains("max_bytes"));
        assert_eq!(w.blobs().await.len(), 1, "only the first blob is stored");
        assert!(
            w.unfinished().await.is_empty(),
            "the cut-off upload left nothing"
        );
        assert_eq!(w.client.missing(&t, vec![d2]).await.unwrap(), vec![d2]);
        // The bytes the cut-off upload did send were counted: the token is now nearly spent.
        // What is left is less than the refused chunk (64 KiB), not the 1 MB never stored.
        let small = vec![1u8; 70_000];
        let (code, _) = status(
            w.client
                .put_blob(&t, &Digest::of(&small), small.clone())
                .await,
        );
        assert_eq!(code, 413);
        // Exactly up to the limit is fine; the byte after it is refused.
        let t2 = constrained(
            &w.idp,
            DINAH,
            TOKEN_TYPE_UPLOAD,
            "b-1",
            Some("a-2"),
            &[("max_bytes", "1000000")],
        )
        .await;
        let exact = vec![7u8; 1_000_000];
        w.client
            .put_blob(&t2, &Digest::of(&exact), exact.clone())
            .await
            .unwrap();
        let (code, _) = status(
            w.client
                .put_blob(&t2, &Digest::of(b"1"), b"1".to_vec())
                .await,
        );
        assert_eq!(code, 413, "the byte after max_bytes is refused");
        assert_eq!(w.blobs().await.len(), 2);
    })
    .await;
    w.stop().await;
}

async fn a_request_from_outside_the_source_cidrs_is_refused(backend: Backend) {
    let w = World::start(backend).await;
    bounded(async {
        let d = Digest::of(b"x");
        let elsewhere = constrained(
            &w.idp,
            DINAH,
            TOKEN_TYPE_UPLOAD,
            "b-1",
            Some("a-1"),
            &[("source_cidrs", "10.0.0.0/8, 192.168.0.0/16")],
        )
        .await;
        let (code, message) = status(w.client.missing(&elsewhere, vec![d]).await);
        assert_eq!(code, 403);
        assert!(
            message.contains("only from 10.0.0.0/8, 192.168.0.0/16")
                && message.contains("came from 127.0.0.1"),
            "{message}"
        );
        let (code, _) = status(w.client.put_blob(&elsewhere, &d, b"x".to_vec()).await);
        assert_eq!(code, 403);
        assert!(w.blobs().await.is_empty());
        let here = constrained(
            &w.idp,
            DINAH,
            TOKEN_TYPE_UPLOAD,
            "b-1",
            Some("a-1"),
            &[("source_cidrs", "10.0.0.0/8,127.0.0.0/8")],
        )
        .await;
        assert_eq!(w.client.missing(&here, vec![d]).await.unwrap(), vec![d]);
    })
    .await;
    w.stop().await;
}

async fn a_revoked_token_is_refused_before_it_expires(backend: Backend) {
    let w = World::start(backend).await;
    bounded(async {
        let d = Digest::of(b"x");
        let upload = w.upload_token(DINAH, "b-1", "a-1").await;
        let unused = w.upload_token(DINAH, "b-1", "a-2").await;
        let other_build = w.upload_token(DINAH, "b-2", "a-1").await;
        w.client.missing(&upload, vec![d]).await.unwrap();
        w.client.missing(&other_build, vec![d]).await.unwrap();
        let revoker = constrained(&w.idp, DINAH, TOKEN_TYPE_REVOKE, "b-1", None, &[]).await;
        let eliza_revoker = constrained(&w.idp, ELIZA, TOKEN_TYPE_REVOKE, "b-1", None, &[]).await;

        // Another tenant's revoke token for the same build name revokes nothing.
        let (code, body) = revoke(&w, &eliza_revoker, &[&jti(&upload)]).await;
        assert_eq!(code, 200);
        assert_eq!(body["revoked"], serde_json::json!([]));
        assert_eq!(body["unknown"], serde_json::json!([jti(&upload)]));
        // An upload token is not a revoke token, and a revoke token does not upload.
        let (code, body) = revoke(&w, &upload, &[&jti(&upload)]).await;
        assert_eq!(code, 401);
        assert!(body.to_string().contains("token type"), "{body}");
        assert_eq!(status(w.client.missing(&revoker, vec![d]).await).0, 401);
        w.client.missing(&upload, vec![d]).await.unwrap();

        let ids = [jti(&upload), jti(&other_build), jti(&unused)];
        let (code, body) = revoke(&w, &revoker, &[&ids[0], &ids[1], &ids[2]]).await;
        assert_eq!(code, 200);
        assert_eq!(body["revoked"], serde_json::json!([ids[0], ids[2]]));
        assert_eq!(body["unknown"], serde_json::json!([ids[1]]));
        // A token revoked before it was ever used is dead on arrival.
        let (code, message) = status(w.client.missing(&unused, vec![d]).await);
        assert_eq!(code, 401);
        assert!(message.contains("has been revoked"), "{message}");
        let (code, message) = status(w.client.missing(&upload, vec![d]).await);
        assert_eq!(code, 401);
        assert!(message.contains("has been revoked"), "{message}");
        let (code, _) = status(w.client.put_blob(&upload, &d, b"x".to_vec()).await);
        assert_eq!(code, 401);
        assert!(w.blobs().await.is_empty());
        // Tokens of another build are untouched.
        w.client.missing(&other_build, vec![d]).await.unwrap();
        // Revoking again is harmless.
        let (code, body) = revoke(&w, &revoker, &[&ids[0]]).await;
        assert_eq!(code, 200);
        assert_eq!(body["revoked"], serde_json::json!([ids[0]]));
    })
    .await;
    w.stop().await;
}

/// An issuer the test controls: discovery and JWKS for one key it holds, counting JWKS fetches.
struct FakeIssuer {
    server: Server,
    key: quorum_token::IssuerKey,
    jwks_fetches: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

async fn fake_issuer(seed: u8) -> FakeIssuer {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let (listener, url) = bind().await;
    let key = quorum_token::IssuerKey::new(ed25519_dalek::SigningKey::from_bytes(&[seed; 32]));
    let discovery = quorum_api::v1::idp::Discovery {
        issuer: url.clone(),
        jwks_uri: format!("{url}/jwks"),
        token_endpoint: format!("{url}/token"),
        grant_types_supported: vec![],
        id_token_signing_alg_values_supported: vec!["EdDSA".into()],
    };
    let jwks = quorum_token::Jwks {
        keys: vec![key.jwk()],
    };
    let fetches = Arc::new(AtomicUsize::new(0));
    let counter = fetches.clone();
    let app = axum::Router::new()
        .route(
            "/.well-known/openid-configuration",
            axum::routing::get(move || async move { axum::Json(discovery) }),
        )
        .route(
            "/jwks",
            axum::routing::get(move || async move {
                counter.fetch_add(1, Ordering::SeqCst);
                axum::Json(jwks)
            }),
        );
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(quorum_service::serve(listener, app, shutdown.clone()));
    FakeIssuer {
        server: Server {
            url,
            shutdown,
            task,
        },
        key,
        jwks_fetches: fetches,
    }
}

/// Signs `header` and `claims` exactly as given with `key`.
fn forge(
    header: serde_json::Value,
    claims: &serde_json::Value,
    key: &ed25519_dalek::SigningKey,
) -> String {
    use ed25519_dalek::Signer as _;
    let input = format!(
        "{}.{}",
        B64URL.encode(header.to_string()),
        B64URL.encode(claims.to_string())
    );
    let sig = key.sign(input.as_bytes());
    format!("{input}.{}", B64URL.encode(sig.to_bytes()))
}

fn upload_claims(iss: &str, tenant: &str, build: &str) -> serde_json::Value {
    let now = quorum_service::now_unix();
    serde_json::json!({
        "iss": iss, "sub": "ctl", "aud": AUDIENCE, "exp": now + 300, "nbf": now, "iat": now,
        "jti": quorum_token::new_jti(), "tenant": tenant,
        "scope": {"controller": "ctl", "build": build, "job": "compile", "assignment": "a-1"}
    })
}

fn upload_header(kid: &str) -> serde_json::Value {
    serde_json::json!({"alg": "EdDSA", "typ": quorum_token::TYP_UPLOAD, "kid": kid})
}

#[tokio::test]
async fn trusted_issuers_cannot_forge_for_each_other_or_for_foreign_tenants() {
    let a = fake_issuer(11).await;
    let b = fake_issuer(12).await;
    let dir = tempfile::tempdir().unwrap();
    let store = start_store_trusting(
        dir.path(),
        vec![
            TrustedIssuer {
                issuer: a.server.url.clone(),
                tenants: None,
            },
            TrustedIssuer {
                issuer: b.server.url.clone(),
                tenants: Some(vec!["eliza".into()]),
            },
        ],
        1 << 20,
    )
    .await;
    let client = StoreClient::new(&store.url);
    let d = Digest::of(b"x");
    bounded(async {
        let (a_url, b_url) = (&a.server.url, &b.server.url);
        // Baseline: each issuer's genuine tokens for a tenant it may speak for are accepted.
        let good_a = forge(
            upload_header(&a.key.kid),
            &upload_claims(a_url, "dinah", "12"),
            &a.key.key,
        );
        assert_eq!(client.missing(&good_a, vec![d]).await.unwrap(), vec![d]);
        let good_b = forge(
            upload_header(&b.key.kid),
            &upload_claims(b_url, "eliza", "12"),
            &b.key.key,
        );
        assert_eq!(client.missing(&good_b, vec![d]).await.unwrap(), vec![d]);

        // B may speak only for eliza: a perfectly signed B token naming dinah is refused.
        let b_for_dinah = forge(
            upload_header(&b.key.kid),
            &upload_claims(b_url, "dinah", "12"),
            &b.key.key,
        );
        let (code, message) = status(client.put_blob(&b_for_dinah, &d, b"x".to_vec()).await);
        assert_eq!(code, 401);
        assert!(
            message.contains(&format!(
                "issuer `{b_url}` may not speak for tenant `dinah`"
            )),
            "{message}"
        );

        // `iss` of B, signed with A's key: under A's kid B has no such key; under B's kid the
        // signature fails.
        let claims = upload_claims(b_url, "eliza", "12");
        let (code, message) = status(
            client
                .missing(
                    &forge(upload_header(&a.key.kid), &claims, &a.key.key),
                    vec![d],
                )
                .await,
        );
        assert_eq!(code, 401);
        assert!(message.contains("has no key"), "{message}");
        let (code, message) = status(
            client
                .missing(
                    &forge(upload_header(&b.key.kid), &claims, &a.key.key),
                    vec![d],
                )
                .await,
        );
        assert_eq!(code, 401);
        assert!(message.contains("signature does not verify"), "{message}");

        // Unknown kids: refused; the first makes one refetch (the issuer may have rotated), and
        // no more follow within the throttle window, however many unknown kids arrive.
        let fetched = a.jwks_fetches.load(std::sync::atomic::Ordering::SeqCst);
        assert_eq!(fetched, 1, "one fetch served every A token so far");
        for n in 0..5 {
            let kid = format!("rotated-away-{n}");
            let t = forge(
                upload_header(&kid),
                &upload_claims(a_url, "dinah", "12"),
                &a.key.key,
            );
            let (code, message) = status(client.missing(&t, vec![d]).await);
            assert_eq!(code, 401);
            assert!(
                message.contains(&format!("has no key `{kid}`")),
                "{message}"
            );
        }
        assert_eq!(
            a.jwks_fetches.load(std::sync::atomic::Ordering::SeqCst),
            2,
            "one refetch for the first unknown kid, none for the rest of the window"
        );

        // `jku`, `x5u` and an embedded `jwk` point at a server the test watches: they are
        // never fetched, and the key still comes from A's JWKS.
        let watch = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let watch_url = format!("http://{}", watch.local_addr().unwrap());
        let rogue = quorum_token::IssuerKey::new(ed25519_dalek::SigningKey::from_bytes(&[99; 32]));
        let header = |kid: &str| {
            serde_json::json!({
                "alg": "EdDSA", "typ": quorum_token::TYP_UPLOAD, "kid": kid,
                "jku": format!("{watch_url}/jwks"), "x5u": format!("{watch_url}/cert"),
                "jwk": rogue.jwk(),
            })
        };
        let self_signed = forge(
            header(&rogue.kid),
            &upload_claims(a_url, "dinah", "12"),
            &rogue.key,
        );
        assert_eq!(status(client.missing(&self_signed, vec![d]).await).0, 401);
        let genuine = forge(
            header(&a.key.kid),
            &upload_claims(a_url, "dinah", "12"),
            &a.key.key,
        );
        assert_eq!(client.missing(&genuine, vec![d]).await.unwrap(), vec![d]);
        let connected = tokio::time::timeout(Duration::from_millis(300), watch.accept()).await;
        assert!(
            connected.is_err(),
            "the store connected to a URL named in a token header"
        );
        assert!(
            std::fs::read_dir(dir.path().join("blobs"))
                .unwrap()
                .next()
                .is_none(),
            "no refused token stored anything"
        );
    })
    .await;
    store.stop().await;
    a.server.stop().await;
    b.server.stop().await;
}

async fn a_tenants_token_does_not_reach_another_tenants_build_or_a_prefix_build(backend: Backend) {
    let w = World::start(backend).await;
    bounded(async {
        let secret: &[u8] = b"build 123 of dinah";
        let m = publish(&w, DINAH, "123", &[("f", secret)]).await;
        let d = Digest::of(secret);
        // Eliza's token for build 123 reads nothing of Dinah's build 123.
        let eliza = w.read_token(ELIZA, "123").await;
        assert_eq!(status(w.client.get_blob(&eliza, "123", &d).await).0, 404);
        assert_eq!(
            status(w.client.get_manifest(&eliza, "123", &m).await).0,
            404
        );
        // Dinah's token for build 12 does not reach build 123, nor by path tricks.
        let twelve = w.read_token(DINAH, "12").await;
        for build in ["123", "12/../123", "12%2F..%2F123", "12%00"] {
            let (code, _) = status(w.client.get_blob(&twelve, build, &d).await);
            assert!(code == 404 || code == 400, "{build}: {code}");
        }
        let raw = reqwest::Client::new()
            .get(format!("{}/api/v1/builds/12/../123/blobs/{d}", w.store.url))
            .bearer_auth(&twelve)
            .send()
            .await
            .unwrap();
        assert!(raw.status().is_client_error());
        // An upload token of Eliza's cannot add to Dinah's build 123: her manifest lands in her
        // own tenant, so Dinah's read of 123 still sees only her own manifest.
        let dinah = w.read_token(DINAH, "123").await;
        assert_eq!(
            &w.client.get_blob(&dinah, "123", &d).await.unwrap()[..],
            secret
        );
    })
    .await;
    w.stop().await;
}

async fn manifest_paths_that_escape_are_refused_and_record_nothing(backend: Backend) {
    let w = World::start(backend).await;
    bounded(async {
        let upload = w.upload_token(DINAH, "b-1", "a-1").await;
        let empty = Digest::empty().to_string();
        for path in ["../x", "a/../../x", "/etc/passwd", "a//b", "./a", ""] {
            let body = serde_json::json!({
                "entries": [{"path": path, "mode": 420, "size": 0, "digest": empty}]
            });
            let resp = reqwest::Client::new()
                .put(format!("{}/api/v1/manifest", w.store.url))
                .bearer_auth(&upload)
                .json(&body)
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status().as_u16(), 400, "{path:?}");
            let text = resp.text().await.unwrap();
            assert!(text.contains("invalid manifest"), "{path:?}: {text}");
        }
        // A manifest cannot describe a symlink (pointing out or anywhere): modes are
        // permission bits only, and file-type bits such as S_IFLNK are refused.
        for mode in [0o120777u32, 0o100644, 0o40755] {
            let body = serde_json::json!({
                "entries": [{"path": "link", "mode": mode, "size": 0, "digest": empty}]
            });
            let resp = reqwest::Client::new()
                .put(format!("{}/api/v1/manifest", w.store.url))
                .bearer_auth(&upload)
                .json(&body)
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status().as_u16(), 400, "{mode:o}");
            let text = resp.text().await.unwrap();
            assert!(
                text.contains("bits other than permissions"),
                "{mode:o}: {text}"
            );
        }
        // Nothing was recorded: the assignment can still record its one manifest.
        let ok = manifest(&[("a/%2e%2e/b", b"")]);
        assert_eq!(
            w.client.put_manifest(&upload, &ok).await.unwrap(),
            ok.digest()
        );
        // A percent-encoded `..` is a literal name inside the build, never decoded: reading it
        // back under build `b-1` is all it can do.
        let read = w.read_token(DINAH, "b-1").await;
        assert!(
            w.client
                .get_blob(&read, "b-1", &Digest::empty())
                .await
                .is_ok()
        );
    })
    .await;
    w.stop().await;
}

// ---- Downloads by path, ranges, public builds, retention, quotas, usage (issue 4) ----

/// A GET sent as raw bytes, so the path reaches the store exactly as written (HTTP clients
/// normalize `..` and `%2e%2e` away). Returns the status and the body.
async fn raw_get(w: &World, path: &str, token: Option<&str>) -> (u16, String) {
    let addr = w.store.url.trim_start_matches("http://").to_string();
    let mut conn = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let head = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n");
    conn.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::io::AsyncReadExt::read_to_end(&mut conn, &mut answer)
        .await
        .unwrap();
    let answer = String::from_utf8_lossy(&answer).to_string();
    let code = answer[9..12].parse().unwrap();
    let body = answer.split_once("\r\n\r\n").unwrap().1.to_string();
    (code, body)
}

async fn get(url: &str, token: Option<&str>, range: Option<&str>) -> reqwest::Response {
    let mut req = reqwest::Client::new().get(url);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(r) = range {
        req = req.header("Range", r);
    }
    req.send().await.unwrap()
}

/// The DSSE envelope of a statement naming `subjects` (name, bytes). The store does not check
/// the signature (it has no key to check it with), so none is made here.
fn envelope(subjects: &[(&str, &[u8])]) -> serde_json::Value {
    let subject: Vec<_> = subjects
        .iter()
        .map(|(name, bytes)| serde_json::json!({"name": name, "digest": {"sha256": Digest::of(bytes).hex()}}))
        .collect();
    let statement = serde_json::json!({
        "_type": quorum_core::attest::STATEMENT_TYPE,
        "subject": subject,
        "predicateType": quorum_core::attest::PROVENANCE_TYPE,
        "predicate": {},
    });
    serde_json::json!({
        "payload": base64::engine::general_purpose::STANDARD.encode(statement.to_string()),
        "payloadType": quorum_core::attest::PAYLOAD_TYPE,
        "signatures": [],
    })
}

async fn put_statement(
    w: &World,
    token: &str,
    build: &str,
    body: &serde_json::Value,
    public: bool,
) -> (u16, String) {
    let resp = reqwest::Client::new()
        .put(format!(
            "{}/api/v1/builds/{build}/statement?public={public}",
            w.store.url
        ))
        .bearer_auth(token)
        .json(body)
        .send()
        .await
        .unwrap();
    (resp.status().as_u16(), resp.text().await.unwrap())
}

async fn files_by_path_with_range_requests(backend: Backend) {
    let w = World::start(backend).await;
    bounded(async {
        let tool: &[u8] = b"0123456789abcdef";
        publish(&w, DINAH, "b-1", &[("bin/tool", tool), ("empty", b"")]).await;
        let read = w.read_token(DINAH, "b-1").await;
        let url = |p: &str| format!("{}/api/v1/builds/b-1/files/compile/{p}", w.store.url);

        let whole = get(&url("bin/tool"), Some(&read), None).await;
        assert_eq!(whole.status(), 200);
        assert_eq!(whole.headers()["accept-ranges"], "bytes");
        assert_eq!(&whole.bytes().await.unwrap()[..], tool);
        for (range, part, content_range) in [
            ("bytes=2-5", &b"2345"[..], "bytes 2-5/16"),
            ("bytes=10-", b"abcdef", "bytes 10-15/16"),
            ("bytes=-3", b"def", "bytes 13-15/16"),
            ("bytes=14-99", b"ef", "bytes 14-15/16"),
        ] {
            let resp = get(&url("bin/tool"), Some(&read), Some(range)).await;
            assert_eq!(resp.status(), 206, "{range}");
            assert_eq!(resp.headers()["content-range"], content_range, "{range}");
            assert_eq!(&resp.bytes().await.unwrap()[..], part, "{range}");
        }
        for range in ["bytes=16-", "bytes=-0"] {
            let resp = get(&url("bin/tool"), Some(&read), Some(range)).await;
            assert_eq!(resp.status(), 416, "{range}");
            assert_eq!(resp.headers()["content-range"], "bytes */16");
        }
        // Several ranges at once are not supported: the whole file comes back, as RFC 9110 allows.
        let resp = get(&url("bin/tool"), Some(&read), Some("bytes=0-1,4-5")).await;
        assert_eq!(resp.status(), 200);
        // The empty file exists and has no bytes to range over.
        let resp = get(&url("empty"), Some(&read), None).await;
        assert_eq!(resp.status(), 200);
        assert!(resp.bytes().await.unwrap().is_empty());
        assert_eq!(
            get(&url("empty"), Some(&read), Some("bytes=0-"))
                .await
                .status(),
            416
        );

        // The same blob by digest takes ranges too.
        let by_digest = format!(
            "{}/api/v1/builds/b-1/blobs/{}",
            w.store.url,
            Digest::of(tool)
        );
        let resp = get(&by_digest, Some(&read), Some("bytes=0-0")).await;
        assert_eq!(resp.status(), 206);
        assert_eq!(&resp.bytes().await.unwrap()[..], b"0");

        // Absent, not-yours and no token all look alike; a wrong job is absent too.
        assert_eq!(get(&url("bin/nope"), Some(&read), None).await.status(), 404);
        let eliza = w.read_token(ELIZA, "b-1").await;
        assert_eq!(
            get(&url("bin/tool"), Some(&eliza), None).await.status(),
            404
        );
        assert_eq!(get(&url("bin/tool"), None, None).await.status(), 401);
        let other_job = format!("{}/api/v1/builds/b-1/files/test/bin/tool", w.store.url);
        assert_eq!(get(&other_job, Some(&read), None).await.status(), 404);

        // Path traversal in every form is refused with an error saying so.
        for path in [
            "bin/../bin/tool",
            "bin/%2e%2e/bin/tool",
            "bin/%2E%2E/%2E%2E/etc/passwd",
            "%2Fetc/passwd",
            "bin/.%2Ftool",
            "bin//tool",
            "bin%5C..%5Ctool",
            "./bin/tool",
        ] {
            let (code, body) = raw_get(
                &w,
                &format!("/api/v1/builds/b-1/files/compile/{path}"),
                Some(&read),
            )
            .await;
            assert_eq!(code, 400, "{path}: {body}");
            assert!(body.contains("invalid file path"), "{path}: {body}");
        }
        let (code, body) =
            raw_get(&w, "/api/v1/builds/b-1/files/..%2F/bin/tool", Some(&read)).await;
        assert_eq!(code, 400, "{body}");

        // Two assignments of the job disagree on a path: the store does not pick one.
        let other = w.upload_token(DINAH, "b-1", "a-2").await;
        let changed: &[u8] = b"something else";
        w.client
            .put_blob(&other, &Digest::of(changed), changed.to_vec())
            .await
            .unwrap();
        w.client
            .put_manifest(&other, &manifest(&[("bin/tool", changed), ("empty", b"")]))
            .await
            .unwrap();
        let resp = get(&url("bin/tool"), Some(&read), None).await;
        assert_eq!(resp.status(), 409);
        assert!(resp.text().await.unwrap().contains("`bin/tool`"));
        assert_eq!(get(&url("empty"), Some(&read), None).await.status(), 200);
    })
    .await;
    w.stop().await;
}

async fn a_controller_makes_a_build_public_with_its_statement(backend: Backend) {
    let w = World::start(backend).await;
    bounded(async {
        let tool: &[u8] = b"the verified tool";
        publish(&w, DINAH, "b-1", &[("bin/tool", tool)]).await;
        publish(&w, ELIZA, "b-1", &[("bin/tool", b"eliza's own tool")]).await;
        let public = |tenant: &str, what: &str| {
            format!("{}/api/v1/public/{tenant}/builds/b-1/{what}", w.store.url)
        };
        let file = public("dinah", "files/compile/bin/tool");
        assert_eq!(get(&file, None, None).await.status(), 404, "not public yet");

        let good = envelope(&[("compile/bin/tool", tool)]);
        // Tokens other than the build's controller's own cannot publish.
        let upload = w.upload_token(DINAH, "b-1", "a-9").await;
        let read = w.read_token(DINAH, "b-1").await;
        for t in [&upload, &read] {
            assert_eq!(put_statement(&w, t, "b-1", &good, true).await.0, 401);
        }
        let wrong_build = w.controller_token(DINAH, "b-2").await;
        assert_eq!(
            put_statement(&w, &wrong_build, "b-1", &good, true).await.0,
            403
        );
        // Eliza's controller cannot expose Dinah's blob through a statement of Eliza's build.
        let eliza = w.controller_token(ELIZA, "b-1").await;
        let (code, body) = put_statement(&w, &eliza, "b-1", &good, true).await;
        assert_eq!(code, 400, "{body}");
        assert!(body.contains("not an artifact of build `b-1`"), "{body}");
        assert_eq!(
            get(&public("eliza", "files/compile/bin/tool"), None, None)
                .await
                .status(),
            404
        );
        // A statement that names anything outside the build, or is not a statement, is refused.
        let dinah = w.controller_token(DINAH, "b-1").await;
        let stray = envelope(&[
            ("compile/bin/tool", tool),
            ("compile/x", b"not in the build"),
        ]);
        assert_eq!(put_statement(&w, &dinah, "b-1", &stray, true).await.0, 400);
        let garbage = serde_json::json!({"payload": "!!", "payloadType": "x", "signatures": []});
        assert_eq!(
            put_statement(&w, &dinah, "b-1", &garbage, true).await.0,
            400
        );
        assert_eq!(
            get(&file, None, None).await.status(),
            404,
            "nothing was recorded"
        );

        // The statement kept private first: readable with a read token only.
        let (code, body) = put_statement(&w, &dinah, "b-1", &good, false).await;
        assert_eq!(code, 200, "{body}");
        let statement_url = format!("{}/api/v1/builds/b-1/statement", w.store.url);
        let got: serde_json::Value = get(&statement_url, Some(&read), None)
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(got, good);
        assert_eq!(get(&file, None, None).await.status(), 404);

        let (code, body) = put_statement(&w, &dinah, "b-1", &good, true).await;
        assert_eq!(code, 200, "{body}");
        let resp = get(&file, None, Some("bytes=4-11")).await;
        assert_eq!(resp.status(), 206);
        assert_eq!(&resp.bytes().await.unwrap()[..], b"verified");
        let got: serde_json::Value = get(&public("dinah", "statement"), None, None)
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(got, good);
        let blob = public("dinah", &format!("blobs/{}", Digest::of(tool)));
        assert_eq!(
            &get(&blob, None, None).await.bytes().await.unwrap()[..],
            tool
        );
        // Public means this build of this tenant: not Eliza's build of the same name.
        assert_eq!(
            get(&public("eliza", "files/compile/bin/tool"), None, None)
                .await
                .status(),
            404
        );
        assert_eq!(
            get(&public("eliza", "statement"), None, None)
                .await
                .status(),
            404
        );
    })
    .await;
    w.stop().await;
}

/// Usage of `tenant` as the store's operator sees it (what `quorum store usage` prints).
async fn usage_of(w: &World, tenant: &str) -> quorum_store::Usage {
    quorum_store::usage_of(&w.config, Some(tenant))
        .await
        .unwrap()
        .pop()
        .unwrap_or(quorum_store::Usage {
            tenant: tenant.into(),
            stored_bytes: 0,
            bytes_in: 0,
            bytes_out: 0,
        })
}

async fn usage_counts_bytes_stored_and_transferred_per_tenant(backend: Backend) {
    let w = World::start(backend).await;
    bounded(async {
        let a = vec![1u8; 1000];
        let b = vec![2u8; 300];
        publish(&w, DINAH, "b-1", &[("a", &a), ("b", &b)]).await;
        // Eliza uploads the same bytes: she pays for them too, and learns nothing of Dinah's.
        publish(&w, ELIZA, "b-7", &[("a", &a)]).await;
        let read = w.read_token(DINAH, "b-1").await;
        let url = format!("{}/api/v1/builds/b-1/files/compile/a", w.store.url);
        assert_eq!(get(&url, Some(&read), None).await.bytes().await.unwrap().len(), 1000);
        assert_eq!(get(&url, Some(&read), Some("bytes=0-99")).await.bytes().await.unwrap().len(), 100);

        let ctl = w.controller_token(DINAH, "b-1").await;
        let seen: serde_json::Value = get(&format!("{}/api/v1/usage", w.store.url), Some(&ctl), None)
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(
            seen,
            serde_json::json!({"tenant": "dinah", "stored_bytes": 1300, "bytes_in": 1300, "bytes_out": 1100})
        );
        let eliza = w.controller_token(ELIZA, "b-7").await;
        let seen: serde_json::Value = get(&format!("{}/api/v1/usage", w.store.url), Some(&eliza), None)
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(
            seen,
            serde_json::json!({"tenant": "eliza", "stored_bytes": 1000, "bytes_in": 1000, "bytes_out": 0})
        );
        // Upload tokens do not read usage.
        let upload = w.upload_token(DINAH, "b-1", "a-1").await;
        assert_eq!(get(&format!("{}/api/v1/usage", w.store.url), Some(&upload), None).await.status(), 401);
        // The operator sees every tenant.
        let all = quorum_store::usage_of(&w.config, None).await.unwrap();
        let tenants: Vec<&str> = all.iter().map(|u| u.tenant.as_str()).collect();
        assert_eq!(tenants, ["dinah", "eliza"]);
    })
    .await;
    w.stop().await;
}

async fn quotas_are_enforced_per_tenant_on_upload(backend: Backend) {
    let w = World::start_with(backend, |c| {
        c.quota.default_bytes = Some(1000);
        c.quota.tenants.insert("eliza".into(), 5000);
        c.gc.provisional_secs = 0;
    })
    .await;
    bounded(async {
        let upload = w.upload_token(DINAH, "b-1", "a-1").await;
        let first = vec![1u8; 600];
        let second = vec![2u8; 600];
        w.client
            .put_blob(&upload, &Digest::of(&first), first.clone())
            .await
            .unwrap();
        let (code, message) = status(
            w.client
                .put_blob(&upload, &Digest::of(&second), second.clone())
                .await,
        );
        assert_eq!(code, 413);
        assert!(
            message.contains(
                "tenant `dinah` stores 600 bytes; 600 more would exceed its quota of 1000 bytes"
            ),
            "{message}"
        );
        assert_eq!(
            w.blobs().await,
            vec![first.clone()],
            "nothing more was stored"
        );
        assert!(w.unfinished().await.is_empty());
        // Sending bytes the tenant already stores costs nothing more.
        w.client
            .put_blob(&upload, &Digest::of(&first), first.clone())
            .await
            .unwrap();
        // A streamed upload without a declared length is checked once it has arrived.
        let src = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(src.path(), &second).unwrap();
        let body = reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::new(
            tokio::fs::File::open(src.path()).await.unwrap(),
        ));
        let resp = reqwest::Client::new()
            .put(format!(
                "{}/api/v1/blobs/{}",
                w.store.url,
                Digest::of(&second)
            ))
            .bearer_auth(&upload)
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 413);
        assert_eq!(w.blobs().await.len(), 1);
        assert!(w.unfinished().await.is_empty());
        // Another tenant has its own quota, even for the same bytes.
        let eliza = w.upload_token(ELIZA, "b-9", "a-1").await;
        w.client
            .put_blob(&eliza, &Digest::of(&second), second.clone())
            .await
            .unwrap();
        w.client
            .put_blob(&eliza, &Digest::of(&first), first.clone())
            .await
            .unwrap();
        assert_eq!(usage_of(&w, "eliza").await.stored_bytes, 1200);
        // Once garbage collection drops Dinah's unused upload, she has room again.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let collected = quorum_store::collect_garbage(&w.config).await.unwrap();
        assert_eq!(collected.links, 3);
        assert_eq!(usage_of(&w, "dinah").await.stored_bytes, 0);
        w.client
            .put_blob(&upload, &Digest::of(&second), second.clone())
            .await
            .unwrap();
    })
    .await;
    w.stop().await;
}

async fn gc_collects_what_nothing_references_and_keeps_the_rest(backend: Backend) {
    let w = World::start_with(backend, |c| c.gc.provisional_secs = 0).await;
    bounded(async {
        let kept: &[u8] = b"named by a manifest";
        let public: &[u8] = b"named by a public build";
        let loose: &[u8] = b"uploaded, never named";
        publish(&w, DINAH, "b-1", &[("kept", kept)]).await;
        publish(&w, DINAH, "b-2", &[("public", public)]).await;
        let upload = w.upload_token(DINAH, "b-3", "a-1").await;
        w.client
            .put_blob(&upload, &Digest::of(loose), loose.to_vec())
            .await
            .unwrap();
        let ctl = w.controller_token(DINAH, "b-2").await;
        assert_eq!(
            put_statement(
                &w,
                &ctl,
                "b-2",
                &envelope(&[("compile/public", public)]),
                true
            )
            .await
            .0,
            200
        );
        // Bytes without metadata (a crash between placing and recording) are garbage too.
        let orphan: &[u8] = b"orphaned bytes";
        match w.s3() {
            None => {
                let hex = Digest::of(orphan).hex();
                let dir = w.store_dir.join("blobs").join(&hex[..2]);
                std::fs::create_dir_all(&dir).unwrap();
                std::fs::write(dir.join(hex), orphan).unwrap();
            }
            Some((s3, _)) => {
                let key =
                    object_store::path::Path::from(format!("blobs/{}", Digest::of(orphan).hex()));
                s3.put(&key, orphan.to_vec().into()).await.unwrap();
            }
        }
        assert_eq!(w.blobs().await.len(), 4);

        // Within the provisional period nothing goes.
        let mut config = w.config.clone();
        config.gc.provisional_secs = 3600;
        let c = quorum_store::collect_garbage(&config).await.unwrap();
        assert_eq!((c.links, c.blobs, c.orphans), (0, 0, 1));
        assert_eq!(w.blobs().await.len(), 3);

        tokio::time::sleep(Duration::from_millis(1100)).await;
        let c = quorum_store::collect_garbage(&w.config).await.unwrap();
        assert_eq!((c.manifests, c.links, c.blobs, c.orphans), (0, 1, 1, 0));
        let mut left = w.blobs().await;
        left.sort();
        assert_eq!(left, vec![kept.to_vec(), public.to_vec()]);
        assert_eq!(
            w.client
                .missing(&upload, vec![Digest::of(loose)])
                .await
                .unwrap()
                .len(),
            1
        );
        let read = w.read_token(DINAH, "b-1").await;
        assert_eq!(
            &w.client
                .get_blob(&read, "b-1", &Digest::of(kept))
                .await
                .unwrap()[..],
            kept
        );

        // Past retention, manifests go too, except those of public builds.
        config.gc.provisional_secs = 0;
        config.gc.retention_secs = Some(0);
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let c = quorum_store::collect_garbage(&config).await.unwrap();
        assert_eq!((c.manifests, c.links, c.blobs), (1, 1, 1));
        assert_eq!(w.blobs().await, vec![public.to_vec()]);
        assert_eq!(
            w.client
                .get_blob(&read, "b-1", &Digest::of(kept))
                .await
                .unwrap_err()
                .status(),
            Some(404)
        );
        let file = format!(
            "{}/api/v1/public/dinah/builds/b-2/files/compile/public",
            w.store.url
        );
        assert_eq!(
            &get(&file, None, None).await.bytes().await.unwrap()[..],
            public
        );
        assert_eq!(
            usage_of(&w, "dinah").await.stored_bytes,
            public.len() as u64
        );
    })
    .await;
    w.stop().await;
}

/// Cache mode: unreferenced uploads outlive the provisional period while the store has room,
/// and go least recently used first when it has not.
async fn cache_mode_evicts_least_recently_used_uploads_first(backend: Backend) {
    let w = World::start_with(backend, |c| {
        c.gc.provisional_secs = 0;
        c.gc.cache_bytes = Some(2500);
    })
    .await;
    bounded(async {
        let upload = w.upload_token(DINAH, "b-1", "a-1").await;
        let blobs: Vec<Vec<u8>> = (0..3u8).map(|i| vec![i; 1000]).collect();
        // Used in the order 0, 1, 2, then 0 again (`missing` reporting it present is a use).
        for b in &blobs {
            w.client
                .put_blob(&upload, &Digest::of(b), b.clone())
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(1100)).await;
        }
        assert!(
            w.client
                .missing(&upload, vec![Digest::of(&blobs[0])])
                .await
                .unwrap()
                .is_empty()
        );
        tokio::time::sleep(Duration::from_millis(1100)).await;

        // 3000 bytes held, 2500 allowed: the least recently used one goes, and only it.
        let c = quorum_store::collect_garbage(&w.config).await.unwrap();
        assert_eq!((c.links, c.blobs), (1, 1));
        let missing = w
            .client
            .missing(&upload, blobs.iter().map(|b| Digest::of(b)).collect())
            .await
            .unwrap();
        assert_eq!(missing, vec![Digest::of(&blobs[1])]);
        assert_eq!(usage_of(&w, "dinah").await.stored_bytes, 2000);
        // Within the budget nothing more goes, however old.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let c = quorum_store::collect_garbage(&w.config).await.unwrap();
        assert_eq!((c.links, c.blobs), (0, 0));
        assert_eq!(w.blobs().await.len(), 2);
        // Without cache mode, they are ordinary expired uploads.
        let mut config = w.config.clone();
        config.gc.cache_bytes = None;
        let c = quorum_store::collect_garbage(&config).await.unwrap();
        assert_eq!((c.links, c.blobs), (2, 2));
        assert!(w.blobs().await.is_empty());
    })
    .await;
    w.stop().await;
}

async fn the_store_collects_garbage_periodically_when_configured(backend: Backend) {
    let w = World::start_with(backend, |c| {
        c.gc.provisional_secs = 0;
        c.gc.interval_secs = Some(1);
    })
    .await;
    bounded(async {
        let kept: &[u8] = b"named";
        publish(&w, DINAH, "b-1", &[("kept", kept)]).await;
        let upload = w.upload_token(DINAH, "b-2", "a-1").await;
        let loose: &[u8] = b"never named";
        w.client
            .put_blob(&upload, &Digest::of(loose), loose.to_vec())
            .await
            .unwrap();
        let started = std::time::Instant::now();
        while w.blobs().await.len() > 1 {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "the store never collected"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert_eq!(w.blobs().await, vec![kept.to_vec()]);
    })
    .await;
    w.stop().await;
}

/// Garbage collection runs in a loop (as `quorum store gc` would, on its own connections) with
/// a short retention, so manifests keep expiring and their blobs keep becoming garbage, while two
/// tenants keep publishing manifests over a small set of shared blobs: every blob is, again and
/// again, deleted by GC while an uploader is between `missing` and its manifest, or re-uploading
/// it. Right after the store accepts a manifest, every blob it names must be readable: a blob may
/// be collected and uploaded again, but never lost from under a live manifest. One uploader
/// sends single blobs, the other batches (packs, in a local directory: the pack goes with its
/// last blob, or as bytes without metadata while its batch is between staging and recording).
async fn gc_racing_uploads_never_loses_a_referenced_blob(backend: Backend) {
    let w = World::start_with(backend, |c| c.gc.provisional_secs = 0).await;
    bounded(async {
        // Each blob comes back every 12 manifests: long enough, at times, for the manifests naming
        // it to expire and GC to delete it, short enough to be needed again soon after.
        let pool: Vec<Vec<u8>> = (0..12u8).map(|i| vec![i; 1000 + i as usize]).collect();
        let stop = CancellationToken::new();
        let gc = {
            let mut config = w.config.clone();
            config.gc.retention_secs = Some(1);
            let stop = stop.clone();
            tokio::spawn(async move {
                let (mut passes, mut collected, mut packs) = (0u32, 0u64, 0u64);
                while !stop.is_cancelled() && passes < 5000 {
                    let c = quorum_store::collect_garbage(&config)
                        .await
                        .unwrap_or_else(|e| panic!("gc: {e:#}"));
                    (collected, packs) = (collected + c.blobs, packs + c.packs);
                    passes += 1;
                }
                (passes, collected, packs)
            })
        };
        let uploader = |who: usize| {
            let (w, pool) = (&w, &pool);
            async move {
                let (mut manifests, mut retries) = (0u32, 0u32);
                let started = std::time::Instant::now();
                // Long enough for manifests to expire and their blobs to be collected many times.
                while started.elapsed() < Duration::from_secs(12) {
                    let i = manifests as usize;
                    let (x, y) = (&pool[(i + who) % 12], &pool[(i + 1 + who) % 12]);
                    let files: Vec<(&str, &[u8])> = vec![("x", x), ("y", y)];
                    let assignment = format!("a-{who}-{i}");
                    let upload = w.upload_token(who, "race", &assignment).await;
                    let read = w.read_token(who, "race").await;
                    let mut attempts = 0;
                    loop {
                        attempts += 1;
                        assert!(attempts <= 20, "manifest {assignment} never went through");
                        let digests: Vec<Digest> =
                            files.iter().map(|(_, b)| Digest::of(b)).collect();
                        let lacking: Vec<&[u8]> = w
                            .client
                            .missing(&upload, digests)
                            .await
                            .unwrap()
                            .iter()
                            .map(|d| files.iter().find(|(_, b)| Digest::of(b) == *d).unwrap().1)
                            .collect();
                        if who == ELIZA && !lacking.is_empty() {
                            w.client.put_blobs(&upload, framed(&lacking)).await.unwrap();
                        }
                        for bytes in lacking.iter().filter(|_| who != ELIZA) {
                            let d = Digest::of(bytes);
                            w.client
                                .put_blob(&upload, &d, bytes.to_vec())
                                .await
                                .unwrap();
                        }
                        match w.client.put_manifest(&upload, &manifest(&files)).await {
                            Ok(_) => break,
                            // GC took a blob between `missing` and the manifest: upload again.
                            Err(e) if e.status() == Some(400) => retries += 1,
                            Err(e) => panic!("{e}"),
                        }
                    }
                    for (_, bytes) in &files {
                        match w.client.get_blob(&read, "race", &Digest::of(bytes)).await {
                            Ok(got) => assert_eq!(&got[..], *bytes),
                            // Retention may already have dropped the manifest (it is gone
                            // then, never half there); anything else is a lost blob.
                            Err(e) if e.status() == Some(404) => {
                                let gone = w
                                    .client
                                    .get_manifest(&read, "race", &manifest(&files).digest())
                                    .await;
                                assert_eq!(
                                    gone.unwrap_err().status(),
                                    Some(404),
                                    "blob gone under a live manifest"
                                );
                            }
                            Err(e) => panic!("a blob of a live manifest is unreadable: {e}"),
                        }
                    }
                    manifests += 1;
                    // Paced, so that a blob's turn comes round after the manifests naming it
                    // expired (retention is a second, counted in whole seconds): a machine
                    // making 12 manifests a second would otherwise keep every blob in use.
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
                (manifests, retries)
            }
        };
        let ((a, ra), (b, rb)) = tokio::join!(uploader(DINAH), uploader(ELIZA));
        stop.cancel();
        let (passes, collected, packs) = gc.await.unwrap();
        assert!(
            a > 5 && b > 5,
            "the uploaders made progress ({a}, {b} manifests)"
        );
        assert!(passes > 10, "GC ran throughout ({passes} passes)");
        assert!(
            collected > 0,
            "GC deleted blobs during the race, so it was a race ({collected} blobs, {} retries)",
            ra + rb
        );
        if w.s3().is_none() {
            assert!(packs > 0, "GC deleted packs during the race");
        }
    })
    .await;
    w.stop().await;
}

/// A full disk in the middle of an upload: the store answers 507, removes the partial file, and
/// goes on serving. The data directory is a 2 MiB tmpfs mounted for the test (needs root, as
/// the test machines and CI run).
#[tokio::test]
async fn a_full_disk_during_an_upload_leaves_nothing_and_the_store_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let mount = |args: &[&str]| {
        #[allow(clippy::disallowed_methods)] // test setup: mounting a small filesystem
        let out = std::process::Command::new(args[0])
            .args(&args[1..])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?} failed (this test needs root to mount a tmpfs): {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let data = dir.path().to_str().unwrap().to_string();
    mount(&["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", &data]);
    struct Unmount(String);
    impl Drop for Unmount {
        fn drop(&mut self) {
            #[allow(clippy::disallowed_methods)] // test teardown
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(data.clone());
    let w = World::start_with(Backend::Local, |c| c.data_dir = dir.path().to_path_buf()).await;
    bounded(async {
        let upload = w.upload_token(DINAH, "b-1", "a-1").await;
        let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 253) as u8).collect();
        let (code, message) = status(
            w.client
                .put_blob(&upload, &Digest::of(&big), big.clone())
                .await,
        );
        assert_eq!(code, 507, "{message}");
        assert!(
            message.contains("storage is full; nothing was stored"),
            "{message}"
        );
        let tmp: Vec<PathBuf> = std::fs::read_dir(dir.path().join("tmp"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert!(tmp.is_empty(), "{tmp:?}");
        assert!(w.unfinished().await.is_empty());
        assert!(w.blobs().await.is_empty());
        // A batch whose pack outgrows the disk: the same, and no pack is left.
        let parts: Vec<Vec<u8>> = (0..3u8).map(|i| vec![i; 900_000]).collect();
        let batch = framed(&parts.iter().map(Vec::as_slice).collect::<Vec<_>>());
        let (code, message) = status(w.client.put_blobs(&upload, batch).await);
        assert_eq!(code, 507, "{message}");
        assert!(
            message.contains("storage is full; nothing was stored"),
            "{message}"
        );
        assert!(w.unfinished().await.is_empty());
        assert!(w.blobs().await.is_empty());
        assert_eq!(w.files("blobs"), Vec::<PathBuf>::new());
        // The space is back, and the store serves on.
        let files: &[(&str, &[u8])] = &[("small", b"fits easily")];
        let read = w.read_token(DINAH, "b-1").await;
        w.client
            .put_blob(&upload, &Digest::of(files[0].1), files[0].1.to_vec())
            .await
            .unwrap();
        w.client
            .put_manifest(&upload, &manifest(files))
            .await
            .unwrap();
        assert_eq!(
            &w.client
                .get_blob(&read, "b-1", &Digest::of(files[0].1))
                .await
                .unwrap()[..],
            files[0].1
        );
    })
    .await;
    w.stop().await;
}

/// In a local directory a batch's blobs share a pack: it goes with the last of its blobs, and a
/// pack mostly dead is rewritten, its live blobs moved to a new pack, so that collecting frees
/// the space and not only the rows. Reads find the moved blobs, and a second collection leaves
/// the new pack as it is.
#[tokio::test]
async fn collection_deletes_dead_packs_and_rewrites_mostly_dead_ones() {
    let w = World::start_with(Backend::Local, |c| c.gc.provisional_secs = 0).await;
    bounded(async {
        let upload = w.upload_token(DINAH, "b-1", "a-1").await;
        let kept: Vec<u8> = (0..1000u32).map(|i| (i % 7) as u8).collect();
        let (dead, also_dead) = (vec![1u8; 30_000], vec![2u8; 30_000]);
        let (gone, also_gone) = (vec![3u8; 5000], vec![4u8; 6000]);
        w.client
            .put_blobs(&upload, framed(&[&kept, &dead, &also_dead]))
            .await
            .unwrap();
        w.client
            .put_blobs(&upload, framed(&[&gone, &also_gone]))
            .await
            .unwrap();
        let packs = w.store_dir.join("blobs").join("packs");
        let listed = || -> Vec<(String, u64)> {
            let mut out: Vec<(String, u64)> = std::fs::read_dir(&packs)
                .unwrap()
                .map(|e| {
                    let e = e.unwrap();
                    let name = e.file_name().into_string().unwrap();
                    (name, e.metadata().unwrap().len())
                })
                .collect();
            out.sort();
            out
        };
        let before = listed();
        assert_eq!(before.len(), 2, "{before:?}");
        w.client
            .put_manifest(&upload, &manifest(&[("kept", &kept)]))
            .await
            .unwrap();

        tokio::time::sleep(Duration::from_millis(1100)).await;
        let c = quorum_store::collect_garbage(&w.config).await.unwrap();
        assert_eq!((c.links, c.blobs, c.packs, c.repacked), (4, 4, 1, 1));
        let after = listed();
        assert_eq!(after.len(), 1, "{after:?}");
        assert!(
            !before.iter().any(|(name, _)| *name == after[0].0),
            "a new pack"
        );
        assert!(
            after[0].1 <= 4096,
            "the new pack holds the live blob alone: {after:?}"
        );
        assert_eq!(w.blobs().await, vec![kept.clone()]);
        let read = w.read_token(DINAH, "b-1").await;
        let got = w.client.get_blob(&read, "b-1", &Digest::of(&kept)).await;
        assert_eq!(&got.unwrap()[..], &kept[..]);
        let got = w.client.get_blob(&read, "b-1", &Digest::of(&dead)).await;
        assert_eq!(got.unwrap_err().status(), Some(404));

        let c = quorum_store::collect_garbage(&w.config).await.unwrap();
        assert_eq!((c.blobs, c.packs, c.repacked), (0, 0, 0));
        assert_eq!(listed(), after);
    })
    .await;
    w.stop().await;
}

/// The body of a batch upload: each blob framed under the digest and size it claims.
fn frames(blobs: &[(Digest, &[u8])]) -> Vec<u8> {
    let mut body = Vec::new();
    for (digest, bytes) in blobs {
        body.extend_from_slice(
            quorum_api::v1::store::batch_frame_header(digest, bytes.len() as u64).as_bytes(),
        );
        body.extend_from_slice(bytes);
    }
    body
}

fn framed(blobs: &[&[u8]]) -> Vec<u8> {
    let claimed: Vec<(Digest, &[u8])> = blobs.iter().map(|b| (Digest::of(b), *b)).collect();
    frames(&claimed)
}

async fn a_batch_stores_many_blobs_in_one_call(backend: Backend) {
    let w = World::start(backend).await;
    bounded(async {
        // Two calls: the batch and the manifest; four files: exactly the batch.
        let t = constrained(
            &w.idp,
            DINAH,
            TOKEN_TYPE_UPLOAD,
            "b-1",
            Some("a-1"),
            &[("max_calls", "2"), ("max_files", "4")],
        )
        .await;
        let files: [(&str, &[u8]); 4] = [
            ("out/a", b"alpha"),
            ("out/b", b"bravo"),
            ("out/c", b"alpha"),
            ("out/empty", b""),
        ];
        let body = framed(&files.iter().map(|(_, b)| *b).collect::<Vec<_>>());
        let stored = w.client.put_blobs(&t, body).await.unwrap();
        assert_eq!((stored.blobs, stored.bytes), (4, 15));
        let mut kept = w.blobs().await;
        kept.sort();
        assert_eq!(kept, vec![Vec::new(), b"alpha".to_vec(), b"bravo".to_vec()]);
        assert!(w.unfinished().await.is_empty());
        assert_eq!(usage_of(&w, "dinah").await.stored_bytes, 10);
        w.client.put_manifest(&t, &manifest(&files)).await.unwrap();
        let (code, message) = status(w.client.missing(&t, vec![Digest::of(b"x")]).await);
        assert_eq!(
            (code, message.contains("max_calls (2)")),
            (403, true),
            "{message}"
        );
        // Another tenant does not see them.
        let eliza = w.upload_token(ELIZA, "b-1", "a-1").await;
        assert_eq!(
            w.client
                .missing(&eliza, vec![Digest::of(b"bravo")])
                .await
                .unwrap(),
            vec![Digest::of(b"bravo")]
        );
        // An empty batch stores nothing and is fine.
        let stored = w.client.put_blobs(&eliza, Vec::new()).await.unwrap();
        assert_eq!((stored.blobs, stored.bytes), (0, 0));
    })
    .await;
    w.stop().await;
}

/// Frames over [`WHOLE_FRAME`] are not held whole: they stream into the backend as a single
/// upload does, between frames that go into the batch's pack, and all of them are kept.
async fn a_batch_carries_frames_too_large_to_hold_whole(backend: Backend) {
    let w = World::start(backend).await;
    bounded(async {
        let t = w.upload_token(DINAH, "b-1", "a-1").await;
        let big: Vec<u8> = (0..WHOLE_FRAME as u32 + 300_000)
            .map(|i| (i % 241) as u8)
            .collect();
        let at_bound = vec![3u8; WHOLE_FRAME as usize];
        let files: [(&str, &[u8]); 4] = [
            ("out/a", b"alpha"),
            ("out/big", &big),
            ("out/bound", &at_bound),
            ("out/b", b"bravo"),
        ];
        let body = framed(&files.iter().map(|(_, b)| *b).collect::<Vec<_>>());
        let total: u64 = files.iter().map(|(_, b)| b.len() as u64).sum();
        let stored = w.client.put_blobs(&t, body).await.unwrap();
        assert_eq!((stored.blobs, stored.bytes), (4, total));
        let mut kept = w.blobs().await;
        kept.sort();
        let mut expected: Vec<Vec<u8>> = files.iter().map(|(_, b)| b.to_vec()).collect();
        expected.sort();
        assert_eq!(kept, expected);
        assert!(w.unfinished().await.is_empty());
        assert_eq!(usage_of(&w, "dinah").await.stored_bytes, total);
        if backend == Backend::Local {
            // The big one in a file of its own, the other three in the batch's pack.
            let files = w.files("blobs");
            let packs = w.store_dir.join("blobs").join("packs");
            let (packed, alone): (Vec<_>, Vec<_>) =
                files.iter().partition(|p| p.starts_with(&packs));
            assert_eq!((packed.len(), alone.len()), (1, 1), "{files:?}");
            assert_eq!(std::fs::read(alone[0]).unwrap(), big);
        }
        w.client.put_manifest(&t, &manifest(&files)).await.unwrap();
        let read = w.read_token(DINAH, "b-1").await;
        for (_, content) in files {
            let got = w
                .client
                .get_blob(&read, "b-1", &Digest::of(content))
                .await
                .unwrap();
            assert_eq!(got.len(), content.len());
            assert!(got[..] == *content);
        }
    })
    .await;
    w.stop().await;
}

async fn a_bad_frame_leaves_nothing_of_its_batch(backend: Backend) {
    let w = World::start_with(backend, |c| c.max_blob_bytes = 1000).await;
    bounded(async {
        let t = w.upload_token(DINAH, "b-1", "a-1").await;
        let (good, other): (&[u8], &[u8]) = (b"good bytes", b"other bytes");
        let claimed = Digest::of(b"what was promised");
        let all = vec![Digest::of(good), Digest::of(other), claimed];
        let assert_nothing = |what: &'static str| {
            let w = &w;
            let t = &t;
            let all = all.clone();
            async move {
                assert!(w.blobs().await.is_empty(), "{what}: {:?}", w.blobs().await);
                assert!(w.unfinished().await.is_empty(), "{what}");
                assert_eq!(
                    w.client.missing(t, all.clone()).await.unwrap(),
                    all,
                    "{what}"
                );
                assert_eq!(usage_of(w, "dinah").await.stored_bytes, 0, "{what}");
            }
        };
        // A frame whose bytes are not what its digest says, between good ones.
        let body = frames(&[
            (Digest::of(good), good),
            (claimed, b"not what was promised"),
            (Digest::of(other), other),
        ]);
        let (code, message) = status(w.client.put_blobs(&t, body).await);
        assert_eq!(code, 400);
        assert!(message.contains("frame 1"), "{message}");
        assert!(message.contains(&claimed.to_string()), "{message}");
        assert!(
            message.contains("nothing of the batch was stored"),
            "{message}"
        );
        assert_nothing("mismatch").await;

        // A body that ends inside a frame.
        let mut body = framed(&[good, other]);
        body.truncate(body.len() - 4);
        let (code, message) = status(w.client.put_blobs(&t, body).await);
        assert_eq!(code, 400);
        assert!(
            message.contains("frame 1") && message.contains("cut short"),
            "{message}"
        );
        assert_nothing("truncated").await;

        // A frame with more bytes than it declared: the rest is no frame header.
        let mut body = framed(&[good]);
        body.extend_from_slice(b" and more");
        body.extend_from_slice(&framed(&[other]));
        let (code, message) = status(w.client.put_blobs(&t, body).await);
        assert_eq!(code, 400);
        assert!(message.contains("frame 1: header"), "{message}");
        assert_nothing("over its declared size").await;

        // A header that ends with the body, and one that is no header at all.
        for body in [b"sha256:00".to_vec(), b"hello world\n".to_vec()] {
            let (code, message) = status(w.client.put_blobs(&t, body).await);
            assert_eq!(code, 400);
            assert!(message.contains("frame 0: header"), "{message}");
        }
        // A frame larger than the store takes is refused before its bytes are read.
        let big = vec![9u8; 1001];
        let (code, message) = status(w.client.put_blobs(&t, framed(&[good, &big])).await);
        assert_eq!(code, 413);
        assert!(
            message.contains("frame 1") && message.contains("1000 bytes"),
            "{message}"
        );
        assert_nothing("too large").await;

        // The same blobs, framed right, are kept.
        w.client
            .put_blobs(&t, framed(&[good, other]))
            .await
            .unwrap();
        assert_eq!(w.blobs().await.len(), 2);
    })
    .await;
    w.stop().await;
}

async fn a_batch_over_a_limit_stores_nothing_of_it(backend: Backend) {
    let w = World::start_with(backend, |c| c.quota.default_bytes = Some(1000)).await;
    bounded(async {
        let (one, two, three): (&[u8], &[u8], &[u8]) = (b"one", b"two", b"three");
        // max_files counts every frame; the third goes over, so none is kept.
        let t = constrained(
            &w.idp,
            DINAH,
            TOKEN_TYPE_UPLOAD,
            "b-1",
            Some("a-1"),
            &[("max_files", "2")],
        )
        .await;
        let (code, message) = status(w.client.put_blobs(&t, framed(&[one, two, three])).await);
        assert_eq!(code, 403);
        assert!(message.contains("max_files (2)"), "{message}");
        assert!(w.blobs().await.is_empty());
        assert!(w.unfinished().await.is_empty());
        w.client.put_blobs(&t, framed(&[one, two])).await.unwrap();
        let (code, _) = status(
            w.client
                .put_blob(&t, &Digest::of(three), three.to_vec())
                .await,
        );
        assert_eq!(code, 403, "the batch's files counted");
        assert_eq!(w.blobs().await.len(), 2);

        // max_bytes counts every frame's bytes.
        let t = constrained(
            &w.idp,
            DINAH,
            TOKEN_TYPE_UPLOAD,
            "b-2",
            Some("a-1"),
            &[("max_bytes", "10")],
        )
        .await;
        let (six, seven): (&[u8], &[u8]) = (b"sixsix", b"sevenby");
        let (code, message) = status(w.client.put_blobs(&t, framed(&[six, seven])).await);
        assert_eq!(code, 413);
        assert!(message.contains("max_bytes (10)"), "{message}");
        assert_eq!(w.blobs().await.len(), 2, "nothing more was stored");
        assert!(w.unfinished().await.is_empty());
        w.client.put_blobs(&t, framed(&[six])).await.unwrap();

        // The tenant's quota takes the whole batch or none of it.
        let t = w.upload_token(DINAH, "b-3", "a-1").await;
        let (a, b) = (vec![1u8; 400], vec![2u8; 600]);
        let (code, message) = status(w.client.put_blobs(&t, framed(&[&a, &b])).await);
        assert_eq!(code, 413);
        assert!(
            message.contains(
                "tenant `dinah` stores 12 bytes; 1000 more would exceed its quota of 1000 bytes"
            ),
            "{message}"
        );
        assert_eq!(w.blobs().await.len(), 3);
        assert!(w.unfinished().await.is_empty());
        assert_eq!(usage_of(&w, "dinah").await.stored_bytes, 12);
        // Blobs the tenant stores already cost nothing more.
        w.client
            .put_blobs(&t, framed(&[&a, one, two]))
            .await
            .unwrap();
        assert_eq!(usage_of(&w, "dinah").await.stored_bytes, 412);
        // A blob's row names the copy placed last: in a local directory `one` and `two` are now
        // read from this batch's pack, and the first batch's pack, left without rows, goes at
        // the next collection.
        let c = quorum_store::collect_garbage(&w.config).await.unwrap();
        assert_eq!(c.packs, u64::from(w.s3().is_none()));
        assert_eq!(w.blobs().await.len(), 4);

        // A revoked token stores nothing.
        let revoker = constrained(&w.idp, DINAH, TOKEN_TYPE_REVOKE, "b-3", None, &[]).await;
        let (code, _) = revoke(&w, &revoker, &[&jti(&t)]).await;
        assert_eq!(code, 200);
        let (code, message) = status(w.client.put_blobs(&t, framed(&[b"late"])).await);
        assert_eq!(code, 401);
        assert!(message.contains("has been revoked"), "{message}");
        assert_eq!(w.blobs().await.len(), 4);
    })
    .await;
    w.stop().await;
}

// ---- Manifests sent first, in full or relative to an earlier one (`POST /api/v1/manifest`) ----

fn full(m: &Manifest) -> ManifestProposal {
    ManifestProposal {
        base: None,
        entries: m.entries.clone(),
        removed: Vec::new(),
    }
}

/// A proposal relative to `base`, its changes taken as given (so tests can send bad ones).
fn relative(base: Digest, changed: &[(&str, &[u8])], removed: &[&str]) -> ManifestProposal {
    ManifestProposal {
        base: Some(base),
        entries: changed
            .iter()
            .map(|(path, bytes)| ManifestEntry {
                path: (*path).into(),
                mode: 0o644,
                size: bytes.len() as u64,
                digest: Digest::of(bytes),
            })
            .collect(),
        removed: removed.iter().map(|p| p.to_string()).collect(),
    }
}

fn missing_of(answer: ManifestAnswer) -> Vec<Digest> {
    match answer {
        ManifestAnswer::Missing { mut digests } => {
            digests.sort();
            digests
        }
        other => panic!("expected the store to ask for blobs, got {other:?}"),
    }
}

fn sorted(digests: &[&[u8]]) -> Vec<Digest> {
    let mut d: Vec<Digest> = digests.iter().map(|b| Digest::of(b)).collect();
    d.sort();
    d
}

async fn a_manifest_sent_first_asks_for_its_blobs_and_a_relative_one_records_the_changes(
    backend: Backend,
) {
    let w = World::start(backend).await;
    bounded(async {
        let (a, b, b2, d): (&[u8], &[u8], &[u8], &[u8]) =
            (b"alpha", b"bravo", b"bravo, rebuilt", b"delta");
        let files: &[(&str, &[u8])] = &[("bin/a", a), ("bin/b", b), ("empty", b"")];
        let m1 = manifest(files);
        let t1 = w.upload_token(DINAH, "b-1", "a-1").await;

        // Manifest first: the store asks for exactly the blobs it lacks (never the empty one)
        // and records nothing yet.
        let answer = w.client.record_manifest(&t1, &full(&m1)).await.unwrap();
        assert_eq!(missing_of(answer), sorted(&[a, b]));
        let read1 = w.read_token(DINAH, "b-1").await;
        assert_eq!(
            status(w.client.get_manifest(&read1, "b-1", &m1.digest()).await).0,
            404
        );
        for blob in [a, b] {
            w.client
                .put_blob(&t1, &Digest::of(blob), blob.to_vec())
                .await
                .unwrap();
        }
        let recorded = ManifestAnswer::Recorded {
            digest: m1.digest(),
        };
        assert_eq!(
            w.client.record_manifest(&t1, &full(&m1)).await.unwrap(),
            recorded
        );
        assert_eq!(
            w.client.record_manifest(&t1, &full(&m1)).await.unwrap(),
            recorded
        );
        assert_eq!(
            w.client
                .get_manifest(&read1, "b-1", &m1.digest())
                .await
                .unwrap(),
            m1
        );

        // In another build, relative to the first: one entry changed, one added, one removed.
        let t2 = w.upload_token(DINAH, "b-2", "a-1").await;
        let change = relative(m1.digest(), &[("bin/b", b2), ("doc/d", d)], &["empty"]);
        let answer = w.client.record_manifest(&t2, &change).await.unwrap();
        assert_eq!(missing_of(answer), sorted(&[b2, d]));
        for blob in [b2, d] {
            w.client
                .put_blob(&t2, &Digest::of(blob), blob.to_vec())
                .await
                .unwrap();
        }
        let m2 = manifest(&[("bin/a", a), ("bin/b", b2), ("doc/d", d)]);
        assert_eq!(
            w.client.record_manifest(&t2, &change).await.unwrap(),
            ManifestAnswer::Recorded {
                digest: m2.digest()
            }
        );
        // The manifest is the whole result, and build b-2 reads exactly its blobs: the
        // unchanged one through the references copied from b-1, not the one it replaced.
        let read2 = w.read_token(DINAH, "b-2").await;
        assert_eq!(
            w.client
                .get_manifest(&read2, "b-2", &m2.digest())
                .await
                .unwrap(),
            m2
        );
        for blob in [a, b2, d] {
            let got = w
                .client
                .get_blob(&read2, "b-2", &Digest::of(blob))
                .await
                .unwrap();
            assert_eq!(&got[..], blob);
        }
        assert_eq!(
            status(w.client.get_blob(&read2, "b-2", &Digest::of(b)).await).0,
            404
        );
        let got = w
            .client
            .get_file(&read2, "b-2", "compile", "bin/a", None)
            .await
            .unwrap();
        assert_eq!(&got[..], a);
        // Build b-1 is untouched.
        assert_eq!(
            status(w.client.get_blob(&read1, "b-1", &Digest::of(d)).await).0,
            404
        );

        // An unchanged tree is one request with no entries, in the same build or another.
        for (build, assignment) in [("b-2", "a-2"), ("b-3", "a-1")] {
            let t = w.upload_token(DINAH, build, assignment).await;
            assert_eq!(
                w.client
                    .record_manifest(&t, &relative(m2.digest(), &[], &[]))
                    .await
                    .unwrap(),
                ManifestAnswer::Recorded {
                    digest: m2.digest()
                }
            );
            let read = w.read_token(DINAH, build).await;
            let got = w
                .client
                .get_blob(&read, build, &Digest::of(d))
                .await
                .unwrap();
            assert_eq!(&got[..], d);
        }
    })
    .await;
    w.stop().await;
}

async fn relative_manifests_reach_no_further_than_the_tenant_and_its_base(backend: Backend) {
    let w = World::start(backend).await;
    bounded(async {
        let secret: &[u8] = b"dinah's build output";
        let m = manifest(&[("out/bin", secret), ("out/lib", b"lib")]);
        let td = w.upload_token(DINAH, "b-1", "a-1").await;
        for blob in [secret, b"lib".as_slice()] {
            w.client
                .put_blob(&td, &Digest::of(blob), blob.to_vec())
                .await
                .unwrap();
        }
        w.client.record_manifest(&td, &full(&m)).await.unwrap();

        // Eliza cannot build on Dinah's manifest: its digest is as unknown to her as a made-up
        // one, with the same answer, and nothing about it is revealed.
        let te = w.upload_token(ELIZA, "b-1", "a-1").await;
        let (code, theirs) = status(
            w.client
                .record_manifest(&te, &relative(m.digest(), &[], &[]))
                .await,
        );
        assert_eq!(code, 404);
        assert!(
            theirs.contains("is not a manifest of this tenant"),
            "{theirs}"
        );
        let made_up = Digest::of(b"no such manifest");
        let (code, unknown) = status(
            w.client
                .record_manifest(&te, &relative(made_up, &[], &[]))
                .await,
        );
        assert_eq!(code, 404);
        assert_eq!(
            theirs.replace(&m.digest().to_string(), "D"),
            unknown.replace(&made_up.to_string(), "D")
        );
        assert!(!theirs.contains("out/"), "{theirs}");
        // Nor claim Dinah's blob in a manifest of her own: she is asked to upload it.
        let answer = w
            .client
            .record_manifest(&te, &full(&manifest(&[("x", secret)])))
            .await
            .unwrap();
        assert_eq!(missing_of(answer), sorted(&[secret]));
        let read = w.read_token(ELIZA, "b-1").await;
        assert_eq!(
            status(w.client.get_blob(&read, "b-1", &Digest::of(secret)).await).0,
            404
        );

        // Changes that are not one safe edit of the base are refused, naming what is wrong,
        // and record nothing.
        let t2 = w.upload_token(DINAH, "b-2", "a-1").await;
        let refusals: &[(ManifestProposal, &str)] = &[
            (
                relative(m.digest(), &[("../escape", b"lib")], &[]),
                "../escape",
            ),
            (
                relative(m.digest(), &[("/etc/passwd", b"lib")], &[]),
                "/etc/passwd",
            ),
            (
                relative(m.digest(), &[("out/./lib", b"lib")], &[]),
                "out/./lib",
            ),
            (
                relative(m.digest(), &[], &["out/nothing"]),
                "`out/nothing`, which the base manifest does not have",
            ),
            (
                relative(m.digest(), &[], &["../out/lib"]),
                "`../out/lib`, which the base manifest does not have",
            ),
            (
                relative(m.digest(), &[("out/lib", b"lib")], &["out/lib"]),
                "`out/lib` is both changed and removed",
            ),
            (
                relative(m.digest(), &[], &["out/lib", "out/bin"]),
                "lists `out/bin` twice or out of order",
            ),
        ];
        for (proposal, says) in refusals {
            let (code, message) = status(w.client.record_manifest(&t2, proposal).await);
            assert_eq!(code, 400, "{message}");
            assert!(message.contains(says), "{says}: {message}");
        }
        // A change may not lie about its blob's size either.
        let mut lying = relative(m.digest(), &[("out/more", b"lib")], &[]);
        lying.entries[0].size = 99;
        let (code, message) = status(w.client.record_manifest(&t2, &lying).await);
        assert_eq!(code, 400);
        assert!(
            message.contains("`out/more` says 99 bytes but its blob has 3"),
            "{message}"
        );
        let read2 = w.read_token(DINAH, "b-2").await;
        assert_eq!(
            status(w.client.get_blob(&read2, "b-2", &Digest::of(secret)).await).0,
            404
        );

        // The assignment can still record its one manifest, and no other after it.
        let ok = relative(m.digest(), &[], &["out/lib"]);
        let done = manifest(&[("out/bin", secret)]);
        assert_eq!(
            w.client.record_manifest(&t2, &ok).await.unwrap(),
            ManifestAnswer::Recorded {
                digest: done.digest()
            }
        );
        let (code, message) = status(
            w.client
                .record_manifest(&t2, &relative(m.digest(), &[], &[]))
                .await,
        );
        assert_eq!(code, 409, "{message}");

        // Every call counts against the token's max_calls, relative or not.
        let limited = constrained(
            &w.idp,
            DINAH,
            TOKEN_TYPE_UPLOAD,
            "b-3",
            Some("a-1"),
            &[("max_calls", "1")],
        )
        .await;
        let bogus = relative(made_up, &[], &[]);
        assert_eq!(
            status(w.client.record_manifest(&limited, &bogus).await).0,
            404
        );
        let (code, message) = status(w.client.record_manifest(&limited, &ok).await);
        assert_eq!(code, 403, "{message}");
        assert!(message.contains("max_calls (1)"), "{message}");
    })
    .await;
    w.stop().await;
}

/// Files `stable-0` .. `stable-{n-1}` of distinct contents, plus `x` with `x`'s content.
fn tree(tag: &str, n: usize, x: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<(String, Vec<u8>)> = (0..n)
        .map(|i| (format!("stable-{i:02}"), format!("{tag} {i}").into_bytes()))
        .collect();
    files.push(("x".into(), x.to_vec()));
    files
}

fn borrowed(files: &[(String, Vec<u8>)]) -> Vec<(&str, &[u8])> {
    files
        .iter()
        .map(|(p, b)| (p.as_str(), b.as_slice()))
        .collect()
}

/// A relative manifest names most of its blobs through its base's references, not its own: the
/// base may expire (retention) while later manifests still refer to it. Its references, and so
/// its blobs, stay exactly as long as a recorded manifest needs them; it no longer counts as a
/// manifest of its own build or as a base, and what the later manifests excluded is not
/// readable through them.
async fn a_relative_manifest_keeps_what_it_names_through_an_expired_base(backend: Backend) {
    let w = World::start_with(backend, |c| c.gc.provisional_secs = 0).await;
    bounded(async {
        // 24 entries: one change (one blob in, one out) stays well under the quarter of the
        // entries past which the store gives a manifest references of its own.
        let root_files = tree("dinah", 23, b"x, first");
        let root = publish(&w, DINAH, "b-1", &borrowed(&root_files)).await;
        // Past the retention of 2 s below for the base only.
        tokio::time::sleep(Duration::from_millis(3100)).await;

        // b-2: `x` changed, relative to the base; b-3: `stable-00` changed and `stable-22`
        // removed, relative to b-2's (so relative to the base through it).
        let (x2, s0): (&[u8], &[u8]) = (b"x, second", b"stable 0, rebuilt");
        let t2 = w.upload_token(DINAH, "b-2", "a-1").await;
        w.client
            .put_blob(&t2, &Digest::of(x2), x2.to_vec())
            .await
            .unwrap();
        let mut files2 = root_files.clone();
        files2.last_mut().unwrap().1 = x2.to_vec();
        let m2 = manifest(&borrowed(&files2));
        assert_eq!(
            w.client
                .record_manifest(&t2, &relative(root, &[("x", x2)], &[]))
                .await
                .unwrap(),
            ManifestAnswer::Recorded {
                digest: m2.digest()
            }
        );
        let t3 = w.upload_token(DINAH, "b-3", "a-1").await;
        w.client
            .put_blob(&t3, &Digest::of(s0), s0.to_vec())
            .await
            .unwrap();
        let mut files3 = files2.clone();
        files3[0].1 = s0.to_vec();
        files3.retain(|(p, _)| p != "stable-22");
        let m3 = manifest(&borrowed(&files3));
        assert_eq!(
            w.client
                .record_manifest(
                    &t3,
                    &relative(m2.digest(), &[("stable-00", s0)], &["stable-22"])
                )
                .await
                .unwrap(),
            ManifestAnswer::Recorded {
                digest: m3.digest()
            }
        );

        let mut config = w.config.clone();
        config.gc.retention_secs = Some(2);
        let c = quorum_store::collect_garbage(&config).await.unwrap();
        assert_eq!((c.manifests, c.blobs), (1, 0), "only the base expired");

        // The base is gone from its build and as a base; its blobs are not.
        let read1 = w.read_token(DINAH, "b-1").await;
        assert_eq!(
            status(w.client.get_manifest(&read1, "b-1", &root).await).0,
            404
        );
        assert_eq!(
            status(
                w.client
                    .get_blob(&read1, "b-1", &Digest::of(&root_files[5].1))
                    .await
            )
            .0,
            404
        );
        let t4 = w.upload_token(DINAH, "b-4", "a-1").await;
        let (code, message) = status(
            w.client
                .record_manifest(&t4, &relative(root, &[], &[]))
                .await,
        );
        assert_eq!(code, 404, "{message}");
        // Each later build reads exactly what its manifest names.
        for (build, files, gone) in [
            ("b-2", &files2, vec![&root_files[23].1]),
            (
                "b-3",
                &files3,
                vec![&root_files[23].1, &root_files[0].1, &root_files[22].1],
            ),
        ] {
            let read = w.read_token(DINAH, build).await;
            for (path, bytes) in files.iter() {
                let got = w
                    .client
                    .get_blob(&read, build, &Digest::of(bytes))
                    .await
                    .unwrap_or_else(|e| panic!("{build}: {path}: {e}"));
                assert_eq!(&got[..], &bytes[..]);
            }
            for bytes in gone {
                assert_eq!(
                    status(w.client.get_blob(&read, build, &Digest::of(bytes)).await).0,
                    404,
                    "{build} reads a blob its manifest does not name"
                );
            }
        }
        // A manifest relative to one that is itself relative to the expired base works too.
        assert_eq!(
            w.client
                .record_manifest(&t4, &relative(m3.digest(), &[], &[]))
                .await
                .unwrap(),
            ManifestAnswer::Recorded {
                digest: m3.digest()
            }
        );
        let read4 = w.read_token(DINAH, "b-4").await;
        let got = w
            .client
            .get_blob(&read4, "b-4", &Digest::of(&files3[7].1))
            .await
            .unwrap();
        assert_eq!(&got[..], &files3[7].1[..]);

        // Once every manifest expired, every blob goes, and the tenant stores nothing.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        config.gc.retention_secs = Some(0);
        let c = quorum_store::collect_garbage(&config).await.unwrap();
        assert_eq!(c.manifests, 3);
        assert_eq!(w.blobs().await, Vec::<Vec<u8>>::new());
        assert_eq!(usage_of(&w, "dinah").await.stored_bytes, 0);
        // Nor is the manifest the store recorded last a base once it expired.
        let t5 = w.upload_token(DINAH, "b-5", "a-1").await;
        let change = relative(m3.digest(), &[("x", b"x, third")], &[]);
        let (code, message) = status(w.client.record_manifest(&t5, &change).await);
        assert_eq!(code, 404, "{message}");
    })
    .await;
    w.stop().await;
}

/// Garbage collection in a loop with a 2 s retention while two tenants record manifests
/// relative to their previous one (one file changed each time): bases keep expiring while
/// manifests that name blobs through them are recorded and read. Right after the store accepts
/// a manifest every blob it names must be readable, whether it is named through a base or not.
async fn gc_racing_relative_manifests_never_loses_a_blob_named_through_a_base(backend: Backend) {
    const ROUNDS: usize = 8;
    // Uploads stay 2 s unreferenced before they are garbage: long enough for a manifest sent
    // in full to have its ten blobs uploaded one by one before it is proposed again.
    let w = World::start_with(backend, |c| c.gc.provisional_secs = 2).await;
    bounded(async {
        let pool: Vec<Vec<u8>> = (0..12u8).map(|i| vec![i; 1000 + i as usize]).collect();
        let stop = CancellationToken::new();
        let gc = {
            let mut config = w.config.clone();
            config.gc.retention_secs = Some(2);
            let stop = stop.clone();
            tokio::spawn(async move {
                let (mut passes, mut manifests) = (0u32, 0u64);
                while !stop.is_cancelled() && passes < 5000 {
                    manifests += quorum_store::collect_garbage(&config)
                        .await
                        .unwrap_or_else(|e| panic!("gc: {e:#}"))
                        .manifests;
                    passes += 1;
                }
                (passes, manifests)
            })
        };
        let uploader = |who: usize| {
            let (w, pool) = (&w, &pool);
            async move {
                // Tokens first (minting is slow in debug builds), so the rounds come quickly.
                let read = w.read_token(who, "race").await;
                let uploads = futures::future::join_all((0..ROUNDS).map(|i| async move {
                    w.upload_token(who, "race", &format!("a-{who}-{i}")).await
                }))
                .await;
                let (mut recorded, mut relative_ones, mut base) = (0u32, 0u32, None);
                for (i, upload) in uploads.iter().enumerate() {
                    // Long enough over the rounds for bases to expire under later manifests.
                    tokio::time::sleep(Duration::from_millis(250)).await;
                    let files = tree(&format!("tenant {who}"), 9, &pool[(i + who) % 12]);
                    let files = borrowed(&files);
                    let m = manifest(&files);
                    let mut proposal = match base {
                        Some(b) => relative(b, &files[9..], &[]),
                        None => full(&m),
                    };
                    let mut attempts = 0;
                    let mut answers = Vec::new();
                    loop {
                        attempts += 1;
                        assert!(
                            attempts <= 20,
                            "manifest {i} of {who} never went through: {answers:?}"
                        );
                        let answer = w.client.record_manifest(upload, &proposal).await;
                        answers.push(format!("{:?} {answer:?}", proposal.base));
                        match answer {
                            Ok(ManifestAnswer::Recorded { digest }) => {
                                assert_eq!(digest, m.digest());
                                relative_ones += u32::from(proposal.base.is_some());
                                break;
                            }
                            Ok(ManifestAnswer::Missing { digests }) => {
                                for d in digests {
                                    let bytes =
                                        files.iter().find(|(_, b)| Digest::of(b) == d).unwrap().1;
                                    w.client.put_blob(upload, &d, bytes.to_vec()).await.unwrap();
                                }
                            }
                            // The base expired meanwhile: send the manifest in full.
                            Err(e) if e.status() == Some(404) && proposal.base.is_some() => {
                                proposal = full(&m);
                            }
                            Err(e) => panic!("{e}"),
                        }
                    }
                    for (path, bytes) in &files {
                        match w.client.get_blob(&read, "race", &Digest::of(bytes)).await {
                            Ok(got) => assert_eq!(&got[..], *bytes),
                            Err(e) if e.status() == Some(404) => {
                                let gone = w.client.get_manifest(&read, "race", &m.digest()).await;
                                assert_eq!(
                                    gone.err().and_then(|e| e.status()),
                                    Some(404),
                                    "the blob of `{path}` is gone under a live manifest"
                                );
                            }
                            Err(e) => panic!("`{path}` of a live manifest is unreadable: {e}"),
                        }
                    }
                    base = Some(m.digest());
                    recorded += 1;
                }
                (recorded, relative_ones)
            }
        };
        let ((a, ra), (b, rb)) = tokio::join!(uploader(DINAH), uploader(ELIZA));
        stop.cancel();
        let (passes, expired) = gc.await.unwrap();
        assert!(a > 5 && b > 5, "the uploaders made progress ({a}, {b})");
        assert!(
            ra > 2 && rb > 2,
            "relative manifests were recorded ({ra}, {rb})"
        );
        assert!(passes > 10, "GC ran throughout ({passes} passes)");
        assert!(expired > 2, "bases expired during the race ({expired})");
    })
    .await;
    w.stop().await;
}

on_every_backend!(
    round_trip_missing_upload_manifest_read,
    digest_mismatch_is_refused_and_leaves_no_file,
    an_abandoned_upload_leaves_no_file,
    blobs_over_the_cap_are_refused,
    tenants_do_not_see_each_others_blobs_or_builds,
    a_read_token_reads_exactly_its_build,
    manifests_must_name_uploaded_blobs_of_the_right_size,
    tokens_of_the_wrong_kind_are_refused,
    tokens_from_an_untrusted_idp_are_refused,
    concurrent_uploads_of_one_blob_all_succeed,
    missing_answers_ten_thousand_digests_and_no_more,
    max_calls_holds_under_racing_requests,
    file_n_plus_one_is_refused,
    an_upload_is_cut_off_at_max_bytes_leaving_nothing,
    a_request_from_outside_the_source_cidrs_is_refused,
    a_revoked_token_is_refused_before_it_expires,
    a_tenants_token_does_not_reach_another_tenants_build_or_a_prefix_build,
    manifest_paths_that_escape_are_refused_and_record_nothing,
    files_by_path_with_range_requests,
    a_controller_makes_a_build_public_with_its_statement,
    usage_counts_bytes_stored_and_transferred_per_tenant,
    quotas_are_enforced_per_tenant_on_upload,
    gc_collects_what_nothing_references_and_keeps_the_rest,
    gc_racing_uploads_never_loses_a_referenced_blob,
    the_store_collects_garbage_periodically_when_configured,
    cache_mode_evicts_least_recently_used_uploads_first,
    a_batch_stores_many_blobs_in_one_call,
    a_batch_carries_frames_too_large_to_hold_whole,
    a_bad_frame_leaves_nothing_of_its_batch,
    a_batch_over_a_limit_stores_nothing_of_it,
    a_manifest_sent_first_asks_for_its_blobs_and_a_relative_one_records_the_changes,
    relative_manifests_reach_no_further_than_the_tenant_and_its_base,
    a_relative_manifest_keeps_what_it_names_through_an_expired_base,
    gc_racing_relative_manifests_never_loses_a_blob_named_through_a_base,
);
