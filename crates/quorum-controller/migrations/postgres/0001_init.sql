-- Quorum controller schema, version 1, for PostgreSQL: the same tables and columns as
-- migrations/sqlite/0001_init.sql, so one set of queries serves both. Times are unix seconds;
-- flags are 0/1 integers as in SQLite. JSON columns hold quorum-api types.
CREATE TABLE enrollments (
    token_hash TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    trusted BIGINT NOT NULL,
    labels TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    used_by TEXT
);
CREATE TABLE workers (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    trusted BIGINT NOT NULL,
    labels TEXT NOT NULL,
    public_key TEXT NOT NULL,
    enrolled_at BIGINT NOT NULL,
    last_seen BIGINT NOT NULL DEFAULT 0
);
CREATE TABLE builds (
    id TEXT PRIMARY KEY,
    repository TEXT NOT NULL,
    commit_id TEXT NOT NULL,
    source_date_epoch BIGINT NOT NULL,
    state TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    finished_at BIGINT
);
CREATE TABLE jobs (
    build_id TEXT NOT NULL REFERENCES builds(id),
    name TEXT NOT NULL,
    position BIGINT NOT NULL,
    spec TEXT NOT NULL,
    state TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT '',
    manifest TEXT,
    differing_paths TEXT NOT NULL DEFAULT '[]',
    PRIMARY KEY (build_id, name)
);
CREATE TABLE assignments (
    id TEXT PRIMARY KEY,
    build_id TEXT NOT NULL,
    job TEXT NOT NULL,
    worker_id TEXT NOT NULL REFERENCES workers(id),
    state TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    lease_expires BIGINT NOT NULL,
    detail TEXT,
    report TEXT,
    signature TEXT,
    outcome TEXT,
    finished_at BIGINT,
    FOREIGN KEY (build_id, job) REFERENCES jobs(build_id, name)
);
CREATE INDEX assignments_by_job ON assignments(build_id, job);
CREATE INDEX assignments_by_worker_state ON assignments(worker_id, state);
CREATE TABLE logs (
    assignment_id TEXT NOT NULL REFERENCES assignments(id),
    "offset" BIGINT NOT NULL,
    data BYTEA NOT NULL,
    PRIMARY KEY (assignment_id, "offset")
);
CREATE TABLE statements (
    build_id TEXT PRIMARY KEY REFERENCES builds(id),
    envelope TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
