-- flowfarm on SQLite: the schema of migrations/postgres/ as it stands after
-- all of them, for one machine (`flowfarm dev`).
--
-- Differences from Postgres, all forced by SQLite's types:
-- - ids are 16-byte BLOBs (UUIDs; v7 ids sort by time as blobs do);
-- - instants are INTEGER microseconds since the Unix epoch (UTC), so they
--   compare as numbers;
-- - arrays and JSON are TEXT holding JSON.
-- The store takes every write under one writer connection, so transactions
-- commit in the order they began and event ids are in commit order: the
-- event log's cursor is the last id read (no snapshots needed).

CREATE TABLE api_tokens (
    id          BLOB PRIMARY KEY,
    name        TEXT NOT NULL,
    role        TEXT NOT NULL CHECK (role IN ('submit', 'admin', 'worker')),
    token_hash  BLOB NOT NULL UNIQUE,
    created_at  INTEGER NOT NULL,
    revoked_at  INTEGER,
    expires_at  INTEGER,
    max_queued_jobs INTEGER CHECK (max_queued_jobs > 0),
    max_batch_jobs  INTEGER CHECK (max_batch_jobs > 0),
    max_gpu_seconds_per_day REAL CHECK (max_gpu_seconds_per_day > 0)
);

CREATE TABLE batches (
    id               BLOB PRIMARY KEY,
    submitter        TEXT NOT NULL,
    idempotency_key  TEXT,
    content_hash     BLOB NOT NULL,
    labels           TEXT NOT NULL DEFAULT '{}',
    total_jobs       INTEGER NOT NULL,
    created_at       INTEGER NOT NULL,
    UNIQUE (submitter, idempotency_key)
);
CREATE INDEX batches_recent ON batches (created_at DESC, id DESC);

CREATE TABLE jobs (
    id               BLOB PRIMARY KEY,
    batch_id         BLOB NOT NULL REFERENCES batches (id) ON DELETE CASCADE,
    idx              INTEGER NOT NULL,
    model            TEXT NOT NULL,
    prompt           TEXT NOT NULL,
    negative_prompt  TEXT NOT NULL,
    width            INTEGER NOT NULL,
    height           INTEGER NOT NULL,
    steps            INTEGER NOT NULL,
    guidance         REAL NOT NULL,
    seed             INTEGER NOT NULL CHECK (seed >= 0),
    shift            REAL NOT NULL,
    text_encoders    TEXT NOT NULL CHECK (text_encoders IN ('all', 'clip-only')),
    priority         INTEGER NOT NULL,
    max_attempts     INTEGER NOT NULL CHECK (max_attempts >= 1),
    labels           TEXT NOT NULL DEFAULT '{}',
    state            TEXT NOT NULL CHECK (state IN ('queued', 'dispatched', 'running', 'succeeded', 'failed', 'cancelled', 'dead')),
    attempt          INTEGER NOT NULL DEFAULT 1,
    worker_id        BLOB,
    lease_expires_at INTEGER,
    progress_step    INTEGER NOT NULL DEFAULT 0,
    error            TEXT,
    result_key       TEXT,
    result_sha256    TEXT,
    result_size      INTEGER,
    result_content_type TEXT,
    result_model_hash TEXT,
    gpu_seconds      REAL NOT NULL DEFAULT 0,
    dispatched_at    INTEGER,
    not_before       INTEGER,
    -- JSON array of the ids (hyphenated text) of workers whose attempt failed.
    failed_workers   TEXT NOT NULL DEFAULT '[]',
    started_at       INTEGER,
    created_at       INTEGER NOT NULL,
    updated_at       INTEGER NOT NULL,
    UNIQUE (batch_id, idx)
);
CREATE INDEX jobs_queued ON jobs (model, text_encoders, priority DESC, id) WHERE state = 'queued';
CREATE INDEX jobs_leased ON jobs (lease_expires_at) WHERE state = 'running';
CREATE INDEX jobs_worker ON jobs (worker_id) WHERE state = 'running';
CREATE INDEX jobs_dispatched ON jobs (dispatched_at) WHERE state = 'dispatched';
CREATE INDEX jobs_state_model ON jobs (state, model);
CREATE INDEX jobs_finished ON jobs (updated_at) WHERE state IN ('succeeded', 'failed', 'cancelled', 'dead');

CREATE TABLE job_events (
    -- AUTOINCREMENT: ids are never reused, even after a purge, so a cursor
    -- never meets an id it has passed.
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id      BLOB NOT NULL,
    batch_id    BLOB NOT NULL,
    from_state  TEXT,
    to_state    TEXT NOT NULL,
    attempt     INTEGER NOT NULL,
    actor       TEXT NOT NULL,
    reason      TEXT NOT NULL DEFAULT '',
    at          INTEGER NOT NULL,
    gpu_seconds REAL
);
CREATE INDEX job_events_batch ON job_events (batch_id, id);
CREATE INDEX job_events_job ON job_events (job_id, id);

CREATE TABLE workers (
    id                BLOB PRIMARY KEY,
    name              TEXT NOT NULL,
    hostname          TEXT NOT NULL,
    state             TEXT NOT NULL CHECK (state IN ('active', 'draining', 'cordoned', 'lost', 'gone')),
    devices           TEXT NOT NULL DEFAULT '[]',
    models            TEXT NOT NULL,
    text_encoder_sets TEXT NOT NULL,
    model_hashes      TEXT NOT NULL DEFAULT '{}',
    capacity          INTEGER NOT NULL,
    version           TEXT NOT NULL DEFAULT '',
    images_done       INTEGER NOT NULL DEFAULT 0,
    gpu_seconds       REAL NOT NULL DEFAULT 0,
    token_id          BLOB REFERENCES api_tokens (id),
    registered_at     INTEGER NOT NULL,
    last_heartbeat_at INTEGER NOT NULL
);

CREATE TABLE queue_state (
    model       TEXT PRIMARY KEY,
    paused      INTEGER NOT NULL,
    reason      TEXT NOT NULL DEFAULT '',
    updated_by  TEXT NOT NULL,
    updated_at  INTEGER NOT NULL
);

CREATE TABLE batch_purges (
    batch_id   BLOB PRIMARY KEY,
    purged_at  INTEGER NOT NULL
);
