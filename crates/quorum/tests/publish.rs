//! Publishing, end to end: `quorum publish` against a real IdP and store (real processes on
//! loopback, tokens minted by the IdP), and a worker that uploads a job's outputs in the
//! background, observed through a slow store: a proxy that holds every blob upload until the
//! test lets it through (the one test double, an adversary speaking the real protocol).

#![allow(clippy::disallowed_methods)] // tests run the binaries they build

#[allow(dead_code)] // this binary uses a few of the end-to-end suite's helpers
#[path = "e2e/util.rs"]
mod util;

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use quorum::federation::Launcher;
use quorum_api::v1::controller::BuildState;
use quorum_api::v1::idp::{TOKEN_TYPE_READ, TOKEN_TYPE_UPLOAD, TokenConstraints};
use quorum_api::v1::store::WHOLE_FRAME;
use quorum_client::idp::{IdpClient, TokenFor};
use quorum_client::publish::DigestCache;
use quorum_client::store::StoreClient;
use quorum_core::{Digest, Manifest};
use util::{repo_with, stderr, stdout};

const AUDIENCE: &str = "store:publish-test";
const SECRET: &str = "publish-test-secret";
/// A second tenant of the same IdP and store (client id and tenant alike).
const RIVAL: &str = "rival";

/// An IdP and a store, as separate processes.
struct Roles {
    // Field order matters: the processes stop before their directory is removed.
    launcher: Launcher,
    idp: IdpClient,
    idp_url: String,
    store_url: String,
    dir: tempfile::TempDir,
}

impl Roles {
    async fn start() -> Roles {
        let dir = tempfile::tempdir().unwrap();
        let mut launcher = Launcher::new(&util::exe(), dir.path(), "info,sqlx=warn");
        let idp_config = quorum_idp::Config {
            listen: "127.0.0.1:0".into(),
            data_dir: dir.path().join("idp"),
            issuer: None,
            max_token_lifetime_secs: 3600,
            clients: vec![
                quorum_idp::ClientConfig {
                    id: "ci".into(),
                    tenant: "acme".into(),
                    secret_hash: quorum_idp::hash_secret(SECRET),
                },
                quorum_idp::ClientConfig {
                    id: RIVAL.into(),
                    tenant: RIVAL.into(),
                    secret_hash: quorum_idp::hash_secret(SECRET),
                },
            ],
        };
        let idp_url = launcher.server("idp", "idp", &idp_config).await.unwrap();
        // Only the store's required settings: everything else keeps its default.
        let store_config = format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = {:?}\naudience = \"{AUDIENCE}\"\n\
             trusted_issuers = [{{ issuer = \"{idp_url}\" }}]\n",
            dir.path().join("store").to_str().unwrap()
        );
        let store_url = launcher
            .server_text("store", "store", &store_config)
            .await
            .unwrap();
        Roles {
            launcher,
            idp: IdpClient::new(&idp_url, "ci", SECRET),
            idp_url,
            store_url,
            dir,
        }
    }

    async fn token(
        &self,
        token_type: &'static str,
        build: &str,
        assignment: Option<&str>,
        constraints: TokenConstraints,
    ) -> String {
        let access = self.idp.access_token().await.unwrap().access_token;
        let what = TokenFor {
            token_type,
            audience: AUDIENCE.into(),
            build: build.into(),
            job: assignment.map(|_| "publish".to_string()),
            assignment: assignment.map(str::to_string),
            lifetime_secs: 600,
            constraints,
        };
        self.idp
            .exchange(&access, &what)
            .await
            .unwrap()
            .access_token
    }

    async fn upload_token(&self, build: &str, assignment: &str) -> String {
        self.token(
            TOKEN_TYPE_UPLOAD,
            build,
            Some(assignment),
            TokenConstraints::default(),
        )
        .await
    }

    fn store(&self) -> StoreClient {
        StoreClient::new(&self.store_url)
    }

    /// How many of `digests` the store lacks for the tenant (asked with a token of its own).
    async fn lacking(&self, digests: &[Digest]) -> usize {
        let token = self.upload_token("probe", "probe").await;
        let missing = self
            .store()
            .missing(&token, digests.to_vec())
            .await
            .unwrap();
        missing.len()
    }

    /// Runs `quorum publish` in `dir` with this store and a digest cache inside the test.
    fn publish(&self, dir: &Path, token: &str, args: &[&str]) -> Output {
        Command::new(util::exe())
            .arg("publish")
            .args(["--store", &self.store_url, "--token", token])
            .args(args)
            .current_dir(dir)
            .env("XDG_CACHE_HOME", self.dir.path().join("cache"))
            .env("RUST_LOG", "warn")
            .output()
            .unwrap()
    }

    /// Every role's log, for failure messages.
    fn logs(&self) -> String {
        let mut out = String::new();
        for entry in std::fs::read_dir(self.dir.path()).unwrap().flatten() {
            let p = entry.path();
            if p.extension().is_some_and(|e| e == "log") {
                out.push_str(&format!(
                    "--- {} ---\n{}\n",
                    p.display(),
                    quorum::federation::tail(&p)
                ));
            }
        }
        out
    }
}

fn write(root: &Path, rel: &str, contents: &[u8], mode: u32) {
    let path = root.join(rel);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, contents).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Deterministic bytes that differ per `seed`.
fn bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// The summary `--json` prints.
fn summary(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "publish failed:\n{}\n{}",
        stdout(out),
        stderr(out)
    );
    serde_json::from_str(stdout(out).trim()).unwrap()
}

fn failure(out: &Output) -> String {
    assert!(
        !out.status.success(),
        "publish should have failed:\n{}",
        stdout(out)
    );
    stderr(out)
}

#[tokio::test(flavor = "multi_thread")]
async fn publish_sends_what_is_missing_and_republish_sends_only_changes() {
    let roles = Roles::start().await;
    let tree = tempfile::tempdir().unwrap();
    let t = tree.path();
    write(t, "out/bin/tool", &bytes(1, 70_000), 0o755);
    write(t, "out/lib/a.so", &bytes(2, 300_000), 0o644);
    write(t, "out/doc/readme.txt", b"read me\n", 0o644);
    write(t, "out/big.dat", &bytes(3, 2_500_000), 0o644);
    write(t, "out/same-1", &bytes(4, 50_000), 0o644);
    write(t, "out/same-2", &bytes(4, 50_000), 0o644);
    write(t, "src/not-published.c", b"int x;", 0o644);
    let total: u64 = 70_000 + 300_000 + 8 + 2_500_000 + 50_000 + 50_000;
    let args = [
        "--type=release",
        "--strip=1",
        "--json",
        "b1",
        "out/**/*",
        "out/*",
    ];

    let first = roles.upload_token("b1", "a1").await;
    let s = summary(&roles.publish(t, &first, &args));
    assert_eq!(s["files"], 6);
    // The two identical files travel once.
    assert_eq!(s["blobs_sent"], 5);
    assert_eq!(s["bytes_sent"], total - 50_000);
    assert_eq!(s["bytes_skipped"], 50_000);

    // What the store recorded is exactly the tree: names under --type, one component stripped,
    // modes and digests of the local files.
    let manifest_digest: Digest = s["manifest"].as_str().unwrap().parse().unwrap();
    let read = roles
        .token(TOKEN_TYPE_READ, "b1", None, TokenConstraints::default())
        .await;
    let store = roles.store();
    let manifest: Manifest = store
        .get_manifest(&read, "b1", &manifest_digest)
        .await
        .unwrap();
    let names: Vec<&str> = manifest.entries.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(
        names,
        [
            "release/big.dat",
            "release/bin/tool",
            "release/doc/readme.txt",
            "release/lib/a.so",
            "release/same-1",
            "release/same-2",
        ]
    );
    for e in &manifest.entries {
        let local = t.join("out").join(e.path.strip_prefix("release/").unwrap());
        let content = std::fs::read(&local).unwrap();
        assert_eq!(e.digest, Digest::of(&content), "{}", e.path);
        assert_eq!(e.size, content.len() as u64);
        let mode = if e.path.ends_with("tool") {
            0o755
        } else {
            0o644
        };
        assert_eq!(e.mode, mode, "{}", e.path);
    }
    let tool = &manifest.entries[1];
    let blob = store.get_blob(&read, "b1", &tool.digest).await.unwrap();
    assert_eq!(&blob[..], &bytes(1, 70_000)[..]);

    // The digest cache remembers every file, so the next run reads none of them again.
    let cache = DigestCache::load(&roles.dir.path().join("cache/quorum/publish-digests.bin"));
    assert_eq!(cache.len(), 6);

    // Unchanged: nothing is sent, and the same manifest is recorded again.
    let s = summary(&roles.publish(t, &first, &args));
    assert_eq!(s["blobs_sent"], 0);
    assert_eq!(s["bytes_sent"], 0);
    assert_eq!(s["bytes_skipped"], total);
    assert_eq!(s["manifest"].as_str().unwrap(), manifest_digest.to_string());

    // One file changed, same size (the quick check must not be fooled by the size): exactly
    // that file is sent, under a new assignment's token.
    write(t, "out/lib/a.so", &bytes(5, 300_000), 0o644);
    let second = roles.upload_token("b1", "a2").await;
    let s = summary(&roles.publish(t, &second, &args));
    assert_eq!(s["blobs_sent"], 1);
    assert_eq!(s["bytes_sent"], 300_000);
    assert_eq!(s["bytes_skipped"], total - 300_000);
    let changed: Digest = s["manifest"].as_str().unwrap().parse().unwrap();
    let after: Manifest = store.get_manifest(&read, "b1", &changed).await.unwrap();
    assert_eq!(manifest.differing_paths(&after), ["release/lib/a.so"]);

    // Text output for people: files, bytes sent and skipped, time.
    let out = roles.publish(
        t,
        &second,
        &["--type=release", "--strip=1", "b1", "out/**/*"],
    );
    let text = stdout(&out);
    assert!(
        out.status.success() && text.contains("published 6 files") && text.contains("sent 0 blobs"),
        "{text}{}",
        stderr(&out)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_interrupted_publish_is_finished_without_resending_what_arrived() {
    let roles = Roles::start().await;
    let tree = tempfile::tempdir().unwrap();
    let t = tree.path();
    // Over the batch bound each, so each is one upload (smaller files travel in batches, kept
    // whole or not at all: see the end of this test).
    const SIZE: usize = WHOLE_FRAME as usize + 100_000;
    let mut digests = Vec::new();
    for i in 0..12 {
        let content = bytes(100 + i, SIZE);
        digests.push(Digest::of(&content));
        write(t, &format!("dist/f{i:02}"), &content, 0o644);
    }
    // The first run is cut off by its token after 5 uploads, as a run killed half way would be.
    let limited = roles
        .token(
            TOKEN_TYPE_UPLOAD,
            "b1",
            Some("a1"),
            TokenConstraints {
                max_files: Some(5),
                ..Default::default()
            },
        )
        .await;
    let args = ["--type=dist", "--parallel=1", "--json", "b1", "dist/*"];
    let err = failure(&roles.publish(t, &limited, &args));
    assert!(
        err.contains("cannot upload `dist/f") && err.contains("max_files (5)"),
        "{err}\n{}",
        roles.logs()
    );
    assert_eq!(roles.lacking(&digests).await, 7, "5 blobs arrived");

    // Running again finishes the job and sends only the 7 that did not arrive.
    let fresh = roles.upload_token("b1", "a1").await;
    let s = summary(&roles.publish(t, &fresh, &args));
    assert_eq!(s["files"], 12);
    assert_eq!(s["blobs_sent"], 7);
    assert_eq!(s["bytes_sent"], 7 * SIZE);
    assert_eq!(s["bytes_skipped"], 5 * SIZE);
    assert_eq!(roles.lacking(&digests).await, 0);

    // Small files go in one batch, which a token with too few files refuses whole.
    let mut small = Vec::new();
    for i in 0..20 {
        let content = bytes(400 + i, 10_000);
        small.push(Digest::of(&content));
        write(t, &format!("small/f{i:02}"), &content, 0o644);
    }
    let limited = roles
        .token(
            TOKEN_TYPE_UPLOAD,
            "b1",
            Some("a2"),
            TokenConstraints {
                max_files: Some(8),
                ..Default::default()
            },
        )
        .await;
    let args = ["--type=small", "--json", "b1", "small/*"];
    let err = failure(&roles.publish(t, &limited, &args));
    assert!(
        err.contains("cannot upload `small/f00 (in a batch of 20 files)`")
            && err.contains("max_files (8)"),
        "{err}\n{}",
        roles.logs()
    );
    assert_eq!(
        roles.lacking(&small).await,
        20,
        "nothing of the batch was kept"
    );
    let s = summary(&roles.publish(t, &roles.upload_token("b1", "a2").await, &args));
    assert_eq!(
        (s["blobs_sent"].clone(), s["bytes_sent"].clone()),
        (20.into(), (20 * 10_000).into())
    );
    assert_eq!(roles.lacking(&small).await, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_publish_killed_mid_upload_is_finished_by_running_it_again() {
    let roles = Roles::start().await;
    let tree = tempfile::tempdir().unwrap();
    let t = tree.path();
    let mut digests = Vec::new();
    // Over the batch bound each, so each is one upload.
    const SIZE: usize = WHOLE_FRAME as usize + 100_000;
    for i in 0..12 {
        let content = bytes(200 + i, SIZE);
        digests.push(Digest::of(&content));
        write(t, &format!("dist/f{i:02}"), &content, 0o644);
    }
    // Five uploads get through, the sixth hangs, and the process is killed there.
    let (slow, slow_url, _gate) = SlowStore::start(&roles.store_url, 5).await;
    let token = roles.upload_token("b1", "a1").await;
    let mut child = Command::new(util::exe())
        .args(["publish", "--store", &slow_url, "--token", &token])
        .args(["--no-cache", "--parallel=1", "--type=dist", "b1", "dist/*"])
        .current_dir(t)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    eventually(
        "the sixth upload",
        Duration::from_secs(60),
        || roles.logs(),
        async || {
            slow.events()
                .iter()
                .any(|e| e.starts_with("held"))
                .then_some(())
        },
    )
    .await;
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(roles.lacking(&digests).await, 7, "{:?}", slow.events());

    // Run again, straight to the store: the 7 that never arrived are sent, nothing else.
    let s = summary(&roles.publish(t, &token, &["--type=dist", "--json", "b1", "dist/*"]));
    assert_eq!(s["blobs_sent"], 7);
    assert_eq!(s["bytes_sent"], 7 * SIZE);
    assert_eq!(s["bytes_skipped"], 5 * SIZE);
    assert_eq!(roles.lacking(&digests).await, 0);
}

/// A build that rewrites a file and sets its mtime back (as tools clamping mtimes to
/// SOURCE_DATE_EPOCH do) must not fool the digest cache: ctime still moves.
#[tokio::test(flavor = "multi_thread")]
async fn a_file_rewritten_under_its_old_mtime_is_sent_again() {
    let roles = Roles::start().await;
    let tree = tempfile::tempdir().unwrap();
    let t = tree.path();
    write(t, "out/app", &bytes(300, 40_000), 0o755);
    let mtime = std::fs::metadata(t.join("out/app"))
        .unwrap()
        .modified()
        .unwrap();
    let args = ["--type=bin", "--strip=1", "--json", "b1", "out/app"];
    let s = summary(&roles.publish(t, &roles.upload_token("b1", "a1").await, &args));
    assert_eq!(s["blobs_sent"], 1);

    std::thread::sleep(Duration::from_millis(20));
    write(t, "out/app", &bytes(301, 40_000), 0o755);
    std::fs::File::options()
        .write(true)
        .open(t.join("out/app"))
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    let s = summary(&roles.publish(t, &roles.upload_token("b1", "a2").await, &args));
    assert_eq!(s["blobs_sent"], 1, "same size and mtime, new content: {s}");
    assert_eq!(roles.lacking(&[Digest::of(&bytes(301, 40_000))]).await, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_is_refused_naming_what_is_wrong_and_nothing_is_sent() {
    let roles = Roles::start().await;
    let tree = tempfile::tempdir().unwrap();
    let t = tree.path();
    std::fs::set_permissions(t, std::fs::Permissions::from_mode(0o755)).unwrap();
    let ok = bytes(7, 1000);
    write(t, "out/ok", &ok, 0o644);
    let token = roles.upload_token("b1", "a1").await;

    let err = failure(&roles.publish(t, &token, &["--type=x", "b1", "out/[a"]));
    assert!(err.contains("pattern `out/[a` is not allowed"), "{err}");
    let err = failure(&roles.publish(t, &token, &["--type=x", "b1", "out/ok", "dist/*"]));
    assert!(err.contains("pattern `dist/*` matched no files"), "{err}");
    let err = failure(&roles.publish(t, &token, &["--type=x", "b1", "../etc/*"]));
    assert!(err.contains("must not contain `..`"), "{err}");
    let err = failure(&roles.publish(t, &token, &["--type=x", "--strip=2", "b1", "out/ok"]));
    assert!(
        err.contains("`out/ok` has 2 path components, so --strip=2 would leave nothing"),
        "{err}"
    );
    write(t, "more/ok", b"another", 0o644);
    let err = failure(&roles.publish(t, &token, &["--type=x", "--strip=1", "b1", "*/ok"]));
    assert!(
        err.contains("`more/ok` and `out/ok` would both be published as `x/ok`"),
        "{err}"
    );
    let err = failure(&roles.publish(t, &token, &["--type=a/b", "b1", "out/ok"]));
    assert!(
        err.contains("--type `a/b` must be one plain directory name"),
        "{err}"
    );
    let err = failure(&roles.publish(t, &token, &["--type=x", "b2", "out/ok"]));
    assert!(err.contains("--token is for build `b1`, not `b2`"), "{err}");

    // An unreadable file fails the run before anything is sent, naming the file and why. Root
    // reads anything, so the command then runs as nobody.
    write(t, "out/secret", b"s3cret", 0o000);
    let mut cmd = if running_as_root() {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(util::exe());
        c
    } else {
        Command::new(util::exe())
    };
    let out = cmd
        .args(["publish", "--store", &roles.store_url, "--token", &token])
        .args(["--no-cache", "--type=x", "b1", "out/*"])
        .current_dir(t)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let err = failure(&out);
    assert!(
        err.contains("cannot read `out/secret`") && err.contains("Permission denied"),
        "{err}"
    );
    assert_eq!(
        roles.lacking(&[Digest::of(&ok)]).await,
        1,
        "no run above sent anything"
    );
}

/// The manifest goes first, relative to the last one this store accepted from the same digest
/// cache; a base the store does not know for the token's tenant (here: another tenant's) is
/// refused alike, and the publisher falls back to the full manifest and uploads everything that
/// tenant lacks, so sharing a cache (or knowing a digest) grants nothing.
#[tokio::test(flavor = "multi_thread")]
async fn republishing_sends_the_changes_and_another_tenants_base_falls_back_to_the_full_manifest() {
    let roles = Roles::start().await;
    let tree = tempfile::tempdir().unwrap();
    let t = tree.path();
    for i in 0..40u64 {
        write(t, &format!("out/f{i:02}"), &bytes(700 + i, 3_000), 0o644);
    }
    let sources = quorum_client::publish::select(t, &["out/*".to_string()], 1, "dist").unwrap();
    let cache = Arc::new(Mutex::new(DigestCache::in_memory()));
    let publisher = |token: &str| {
        quorum_client::publish::Publisher::new(roles.store(), token).cache(cache.clone())
    };

    let first = publisher(&roles.upload_token("b1", "a1").await)
        .publish(&sources)
        .await
        .unwrap();
    assert_eq!((first.files, first.sent.blobs), (40, 40));

    // One file changed: only its blob travels, and the store records the whole tree.
    write(t, "out/f07", &bytes(9_999, 3_000), 0o644);
    let second = publisher(&roles.upload_token("b2", "a1").await)
        .publish(&sources)
        .await
        .unwrap();
    assert_eq!((second.sent.blobs, second.sent.bytes_sent), (1, 3_000));
    let read = roles
        .token(TOKEN_TYPE_READ, "b2", None, TokenConstraints::default())
        .await;
    let recorded = roles
        .store()
        .get_manifest(&read, "b2", &second.manifest)
        .await
        .unwrap();
    assert_eq!(recorded.entries.len(), 40);
    assert_eq!(recorded.digest(), second.manifest);
    let unchanged = roles
        .store()
        .get_file(&read, "b2", "publish", "dist/f00", None)
        .await
        .unwrap();
    assert_eq!(&unchanged[..], &bytes(700, 3_000)[..]);

    // The rival tenant's token, with a cache whose base is acme's manifest: refused as
    // unknown, sent in full, and every blob uploaded again for the rival.
    let access = IdpClient::new(&roles.idp_url, RIVAL, SECRET)
        .access_token()
        .await
        .unwrap()
        .access_token;
    let rival = IdpClient::new(&roles.idp_url, RIVAL, SECRET)
        .exchange(
            &access,
            &TokenFor {
                token_type: TOKEN_TYPE_UPLOAD,
                audience: AUDIENCE.into(),
                build: "b2".into(),
                job: Some("publish".into()),
                assignment: Some("a1".into()),
                lifetime_secs: 600,
                constraints: TokenConstraints::default(),
            },
        )
        .await
        .unwrap()
        .access_token;
    let theirs = publisher(&rival).publish(&sources).await.unwrap();
    assert_eq!(theirs.manifest, second.manifest);
    assert_eq!(theirs.sent.blobs, 40, "{theirs:?}");

    // Unchanged, for acme again: nothing travels but the manifest's base.
    let again = publisher(&roles.upload_token("b3", "a1").await)
        .publish(&sources)
        .await
        .unwrap();
    assert_eq!((again.manifest, again.sent.blobs), (second.manifest, 0));
}

/// Round trips, counted by the store against the token's `max_calls`: a first upload sends its
/// large files beside its batch (one `missing` for all of them, one `PUT` each), so the first
/// proposal of the manifest records it; one changed small file then costs three calls: its
/// `missing`, its batch and the relative manifest, which is not asked about again.
#[tokio::test(flavor = "multi_thread")]
async fn a_publish_takes_no_more_round_trips_than_its_blobs_need() {
    let roles = Roles::start().await;
    let tree = tempfile::tempdir().unwrap();
    let t = tree.path();
    write(t, "out/large-1", &bytes(60, 1_500_000), 0o644);
    write(t, "out/large-2", &bytes(61, 1_600_000), 0o644);
    for i in 0..3u64 {
        write(t, &format!("out/small-{i}"), &bytes(70 + i, 20_000), 0o644);
    }
    let sources = quorum_client::publish::select(t, &["out/*".to_string()], 1, "dist").unwrap();
    let cache = Arc::new(Mutex::new(DigestCache::in_memory()));
    let limited = async |build: &str, calls: u64| {
        let token = roles
            .token(
                TOKEN_TYPE_UPLOAD,
                build,
                Some("a1"),
                TokenConstraints {
                    max_calls: Some(calls),
                    ..TokenConstraints::default()
                },
            )
            .await;
        quorum_client::publish::Publisher::new(roles.store(), &token).cache(cache.clone())
    };

    // missing (large files), 2 PUTs, missing (the batch), the batch, the manifest.
    let first = limited("b1", 6)
        .await
        .publish(&sources)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", roles.logs()));
    assert_eq!((first.files, first.sent.blobs), (5, 5));

    write(t, "out/small-1", &bytes(80, 20_000), 0o644);
    let second = limited("b2", 3)
        .await
        .publish(&sources)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", roles.logs()));
    assert_eq!((second.sent.blobs, second.sent.bytes_sent), (1, 20_000));
    let read = roles
        .token(TOKEN_TYPE_READ, "b2", None, TokenConstraints::default())
        .await;
    let recorded = roles
        .store()
        .get_file(&read, "b2", "publish", "dist/small-1", None)
        .await
        .unwrap();
    assert_eq!(&recorded[..], &bytes(80, 20_000)[..]);
}

/// A first upload reads each small file once, hashing it and sending it from the same buffer,
/// batch by batch: a blob two batches carry (identical files far apart in the tree) still
/// travels once, and every digest lands in the cache for the next run.
#[tokio::test(flavor = "multi_thread")]
async fn a_first_upload_hashes_while_sending_and_sends_a_blob_shared_by_two_batches_once() {
    let roles = Roles::start().await;
    let tree = tempfile::tempdir().unwrap();
    let t = tree.path();
    // 40 files of 900 KB: three batches of about 16 MiB, with f{i} and f{i+20} identical, so
    // each pair is split across batches sent in parallel.
    const SIZE: usize = 900_000;
    let mut digests = Vec::new();
    for i in 0..40 {
        let content = bytes(500 + i % 20, SIZE);
        digests.push(Digest::of(&content));
        write(t, &format!("dist/f{i:02}"), &content, 0o644);
    }
    let args = ["--type=dist", "--json", "b1", "dist/*"];
    let s = summary(&roles.publish(t, &roles.upload_token("b1", "a1").await, &args));
    assert_eq!(s["files"], 40);
    assert_eq!(s["blobs_sent"], 20, "{s}");
    assert_eq!(s["bytes_sent"], 20 * SIZE);
    assert_eq!(s["bytes_skipped"], 20 * SIZE);
    assert_eq!(roles.lacking(&digests).await, 0);
    let cache = DigestCache::load(&roles.dir.path().join("cache/quorum/publish-digests.bin"));
    assert_eq!(cache.len(), 40);

    let s = summary(&roles.publish(t, &roles.upload_token("b1", "a2").await, &args));
    assert_eq!(
        (s["blobs_sent"].clone(), s["bytes_sent"].clone()),
        (0.into(), 0.into())
    );
}

/// The walk's metadata is only a quick check: a file swapped for a symlink to a secret after
/// the walk (small, so hashed while sending, or large, so hashed first) is refused when it is
/// opened, naming it, and the secret's bytes never reach the store.
#[tokio::test(flavor = "multi_thread")]
async fn a_file_swapped_for_a_symlink_after_the_walk_is_refused_and_nothing_leaks() {
    let roles = Roles::start().await;
    let tree = tempfile::tempdir().unwrap();
    let t = tree.path();
    // Large: over the batch bound.
    let large = WHOLE_FRAME as usize + 100_000;
    let secret = bytes(600, large);
    write(t, "secret", &secret, 0o600);
    let leaked = [Digest::of(&secret), Digest::of(&secret[..10_000])];
    std::fs::write(t.join("small-secret"), &secret[..10_000]).unwrap();
    for (file, size, target) in [
        ("out/small", 10_000, "small-secret"),
        ("out/large", large, "secret"),
    ] {
        write(t, "out/other", &bytes(601, 5_000), 0o644);
        write(t, file, &bytes(602, size), 0o644);
        let sources = quorum_client::publish::select(t, &["out/*".to_string()], 1, "dist").unwrap();
        std::fs::remove_file(t.join(file)).unwrap();
        std::os::unix::fs::symlink(t.join(target), t.join(file)).unwrap();
        let err = quorum_client::publish::Publisher::new(
            roles.store(),
            &roles.upload_token("b1", "a1").await,
        )
        .publish(&sources)
        .await
        .unwrap_err();
        assert!(
            matches!(&err, quorum_client::publish::PublishError::Symlink(p) if p.ends_with(file)),
            "{file}: {err}"
        );
        std::fs::remove_file(t.join(file)).unwrap();
    }
    assert_eq!(roles.lacking(&leaked).await, 2);
}

fn running_as_root() -> bool {
    // /proc/self belongs to the process's effective user.
    std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false)
}

/// What the slow store saw, in order.
#[derive(Default)]
struct Seen {
    events: Vec<(Instant, String)>,
}

/// A store that lets the first `free` blob uploads (single or batch) through and holds the rest until `gate`
/// opens, in front of the real one.
struct SlowStore {
    upstream: String,
    http: reqwest::Client,
    free: std::sync::atomic::AtomicUsize,
    open: tokio::sync::watch::Receiver<bool>,
    seen: Mutex<Seen>,
}

impl SlowStore {
    /// Starts it on loopback; returns it, its URL and the gate.
    async fn start(
        upstream: &str,
        free: usize,
    ) -> (Arc<SlowStore>, String, tokio::sync::watch::Sender<bool>) {
        let (gate, open) = tokio::sync::watch::channel(false);
        let slow = Arc::new(SlowStore {
            upstream: upstream.to_string(),
            http: reqwest::Client::new(),
            free: free.into(),
            open,
            seen: Mutex::new(Seen::default()),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let app = axum::Router::new()
            .fallback(slow_forward)
            .with_state(slow.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        (slow, url, gate)
    }

    fn note(&self, what: String) {
        self.seen
            .lock()
            .unwrap()
            .events
            .push((Instant::now(), what));
    }

    fn events(&self) -> Vec<String> {
        let seen = self.seen.lock().unwrap();
        seen.events.iter().map(|(_, e)| e.clone()).collect()
    }
}

/// Forwards every request to the real store, holding blob uploads until the gate opens.
async fn slow_forward(
    axum::extract::State(p): axum::extract::State<Arc<SlowStore>>,
    req: axum::extract::Request,
) -> axum::response::Response {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let headers = req.headers().clone();
    let body = axum::body::to_bytes(req.into_body(), usize::MAX)
        .await
        .unwrap();
    // One blob (`PUT /api/v1/blobs/{digest}`) or a batch (`POST /api/v1/blobs`).
    let blob = (method == reqwest::Method::PUT || method == reqwest::Method::POST)
        && path.starts_with("/api/v1/blobs");
    let held = blob
        && p.free
            .fetch_update(
                std::sync::atomic::Ordering::SeqCst,
                std::sync::atomic::Ordering::SeqCst,
                |n| n.checked_sub(1),
            )
            .is_err();
    if held {
        p.note(format!("held {path}"));
        let mut open = p.open.clone();
        let _ = open.wait_for(|o| *o).await;
    }
    let mut fwd = p.http.request(method, format!("{}{path}", p.upstream));
    for name in [
        reqwest::header::AUTHORIZATION,
        reqwest::header::CONTENT_TYPE,
    ] {
        if let Some(v) = headers.get(&name) {
            fwd = fwd.header(name, v);
        }
    }
    let resp = fwd.body(body).send().await.unwrap();
    let status = resp.status();
    let bytes = resp.bytes().await.unwrap();
    p.note(format!(
        "{} {path} {}",
        if blob { "stored" } else { "passed" },
        status.as_u16()
    ));
    axum::response::Response::builder()
        .status(status.as_u16())
        .header("content-type", "application/json")
        .body(axum::body::Body::from(bytes))
        .unwrap()
}

/// Waits (bounded) until `pred` holds.
async fn eventually<T>(
    what: &str,
    limit: Duration,
    context: impl Fn() -> String,
    mut pred: impl AsyncFnMut() -> Option<T>,
) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = pred().await {
            return v;
        }
        assert!(
            start.elapsed() < limit,
            "{what} did not happen in {limit:?}\n{}",
            context()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_uploads_while_later_steps_run_and_reports_only_after_its_uploads() {
    let mut roles = Roles::start().await;
    let dir = roles.dir.path().to_path_buf();

    // The slow store in front of the real one.
    let (slow, slow_url, gate) = SlowStore::start(&roles.store_url, 0).await;

    let controller_config = format!(
        "listen = \"127.0.0.1:0\"\ndata_dir = {:?}\napi_token = \"api-token\"\nlease_secs = {}\n\
         [idp]\nurl = \"{}\"\nclient_id = \"ci\"\nclient_secret = \"{SECRET}\"\n\
         [store]\nurl = \"{slow_url}\"\naudience = \"{AUDIENCE}\"\n",
        dir.join("controller").to_str().unwrap(),
        util::LEASE_SECS,
        roles.idp_url,
    );
    let controller = roles
        .launcher
        .server_text("controller", "controller", &controller_config)
        .await
        .unwrap();
    let enrollment = quorum_controller::create_enrollment(
        &dir.join("controller"),
        None,
        "owner",
        true,
        &BTreeMap::new(),
    )
    .await
    .unwrap();
    let worker_config: quorum_worker::Config = toml::from_str(&format!(
        "name = \"w1\"\ndata_dir = {:?}\nallow_local_repositories = true\nsandbox = \"process\"\n\
         allow_weaker_sandbox = true\n\
         controllers = [{{ url = \"{controller}\", enrollment_token = \"{enrollment}\" }}]\n\
         trusted_issuers = [{{ issuer = \"{}\" }}]\n",
        dir.join("w1").to_str().unwrap(),
        roles.idp_url
    ))
    .unwrap();
    roles.launcher.worker("w1", &worker_config).unwrap();

    let repo = repo_with(&[(
        ".quorum.yml",
        "policy: {quorum: 1}\njobs:\n  build:\n    script:\n      - mkdir -p out && seq 1 100000 > out/first\n      \
         - echo second > out/second\n      - echo step-three-ran\n    artifacts: [out/*]\n",
    )]);
    let user = quorum_client::user::UserClient::new(&controller, "api-token");
    let build = user
        .submit(repo.path().to_str().unwrap(), "HEAD")
        .await
        .unwrap()
        .build_id;
    let limit = Duration::from_secs(120);
    let context = || format!("slow store saw {:?}\n{}", slow.events(), roles.logs());

    // Step 1's output goes up while the job goes on: the store holds that upload...
    eventually("a background upload", limit, context, async || {
        slow.events()
            .iter()
            .any(|e| e.starts_with("held"))
            .then_some(())
    })
    .await;
    // ...and the later steps run all the same.
    let assignment = user.status(&build).await.unwrap().jobs[0].assignments[0]
        .id
        .clone();
    eventually("the third step", limit, context, async || {
        let (log, _) = user.log(&assignment, 0).await.ok()?;
        String::from_utf8_lossy(&log)
            .contains("step-three-ran")
            .then_some(())
    })
    .await;
    assert!(
        slow.events().iter().all(|e| !e.starts_with("stored")),
        "no upload got through yet: {:?}",
        slow.events()
    );

    // The result waits for the uploads: nothing is reported while they are held.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let status = user.status(&build).await.unwrap();
    assert!(
        status.jobs[0]
            .assignments
            .iter()
            .all(|a| a.state != "reported"),
        "reported before its uploads arrived: {status:#?}"
    );

    gate.send(true).unwrap();
    let status = eventually("the verdict", limit, context, async || {
        let s = user.status(&build).await.ok()?;
        s.state.is_final().then_some(s)
    })
    .await;
    assert_eq!(
        status.state,
        BuildState::Verified,
        "{status:#?}\n{}",
        roles.logs()
    );

    // Every blob was stored before the manifest was recorded, and both outputs are in it.
    let events = slow.events();
    let manifest_at = events
        .iter()
        .position(|e| e.starts_with("passed /api/v1/manifest 200"))
        .unwrap_or_else(|| panic!("no manifest recorded: {events:?}"));
    let stored: BTreeSet<usize> = events
        .iter()
        .enumerate()
        .filter(|(_, e)| e.starts_with("stored"))
        .map(|(i, _)| i)
        .collect();
    assert!(
        !stored.is_empty() && stored.iter().all(|i| *i < manifest_at),
        "{events:?}"
    );
    let digest = status.jobs[0].manifest.unwrap();
    let read = roles
        .token(TOKEN_TYPE_READ, &build, None, TokenConstraints::default())
        .await;
    let manifest = roles
        .store()
        .get_manifest(&read, &build, &digest)
        .await
        .unwrap();
    let names: Vec<PathBuf> = manifest
        .entries
        .iter()
        .map(|e| PathBuf::from(&e.path))
        .collect();
    assert_eq!(
        names,
        [PathBuf::from("out/first"), PathBuf::from("out/second")]
    );
}
