CREATE TABLE token_usage (
    jti TEXT PRIMARY KEY NOT NULL,
    iss TEXT NOT NULL,
    tenant TEXT NOT NULL,
    build TEXT NOT NULL,
    calls BIGINT NOT NULL DEFAULT 0,
    files BIGINT NOT NULL DEFAULT 0,
    bytes BIGINT NOT NULL DEFAULT 0,
    revoked BIGINT NOT NULL DEFAULT 0,
    exp BIGINT NOT NULL
);

CREATE INDEX token_usage_by_build ON token_usage (tenant, build);
