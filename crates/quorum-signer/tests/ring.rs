//! The signer's key ring through its public API and its files: rotation while a `Signer` is in
//! use, older statements verifying with the published keys, revocation, the first start of a
//! data dir from before key rings, and a rotation cut short between its two writes.

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;

use base64::Engine as _;
use ed25519_dalek::{Signer as _, SigningKey, VerifyingKey};
use quorum_core::attest::{self, VerifyError};
use quorum_signer::{KeyRing, RING_FILE, SignError, Signer, SignerKeyInfo, SignerKeyState};

fn key_of(info: &SignerKeyInfo) -> VerifyingKey {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(&info.public_key)
        .unwrap();
    VerifyingKey::from_bytes(&bytes.try_into().unwrap()).unwrap()
}

fn published(signer: &Signer) -> Vec<VerifyingKey> {
    signer
        .published_keys()
        .unwrap()
        .iter()
        .map(key_of)
        .collect()
}

/// A statement signed the way the signer signs, with whatever key `signer.key` holds now (the
/// signer's own evidence checks are covered by its unit tests).
fn sign_now(dir: &Path) -> attest::Envelope {
    let key = KeyRing::new(&dir.join("signer.key")).active().unwrap();
    let statement = serde_json::json!({"_type": attest::STATEMENT_TYPE, "subject": []});
    attest::envelope_with(&statement, attest::key_id(&key.verifying_key()), |m| {
        key.sign(m).to_bytes()
    })
}

#[test]
fn a_rotation_counts_at_the_next_signature_and_old_statements_keep_verifying() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("signer.key");
    let signer = Signer::load_or_create(&path).unwrap();
    let first = signer.key_id();
    let before = sign_now(dir.path());
    assert_eq!(before.signatures[0].keyid, first);

    // The operator rotates while the controller (this `Signer`) runs.
    let rotated = KeyRing::new(&path).rotate().unwrap();
    assert_ne!(rotated.keyid, first);
    let after = sign_now(dir.path());
    assert_eq!(after.signatures[0].keyid, rotated.keyid);

    // Both verify with the published ring; the old one no longer with the new key alone.
    let keys = published(&signer);
    assert_eq!(keys.len(), 2);
    attest::verify_envelope_with_any(&before, &keys).unwrap();
    attest::verify_envelope_with_any(&after, &keys).unwrap();
    assert!(matches!(
        attest::verify_envelope_with_any(&before, &[key_of(&rotated)]),
        Err(VerifyError::NoSignatureByKey(_))
    ));

    let listed = KeyRing::new(&path).list().unwrap();
    let states: Vec<(String, SignerKeyState)> = listed
        .iter()
        .map(|k| (k.keyid.clone(), k.state()))
        .collect();
    assert!(states.contains(&(rotated.keyid.clone(), SignerKeyState::Active)));
    assert!(states.contains(&(first.clone(), SignerKeyState::Retired)));

    // Only the active private key is on disk, readable by its owner alone; the ring file holds
    // public keys only.
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let on_disk = std::fs::read(&path).unwrap();
    let active = SigningKey::from_bytes(&on_disk.try_into().unwrap());
    assert_eq!(attest::key_id(&active.verifying_key()), rotated.keyid);
    let ring = std::fs::read_to_string(dir.path().join(RING_FILE)).unwrap();
    let value: serde_json::Value = serde_json::from_str(&ring).unwrap();
    for k in value["keys"].as_array().unwrap() {
        let fields: Vec<&str> = k.as_object().unwrap().keys().map(String::as_str).collect();
        assert!(
            fields
                .iter()
                .all(|f| ["keyid", "public_key", "created_at", "retired_at"].contains(f)),
            "{fields:?}"
        );
    }
}

#[test]
fn a_revoked_key_leaves_the_published_set_and_the_active_key_cannot_be_revoked() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("signer.key");
    let signer = Signer::load_or_create(&path).unwrap();
    let old = signer.key_id();
    let old_seed = std::fs::read(&path).unwrap();
    let before = sign_now(dir.path());
    let ring = KeyRing::new(&path);
    let new = ring.rotate().unwrap();

    let err = ring.revoke(&new.keyid).unwrap_err();
    assert!(matches!(&err, SignError::RevokeActive(id) if *id == new.keyid));
    assert!(err.to_string().contains(&new.keyid), "{err}");
    let err = ring.revoke("sha256:nope").unwrap_err();
    assert!(matches!(&err, SignError::UnknownKey(id) if id == "sha256:nope"));
    assert_eq!(
        published(&signer).len(),
        2,
        "refused revocations change nothing"
    );

    let revoked = ring.revoke(&old).unwrap();
    assert_eq!(revoked.state(), SignerKeyState::Revoked);
    let keys = published(&signer);
    assert_eq!(keys.len(), 1);
    assert!(matches!(
        attest::verify_envelope_with_any(&before, &keys),
        Err(VerifyError::NoSignatureByKey(id)) if id == old
    ));
    // Revoking twice keeps the first time.
    assert_eq!(ring.revoke(&old).unwrap().revoked_at, revoked.revoked_at);
    // A revoked key put back in place (a restored backup) signs nothing.
    std::fs::write(&path, &old_seed).unwrap();
    let err = ring.active().unwrap_err();
    assert!(
        matches!(&err, SignError::ActiveRevoked(id) if *id == old),
        "{err}"
    );
    assert!(err.to_string().contains("rotate"), "{err}");
    // It stays unpublished, and rotating away from it works.
    assert_eq!(published(&signer).len(), 1);
    let fresh = ring.rotate().unwrap();
    assert_eq!(ring.active().unwrap().verifying_key(), key_of(&fresh));
    let states: Vec<SignerKeyState> = ring.list().unwrap().iter().map(|k| k.state()).collect();
    assert_eq!(
        states,
        [
            SignerKeyState::Active,
            SignerKeyState::Retired,
            SignerKeyState::Revoked
        ]
    );
}

#[test]
fn a_data_dir_from_before_key_rings_keeps_its_key_id() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("signer.key");
    let old = SigningKey::from_bytes(&[9; 32]);
    std::fs::write(&path, old.as_bytes()).unwrap();
    let signer = Signer::load_or_create(&path).unwrap();
    assert_eq!(signer.key_id(), attest::key_id(&old.verifying_key()));
    let listed = KeyRing::new(&path).list().unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].state(), SignerKeyState::Active);
    assert_eq!(key_of(&listed[0]), old.verifying_key());
}

#[test]
fn a_rotation_cut_short_before_the_ring_is_written_is_completed_by_the_next_reader() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("signer.key");
    let signer = Signer::load_or_create(&path).unwrap();
    let old = signer.key_id();
    // The new private key is in place, the ring not yet updated (a crash in between).
    let new = SigningKey::from_bytes(&[4; 32]);
    std::fs::write(&path, new.as_bytes()).unwrap();
    let after = sign_now(dir.path());
    let new_id = attest::key_id(&new.verifying_key());
    assert_eq!(after.signatures[0].keyid, new_id);
    let listed = KeyRing::new(&path).list().unwrap();
    let state = |id: &str| listed.iter().find(|k| k.keyid == id).unwrap().state();
    assert_eq!(state(&new_id), SignerKeyState::Active);
    assert_eq!(state(&old), SignerKeyState::Retired);
    attest::verify_envelope_with_any(&after, &published(&signer)).unwrap();
}

#[test]
fn a_damaged_key_or_ring_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("signer.key");
    std::fs::write(&path, b"short").unwrap();
    let err = Signer::load_or_create(&path).unwrap_err();
    assert!(err.to_string().contains("signer.key"), "{err}");
    assert!(err.to_string().contains("32-byte"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("signer.key");
    Signer::load_or_create(&path).unwrap();
    std::fs::write(dir.path().join(RING_FILE), b"{not json").unwrap();
    let err = KeyRing::new(&path).rotate().unwrap_err();
    assert!(err.to_string().contains(RING_FILE), "{err}");
    // Nothing was rotated: the key on disk is the one from before.
    let key = std::fs::read(&path).unwrap();
    assert_eq!(key.len(), 32);
}
