-- Retries run a job again in a new round: its verdict counts only the current round's
-- assignments. `approved_at` opens a manual job's gate. `deadline` is when a running assignment
-- has outlived its job's timeout (plus one lease of grace) and is given up.
ALTER TABLE jobs ADD COLUMN round INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN approved_at INTEGER;
ALTER TABLE assignments ADD COLUMN round INTEGER NOT NULL DEFAULT 0;
ALTER TABLE assignments ADD COLUMN deadline INTEGER;
