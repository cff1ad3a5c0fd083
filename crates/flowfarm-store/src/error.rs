use flowfarm_core::JobState;
use uuid::Uuid;

/// What can go wrong in the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database refused or could not be reached.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
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
    /// A value read from the database that the code does not understand
    /// (a schema newer than this build).
    #[error("corrupt row: {0}")]
    Corrupt(String),
}
