//! The key commands as an operator and a consumer run them: `quorum idp key rotate|list`,
//! `quorum idp client enable`, `quorum controller signer rotate|list|revoke`, and
//! `quorum verify` with a signer's published key set (statements signed before a rotation keep
//! verifying; a key set whose ids do not match its keys is refused by name).

#![allow(clippy::disallowed_methods)] // tests run the binary they build

use std::path::Path;
use std::process::{Command, Output};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use ed25519_dalek::{Signer as _, SigningKey};
use quorum_api::v1::controller::SignerKeys;
use quorum_core::{Digest, attest};

fn quorum(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_quorum"))
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn ok(o: Output) -> String {
    assert!(o.status.success(), "{}\n{}", stdout(&o), stderr(&o));
    stdout(&o)
}

fn idp_config(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("idp.toml");
    let data = dir.join("idp");
    std::fs::write(
        &path,
        format!(
            "data_dir = \"{}\"\nmax_token_lifetime_secs = 600\n",
            data.display()
        ),
    )
    .unwrap();
    path
}

#[test]
fn idp_key_rotate_and_list() {
    let dir = tempfile::tempdir().unwrap();
    let config = idp_config(dir.path());
    let config = config.to_str().unwrap();
    let first = ok(quorum(&["idp", "key", "rotate", "--config", config]));
    let second = ok(quorum(&["idp", "key", "rotate", "--config", config]));
    let (first, second) = (first.trim(), second.trim());
    assert_ne!(first, second);
    assert_eq!(second.len(), 43, "a base64url SHA-256 thumbprint: {second}");

    let table = ok(quorum(&["idp", "key", "list", "--config", config]));
    let lines: Vec<&str> = table.lines().collect();
    assert!(
        lines[0].starts_with("KID") && lines[0].contains("CREATED") && lines[0].ends_with("STATE")
    );
    assert!(
        lines[1].starts_with(second) && lines[1].ends_with("active"),
        "{table}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with(first) && l.contains("retiring until ")),
        "{table}"
    );

    let json: serde_json::Value = serde_json::from_str(&ok(quorum(&[
        "idp", "key", "list", "--config", config, "--json",
    ])))
    .unwrap();
    assert_eq!(json[0]["kid"], second);
    assert_eq!(json[0]["state"], "active");
    let retiring: Vec<&serde_json::Value> = json
        .as_array()
        .unwrap()
        .iter()
        .filter(|k| k["state"] == "retiring")
        .collect();
    assert!(
        retiring
            .iter()
            .any(|k| k["kid"] == first && k["until"].is_i64()),
        "{json}"
    );
}

#[test]
fn idp_client_enable_brings_a_disabled_client_back() {
    let dir = tempfile::tempdir().unwrap();
    let config = idp_config(dir.path());
    let config = config.to_str().unwrap();
    ok(quorum(&[
        "idp", "client", "add", "--config", config, "--id", "w1", "--tenant", "t",
    ]));
    ok(quorum(&[
        "idp", "client", "disable", "--config", config, "--id", "w1",
    ]));
    let listed = ok(quorum(&["idp", "client", "list", "--config", config]));
    assert!(
        listed
            .lines()
            .any(|l| l.starts_with("w1") && l.ends_with("disabled")),
        "{listed}"
    );
    let out = quorum(&["idp", "client", "enable", "--config", config, "--id", "w1"]);
    assert!(
        stderr(&out).contains("enabled client `w1`"),
        "{}",
        stderr(&out)
    );
    ok(out);
    let listed = ok(quorum(&["idp", "client", "list", "--config", config]));
    assert!(
        listed
            .lines()
            .any(|l| l.starts_with("w1") && l.ends_with("enabled")),
        "{listed}"
    );
    let out = quorum(&[
        "idp", "client", "enable", "--config", config, "--id", "ghost",
    ]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("client `ghost` is not registered"),
        "{}",
        stderr(&out)
    );
}

fn controller_config(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("controller.toml");
    std::fs::write(
        &path,
        format!(
            "data_dir = \"{}\"\n[idp]\nurl = \"http://127.0.0.1:9\"\nclient_id = \"c\"\n[store]\nurl = \"http://127.0.0.1:9\"\naudience = \"store:s\"\n",
            dir.join("controller").display()
        ),
    )
    .unwrap();
    path
}

/// A statement naming `artifact`, signed by `key` as the signer signs.
fn statement(key: &SigningKey, artifact: &[u8]) -> attest::Envelope {
    let statement = serde_json::json!({
        "_type": attest::STATEMENT_TYPE,
        "subject": [{"name": "build/out", "digest": {"sha256": Digest::of(artifact).hex()}}],
    });
    attest::envelope_with(&statement, attest::key_id(&key.verifying_key()), |m| {
        key.sign(m).to_bytes()
    })
}

#[test]
fn signer_rotate_list_revoke_and_verify_with_the_published_set() {
    let dir = tempfile::tempdir().unwrap();
    let config = controller_config(dir.path());
    let config = config.to_str().unwrap();
    let key_path = dir.path().join("controller/signer.key");

    // The first key signs a statement; then the operator rotates.
    let listed = ok(quorum(&[
        "controller",
        "signer",
        "list",
        "--config",
        config,
        "--json",
    ]));
    let listed: serde_json::Value = serde_json::from_str(&listed).unwrap();
    let old_id = listed[0]["keyid"].as_str().unwrap().to_string();
    let old_key = SigningKey::from_bytes(&std::fs::read(&key_path).unwrap().try_into().unwrap());
    assert_eq!(attest::key_id(&old_key.verifying_key()), old_id);
    let artifact = dir.path().join("out");
    std::fs::write(&artifact, b"artifact bytes").unwrap();
    let old_statement = dir.path().join("old.intoto.json");
    std::fs::write(
        &old_statement,
        serde_json::to_vec(&statement(&old_key, b"artifact bytes")).unwrap(),
    )
    .unwrap();

    let new_id = ok(quorum(&[
        "controller",
        "signer",
        "rotate",
        "--config",
        config,
    ]));
    let new_id = new_id.trim();
    assert_ne!(new_id, old_id);
    let table = ok(quorum(&[
        "controller",
        "signer",
        "list",
        "--config",
        config,
    ]));
    assert!(
        table
            .lines()
            .any(|l| l.starts_with(new_id) && l.ends_with("active")),
        "{table}"
    );
    assert!(
        table
            .lines()
            .any(|l| l.starts_with(&old_id) && l.ends_with("retired")),
        "{table}"
    );

    // The key set as the controller publishes it (and `fetch` saves it) verifies the old
    // statement; the new key alone does not.
    let new_key = SigningKey::from_bytes(&std::fs::read(&key_path).unwrap().try_into().unwrap());
    let set = |keys: &[&SigningKey]| SignerKeys {
        keys: keys
            .iter()
            .map(|k| {
                (
                    attest::key_id(&k.verifying_key()),
                    B64.encode(k.verifying_key().as_bytes()),
                )
            })
            .collect(),
        active: Some(new_id.to_string()),
    };
    let keys_file = dir.path().join("signer-keys.json");
    std::fs::write(
        &keys_file,
        serde_json::to_vec(&set(&[&new_key, &old_key])).unwrap(),
    )
    .unwrap();
    let verify = |key: &Path| {
        quorum(&[
            "verify",
            "--statement",
            old_statement.to_str().unwrap(),
            "--key",
            key.to_str().unwrap(),
            artifact.to_str().unwrap(),
        ])
    };
    let out = verify(&keys_file);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("verified: "), "{}", stdout(&out));
    let single = dir.path().join("signer.pub");
    std::fs::write(
        &single,
        format!("{}\n", B64.encode(new_key.verifying_key().as_bytes())),
    )
    .unwrap();
    let out = verify(&single);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains(&format!(
            "no signature in the envelope was made by key {old_id}"
        )),
        "{}",
        stderr(&out)
    );

    // A key set listing a key under another key's id is refused, naming the id.
    let mut forged = set(&[&new_key]);
    forged.keys.insert(
        old_id.clone(),
        B64.encode(new_key.verifying_key().as_bytes()),
    );
    std::fs::write(&keys_file, serde_json::to_vec(&forged).unwrap()).unwrap();
    let out = verify(&keys_file);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains(&format!("key {old_id} is published under another key's id")),
        "{}",
        stderr(&out)
    );

    // Revocation: the active key is refused, the retired one is revoked.
    let out = quorum(&[
        "controller",
        "signer",
        "revoke",
        "--config",
        config,
        "--key-id",
        new_id,
    ]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("rotate to a new key before revoking it"),
        "{}",
        stderr(&out)
    );
    ok(quorum(&[
        "controller",
        "signer",
        "revoke",
        "--config",
        config,
        "--key-id",
        &old_id,
    ]));
    let table = ok(quorum(&[
        "controller",
        "signer",
        "list",
        "--config",
        config,
    ]));
    assert!(
        table
            .lines()
            .any(|l| l.starts_with(&old_id) && l.ends_with("revoked")),
        "{table}"
    );
}
