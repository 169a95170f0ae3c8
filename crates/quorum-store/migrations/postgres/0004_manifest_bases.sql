-- A manifest recorded relative to an earlier one does not copy the base's references in
-- `build_blobs`: it names the blobs its base names in `base_build` (as `build_blobs` rows of
-- that build and manifest), less those in `base_exclusions`, plus its own `build_blobs` rows.
-- A base is always a manifest with a full set of rows (no `manifest_bases` row of its own), so
-- finding what a manifest names takes one step. The base's rows stay while a recorded manifest
-- refers to them, even after the base itself expired.
CREATE TABLE manifest_bases (
    tenant TEXT NOT NULL,
    build TEXT NOT NULL,
    manifest TEXT NOT NULL,
    base_build TEXT NOT NULL,
    base TEXT NOT NULL,
    PRIMARY KEY (tenant, build, manifest)
);

CREATE INDEX manifest_bases_by_base ON manifest_bases (tenant, base_build, base);

-- The base's blobs that a relative manifest no longer names.
CREATE TABLE base_exclusions (
    tenant TEXT NOT NULL,
    build TEXT NOT NULL,
    manifest TEXT NOT NULL,
    digest TEXT NOT NULL,
    PRIMARY KEY (tenant, build, manifest, digest)
);
