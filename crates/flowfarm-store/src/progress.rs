//! Step progress between coordinators: a report taken by one coordinator
//! reaches the WatchBatch streams of all of them.
//!
//! [`PgStore::report_progress`] sends a notification on the `flowfarm_progress`
//! channel in the same statement that records the step, so it goes out when
//! (and only if) the step is committed; every coordinator listens on one
//! connection of its own. Progress is not part of the event log: a
//! notification sent while a listener reconnects is lost, and the job's
//! stored step is what a watcher that missed some reads instead.

use sqlx::postgres::PgListener;
use uuid::Uuid;

use crate::{PgStore, StoreError};

const CHANNEL: &str = "flowfarm_progress";

/// One step of one job's attempt.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct ProgressNote {
    #[serde(rename = "b")]
    pub batch_id: Uuid,
    #[serde(rename = "j")]
    pub job_id: Uuid,
    #[serde(rename = "a")]
    pub attempt: u32,
    #[serde(rename = "s")]
    pub step: u32,
    #[serde(rename = "t")]
    pub total_steps: u32,
}

/// A connection listening for progress notes; reconnects by itself.
pub struct ProgressListener(PgListener);

impl ProgressListener {
    /// The next note. A note sent while the connection was being
    /// re-established is not seen.
    ///
    /// # Errors
    /// [`StoreError::Database`] when the connection is lost and cannot be
    /// re-established now (call again to retry); [`StoreError::Corrupt`] for
    /// a payload this build does not understand.
    pub async fn recv(&mut self) -> Result<ProgressNote, StoreError> {
        let notification = self.0.recv().await?;
        serde_json::from_str(notification.payload())
            .map_err(|e| StoreError::Corrupt(format!("progress note `{}`: {e}", notification.payload())))
    }
}

impl PgStore {
    /// [`Store::listen_progress`](crate::Store::listen_progress) on Postgres.
    pub async fn listen_progress(&self) -> Result<ProgressListener, StoreError> {
        let mut listener = PgListener::connect_with(&self.pool).await?;
        listener.listen(CHANNEL).await?;
        Ok(ProgressListener(listener))
    }
}
