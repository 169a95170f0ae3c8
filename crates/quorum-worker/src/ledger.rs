//! The worker's usage ledger: one signed record per finished assignment (success or failure;
//! refusals do work for nobody and are not recorded), appended to `data_dir/ledger.jsonl`.
//!
//! Each line is one JSON object: the [`Entry`] fields plus `signature`, the base64 of the
//! worker's Ed25519 signature over [`SIGNING_CONTEXT`] followed by the entry's canonical JSON
//! ([`Entry::canonical_bytes`]: compact, keys in sorted order, no `signature`). The context
//! prefix keeps a record signature from ever being mistaken for a request or report signature.
//! The key is the worker's own (`data_dir/worker.key`), so anyone holding the worker's public
//! key (a controller it enrolled with knows it) can check the ledger.
//!
//! Appends are one `write` of the whole line to a file opened with `O_APPEND`, then `fsync`,
//! under a process-wide lock, so two jobs ending at once never interleave their lines.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Mutex;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};

/// Prefixed to the canonical bytes of every signed record.
pub const SIGNING_CONTEXT: &[u8] = b"quorum-ledger-record-v1\n";
/// The ledger's file name inside `data_dir`.
pub const FILE_NAME: &str = "ledger.jsonl";

/// Serializes appends within this process (all jobs of one worker share one process).
static APPEND: Mutex<()> = Mutex::new(());

/// How an assignment ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Success,
    Failed,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Failed => "failed",
        }
    }
}

/// What one assignment used, before it is signed. Fields are declared in sorted key order, so
/// serde_json's compact output of this struct is its canonical JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    pub assignment: String,
    pub build_id: String,
    pub bytes_uploaded: u64,
    /// The URL of the controller that assigned the job.
    pub controller: String,
    pub cpu_ms: u64,
    /// Unix seconds when the assignment ended.
    pub finished: u64,
    pub job: String,
    pub outcome: Outcome,
    pub peak_rss_kib: u64,
    /// Whether the controller accepted the result report.
    pub reported: bool,
    /// Unix seconds when the worker accepted the assignment.
    pub started: u64,
    pub tenant: String,
    pub wall_ms: u64,
    /// The worker's configured name.
    pub worker: String,
}

impl Entry {
    /// The bytes the signature covers, after [`SIGNING_CONTEXT`].
    pub fn canonical_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("an entry always serializes")
    }

    fn signed_message(&self) -> Vec<u8> {
        let mut message = SIGNING_CONTEXT.to_vec();
        message.extend(self.canonical_bytes());
        message
    }

    /// Signs the entry with the worker's key.
    pub fn sign(self, key: &SigningKey) -> Record {
        let signature = B64.encode(key.sign(&self.signed_message()).to_bytes());
        Record {
            entry: self,
            signature,
        }
    }
}

/// One line of the ledger: an entry and the worker's signature over it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub entry: Entry,
    /// Base64 of the Ed25519 signature over [`SIGNING_CONTEXT`] + the entry's canonical JSON.
    pub signature: String,
}

/// The on-disk shape of a line: the entry's fields and `signature`, strictly parsed (unknown
/// and duplicate keys are errors).
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    assignment: String,
    build_id: String,
    bytes_uploaded: u64,
    controller: String,
    cpu_ms: u64,
    finished: u64,
    job: String,
    outcome: Outcome,
    peak_rss_kib: u64,
    reported: bool,
    signature: String,
    started: u64,
    tenant: String,
    wall_ms: u64,
    worker: String,
}

impl From<&Record> for Line {
    fn from(r: &Record) -> Line {
        let e = r.entry.clone();
        Line {
            assignment: e.assignment,
            build_id: e.build_id,
            bytes_uploaded: e.bytes_uploaded,
            controller: e.controller,
            cpu_ms: e.cpu_ms,
            finished: e.finished,
            job: e.job,
            outcome: e.outcome,
            peak_rss_kib: e.peak_rss_kib,
            reported: e.reported,
            signature: r.signature.clone(),
            started: e.started,
            tenant: e.tenant,
            wall_ms: e.wall_ms,
            worker: e.worker,
        }
    }
}

impl From<Line> for Record {
    fn from(l: Line) -> Record {
        Record {
            entry: Entry {
                assignment: l.assignment,
                build_id: l.build_id,
                bytes_uploaded: l.bytes_uploaded,
                controller: l.controller,
                cpu_ms: l.cpu_ms,
                finished: l.finished,
                job: l.job,
                outcome: l.outcome,
                peak_rss_kib: l.peak_rss_kib,
                reported: l.reported,
                started: l.started,
                tenant: l.tenant,
                wall_ms: l.wall_ms,
                worker: l.worker,
            },
            signature: l.signature,
        }
    }
}

impl Serialize for Record {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        Line::from(self).serialize(s)
    }
}

impl<'de> Deserialize<'de> for Record {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Record, D::Error> {
        Line::deserialize(d).map(Record::from)
    }
}

impl Record {
    /// The line written to the ledger, with its newline.
    pub fn to_line(&self) -> String {
        let mut line = serde_json::to_string(self).expect("a record always serializes");
        line.push('\n');
        line
    }

    /// Checks the signature against the worker's public key.
    pub fn verify(&self, key: &VerifyingKey) -> Result<(), String> {
        let bytes = B64
            .decode(&self.signature)
            .map_err(|e| format!("the signature is not base64: {e}"))?;
        let signature = Signature::from_slice(&bytes)
            .map_err(|_| "the signature is not 64 bytes".to_string())?;
        key.verify_strict(&self.entry.signed_message(), &signature)
            .map_err(|_| "the signature does not verify with the worker's key".to_string())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("{action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the worker key {} is unusable: {reason}", path.display())]
    Key { path: PathBuf, reason: String },
    #[error("{}, line {line}: malformed record: {reason}", path.display())]
    Malformed {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("{}, line {line}: tampered record: {reason}", path.display())]
    Tampered {
        path: PathBuf,
        line: usize,
        reason: String,
    },
}

impl LedgerError {
    /// The 1-based line number of a malformed or tampered record.
    pub fn line(&self) -> Option<usize> {
        match self {
            LedgerError::Malformed { line, .. } | LedgerError::Tampered { line, .. } => Some(*line),
            _ => None,
        }
    }
}

/// The ledger file of a worker whose data directory is `data_dir`.
pub fn path(data_dir: &Path) -> PathBuf {
    data_dir.join(FILE_NAME)
}

/// Reads the worker's existing key (`data_dir/worker.key`: 32 raw bytes); never creates one.
pub fn worker_key(data_dir: &Path) -> Result<SigningKey, LedgerError> {
    let path = data_dir.join("worker.key");
    let bytes = std::fs::read(&path).map_err(|e| LedgerError::Key {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    let arr: [u8; 32] = bytes.as_slice().try_into().map_err(|_| LedgerError::Key {
        path: path.clone(),
        reason: format!("{} bytes, not 32", bytes.len()),
    })?;
    Ok(SigningKey::from_bytes(&arr))
}

/// Signs `entry` with `key` and appends it to `data_dir/ledger.jsonl` as one line: a single
/// write to a file opened for appending, then fsync, under a lock shared by all jobs.
pub fn append(data_dir: &Path, key: &SigningKey, entry: Entry) -> Result<Record, LedgerError> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let record = entry.sign(key);
    let line = record.to_line();
    let path = path(data_dir);
    let io = |action| {
        let path = path.clone();
        move |source| LedgerError::Io {
            action,
            path,
            source,
        }
    };
    // A poisoned lock only means another append panicked; the file itself is still whole lines.
    let _guard = APPEND
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(&path)
        .map_err(io("cannot open"))?;
    let written = file
        .write(line.as_bytes())
        .map_err(io("cannot append to"))?;
    if written != line.len() {
        return Err(io("cannot append to")(std::io::Error::new(
            std::io::ErrorKind::WriteZero,
            format!("short write: {written} of {} bytes", line.len()),
        )));
    }
    file.sync_all().map_err(io("cannot sync"))?;
    Ok(record)
}

/// Reads every record of `data_dir/ledger.jsonl`, verifying each with the worker's public key
/// (from `data_dir/worker.key`). A missing ledger is empty; a malformed or tampered line is an
/// error naming its line number, never skipped.
pub fn read(data_dir: &Path) -> Result<Vec<Record>, LedgerError> {
    let key = worker_key(data_dir)?.verifying_key();
    read_file(&path(data_dir), &key)
}

/// [`read`] for a ledger file and a public key given explicitly.
pub fn read_file(path: &Path, key: &VerifyingKey) -> Result<Vec<Record>, LedgerError> {
    let text = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(LedgerError::Io {
                action: "cannot read",
                path: path.to_path_buf(),
                source,
            });
        }
    };
    let malformed = |line, reason: String| LedgerError::Malformed {
        path: path.to_path_buf(),
        line,
        reason,
    };
    if !text.is_empty() && !text.ends_with(b"\n") {
        let line = text.split(|b| *b == b'\n').count();
        return Err(malformed(line, "the last line is incomplete".into()));
    }
    let mut records = Vec::new();
    let body = text.strip_suffix(b"\n").unwrap_or(&text);
    if body.is_empty() {
        return Ok(records);
    }
    for (i, raw) in body.split(|b| *b == b'\n').enumerate() {
        let line = i + 1;
        if raw.is_empty() {
            return Err(malformed(line, "empty line".into()));
        }
        let record: Record =
            serde_json::from_slice(raw).map_err(|e| malformed(line, e.to_string()))?;
        record.verify(key).map_err(|reason| LedgerError::Tampered {
            path: path.to_path_buf(),
            line,
            reason,
        })?;
        records.push(record);
    }
    Ok(records)
}

/// How `quorum worker usage` prints the ledger.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// One row per record, then per-tenant totals.
    Table,
    /// A header and one row per record (with its signature).
    Csv,
    /// A JSON array of the records as stored (with their signatures).
    Json,
}

impl FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Format, String> {
        match s {
            "table" => Ok(Format::Table),
            "csv" => Ok(Format::Csv),
            "json" => Ok(Format::Json),
            other => Err(format!("unknown format `{other}` (table, csv or json)")),
        }
    }
}

/// One tenant's usage summed over its records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Totals {
    pub jobs: u64,
    pub wall_ms: u64,
    pub cpu_ms: u64,
    pub bytes_uploaded: u64,
}

/// Per-tenant totals, by tenant name.
pub fn totals(records: &[Record]) -> BTreeMap<String, Totals> {
    let mut totals: BTreeMap<String, Totals> = BTreeMap::new();
    for r in records {
        let t = totals.entry(r.entry.tenant.clone()).or_default();
        t.jobs += 1;
        t.wall_ms = t.wall_ms.saturating_add(r.entry.wall_ms);
        t.cpu_ms = t.cpu_ms.saturating_add(r.entry.cpu_ms);
        t.bytes_uploaded = t.bytes_uploaded.saturating_add(r.entry.bytes_uploaded);
    }
    totals
}

const CSV_HEADER: [&str; 15] = [
    "controller",
    "tenant",
    "build_id",
    "job",
    "assignment",
    "worker",
    "started",
    "finished",
    "wall_ms",
    "cpu_ms",
    "peak_rss_kib",
    "bytes_uploaded",
    "outcome",
    "reported",
    "signature",
];

/// Renders `records` in `format`; every output ends with a newline.
pub fn render(records: &[Record], format: Format) -> String {
    match format {
        Format::Json => {
            let mut out = serde_json::to_string_pretty(records).expect("records serialize");
            out.push('\n');
            out
        }
        Format::Csv => render_csv(records),
        Format::Table => render_table(records),
    }
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

fn render_csv(records: &[Record]) -> String {
    let mut out = CSV_HEADER.join(",");
    out.push('\n');
    for r in records {
        let e = &r.entry;
        let row = [
            csv_field(&e.controller),
            csv_field(&e.tenant),
            csv_field(&e.build_id),
            csv_field(&e.job),
            csv_field(&e.assignment),
            csv_field(&e.worker),
            e.started.to_string(),
            e.finished.to_string(),
            e.wall_ms.to_string(),
            e.cpu_ms.to_string(),
            e.peak_rss_kib.to_string(),
            e.bytes_uploaded.to_string(),
            e.outcome.as_str().to_string(),
            e.reported.to_string(),
            csv_field(&r.signature),
        ];
        out.push_str(&row.join(","));
        out.push('\n');
    }
    out
}

/// Milliseconds as seconds with three decimals.
fn secs(ms: u64) -> String {
    format!("{}.{:03}", ms / 1000, ms % 1000)
}

fn table(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

fn render_table(records: &[Record]) -> String {
    let mut rows = vec![
        [
            "FINISHED",
            "TENANT",
            "CONTROLLER",
            "BUILD",
            "JOB",
            "OUTCOME",
            "WALL_S",
            "CPU_S",
            "PEAK_KIB",
            "BYTES",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for r in records {
        let e = &r.entry;
        rows.push(vec![
            e.finished.to_string(),
            e.tenant.clone(),
            e.controller.clone(),
            e.build_id.clone(),
            e.job.clone(),
            e.outcome.as_str().to_string(),
            secs(e.wall_ms),
            secs(e.cpu_ms),
            e.peak_rss_kib.to_string(),
            e.bytes_uploaded.to_string(),
        ]);
    }
    let mut out = table(&rows);
    out.push('\n');
    let mut sums = vec![
        ["TENANT", "JOBS", "WALL_S", "CPU_S", "BYTES"]
            .map(String::from)
            .to_vec(),
    ];
    for (tenant, t) in totals(records) {
        sums.push(vec![
            tenant,
            t.jobs.to_string(),
            secs(t.wall_ms),
            secs(t.cpu_ms),
            t.bytes_uploaded.to_string(),
        ]);
    }
    out.push_str("Totals per tenant\n");
    out.push_str(&table(&sums));
    out
}

/// Unix seconds now (0 if the clock is before 1970).
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
