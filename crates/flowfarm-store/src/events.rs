//! A batch's `job_events` read as a log: every committed event exactly once,
//! each job's events in the order they were committed.
//!
//! Event ids come from a sequence when a row is inserted, and transactions
//! commit in another order, so "ids above the last one read" loses an event
//! that commits late behind a higher id. Instead, each event records the id of
//! the transaction that wrote it (`xid`), and a reader's position is the
//! Postgres snapshot it last read under ([`LogCursor`]): the next read
//! returns the events whose transaction that snapshot did not see and a newer
//! snapshot does. A transaction is either visible in a snapshot or not, and
//! once visible stays visible, so nothing is skipped and nothing comes twice.
//!
//! That is the Postgres form of a cursor. A store whose writes commit one
//! after another, in id order (SQLite's single writer), has no late commits:
//! its cursor is the last event id delivered (`@ID`, or `@ID/UPTO/AFTER` in
//! the middle of a read). A cursor of the other kind is refused as
//! INVALID_ARGUMENT (`after`), not misread.
//!
//! Invariant: one job's events are ordered by id within a read. Every state
//! change locks the job's row before it inserts its event, so a later change
//! of the same job takes its event id after the earlier one committed; and
//! an event read under one snapshot committed before every event read under
//! the next one.

use std::fmt;

use sqlx::Row;
use uuid::Uuid;

use crate::rows::{parse_state, JobCounts};
use crate::{BatchRow, EventRow, PgStore, StoreError};

/// A Postgres snapshot (`pg_snapshot` text form, `xmin:xmax:xip,…`), checked
/// to be one before it is sent back to the database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot(String);

impl Snapshot {
    fn parse(text: &str) -> Option<Snapshot> {
        let mut parts = text.split(':');
        let (xmin, xmax, xip) = (parts.next()?, parts.next()?, parts.next()?);
        let number = |s: &str| !s.is_empty() && s.len() <= 20 && s.bytes().all(|b| b.is_ascii_digit());
        let ok = parts.next().is_none() && number(xmin) && number(xmax) && (xip.is_empty() || xip.split(',').all(number));
        ok.then(|| Snapshot(text.to_owned()))
    }
}

/// Where a reader of a batch's log stands. Its text form (`Display`,
/// [`LogCursor::parse`]) is what clients hold to resume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogCursor(Position);

/// The two kinds of position: Postgres commits out of id order, so its
/// readers hold snapshots; a store whose writes commit one after another in
/// id order (SQLite's single writer) holds event ids.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Position {
    Snapshot {
        /// Every event of a transaction this snapshot saw has been delivered.
        seen: Snapshot,
        /// A read in progress: of the events `seen` missed and this snapshot
        /// sees, those with ids up to the second field have been delivered.
        reading: Option<(Snapshot, i64)>,
    },
    Sequence(SequencePosition),
}

/// A position in a log whose event ids are in commit order: every event with
/// an id up to `seen` has been delivered; during a read, the read's events
/// are those up to `reading.0`, and those up to `reading.1` are delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SequencePosition {
    pub(crate) seen: i64,
    pub(crate) reading: Option<(i64, i64)>,
}

/// Text form of a sequence cursor: `@SEEN` or `@SEEN/UPTO/AFTER`.
const SEQUENCE_MARK: char = '@';

impl LogCursor {
    /// Parses a cursor this module wrote; None for anything else.
    pub fn parse(text: &str) -> Option<LogCursor> {
        if let Some(rest) = text.strip_prefix(SEQUENCE_MARK) {
            let id = |s: &str| s.parse::<i64>().ok().filter(|id| *id >= 0 && !s.starts_with('+'));
            let mut parts = rest.split('/');
            let seen = id(parts.next()?)?;
            let reading = match (parts.next(), parts.next()) {
                (None, _) => None,
                (Some(upto), Some(after)) => Some((id(upto)?, id(after)?)),
                (Some(_), None) => return None,
            };
            return parts.next().is_none().then_some(LogCursor(Position::Sequence(SequencePosition { seen, reading })));
        }
        let mut parts = text.split('/');
        let seen = Snapshot::parse(parts.next()?)?;
        let reading = match (parts.next(), parts.next()) {
            (None, _) => None,
            (Some(upto), Some(after)) => Some((Snapshot::parse(upto)?, after.parse::<i64>().ok().filter(|id| *id >= 0)?)),
            (Some(_), None) => return None,
        };
        parts.next().is_none().then_some(LogCursor(Position::Snapshot { seen, reading }))
    }

    pub(crate) fn sequence(position: SequencePosition) -> LogCursor {
        LogCursor(Position::Sequence(position))
    }

    /// The position of a sequence cursor; None for a snapshot one.
    pub(crate) fn as_sequence(&self) -> Option<SequencePosition> {
        match &self.0 {
            Position::Sequence(position) => Some(*position),
            Position::Snapshot { .. } => None,
        }
    }

    fn snapshot(seen: Snapshot, reading: Option<(Snapshot, i64)>) -> LogCursor {
        LogCursor(Position::Snapshot { seen, reading })
    }
}

/// The refusal of a cursor another kind of store issued (the farm moved
/// stores under a client that kept its cursor).
pub(crate) fn foreign_cursor() -> StoreError {
    StoreError::InvalidArgument { field: "after", why: "a cursor from another farm's store; start a new watch without one".into() }
}

impl fmt::Display for LogCursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Position::Snapshot { seen, reading: None } => write!(f, "{}", seen.0),
            Position::Snapshot { seen, reading: Some((upto, after)) } => write!(f, "{}/{}/{after}", seen.0, upto.0),
            Position::Sequence(SequencePosition { seen, reading: None }) => write!(f, "{SEQUENCE_MARK}{seen}"),
            Position::Sequence(SequencePosition { seen, reading: Some((upto, after)) }) => {
                write!(f, "{SEQUENCE_MARK}{seen}/{upto}/{after}")
            }
        }
    }
}

/// One page of a batch's log.
#[derive(Debug, Clone)]
pub struct LogPage {
    /// In delivery order, each with the cursor just after it.
    pub events: Vec<(EventRow, LogCursor)>,
    /// Where the reader stands after the page.
    pub cursor: LogCursor,
    /// True when the read this page belongs to is delivered whole.
    pub read_complete: bool,
    /// The batch's counts as of the end of this read, when asked for and the
    /// page starts a read (they come from the same snapshot as the events).
    pub counts_at_end: Option<JobCounts>,
}

fn counts_from_json(value: serde_json::Value) -> Result<JobCounts, StoreError> {
    let mut counts = JobCounts::default();
    let map = value.as_object().ok_or_else(|| StoreError::Corrupt(format!("counts {value}")))?;
    for (state, n) in map {
        let n = n.as_u64().ok_or_else(|| StoreError::Corrupt(format!("count {n} of {state}")))?;
        counts.add(parse_state(state)?, n);
    }
    Ok(counts)
}

const COUNTS_SQL: &str = "(SELECT COALESCE(jsonb_object_agg(state, n), '{}'::jsonb) \
     FROM (SELECT state, count(*) AS n FROM jobs WHERE batch_id = $1 GROUP BY state) c)";

impl PgStore {
    /// [`Store::batch_with_cursor`](crate::Store::batch_with_cursor) on Postgres.
    pub async fn batch_with_cursor(&self, id: Uuid) -> Result<(BatchRow, LogCursor), StoreError> {
        let row = sqlx::query(&format!(
            "SELECT id, submitter, idempotency_key, labels, total_jobs, created_at, \
                    {COUNTS_SQL} AS counts, pg_current_snapshot()::text AS snap, \
                    (SELECT COALESCE(sum(gpu_seconds), 0) FROM jobs WHERE batch_id = batches.id) AS gpu_seconds \
             FROM batches WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?
        .ok_or(StoreError::NotFound { what: "batch", id })?;
        let snap: String = row.try_get("snap")?;
        let seen = Snapshot::parse(&snap).ok_or_else(|| StoreError::Corrupt(format!("snapshot {snap}")))?;
        let batch = BatchRow {
            id: row.try_get("id")?,
            submitter: row.try_get("submitter")?,
            idempotency_key: row.try_get("idempotency_key")?,
            labels: crate::rows::labels_from_json(row.try_get("labels")?)?,
            total_jobs: row.try_get::<i32, _>("total_jobs")? as u64,
            created_at: row.try_get("created_at")?,
            counts: counts_from_json(row.try_get("counts")?)?,
            gpu_seconds: row.try_get("gpu_seconds")?,
        };
        Ok((batch, LogCursor::snapshot(seen, None)))
    }

    /// [`Store::read_batch_log`](crate::Store::read_batch_log) on Postgres.
    pub async fn read_batch_log(&self, batch_id: Uuid, cursor: &LogCursor, limit: u32, want_counts: bool) -> Result<LogPage, StoreError> {
        let Position::Snapshot { seen, reading } = &cursor.0 else {
            return Err(foreign_cursor());
        };
        let (upto, after) = match reading {
            Some((upto, after)) => (Some(upto.0.clone()), *after),
            None => (None, 0),
        };
        let rows = sqlx::query(&format!(
            "WITH s AS (SELECT COALESCE($2::text::pg_snapshot, pg_current_snapshot()) AS upto) \
             SELECT s.upto::text AS upto, CASE WHEN $5 THEN {COUNTS_SQL} END AS counts, \
                    e.id, e.job_id, e.batch_id, e.from_state, e.to_state, e.attempt, e.actor, e.reason, e.at, e.gpu_seconds \
             FROM s LEFT JOIN LATERAL ( \
                 SELECT * FROM job_events e WHERE e.batch_id = $1 \
                     AND e.xid >= pg_snapshot_xmin($3::text::pg_snapshot) \
                     AND NOT pg_visible_in_snapshot(e.xid, $3::text::pg_snapshot) \
                     AND pg_visible_in_snapshot(e.xid, s.upto) AND e.id > $4 \
                 ORDER BY e.id LIMIT $6) e ON TRUE"
        ))
        .bind(batch_id)
        .bind(upto.as_deref())
        .bind(&seen.0)
        .bind(after)
        .bind(want_counts && reading.is_none())
        .bind(i64::from(limit.max(1)))
        .fetch_all(&self.pool)
        .await?;
        let first = rows.first().ok_or_else(|| StoreError::Corrupt("the log read returned no row".into()))?;
        let upto_text: String = first.try_get("upto")?;
        let upto = Snapshot::parse(&upto_text).ok_or_else(|| StoreError::Corrupt(format!("snapshot {upto_text}")))?;
        let counts_at_end = first.try_get::<Option<serde_json::Value>, _>("counts")?.map(counts_from_json).transpose()?;
        let mut events = Vec::with_capacity(rows.len());
        for row in &rows {
            if row.try_get::<Option<i64>, _>("id")?.is_none() {
                continue; // the LEFT JOIN's row when there is nothing to read
            }
            let event = EventRow::from_row(row)?;
            let after = LogCursor::snapshot(seen.clone(), Some((upto.clone(), event.id)));
            events.push((event, after));
        }
        let read_complete = events.len() < limit.max(1) as usize;
        let cursor = if read_complete {
            LogCursor::snapshot(upto, None)
        } else {
            events.last().map(|(_, c)| c.clone()).unwrap_or_else(|| cursor.clone())
        };
        Ok(LogPage { events, cursor, read_complete, counts_at_end })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_through_text() {
        for text in ["10:12:", "10:12:10,11", "10:12:/10:15:13/42", "5:5:/9:9:/0", "@0", "@17", "@17/40/23"] {
            let cursor = LogCursor::parse(text).unwrap_or_else(|| panic!("{text}"));
            assert_eq!(cursor.to_string(), text);
        }
    }

    #[test]
    fn anything_else_is_not_a_cursor() {
        for text in [
            "",
            "10:12",
            "a:b:",
            "10:12:/10:15:",
            "10:12:/10:15:/-1",
            "10:12:/x/1",
            "10:12:; DROP TABLE jobs",
            "1:2:3/1:2:3/4/5",
            "@",
            "@-1",
            "@+1",
            "@1/2",
            "@1/2/x",
            "@1/2/3/4",
            "@a",
        ] {
            assert!(LogCursor::parse(text).is_none(), "{text}");
        }
    }
}
