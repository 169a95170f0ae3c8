//! The usage ledger: signed records appended and read back verified, tampering named by line,
//! concurrent appends kept whole, and the table, CSV and JSON renderings.

use std::path::Path;

use quorum_worker::ledger::{self, Entry, Format, LedgerError, Outcome, Record};

fn key_in(dir: &Path) -> ed25519_dalek::SigningKey {
    // The worker's own key file, as the agent creates it on first start.
    quorum_service::load_or_create_key(&dir.join("worker.key")).unwrap()
}

fn entry(tenant: &str, job: &str, wall_ms: u64, cpu_ms: u64, bytes: u64) -> Entry {
    Entry {
        assignment: format!("asg-{tenant}-{job}"),
        build_id: "b-1".into(),
        bytes_uploaded: bytes,
        controller: format!("https://ctl.{tenant}.example"),
        cpu_ms,
        finished: 1_700_000_100,
        job: job.into(),
        outcome: if job.starts_with("fail") {
            Outcome::Failed
        } else {
            Outcome::Success
        },
        peak_rss_kib: 2048,
        reported: true,
        started: 1_700_000_000,
        tenant: tenant.into(),
        wall_ms,
        worker: "w1".into(),
    }
}

fn lines(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(ledger::path(dir))
        .unwrap()
        .lines()
        .map(String::from)
        .collect()
}

#[test]
fn appended_records_read_back_verified() {
    let dir = tempfile::tempdir().unwrap();
    assert!(
        ledger::read(dir.path()).is_err(),
        "no worker key yet: nothing to verify with"
    );
    let key = key_in(dir.path());
    assert_eq!(ledger::read(dir.path()).unwrap(), Vec::<Record>::new());

    let first = ledger::append(dir.path(), &key, entry("acme", "build", 1500, 900, 10)).unwrap();
    let second = ledger::append(dir.path(), &key, entry("zeta", "fail", 250, 100, 0)).unwrap();
    let read = ledger::read(dir.path()).unwrap();
    assert_eq!(read, vec![first.clone(), second]);
    assert_eq!(read[0].entry, entry("acme", "build", 1500, 900, 10));
    assert_eq!(read[1].entry.outcome, Outcome::Failed);

    // The signature covers the context prefix and the canonical JSON without the signature.
    let mut message = b"quorum-ledger-record-v1\n".to_vec();
    message.extend(first.entry.canonical_bytes());
    let sig = base64::Engine::decode(&base64::engine::general_purpose::STANDARD, &first.signature)
        .unwrap();
    let sig = ed25519_dalek::Signature::from_slice(&sig).unwrap();
    key.verifying_key().verify_strict(&message, &sig).unwrap();
    // Without the prefix the same signature is worthless (no confusion with other signatures).
    assert!(
        key.verifying_key()
            .verify_strict(&first.entry.canonical_bytes(), &sig)
            .is_err()
    );
    let canonical = String::from_utf8(first.entry.canonical_bytes()).unwrap();
    assert!(!canonical.contains("signature"), "{canonical}");
    assert!(
        canonical.starts_with(r#"{"assignment":"asg-acme-build","build_id":"b-1","#),
        "{canonical}"
    );

    // Each record is one line of the file, with its signature.
    let lines = lines(dir.path());
    assert_eq!(lines.len(), 2);
    let stored: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
    assert_eq!(stored["tenant"], "acme");
    assert_eq!(stored["outcome"], "success");
    assert_eq!(stored["signature"], first.signature.as_str());
}

#[test]
fn a_record_signed_by_another_key_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    key_in(dir.path());
    let other = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
    ledger::append(dir.path(), &other, entry("acme", "build", 1, 1, 1)).unwrap();
    let err = ledger::read(dir.path()).unwrap_err();
    assert!(
        matches!(err, LedgerError::Tampered { line: 1, .. }),
        "{err}"
    );
}

#[test]
fn a_flipped_byte_is_reported_with_its_line_number() {
    let dir = tempfile::tempdir().unwrap();
    let key = key_in(dir.path());
    for job in ["one", "two", "three"] {
        ledger::append(dir.path(), &key, entry("acme", job, 1000, 500, 42)).unwrap();
    }
    let original = std::fs::read(ledger::path(dir.path())).unwrap();
    let second_line_start = original.iter().position(|b| *b == b'\n').unwrap() + 1;

    // A changed value that still parses: the signature no longer matches.
    let text = String::from_utf8(original.clone()).unwrap();
    let mut edited: Vec<String> = text.lines().map(String::from).collect();
    edited[1] = edited[1].replace(r#""bytes_uploaded":42"#, r#""bytes_uploaded":43"#);
    let tampered = edited.join("\n") + "\n";
    assert_ne!(tampered, text);
    std::fs::write(ledger::path(dir.path()), &tampered).unwrap();
    let err = ledger::read(dir.path()).unwrap_err();
    assert!(matches!(err, LedgerError::Tampered { .. }), "{err}");
    assert_eq!(err.line(), Some(2), "{err}");
    assert!(err.to_string().contains("line 2"), "{err}");

    // Every single flipped byte anywhere in line 2 is caught and attributed to line 2.
    let second_line_end = second_line_start
        + original[second_line_start..]
            .iter()
            .position(|b| *b == b'\n')
            .unwrap();
    for i in second_line_start..second_line_end {
        let mut bytes = original.clone();
        bytes[i] ^= 0x01;
        std::fs::write(ledger::path(dir.path()), &bytes).unwrap();
        let err = ledger::read(dir.path()).expect_err(&format!("flipping byte {i} went unnoticed"));
        assert_eq!(err.line(), Some(2), "byte {i}: {err}");
    }

    // A torn last line is malformed, not skipped.
    let mut torn = original.clone();
    torn.truncate(original.len() - 5);
    std::fs::write(ledger::path(dir.path()), &torn).unwrap();
    let err = ledger::read(dir.path()).unwrap_err();
    assert!(
        matches!(err, LedgerError::Malformed { line: 3, .. }),
        "{err}"
    );

    // Unknown fields are malformed too (the signature would not cover them).
    let extra = text.replacen(r#"{"assignment""#, r#"{"extra":1,"assignment""#, 1);
    std::fs::write(ledger::path(dir.path()), extra).unwrap();
    let err = ledger::read(dir.path()).unwrap_err();
    assert!(
        matches!(err, LedgerError::Malformed { line: 1, .. }),
        "{err}"
    );

    std::fs::write(ledger::path(dir.path()), &original).unwrap();
    assert_eq!(ledger::read(dir.path()).unwrap().len(), 3);
}

#[test]
fn concurrent_appends_each_land_as_a_whole_line() {
    let dir = tempfile::tempdir().unwrap();
    let key = key_in(dir.path());
    const THREADS: usize = 8;
    const EACH: usize = 25;
    let barrier = std::sync::Barrier::new(THREADS);
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let (dir, key, barrier) = (dir.path(), &key, &barrier);
            s.spawn(move || {
                barrier.wait();
                for i in 0..EACH {
                    // Long fields make a torn or interleaved write easy to see.
                    let mut e = entry(&format!("tenant{t}"), &format!("job{i}"), 1, 1, 1);
                    e.controller = format!("https://{}.example", "x".repeat(3000));
                    ledger::append(dir, key, e).unwrap();
                }
            });
        }
    });
    let records = ledger::read(dir.path()).unwrap();
    assert_eq!(records.len(), THREADS * EACH);
    assert_eq!(lines(dir.path()).len(), THREADS * EACH);
    let totals = ledger::totals(&records);
    assert_eq!(totals.len(), THREADS);
    assert!(totals.values().all(|t| t.jobs == EACH as u64));
}

#[test]
fn renderings_list_the_records_and_the_table_totals_each_tenant() {
    let dir = tempfile::tempdir().unwrap();
    let key = key_in(dir.path());
    ledger::append(dir.path(), &key, entry("acme", "build", 1500, 900, 10)).unwrap();
    ledger::append(dir.path(), &key, entry("acme", "test", 2250, 1100, 5)).unwrap();
    ledger::append(dir.path(), &key, entry("zeta", "fail", 250, 100, 0)).unwrap();
    let records = ledger::read(dir.path()).unwrap();

    let totals = ledger::totals(&records);
    let acme = totals["acme"];
    assert_eq!(
        (acme.jobs, acme.wall_ms, acme.cpu_ms, acme.bytes_uploaded),
        (2, 3750, 2000, 15)
    );
    assert_eq!(totals["zeta"].jobs, 1);

    let table = ledger::render(&records, Format::Table);
    let (rows, sums) = table.split_once("Totals per tenant\n").expect(&table);
    assert_eq!(
        rows.lines().filter(|l| !l.trim().is_empty()).count(),
        4,
        "{table}"
    );
    assert!(rows.contains("https://ctl.acme.example"), "{table}");
    let acme_line = sums.lines().find(|l| l.starts_with("acme")).expect(&table);
    let cells: Vec<&str> = acme_line.split_whitespace().collect();
    assert_eq!(cells, ["acme", "2", "3.750", "2.000", "15"], "{table}");
    let zeta_line = sums.lines().find(|l| l.starts_with("zeta")).expect(&table);
    let cells: Vec<&str> = zeta_line.split_whitespace().collect();
    assert_eq!(cells, ["zeta", "1", "0.250", "0.100", "0"], "{table}");

    let csv = ledger::render(&records, Format::Csv);
    let csv_lines: Vec<&str> = csv.lines().collect();
    assert_eq!(csv_lines.len(), 4, "{csv}");
    assert!(
        csv_lines[0].starts_with("controller,tenant,build_id,job,assignment,"),
        "{csv}"
    );
    let header: Vec<&str> = csv_lines[0].split(',').collect();
    let row: Vec<&str> = csv_lines[3].split(',').collect();
    assert_eq!(header.len(), row.len());
    let col = |name: &str| header.iter().position(|h| *h == name).unwrap();
    assert_eq!(row[col("tenant")], "zeta");
    assert_eq!(row[col("outcome")], "failed");
    assert_eq!(row[col("wall_ms")], "250");
    assert_eq!(row[col("signature")], records[2].signature);

    let json = ledger::render(&records, Format::Json);
    let parsed: Vec<Record> = serde_json::from_str(&json).unwrap();
    assert_eq!(parsed, records);
    for r in &parsed {
        r.verify(&key.verifying_key()).unwrap();
    }

    assert_eq!("csv".parse::<Format>(), Ok(Format::Csv));
    assert!("xml".parse::<Format>().is_err());
}
