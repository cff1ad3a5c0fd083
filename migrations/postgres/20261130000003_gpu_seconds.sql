-- GPU time, counted once: each attempt's seconds are reported when it ends
-- (CompleteJobs, FailJob), recorded on the event that ends it and added to
-- the job's total; batches and submitters sum their jobs.
ALTER TABLE jobs ADD COLUMN gpu_seconds float8 NOT NULL DEFAULT 0;
ALTER TABLE job_events ADD COLUMN gpu_seconds float8;
