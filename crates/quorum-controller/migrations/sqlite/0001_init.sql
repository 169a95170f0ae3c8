-- Quorum controller schema, version 1. Times are unix seconds. JSON columns hold quorum-api types.
CREATE TABLE IF NOT EXISTS enrollments (
    token_hash TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    trusted INTEGER NOT NULL,
    labels TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    used_by TEXT
);
CREATE TABLE IF NOT EXISTS workers (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    trusted INTEGER NOT NULL,
    labels TEXT NOT NULL,
    public_key TEXT NOT NULL,
    enrolled_at INTEGER NOT NULL,
    last_seen INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS builds (
    id TEXT PRIMARY KEY,
    repository TEXT NOT NULL,
    commit_id TEXT NOT NULL,
    source_date_epoch INTEGER NOT NULL,
    state TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    finished_at INTEGER
);
CREATE TABLE IF NOT EXISTS jobs (
    build_id TEXT NOT NULL REFERENCES builds(id),
    name TEXT NOT NULL,
    position INTEGER NOT NULL,
    spec TEXT NOT NULL,
    state TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT '',
    manifest TEXT,
    differing_paths TEXT NOT NULL DEFAULT '[]',
    PRIMARY KEY (build_id, name)
);
CREATE TABLE IF NOT EXISTS assignments (
    id TEXT PRIMARY KEY,
    build_id TEXT NOT NULL,
    job TEXT NOT NULL,
    worker_id TEXT NOT NULL REFERENCES workers(id),
    state TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    lease_expires INTEGER NOT NULL,
    detail TEXT,
    report TEXT,
    signature TEXT,
    outcome TEXT,
    finished_at INTEGER,
    FOREIGN KEY (build_id, job) REFERENCES jobs(build_id, name)
);
CREATE INDEX IF NOT EXISTS assignments_by_job ON assignments(build_id, job);
CREATE INDEX IF NOT EXISTS assignments_by_worker_state ON assignments(worker_id, state);
CREATE TABLE IF NOT EXISTS logs (
    assignment_id TEXT NOT NULL REFERENCES assignments(id),
    offset INTEGER NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (assignment_id, offset)
);
CREATE TABLE IF NOT EXISTS statements (
    build_id TEXT PRIMARY KEY REFERENCES builds(id),
    envelope TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
