//! A batch's event log on SQLite. Writes are serial and event ids are
//! taken in commit order, so the position of a reader is the last event id
//! it has (a sequence cursor): every event committed later has a higher id.
//! A read pins the log's end in the same read transaction as the counts it
//! returns, so counts plus the events up to that end are the batch then.

use sqlx::SqliteConnection;
use uuid::Uuid;

use super::jobs::{batch_in, counts_in};
use super::rows::event_from_row;
use super::SqliteStore;
use crate::events::{foreign_cursor, SequencePosition};
use crate::{BatchRow, LogCursor, LogPage, StoreError};

/// The highest event id ever given (deleted events included).
async fn log_end(conn: &mut SqliteConnection) -> Result<i64, StoreError> {
    Ok(sqlx::query_scalar::<_, i64>("SELECT COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'job_events'), 0)")
        .fetch_one(&mut *conn)
        .await?)
}

pub(super) async fn batch_with_cursor(s: &SqliteStore, id: Uuid) -> Result<(BatchRow, LogCursor), StoreError> {
    let mut tx = s.readers.begin().await?;
    let batch = batch_in(&mut tx, id).await?;
    let end = log_end(&mut tx).await?;
    tx.commit().await?;
    Ok((batch, LogCursor::sequence(SequencePosition { seen: end, reading: None })))
}

pub(super) async fn read_batch_log(
    s: &SqliteStore,
    batch_id: Uuid,
    cursor: &LogCursor,
    limit: u32,
    want_counts: bool,
) -> Result<LogPage, StoreError> {
    let position = cursor.as_sequence().ok_or_else(foreign_cursor)?;
    let limit = limit.max(1);
    let mut tx = s.readers.begin().await?;
    let (upto, after) = match position.reading {
        Some(reading) => reading,
        None => (log_end(&mut tx).await?, position.seen),
    };
    let counts_at_end = if want_counts && position.reading.is_none() { Some(counts_in(&mut tx, batch_id).await?) } else { None };
    let rows = sqlx::query(
        "SELECT id, job_id, batch_id, from_state, to_state, attempt, actor, reason, at, gpu_seconds FROM job_events \
         WHERE batch_id = ? AND id > ? AND id <= ? ORDER BY id LIMIT ?",
    )
    .bind(batch_id)
    .bind(after)
    .bind(upto)
    .bind(i64::from(limit))
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    let mut events = Vec::with_capacity(rows.len());
    for row in &rows {
        let event = event_from_row(row)?;
        let after = LogCursor::sequence(SequencePosition { seen: position.seen, reading: Some((upto, event.id)) });
        events.push((event, after));
    }
    let read_complete = events.len() < limit as usize;
    let cursor = if read_complete {
        LogCursor::sequence(SequencePosition { seen: upto, reading: None })
    } else {
        events.last().map(|(_, c)| c.clone()).unwrap_or_else(|| cursor.clone())
    };
    Ok(LogPage { events, cursor, read_complete, counts_at_end })
}
