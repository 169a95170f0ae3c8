-- The SLSA Verification Summary (a DSSE envelope, JSON) signed beside each build's provenance
-- and written in the same transaction. NULL for builds signed before summaries existed.
ALTER TABLE statements ADD COLUMN summary TEXT;
