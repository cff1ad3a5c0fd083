-- Tenants: a token's name is its tenant (the batches' `submitter`); tokens
-- expire, and carry the quotas their tenant's submissions are held to
-- (NULL: no limit).
ALTER TABLE api_tokens ADD COLUMN expires_at timestamptz;
ALTER TABLE api_tokens ADD COLUMN max_queued_jobs integer CHECK (max_queued_jobs > 0);
ALTER TABLE api_tokens ADD COLUMN max_batch_jobs integer CHECK (max_batch_jobs > 0);
ALTER TABLE api_tokens ADD COLUMN max_gpu_seconds_per_day float8 CHECK (max_gpu_seconds_per_day > 0);
