CREATE TABLE tenant_usage (
    tenant TEXT PRIMARY KEY NOT NULL,
    stored_bytes BIGINT NOT NULL DEFAULT 0,
    bytes_in BIGINT NOT NULL DEFAULT 0,
    bytes_out BIGINT NOT NULL DEFAULT 0
);

CREATE TABLE statements (
    tenant TEXT NOT NULL,
    build TEXT NOT NULL,
    envelope BYTEA NOT NULL,
    public BIGINT NOT NULL DEFAULT 0,
    recorded_at BIGINT NOT NULL,
    PRIMARY KEY (tenant, build)
);

CREATE INDEX tenant_blobs_by_digest ON tenant_blobs (digest);
CREATE INDEX build_blobs_by_digest ON build_blobs (tenant, digest);
CREATE INDEX manifests_by_age ON manifests (recorded_at);
