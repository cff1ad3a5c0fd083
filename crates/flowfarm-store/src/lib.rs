//! Persistence for flowfarm: batches, jobs, job events, workers, queue
//! pauses and API tokens.
//!
//! [`Store`] is the contract the coordinator works through (`store.rs`);
//! [`PgStore`] implements it on Postgres (`postgres.rs`, over the statements
//! in `jobs/`, `events.rs`, `workers.rs`, `tokens.rs`, …), for a farm of many
//! machines; [`SqliteStore`] on one SQLite file (`sqlite/`), for a farm in
//! one process (`flowfarm dev`). In both, a job changes state only where the
//! [`Transition`](flowfarm_core::Transition) allows it, checked in the
//! statement (Postgres) or the write transaction (SQLite) that moves the rows
//! and writes their `job_events` rows, so the state machine holds whatever
//! callers do.
//!
//! Schema changes live in the repository's `migrations/postgres/` and
//! `migrations/sqlite/` (one folder per store) and are embedded in the
//! binary; [`PgStore::migrate`] and [`SqliteStore::open`] apply them.

mod error;
mod events;
mod jobs;
mod postgres;
mod progress;
mod rows;
mod sqlite;
mod store;
mod tenants;
mod tokens;
mod workers;

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;

pub use error::StoreError;
pub use events::{LogCursor, LogPage};
pub use jobs::{Completion, FailureCause, JobFilter, JobSelector, NewBatch, SubmitOutcome};
pub use progress::{ProgressListener, ProgressNote};
pub use rows::{BatchRow, EventRow, JobCounts, JobResultRow, JobRow, ModelStats, QueuePause, WorkerRow};
pub use sqlite::{SqliteStore, SQLITE_MIGRATOR};
pub use store::{ProgressSource, Store};
pub use tokens::{check_token_name, NewToken, Quotas, TokenInfo, MAX_TOKEN_NAME, TOKEN_PREFIX};
pub use workers::{HeartbeatOutcome, NewWorker};

/// The embedded migrations of `migrations/postgres/`.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations/postgres");

/// Handle to the farm's Postgres database; cheap to clone (a connection pool).
#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
    backoff: RetryBackoff,
}

/// How long a retried job waits before it is dispatched again: `base · 2^(n−1)`
/// after its n-th failed attempt, at most `max`, times a random factor in
/// [0.5, 1] so that jobs failed together do not come back together.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryBackoff {
    pub base: Duration,
    pub max: Duration,
}

impl RetryBackoff {
    /// Retried jobs may be dispatched at once.
    pub const NONE: RetryBackoff = RetryBackoff { base: Duration::ZERO, max: Duration::ZERO };
}

impl PgStore {
    /// Connects a pool of at most `max_connections` to `url`
    /// (`postgres://user@host:port/db`).
    ///
    /// # Errors
    /// [`StoreError::Database`] if the URL is malformed or the server cannot be reached
    /// within 10 seconds.
    pub async fn connect(url: &str, max_connections: u32) -> Result<Self, StoreError> {
        let options: PgConnectOptions = url.parse()?;
        let pool =
            PgPoolOptions::new().max_connections(max_connections).acquire_timeout(Duration::from_secs(10)).connect_with(options).await?;
        Ok(PgStore { pool, backoff: RetryBackoff::NONE })
    }

    /// Creates the database named in `url` if it does not exist yet.
    ///
    /// # Errors
    /// [`StoreError::Database`] if the server cannot be reached or refuses.
    pub async fn create_database_if_missing(url: &str) -> Result<(), StoreError> {
        use sqlx::migrate::MigrateDatabase;
        if !sqlx::Postgres::database_exists(url).await? {
            sqlx::Postgres::create_database(url).await?;
        }
        Ok(())
    }

    /// [`Store::ping`](crate::Store::ping) on Postgres.
    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// Wraps an existing pool.
    pub fn from_pool(pool: PgPool) -> Self {
        PgStore { pool, backoff: RetryBackoff::NONE }
    }

    /// The same store, with retried jobs held back by `backoff`
    /// ([`RetryBackoff::NONE`] unless set).
    pub fn with_retry_backoff(mut self, backoff: RetryBackoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// The underlying pool, for tests and tools.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Applies every migration not applied yet; safe to run concurrently
    /// (sqlx takes an advisory lock).
    ///
    /// # Errors
    /// [`StoreError::Migrate`] if a migration fails or the database holds a
    /// migration this build does not know.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        MIGRATOR.run(&self.pool).await?;
        Ok(())
    }
}
