//! The queue on Redis Streams: one stream per lane, `ff:jobs:{lane}`, read
//! through one consumer group, so that each message goes to one worker.

use std::path::PathBuf;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::streams::{StreamAutoClaimReply, StreamId, StreamReadOptions, StreamReadReply};
use redis::{AsyncCommands, RedisError};
use uuid::Uuid;

use crate::{stream_key, Delivery, JobMessage, JobQueue, JobSource, QueueError};

/// The consumer group every worker reads through.
pub const GROUP: &str = "workers";

fn redis_error(action: &'static str) -> impl FnOnce(RedisError) -> QueueError {
    move |source| QueueError::Redis { action, source }
}

/// Where Redis is: `redis://host:port/db`, or `rediss://…` for TLS, whose
/// certificate is checked against `ca_file` (PEM) when given, else against
/// the system's roots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisTarget {
    pub url: String,
    pub ca_file: Option<PathBuf>,
}

impl From<&str> for RedisTarget {
    fn from(url: &str) -> Self {
        RedisTarget { url: url.to_owned(), ca_file: None }
    }
}

impl From<&String> for RedisTarget {
    fn from(url: &String) -> Self {
        RedisTarget::from(url.as_str())
    }
}

fn client(target: &RedisTarget) -> Result<redis::Client, QueueError> {
    let url_error = |source| QueueError::Url { url: target.url.clone(), source };
    match &target.ca_file {
        None => redis::Client::open(target.url.as_str()).map_err(url_error),
        Some(ca) => {
            if !target.url.starts_with("rediss://") {
                return Err(QueueError::CaOnPlaintext { url: target.url.clone() });
            }
            let root_cert = std::fs::read(ca).map_err(|source| QueueError::Ca { path: ca.clone(), source })?;
            let certs = redis::TlsCertificates { client_tls: None, root_cert: Some(root_cert) };
            redis::Client::build_with_tls(target.url.as_str(), certs).map_err(url_error)
        }
    }
}

async fn manager(target: &RedisTarget, response_timeout: Option<Duration>) -> Result<ConnectionManager, QueueError> {
    let config = ConnectionManagerConfig::new()
        .set_response_timeout(response_timeout)
        .set_connection_timeout(Some(Duration::from_secs(5)))
        .set_max_delay(Duration::from_secs(2));
    ConnectionManager::new_with_config(client(target)?, config).await.map_err(redis_error("connect"))
}

/// Creates a lane's stream and group if missing. The group starts at the
/// stream's beginning, so messages added before it existed (after a flush,
/// by a coordinator that got there first) are still delivered.
async fn ensure_group(conn: &mut ConnectionManager, lane: &str) -> Result<(), QueueError> {
    let created: Result<(), RedisError> = conn.xgroup_create_mkstream(stream_key(lane), GROUP, "0").await;
    match created {
        Err(e) if e.code() != Some("BUSYGROUP") => Err(QueueError::Redis { action: "XGROUP CREATE", source: e }),
        _ => Ok(()),
    }
}

/// Asks a Redis whether it answers (health checks), on a connection of its
/// own, so a ping never waits behind queued work commands. The connection is
/// kept between pings and opened again after a failure.
pub struct Pinger {
    client: redis::Client,
    conn: Option<redis::aio::MultiplexedConnection>,
}

impl Pinger {
    /// # Errors
    /// [`QueueError::Url`] for a malformed URL, [`QueueError::Ca`] for a CA file that cannot be read.
    pub fn new(target: impl Into<RedisTarget>) -> Result<Self, QueueError> {
        Ok(Pinger { client: client(&target.into())?, conn: None })
    }

    /// PING.
    ///
    /// # Errors
    /// [`QueueError`] if Redis cannot be reached or does not answer.
    pub async fn ping(&mut self) -> Result<(), QueueError> {
        let conn = match &mut self.conn {
            Some(conn) => conn,
            None => self.conn.insert(self.client.get_multiplexed_async_connection().await.map_err(redis_error("connect"))?),
        };
        let answer = redis::cmd("PING").query_async::<String>(conn).await.map_err(redis_error("PING"));
        if answer.is_err() {
            self.conn = None;
        }
        answer.map(drop)
    }
}

/// The coordinator's side of the queue. Cheap to clone; reconnects by itself.
#[derive(Clone)]
pub struct WorkQueue {
    conn: ConnectionManager,
}

impl std::fmt::Debug for WorkQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkQueue").finish_non_exhaustive()
    }
}

impl WorkQueue {
    /// Connects to `target` (a URL, `redis://host:port/db`, or a [`RedisTarget`]).
    ///
    /// # Errors
    /// [`QueueError`] if the URL is malformed or Redis cannot be reached.
    pub async fn connect(target: impl Into<RedisTarget>) -> Result<Self, QueueError> {
        Ok(WorkQueue { conn: manager(&target.into(), Some(Duration::from_secs(5))).await? })
    }
}

#[async_trait::async_trait]
impl JobQueue for WorkQueue {
    /// Appends one message per job to a lane's stream, in order, in one round trip.
    ///
    /// # Errors
    /// [`QueueError::Redis`] if Redis is away; some messages may have been added.
    async fn publish(&self, lane: &str, jobs: &[JobMessage]) -> Result<(), QueueError> {
        if jobs.is_empty() {
            return Ok(());
        }
        let mut conn = self.conn.clone();
        ensure_group(&mut conn, lane).await?;
        let key = stream_key(lane);
        let mut pipe = redis::pipe();
        for job in jobs {
            pipe.xadd(&key, "*", &[("job", job.job_id.to_string()), ("attempt", job.attempt.to_string())]).ignore();
        }
        pipe.query_async::<()>(&mut conn).await.map_err(redis_error("XADD"))
    }

    /// Messages in a lane's stream not yet acknowledged or swept.
    ///
    /// # Errors
    /// [`QueueError::Redis`] if Redis is away.
    async fn depth(&self, lane: &str) -> Result<u64, QueueError> {
        let mut conn = self.conn.clone();
        conn.xlen(stream_key(lane)).await.map_err(redis_error("XLEN"))
    }

    /// Acknowledges and deletes messages of a lane that a consumer read but
    /// has not acknowledged for longer than `idle` (a worker that died
    /// before acknowledging). Postgres decides what happens to their jobs;
    /// this only keeps Redis from growing. Returns how many were removed.
    ///
    /// # Errors
    /// [`QueueError::Redis`] if Redis is away.
    async fn sweep_pending(&self, lane: &str, idle: Duration) -> Result<u64, QueueError> {
        let mut conn = self.conn.clone();
        let key = stream_key(lane);
        let exists: bool = conn.exists(&key).await.map_err(redis_error("EXISTS"))?;
        if !exists {
            return Ok(0);
        }
        ensure_group(&mut conn, lane).await?;
        let mut removed = 0;
        let mut start = "0-0".to_owned();
        loop {
            let reply: StreamAutoClaimReply = redis::cmd("XAUTOCLAIM")
                .arg(&key)
                .arg(GROUP)
                .arg("coordinator-sweeper")
                .arg(idle.as_millis() as u64)
                .arg(&start)
                .arg("COUNT")
                .arg(500)
                .arg("JUSTID")
                .query_async(&mut conn)
                .await
                .map_err(redis_error("XAUTOCLAIM"))?;
            let ids: Vec<&str> = reply.claimed.iter().map(|c| c.id.as_str()).collect();
            if !ids.is_empty() {
                let mut pipe = redis::pipe();
                pipe.xack(&key, GROUP, &ids).ignore().xdel(&key, &ids).ignore();
                pipe.query_async::<()>(&mut conn).await.map_err(redis_error("XACK"))?;
                removed += ids.len() as u64;
            }
            if reply.next_stream_id == "0-0" {
                return Ok(removed);
            }
            start = reply.next_stream_id;
        }
    }
}

/// A worker's reader of its lanes' streams. Reconnects by itself; a read
/// after Redis lost its data recreates the groups. Clones share the
/// connections: one task reads, any may acknowledge.
#[derive(Clone)]
pub struct Consumer {
    /// Blocking reads only: Redis answers a connection's commands in order,
    /// so an acknowledgement behind a blocked read would wait for it.
    reader: ConnectionManager,
    writer: ConnectionManager,
    name: String,
    lanes: Vec<String>,
    keys: Vec<String>,
}

impl Consumer {
    /// Connects to `target` as consumer `name` (unique per worker) reading `lanes`.
    ///
    /// # Errors
    /// [`QueueError`] if the URL is malformed or Redis cannot be reached.
    pub async fn connect(target: impl Into<RedisTarget>, name: &str, lanes: &[String]) -> Result<Self, QueueError> {
        let target = target.into();
        // No response timeout: XREADGROUP BLOCK holds the reply back on purpose.
        let reader = manager(&target, None).await?;
        let mut writer = manager(&target, Some(Duration::from_secs(5))).await?;
        for lane in lanes {
            ensure_group(&mut writer, lane).await?;
        }
        Ok(Consumer { reader, writer, name: name.to_owned(), keys: lanes.iter().map(|l| stream_key(l)).collect(), lanes: lanes.to_vec() })
    }
}

#[async_trait::async_trait]
impl JobSource for Consumer {
    /// Waits up to `block` for new messages, at most `count` from each lane's stream.
    ///
    /// # Errors
    /// [`QueueError::Redis`] if Redis is away (call again: it reconnects).
    async fn read(&self, count: usize, block: Duration) -> Result<Vec<Delivery>, QueueError> {
        let options = StreamReadOptions::default().group(GROUP, &self.name).count(count.max(1)).block(block.as_millis().max(1) as usize);
        let ids = vec![">"; self.keys.len()];
        let reply: Result<Option<StreamReadReply>, RedisError> = self.reader.clone().xread_options(&self.keys, &ids, &options).await;
        let reply = match reply {
            Err(e) if e.code() == Some("NOGROUP") => {
                tracing::warn!("work streams are gone (Redis restarted or flushed?): creating them again");
                let mut writer = self.writer.clone();
                for lane in &self.lanes {
                    ensure_group(&mut writer, lane).await?;
                }
                return Ok(Vec::new());
            }
            other => other.map_err(redis_error("XREADGROUP"))?,
        };
        let mut out = Vec::new();
        for stream in reply.map(|r| r.keys).unwrap_or_default() {
            let lane = stream.key.strip_prefix("ff:jobs:").unwrap_or(&stream.key).to_owned();
            for entry in stream.ids {
                out.push(Delivery { lane: lane.clone(), job: parse_message(&entry), message_id: entry.id });
            }
        }
        Ok(out)
    }

    /// One round trip: one XACK and one XDEL per stream.
    ///
    /// # Errors
    /// [`QueueError::Redis`] if Redis cannot be reached; the messages then
    /// stay pending and the coordinator's sweep deals with them.
    async fn ack_many(&self, deliveries: &[Delivery]) -> Result<(), QueueError> {
        let mut by_stream: std::collections::BTreeMap<String, Vec<&str>> = std::collections::BTreeMap::new();
        for d in deliveries {
            by_stream.entry(stream_key(&d.lane)).or_default().push(d.message_id.as_str());
        }
        if by_stream.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for (key, ids) in &by_stream {
            pipe.xack(key, GROUP, ids).ignore().xdel(key, ids).ignore();
        }
        pipe.query_async::<()>(&mut self.writer.clone()).await.map_err(redis_error("XACK"))
    }
}

fn parse_message(entry: &StreamId) -> Result<JobMessage, String> {
    let job: String = entry.get("job").ok_or("no `job` field")?;
    let job_id = Uuid::parse_str(&job).map_err(|e| format!("job `{job}`: {e}"))?;
    let attempt: String = entry.get("attempt").ok_or("no `attempt` field")?;
    let attempt = attempt.parse().map_err(|e| format!("attempt `{attempt}`: {e}"))?;
    Ok(JobMessage { job_id, attempt })
}
