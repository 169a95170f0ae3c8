-- Assignments beyond a job's quorum: `purpose` is 'quorum' (the round's results, which decide
-- the verdict), 'tie_break' (a trusted rebuild an operator asked for to break a dispute; counted
-- only by verdict::verdict_with_rebuilds) or 'spot_check' (a trusted rebuild of a verified job;
-- compared with the verified result, never counted).
ALTER TABLE assignments ADD COLUMN purpose TEXT NOT NULL DEFAULT 'quorum';
-- Set once a verified build's spot checks were drawn, so each build is drawn exactly once.
ALTER TABLE builds ADD COLUMN spot_drawn INTEGER NOT NULL DEFAULT 0;
CREATE INDEX builds_to_draw ON builds(state, spot_drawn);
-- One row per verified job whose policy asks for spot checks: the draw (uniform in
-- [0, 1000000)) decides, against the rate in parts per million, whether it is rebuilt.
-- state: 'not_drawn', 'due', 'running', 'matched', 'mismatched', 'abandoned'.
CREATE TABLE spot_checks (
    build_id TEXT NOT NULL,
    job TEXT NOT NULL,
    draw INTEGER NOT NULL,
    rate_ppm INTEGER NOT NULL,
    state TEXT NOT NULL,
    assignment_id TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    detail TEXT NOT NULL DEFAULT '',
    created_at INTEGER NOT NULL,
    finished_at INTEGER,
    PRIMARY KEY (build_id, job),
    FOREIGN KEY (build_id, job) REFERENCES jobs(build_id, name)
);
CREATE INDEX spot_checks_open ON spot_checks(state);
-- A trusted rebuild of a disputed job, requested by an operator; one per job and round.
-- state: 'requested', 'running', 'done' (detail says how it ended).
CREATE TABLE rebuilds (
    build_id TEXT NOT NULL,
    job TEXT NOT NULL,
    round INTEGER NOT NULL,
    state TEXT NOT NULL,
    assignment_id TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    detail TEXT NOT NULL DEFAULT '',
    requested_at INTEGER NOT NULL,
    finished_at INTEGER,
    PRIMARY KEY (build_id, job, round),
    FOREIGN KEY (build_id, job) REFERENCES jobs(build_id, name)
);
CREATE INDEX rebuilds_open ON rebuilds(state);
-- A verified job flagged for review after a spot check contradicted it or a worker that
-- produced it: the reason and the evidence (JSON: digests, workers), never a score.
CREATE TABLE review_flags (
    id TEXT PRIMARY KEY,
    build_id TEXT NOT NULL,
    job TEXT NOT NULL,
    reason TEXT NOT NULL,
    evidence TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    cleared_at INTEGER,
    cleared_note TEXT,
    FOREIGN KEY (build_id, job) REFERENCES jobs(build_id, name)
);
CREATE INDEX review_flags_by_build ON review_flags(build_id);
CREATE INDEX review_flags_open ON review_flags(cleared_at, created_at);
