-- WatchBatch reads job_events as a log (issue 11).
--
-- Event ids are taken at insert and committed out of order, so "id > cursor"
-- skips an event committed late behind a higher id. Each event now records
-- the transaction that wrote it; a reader remembers the snapshot it last read
-- under and next reads exactly the events whose transaction that snapshot did
-- not see and a newer one does (pg_visible_in_snapshot): no gaps, no repeats,
-- whatever the commit order. Events written before this migration all carry
-- the migration's own transaction id and count as one commit.
ALTER TABLE job_events ADD COLUMN xid xid8 NOT NULL DEFAULT pg_current_xact_id();

-- The log scan: a batch's events from the cursor snapshot's xmin on. It
-- replaces (batch_id, id), which only the old cursor used, so an event still
-- costs two index entries.
CREATE INDEX job_events_batch_xid ON job_events (batch_id, xid);
DROP INDEX job_events_batch;
