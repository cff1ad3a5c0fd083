-- Batches a purge touched, so the result sweeper visits them: a purge
-- deletes jobs that ended long ago (often whole batches), and the sweeper
-- only looked at batches with a job that ended lately, so the purged jobs'
-- objects stayed in the bucket for good. Rows older than a week are of no
-- use to the sweeper and are removed by later purges.
CREATE TABLE batch_purges (
    batch_id   uuid PRIMARY KEY,
    purged_at  timestamptz NOT NULL DEFAULT now()
);
