-- The same schema as migrations/sqlite, in PostgreSQL's types. See there for what each table is.
CREATE TABLE blobs (
    digest TEXT PRIMARY KEY NOT NULL,
    size BIGINT NOT NULL,
    stored_at BIGINT NOT NULL
);

CREATE TABLE tenant_blobs (
    tenant TEXT NOT NULL,
    digest TEXT NOT NULL REFERENCES blobs (digest),
    linked_at BIGINT NOT NULL,
    PRIMARY KEY (tenant, digest)
);

CREATE TABLE manifest_bodies (
    digest TEXT PRIMARY KEY NOT NULL,
    body BYTEA NOT NULL
);

CREATE TABLE manifests (
    tenant TEXT NOT NULL,
    build TEXT NOT NULL,
    job TEXT NOT NULL,
    assignment TEXT NOT NULL,
    digest TEXT NOT NULL REFERENCES manifest_bodies (digest),
    recorded_at BIGINT NOT NULL,
    PRIMARY KEY (tenant, build, job, assignment)
);

CREATE INDEX manifests_by_digest ON manifests (tenant, build, digest);

CREATE TABLE build_blobs (
    tenant TEXT NOT NULL,
    build TEXT NOT NULL,
    digest TEXT NOT NULL,
    manifest TEXT NOT NULL,
    PRIMARY KEY (tenant, build, digest, manifest)
);
