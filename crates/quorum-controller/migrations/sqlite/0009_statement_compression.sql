-- PostgreSQL's migration 0009 chooses how signed statements are compressed; SQLite does not
-- compress values, so this one only keeps the two directories' numbers in step.
SELECT 1;
