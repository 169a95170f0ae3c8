-- Blobs whose bytes are in the blob backend. A row is written only after the bytes hashed to
-- the digest on arrival.
CREATE TABLE blobs (
    digest TEXT PRIMARY KEY NOT NULL,
    size INTEGER NOT NULL,
    stored_at INTEGER NOT NULL
) WITHOUT ROWID;

-- The tenants that uploaded each blob themselves. Only these may use it: knowing a digest
-- grants nothing.
CREATE TABLE tenant_blobs (
    tenant TEXT NOT NULL,
    digest TEXT NOT NULL REFERENCES blobs (digest),
    linked_at INTEGER NOT NULL,
    PRIMARY KEY (tenant, digest)
) WITHOUT ROWID;

-- Manifest bodies in canonical form, by digest. Agreeing assignments share one body.
CREATE TABLE manifest_bodies (
    digest TEXT PRIMARY KEY NOT NULL,
    body BLOB NOT NULL
) WITHOUT ROWID;

-- The one manifest each assignment recorded.
CREATE TABLE manifests (
    tenant TEXT NOT NULL,
    build TEXT NOT NULL,
    job TEXT NOT NULL,
    assignment TEXT NOT NULL,
    digest TEXT NOT NULL REFERENCES manifest_bodies (digest),
    recorded_at INTEGER NOT NULL,
    PRIMARY KEY (tenant, build, job, assignment)
) WITHOUT ROWID;

CREATE INDEX manifests_by_digest ON manifests (tenant, build, digest);

-- Blobs named by the manifests of a build: exactly what a read token for the build may fetch.
-- No foreign key on `digest`: the empty blob is named without ever being stored.
CREATE TABLE build_blobs (
    tenant TEXT NOT NULL,
    build TEXT NOT NULL,
    digest TEXT NOT NULL,
    manifest TEXT NOT NULL,
    PRIMARY KEY (tenant, build, digest, manifest)
) WITHOUT ROWID;
