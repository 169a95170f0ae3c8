//! The artifact store through its real HTTP boundary: a real IdP and a real store on
//! 127.0.0.1:0, tokens from `IdpClient`, uploads and downloads with `StoreClient`. The later
//! tests cover the adversarial table's network cases: constraints, revocation, and tokens forged
//! by issuers the store trusts.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use quorum_api::v1::idp::{
    GRANT_TOKEN_EXCHANGE, TOKEN_TYPE_ACCESS, TOKEN_TYPE_JOB, TOKEN_TYPE_READ, TOKEN_TYPE_REVOKE,
    TOKEN_TYPE_UPLOAD,
};
use quorum_client::ClientError;
use quorum_client::idp::{IdpClient, TokenFor};
use quorum_client::store::StoreClient;
use quorum_client::trust::TrustedIssuer;
use quorum_core::{Digest, Manifest, ManifestEntry};
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

async fn start_store(data_dir: &Path, trusted: &str, max_blob_bytes: u64) -> Server {
    start_store_trusting(
        data_dir,
        vec![TrustedIssuer {
            issuer: trusted.into(),
            tenants: None,
        }],
        max_blob_bytes,
    )
    .await
}

async fn start_store_trusting(
    data_dir: &Path,
    trusted_issuers: Vec<TrustedIssuer>,
    max_blob_bytes: u64,
) -> Server {
    let (listener, url) = bind().await;
    let config = quorum_store::Config {
        listen: "127.0.0.1:0".into(),
        data_dir: data_dir.to_path_buf(),
        audience: AUDIENCE.into(),
        trusted_issuers,
        max_blob_bytes,
    };
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(quorum_store::run(listener, config, shutdown.clone()));
    Server {
        url,
        shutdown,
        task,
    }
}

/// An IdP, a store that trusts it, and their directories.
struct World {
    idp: Server,
    store: Server,
    client: StoreClient,
    store_dir: PathBuf,
    _dirs: (tempfile::TempDir, tempfile::TempDir),
}

impl World {
    async fn start() -> World {
        World::start_with(4 << 30).await
    }

    async fn start_with(max_blob_bytes: u64) -> World {
        let idp_dir = tempfile::tempdir().unwrap();
        let store_dir = tempfile::tempdir().unwrap();
        let idp = start_idp(idp_dir.path()).await;
        let store = start_store(store_dir.path(), &idp.url, max_blob_bytes).await;
        let client = StoreClient::new(&store.url);
        World {
            client,
            store_dir: store_dir.path().to_path_buf(),
            idp,
            store,
            _dirs: (idp_dir, store_dir),
        }
    }

    async fn stop(self) {
        self.store.stop().await;
        self.idp.stop().await;
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

    /// Files under `data_dir/<sub>`, recursively.
    fn files(&self, sub: &str) -> Vec<PathBuf> {
        fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
            for entry in std::fs::read_dir(dir).unwrap() {
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

#[tokio::test]
async fn round_trip_missing_upload_manifest_read() {
    let w = World::start().await;
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
        let hex = digests[1].hex();
        let on_disk = w.store_dir.join("blobs").join(&hex[..2]).join(&hex);
        assert_eq!(std::fs::read(on_disk).unwrap(), big);
        assert!(w.files("tmp").is_empty());

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

    // Everything survives a restart of the store on the same directory.
    let World {
        idp,
        store,
        store_dir,
        _dirs,
        ..
    } = w;
    store.stop().await;
    let store = start_store(&store_dir, &idp.url, 4 << 30).await;
    let client = StoreClient::new(&store.url);
    let w = World {
        idp,
        store,
        client,
        store_dir,
        _dirs,
    };
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

#[tokio::test]
async fn digest_mismatch_is_refused_and_leaves_no_file() {
    let w = World::start().await;
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
        assert!(w.files("blobs").is_empty(), "{:?}", w.files("blobs"));
        assert!(w.files("tmp").is_empty(), "{:?}", w.files("tmp"));
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

#[tokio::test]
async fn an_abandoned_upload_leaves_no_file() {
    let w = World::start().await;
    bounded(async {
        let upload = w.upload_token(DINAH, "b-1", "a-1").await;
        let digest = Digest::of(&[7u8; 100_000]);
        let addr = w.store.url.trim_start_matches("http://").to_string();
        let mut conn = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let head = format!(
            "PUT /api/v1/blobs/{digest} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {upload}\r\nContent-Length: 100000\r\n\r\n"
        );
        conn.write_all(head.as_bytes()).await.unwrap();
        conn.write_all(&[7u8; 40_000]).await.unwrap();
        conn.flush().await.unwrap();
        // The partial upload is on disk while the connection is open...
        while w.files("tmp").is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        drop(conn);
        // ...and gone once the client goes away.
        while !w.files("tmp").is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(w.files("blobs").is_empty());
        assert_eq!(w.client.missing(&upload, vec![digest]).await.unwrap(), vec![digest]);
    })
    .await;
    w.stop().await;
}

#[tokio::test]
async fn blobs_over_the_cap_are_refused() {
    let w = World::start_with(1000).await;
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
        assert_eq!(w.files("blobs").len(), 1);
        assert!(w.files("tmp").is_empty());
    })
    .await;
    w.stop().await;
}

#[tokio::test]
async fn tenants_do_not_see_each_others_blobs_or_builds() {
    let w = World::start().await;
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

#[tokio::test]
async fn a_read_token_reads_exactly_its_build() {
    let w = World::start().await;
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

#[tokio::test]
async fn manifests_must_name_uploaded_blobs_of_the_right_size() {
    let w = World::start().await;
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

#[tokio::test]
async fn tokens_of_the_wrong_kind_are_refused() {
    let w = World::start().await;
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
        assert!(w.files("blobs").is_empty());
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

#[tokio::test]
async fn tokens_from_an_untrusted_idp_are_refused() {
    let w = World::start().await;
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
        assert!(w.files("blobs").is_empty());
    })
    .await;
    rogue.stop().await;
    w.stop().await;
}

#[tokio::test]
async fn concurrent_uploads_of_one_blob_all_succeed() {
    let w = World::start().await;
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
        assert_eq!(w.files("blobs").len(), 1);
        assert!(w.files("tmp").is_empty());
        assert_eq!(std::fs::read(&w.files("blobs")[0]).unwrap(), blob);
        assert!(w.client.missing(&t1, vec![d]).await.unwrap().is_empty());
        assert!(w.client.missing(&t3, vec![d]).await.unwrap().is_empty());
    })
    .await;
    w.stop().await;
}

#[tokio::test]
async fn missing_answers_ten_thousand_digests_and_no_more() {
    let w = World::start().await;
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

#[tokio::test]
async fn max_calls_holds_under_racing_requests() {
    let w = World::start().await;
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
        assert!(w.files("blobs").is_empty());
    })
    .await;
    w.stop().await;
}

#[tokio::test]
async fn file_n_plus_one_is_refused() {
    let w = World::start().await;
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
        assert_eq!(w.files("blobs").len(), 2, "the third file was not stored");
        assert_eq!(
            w.client.missing(&t, vec![Digest::of(three)]).await.unwrap(),
            vec![Digest::of(three)]
        );
    })
    .await;
    w.stop().await;
}

#[tokio::test]
async fn an_upload_is_cut_off_at_max_bytes_leaving_nothing() {
    let w = World::start().await;
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
        assert_eq!(w.files("blobs").len(), 1, "only the first blob is stored");
        assert!(w.files("tmp").is_empty(), "the cut-off upload left nothing");
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
        assert_eq!(w.files("blobs").len(), 2);
    })
    .await;
    w.stop().await;
}

#[tokio::test]
async fn a_request_from_outside_the_source_cidrs_is_refused() {
    let w = World::start().await;
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
        assert!(w.files("blobs").is_empty());
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

#[tokio::test]
async fn a_revoked_token_is_refused_before_it_expires() {
    let w = World::start().await;
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
        assert!(w.files("blobs").is_empty());
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

        // Unknown kids: refused, and the JWKS is fetched at most once per throttle window no
        // matter how many unknown kids arrive.
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
            1,
            "unknown kids within the throttle window cause no refetch"
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

#[tokio::test]
async fn a_tenants_token_does_not_reach_another_tenants_build_or_a_prefix_build() {
    let w = World::start().await;
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

#[tokio::test]
async fn manifest_paths_that_escape_are_refused_and_record_nothing() {
    let w = World::start().await;
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
