-- Clients registered with the admin CLI (`quorum idp client add`). Config-file clients are not
-- copied here: the config file stays their only source, and an id may live in only one place.
-- The secret is kept only as an Argon2id PHC string.
CREATE TABLE clients (
    id TEXT PRIMARY KEY NOT NULL,
    tenant TEXT NOT NULL,
    secret_hash TEXT NOT NULL,
    -- A disabled client is refused like an unknown one; the row stays so its id is not reused.
    disabled INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL,
    rotated_at INTEGER
) WITHOUT ROWID;
