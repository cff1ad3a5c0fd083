-- Which weights rendered each result, and which weights each worker serves:
-- the weights' identity (64 hex characters), the same for the same weights
-- in every published form. Empty for results recorded before it was kept.
ALTER TABLE jobs ADD COLUMN result_model_hash text;
ALTER TABLE workers ADD COLUMN model_hashes jsonb NOT NULL DEFAULT '{}'::jsonb;
