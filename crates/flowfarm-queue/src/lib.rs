//! flowfarm's work queue: where the dispatcher puts "job J, attempt A is
//! ready" and workers take it from. A lane is a model and what a job of it
//! needs from a worker: `{model}` for jobs that use T5, `{model}:clip-only`
//! for jobs that do not. A worker reads only the lanes it can serve
//! ([`lane`]), so a job never reaches a worker without the encoders it needs.
//!
//! A message only says "job J, attempt A is ready": the job itself lives in
//! the store and a worker claims it with StartJob, which refuses duplicates.
//! So the queue may lose messages (Redis restarted or flushed: the
//! coordinator dispatches again what was never started) or deliver them
//! twice, and nothing is lost or done twice.
//!
//! Two sides, each a trait with two implementations that pass one
//! conformance suite (`tests/conformance.rs`):
//! - [`JobQueue`], the coordinator's side (publish, depth, sweep of
//!   messages whose reader died);
//! - [`JobSource`], a worker's side (blocking read, acknowledge).
//!
//! [`WorkQueue`] and [`Consumer`] are Redis Streams, one stream per lane
//! (`ff:jobs:{lane}`) read through one consumer group (`workers`), for a farm
//! across machines; Redis is reached at a [`RedisTarget`] (`redis://`, or
//! `rediss://` over TLS). [`MemoryQueue`] and its [`MemoryConsumer`]s keep
//! the same semantics inside one process, for a farm that runs in one.

mod memory;
mod streams;

use std::time::Duration;

use uuid::Uuid;

pub use memory::{MemoryConsumer, MemoryQueue};
pub use streams::{Consumer, Pinger, RedisTarget, WorkQueue, GROUP};

/// The stream of a lane's work.
pub fn stream_key(lane: &str) -> String {
    format!("ff:jobs:{lane}")
}

/// The lane of `model`'s jobs that use T5 (`needs_t5`) or only CLIP.
pub fn lane(model: &str, needs_t5: bool) -> String {
    if needs_t5 {
        model.to_owned()
    } else {
        format!("{model}:clip-only")
    }
}

/// What went wrong reaching the queue.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("redis {action}: {source}")]
    Redis { action: &'static str, source: redis::RedisError },
    #[error("redis URL {url}: {source}")]
    Url { url: String, source: redis::RedisError },
    #[error("redis CA file {path}: {source}")]
    Ca { path: std::path::PathBuf, source: std::io::Error },
    #[error("redis URL {url}: a CA file is given but the URL is plaintext; use rediss:// for TLS")]
    CaOnPlaintext { url: String },
}

/// One unit of work on a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobMessage {
    pub job_id: Uuid,
    /// The attempt the job was on when dispatched (informational: StartJob
    /// decides which attempt runs).
    pub attempt: u32,
}

/// A message as a worker received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// The lane it came from ([`lane`]).
    pub lane: String,
    /// The message's id in its lane, for [`JobSource::ack`].
    pub message_id: String,
    /// The job, or why the message could not be read (acknowledge and drop it).
    pub job: Result<JobMessage, String>,
}

/// The coordinator's side of the queue.
#[async_trait::async_trait]
pub trait JobQueue: Send + Sync + std::fmt::Debug {
    /// Appends one message per job to a lane, in order.
    ///
    /// # Errors
    /// [`QueueError`] if the queue cannot be reached; some messages may have been added.
    async fn publish(&self, lane: &str, jobs: &[JobMessage]) -> Result<(), QueueError>;

    /// Messages in a lane not yet acknowledged or swept.
    ///
    /// # Errors
    /// [`QueueError`] if the queue cannot be reached.
    async fn depth(&self, lane: &str) -> Result<u64, QueueError>;

    /// Removes messages of a lane that a reader took but has not
    /// acknowledged for longer than `idle` (a worker that died before
    /// acknowledging). The store decides what happens to their jobs; this
    /// only keeps the queue from growing. Returns how many were removed.
    ///
    /// # Errors
    /// [`QueueError`] if the queue cannot be reached.
    async fn sweep_pending(&self, lane: &str, idle: Duration) -> Result<u64, QueueError>;
}

/// A worker's side of the queue: one reader of its lanes. Each message goes
/// to one reader of all that read the lane; what it read stays pending until
/// acknowledged (or swept).
#[async_trait::async_trait]
pub trait JobSource: Send + Sync {
    /// Waits up to `block` for new messages, at most `count` from each lane.
    ///
    /// # Errors
    /// [`QueueError`] if the queue cannot be reached (call again).
    async fn read(&self, count: usize, block: Duration) -> Result<Vec<Delivery>, QueueError>;

    /// Acknowledges and deletes messages: their jobs are done, refused or dropped.
    ///
    /// # Errors
    /// [`QueueError`] if the queue cannot be reached; the messages then stay
    /// pending and the coordinator's sweep deals with them.
    async fn ack_many(&self, deliveries: &[Delivery]) -> Result<(), QueueError>;

    /// [`JobSource::ack_many`] for one message.
    ///
    /// # Errors
    /// As [`JobSource::ack_many`].
    async fn ack(&self, delivery: &Delivery) -> Result<(), QueueError> {
        self.ack_many(std::slice::from_ref(delivery)).await
    }
}
