-- The IdP's signing keys (`keys.rs`). Exactly one key is active and signs; a rotated-out key
-- loses its private half at once (it never signs again) and keeps its public half in JWKS until
-- `published_until`, when every token it signed has expired. The row stays afterwards, for
-- `quorum idp key list`. Rows are never deleted, so the rowid orders them by creation.
CREATE TABLE signing_keys (
    kid TEXT PRIMARY KEY NOT NULL,
    -- The raw 32-byte Ed25519 public key.
    public_key BLOB NOT NULL,
    -- The 32-byte Ed25519 seed while the key is active; NULL once it is rotated out.
    private_key BLOB,
    created_at INTEGER NOT NULL,
    -- When the key stopped signing; NULL while it is active.
    retired_at INTEGER,
    -- Until when its public key stays in JWKS: retired_at + longest token lifetime + skew.
    published_until INTEGER,
    CHECK ((retired_at IS NULL) = (private_key IS NOT NULL)),
    CHECK ((retired_at IS NULL) = (published_until IS NULL))
);

-- At most one active key, whatever races the CLI and the IdP run.
CREATE UNIQUE INDEX signing_keys_one_active ON signing_keys ((retired_at IS NULL))
    WHERE retired_at IS NULL;
