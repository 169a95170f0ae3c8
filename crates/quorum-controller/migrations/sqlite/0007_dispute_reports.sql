-- Explained disputes: the scheduler adds a row in the transaction that declares a job disputed;
-- the explainer (src/diff/) fetches the differing files from the store, compares them outside
-- any worker (diffoscope in a sandbox, or the built-in diff) and fills in the report. A row
-- still 'pending' after a restart is picked up again. state: 'pending', 'ready'.
CREATE TABLE dispute_reports (
    build_id TEXT NOT NULL,
    job TEXT NOT NULL,
    round INTEGER NOT NULL,
    state TEXT NOT NULL,
    tool TEXT,
    report_text TEXT,
    report_html TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    created_at INTEGER NOT NULL,
    finished_at INTEGER,
    PRIMARY KEY (build_id, job),
    FOREIGN KEY (build_id, job) REFERENCES jobs(build_id, name)
);
CREATE INDEX dispute_reports_pending ON dispute_reports(state, next_attempt_at);
-- Jobs disputed before this table existed are explained too.
INSERT INTO dispute_reports (build_id, job, round, state, created_at)
    SELECT build_id, name, round, 'pending', CAST(strftime('%s', 'now') AS INTEGER)
    FROM jobs WHERE state = 'disputed';
