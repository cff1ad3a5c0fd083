//! The queue inside one process: the same semantics as the Redis Streams
//! one (each message to one reader of its lane, in order; pending until
//! acknowledged; swept when its reader went quiet), for a coordinator and
//! workers that share a process. Nothing survives the process, which the
//! queue's contract allows: the coordinator dispatches again whatever was
//! dispatched and never started.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::{Delivery, JobMessage, JobQueue, JobSource, QueueError};

/// A message taken by a reader and not yet acknowledged.
#[derive(Debug)]
struct Pending {
    delivered_at: Instant,
}

#[derive(Debug, Default)]
struct Lane {
    /// Not yet read, oldest first, by message id.
    waiting: VecDeque<(u64, JobMessage)>,
    /// Read and not yet acknowledged, by message id.
    pending: BTreeMap<u64, Pending>,
}

#[derive(Debug, Default)]
struct State {
    next_id: u64,
    lanes: HashMap<String, Lane>,
}

#[derive(Debug, Default)]
struct Shared {
    state: Mutex<State>,
    /// Woken on every publish, so blocked readers look again.
    published: Notify,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        // Every critical section leaves the state whole: a panic elsewhere
        // while holding the lock does not make it unusable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The coordinator's side; [`MemoryQueue::consumer`] makes the workers'.
/// Cheap to clone: clones are the same queue.
#[derive(Debug, Clone, Default)]
pub struct MemoryQueue {
    shared: Arc<Shared>,
}

impl MemoryQueue {
    pub fn new() -> Self {
        MemoryQueue::default()
    }

    /// A reader of `lanes` (a worker).
    pub fn consumer(&self, lanes: &[String]) -> MemoryConsumer {
        MemoryConsumer { shared: self.shared.clone(), lanes: lanes.to_vec() }
    }
}

#[async_trait::async_trait]
impl JobQueue for MemoryQueue {
    async fn publish(&self, lane: &str, jobs: &[JobMessage]) -> Result<(), QueueError> {
        if jobs.is_empty() {
            return Ok(());
        }
        {
            let mut state = self.shared.state();
            let State { next_id, lanes } = &mut *state;
            let lane = lanes.entry(lane.to_owned()).or_default();
            for job in jobs {
                *next_id += 1;
                lane.waiting.push_back((*next_id, *job));
            }
        }
        self.shared.published.notify_waiters();
        Ok(())
    }

    async fn depth(&self, lane: &str) -> Result<u64, QueueError> {
        let state = self.shared.state();
        Ok(state.lanes.get(lane).map_or(0, |l| (l.waiting.len() + l.pending.len()) as u64))
    }

    async fn sweep_pending(&self, lane: &str, idle: Duration) -> Result<u64, QueueError> {
        let mut state = self.shared.state();
        let Some(lane) = state.lanes.get_mut(lane) else { return Ok(0) };
        let before = lane.pending.len();
        lane.pending.retain(|_, p| p.delivered_at.elapsed() < idle);
        Ok((before - lane.pending.len()) as u64)
    }
}

/// A worker's reader of its lanes.
#[derive(Debug, Clone)]
pub struct MemoryConsumer {
    shared: Arc<Shared>,
    lanes: Vec<String>,
}

impl MemoryConsumer {
    /// Up to `count` waiting messages of each of the reader's lanes, now
    /// pending: as Redis's XREADGROUP COUNT, per lane, so a busy lane does
    /// not starve the others.
    fn take(&self, count: usize) -> Vec<Delivery> {
        let mut state = self.shared.state();
        let now = Instant::now();
        let mut out = Vec::new();
        for name in &self.lanes {
            let Some(lane) = state.lanes.get_mut(name) else { continue };
            for _ in 0..count {
                let Some((id, job)) = lane.waiting.pop_front() else { break };
                lane.pending.insert(id, Pending { delivered_at: now });
                out.push(Delivery { lane: name.clone(), message_id: id.to_string(), job: Ok(job) });
            }
        }
        out
    }
}

#[async_trait::async_trait]
impl JobSource for MemoryConsumer {
    async fn read(&self, count: usize, block: Duration) -> Result<Vec<Delivery>, QueueError> {
        let deadline = tokio::time::Instant::now() + block;
        loop {
            // Registered before looking, so a publish between the look and
            // the wait still wakes this reader.
            let published = self.shared.published.notified();
            tokio::pin!(published);
            published.as_mut().enable();
            let taken = self.take(count.max(1));
            if !taken.is_empty() {
                return Ok(taken);
            }
            if tokio::time::timeout_at(deadline, published).await.is_err() {
                return Ok(Vec::new());
            }
        }
    }

    async fn ack_many(&self, deliveries: &[Delivery]) -> Result<(), QueueError> {
        let mut state = self.shared.state();
        for delivery in deliveries {
            if let (Some(lane), Ok(id)) = (state.lanes.get_mut(&delivery.lane), delivery.message_id.parse::<u64>()) {
                lane.pending.remove(&id);
            }
        }
        Ok(())
    }
}
