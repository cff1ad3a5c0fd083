-- flowfarm schema v1. Postgres is the only source of truth (DESIGN.md §1).

CREATE TABLE api_tokens (
    id          uuid PRIMARY KEY,
    name        text NOT NULL,
    role        text NOT NULL CHECK (role IN ('submit', 'admin', 'worker')),
    -- SHA-256 of the secret; the secret itself is shown once and never stored.
    token_hash  bytea NOT NULL UNIQUE,
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);

CREATE TABLE batches (
    id               uuid PRIMARY KEY,
    submitter        text NOT NULL,
    idempotency_key  text,
    -- SHA-256 of the canonical request, to tell a replay from a conflicting reuse of the key.
    content_hash     bytea NOT NULL,
    labels           jsonb NOT NULL DEFAULT '{}',
    total_jobs       integer NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    UNIQUE (submitter, idempotency_key)
);

CREATE TABLE jobs (
    id               uuid PRIMARY KEY,
    batch_id         uuid NOT NULL REFERENCES batches (id) ON DELETE CASCADE,
    idx              integer NOT NULL,
    -- Resolved spec.
    model            text NOT NULL,
    prompt           text NOT NULL,
    negative_prompt  text NOT NULL,
    width            integer NOT NULL,
    height           integer NOT NULL,
    steps            integer NOT NULL,
    guidance         real NOT NULL,
    seed             bigint NOT NULL CHECK (seed >= 0),
    shift            double precision NOT NULL,
    text_encoders    text NOT NULL CHECK (text_encoders IN ('all', 'clip-only')),
    priority         integer NOT NULL,
    max_attempts     integer NOT NULL CHECK (max_attempts >= 1),
    labels           jsonb NOT NULL DEFAULT '{}',
    -- Life.
    state            text NOT NULL CHECK (state IN ('queued', 'dispatched', 'running', 'succeeded', 'failed', 'cancelled', 'dead')),
    attempt          integer NOT NULL DEFAULT 1,
    worker_id        uuid,
    lease_expires_at timestamptz,
    progress_step    integer NOT NULL DEFAULT 0,
    error            text,
    result_key       text,
    result_sha256    text,
    result_size      bigint,
    result_content_type text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    UNIQUE (batch_id, idx)
);

-- The dispatcher's scan: queued jobs of a model, highest priority, then oldest.
CREATE INDEX jobs_queued ON jobs (model, priority DESC, id) WHERE state = 'queued';
-- The reaper's scan.
CREATE INDEX jobs_leased ON jobs (lease_expires_at) WHERE state IN ('dispatched', 'running');
CREATE INDEX jobs_worker ON jobs (worker_id) WHERE state = 'running';
CREATE INDEX jobs_state_model ON jobs (state, model);
CREATE INDEX jobs_labels ON jobs USING gin (labels jsonb_path_ops);

-- Append-only history. No foreign key to jobs: checking one per row cost a third
-- of a 10,000-job submission; PgStore::purge_jobs deletes events with their jobs.
CREATE TABLE job_events (
    id          bigserial PRIMARY KEY,
    job_id      uuid NOT NULL,
    batch_id    uuid NOT NULL,
    from_state  text,
    to_state    text NOT NULL,
    attempt     integer NOT NULL,
    actor       text NOT NULL,
    reason      text NOT NULL DEFAULT '',
    at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX job_events_batch ON job_events (batch_id, id);
CREATE INDEX job_events_job ON job_events (job_id, id);

CREATE TABLE workers (
    id                uuid PRIMARY KEY,
    name              text NOT NULL,
    hostname          text NOT NULL,
    state             text NOT NULL CHECK (state IN ('active', 'draining', 'cordoned', 'lost', 'gone')),
    devices           jsonb NOT NULL DEFAULT '[]',
    models            text[] NOT NULL,
    text_encoder_sets text[] NOT NULL,
    capacity          integer NOT NULL,
    version           text NOT NULL DEFAULT '',
    images_done       bigint NOT NULL DEFAULT 0,
    gpu_seconds       double precision NOT NULL DEFAULT 0,
    registered_at     timestamptz NOT NULL DEFAULT now(),
    last_heartbeat_at timestamptz NOT NULL DEFAULT now()
);

-- Pauses: model '' is the global switch.
CREATE TABLE queue_state (
    model       text PRIMARY KEY,
    paused      boolean NOT NULL,
    reason      text NOT NULL DEFAULT '',
    updated_by  text NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
