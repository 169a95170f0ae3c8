-- A blob that arrived in a batch is kept in its batch's pack (`packs/<pack>` beside the blobs of
-- a local directory), `pack_offset` bytes in; a blob stored as an object of its own has neither.
-- A row names the copy placed last, so a blob uploaded again is found where it was just put.
ALTER TABLE blobs ADD COLUMN pack TEXT;
ALTER TABLE blobs ADD COLUMN pack_offset INTEGER;

CREATE INDEX blobs_by_pack ON blobs (pack) WHERE pack IS NOT NULL;
