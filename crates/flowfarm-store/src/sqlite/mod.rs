//! [`Store`](crate::Store) on SQLite: the farm on one machine (`flowfarm dev`),
//! in one file.
//!
//! Every write runs in a transaction on the one writer connection, so writes
//! are serial: a transaction reads the rows it moves, checks the move against
//! the [`Transition`](flowfarm_core::Transition) in Rust, and writes the rows
//! and their events back before the next write begins. Reads use a pool of
//! their own and see the last committed state (the file is in WAL mode, so
//! they do not wait for the writer).
//!
//! Invariants:
//! - Every job state change happens in a write transaction that loaded the
//!   job, checked the transition, and writes one `job_events` row with it.
//! - Event ids are in commit order (one writer, AUTOINCREMENT), so a log
//!   cursor is the last id read: an event committed later has a higher id.
//! - Progress notes go to this process's listeners after the step commits;
//!   there are no other coordinators to tell.
//!
//! Durability: WAL with `synchronous = NORMAL`. A crash of the process loses
//! nothing committed; a power cut may lose the last commits (Postgres with
//! its defaults would keep them), which one machine's farm accepts for the
//! write rate it gains.

mod access;
mod attempts;
mod fleet;
mod jobs;
mod log;
mod rows;
mod stats;
mod store_impl;
use std::path::Path;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{QueryBuilder, Sqlite, SqliteConnection, SqlitePool};
use tokio::sync::broadcast;

use crate::{JobSelector, ProgressNote, RetryBackoff, StoreError};
use rows::Live;

/// The embedded migrations of `migrations/sqlite/`.
pub static SQLITE_MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations/sqlite");

/// How many progress notes a slow listener may fall behind before it misses some.
const PROGRESS_BACKLOG: usize = 4096;

/// Handle to a farm database in one SQLite file; cheap to clone.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    /// The one connection every write goes through.
    writer: SqlitePool,
    readers: SqlitePool,
    backoff: RetryBackoff,
    progress: broadcast::Sender<ProgressNote>,
}

impl SqliteStore {
    /// Opens (creating it if missing) the database file at `path` and
    /// applies every migration not applied yet.
    ///
    /// # Errors
    /// [`StoreError::Database`] if the file cannot be opened or is not a
    /// SQLite database; [`StoreError::Migrate`] if it holds a migration this
    /// build does not know (a newer flowfarm wrote it).
    pub async fn open(path: &Path) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10));
        Self::with_options(options).await
    }

    async fn with_options(options: SqliteConnectOptions) -> Result<Self, StoreError> {
        let writer =
            SqlitePoolOptions::new().max_connections(1).acquire_timeout(Duration::from_secs(30)).connect_with(options.clone()).await?;
        SQLITE_MIGRATOR.run(&writer).await?;
        let readers = SqlitePoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(options.read_only(true))
            .await?;
        let (progress, _) = broadcast::channel(PROGRESS_BACKLOG);
        Ok(SqliteStore { writer, readers, backoff: RetryBackoff::NONE, progress })
    }

    /// The pool reads go through, for tests and tools.
    pub fn readers(&self) -> &SqlitePool {
        &self.readers
    }

    /// The pool of the one writer connection, for tests and tools.
    pub fn writer(&self) -> &SqlitePool {
        &self.writer
    }
}

/// The job columns [`Live::decode`] reads.
const LIVE_COLUMNS: &str = "id, batch_id, idx, model, prompt, negative_prompt, width, height, steps, guidance, seed, shift, \
    text_encoders, priority, max_attempts, labels, state, attempt, worker_id, lease_expires_at, progress_step, error, \
    result_key, result_sha256, result_size, result_content_type, result_model_hash, gpu_seconds, failed_workers, \
    dispatched_at, not_before, started_at, tile_vae, created_at, updated_at";

/// The jobs `filter` selects (it appends conditions after `WHERE`) and
/// `tail` orders or limits.
async fn select_live(
    conn: &mut SqliteConnection,
    filter: impl FnOnce(&mut QueryBuilder<'_, Sqlite>),
    tail: &str,
) -> Result<Vec<Live>, StoreError> {
    let mut qb = QueryBuilder::new(format!("SELECT {LIVE_COLUMNS} FROM jobs WHERE "));
    filter(&mut qb);
    qb.push(" ").push(tail);
    let rows = qb.build().fetch_all(&mut *conn).await?;
    rows.iter().map(Live::decode).collect()
}

/// `id IN (…)` of `ids`.
fn push_ids(qb: &mut QueryBuilder<'_, Sqlite>, ids: impl Iterator<Item = uuid::Uuid>) {
    qb.push("id IN (");
    let mut list = qb.separated(", ");
    for id in ids {
        list.push_bind(id);
    }
    list.push_unseparated(")");
}

/// Jobs by id.
fn by_id(jobs: Vec<Live>) -> std::collections::HashMap<uuid::Uuid, Live> {
    jobs.into_iter().map(|live| (live.job.id, live)).collect()
}

fn push_selector(qb: &mut QueryBuilder<'_, Sqlite>, selector: &JobSelector) {
    match selector {
        JobSelector::Ids(ids) => push_ids(qb, ids.iter().copied()),
        JobSelector::Batch(batch) => {
            qb.push("batch_id = ").push_bind(*batch);
        }
    }
}

fn push_states(qb: &mut QueryBuilder<'_, Sqlite>, states: &[flowfarm_core::JobState]) {
    qb.push("state IN (");
    let mut list = qb.separated(", ");
    for state in states {
        list.push_bind(state.as_str());
    }
    list.push_unseparated(")");
}
