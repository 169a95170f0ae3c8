-- The tenant each assignment worked for (from the controller's token at the time) and the usage
-- its worker reported, kept as columns so the usage view sums them per build and per tenant.
ALTER TABLE assignments ADD COLUMN tenant TEXT;
ALTER TABLE assignments ADD COLUMN wall_ms INTEGER;
ALTER TABLE assignments ADD COLUMN cpu_ms INTEGER;
ALTER TABLE assignments ADD COLUMN peak_rss_kib INTEGER;
ALTER TABLE assignments ADD COLUMN bytes_uploaded INTEGER;
CREATE INDEX assignments_by_tenant ON assignments(tenant, state);
