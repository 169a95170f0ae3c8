-- What each tenant stores and transfers here: `stored_bytes` is the sum of the sizes of the
-- tenant's `tenant_blobs` (a blob shared by two tenants counts for each), kept in step by every
-- link and unlink; `bytes_in` and `bytes_out` are blob bytes received and served.
CREATE TABLE tenant_usage (
    tenant TEXT PRIMARY KEY NOT NULL,
    stored_bytes INTEGER NOT NULL DEFAULT 0,
    bytes_in INTEGER NOT NULL DEFAULT 0,
    bytes_out INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;

INSERT INTO tenant_usage (tenant, stored_bytes)
    SELECT t.tenant, SUM(b.size) FROM tenant_blobs t JOIN blobs b ON b.digest = t.digest
    GROUP BY t.tenant;

-- The signed statement of a build, as its controller handed it over, and whether the build's
-- artifacts may be read without a token.
CREATE TABLE statements (
    tenant TEXT NOT NULL,
    build TEXT NOT NULL,
    envelope BLOB NOT NULL,
    public INTEGER NOT NULL DEFAULT 0,
    recorded_at INTEGER NOT NULL,
    PRIMARY KEY (tenant, build)
) WITHOUT ROWID;

-- Garbage collection looks for links nobody's manifest uses, and for blobs nobody links.
CREATE INDEX tenant_blobs_by_digest ON tenant_blobs (digest);
CREATE INDEX build_blobs_by_digest ON build_blobs (tenant, digest);
CREATE INDEX manifests_by_age ON manifests (recorded_at);
