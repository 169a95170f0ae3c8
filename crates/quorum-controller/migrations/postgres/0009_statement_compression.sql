-- Signed statements compressed with lz4 where the server has it: pglz took 16-20 ms to compress
-- the two envelopes of a thousand-job build (about 1 MB), lz4 3-4 ms, at the end of every
-- build. A server built without lz4 keeps pglz (the statement is run as text, so that the
-- error is one the block can catch).
DO $$
BEGIN
    EXECUTE 'ALTER TABLE statements ALTER COLUMN envelope SET COMPRESSION lz4, '
        'ALTER COLUMN summary SET COMPRESSION lz4';
EXCEPTION WHEN feature_not_supported OR syntax_error THEN
    RAISE NOTICE 'lz4 is not available; statements stay compressed with pglz';
END
$$;
