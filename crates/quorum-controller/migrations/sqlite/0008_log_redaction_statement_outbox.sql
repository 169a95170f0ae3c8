-- Log redaction: the tokens minted for each assignment (a JSON list), redacted from its log;
-- they expire with the assignment. `log_tails` holds, per assignment, how many log bytes the
-- worker has sent and the part of them not yet redacted (it may be the start of a secret that
-- the next chunk completes); `logs` rows hold redacted bytes at offsets of the redacted stream.
ALTER TABLE assignments ADD COLUMN log_secrets TEXT;
CREATE TABLE log_tails (
    assignment_id TEXT PRIMARY KEY REFERENCES assignments(id),
    received INTEGER NOT NULL,
    tail BLOB NOT NULL
);
-- The outbox of signed statements for the store: `pushed_at` is set once the store has recorded
-- the statement; `push_attempts` and `next_push_at` pace the retries until then.
ALTER TABLE statements ADD COLUMN pushed_at INTEGER;
ALTER TABLE statements ADD COLUMN push_attempts INTEGER NOT NULL DEFAULT 0;
ALTER TABLE statements ADD COLUMN next_push_at INTEGER NOT NULL DEFAULT 0;
CREATE INDEX statements_to_push ON statements(next_push_at) WHERE pushed_at IS NULL;
