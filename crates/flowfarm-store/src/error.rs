use flowfarm_core::JobState;
use uuid::Uuid;

/// What can go wrong in the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database refused or could not be reached. `transient`: it says
    /// "not now" rather than "no" (unreachable, restarting, a lost race a
    /// retry may win), so callers retry.
    #[error("database error: {message}")]
    Database { message: String, transient: bool },
    #[error("migration failed: {0}")]
    Migrate(String),
    /// The batch, job or worker does not exist.
    #[error("{what} {id} not found")]
    NotFound { what: &'static str, id: Uuid },
    /// The idempotency key was used before for a batch with other content.
    #[error("idempotency key `{key}` was already used for batch {batch_id} with different content")]
    IdempotencyConflict { key: String, batch_id: Uuid },
    /// The job is not in a state that allows the operation (a duplicate
    /// StartJob, a report for an attempt that lost its lease, …).
    #[error("job {job_id} is {state} (attempt {attempt}{holder}): {why}")]
    WrongState { job_id: Uuid, state: JobState, attempt: u32, holder: String, why: String },
    /// StartJob by a worker that failed the job before, while another worker
    /// can take it: the job went back to the queue.
    #[error("job {job_id} goes to another worker: worker {worker_id} failed it before")]
    Declined { job_id: Uuid, worker_id: Uuid },
    /// A worker that was drained or lost.
    #[error("worker {worker_id} is {state}: {why}")]
    WorkerUnavailable { worker_id: Uuid, state: String, why: String },
    /// A tenant's quota refuses the submission; `quota` names the limit.
    #[error("quota {quota}: {detail}")]
    QuotaExceeded { quota: &'static str, detail: String },
    /// A caller's value the store cannot use; `field` names it.
    #[error("{field}: {why}")]
    InvalidArgument { field: &'static str, why: String },
    /// A value read from the database that the code does not understand
    /// (a schema newer than this build).
    #[error("corrupt row: {0}")]
    Corrupt(String),
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        StoreError::Database { transient: transient(&e), message: e.to_string() }
    }
}

impl From<sqlx::migrate::MigrateError> for StoreError {
    fn from(e: sqlx::migrate::MigrateError) -> Self {
        StoreError::Migrate(e.to_string())
    }
}

/// Whether a database error says "not now" rather than "no": the server is
/// unreachable, restarting or shutting down, or the statement lost a race
/// it may win when tried again.
fn transient(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::PoolClosed | sqlx::Error::Tls(_) => true,
        sqlx::Error::Protocol(_) | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            // Postgres: 08 connection exception; 57P01–57P03 shutdown, crash,
            // cannot connect now; 53 insufficient resources; 40001 / 40P01
            // serialization failure, deadlock.
            let postgres =
                code.starts_with("08") || code.starts_with("57P") || code.starts_with("53") || code == "40001" || code == "40P01";
            // SQLite: numeric codes whose primary code is BUSY (5) or LOCKED
            // (6): another process holds the file for now.
            let sqlite = code.parse::<i32>().is_ok_and(|n| matches!(n & 0xff, 5 | 6));
            postgres || sqlite
        }),
        _ => false,
    }
}
