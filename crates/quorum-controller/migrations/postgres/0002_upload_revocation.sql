-- Each assignment's upload token id, so the controller can revoke it at the store when the
-- assignment ends; `upload_revoked` records that the store confirmed it.
ALTER TABLE assignments ADD COLUMN upload_jti TEXT;
ALTER TABLE assignments ADD COLUMN upload_revoked BIGINT NOT NULL DEFAULT 0;
CREATE INDEX assignments_to_revoke ON assignments(upload_revoked, state) WHERE upload_jti IS NOT NULL;
