-- What each token has used here, keyed by its `jti`: the durable counters behind `max_calls`,
-- `max_files` and `max_bytes`, and revocation. Rows are written only for tokens whose signature
-- verified; `iss`, `tenant` and `build` pin the row to the token that created it, so another
-- token carrying the same `jti` cannot use or revoke it. Rows past `exp` are pruned at start.
CREATE TABLE token_usage (
    jti TEXT PRIMARY KEY NOT NULL,
    iss TEXT NOT NULL,
    tenant TEXT NOT NULL,
    build TEXT NOT NULL,
    calls INTEGER NOT NULL DEFAULT 0,
    files INTEGER NOT NULL DEFAULT 0,
    bytes INTEGER NOT NULL DEFAULT 0,
    revoked INTEGER NOT NULL DEFAULT 0,
    exp INTEGER NOT NULL
) WITHOUT ROWID;

CREATE INDEX token_usage_by_build ON token_usage (tenant, build);
