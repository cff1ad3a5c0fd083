-- Dispatch through Redis and retries (issue 5).

-- When the job was last handed to the work stream: a job dispatched but not
-- started for too long is dispatched again (Redis may have lost the message).
ALTER TABLE jobs ADD COLUMN dispatched_at timestamptz;
-- Retry backoff: a requeued job is not dispatched before this time.
ALTER TABLE jobs ADD COLUMN not_before timestamptz;
-- Workers whose attempt failed or expired: not given the job again while
-- another worker can take it.
ALTER TABLE jobs ADD COLUMN failed_workers uuid[] NOT NULL DEFAULT '{}';
-- When the current attempt started (submit → start latency, render time).
ALTER TABLE jobs ADD COLUMN started_at timestamptz;

CREATE INDEX jobs_dispatched ON jobs (dispatched_at) WHERE state = 'dispatched';
