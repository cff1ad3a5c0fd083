-- The token a worker registered with: its later reports must come with the
-- same token, so one worker's token cannot act for another worker.
-- NULL for workers registered before this column existed.
ALTER TABLE workers ADD COLUMN token_id uuid REFERENCES api_tokens (id);
